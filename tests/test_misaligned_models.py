"""Files whose data section sits at 32 mod 64 (about half of real GGUF files; GGUF aligns to
32, XLA:CPU adopts host buffers at 64): their quantized weights are read in place through a
byte offset (quant/qtensor.py) by the int8 kernels, including the paths that read a layer's or
an expert's weights out of a stack (the scanned decoder, mul_mat_id, gathered experts in
decode), the embedding lookup and MLA's per-head factors. Each architecture's misaligned copy
against llama.cpp on the same file, bit for bit where llama.cpp's CPU defaults are
reproduced (tests/test_arch_moe.py), and its logits equal to the aligned original's.
"""

from __future__ import annotations

import numpy as np
import pytest
import tinymodels_moe as tm
from tinymodels import mapped_ranges, realigned

pytestmark = pytest.mark.oracle


def _quantized(eng) -> list:
    import jax

    from jllama.quant.qtensor import QTensor

    return [v for v in jax.tree_util.tree_leaves(eng.state,
                                                 is_leaf=lambda x: isinstance(x, QTensor))
            if isinstance(v, QTensor) and not v.is_float]


WRITERS = {
    "qwen3moe_q4_0": lambda p: tm.write_qwen3moe(p, quant=tm.Q.Q4_0),
    "llama_moe_q8_0": lambda p: tm.write_llama_moe(p, quant=tm.Q.Q8_0),
    "deepseek2_q8_0": lambda p: tm.write_deepseek2(p, quant=tm.Q.Q8_0),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_misaligned_copy_reads_in_place_and_matches(tmp_path, name):
    from jllama.gguf.reader import read_gguf

    src = WRITERS[name](tmp_path / f"{name}.gguf")
    if read_gguf(src).data_offset % 64 == 32:  # the writer's header happened to land there
        src = realigned(src, tmp_path / f"{name}_a.gguf", mod=0)
    dst = realigned(src, tmp_path / f"{name}_m.gguf", mod=32)
    eng = tm.jllama_engine(dst, cache="f16", flash_attn=True)
    ids = tm.prompt_ids(eng.spec.n_vocab)
    # every quantized weight read in place from the file (tensors of sizes that are not a
    # multiple of 64 leave the next one aligned again: offsets 0 and 32 both occur)
    qts, ranges = _quantized(eng), mapped_ranges(dst)
    assert 32 in {qt.offset for qt in qts}
    for qt in qts:
        ptr = qt.data.unsafe_buffer_pointer()
        assert any(a <= ptr and ptr + qt.data.nbytes <= b for a, b in ranges), qt.shape
    got = eng.logits(ids)
    want = tm.jllama_engine(src, cache="f16", flash_attn=True).logits(ids)
    np.testing.assert_array_equal(got, want)
    if name != "deepseek2_q8_0":  # llama.cpp's defaults reproduced bit for bit (test_arch_moe)
        tm.compare(dst, None, tol=0.0, cache="f16", flash_attn=True, n_greedy=8)
