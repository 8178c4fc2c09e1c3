"""llama-server's /v1/embeddings, /embedding(s) and /rerank on ``jllama serve`` for encoder GGUFs.

Tiny random ``bert`` encoders as tests/test_arch_bert.py writes them; the expected vectors are
llama-cpp-python's (embedding=True) raw pooled outputs, normalised here as llama-server's
common_embd_normalize does, compared with test_arch_bert's tolerance (2e-5). Rerank prompts are
built from llama-cpp-python's own tokens and vocabulary flags as llama-server's
format_prompt_rerank builds them.
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_arch_bert import N_CTX, TEXTS, _write

pytestmark = pytest.mark.oracle
TOL = dict(rtol=2e-5, atol=2e-5)


def _llama_server_normalize(v, mode: int) -> np.ndarray:
    """common_embd_normalize (llama.cpp common/common.cpp), sums in double."""
    x = [float(t) for t in v]
    if mode == -1:
        s = 1.0
    elif mode == 0:
        s = max(abs(t) for t in x) / 32760.0
    elif mode == 2:
        s = sum(t * t for t in x) ** 0.5
    else:
        s = sum(abs(t) ** mode for t in x) ** (1.0 / mode)
    return np.asarray(v, np.float32) * np.float32(1.0 / s if s > 0 else 0.0)


class _Served:
    def __init__(self, tmp: Path, pooling: int, name: str, **write_kw):
        import llama_cpp

        from jllama.server.app import ServerSettings, ServerState, ServerThread
        from jllama.server.embeddings import EncoderRunner

        self.path = _write(tmp / f"{name}.gguf", pooling, **write_kw)
        self.llm = llama_cpp.Llama(model_path=str(self.path), embedding=True, n_ctx=N_CTX,
                                   n_batch=N_CTX, n_ubatch=N_CTX, verbose=False)
        state = ServerState(None, ServerSettings(model_alias=name), encoder=EncoderRunner(self.path))
        self.server = ServerThread(state, warmup=False).start()
        self.url = self.server.url

    def post(self, route: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + route, json=body, timeout=120)

    def close(self) -> None:
        self.server.stop()
        self.llm.close()


def _served(tmp_path_factory, pooling: int, name: str):
    pytest.importorskip("llama_cpp")
    s = _Served(tmp_path_factory.mktemp(name), pooling, name)
    yield s
    s.close()


@pytest.fixture(scope="module")
def mean_server(tmp_path_factory):
    yield from _served(tmp_path_factory, 1, "tiny-mean")


@pytest.fixture(scope="module")
def rank_server(tmp_path_factory):
    yield from _served(tmp_path_factory, 4, "tiny-rank")


@pytest.fixture(scope="module")
def none_server(tmp_path_factory):
    yield from _served(tmp_path_factory, 0, "tiny-none")


def test_v1_embeddings_batch_matches_oracle(mean_server) -> None:
    r = mean_server.post("/v1/embeddings", {"input": TEXTS, "model": "m"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "m"
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    n_tok = 0
    for d, text in zip(body["data"], TEXTS, strict=True):
        assert d["object"] == "embedding"
        raw = mean_server.llm.embed(text)
        n_tok += len(mean_server.llm.tokenize(text.encode(), add_bos=True, special=True))
        np.testing.assert_allclose(d["embedding"], _llama_server_normalize(raw, 2), **TOL)
    assert body["usage"] == {"prompt_tokens": n_tok, "total_tokens": n_tok}


def test_single_string_token_ids_and_base64(mean_server) -> None:
    text = TEXTS[0]
    want = _llama_server_normalize(mean_server.llm.embed(text), 2)
    ids = mean_server.llm.tokenize(text.encode(), add_bos=True, special=True)
    for inp in (text, ids, [ids]):
        r = mean_server.post("/v1/embeddings", {"input": inp})
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 1
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], want, **TOL)
    r = mean_server.post("/v1/embeddings", {"input": text, "encoding_format": "base64"})
    d = r.json()["data"][0]
    assert d["encoding_format"] == "base64"
    got = np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
    np.testing.assert_allclose(got, want, **TOL)
    r = mean_server.post("/v1/embeddings", {"input": text, "encoding_format": "hex"})
    assert r.status_code == 400


@pytest.mark.parametrize("mode", [-1, 0, 1, 2, 3])
def test_llama_server_embedding_route_and_normalize(mean_server, mode: int) -> None:
    """/embedding and /embeddings answer llama-server's own shape: [{index, embedding: [vec]}]."""
    for route in ("/embedding", "/embeddings"):
        r = mean_server.post(route, {"content": TEXTS[:2], "embd_normalize": mode})
        assert r.status_code == 200, r.text
        out = r.json()
        assert [o["index"] for o in out] == [0, 1]
        for o, text in zip(out, TEXTS[:2], strict=True):
            want = _llama_server_normalize(mean_server.llm.embed(text), mode)
            assert len(o["embedding"]) == 1
            np.testing.assert_allclose(o["embedding"][0], want, rtol=2e-5,
                                       atol=2e-5 * float(np.max(np.abs(want))))


def _oracle_rerank_ids(llm, query: str, doc: str) -> list[int]:
    """format_prompt_rerank from llama-cpp-python's tokens and vocabulary flags."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    q = llm.tokenize(query.encode(), add_bos=False, special=False)
    d = llm.tokenize(doc.encode(), add_bos=False, special=False)
    eos = llama_cpp.llama_vocab_eos(vocab)
    if eos == -1:
        eos = llama_cpp.llama_vocab_sep(vocab)
    out = [llama_cpp.llama_vocab_bos(vocab)] if llama_cpp.llama_vocab_get_add_bos(vocab) else []
    out += q
    if llama_cpp.llama_vocab_get_add_eos(vocab):
        out.append(eos)
    if llama_cpp.llama_vocab_get_add_sep(vocab):
        out.append(llama_cpp.llama_vocab_sep(vocab))
    out += d
    if llama_cpp.llama_vocab_get_add_eos(vocab):
        out.append(eos)
    return out


def _oracle_score(llm, ids: list[int]) -> float:
    """llama-cpp-python's rank-pooled output for exactly these ids (its embed() path, with its
    tokenizer bypassed)."""
    llm.tokenize = lambda *a, **k: list(ids)
    try:
        return float(np.asarray(llm.embed("x"), np.float32)[0])
    finally:
        del llm.tokenize


def _check_rerank(rank_server, prompts: list[list[int]], query: str, docs: list[str]) -> None:
    llm = rank_server.llm
    want = [_oracle_score(llm, p) for p in prompts]
    order = sorted(range(len(docs)), key=lambda i: -want[i])
    for route in ("/rerank", "/v1/rerank", "/reranking", "/v1/reranking"):
        r = rank_server.post(route, {"query": query, "documents": docs, "top_n": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        res = body["results"]
        assert [x["index"] for x in res] == order[:3]
        np.testing.assert_allclose([x["relevance_score"] for x in res],
                                   [want[i] for i in order[:3]], **TOL)
        n = sum(len(p) for p in prompts)
        assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}


QUERY = "what does the fox jump over?"
DOCS = ["the lazy dog", "a quick brown fox", "rank embedding", "dog?"]


def test_rerank_matches_oracle(rank_server) -> None:
    prompts = [_oracle_rerank_ids(rank_server.llm, QUERY, d) for d in DOCS]
    _check_rerank(rank_server, prompts, QUERY, DOCS)
    r = rank_server.post("/rerank", {"query": QUERY, "documents": []})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == '"documents" must be a non-empty string array'
    r = rank_server.post("/rerank", {"query": QUERY, "texts": DOCS, "return_text": True})
    tei = r.json()  # TEI's shape: a bare list with "score" (and the text when asked)
    assert isinstance(tei, list) and {"index", "score", "text"} <= set(tei[0])
    assert tei[0]["text"] == DOCS[tei[0]["index"]]


def test_rerank_xlmr_vocabulary(tmp_path: Path, extra_vocab_dir: Path) -> None:
    """An XLM-R style reranker (UGM vocabulary with BOS/EOS added): <s> q </s> d </s>."""
    pytest.importorskip("llama_cpp")
    s = _Served(tmp_path, 4, "xlmr-rank",
                xlmr=extra_vocab_dir / "ggml-vocab-nomic-bert-moe.gguf")
    try:
        prompts = [_oracle_rerank_ids(s.llm, QUERY, d) for d in DOCS]
        _check_rerank(s, prompts, QUERY, DOCS)
    finally:
        s.close()


def test_rerank_gguf_template(tmp_path: Path) -> None:
    """A GGUF ``rerank`` chat template replaces the BOS/EOS/SEP joining."""
    import llama_cpp

    tmpl = "[CLS]query: {query}[SEP]doc: {document}[SEP]"
    s = _Served(tmp_path, 4, "tmpl-rank", rerank_template=tmpl)
    try:
        got = llama_cpp.llama_model_chat_template(s.llm._model.model, b"rerank")
        assert got == tmpl.encode()  # llama.cpp reads the template we wrote
        prompts = [s.llm.tokenize(tmpl.replace("{query}", QUERY).replace("{document}", d)
                                  .encode(), add_bos=False, special=True) for d in DOCS]
        _check_rerank(s, prompts, QUERY, DOCS)
    finally:
        s.close()


def _err(r: httpx.Response, status: int, type_: str, message: str) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert (e["code"], e["type"]) == (status, type_)
    assert e["message"].startswith(message), e["message"]
    return e


def test_bad_requests_fail_alone(mean_server, none_server) -> None:
    """Each bad request gets llama-server's error; a good one running beside them is unharmed."""
    long_text = " ".join(["fox"] * (N_CTX + 5))
    bad = [(mean_server, "/v1/embeddings", {"input": []}, 400, "invalid_request_error",
            '"input" must not be empty'),
           (mean_server, "/v1/embeddings", {"input": [[]]}, 400, "invalid_request_error",
            "Input content cannot be empty"),
           (mean_server, "/v1/embeddings", {"input": ["a", long_text]}, 400,
            "exceed_context_size_error", "input ("),
           (mean_server, "/v1/embeddings", {"model": "x"}, 400, "invalid_request_error",
            '"input" or "content" must be provided'),
           (mean_server, "/rerank", {"query": "a", "documents": ["b"]}, 501,
            "not_supported_error", "This server does not support reranking"),
           (mean_server, "/v1/completions", {"prompt": "a"}, 501, "not_supported_error",
            "This server does not support completions"),
           (none_server, "/v1/embeddings", {"input": "a"}, 400, "invalid_request_error",
            "Pooling type 'none' is not OAI compatible")]
    results: dict = {}

    def call(key, srv, route, body):
        results[key] = srv.post(route, body)

    threads = [threading.Thread(target=call, args=("good", mean_server, "/v1/embeddings",
                                                   {"input": TEXTS}))]
    threads += [threading.Thread(target=call, args=(i, s, rt, b))
                for i, (s, rt, b, *_) in enumerate(bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (_, _, _, status, type_, msg) in enumerate(bad):
        e = _err(results[i], status, type_, msg)
        if type_ == "exceed_context_size_error":
            assert e["n_ctx"] == N_CTX and e["n_prompt_tokens"] > N_CTX
    good = results["good"]
    assert good.status_code == 200, good.text
    for d, text in zip(good.json()["data"], TEXTS, strict=True):
        np.testing.assert_allclose(d["embedding"],
                                   _llama_server_normalize(mean_server.llm.embed(text), 2), **TOL)


def test_pooling_none_per_token(none_server) -> None:
    """Pooling none: /embedding gives every token's vector, unnormalised."""
    r = none_server.post("/embedding", {"content": TEXTS[1]})
    assert r.status_code == 200, r.text
    want = np.asarray(none_server.llm.embed(TEXTS[1]), np.float32)
    got = np.asarray(r.json()[0]["embedding"], np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, **TOL)


def test_serve_embedding_flags_refuse_a_decoder(tmp_path: Path, capsys) -> None:
    """On a decoder: --pooling without --embedding, and --reranking without a rerank head
    (cls.output.weight): one error line, exit 1. --embedding itself is served
    (tests/test_server_decoder_embeddings.py)."""
    from tinymodels import dense_hparams, dense_tensors, write_gguf

    from jllama.cli.main import main

    shp = dict(n_layer=1, n_embd=32, n_ff=48, n_head=2, n_head_kv=2, head_dim=16)
    dec = write_gguf(tmp_path / "dec.gguf", "llama", dense_hparams(**shp),
                     dense_tensors(0, n_vocab=300, **shp))
    for flags, want in ((["--pooling", "mean"], "needs --embedding"),
                        (["--reranking"], "cls.output.weight"),
                        (["--embedding", "--pooling", "rank"], "cls.output.weight")):
        assert main(["serve", "-m", str(dec), *flags, "--no-warmup"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = [ln for ln in err.splitlines() if ln.startswith("jllama serve: error: ")]
        assert len(lines) == 1 and want in lines[0], err


@pytest.mark.parametrize(("pooling", "code"), [("last", 3), ("cls", 2)])
def test_pooling_override(tmp_path: Path, pooling: str, code: int) -> None:
    """--pooling over the GGUF's own (mean) pooling, as llama.cpp's pooling_type parameter."""
    import llama_cpp

    from jllama.server.app import ServerSettings, ServerState, ServerThread
    from jllama.server.embeddings import EncoderRunner

    path = _write(tmp_path / "mean.gguf", 1)
    llm = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=N_CTX, n_batch=N_CTX,
                          n_ubatch=N_CTX, pooling_type=code, verbose=False)
    state = ServerState(None, ServerSettings(model_alias="m"),
                        encoder=EncoderRunner(path, pooling=pooling))
    try:
        with ServerThread(state, warmup=False) as srv:
            r = httpx.post(srv.url + "/v1/embeddings", json={"input": TEXTS}, timeout=120)
        assert r.status_code == 200, r.text
        for d, text in zip(r.json()["data"], TEXTS, strict=True):
            np.testing.assert_allclose(d["embedding"], _llama_server_normalize(llm.embed(text), 2),
                                       **TOL)
    finally:
        llm.close()
