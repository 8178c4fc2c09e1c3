"""Gemma 3 vision (SigLIP + the gemma3 projector) against libmtmd (llama-cpp-python 0.3.36).

A tiny random ``Gemma3ForConditionalGeneration`` vision tower converted by llama.cpp's own
``convert_hf_to_gguf.py --mmproj`` (f32 and f16, the converter's default), with a tiny
``gemma3`` text model of the projector's width: libmtmd's chunking of a prompt with an image
(token ids), its image embeddings (``mtmd_encode_chunk``) for a square image and for one
that is resized with padding, and greedy tokens after ``mtmd_helper_eval_chunks`` (the image
decoded non-causally) must all be libmtmd's exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.oracle

PROMPT = ("<start_of_turn>user\nWhat is in this picture? <__media__> Tell me.<end_of_turn>\n"
          "<start_of_turn>model\n")
IMAGES = {"square": (64, 64), "wide-padded": (50, 70), "large-downscaled": (150, 130)}


def _image(shape, seed=0) -> np.ndarray:
    from visionmodels import gradient_image

    return gradient_image(shape, seed, noise=30)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import convert_reference as R
    import visionmodels as V

    R.needs_reference_deps()
    d = tmp_path_factory.mktemp("gemma3v")
    cfg = V.vision_config()
    V.write_vision_checkpoint(d / "hf", cfg)
    R.run_reference([(d / "hf", d / "mmproj-f16.gguf", "f16", "--mmproj"),
                     (d / "hf", d / "mmproj-f32.gguf", "f32", "--mmproj")])
    V.write_text_model(d / "text.gguf")
    return d


def _pair(files, kind):
    from mtmd_oracle import Mtmd

    from jllama.models.clip import load_vision

    mmproj = files / f"mmproj-{kind}.gguf"
    return kind, Mtmd(files / "text.gguf", mmproj), load_vision(mmproj)


@pytest.fixture(scope="module", params=["f16", "f32"])
def pair(request, files):
    p = _pair(files, request.param)
    yield p
    p[1].close()


@pytest.fixture(scope="module")
def pair16(files):
    p = _pair(files, "f16")
    yield p
    p[1].close()


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_embeddings_bit_exact(pair, image):
    kind, oracle, vision = pair
    img = _image(IMAGES[image])
    chunks = oracle.tokenize("<__media__>", [img])
    (img_chunk,) = [c for c in chunks if isinstance(c, tuple)]
    ref, _ = oracle.encode(img_chunk)
    ours = vision.encode(img)
    assert ours.shape == ref.shape == (vision.spec.n_image_tokens, 128)
    print(f"\n{kind} {image}: max|d| = {np.abs(ours - ref).max():.3g}")
    assert np.array_equal(ours, ref)


@pytest.fixture(scope="module")
def engine(files):
    import visionmodels as V

    return V.text_engine(files / "text.gguf")


def test_chunks_and_greedy_tokens(pair16, engine):
    from jllama.engine import multimodal
    from jllama.engine.sampling import SamplingParams

    # one mmproj type: the text side sees only the embeddings, equal to libmtmd's for both
    kind, oracle, vision = pair16
    eng, tok = engine
    img = _image(IMAGES["wide-padded"], seed=1)
    ref_chunks = oracle.tokenize(PROMPT, [img])
    ours = multimodal.chunks(tok, vision, PROMPT, [img])
    assert [c if isinstance(c, list) else c.embd.shape[0] for c in ours] == \
        [c if isinstance(c, list) else c[0] for c in ref_chunks]
    ref = oracle.greedy(PROMPT, [img], 24)
    eos = tok.vocab.eos_id
    got = list(multimodal.generate(eng, ours, SamplingParams.greedy(), 24, {eos}))
    print(f"\n{kind}: {len(got)} greedy tokens after the image, libmtmd {len(ref)}")
    assert len(ref) >= 8
    assert got == ref


def test_image_tokens_attend_non_causally(pair16, engine):
    """The image batch is decoded with causal attention off (as libmtmd does for Gemma 3): the
    logits after the image differ from a causal decode of the same embeddings."""
    from jllama.engine import multimodal

    _, _, vision = pair16
    eng, tok = engine
    img = _image(IMAGES["square"], seed=2)
    chs = multimodal.chunks(tok, vision, "<__media__>", [img])
    outs = []
    for bidir in (True, False):
        eng.reset(0)
        eng.prefill(chs[0], 0)
        outs.append(np.asarray(eng.prefill_embeddings(chs[1].embd, 0, bidir=bidir)))
    assert not np.allclose(outs[0], outs[1])


def test_mismatched_mmproj_is_refused(files, tmp_path):
    """A projector whose width is not the text model's: one clear error."""
    from jllama.engine import multimodal
    from jllama.errors import ModelError
    from jllama.models.clip import load_vision

    vision = load_vision(files / "mmproj-f16.gguf")
    with pytest.raises(ModelError, match="mismatched mmproj"):
        multimodal.check_pair(vision, 256, "gemma3")
    with pytest.raises(ModelError, match="not an mmproj"):
        load_vision(files / "text.gguf")
