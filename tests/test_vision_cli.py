"""Images through the front ends: ``Llama(..., mmproj=...)`` and ``jllama generate --mmproj F
--image PATH`` against libmtmd, and one clear error for each kind of bad input.

The tiny models are tests/visionmodels.py's; the mmproj is written directly in llama.cpp's
layout here (the converter's output for that checkpoint: test_vision_gemma3.py runs the
converter), so this file needs no torch. Images are PNG (lossless: Pillow and libmtmd's
stb_image decode the same pixels, which the first test checks through libmtmd's own file
loader)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from jllama.cli.main import main

pytestmark = pytest.mark.oracle

PROMPT = "Describe <__media__> briefly."


def write_mmproj(path, n_embd_out: int = 128, seed: int = 0, image_size: int = 64,
                 patch: int = 8, d: int = 64, n_layer: int = 2) -> None:
    """A gemma3 mmproj as convert_hf_to_gguf.py --mmproj writes it (f16 matrices, f32 norms,
    biases and embeddings, f16 input projection)."""
    rng = np.random.default_rng(seed)

    def w(*shape, s=0.05):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    def f16(a):
        return a.astype(np.float16)

    g = gguf.GGUFWriter(str(path), "clip")
    g.add_type("mmproj")
    g.add_bool("clip.has_vision_encoder", True)
    g.add_uint32("clip.vision.projection_dim", n_embd_out)
    g.add_uint32("clip.vision.image_size", image_size)
    g.add_uint32("clip.vision.patch_size", patch)
    g.add_uint32("clip.vision.embedding_length", d)
    g.add_uint32("clip.vision.feed_forward_length", 2 * d)
    g.add_uint32("clip.vision.block_count", n_layer)
    g.add_uint32("clip.vision.attention.head_count", 4)
    g.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    g.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    g.add_string("clip.projector_type", "gemma3")
    g.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    g.add_bool("clip.use_gelu", True)
    g.add_uint32("clip.vision.projector.scale_factor", 4)
    g.add_tensor("mm.input_projection.weight", f16(w(d, n_embd_out, s=0.2)))
    g.add_tensor("mm.soft_emb_norm.weight", 1.0 + w(d, s=0.1))
    g.add_tensor("v.patch_embd.bias", w(d, s=0.1))
    g.add_tensor("v.patch_embd.weight", w(d, 3, patch, patch, s=0.1))
    g.add_tensor("v.position_embd.weight", w((image_size // patch) ** 2, d, s=0.2))
    for i in range(n_layer):
        b = f"v.blk.{i}."
        for ln in ("ln1", "ln2"):
            g.add_tensor(b + ln + ".bias", w(d, s=0.1))
            g.add_tensor(b + ln + ".weight", 1.0 + w(d, s=0.1))
        g.add_tensor(b + "ffn_up.bias", w(2 * d))
        g.add_tensor(b + "ffn_up.weight", f16(w(2 * d, d, s=0.15)))
        g.add_tensor(b + "ffn_down.bias", w(d))
        g.add_tensor(b + "ffn_down.weight", f16(w(d, 2 * d, s=0.15)))
        for t in ("attn_k", "attn_out", "attn_q", "attn_v"):
            g.add_tensor(b + t + ".bias", w(d))
            g.add_tensor(b + t + ".weight", f16(w(d, d, s=0.15)))
    g.add_tensor("v.post_ln.bias", w(d, s=0.1))
    g.add_tensor("v.post_ln.weight", 1.0 + w(d, s=0.1))
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()


def _png(path, shape=(48, 80), seed=4):
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    img = np.clip(np.stack([x * 3, y * 5, x + y], -1) + rng.normal(0, 25, (h, w, 3)), 0, 255)
    Image.fromarray(img.astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import visionmodels as V

    d = tmp_path_factory.mktemp("vision-cli")
    V.write_text_model(d / "text.gguf")
    write_mmproj(d / "mmproj.gguf")
    write_mmproj(d / "mmproj-256.gguf", n_embd_out=256)
    _png(d / "img.png")
    return d


@pytest.fixture(scope="module")
def oracle(files):
    from mtmd_oracle import Mtmd

    o = Mtmd(files / "text.gguf", files / "mmproj.gguf")
    yield o
    o.close()


def _stb_image(oracle, path) -> np.ndarray:
    """The image as libmtmd's own loader decodes it (stb_image)."""
    import ctypes

    M = oracle.M
    bmp = M.mtmd_helper_bitmap_init_from_file(oracle.ctx, str(path).encode(), False)
    nx, ny = M.mtmd_bitmap_get_nx(bmp), M.mtmd_bitmap_get_ny(bmp)
    data = M.mtmd_bitmap_get_data(bmp)
    img = np.ctypeslib.as_array(ctypes.cast(data, ctypes.POINTER(ctypes.c_ubyte)),
                                shape=(ny * nx * 3,)).reshape(ny, nx, 3).copy()
    M.mtmd_bitmap_free(bmp)
    return img


def test_api_images_match_libmtmd(files, oracle):
    from jllama.api import Llama
    from jllama.engine.sampling import SamplingParams
    from jllama.models.clip_image import load_image

    png = files / "img.png"
    img = _stb_image(oracle, png)
    assert np.array_equal(load_image(png), img)  # Pillow == stb_image on PNG
    ref = oracle.greedy(PROMPT, [img], 12)
    llm = Llama(str(files / "text.gguf"), ctx_size=128, mmproj=str(files / "mmproj.gguf"))
    out = llm.complete(PROMPT, 12, SamplingParams.greedy(), images=[str(png)])
    assert len(ref) >= 4
    assert out.tokens == ref
    # no marker: one goes first, as llama-mtmd-cli does (encoded bytes in)
    chs = llm._image_chunks("Describe briefly.", [png.read_bytes()], True)
    want = oracle.tokenize("<__media__>Describe briefly.", [img])
    assert [c if isinstance(c, list) else c.embd.shape[0] for c in chs] == \
        [c if isinstance(c, list) else c[0] for c in want]


def test_cli_generate_with_image(files, oracle, capsys):
    png = files / "img.png"
    ref = oracle.greedy(PROMPT, [_stb_image(oracle, png)], 6)
    from jllama.gguf.reader import read_gguf
    from jllama.tokenizer import Tokenizer

    # libmtmd's tokens as text (random tokens need not be valid UTF-8 on their own)
    want = Tokenizer.from_gguf(read_gguf(files / "text.gguf")).decode(ref)
    rc = main(["generate", "-m", str(files / "text.gguf"), "--mmproj", str(files / "mmproj.gguf"),
               "--image", str(png), "-p", PROMPT, "-n", "6", "--temp", "0", "-c", "128"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == want.strip()


def _one_error(capsys, args) -> str:
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("jllama generate: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_input_errors(files, tmp_path, capsys):
    m, mm, img = str(files / "text.gguf"), str(files / "mmproj.gguf"), str(files / "img.png")
    base = ["generate", "-m", m, "-p", PROMPT, "-n", "2", "-c", "128"]
    assert "mmproj file not found" in _one_error(
        capsys, base + ["--mmproj", str(tmp_path / "none.gguf"), "--image", img])
    assert "mismatched mmproj" in _one_error(
        capsys, base + ["--mmproj", str(files / "mmproj-256.gguf"), "--image", img])
    assert "not an mmproj" in _one_error(capsys, base + ["--mmproj", m, "--image", img])
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    assert "not an image jllama can read" in _one_error(
        capsys, base + ["--mmproj", mm, "--image", str(tmp_path / "bad.png")])
    assert "cannot read image" in _one_error(
        capsys, base + ["--mmproj", mm, "--image", str(tmp_path / "missing.png")])
    assert "needs 'vision.mmproj'" in _one_error(capsys, base + ["--image", img])
    # two markers, one image
    assert "2 media markers" in _one_error(
        capsys, ["generate", "-m", m, "-p", "<__media__><__media__>", "-n", "2",
                 "--mmproj", mm, "--image", img])
    # the prompt and its image do not fit the context
    assert "context size is 16" in _one_error(
        capsys, ["generate", "-m", m, "-p", "word " * 12, "-n", "2", "-c", "16",
                 "--mmproj", mm, "--image", img])
