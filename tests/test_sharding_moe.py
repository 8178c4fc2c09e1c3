"""Expert parallelism on 8 simulated CPU devices (tests/sharding_worker.py runs it in a fresh
process): a tiny Mixtral-style llama against the single-device engine."""

from __future__ import annotations

import pytest
from sharding_worker import check_logits, run_worker


@pytest.mark.slow
def test_tiny_moe_expert_parallel(tmp_path):
    """Mixtral-style, 4 experts: the stacked expert weights split along the expert axis over
    ``model`` (2 or 1 experts per device; 1x4 is 2x4's split of the experts, and the data axis
    is the tiny llama's test); logits and greedy tokens equal single-device."""
    res = run_worker("moe", str(tmp_path / "tiny-moe.gguf"))
    check_logits(res)
    assert set(res["meshes"]) == {"1x1", "1x2", "2x4"}
    for key in ("1x2", "2x4"):
        specs = res["meshes"][key]["expert_specs"]
        assert len(specs) == 2 * 3, specs  # 2 layers x (gate, up, down)
        assert all(sp.startswith(("PartitionSpec('model'", "P('model'")) for sp in specs), (key, specs)
    assert all("'model'" not in sp for sp in res["meshes"]["1x1"]["expert_specs"])
