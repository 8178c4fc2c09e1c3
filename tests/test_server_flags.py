"""llama-server's server-wide request defaults and slot choice as `jllama serve` flags:
--ignore-eos, --keep, --embd-normalize, --grammar/--grammar-file/-j/-jf and
-sps/--slot-prompt-similarity (common/arg.cpp; their use: tools/server/server-schema.cpp,
server-context.cpp get_available_slot and the embeddings handler).

Expected values come from llama.cpp: the -j grammar is the text llama.cpp's own
json_schema_to_grammar gives (tests/data, from test-json-schema-to-grammar.cpp); an output
under a grammar is the only string the grammar allows; the slot picked and its reused prefix
follow get_available_slot's rules (a free slot whose cached prefix is more than -sps of the
prompt, the best first; else the least recently used); embeddings are llama-cpp-python's raw
vectors normalised as common_embd_normalize does.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

SHP = dict(n_layer=2, n_embd=64, n_ff=96, n_head=2, n_head_kv=1, head_dim=32)
N_CTX = 64
CASES = json.loads((Path(__file__).parent / "data" / "llamacpp_json_schema_to_grammar.json")
                   .read_text(encoding="utf-8"))


def _args(*flags):
    from jllama.cli.main import build_parser

    return build_parser().parse_args(["serve", "-m", "m.gguf", *flags])


def _settings(*flags):
    from jllama.cli.serve import (
        _check_llama_server_args,
        _constraint_flags,
        _overrides,
        settings_from_config,
    )
    from jllama.config import load_config

    args = _args(*flags)
    _check_llama_server_args(args)
    cfg = load_config(None, _overrides(args))
    _constraint_flags(args, cfg.server)
    return settings_from_config(cfg, "m", [])


def test_flags_reach_the_settings(tmp_path):
    from jllama.errors import ConfigError

    s = _settings()  # llama-server's defaults (common.h): n_keep 0, embd_normalize 2, sps 0.1
    assert (s.grammar, s.embd_normalize, s.slot_prompt_similarity) == ("", 2, 0.1)
    assert "ignore_eos" not in s.defaults and "n_keep" not in s.defaults
    s = _settings("--ignore-eos", "--keep", "-1", "--embd-normalize", "1", "-sps", "0.5")
    assert s.defaults["ignore_eos"] is True and s.defaults["n_keep"] == -1
    assert (s.embd_normalize, s.slot_prompt_similarity) == (1, 0.5)
    assert _settings("--slot-prompt-similarity", "0").slot_prompt_similarity == 0.0
    g = 'root ::= "a"\n  | "b"\n'
    assert _settings("--grammar", g).grammar == g
    (tmp_path / "g.gbnf").write_text(g)
    assert _settings("--grammar-file", str(tmp_path / "g.gbnf")).grammar == g
    case = next(c for c in CASES if c["status"] == "SUCCESS" and "required" in c["schema"])

    def canon(t):
        return "\n".join(ln.strip() for ln in t.strip().splitlines())

    assert canon(_settings("-j", case["schema"]).grammar) == case["grammar"]
    (tmp_path / "s.json").write_text(case["schema"])
    assert canon(_settings("-jf", str(tmp_path / "s.json")).grammar) == case["grammar"]
    for bad, msg in ((["-j", "{nope"], "not JSON"),
                     (["--grammar", g, "-j", "{}"], "give one grammar or JSON schema"),
                     (["--grammar-file", str(tmp_path / "missing")], "--grammar-file"),
                     (["-jf", str(tmp_path / "missing")], "--json-schema-file")):
        with pytest.raises(ConfigError, match=msg):
            _settings(*bad)


def test_cli_refuses_none_of_them():
    from jllama.cli.serve import _REFUSED

    refused = {f for flags, _, _ in _REFUSED for f in flags}
    for f in ("--ignore-eos", "--grammar", "--grammar-file", "-j", "--json-schema", "-jf",
              "--json-schema-file", "--keep", "--embd-normalize", "-sps",
              "--slot-prompt-similarity"):
        assert f not in refused


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import gguf
    from tinymodels import dense_hparams, dense_tensors, write_gguf

    return write_gguf(tmp_path_factory.mktemp("flags") / "tiny.gguf", "llama",
                      dense_hparams(**SHP), dense_tensors(0, n_vocab=300, **SHP),
                      qtype=gguf.GGMLQuantizationType.Q8_0)


@pytest.fixture(scope="module")
def llm(tiny):
    from jllama.api import Llama

    return Llama(str(tiny), ctx_size=N_CTX, n_slots=2, compile_cache=False)


def _serve(llm, settings, encoder=None):
    from jllama.server.app import ServerState, ServerThread

    llm.engine.reset()
    settings.timeout = 120
    return ServerThread(ServerState(llm, settings, encoder=encoder), warmup=False)


def test_ignore_eos_and_keep_are_request_defaults(llm):
    with _serve(llm, _settings("--ignore-eos", "--keep", "5", "-cram", "0")) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        body = {"prompt": "hello", "n_predict": 2, "temperature": 0}
        gs = c.post("/completion", json=body).json()["generation_settings"]
        assert gs["ignore_eos"] is True and gs["n_keep"] == 5
        # llama-server: every EOG token gets a -inf bias (null in JSON)
        assert gs["logit_bias"] and all(b["bias"] is None for b in gs["logit_bias"])
        gs = c.post("/completion", json={**body, "ignore_eos": False, "n_keep": 2}).json()[
            "generation_settings"]
        assert gs["ignore_eos"] is False and gs["n_keep"] == 2 and gs["logit_bias"] == []


def test_server_grammar_unless_the_request_brings_one(llm):
    with _serve(llm, _settings("-j", '{"const": "foo"}', "-cram", "0")) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        def text(**kw):
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 12,
                                                "temperature": 0, **kw})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        assert text() == '"foo"'
        assert text(grammar="") == '"foo"'  # llama-server: an empty grammar sets nothing
        assert text(grammar='root ::= "xyz"') == "xyz"
        assert text(json_schema={"const": "bar"}) == '"bar"'
        assert text(response_format={"type": "json_object", "schema": {"const": 7}}) == "7"
        r = c.post("/completion", json={"prompt": "hi", "n_predict": 12, "temperature": 0})
        assert r.json()["content"] == '"foo"'


def _fill(c, prompt, slot):
    r = c.post("/completion", json={"prompt": prompt, "n_predict": 1, "temperature": 0,
                                    "id_slot": slot, "cache_prompt": True})
    assert r.status_code == 200, r.text
    return r.json()


A = list(range(20, 40))  # 20 tokens
B = [200, 201, 202, 203, 204]
C = A[:3] + list(range(100, 117))  # shares 3 of its 20 tokens with A: similarity 0.15
D = A + [50]  # shares 20 of 21 with A


@pytest.mark.parametrize("sps,c_slot,c_cache,d_slot,d_cache", [
    ("0.1", 1, 3, 1, 20),  # by similarity (0.15 > 0.1)
    ("0.2", 0, 0, 1, 20),  # C: 0.15 is not above 0.2: the least recently used (slot 0)
    ("0", 0, 0, 0, 0),  # no similarity: always the least recently used
])
def test_slot_prompt_similarity(llm, sps, c_slot, c_cache, d_slot, d_cache):
    for prompt, want_slot, want_cache in ((C, c_slot, c_cache), (D, d_slot, d_cache)):
        with _serve(llm, _settings("-sps", sps, "-cram", "0")) as s, \
                httpx.Client(base_url=s.url, timeout=120) as c:
            _fill(c, B, 0)  # slot 0 is used first: it is the least recently used
            _fill(c, A, 1)
            r = _fill(c, prompt, -1)
            assert (r["id_slot"], r["timings"]["cache_n"]) == (want_slot, want_cache)


@pytest.mark.oracle
def test_embd_normalize_default(tiny, llm):
    import llama_cpp
    import numpy as np
    from test_server_embeddings import _llama_server_normalize

    from jllama.server.embeddings import DecoderRunner

    o = llama_cpp.Llama(model_path=str(tiny), embedding=True, n_ctx=N_CTX, n_batch=N_CTX,
                        n_ubatch=N_CTX, pooling_type=3, flash_attn=True, verbose=False)
    try:
        raw = o.embed("hello world")
    finally:
        o.close()
    run = DecoderRunner(llm.model, llm.spec, llm.tokenizer, llm.gguf, N_CTX, tiny, "last",
                        llm.numerics)
    with _serve(llm, _settings("--embd-normalize", "1", "-cram", "0"), encoder=run) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        got = c.post("/v1/embeddings", json={"input": "hello world"}).json()
        np.testing.assert_allclose(got["data"][0]["embedding"], _llama_server_normalize(raw, 1),
                                   rtol=0, atol=0)
        got = c.post("/embedding", json={"content": "hello world", "embd_normalize": -1}).json()
        np.testing.assert_allclose(got[0]["embedding"][0], raw, rtol=0, atol=0)


def test_api_prefix_and_static_path(llm, tmp_path):
    from jllama.errors import ConfigError

    (tmp_path / "index.html").write_text("<p>home</p>")
    (tmp_path / "a.txt").write_text("file a")
    with _serve(llm, _settings("--api-prefix", "/llama", "--path", str(tmp_path),
                               "-cram", "0")) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        assert c.get("/llama/health").status_code == 200
        assert c.get("/health").status_code == 404  # every route is under the prefix
        r = c.post("/llama/completion", json={"prompt": "hi", "n_predict": 1})
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 1
        assert c.get("/llama/v1/models").status_code == 200
        assert c.get("/llama/").text == "<p>home</p>"  # a directory: its index.html
        assert c.get("/llama/a.txt").text == "file a"
        assert c.get("/llama/b.txt").status_code == 404
        assert c.get("/a.txt").status_code == 404
    with _serve(llm, _settings("--path", str(tmp_path), "-cram", "0")) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        assert c.get("/").text == "<p>home</p>" and c.get("/a.txt").text == "file a"
        assert c.get("/health").status_code == 200
    with pytest.raises(ConfigError, match="static assets path not found"):
        _settings("--path", str(tmp_path / "nope"))


def test_tls(llm, tmp_path):
    import shutil
    import socket
    import ssl
    import subprocess
    import threading
    import time

    import uvicorn

    from jllama.cli.serve import _overrides, uvicorn_config
    from jllama.config import load_config
    from jllama.errors import ConfigError
    from jllama.server.app import ServerState, create_app

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a self-signed certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)

    def cfg(*flags):
        return load_config(None, _overrides(_args(*flags))).server

    app = create_app(ServerState(llm, _settings("-cram", "0")), warmup=False)
    # one of the two files alone: plain HTTP, as llama-server
    assert uvicorn_config(app, cfg("--ssl-key-file", str(key))).ssl_keyfile is None
    with pytest.raises(ConfigError, match="--ssl-cert-file"):
        uvicorn_config(app, cfg("--ssl-key-file", str(key), "--ssl-cert-file",
                                str(tmp_path / "nope.pem")))
    conf = uvicorn_config(app, cfg("--ssl-key-file", str(key), "--ssl-cert-file", str(cert)),
                          log_level="warning")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(conf)
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        while not server.started and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        ctx = ssl.create_default_context(cafile=str(cert))
        r = httpx.get(f"https://127.0.0.1:{port}/health", verify=ctx, timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        with pytest.raises(httpx.HTTPError):  # plain HTTP on a TLS port gets no answer
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
    finally:
        server.should_exit = True
        t.join(30)
        sock.close()


def test_router_mode():
    """The router answers over TLS itself (its children get no TLS flags); a prefix or static
    files in router mode are refused by name."""
    from jllama.cli.serve import child_args, run
    from jllama.errors import ConfigError

    p = _args()._parser
    argv = ["--ssl-key-file", "k.pem", "--ssl-cert-file", "c.pem", "-n", "3", "-sps", "0.3"]
    assert child_args(p, argv) == ["-n", "3", "-sps", "0.3"]
    args = _args("--api-prefix", "/x")
    args.model, args.models_dir = None, "/nonexistent"
    with pytest.raises(ConfigError, match="--api-prefix and --path are not built in router"):
        run(args)
