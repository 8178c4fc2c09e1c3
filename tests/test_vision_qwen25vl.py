"""Qwen2.5-VL (its ViT with window attention + the qwen2.5vl_merger projector) against libmtmd
(llama-cpp-python 0.3.36).

The mmproj is written as llama.cpp's ``convert_hf_to_gguf.py --mmproj`` writes it for a tiny
random ``Qwen2_5_VLForConditionalGeneration`` (tests/visionmodels.py, without torch; 4 layers,
window attention in layers 0 and 2, RMS norms, gated SiLU MLP, f16 matrices); the text model
is tests/test_vision_qwen2vl.py's Q8_0 ``qwen2vl``. Image embeddings for one window (84x112)
and for images cut into 4 windows of unequal sizes (140x140 -> 5x5 merged tokens in windows of
4x4, 4x1, 1x4, 1x1), then greedy tokens after an image, must be libmtmd's exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.oracle

PROMPT = ("<|im_start|>user\n<__media__>Describe this image.<|im_end|>\n"
          "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import gguf
    import visionmodels as V
    from mtmd_oracle import Mtmd

    from jllama.models.clip import load_vision

    d = tmp_path_factory.mktemp("qwen25vl")
    V.write_qwen25vl_mmproj(d / "mmproj.gguf")
    V.write_qwen2vl_text_model(d / "text.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    o = Mtmd(d / "text.gguf", d / "mmproj.gguf")
    yield d, o, load_vision(d / "mmproj.gguf")
    o.close()


@pytest.mark.parametrize("shape", [(56, 84), (150, 130), (140, 150)])
def test_embeddings_bit_exact(setup, shape):
    _, o, vision = setup
    assert vision.spec.norm == "rms" and vision.spec.n_wa_pattern == 2
    img = np.random.default_rng(shape[1]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    (chunk,) = [c for c in o.tokenize("<__media__>", [img]) if isinstance(c, tuple)]
    ref, _ = o.encode(chunk)
    ours = vision.encode(img)
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref)


def test_window_layout():
    """clip.cpp's window grouping for 5x5 merged tokens (windows of 4 merged tokens a side):
    the units of each window contiguous, windows in raster order."""
    from jllama.models.clip import qwen25vl_windows

    inv, seg = qwen25vl_windows(10, 10, 14)
    assert inv[:16].tolist() == [y * 5 + x for y in range(4) for x in range(4)]
    assert inv[16:20].tolist() == [4, 9, 14, 19]
    assert inv[20:24].tolist() == [20, 21, 22, 23] and inv[24] == 24
    assert np.bincount(seg).tolist() == [64, 16, 16, 4]


def test_greedy_tokens(setup):
    from jllama.engine import multimodal
    from jllama.engine.engine import Engine
    from jllama.engine.sampling import SamplingParams
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.numerics import Numerics
    from jllama.tokenizer import Tokenizer

    d, o, vision = setup
    g = read_gguf(d / "text.gguf")
    spec, model = build_model(g)
    multimodal.check_pair(vision, spec.n_embd, spec.arch)
    eng = Engine(spec, model, ctx_size=256,
                 numerics=Numerics(cache_type_k="f16", cache_type_v="f16"))
    tok = Tokenizer.from_gguf(g)
    img = np.random.default_rng(2).integers(0, 256, (150, 130, 3), dtype=np.uint8)
    chs = multimodal.chunks(tok, vision, PROMPT, [img])
    ref_chunks = o.tokenize(PROMPT, [img])
    assert [c if isinstance(c, list) else c.embd.shape[0] for c in chs] == \
        [c if isinstance(c, list) else c[0] for c in ref_chunks]
    ref = o.greedy(PROMPT, [img], 12)
    got = list(multimodal.generate(eng, chs, SamplingParams.greedy(), 12, {tok.vocab.eos_id}))
    assert len(ref) >= 6
    assert got == ref
