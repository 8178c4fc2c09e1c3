"""Running llama.cpp's own convert_hf_to_gguf.py (0c1e570) as the oracle of `jllama convert-hf`.

All the reference conversions a test module needs run in one Python process (torch and
transformers are imported once): ``run_reference(jobs)`` with ``jobs`` a list of
``(model_dir, out_file, outtype)``. The script comes from the oracle's source package
(tests/testdata.py) and runs with its own gguf-py first on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import testdata

_DRIVER = """
import json, runpy, sys
conv, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, conv)
for model, out, outtype, *extra in jobs:
    sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", outtype, *extra]
    runpy.run_path(conv + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def run_reference(jobs: list[tuple]) -> None:
    """``jobs``: ``(model_dir, out_file, outtype, *extra_args)`` (e.g. ``"--mmproj"``)."""
    conv = testdata.reference_converter()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(conv / "gguf-py"), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(conv),
         json.dumps([[str(a) for a in job] for job in jobs])],
        env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}")


def needs_reference_deps() -> None:
    import pytest

    if not os.environ.get("CI"):  # in CI a missing oracle is a failure, not a skip
        for m in ("torch", "transformers", "safetensors", "sentencepiece"):
            pytest.importorskip(m, reason="pip install -e .[test]")


def same_file(ours: Path, ref: Path) -> None:
    """Byte equality; on a difference, the first metadata key or tensor that differs."""
    import numpy as np
    import pytest

    a, b = ours.read_bytes(), ref.read_bytes()
    if a == b:
        return
    from jllama.gguf import read_gguf

    ga, gb = read_gguf(ours), read_gguf(ref)
    assert list(ga.metadata) == list(gb.metadata)
    for k in ga.metadata:
        assert np.array_equal(np.asarray(ga.metadata[k], dtype=object),
                              np.asarray(gb.metadata[k], dtype=object)), k
    assert [(t.name, t.shape, t.qtype) for t in ga.tensors.values()] == \
        [(t.name, t.shape, t.qtype) for t in gb.tensors.values()]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    pytest.fail(f"{ours.name} differs from {ref.name} from byte {first} "
                f"({len(a)} vs {len(b)} bytes)")


def convert_cases(root: Path, cases: dict) -> tuple[Path, dict[str, Path]]:
    """Write each case's checkpoint under ``root`` and convert all with the reference."""
    import hfcheckpoints as H

    needs_reference_deps()
    jobs, dirs = [], {}
    for name, (cfg, tensors, tok, dtype, shards, outtype) in cases.items():
        # a Hub-style folder name exercises general.name/basename/size_label/finetune parsing
        dirs[name] = H.write_checkpoint(root / name, cfg, tensors(), tok, dtype=dtype,
                                        shards=shards, card=name.startswith("Qwen2.5"))
        jobs.append((dirs[name], root / f"ref-{name}.gguf", outtype))
    run_reference(jobs)
    return root, dirs


def check_cases(references, tmp_path: Path, name: str, cases: dict) -> None:
    from jllama.convert import convert_hf

    root, dirs = references
    ours = tmp_path / "ours.gguf"
    convert_hf(dirs[name], ours, cases[name][-1])
    same_file(ours, root / f"ref-{name}.gguf")
