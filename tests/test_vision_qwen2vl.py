"""Qwen2-VL (its ViT + the qwen2vl_merger projector, and the qwen2vl text model with M-RoPE)
against libmtmd and llama.cpp (llama-cpp-python 0.3.36).

A tiny random ``Qwen2VLForConditionalGeneration`` vision tower as llama.cpp's own
``convert_hf_to_gguf.py --mmproj`` writes it (tests/visionmodels.py writes the same file
without torch; f16, the converter's default), with a tiny ``qwen2vl`` text model
(Q8_0, so its logits are llama.cpp's bit for bit; the f32 mmproj, 5x5 grids and the timings
are experiments/qwen2vl_vs_libmtmd.py's): libmtmd's dynamic resolution (token grids,
an image upscaled to the minimum pixel count, one resized to a multiple of 28 with padding,
the maximum's downscale), its image embeddings, the logits after a prompt with an image
decoded at M-RoPE positions, greedy tokens, and ``jllama generate --mmproj --image``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.oracle

PROMPT = ("<|im_start|>user\n<__media__>What is in this picture?<|im_end|>\n"
          "<|im_start|>assistant\n")
# (h, w), each seen at 84x112 (4x3 tokens: one encoder shape, one compile): below the minimum
# pixels (upscaled), resized with padding, rounded to multiples of 28 without padding
SHAPES = [(56, 84), (40, 70), (90, 110)]


def _image(shape, seed=0) -> np.ndarray:
    from visionmodels import gradient_image

    return gradient_image(shape, seed, noise=30)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import gguf
    import visionmodels as V

    d = tmp_path_factory.mktemp("qwen2vl")
    V.write_qwen2vl_mmproj(d / "mmproj-f16.gguf")
    V.write_qwen2vl_text_model(d / "text.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    return d


@pytest.fixture(scope="module")
def oracle(files):
    from mtmd_oracle import Mtmd

    o = Mtmd(files / "text.gguf", files / "mmproj-f16.gguf")
    yield o
    o.close()


@pytest.fixture(scope="module")
def vision(files):
    from jllama.models.clip import load_vision

    return load_vision(files / "mmproj-f16.gguf")


def _image_chunk(oracle, img):
    (chunk,) = [c for c in oracle.tokenize("<__media__>", [img]) if isinstance(c, tuple)]
    return chunk


def _grid(oracle, chunk) -> tuple[int, int, int]:
    M = oracle.M
    it = M.mtmd_input_chunk_get_tokens_image(chunk[1])
    return (M.mtmd_image_tokens_get_nx(it), M.mtmd_image_tokens_get_ny(it),
            M.mtmd_input_chunk_get_n_pos(chunk[1]))


@pytest.mark.parametrize("shape", SHAPES)
def test_embeddings_bit_exact_f16(oracle, vision, shape):
    img = _image(shape, seed=shape[0])
    chunk = _image_chunk(oracle, img)
    ref, _ = oracle.encode(chunk)
    nx, ny, n_pos = _grid(oracle, chunk)
    assert vision.token_grid(*shape) == (nx, ny) and n_pos == max(nx, ny)
    ours = vision.encode(img)
    assert ours.shape == ref.shape == (nx * ny, 128)
    assert np.array_equal(ours, ref)


def test_large_image_grid(oracle, vision):
    """Above the maximum pixels (4096 merged tokens): libmtmd's downscale, f32 arithmetic."""
    for shape in [(1800, 2000), (3000, 1100)]:
        img = np.zeros((*shape, 3), np.uint8)
        nx, ny, _ = _grid(oracle, _image_chunk(oracle, img))
        assert vision.token_grid(*shape) == (nx, ny)
        assert nx * ny <= 4096


@pytest.fixture(scope="module")
def engine(files):
    import visionmodels as V

    eng, tok = V.text_engine(files / "text.gguf")
    assert eng.mrope and eng.spec.rope_sections == (4, 6, 6, 0)
    return eng, tok


def test_text_logits_bit_exact(files, engine):
    """A text-only prompt on the qwen2vl text model (positions (p, p, p, 0)) equals
    llama.cpp's logits at every position."""
    from llamacpp_oracle import llama_cpp_module

    llama_cpp = llama_cpp_module()
    eng, _ = engine
    toks = [int(t) for t in np.random.default_rng(0).integers(0, 296, 40)]
    o = llama_cpp.Llama(model_path=str(files / "text.gguf"), n_ctx=256, logits_all=True,
                        verbose=False, n_threads=2, seed=0, flash_attn=True)
    o.eval(toks)
    ref = np.array(o.scores[:len(toks)], np.float32)
    o.close()
    assert np.array_equal(eng.logits(toks), ref)


def test_image_prompt_logits_and_greedy(oracle, vision, engine):
    """libmtmd's chunks (<|vision_start|> image <|vision_end|>), the logits after the whole
    prompt (the image at M-RoPE positions, the text after it from p0 + max(nx, ny)) bit for
    bit, and 16 greedy tokens. Sequential positions for the image give other logits: the
    comparison sees the positions."""
    from jllama.engine import multimodal
    from jllama.engine.sampling import SamplingParams

    eng, tok = engine
    img = _image((40, 70), seed=5)
    ref_chunks = oracle.tokenize(PROMPT, [img])
    chs = multimodal.chunks(tok, vision, PROMPT, [img])
    assert [c if isinstance(c, list) else c.embd.shape[0] for c in chs] == \
        [c if isinstance(c, list) else c[0] for c in ref_chunks]
    assert chs[1].grid == (4, 3)
    ref_logits = oracle.eval_chunks(PROMPT, [img])
    assert oracle.n_past == len(chs[0]) + 4 + len(chs[2])  # the image took max(4, 3)

    def prompt_logits(positions):
        eng.reset(0)
        eng.prefill(chs[0], 0)
        if positions is None:
            multimodal.prefill_image(eng, chs[1], 0)
        else:
            n = chs[1].embd.shape[0]
            eng.prefill_embeddings(chs[1].embd, 0, positions=positions, n_pos=n)
        return np.asarray(eng.prefill(chs[2], 0), np.float32)

    assert np.array_equal(prompt_logits(None), ref_logits)
    p0 = len(chs[0])
    seq = np.repeat(p0 + np.arange(12, dtype=np.int32)[:, None], 4, axis=1)
    seq[:, 3] = 0
    assert not np.allclose(prompt_logits(seq), ref_logits, atol=1e-3)

    ref = oracle.greedy(PROMPT, [img], 16)
    got = list(multimodal.generate(eng, chs, SamplingParams.greedy(), 16, {tok.vocab.eos_id}))
    assert len(ref) >= 8
    assert got == ref


def test_cli_generate_with_image(files, oracle, tmp_path, capsys):
    """``jllama generate --mmproj --image`` (the Llama API's image path) prints libmtmd's
    greedy tokens (PNG: Pillow decodes the pixels stb_image does)."""
    from PIL import Image

    from jllama.cli.main import main
    from jllama.gguf.reader import read_gguf
    from jllama.tokenizer import Tokenizer

    img = _image((90, 110), seed=7)
    png = tmp_path / "img.png"
    Image.fromarray(img).save(png)
    ref = oracle.greedy(PROMPT, [img], 6)
    assert len(ref) >= 4
    tok = Tokenizer.from_gguf(read_gguf(files / "text.gguf"))
    want = tok.decode(ref, skip_special=True)  # as printed
    rc = main(["generate", "-m", str(files / "text.gguf"), "--mmproj",
               str(files / "mmproj-f16.gguf"), "--image", str(png), "-p", PROMPT, "-n", "6",
               "--temp", "0", "-c", "256"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == want.strip()
