"""Mesh sharding (jllama.parallel) on 8 simulated CPU devices, against the single-device engine:
the tiny random llama with 8 heads / 4 KV heads, where attention and the KV cache are split too,
and the mesh configuration errors. Each check runs in a fresh Python process
(tests/sharding_worker.py says how); test_sharding_moe.py (expert parallelism) and
test_sharding_smollm2.py (a real model whose 9 heads keep attention replicated) are the others.
"""

from __future__ import annotations

import pytest
from sharding_worker import TOL, check_bytes, check_logits, run_worker


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    return run_worker("tiny", str(path))


@pytest.mark.slow
def test_tiny_llama_full_tensor_parallel(tiny_result):
    """8 heads / 4 KV heads: attention, FFN, vocabulary and KV heads split; logits and
    data-parallel scores equal the single-device ones."""
    check_logits(tiny_result)
    check_bytes(tiny_result)
    for key in ("1x2", "1x4", "2x4"):
        r = tiny_result["meshes"][key]
        assert r["attention_sharded"], key
        assert r["cache_spec"][1] == "model", (key, r["cache_spec"])
        # the compiled program takes per-device shards: wq arrives as n_out / m rows
        m = int(key[-1])
        assert r["wq_param_rows"] == tiny_result["n_embd"] // m, r["wq_param_rows"]
    assert tiny_result["meshes"]["2x4"]["cache_spec"][0] == "data"
    # ffn_down has 6 Q8_0 blocks per row: split 2 ways, replicated (and reported) 4 ways
    assert not any("down" in n for n in tiny_result["meshes"]["1x2"]["notes"])
    assert any("down" in n and "blocks per row 6" in n
               for n in tiny_result["meshes"]["1x4"]["notes"])
    for key, r in tiny_result["dp"].items():
        assert r["max_abs_diff"] <= TOL * max(1.0, tiny_result["ref_absmax"]), key
        assert r["out_batch_split"], key


def test_mesh_config_errors():
    res = run_worker("errors")
    assert "data=3 x model=1 = 3 devices, but 8" in res["devices"]
    assert "n_head=9" in res["strict"] and "model" in res["strict"]
    assert "'data' of size 2 does not divide the slot count 1" in res["slots"]
