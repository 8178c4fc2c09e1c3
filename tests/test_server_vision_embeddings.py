"""Embeddings of prompts with images on ``jllama serve --embeddings`` (llama-server's
/embeddings with ``multimodal_data`` and /v1/embeddings with OpenAI content parts).

llama-server decodes the text runs and the images into the slot's cache and reads the
embeddings of the LAST decode only (send_embedding: llama_get_embeddings_seq pools that
batch, the text after the last image; pooling none gives its rows). The oracle is libmtmd
(llama-cpp-python's ``mtmd_cpp``, the code llama-server runs: ``mtmd_helper_eval_chunks`` on a
context with embeddings on, tests/mtmd_oracle.py). The tiny gemma3 text model is Q8_0 here, so
its kernels round as ggml's (tests/test_server_decoder_embeddings.py) and the vectors compare
exactly (mean pooling within 1e-6), the mmproj's image embeddings being bit-identical to libmtmd's already.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.oracle
N_CTX = 256
PROMPTS = [("What is this: <__media__>\nA picture", [0]),
           ("First <__media__> then <__media__> and some words", [1, 0])]
POOLING = {"mean": 1, "none": 0}  # llama_pooling_type
# the rows are bit-exact; mean pooling sums in another order than ggml's mul_mat with the 1/n
# column (as tests/test_server_decoder_embeddings.py)
TOL = {"mean": dict(rtol=0, atol=1e-6), "none": dict(rtol=0, atol=0)}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import gguf
    import visionmodels as V
    from PIL import Image
    from tinymodels import dense_hparams, dense_tensors, write_gguf

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread
    from jllama.server.embeddings import DecoderRunner

    d = tmp_path_factory.mktemp("vision-embd")
    tensors = dense_tensors(3, n_vocab=320, qk_norm=True, post_norms=True, tied=True,
                            embd_std=0.05, **V.TEXT)
    write_gguf(d / "text.gguf", "gemma3", dense_hparams(**V.TEXT, **{"rope.freq_base": 1e6}),
               tensors, specials=V.SPECIALS, qtype=gguf.GGMLQuantizationType.Q8_0)
    V.write_mmproj(d / "mmproj.gguf")
    rng = np.random.default_rng(1)
    pngs = []
    for i, shape in enumerate([(32, 32), (48, 80)]):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(d / f"{i}.png")
        pngs.append(d / f"{i}.png")
    llm = Llama(str(d / "text.gguf"), ctx_size=N_CTX, mmproj=str(d / "mmproj.gguf"))
    servers = {}
    for pooling in POOLING:
        run = DecoderRunner(llm.model, llm.spec, llm.tokenizer, llm.gguf, N_CTX,
                            d / "text.gguf", pooling, llm.numerics)
        st = ServerState(llm, ServerSettings(model_alias="v", media_marker="<__media__>"),
                         encoder=run)
        servers[pooling] = ServerThread(st, warmup=False).start()
    yield d, pngs, servers
    for s in servers.values():
        s.stop()


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("pooling", list(POOLING))
def test_image_embeddings_match_libmtmd(served, pooling):
    from mtmd_oracle import Mtmd

    from jllama.models.clip_image import load_image

    d, pngs, servers = served
    o = Mtmd(d / "text.gguf", d / "mmproj.gguf", n_ctx=N_CTX, pooling=POOLING[pooling])
    try:
        want = [o.embed_last(p, [load_image(pngs[i]) for i in imgs]) for p, imgs in PROMPTS]
    finally:
        o.close()
    r = httpx.post(servers[pooling].url + "/embeddings", timeout=120, json={
        "embd_normalize": -1, "content": [
            {"prompt_string": p, "multimodal_data": [_b64(pngs[i]) for i in imgs]}
            for p, imgs in PROMPTS]})
    assert r.status_code == 200, r.text
    for item, w in zip(r.json(), want, strict=True):
        got = np.asarray(item["embedding"], np.float32)
        if pooling != "none":
            assert got.shape == (1, w.shape[0])
            got = got[0]
        np.testing.assert_allclose(got, w, **TOL[pooling])


def test_suite_properties(served):
    """llama.cpp's unit/test_vision_api.py: the same prompt and image in both request shapes
    give the same vector, the text alone another; bad images and a missing marker are 400s."""
    d, pngs, servers = served
    url = servers["mean"].url
    img = _b64(pngs[0])
    r = httpx.post(url + "/v1/embeddings", timeout=120, json={"input": [
        {"content": [{"type": "text", "text": "What is this: "},
                     {"type": "image_url", "image_url": {"url": "data:image/png;base64," + img}},
                     {"type": "text", "text": "\n"}]},
        {"prompt_string": "What is this: <__media__>\n", "multimodal_data": [img]},
        "What is this: \n", {"content": [{"type": "text", "text": "What is this: \n"}]}]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data[0]["embedding"] == data[1]["embedding"] != data[2]["embedding"]
    assert data[3]["embedding"] == data[2]["embedding"]  # text parts alone: the plain text
    # the image's tokens count in usage (4 per image for this projector + the text's)
    assert r.json()["usage"]["prompt_tokens"] > 3 * 4
    for bad in [{"prompt_string": "What is this: <__media__>\n", "multimodal_data": ["bm90IGFu"]},
                {"prompt_string": "What is this:\n", "multimodal_data": [img]}]:
        r = httpx.post(url + "/embeddings", timeout=120, json={"content": [bad]})
        assert r.status_code == 400, (bad["prompt_string"], r.text[:80])
    r = httpx.post(url + "/embeddings", timeout=120, json={"content": "still fine"})
    assert r.status_code == 200, r.text
