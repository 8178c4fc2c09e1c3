"""LLaVA-1.5 (CLIP + the mlp projector) against libmtmd (llama-cpp-python 0.3.36).

The mmproj is written in the layout convert_hf_to_gguf.py --mmproj gives a
LlavaForConditionalGeneration (tests/visionmodels.py: class embedding, pre-LayerNorm,
quick-GELU, no post-LayerNorm, f16 matrices), the text model a tiny llama. Image embeddings
(square, padded with llava's grey, down- and upscaled bicubically) and greedy tokens after the
image (decoded causally, with no image markers) must be libmtmd's exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.oracle

SHAPES = [(56, 56), (40, 70), (120, 90)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import visionmodels as V
    from mtmd_oracle import Mtmd

    from jllama.models.clip import load_vision

    d = tmp_path_factory.mktemp("llava")
    V.write_llama_text_model(d / "text.gguf")
    V.write_llava_mmproj(d / "mmproj.gguf")
    o = Mtmd(d / "text.gguf", d / "mmproj.gguf")
    yield d, o, load_vision(d / "mmproj.gguf")
    o.close()


@pytest.mark.parametrize("shape", SHAPES)
def test_llava_embeddings_bit_exact(setup, shape):
    _, o, vision = setup
    img = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    chunk = [c for c in o.tokenize("<__media__>", [img]) if isinstance(c, tuple)][0]
    ref, _ = o.encode(chunk)
    ours = vision.encode(img)
    assert ours.shape == ref.shape == (16, 128)
    assert np.array_equal(ours, ref)


def test_llava_greedy_tokens(setup):
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
    eng = Engine(spec, model, ctx_size=128,
                 numerics=Numerics(cache_type_k="f16", cache_type_v="f16"))
    tok = Tokenizer.from_gguf(g)
    img = np.random.default_rng(9).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    prompt = "USER: <__media__>\nWhat is shown? ASSISTANT:"
    ref_chunks = o.tokenize(prompt, [img])
    chs = multimodal.chunks(tok, vision, prompt, [img])
    assert [c if isinstance(c, list) else c.embd.shape[0] for c in chs] == \
        [c if isinstance(c, list) else c[0] for c in ref_chunks]
    ref = o.greedy(prompt, [img], 16)
    got = list(multimodal.generate(eng, chs, SamplingParams.greedy(), 16, {tok.vocab.eos_id}))
    assert len(ref) >= 8
    assert got == ref
