"""SmolVLM / Idefics3 (SigLIP + the idefics3 pixel-shuffle projector) against libmtmd
(llama-cpp-python 0.3.36).

The mmproj is written in the layout convert_hf_to_gguf.py --mmproj gives an
Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration (tests/visionmodels.py:
f32 embeddings, f16 matrices, ``mm.model.fc``, ``clip.vision.preproc_image_size``), the text
model a tiny llama whose vocabulary has SmolVLM's marker tokens. An image is resized (Lanczos)
to the longest edge, cut into tiles plus a global image, each one chunk between text markers:
the chunk list (every text token id, every image chunk's size), every chunk's embeddings
(``mtmd_encode_chunk``) and the greedy tokens after the image must be libmtmd's exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from jllama.cli.main import main

pytestmark = pytest.mark.oracle

PROMPT = "<|im_start|>User:<__media__>What is in this image?<end_of_utterance>\nAssistant:"
# (h, w): 2x2 tiles (downscaled), 1 row of 2 tiles (upscaled, odd height made even),
# 2 rows of 1 tile, a small square upscaled to 2x2
SHAPES = [(50, 70), (30, 100), (90, 40), (20, 20)]


def _image(shape, seed=0) -> np.ndarray:
    from visionmodels import gradient_image

    return gradient_image(shape, seed, noise=40)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import visionmodels as V

    d = tmp_path_factory.mktemp("idefics3")
    V.write_smolvlm_text_model(d / "text.gguf")
    V.write_idefics3_mmproj(d / "mmproj.gguf")
    # SmolVLM's shape of merge: 8 x 8 patches per tile shuffled by 4, up to 3 x 3 tiles
    V.write_idefics3_mmproj(d / "mmproj-s4.gguf", image_size=64, scale_factor=4,
                            longest_edge=192, seed=3)
    return d


@pytest.fixture(scope="module")
def setup(files):
    from mtmd_oracle import Mtmd

    from jllama.gguf.reader import read_gguf
    from jllama.models.clip import load_vision
    from jllama.tokenizer import Tokenizer

    o = Mtmd(files / "text.gguf", files / "mmproj.gguf")
    yield o, load_vision(files / "mmproj.gguf"), Tokenizer.from_gguf(read_gguf(files / "text.gguf"))
    o.close()


def _same_chunks(oracle, vision, tok, prompt, img) -> int:
    """Chunk layout and token ids equal to libmtmd's, each image chunk's embeddings bit-exact;
    returns the number of image chunks. ``img``: one image or a list."""
    from jllama.engine import multimodal

    imgs = img if isinstance(img, list) else [img]
    ref = oracle.tokenize(prompt, imgs)
    ours = multimodal.chunks(tok, vision, prompt, imgs)
    assert [c if isinstance(c, list) else c.embd.shape[0] for c in ours] == \
        [c if isinstance(c, list) else c[0] for c in ref]
    n = 0
    for r, c in zip(ref, ours, strict=True):
        if isinstance(r, tuple):
            want, _ = oracle.encode(r)
            assert c.embd.shape == want.shape == (vision.spec.n_image_tokens, 128)
            assert np.array_equal(c.embd, want), f"image chunk {n}"
            n += 1
    return n


@pytest.mark.parametrize("shape", SHAPES)
def test_tiles_chunks_and_embeddings_bit_exact(setup, shape):
    oracle, vision, tok = setup
    n = _same_chunks(oracle, vision, tok, PROMPT, _image(shape, seed=shape[1]))
    tiles = {(50, 70): 4, (30, 100): 2, (90, 40): 2, (20, 20): 4}[shape]
    assert n == tiles + 1  # and the global image


def test_two_images_in_one_prompt(setup):
    oracle, vision, tok = setup
    prompt = "<|im_start|>User:<__media__> and <__media__>?<end_of_utterance>\nAssistant:"
    assert _same_chunks(oracle, vision, tok, prompt,
                        [_image((30, 100), seed=3), _image((90, 40), seed=4)]) == 6


def test_merge_by_4_three_by_three_tiles(files, setup):
    from mtmd_oracle import Mtmd

    from jllama.models.clip import load_vision

    _, _, tok = setup
    o = Mtmd(files / "text.gguf", files / "mmproj-s4.gguf")
    try:
        vision = load_vision(files / "mmproj-s4.gguf")
        assert vision.spec.n_image_tokens == 4
        assert _same_chunks(o, vision, tok, PROMPT, _image((150, 200), seed=5)) == 10
    finally:
        o.close()


@pytest.fixture(scope="module")
def llm(files):
    from jllama.api import Llama

    return Llama(str(files / "text.gguf"), ctx_size=256, mmproj=str(files / "mmproj.gguf"))


@pytest.mark.parametrize("seed", [11, 12])
def test_greedy_tokens_after_tiles(setup, llm, seed):
    """``Llama(mmproj=)`` with an image of 2 x 2 tiles: the tiles decoded causally, libmtmd's
    greedy tokens (f16 KV cache, flash attention, as llama.cpp's defaults)."""
    from jllama.engine.sampling import SamplingParams

    oracle, _, _ = setup
    img = _image((50, 70), seed=seed)
    ref = oracle.greedy(PROMPT, [img], 16)
    assert len(ref) >= 8
    assert llm.complete(PROMPT, 16, SamplingParams.greedy(), images=[img]).tokens == ref


def test_cli_generate_with_image(files, setup, tmp_path, capsys):
    """``jllama generate --mmproj --image`` (a PNG: Pillow and stb_image decode the same
    pixels) prints libmtmd's greedy tokens (special tokens not shown, as llama-cli)."""
    from PIL import Image

    oracle, _, tok = setup
    img = _image((64, 48), seed=2)
    png = tmp_path / "img.png"
    Image.fromarray(img).save(png)
    ref = oracle.greedy(PROMPT, [img], 10)
    assert len(ref) >= 4
    rc = main(["generate", "-m", str(files / "text.gguf"), "--mmproj",
               str(files / "mmproj.gguf"), "--image", str(png), "-p", PROMPT, "-n", "10",
               "--temp", "0", "-c", "256"])
    assert rc == 0
    want = b"".join(tok.token_to_piece(t, special=False) for t in ref)
    assert capsys.readouterr().out.strip() == want.decode(errors="replace").strip()


def test_converted_smolvlm_mmproj_bit_exact(files, setup, tmp_path_factory):
    """A tiny random SmolVLM checkpoint converted by llama.cpp's own convert_hf_to_gguf.py
    --mmproj (its default f16): the same metadata keys, tensor names and types as the file
    written here, libmtmd's chunks and embeddings exactly."""
    import convert_reference as R
    import visionmodels as V
    from mtmd_oracle import Mtmd

    from jllama.gguf.reader import read_gguf
    from jllama.models.clip import load_vision

    R.needs_reference_deps()
    d = tmp_path_factory.mktemp("smolvlm-hf")
    V.write_idefics3_checkpoint(d / "hf", V.idefics3_config())
    R.run_reference([(d / "hf", d / "mm.gguf", "f16", "--mmproj")])
    ours, ref = read_gguf(files / "mmproj.gguf"), read_gguf(d / "mm.gguf")
    assert {n: t.qtype for n, t in ref.tensors.items()} == \
        {n: t.qtype for n, t in ours.tensors.items()}
    assert {k for k in ours.metadata if k.startswith("clip.")} <= set(ref.metadata)
    _, _, tok = setup
    o = Mtmd(files / "text.gguf", d / "mm.gguf")
    try:
        assert _same_chunks(o, load_vision(d / "mm.gguf"), tok, PROMPT,
                            _image((50, 70), seed=21)) == 5
    finally:
        o.close()


def test_refusals(files, tmp_path, capsys):
    """An old idefics3 mmproj without the preprocessor's longest edge, one whose patch grid
    does not merge evenly (libmtmd aborts on it), and a text model without SmolVLM's marker
    tokens: one clear error each."""
    import gguf
    import visionmodels as V

    from jllama.engine import multimodal
    from jllama.errors import ModelError
    from jllama.gguf.reader import read_gguf
    from jllama.models.clip import load_vision
    from jllama.tokenizer import Tokenizer

    src = read_gguf(files / "mmproj.gguf")
    old = tmp_path / "old.gguf"
    w = gguf.GGUFWriter(str(old), "clip")
    for k, v in src.metadata.items():
        if k.startswith("clip.") and k != "clip.vision.preproc_image_size":
            if isinstance(v, bool):
                w.add_bool(k, v)
            elif isinstance(v, str):
                w.add_string(k, v)
            elif isinstance(v, float):
                w.add_float32(k, v)
            elif isinstance(v, int):
                w.add_uint32(k, v)
            else:
                w.add_array(k, list(v))
    w.add_tensor("mm.model.fc.weight", np.zeros((128, 256), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="preproc_image_size"):
        load_vision(old)
    V.write_idefics3_mmproj(tmp_path / "odd.gguf", image_size=40)  # 5 x 5 patches, merge 2
    with pytest.raises(ModelError, match="do not merge by 2"):
        load_vision(tmp_path / "odd.gguf")
    V.write_llama_text_model(tmp_path / "plain.gguf")
    plain = Tokenizer.from_gguf(read_gguf(tmp_path / "plain.gguf"))
    with pytest.raises(ModelError, match="mismatched mmproj"):
        multimodal.chunks(plain, load_vision(files / "mmproj.gguf"), "<__media__>",
                          [_image((32, 32))])
    assert main(["generate", "-m", str(tmp_path / "plain.gguf"), "--mmproj",
                 str(files / "mmproj.gguf"), "--image", str(tmp_path / "none.png"), "-p", "x",
                 "-n", "1"]) == 1
    assert "Traceback" not in capsys.readouterr().err
