"""llama-server --embedding on a decoder GGUF: /v1/embeddings and /embedding on ``jllama serve``.

A tiny random Q8_0 llama (tests/tinymodels.py; Q8_0 as tests/test_arch_qwen.py: the int8
kernels round as ggml's, F32 matrices go through XLA's own GEMM order). Expected vectors:
llama-cpp-python's (embedding=True, flash_attn=True as llama.cpp's CPU default, pooling_type=...)
raw ``embed`` outputs, normalised here as llama-server's common_embd_normalize does. The hidden
states are bit-exact (pooling none/last); mean pooling sums in another order than ggml's
mul_mat with the 1/n column, so it gets 1e-6.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from test_server_embeddings import _llama_server_normalize

pytestmark = pytest.mark.oracle
N_CTX = 256
EXACT = dict(rtol=0, atol=0)
TOL = {"mean": dict(rtol=0, atol=1e-6), "last": EXACT}
# 12 and 2 tokens (padded to 16 and 7) and 66 (padded to 128: past ggml's 63-row tiled paths)
TEXTS = ["hello world, the quick brown fox", "hi",
         "jumps over the lazy dog and then some more words to make it longer than sixteen "
         "tokens, yes"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tinymodels import write_tiny_llama

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread
    from jllama.server.embeddings import DecoderRunner

    path = write_tiny_llama(tmp_path_factory.mktemp("dembed") / "dec.gguf", 0, n_layer=2,
                            n_embd=64, n_ff=96, n_head=2, n_head_kv=1, head_dim=32)
    llm = Llama(str(path), ctx_size=N_CTX)
    servers = {}
    for pooling in ("mean", "last", None):  # None: the GGUF has no pooling_type -> none
        run = DecoderRunner(llm.model, llm.spec, llm.tokenizer, llm.gguf, N_CTX, path,
                            pooling, llm.numerics)
        st = ServerState(llm, ServerSettings(model_alias="dec"), encoder=run)
        servers[pooling] = ServerThread(st, warmup=False).start()
    yield path, llm, servers
    for s in servers.values():
        s.stop()


def _oracle(path: Path, code: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=N_CTX, n_batch=N_CTX,
                           n_ubatch=N_CTX, pooling_type=code, flash_attn=True, verbose=False)


@pytest.mark.parametrize(("pooling", "code"), [("mean", 1), ("last", 3)])
def test_v1_embeddings_match_llamacpp(served, pooling: str, code: int) -> None:
    path, _, servers = served
    o = _oracle(path, code)
    try:
        r = httpx.post(servers[pooling].url + "/v1/embeddings", json={"input": TEXTS}, timeout=120)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert len(data) == len(TEXTS)
        for d, text in zip(data, TEXTS, strict=True):
            want = _llama_server_normalize(o.embed(text), 2)
            np.testing.assert_allclose(d["embedding"], want, **TOL[pooling])
        r = httpx.post(servers[pooling].url + "/embedding",
                       json={"content": TEXTS[0], "embd_normalize": -1}, timeout=120)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()[0]["embedding"][0], o.embed(TEXTS[0]), **TOL[pooling])
    finally:
        o.close()


def test_pooling_none_default(served) -> None:
    """No pooling_type in the GGUF: llama.cpp's default none; per-token vectors, unnormalised
    and bit-exact; /v1/embeddings refuses (not OAI compatible)."""
    path, _, servers = served
    url = servers[None].url
    r = httpx.post(url + "/v1/embeddings", json={"input": TEXTS[0]}, timeout=120)
    assert r.status_code == 400 and "not OAI compatible" in r.json()["error"]["message"]
    o = _oracle(path, 0)
    try:
        for text in TEXTS:
            r = httpx.post(url + "/embedding", json={"content": text}, timeout=120)
            assert r.status_code == 200, r.text
            got = np.asarray(r.json()[0]["embedding"], np.float32)
            want = np.asarray(o.embed(text), np.float32)
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    finally:
        o.close()


def test_bad_request_beside_good(served) -> None:
    url = served[2]["mean"].url
    bad = httpx.post(url + "/v1/embeddings", json={"input": ""}, timeout=120)
    good = httpx.post(url + "/v1/embeddings", json={"input": "ok"}, timeout=120)
    assert bad.status_code == 400 and "error" in bad.json()
    assert good.status_code == 200 and len(good.json()["data"][0]["embedding"]) == 64
    # completions still served beside embeddings
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                   "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    # images without a projector: llama-server's message; OpenAI text parts alone still work
    r = httpx.post(url + "/embeddings", json={"content": [
        {"prompt_string": "<__media__>", "multimodal_data": ["aGk="]}]}, timeout=120)
    assert r.status_code == 400 and "does not support multimodal" in r.text, r.text
    r = httpx.post(url + "/v1/embeddings", json={"input": [
        {"content": [{"type": "text", "text": "ok"}]}, "ok"]}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["embedding"] == r.json()["data"][1]["embedding"]


def test_gemma3_sliding_window_softcap(tmp_path: Path) -> None:
    """gemma3 (sliding-window layers, a final logit softcap that embeddings must skip): pooled
    last over /v1/embeddings and per-token vectors (none), bit-exact with llama.cpp."""
    import gguf
    from tinymodels import dense_hparams, dense_tensors, write_gguf

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread
    from jllama.server.embeddings import DecoderRunner

    shp = dict(n_layer=2, n_embd=64, n_ff=128, n_head=2, n_head_kv=1, head_dim=32)
    t = dense_tensors(3, n_vocab=320, qk_norm=True, post_norms=True, tied=True, embd_std=0.05,
                      **shp)
    hp = dense_hparams(**shp, **{"rope.freq_base": 1e6, "attention.sliding_window": 8,
                                 "final_logit_softcapping": 1.5})
    path = write_gguf(tmp_path / "g3.gguf", "gemma3", hp, t, qtype=gguf.GGMLQuantizationType.Q8_0)
    llm = Llama(str(path), ctx_size=N_CTX)
    last = DecoderRunner(llm.model, llm.spec, llm.tokenizer, llm.gguf, N_CTX, path,
                         "last", llm.numerics)
    none = DecoderRunner(llm.model, llm.spec, llm.tokenizer, llm.gguf, N_CTX, path)
    assert none.pooling == "none"
    o_last, o_none = _oracle(path, 3), _oracle(path, 0)
    try:
        st = ServerState(llm, ServerSettings(model_alias="g3"), encoder=last)
        with ServerThread(st, warmup=False) as srv:
            r = httpx.post(srv.url + "/v1/embeddings", json={"input": TEXTS}, timeout=120)
        assert r.status_code == 200, r.text
        for d, text in zip(r.json()["data"], TEXTS, strict=True):
            np.testing.assert_array_equal(d["embedding"],
                                          _llama_server_normalize(o_last.embed(text), 2))
        for text in TEXTS:
            ids = o_none.tokenize(text.encode(), add_bos=True, special=True)
            np.testing.assert_array_equal(none.run(ids), np.asarray(o_none.embed(text),
                                                                    np.float32))
    finally:
        o_last.close()
        o_none.close()


def test_cli_serve_embedding_on_a_decoder(served, monkeypatch) -> None:
    """`jllama serve -m dec.gguf --embedding --pooling last`: completions and a DecoderRunner
    (the listening replaced: the state the app would serve is inspected)."""
    import jllama.cli.serve as serve_mod
    import jllama.server.app as app_mod
    from jllama.cli.main import main
    from jllama.server.embeddings import DecoderRunner

    seen = {}
    real = app_mod.create_app

    def capture(state, **kw):
        seen["state"] = state
        return real(state, **kw)

    monkeypatch.setattr(app_mod, "create_app", capture)
    monkeypatch.setattr(serve_mod, "_serve", lambda *a, **k: None)
    path = served[0]
    assert main(["serve", "-m", str(path), "--embedding", "--pooling", "last", "-c", "128", "-np", "1",
                 "--no-warmup"]) == 0
    st = seen["state"]
    assert st.llm is not None and isinstance(st.encoder, DecoderRunner)
    assert st.encoder.pooling == "last" and st.encoder.n_ctx == 128
    assert main(["serve", "-m", str(path), "--no-warmup"]) == 0
    assert seen["state"].encoder is None  # no --embedding: completions only


def test_qwen3_reranker_rank_pooling(tmp_path: Path) -> None:
    """A Qwen3-reranker-shaped GGUF (cls.output.weight over two labels, a rerank template):
    /rerank scores = llama.cpp's rank pooling (last token, cls.output, softmax) label 0."""
    import gguf
    from tinymodels import dense_hparams, dense_tensors, write_gguf

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread
    from jllama.server.embeddings import DecoderRunner

    shp = dict(n_layer=2, n_embd=64, n_ff=96, n_head=2, n_head_kv=1, head_dim=32)
    t = dense_tensors(5, n_vocab=300, qk_norm=True, tied=True, **shp)
    t["cls.output.weight"] = np.random.default_rng(1).normal(0, 0.3, (2, 64)).astype(np.float32)
    hp = dense_hparams(**shp, **{"classifier.output_labels": ["yes", "no"],
                                 ".tokenizer.chat_template.rerank": "{query}\n{document}"})
    path = write_gguf(tmp_path / "rr.gguf", "qwen3", hp, t, qtype=lambda name, a: (
        None if name == "cls.output.weight" or a.ndim < 2 else gguf.GGMLQuantizationType.Q8_0))
    llm = Llama(str(path), ctx_size=N_CTX)
    run = DecoderRunner(llm.model, llm.spec, llm.tokenizer, llm.gguf, N_CTX, path, "rank",
                        llm.numerics)
    query, docs = "what is a fox", ["the quick brown fox", "a lazy dog", "hello"]
    o = _oracle(path, 4)
    try:
        st = ServerState(llm, ServerSettings(model_alias="rr"), encoder=run)
        with ServerThread(st, warmup=False) as srv:
            r = httpx.post(srv.url + "/rerank", json={"query": query, "documents": docs},
                           timeout=120)
            bad = httpx.post(srv.url + "/rerank", json={"query": query, "documents": []},
                             timeout=120)
        assert r.status_code == 200, r.text
        assert bad.status_code == 400
        got = {e["index"]: e["relevance_score"] for e in r.json()["results"]}
        assert len(set(got.values())) == len(docs)  # the documents are told apart
        for i, d in enumerate(docs):
            # llama-cpp-python reads n_embd floats of the sequence output; the rank head's are
            # the first n_cls_out (2): label probabilities, summing to 1
            want = np.asarray(o.embed(f"{query}\n{d}"), np.float32)[:2]
            assert abs(float(want.sum()) - 1.0) < 1e-6
            np.testing.assert_allclose(got[i], want[0], rtol=0, atol=1e-6)
    finally:
        o.close()
