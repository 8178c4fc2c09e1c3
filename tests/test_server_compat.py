"""llama-server behaviours that llama.cpp's own server suite checks, on a fake engine (seconds).

* Google Cloud (Vertex AI) compat: AIP_MODE=PREDICTION, /predict with ``instances`` dispatched
  by ``@requestFormat`` (tools/server/server-http.cpp, unit/test_compat_gcp.py);
* /embeddings input forms (handle_embeddings_impl, tokenize_mixed; unit/test_embedding.py):
  a list holding any token id is one prompt mixing ids and strings, and an OpenAI ``content``
  list of text parts is its texts joined; an encoder's input longer than the physical batch
  (-ub) is refused with llama-server's message;
* serve's --spec-type (unit/test_speculative.py's argv);
* /cors-proxy answers 403 "feature_disabled" (llama-server without --ui-mcp-proxy;
  unit/test_proxy.py::test_mcp_no_proxy);
* the request field ``verbose``: ``__verbose``, the answer in /completion's shape
  (server-task.cpp; unit/test_chat_completion.py::test_verbose_debug).

Expected values are llama-server's documented behaviour (its source's comments and the suite's
assertions), not outputs of our own code.
"""

from __future__ import annotations

import pytest
from test_server_faults import _client, fake_llm  # noqa: F401 - the fixture

from jllama.errors import ConfigError
from jllama.server.gcp import GcpParams, request_format


def test_gcp_aliases_and_env():
    # server-http.cpp's own examples
    assert request_format("/v1/chat/completions") == "chatCompletions"
    assert request_format("/apply-template") == "applyTemplate"
    assert request_format("/slots/{id_slot}") == "slots{idSlot}"  # stops at ':' only
    assert GcpParams.from_env({}) is None
    assert GcpParams.from_env({"AIP_MODE": "PREDICTION"}) == GcpParams("/predict", None, 8080)
    p = GcpParams.from_env({"AIP_MODE": "PREDICTION", "AIP_PREDICT_ROUTE": "v1/go",
                            "AIP_HEALTH_ROUTE": "/alive", "AIP_HTTP_PORT": "9000"})
    assert p == GcpParams("/v1/go", "/alive", 9000)
    with pytest.raises(ConfigError, match="AIP_HTTP_PORT"):
        GcpParams.from_env({"AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": "x"})


def test_gcp_predict_dispatches_instances(fake_llm):  # noqa: F811
    gcp = GcpParams("/predict", "/alive", 8080)
    _, client = _client(fake_llm, gcp=gcp, api_keys=["k"])
    auth = {"Authorization": "Bearer k"}
    # 'completions' is both /v1/completions (OAI) and /completions (llama-server's own):
    # the first route registered wins, the OAI one
    oai = {"@requestFormat": "completions", "max_tokens": 3, "stream": True, "prompt": [5, 6]}
    with client:
        r = client.post("/predict", headers=auth, json={"instances": [
            oai, {**oai, "@requestFormat": "/completion"}, {"@requestFormat": "nope"}, 3,
            {"max_tokens": 1}]})
        assert r.status_code == 200
        p = r.json()["predictions"]
        assert len(p) == 5
        assert p[0]["object"] == "text_completion"  # streaming is turned off
        assert p[0]["usage"]["completion_tokens"] == 3
        assert p[1]["tokens_predicted"] == 3 and "content" in p[1]
        assert "no handler registered for @requestFormat: nope" in p[2]["error"]["message"]
        assert p[3]["error"]["message"] == "each instance must be a JSON object"
        assert "@requestFormat" in p[4]["error"]["message"]
        # each instance goes through its route's own key check
        r = client.post("/predict", json={"instances": [oai]})
        assert r.json()["predictions"][0]["error"]["type"] == "authentication_error"
        for body in ([], {"instances": {}}, {"instances": [{}] * 129}):
            assert client.post("/predict", headers=auth, json=body).status_code == 400
        assert client.get("/alive").status_code == 200


def test_serve_spec_type():
    """test_speculative's argv: --spec-type draft-simple with a draft model (-md) and
    --spec-draft-n-min/max; other types are refused by name, draft-simple needs -md."""
    from jllama.cli.main import build_parser
    from jllama.cli.serve import _check_llama_server_args, _overrides
    from jllama.config import load_config

    base = ["serve", "-m", "m.gguf", "--parallel", "1"]
    args = build_parser().parse_args(base + ["--model-draft", "d.gguf", "--spec-type",
                                             "draft-simple", "--spec-draft-n-min", "4",
                                             "--spec-draft-n-max", "8"])
    _check_llama_server_args(args)
    cfg = load_config(None, _overrides(args))
    assert (cfg.draft.model, cfg.draft.n_min, cfg.draft.n) == ("d.gguf", 4, 8)
    for extra, msg in ((["--spec-type", "draft-simple"], "needs a draft model"),
                       (["--spec-type", "none,ngram-mod"], "--spec-type ngram-mod"),
                       (["--spec-synth-rates", "0.5"], "synthetic")):
        with pytest.raises(ConfigError, match=msg):
            _check_llama_server_args(build_parser().parse_args(base + extra))


def test_embedding_input_forms(tmp_path):
    from test_arch_bert import _write

    from jllama.server import embeddings as emb

    enc = emb.EncoderRunner(_write(tmp_path / "e.gguf", 1))

    def seqs(inp):
        return emb.parse_embeddings(enc, {"input": inp}, True)[0]

    def enc_(text, bos=True):
        return enc.tokenizer.encode(text, add_special=bos, parse_special=True)

    # tokenize_mixed: ids kept, a string gets BOS/EOS only where it comes first
    assert seqs([12, 34, "fox", 56]) == [[12, 34] + enc_("fox", False) + [56]]
    assert seqs(["fox", 7]) == [enc_("fox") + [7]]
    assert seqs([[12, 34], [12, "dog", 34]]) == [[12, 34], [12] + enc_("dog", False) + [34]]
    parts = {"content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "fox"}]}
    assert seqs([parts, "hello fox"]) == [enc_("hello fox")] * 2
    with pytest.raises(emb.ApiError, match="must be an array"):
        seqs({"content": "x"})
    with pytest.raises(emb.ApiError, match="Multimodal data provided"):
        seqs({"content": [{"type": "image_url", "image_url": {"url": "data:,"}}]})


def test_verbose_answer_carries_native_shape(fake_llm):  # noqa: F811
    _, client = _client(fake_llm)
    body = {"prompt": [5, 6], "max_tokens": 2, "temperature": 0}
    with client:
        plain = client.post("/v1/completions", json={**body, "verbose": False}).json()
        r = client.post("/v1/completions", json={**body, "verbose": True}).json()
    assert "__verbose" not in plain
    v = r["__verbose"]
    assert v["prompt"] == "<5><6>" and v["content"] == r["choices"][0]["text"]
    assert v["tokens_predicted"] == 2 and "generation_settings" in v and "timings" in v


def test_encoder_input_over_ubatch(tmp_path):
    from test_arch_bert import _write

    from jllama.server import embeddings as emb

    enc = emb.EncoderRunner(_write(tmp_path / "e.gguf", 1), n_ubatch=8)
    text = "the quick brown fox jumps over the lazy dog"
    n = len(enc.tokenizer.encode(text, add_special=True, parse_special=True))
    assert n > 8
    with pytest.raises(emb.ApiError) as e:
        emb.parse_embeddings(enc, {"input": text}, True)
    assert e.value.status == 500
    assert e.value.message == (f"input ({n} tokens) is too large to process. increase the "
                               "physical batch size (current batch size: 8)")
    assert len(emb.parse_embeddings(enc, {"input": "fox"}, True)[0]) == 1


def test_cors_proxy_is_off(fake_llm):  # noqa: F811
    _, client = _client(fake_llm)
    with client:
        for r in (client.get("/cors-proxy?url=http://example.com"), client.post("/cors-proxy")):
            assert r.status_code == 403
            assert r.json()["error"]["message"] == "this feature is disabled"
            assert r.json()["error"]["type"] == "feature_disabled"
