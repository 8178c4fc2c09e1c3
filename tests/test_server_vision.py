"""Images through ``jllama serve``'s other doors: /completion's ``multimodal_data`` (checked
against libmtmd), ``file://`` URLs under --media-path, http(s) URLs only with
--allow-remote-media, the ``multimodal`` capability of /models, /chat/completions/input_tokens,
and bad input: each bad request gets one 400 with a clear message and the next one works.

One tiny random gemma3 text model + mmproj (tests/visionmodels.py) behind one in-process
server; the remote images come from a loopback http server started here (never the network).
"""

from __future__ import annotations

import base64
import http.server
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.oracle

PROMPT = "What is this: <__media__>\n"


def _png(path, shape=(40, 56), seed=5):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import visionmodels as V

    d = tmp_path_factory.mktemp("server-vision")
    V.write_text_model(d / "text.gguf")
    V.write_mmproj(d / "mmproj.gguf")
    media = d / "media"
    (media / "sub").mkdir(parents=True)
    _png(media / "sub" / "img.png")
    (d / "secret.png").write_bytes((media / "sub" / "img.png").read_bytes())
    return d


@pytest.fixture(scope="module")
def web(files):
    """A loopback http server: /img.png (an image), /page.html (not an image), else 404."""
    png = (files / "media" / "sub" / "img.png").read_bytes()

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body, kind = {"/img.png": (png, "image/png"),
                          "/page.html": (b"<html>hello</html>", "text/html")}.get(
                self.path, (None, None))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


@pytest.fixture(scope="module")
def server(files):
    import httpx

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    llm = Llama(str(files / "text.gguf"), ctx_size=128, n_slots=2,
                mmproj=str(files / "mmproj.gguf"))
    # the suite's LLAMA_MEDIA_MARKER: /completion prompts below write <__media__>
    settings = ServerSettings("tiny", max_queue=8, timeout=120,
                              media_path=str(files / "media") + "/", media_marker="<__media__>")
    state = ServerState(llm, settings)
    with ServerThread(state, warmup=False) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        yield c, settings, llm


def _chat(c, url: str, max_tokens: int = 1):
    return c.post("/v1/chat/completions", json={
        "temperature": 0, "max_tokens": max_tokens, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "test "},
                                         {"type": "image_url", "image_url": {"url": url}}]}]})


def test_completion_multimodal_data_matches_libmtmd(files, server):
    from mtmd_oracle import Mtmd

    from jllama.gguf.reader import read_gguf
    from jllama.models.clip_image import load_image
    from jllama.server.app import render_prompt
    from jllama.tokenizer import Tokenizer

    c, _, llm = server
    png = files / "media" / "sub" / "img.png"
    chat = render_prompt(llm, [{"role": "user", "content": "test <__media__>"}], None)
    o = Mtmd(files / "text.gguf", files / "mmproj.gguf")
    try:
        ref = o.greedy(PROMPT, [load_image(png)], 6)
        n_ref = sum(len(ch) if isinstance(ch, list) else ch[0]
                    for ch in o.tokenize(chat, [load_image(png)]))
    finally:
        o.close()
    want = Tokenizer.from_gguf(read_gguf(files / "text.gguf")).decode(ref)
    data = base64.b64encode(png.read_bytes()).decode()
    r = c.post("/completion", json={"temperature": 0, "n_predict": 6, "prompt": {
        "prompt_string": PROMPT, "multimodal_data": [data]}})
    assert r.status_code == 200, r.text
    assert r.json()["content"] == want
    # the chat prompt's length counts the image's tokens as libmtmd does
    r = c.post("/chat/completions/input_tokens", json={"messages": [
        {"role": "user", "content": [{"type": "text", "text": "test "},
                                     {"type": "image_url", "image_url": {
                                         "url": "data:image/png;base64," + data}}]}]})
    assert r.status_code == 200, r.text
    assert r.json()["input_tokens"] == n_ref


def test_models_say_multimodal(server):
    c, _, _ = server
    for path in ("/models", "/v1/models"):
        m = c.get(path).json()["models"][0]
        assert m["capabilities"] == ["completion", "multimodal"]


def test_random_media_marker(files, server, monkeypatch):
    """llama-server's marker is random per process unless LLAMA_MEDIA_MARKER is set: text
    that says <__media__> is then only text, and /props tells /completion clients the marker."""
    from jllama.server import media

    c, settings, _ = server
    monkeypatch.delenv("LLAMA_MEDIA_MARKER", raising=False)
    marker = media.media_marker()
    assert marker.startswith("<__media_") and len(marker) == len("<__media___>") + 32
    assert marker != media.media_marker()
    monkeypatch.setenv("LLAMA_MEDIA_MARKER", "<img>")
    assert media.media_marker() == "<img>"
    data = base64.b64encode((files / "media" / "sub" / "img.png").read_bytes()).decode()
    saved, settings.media_marker = settings.media_marker, marker
    try:
        assert c.get("/props").json()["media_marker"] == marker
        r = c.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "a literal <__media__> "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}]}]})
        assert r.status_code == 200, r.text
        r = c.post("/completion", json={"n_predict": 1, "prompt": {
            "prompt_string": f"What is {marker}?", "multimodal_data": [data]}})
        assert r.status_code == 200, r.text
        r = c.post("/completion", json={"n_predict": 1, "prompt": {
            "prompt_string": PROMPT, "multimodal_data": [data]}})
        assert r.status_code == 400 and "0 media markers" in r.text, r.text
    finally:
        settings.media_marker = saved


def test_file_urls_under_media_path_only(server):
    c, settings, _ = server
    assert _chat(c, "file://sub/img.png").status_code == 200
    assert _chat(c, "file:////sub//img.png").status_code == 200  # llama-server's: same file
    for url, what in [("file://sub/none.png", "file does not exist"),
                      ("file://../secret.png", "file path is not allowed"),
                      ("file://sub/../../secret.png", "file path is not allowed")]:
        r = _chat(c, url)
        assert r.status_code == 400 and what in r.json()["error"]["message"], r.text
    saved, settings.media_path = settings.media_path, None
    try:
        r = _chat(c, "file://sub/img.png")
        assert r.status_code == 400 and "--media-path" in r.json()["error"]["message"]
    finally:
        settings.media_path = saved
    assert _chat(c, "data:image/png;base64,"
                 + base64.b64encode(b"x").decode()).status_code == 400


def test_remote_urls_only_when_allowed(server, web, files):
    c, settings, _ = server
    r = _chat(c, web + "/img.png")
    assert r.status_code == 400 and "--allow-remote-media" in r.json()["error"]["message"]
    settings.allow_remote_media = True
    try:
        assert _chat(c, web + "/img.png").status_code == 200
        r = _chat(c, web + "/missing.png")
        assert r.status_code == 400 and "HTTP 404" in r.json()["error"]["message"], r.text
        r = _chat(c, web + "/page.html")
        assert r.status_code == 400 and "not an image" in r.json()["error"]["message"], r.text
    finally:
        settings.allow_remote_media = False


def test_bad_images_fail_alone(files, server, tmp_path):
    import visionmodels as V

    c, _, _ = server
    png = (files / "media" / "sub" / "img.png").read_bytes()
    gif = tmp_path / "a.gif"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(gif)

    def uri(b: bytes, kind: str = "image/png") -> str:
        return f"data:{kind};base64," + base64.b64encode(b).decode()

    cases = [
        (uri(b"just some text, no image"), "not an image jllama can read"),
        (uri(png[: len(png) // 2]), "not an image jllama can read"),  # truncated PNG
        (uri(V.png_header_only(9000, 9000)), "too large"),
        ("data:text/html;base64,aGVsbG8=", "invalid uri format"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("malformed", "not valid base64"),
    ]
    for url, what in cases:
        r = _chat(c, url)
        assert r.status_code == 400, (what, r.text)
        assert what in r.json()["error"]["message"], r.text
        assert _chat(c, uri(png)).status_code == 200  # the next request is served
    # a GIF decodes (libmtmd's stb_image reads GIFs too: the first frame)
    assert _chat(c, uri(gif.read_bytes(), "image/gif")).status_code == 200
    # /completion: markers and images must match; empty data is refused
    for prompt, data, what in [("What is this:\n", [""], "empty"),
                               (PROMPT, ["bad!"], "not valid base64"),
                               (PROMPT + PROMPT, [base64.b64encode(png).decode()],
                                "2 media markers")]:
        r = c.post("/completion", json={"n_predict": 1, "prompt": {
            "prompt_string": prompt, "multimodal_data": data}})
        assert r.status_code == 400 and what in r.json()["error"]["message"], r.text


def test_more_images_than_the_context(files, server):
    c, _, _ = server
    url = "data:image/png;base64," + base64.b64encode(
        (files / "media" / "sub" / "img.png").read_bytes()).decode()
    # each image is 4 tokens plus its 2 marker tokens: 24 of them overflow the 128-token slot
    parts = [{"type": "image_url", "image_url": {"url": url}}] * 24
    r = c.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [
        {"role": "user", "content": parts}]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "exceed_context_size_error"
    assert _chat(c, url).status_code == 200


def test_serve_bad_projector_one_line(files, tmp_path, capsys):
    import visionmodels as V

    from jllama.cli.main import main

    V.write_mmproj(tmp_path / "mmproj-256.gguf", n_embd_out=256)
    m = str(files / "text.gguf")
    for extra, what in [(["--mmproj", str(tmp_path / "none.gguf")], "mmproj file not found"),
                        (["--mmproj", m], "not an mmproj"),
                        (["--mmproj", str(tmp_path / "mmproj-256.gguf")], "mismatched mmproj"),
                        (["--mmproj", str(files / "mmproj.gguf"), "--media-path",
                          str(tmp_path / "nowhere")], "not a directory")]:
        assert main(["serve", "-m", m, "-c", "64", "--port", "0"] + extra) == 1
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("jllama serve: error: ")]
        assert len(lines) == 1 and what in lines[0] and "Traceback" not in err, err


def test_images_in_batches_and_echo(files, server):
    """A /completion batch of prompts with images (one result each, in order) and
    /v1/completions with an image prompt and echo (the prompt's text parts echoed)."""
    c, _, _ = server
    data = base64.b64encode((files / "media" / "sub" / "img.png").read_bytes()).decode()
    one = {"prompt_string": PROMPT, "multimodal_data": [data]}
    single = c.post("/completion", json={"temperature": 0, "n_predict": 3, "prompt": one})
    assert single.status_code == 200, single.text
    r = c.post("/completion", json={"temperature": 0, "n_predict": 3,
                                    "prompt": [one, "plain text"]})
    assert r.status_code == 200, r.text
    res = r.json()
    assert [x["index"] for x in res] == [0, 1]
    assert res[0]["content"] == single.json()["content"]
    r = c.post("/v1/completions", json={"temperature": 0, "max_tokens": 3, "echo": True,
                                        "prompt": one})
    assert r.status_code == 200, r.text
    assert "What is this:" in r.json()["choices"][0]["text"]
