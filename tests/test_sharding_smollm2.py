"""Mesh sharding of a real model on 8 simulated CPU devices (tests/sharding_worker.py runs it in
a fresh process): SmolLM2-135M has 9 heads / 3 KV heads, so attention cannot split 2 or 4 ways
and only FFN and vocabulary are sharded, which the plan reports."""

from __future__ import annotations

import pytest
from sharding_worker import TOL, check_bytes, check_logits, run_worker


@pytest.mark.slow
def test_smollm2_sharded_logits(smollm2_path):
    """9 heads: attention replicated (reported), FFN/vocab split; logits, greedy decode and
    data-parallel perplexity scoring equal the single-device engine."""
    smollm2_result = run_worker("gguf", str(smollm2_path))
    check_logits(smollm2_result)
    check_bytes(smollm2_result)
    assert set(smollm2_result["meshes"]) == {"1x4", "2x4"}
    for key in ("1x4", "2x4"):
        r = smollm2_result["meshes"][key]
        assert not r["attention_sharded"]
        assert any("n_head=9" in n for n in r["notes"]), r["notes"]
    for key, r in smollm2_result["dp"].items():
        assert r["max_abs_diff"] <= TOL * max(1.0, smollm2_result["ref_absmax"]), key
        assert r["nll_diff"] < 1e-4, key
