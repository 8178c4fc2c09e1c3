"""Images through the front ends: ``Llama(..., mmproj=...)`` and ``jllama generate --mmproj F
--image PATH`` against libmtmd, and one clear error for each kind of bad input.

The tiny models are tests/visionmodels.py's; the mmproj is written directly in llama.cpp's
layout (``write_mmproj``; test_vision_gemma3.py runs the converter), so this file needs no
torch. Images are PNG (lossless: Pillow and libmtmd's
stb_image decode the same pixels, which the first test checks through libmtmd's own file
loader)."""

from __future__ import annotations

import numpy as np
import pytest

from jllama.cli.main import main

pytestmark = pytest.mark.oracle

PROMPT = "Describe <__media__> briefly."


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
    V.write_mmproj(d / "mmproj.gguf")
    V.write_mmproj(d / "mmproj-256.gguf", n_embd_out=256)
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


def test_odd_shapes_embeddings_bit_exact(files, tmp_path):
    """Widths that are no multiple of ggml's SIMD steps: patch 14 (an f16 im2col row of 588,
    ggml_vec_dot_f16 with f64 leftovers), width 100 (LayerNorm and f16 matmuls with
    leftover lanes), head size 25."""
    import visionmodels as V
    from mtmd_oracle import Mtmd

    from jllama.models.clip import load_vision

    mm = tmp_path / "odd.gguf"
    V.write_mmproj(mm, image_size=112, patch=14, d=100, n_layer=2, n_head=4, seed=7)
    o = Mtmd(files / "text.gguf", mm)
    try:
        vision = load_vision(mm)
        for shape in [(112, 112), (90, 131)]:
            img = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
            chunk = [c for c in o.tokenize("<__media__>", [img]) if isinstance(c, tuple)][0]
            ref, _ = o.encode(chunk)
            assert np.array_equal(vision.encode(img), ref), shape
    finally:
        o.close()


def _libmtmd_embeddings(text, mm, img) -> np.ndarray:
    """libmtmd's embeddings of one image (``mtmd_encode_chunk``)."""
    from mtmd_oracle import Mtmd

    o = Mtmd(text, mm)
    try:
        chunk = [c for c in o.tokenize("<__media__>", [img]) if isinstance(c, tuple)][0]
        return o.encode(chunk)[0]
    finally:
        o.close()


def test_quantized_mmproj_bit_exact(files, tmp_path):
    """An mmproj whose encoder matrices are Q8_0 / Q4_0: they go through the text model's
    int8 kernels (ggml's Q8 activations), equal to libmtmd's."""
    import gguf
    import visionmodels as V

    from jllama.models.clip import load_vision

    img = np.random.default_rng(3).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    for qt in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        mm = tmp_path / f"{qt.name}.gguf"
        V.write_mmproj(mm, block_type=qt, seed=11)
        ref = _libmtmd_embeddings(files / "text.gguf", mm, img)
        assert np.array_equal(load_vision(mm).encode(img), ref), qt.name


def test_mmproj_weights_load_as_the_text_models(files, tmp_path):
    """The mmproj's matrices go through the text model's loader (``load_weights``: the layout
    the backend's kernels read, Pallas planes on GPU/TPU). Seen on the CPU without the C++
    kernels, where the loader repacks to int8 codes: the Q8_0 encoder then runs XLA's int8
    path, not ggml's arithmetic, so libmtmd's embeddings are matched to a tolerance."""
    import gguf
    import visionmodels as V

    from jllama.models.clip import load_vision
    from jllama.numerics import Numerics, use

    img = np.random.default_rng(3).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    mm = tmp_path / "q8.gguf"
    V.write_mmproj(mm, block_type=gguf.GGMLQuantizationType.Q8_0, seed=11)
    ref = _libmtmd_embeddings(files / "text.gguf", mm, img)
    num = Numerics(cpu_kernels=False)
    vision = load_vision(mm, num)
    w = vision.encoder.w["v.blk.0.attn_q.weight"]
    assert w.layout == "i8" and w.qtype == gguf.GGMLQuantizationType.Q8_0
    with use(num):
        ours = vision.encode(img)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"\nQ8_0 mmproj on XLA's int8 path: max |d| / max |ref| = {err:.2e}")
    assert err < 1e-2


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
    (tmp_path / "half.png").write_bytes((files / "img.png").read_bytes()[:300])
    assert "not an image jllama can read" in _one_error(
        capsys, base + ["--mmproj", mm, "--image", str(tmp_path / "half.png")])
    import visionmodels as V

    (tmp_path / "huge.png").write_bytes(V.png_header_only(9000, 9000))  # 81 Mpixel, no data
    assert "too large" in _one_error(
        capsys, base + ["--mmproj", mm, "--image", str(tmp_path / "huge.png")])
    assert "needs 'vision.mmproj'" in _one_error(capsys, base + ["--image", img])
    # two markers, one image
    assert "2 media markers" in _one_error(
        capsys, ["generate", "-m", m, "-p", "<__media__><__media__>", "-n", "2",
                 "--mmproj", mm, "--image", img])
    # the prompt and its image do not fit the context
    assert "context size is 16" in _one_error(
        capsys, ["generate", "-m", m, "-p", "word " * 12, "-n", "2", "-c", "16",
                 "--mmproj", mm, "--image", img])


def test_server_image_url(files, oracle):
    """/v1/chat/completions with an image_url part (base64 data URL): the greedy answer is
    libmtmd's on the rendered prompt; remote URLs and bad data are refused with a 400."""
    import base64

    import httpx

    from jllama.api import Llama
    from jllama.gguf.reader import read_gguf
    from jllama.server.app import ServerSettings, ServerState, ServerThread, render_prompt
    from jllama.tokenizer import Tokenizer

    png = files / "img.png"
    url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    llm = Llama(str(files / "text.gguf"), ctx_size=128, n_slots=2,
                mmproj=str(files / "mmproj.gguf"))
    text = render_prompt(llm, [{"role": "user", "content": "Look: <__media__> What?"}], None)
    ref = oracle.greedy(text, [_stb_image(oracle, png)], 8)
    want = Tokenizer.from_gguf(read_gguf(files / "text.gguf")).decode(ref)
    state = ServerState(llm, ServerSettings("tiny", max_queue=4, timeout=120))

    def msg(part):
        return {"model": "tiny", "temperature": 0, "max_tokens": 8, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look: "}, part,
                                         {"type": "text", "text": " What?"}]}]}

    with ServerThread(state, warmup=False) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json=msg({"type": "image_url",
                                                     "image_url": {"url": url}}))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
        for bad, what in [("https://example.com/a.png", "not fetched"),
                          ("data:image/png;base64,@@@", "not valid base64"),
                          ("data:image/png;base64,aGVsbG8=", "not an image")]:
            r = c.post("/v1/chat/completions", json=msg({"type": "image_url",
                                                         "image_url": {"url": bad}}))
            assert r.status_code == 400 and what in r.text, r.text


# ----------------------------------------------------------------------------- jllama chat
def _chat(monkeypatch, capsys, args, stdin: str) -> tuple[int, str, str]:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(["chat", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def llava16(tmp_path_factory):
    """The tiny llama with a LLaVA-1.6 mmproj (tests/visionmodels.py) and its libmtmd."""
    import visionmodels as V
    from mtmd_oracle import Mtmd

    d = tmp_path_factory.mktemp("chat-llava16")
    V.write_llama_text_model(d / "text.gguf")
    V.write_llava16_mmproj(d / "mmproj.gguf")
    o = Mtmd(d / "text.gguf", d / "mmproj.gguf")
    yield d, o
    o.close()


def _streamed(tok, ids) -> str:
    """libmtmd's tokens as the CLI prints them (control tokens not rendered)."""
    from jllama.tokenizer import StreamDecoder

    dec = StreamDecoder(tok)
    return "".join(dec.feed(i) for i in ids) + dec.flush()


def test_cli_chat_images(llava16, monkeypatch, capsys):
    """``jllama chat --mmproj`` (LLaVA-1.6: an image of tiles and overview): ``--image`` and
    ``/image PATH`` attach images to the next message (llama-mtmd-cli's chat mode); each
    answer is libmtmd's greedy answer to the conversation so far, its images at their
    markers, and the first equals ``generate --chat --image``'s."""
    from jllama.api import Llama

    d, oracle = llava16
    m, mm = str(d / "text.gguf"), str(d / "mmproj.gguf")
    png, png2 = _png(d / "a.png", (48, 80), seed=4), _png(d / "c.png", (120, 90), seed=9)
    base = ["-m", m, "--mmproj", mm, "-n", "8", "--temp", "0", "-c", "256"]
    llm = Llama(m, ctx_size=256)
    img, img2 = _stb_image(oracle, png), _stb_image(oracle, png2)
    turn1 = [{"role": "user", "content": "<__media__>Describe briefly."}]
    ref1 = oracle.greedy(llm.apply_chat_template(turn1), [img], 8)
    # the answer depends on the image (else this test could not tell images apart)
    assert ref1 != oracle.greedy(llm.apply_chat_template(turn1), [img2], 8)
    text1 = _streamed(llm.tokenizer, ref1)
    turn2 = turn1 + [{"role": "assistant", "content": text1},
                     {"role": "user", "content": "<__media__>What is it?"}]
    text2 = _streamed(llm.tokenizer, oracle.greedy(llm.apply_chat_template(turn2), [img, img2],
                                                   8))

    # --image with a run config's model and vision.mmproj; `jllama run` on the config's chat
    # messages with vision.images (markers in front of the first user message); generate
    cfg = d / "chat.yaml"
    cfg.write_text(f"model: {m}\nruntime: {{ctx_size: 256}}\n"
                   "generation:\n  max_tokens: 8\n  sampling: {temperature: 0.0}\n"
                   "  messages: [{role: user, content: Describe briefly.}]\n"
                   f"vision: {{mmproj: {mm}}}\n")
    rc, out, err = _chat(monkeypatch, capsys, ["--config", str(cfg), "--image", str(png)],
                         "Describe briefly.\n")
    assert rc == 0 and out == text1 + "\n", err
    assert main(["run", str(cfg), f'vision.images=["{png}"]']) == 0
    assert capsys.readouterr().out == text1 + "\n"
    assert main(["generate", *base, "--image", str(png), "--chat",
                 "-p", "Describe briefly."]) == 0
    assert capsys.readouterr().out == text1 + "\n"
    # the same by /image, then a second image in the second turn; a bad path is one error
    # line and the chat goes on
    bad = d / "nope.png"
    rc, out, err = _chat(monkeypatch, capsys, base,
                         f"/image {png}\nDescribe briefly.\n/image {bad}\n"
                         f"/image {png2}\nWhat is it?\n")
    assert rc == 0, err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == \
        [f"error: {bad}: cannot read image (No such file or directory)"]
    assert out == text1 + "\n" + text2 + "\n"


def test_cli_chat_image_errors(files, monkeypatch, capsys, tmp_path):
    m, mm = str(files / "text.gguf"), str(files / "mmproj.gguf")
    # /image without --mmproj: one line, the chat goes on (and answers the text)
    rc, out, err = _chat(monkeypatch, capsys, ["-m", m, "-n", "2", "-c", "128", "--temp", "0"],
                         f"/image {files / 'img.png'}\nhi\n")
    assert rc == 0 and out.endswith("\n")  # "hi" was answered (maybe by blanks)
    assert [ln for ln in err.splitlines() if "error" in ln] == \
        ["error: /image needs a vision projector: start the chat with --mmproj"]
    for args, want in [(["--image", str(files / "img.png")], "needs 'vision.mmproj'"),
                       (["--mmproj", mm, "--image", str(tmp_path / "x.png")],
                        "cannot read image"),
                       (["--mmproj", str(files / "mmproj-256.gguf")], "mismatched mmproj")]:
        rc, out, err = _chat(monkeypatch, capsys, ["-m", m, "-n", "2", "-c", "128", *args],
                             "hi\n")
        assert rc == 1, err
        assert "Traceback" not in err
        lines = [ln for ln in err.splitlines() if ln.startswith("jllama chat: error: ")]
        assert len(lines) == 1 and want in lines[0], err
