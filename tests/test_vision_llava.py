"""LLaVA-1.5 and LLaVA-1.6 (CLIP + the mlp projector) against libmtmd (llama-cpp-python 0.3.36).

The mmproj is written in the layout convert_hf_to_gguf.py --mmproj gives a
LlavaForConditionalGeneration (tests/visionmodels.py: class embedding, pre-LayerNorm,
quick-GELU, no post-LayerNorm, f16 matrices), the text model a tiny llama. Image embeddings
(square, padded with llava's grey, down- and upscaled bicubically) and greedy tokens after the
image (decoded causally, with no image markers) must be libmtmd's exactly.

LLaVA-1.6's mmproj is written as llama.cpp's legacy converter writes one (grid pinpoints,
feature_layer, fc1/fc2 under swapped names, an unused image_newline); libmtmd 0c1e570 cuts an
image larger than a tile into the best pinpoint grid of tiles plus a stretched overview, each
its own image chunk: the chunk layout, every chunk's embeddings and the greedy tokens must be
libmtmd's.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.oracle

SHAPES = [(56, 56), (40, 70), (120, 90)]


def _llava(d, write_mmproj):
    """The tiny llama text model with an mmproj from ``write_mmproj`` in ``d``: yields (d,
    libmtmd on them, our Vision), closing libmtmd after the module."""
    import visionmodels as V
    from mtmd_oracle import Mtmd

    from jllama.models.clip import load_vision

    V.write_llama_text_model(d / "text.gguf")
    write_mmproj(d / "mmproj.gguf")
    o = Mtmd(d / "text.gguf", d / "mmproj.gguf")
    yield d, o, load_vision(d / "mmproj.gguf")
    o.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import visionmodels as V

    yield from _llava(tmp_path_factory.mktemp("llava"), V.write_llava_mmproj)


@pytest.mark.parametrize("shape", SHAPES)
def test_llava_embeddings_bit_exact(setup, shape):
    _, o, vision = setup
    img = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    chunk = [c for c in o.tokenize("<__media__>", [img]) if isinstance(c, tuple)][0]
    ref, _ = o.encode(chunk)
    ours = vision.encode(img)
    assert ours.shape == ref.shape == (16, 128)
    assert np.array_equal(ours, ref)


@pytest.fixture(scope="module")
def text_engine(tmp_path_factory):
    """One engine for both projectors (the same tiny llama text model, written once)."""
    import visionmodels as V

    path = V.write_llama_text_model(tmp_path_factory.mktemp("text") / "text.gguf")
    eng, tok = V.text_engine(path)
    return eng.spec, eng, tok


def _greedy_vs_libmtmd(text_engine, o, vision, img):
    from jllama.engine import multimodal
    from jllama.engine.sampling import SamplingParams

    spec, eng, tok = text_engine
    multimodal.check_pair(vision, spec.n_embd, spec.arch)
    prompt = "USER: <__media__>\nWhat is shown? ASSISTANT:"
    ref_chunks = o.tokenize(prompt, [img])
    chs = multimodal.chunks(tok, vision, prompt, [img])
    assert [c if isinstance(c, list) else c.embd.shape[0] for c in chs] == \
        [c if isinstance(c, list) else c[0] for c in ref_chunks]
    ref = o.greedy(prompt, [img], 16)
    got = list(multimodal.generate(eng, chs, SamplingParams.greedy(), 16, {tok.vocab.eos_id}))
    assert len(ref) >= 8
    assert got == ref
    return ref_chunks


def test_llava_greedy_tokens(setup, text_engine):
    _, o, vision = setup
    img = np.random.default_rng(9).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    _greedy_vs_libmtmd(text_engine, o, vision, img)


# ----------------------------------------------------------------------------- LLaVA-1.6
@pytest.fixture(scope="module")
def setup16(tmp_path_factory):
    import visionmodels as V

    yield from _llava(tmp_path_factory.mktemp("llava16"), V.write_llava16_mmproj)


# (h, w) -> image chunks: a small image is the overview alone; larger ones take the pinpoint
# (w x h) 56x112 (1x2 tiles, padded), 168x56 (3x1) and 112x112 (2x2), then the overview
SHAPES16 = [((50, 40), 1), ((90, 40), 3), ((50, 150), 4), ((130, 100), 5)]


@pytest.mark.parametrize("shape,n_chunks", SHAPES16)
def test_llava16_tiles_embeddings_bit_exact(setup16, shape, n_chunks):
    _, o, vision = setup16
    img = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    refs = [o.encode(c)[0] for c in o.tokenize("<__media__>", [img]) if isinstance(c, tuple)]
    ours = vision.encode_chunks(img)
    assert len(refs) == len(ours) == n_chunks
    for a, b in zip(ours, refs):
        assert a.shape == b.shape == (16, 128)
        assert np.array_equal(a, b)


def test_llava16_greedy_tokens(setup16, text_engine):
    _, o, vision = setup16
    img = np.random.default_rng(4).integers(0, 256, (130, 100, 3), dtype=np.uint8)
    ref_chunks = _greedy_vs_libmtmd(text_engine, o, vision, img)
    assert [c if isinstance(c, list) else c[0] for c in ref_chunks][1:-1] == [16] * 5


def test_llava16_stacked_feature_layers(tmp_path, setup16):
    """Several feature layers (layer 0's input, layer 2's, the last output): stacked along
    the features before the projector, as clip.cpp's llava graph does."""
    import visionmodels as V
    from mtmd_oracle import Mtmd

    from jllama.models.clip import load_vision

    d = setup16[0]
    V.write_llava16_mmproj(tmp_path / "mmproj.gguf", feature_layers=[0, 2, 3])
    o = Mtmd(d / "text.gguf", tmp_path / "mmproj.gguf")
    try:
        img = np.random.default_rng(3).integers(0, 256, (90, 40, 3), dtype=np.uint8)
        refs = [o.encode(c)[0] for c in o.tokenize("<__media__>", [img])
                if isinstance(c, tuple)]
    finally:
        o.close()
    ours = load_vision(tmp_path / "mmproj.gguf").encode_chunks(img)
    assert len(ours) == len(refs) == 3
    assert all(np.array_equal(a, b) for a, b in zip(ours, refs))


def test_vision_keeps_recent_images(setup16):
    """The same pixels again (a chat's earlier image) reuse the kept embeddings; one changed
    pixel is a new image; the oldest leave first."""
    _, _, vision = setup16
    img = np.random.default_rng(5).integers(0, 256, (90, 40, 3), dtype=np.uint8)
    a = vision.encode_chunks(img)
    assert all(x is y for x, y in zip(a, vision.encode_chunks(img.copy())))
    other = img.copy()
    other[0, 0, 0] ^= 1
    b = vision.encode_chunks(other)
    assert not any(x is y for x, y in zip(a, b))
    for seed in range(vision.cache_images):
        vision.encode_chunks(np.full((8, 8, 3), seed, np.uint8))
    assert not any(x is y for x, y in zip(a, vision.encode_chunks(img)))


def test_llava16_pinpoints_not_tile_multiples_refused(tmp_path):
    import visionmodels as V

    from jllama.errors import ModelError
    from jllama.models.clip import load_vision

    V.write_llava16_mmproj(tmp_path / "mmproj.gguf", pinpoints=((56, 100),))
    with pytest.raises(ModelError, match="not a multiple of image_size 56"):
        load_vision(tmp_path / "mmproj.gguf")
