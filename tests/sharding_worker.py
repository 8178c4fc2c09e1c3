"""Worker for the mesh-sharding tests (test_sharding*.py), run in a fresh Python process.

JAX fixes its device count at start-up, so each check runs ``python sharding_worker.py MODE
PATH`` with ``--xla_force_host_platform_device_count=8`` (``run_worker``). The worker computes
everything single-device first, then for each mesh shape re-loads, shards and recomputes, and
prints one JSON line; the tests assert on it. Numerics use exact f32 activations
(``Numerics(match_llamacpp=False)``): llama.cpp's activation rounding turns summation-order
differences of a partitioned matmul into whole quantization steps.

The checks are split over three test files (the tiny dense llama and the mesh errors, the tiny
MoE, SmolLM2) so that pytest-xdist's ``--dist loadfile`` can run them on different workers:
each is minutes of compiles on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MESHES = [(1, 1), (1, 2), (1, 4), (2, 4)]
TOL = 2e-3


def run_worker(*args: str, timeout: int = 600) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def check_logits(res: dict) -> None:
    for key, r in res["meshes"].items():
        assert r["max_abs_diff"] <= TOL * max(1.0, res["ref_absmax"]), (key, r["max_abs_diff"])
        assert r["greedy_equal"], key


def check_bytes(res: dict) -> None:
    for key, r in res["meshes"].items():
        m = int(key.split("x")[1])
        # every sharded leaf holds exactly 1/m of its bytes on each device
        assert r["sharded_leaves"] > 0 or m == 1, key
        assert r["bad_shard_fraction"] == [], (key, r["bad_shard_fraction"][:3])
        per_dev = r["bytes_per_device"]
        assert len(set(per_dev)) == 1, key  # balanced
        print(f"{res['name']} mesh {key}: {per_dev[0] / 2**20:.2f} MiB/device of "
              f"{res['total_bytes'] / 2**20:.2f} MiB; sharded {r['sharded_bytes'] / 2**20:.2f} "
              f"MiB -> {r['sharded_bytes'] / m / 2**20:.2f} MiB/device; notes: {r['notes']}")


def _tiny_gguf(path: str) -> str:
    import gguf
    from tinymodels import dense_hparams, dense_tensors, write_gguf

    q = gguf.GGMLQuantizationType
    # n_ff = 192: ffn_down rows hold 6 Q8_0 blocks, so they split 2 ways but not 4
    shp = dict(n_layer=2, n_embd=256, n_ff=192, n_head=8, n_head_kv=4, head_dim=32)
    t = dense_tensors(3, n_vocab=320, tied=False, **shp)
    write_gguf(path, "llama", dense_hparams(**shp), t, qtype=q.Q8_0)
    return path


def _worker_compare(path: str, name: str, meshes=MESHES, dp=((2, 1), (4, 2)),
                    hlo_meshes=()) -> dict:
    """``hlo_meshes``: the meshes whose prefill program is compiled once more to read the
    per-device row count of ``wq`` off it (``wq_param_rows``, else None): a compile of its own,
    done only where a test asserts on it."""
    import jax
    import numpy as np

    from jllama.config import MeshConfig
    from jllama.engine.engine import Engine
    from jllama.engine.sampling import SamplingParams
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.numerics import Numerics
    from jllama.parallel import plan_engine
    from jllama.parallel.mesh import bytes_per_device

    num = Numerics(match_llamacpp=False, cache_type_k="f32", cache_type_v="f32")
    g = read_gguf(path)
    rng = np.random.default_rng(0)
    spec0 = build_model(g)[0]
    n_exp = int(g.metadata.get(f"{g.architecture}.expert_count", 0) or 0)
    ids = rng.integers(3, min(spec0.n_vocab, 3000), 40).astype(np.int32)
    batch = rng.integers(3, min(spec0.n_vocab, 3000), (4, 24)).astype(np.int32)
    greedy = SamplingParams(temperature=0.0)

    def make(d: int, m: int, n_slots: int = 2):
        spec, model = build_model(g, numerics=num)
        plan = plan_engine(spec, n_slots, MeshConfig(d, m), devices=jax.devices()[: d * m])
        return Engine(spec, model, ctx_size=128, n_slots=n_slots, plan=plan), plan

    def nll(logits, toks):  # mean negative log-likelihood of the next tokens
        mx = logits.max(-1, keepdims=True)
        lp = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
        return float(-np.mean(np.take_along_axis(lp[:, :-1], toks[:, 1:, None], -1)))

    e1, _ = make(1, 1)
    ref = e1.logits(ids)
    ref_tokens = list(e1.generate(ids.tolist(), greedy, max_tokens=8))
    ref_batch = e1.score_batch(batch) if dp else None
    total = sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(e1.state))
    out = {"name": name, "ref_absmax": float(np.abs(ref).max()), "total_bytes": total,
           "n_embd": int(spec0.n_embd), "meshes": {}, "dp": {}}
    for d, m in meshes:
        e, plan = make(d, m)
        got = e.logits(ids)
        toks = list(e.generate(ids.tolist(), greedy, max_tokens=8))
        sharded, bad = 0, []
        for path_, leaf in jax.tree_util.tree_flatten_with_path(e.state)[0]:
            spec = getattr(leaf.sharding, "spec", ())
            if any(s is not None for s in spec):
                sharded += leaf.nbytes
                shard = leaf.addressable_shards[0].data.nbytes
                if shard * m != leaf.nbytes:
                    bad.append((jax.tree_util.keystr(path_), shard, leaf.nbytes))
        wq_rows = None
        if (d, m) in hlo_meshes:
            lowered = e._forward_all.lower(e.state, np.zeros((1, 16), np.int32),
                                           np.zeros(1, np.int32), e._new_cache(1), kv_len=256)
            hlo = lowered.compile().as_text()
            wq = e.state["blocks"][0]["wq"]["weight"].get_value().data
            wq = jax.tree_util.tree_leaves(wq)[0]
            rows = wq.addressable_shards[0].data.shape[0]
            wq_rows = rows if f"[{rows}," in hlo else -1
        cache_spec = list(getattr(e.cache.k[0].sharding, "spec", ())) + [None] * 4
        # stacked expert weights [n_expert, ...]: the "experts" axis of the rules table
        experts = [str(getattr(leaf.sharding, "spec", ())) for p_, leaf in
                   jax.tree_util.tree_flatten_with_path(e.state)[0]
                   if any(k in jax.tree_util.keystr(p_) for k in ("'gate'", "'up'", "'down'"))
                   and leaf.ndim >= 2 and leaf.shape[0] == n_exp]
        out["meshes"][f"{d}x{m}"] = {
            "max_abs_diff": float(np.abs(got - ref).max()),
            "greedy_equal": toks == ref_tokens,
            "attention_sharded": plan.attention_sharded,
            "notes": plan.notes,
            "bytes_per_device": sorted(bytes_per_device(e.state).values()),
            "sharded_leaves": sum(1 for s in plan.specs.values() for p in s
                                  if any(x is not None for x in p)),
            "sharded_bytes": sharded,
            "bad_shard_fraction": bad,
            "cache_spec": [str(x) if x else None for x in cache_spec[:4]],
            "wq_param_rows": wq_rows,
            "expert_specs": experts,
        }
        print(f"{name} {d}x{m}: diff {out['meshes'][f'{d}x{m}']['max_abs_diff']:.2e} "
              f"notes {plan.notes}", file=sys.stderr)
    for d, m in dp:
        e, _ = make(d, m, n_slots=d)
        sb = e.score_batch(batch)
        # the batch really is split: a data-parallel cache of score_batch's size
        c = e._new_cache(batch.shape[0])
        out["dp"][f"{d}x{m}"] = {
            "max_abs_diff": float(np.abs(sb - ref_batch).max()),
            "nll_diff": abs(nll(sb, batch) - nll(ref_batch, batch)),
            "out_batch_split": c.k[0].sharding.spec[0] == "data",
        }
    return out


def _worker_errors(path: str) -> dict:
    import jax

    from jllama.config import MeshConfig
    from jllama.engine.engine import Engine
    from jllama.errors import ConfigError
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.parallel import plan_engine

    g = read_gguf(path)
    out = {}

    def err(d, m, n_slots=1, strict=False, devices=None):
        spec, model = build_model(g)
        try:
            plan = plan_engine(spec, n_slots, MeshConfig(d, m), devices=devices, strict=strict)
            Engine(spec, model, ctx_size=64, n_slots=n_slots, plan=plan)
        except ConfigError as ex:
            return str(ex)
        return "no error"

    out["devices"] = err(3, 1)
    out["strict"] = err(1, 2, strict=True, devices=jax.devices()[:2])
    out["slots"] = err(2, 1, n_slots=1, devices=jax.devices()[:2])
    return out


def _main() -> None:
    mode = sys.argv[1]
    if mode == "tiny":
        res = _worker_compare(_tiny_gguf(sys.argv[2]), "tiny-llama",
                              hlo_meshes=((1, 2), (1, 4), (2, 4)))
    elif mode == "moe":
        import gguf
        from tinymodels_moe import write_llama_moe

        res = _worker_compare(str(write_llama_moe(Path(sys.argv[2]),
                                                  gguf.GGMLQuantizationType.Q8_0)), "tiny-moe",
                              meshes=[(1, 1), (1, 2), (2, 4)], dp=[])
    elif mode == "gguf":
        # the real model adds its 9 heads (attention replicated) to what the tiny models cover:
        # two meshes and one data-parallel split are enough for it (each mesh compiles anew)
        res = _worker_compare(sys.argv[2], Path(sys.argv[2]).stem, meshes=[(1, 4), (2, 4)],
                              dp=[(4, 2)])
    else:
        from jllama.registry import fetch

        res = _worker_errors(str(fetch("smollm2-135m-instruct")))
    print(json.dumps(res))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _main()
