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
for model, out, outtype in jobs:
    sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", outtype]
    runpy.run_path(conv + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def run_reference(jobs: list[tuple[Path, Path, str]]) -> None:
    conv = testdata.reference_converter()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(conv / "gguf-py"), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(conv),
         json.dumps([[str(m), str(o), t] for m, o, t in jobs])],
        env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}")
