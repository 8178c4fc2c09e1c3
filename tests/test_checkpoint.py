"""Orbax checkpoints (jllama.checkpoint, ``jllama convert --to-orbax``) against the GGUF load.

The reference is the GGUF-loaded engine itself: a checkpoint must give back every parameter
leaf bit for bit (same tree, dtypes, layouts) and therefore identical logits. Restoring into a
mesh runs in a subprocess with 4 simulated CPU devices (this file is also that worker, as
sharding_worker.py is the mesh tests'): the arrays must arrive in the shardings ``plan_engine``
plans for a GGUF-loaded engine, and logits match the single-device ones within
sharding_worker.py's tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TOL = 2e-3
MESHES = [(1, 4), (2, 2)]


def _tiny_gguf(path: Path, qtype_name: str = "Q8_0") -> Path:
    """A tiny llama with 8 heads / 4 KV heads (attention splits 2 and 4 ways)."""
    import gguf
    from tinymodels import dense_hparams, dense_tensors, write_gguf

    shp = dict(n_layer=2, n_embd=256, n_ff=192, n_head=8, n_head_kv=4, head_dim=32)
    t = dense_tensors(3, n_vocab=320, tied=False, **shp)
    write_gguf(path, "llama", dense_hparams(**shp), t,
               qtype=getattr(gguf.GGMLQuantizationType, qtype_name))
    return path


def _assert_same_leaves(a_state, b_state) -> None:
    import jax

    from jllama.quant.qtensor import QTensor

    is_q = lambda x: isinstance(x, QTensor)  # noqa: E731
    a, ta = jax.tree_util.tree_flatten_with_path(a_state, is_leaf=is_q)
    b, tb = jax.tree_util.tree_flatten_with_path(b_state, is_leaf=is_q)
    assert ta == tb  # same modules, and QTensor static fields (type, shape, layout)
    for (path, x), (_, y) in zip(a, b, strict=True):
        # a weight read in place at a file offset is stored in its usual shape
        x, y = (v.natural() if is_q(v) else v for v in (x, y))
        xs, ys = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)
        assert len(xs) == len(ys), path
        for u, v in zip(xs, ys, strict=True):
            u, v = np.asarray(u), np.asarray(v)
            assert u.dtype == v.dtype and u.shape == v.shape, (path, u.dtype, v.dtype)
            assert u.tobytes() == v.tobytes(), jax.tree_util.keystr(path)


def test_roundtrip_smollm2_exact(smollm2_path, tmp_path):
    """SmolLM2 (Q4_1 blocks) through ``jllama convert``: bit-identical leaves and logits."""
    from jllama.api import Llama
    from jllama.cli.main import main

    out = tmp_path / "smollm2-orbax"
    assert main(["convert", str(smollm2_path), "--to-orbax", str(out)]) == 0
    ref = Llama(smollm2_path, ctx_size=256, compile_cache=False)
    got = Llama(out, ctx_size=256, compile_cache=False)
    _assert_same_leaves(ref.engine.state, got.engine.state)
    assert got.spec == ref.spec
    text = "The capital of France is Paris, and the capital of Italy is"
    ids = ref.tokenize(text)
    assert got.tokenize(text) == ids and got.tokenizer.eog_ids == ref.tokenizer.eog_ids
    assert np.array_equal(ref.logits(ids), got.logits(ids))
    assert got.gguf.get("tokenizer.chat_template") == ref.gguf.get("tokenizer.chat_template")


def test_roundtrip_tiny_engine_i8_layout(tmp_path):
    """An Engine saved with some weights in the repacked ``i8`` layout (tuples of arrays) comes
    back with the same layouts and bytes; logits identical."""
    from jllama.checkpoint import restore, save
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.kernels.dispatch import repack_i8
    from jllama.models import build_model, load_weights
    from jllama.models.common import Weights
    from jllama.numerics import Numerics

    g = read_gguf(_tiny_gguf(tmp_path / "tiny.gguf", "Q4_1"))
    w = load_weights(g)
    # the i8 repack is what a CPU without the C++ kernels runs on: force it for the FFN
    w = Weights({n: repack_i8(q) if "ffn" in n else q for n, q in w.tensors.items()}, g.path)
    spec, model = build_model(g, w)
    ref = Engine(spec, model, ctx_size=128, numerics=Numerics(cache_type_k="f32", cache_type_v="f32"))
    save(ref, tmp_path / "ck", gguf=g)
    ck = restore(tmp_path / "ck")
    got = Engine(ck.spec, ck.model, ctx_size=128, numerics=Numerics(cache_type_k="f32", cache_type_v="f32"))
    assert ck.model.blocks[0].ffn.down.weight.get_value().layout == "i8"
    _assert_same_leaves(ref.state, got.state)
    ids = [5, 17, 99, 3, 250, 42, 7, 300]
    assert np.array_equal(ref.logits(ids), got.logits(ids))


# a restore refused mid-read leaves Orbax's TensorStore futures to the garbage collector
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_errors(tmp_path):
    from jllama.api import Llama
    from jllama.checkpoint import CheckpointError, restore, save
    from jllama.cli.main import main
    from jllama.errors import JllamaError

    assert issubclass(CheckpointError, JllamaError)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a jllama checkpoint"):
        Llama(empty, compile_cache=False)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        restore(tmp_path / "missing")

    src = _tiny_gguf(tmp_path / "tiny.gguf")
    ck = tmp_path / "ck"
    assert main(["convert", str(src), "--to-orbax", str(ck)]) == 0
    # refuses to overwrite unless asked, and never a directory that is not a checkpoint
    assert main(["convert", str(src), "--to-orbax", str(ck)]) == 1
    (empty / "notes.txt").write_text("keep me")
    llm = Llama(src, ctx_size=64, compile_cache=False)
    with pytest.raises(CheckpointError, match="not a jllama checkpoint"):
        save(llm, empty, overwrite=True)
    assert (empty / "notes.txt").exists()

    marker = ck / "jllama-checkpoint.json"
    good = marker.read_text()
    marker.write_text(good[: len(good) // 2])  # truncated JSON
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata"):
        restore(ck)
    meta = json.loads(good)
    meta["params"].pop("blocks.1.wq.weight")
    marker.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"do not match.*blocks\.1\.wq\.weight"):
        restore(ck)
    meta = json.loads(good)
    meta["params"]["output.weight"]["arrays"][0]["shape"][1] += 2  # lies about stored bytes
    marker.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="arrays do not match its metadata"):
        restore(ck)
    meta = json.loads(good)
    meta["version"] = 99
    marker.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        restore(ck)
    marker.write_text(good)
    with pytest.raises(CheckpointError, match="already quantized"):
        Llama(ck, quant={"base": "q8_0"}, compile_cache=False)


def test_restore_into_mesh(tmp_path):
    """Saved unsharded, restored into meshes (1, 4) and (2, 2): each array lands in the
    sharding planned for a GGUF-loaded engine; logits match single-device within 2e-3."""
    res = _run_worker(str(_tiny_gguf(tmp_path / "tiny.gguf")), str(tmp_path / "ck"))
    for key, r in res["meshes"].items():
        assert r["restored_as_planned"], (key, r["mismatch"][:3])
        assert r["sharded_leaves"] > 0, key
        assert r["attention_sharded"], key
        assert r["max_abs_diff"] <= TOL * max(1.0, res["ref_absmax"]), (key, r["max_abs_diff"])
        assert r["greedy_equal"], key


# ---------------------------------------------------------------------------------- worker
def _run_worker(*args: str, timeout: int = 300) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


def _worker_mesh(gguf_path: str, ck_dir: str) -> dict:
    import jax

    from jllama.api import Llama
    from jllama.checkpoint import restore, save
    from jllama.config import MeshConfig
    from jllama.engine.sampling import SamplingParams
    from jllama.numerics import Numerics
    from jllama.quant.qtensor import QTensor

    num = Numerics(match_llamacpp=False)  # exact f32 activations, as sharding_worker.py explains
    ref_llm = Llama(gguf_path, ctx_size=128, n_slots=2, cache_type="f32", compile_cache=False,
                    numerics=num)
    save(ref_llm, ck_dir)
    ids = list(range(3, 43))
    ref = ref_llm.logits(ids)
    greedy = SamplingParams(temperature=0.0)
    ref_toks = list(ref_llm.engine.generate(ids, greedy, max_tokens=8))
    is_q = lambda x: isinstance(x, QTensor)  # noqa: E731
    out = {"ref_absmax": float(np.abs(ref).max()), "meshes": {}}
    for d, m in MESHES:
        cfg = MeshConfig(d, m)
        planned = Llama(gguf_path, ctx_size=128, n_slots=2, cache_type="f32",
                        compile_cache=False, mesh=cfg, numerics=num).engine.state
        ck = restore(ck_dir, cfg)  # before any Engine: where Orbax put the arrays
        got_items = jax.tree_util.tree_flatten_with_path(nnx_state(ck.model), is_leaf=is_q)[0]
        want_items = jax.tree_util.tree_flatten_with_path(planned, is_leaf=is_q)[0]
        mismatch, sharded = [], 0
        for (path, a), (_, b) in zip(got_items, want_items, strict=True):
            for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                            strict=True):
                if not x.sharding.is_equivalent_to(y.sharding, x.ndim):
                    mismatch.append((jax.tree_util.keystr(path), str(x.sharding),
                                     str(y.sharding)))
                sharded += any(s is not None for s in getattr(x.sharding, "spec", ()))
        llm = Llama(ck_dir, ctx_size=128, n_slots=2, cache_type="f32", compile_cache=False,
                    mesh=cfg, numerics=num)
        got = llm.logits(ids)
        toks = list(llm.engine.generate(ids, greedy, max_tokens=8))
        out["meshes"][f"{d}x{m}"] = {
            "restored_as_planned": not mismatch, "mismatch": mismatch, "sharded_leaves": sharded,
            "attention_sharded": llm.engine.plan.attention_sharded,
            "max_abs_diff": float(np.abs(got - ref).max()), "greedy_equal": toks == ref_toks,
        }
    return out


def nnx_state(model):
    from flax import nnx

    return nnx.split(model)[1]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(_worker_mesh(sys.argv[1], sys.argv[2])))
