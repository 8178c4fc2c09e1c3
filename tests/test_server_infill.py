"""``/infill`` as llama-server 0c1e570 answers it, on tiny generated llamas.

Expected values come from llama.cpp through llama-cpp-python: the FIM token ids its vocab loader
finds (``llama_vocab_fim_*``: metadata keys, else its fallbacks by token text), its tokenizer,
and its greedy generation. The prompt layout is llama-server's ``format_prompt_infill``
(tools/server/server-common.cpp), written out by hand in ``expected_prompt`` below from that
function: ``extra`` = [FIM_REP] "myproject\\n" (when the vocab has FIM_REP), then per
``input_extra`` chunk [FIM_SEP] filename+"\\n" (or the "\\n\\n--- snippet ---\\n\\n" text
without FIM_SEP) and its text, then [FIM_SEP] "filename\\n"; the prefix keeps its last
min(len, 3*(n_batch/4)) tokens, the suffix its first min(len, max(0, n_batch/4 - (2 +
len(prompt)))); the extra context keeps its last min(len, max(0, n_ctx - n_batch -
2*n_predict)) tokens; the prompt is extra + [BOS if add_bos] + [FIM_PRE] prefix prompt +
[FIM_SUF] suffix + [FIM_MID] (suffix part first with --spm-infill). Every text is tokenized
without BOS and without parsing special tokens, the request's ``prompt`` with parsing.
"""

from __future__ import annotations

import pytest

PREFIX = "#include <cstdio>\n#include \"llama.h\"\n\nint main() {\n"
SUFFIX = "}\n"
PROMPT = "    int n_threads = llama_"
EXTRA = [{"filename": "llama.h", "text": "LLAMA_API int32_t llama_n_threads();\n"},
         {"text": "int x = 3;\n"}]
FIM_KEYS = {"pre": 290, "suf": 291, "mid": 292}  # model 'keys': FIM ids from metadata only
N_BATCH = 64
CTX = 256


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tinymodels import write_server_model

    d = tmp_path_factory.mktemp("infill")
    return {"text": write_server_model(d / "fim-text.gguf"),
            "keys": write_server_model(d / "fim-keys.gguf", fim=False, fim_keys=FIM_KEYS),
            "none": write_server_model(d / "no-fim.gguf", fim=False)}


@pytest.fixture(scope="module")
def oracle(models):
    from llamacpp_oracle import llama_cpp_module

    lc = llama_cpp_module()
    out = {}
    for name in ("text", "keys", "none"):
        llm = lc.Llama(str(models[name]), vocab_only=True, verbose=False)
        v = llm._model.vocab
        fim = {k: getattr(lc, f"llama_vocab_fim_{k}")(v)
               for k in ("pre", "suf", "mid", "pad", "rep", "sep")}
        out[name] = (llm, {k: (None if i < 0 else i) for k, i in fim.items()},
                     bool(lc.llama_vocab_get_add_bos(v)), lc.llama_vocab_bos(v))
    yield lc, out
    for llm, *_ in out.values():
        llm.close()


def expected_prompt(oracle_entry, prefix, suffix, extra, prompt, n_batch, n_predict, n_ctx,
                    spm=False):
    """format_prompt_infill, step by step (see the module docstring), with llama.cpp's
    tokenizer and FIM ids."""
    llm, fim, add_bos, bos = oracle_entry

    def tok(s, special=False):
        return llm.tokenize(s.encode(), add_bos=False, special=special)

    ext = []
    if fim["rep"] is not None:
        ext += [fim["rep"]] + tok("myproject\n")
    for c in extra:
        if fim["sep"] is not None:
            ext += [fim["sep"]] + tok(c.get("filename", "tmp") + "\n")
        else:
            ext += tok("\n\n--- snippet ---\n\n")
        ext += tok(c["text"])
    if fim["sep"] is not None:
        ext += [fim["sep"]] + tok("filename\n")
    p, s, pr = tok(prefix), tok(suffix), tok(prompt, special=True)
    n_pre = min(len(p), 3 * (n_batch // 4))
    n_suf = min(len(s), max(0, n_batch // 4 - (2 + len(pr))))
    n_ext = min(max(0, n_ctx - n_batch - 2 * n_predict), len(ext))
    pre = [fim["pre"]] + p[len(p) - n_pre:] + pr
    suf = [fim["suf"]] + s[:n_suf]
    first, second = (suf, pre) if spm else (pre, suf)
    if add_bos:
        first = [bos] + first
    return ext[len(ext) - n_ext:] + first + second + [fim["mid"]]


@pytest.fixture(scope="module")
def ours(models):
    from jllama.gguf.reader import read_gguf
    from jllama.tokenizer import Tokenizer

    return {name: Tokenizer.from_gguf(read_gguf(path)) for name, path in models.items()}


def test_fim_token_ids_are_llamacpps(ours, oracle):
    _, ora = oracle
    for name, tk in ours.items():
        assert {k: tk.vocab.fim.get(k) for k in ora[name][1]} == ora[name][1], name
    assert ora["keys"][1]["pre"] == FIM_KEYS["pre"]  # the metadata was read, not the texts
    assert ora["text"][1]["sep"] is not None


@pytest.mark.parametrize("name", ["text", "keys"])
@pytest.mark.parametrize("case", [
    dict(extra=EXTRA, n_batch=N_BATCH, n_predict=-1, n_ctx=CTX),
    dict(extra=[], n_batch=N_BATCH, n_predict=-1, n_ctx=CTX),
    dict(extra=EXTRA, n_batch=N_BATCH, n_predict=-1, n_ctx=CTX, spm=True),
    # a batch too small for the whole prefix; no room left for the suffix; extra cut to its
    # tail by the context
    dict(extra=EXTRA, n_batch=24, n_predict=40, n_ctx=120),
    dict(extra=EXTRA, n_batch=80, n_predict=-1, n_ctx=CTX),
    # llama-server's default batch (2048) leaves no room for extra in a small context
    dict(extra=EXTRA, n_batch=2048, n_predict=-1, n_ctx=CTX),
])
def test_prompt_layout_is_format_prompt_infill(ours, oracle, name, case):
    from jllama.server import infill

    _, ora = oracle
    tk = ours[name]
    spm = case.get("spm", False)
    want = expected_prompt(ora[name], PREFIX, SUFFIX, case["extra"], PROMPT, case["n_batch"],
                           case["n_predict"], case["n_ctx"], spm)
    p_ids = tk.encode(PROMPT, add_special=False, parse_special=True)
    got = infill.prompt_tokens(tk, tk.vocab.fim, PREFIX, SUFFIX, case["extra"], p_ids,
                               case["n_batch"], case["n_predict"], case["n_ctx"], spm)
    assert got == want


@pytest.fixture(scope="module")
def srv(models):
    import httpx

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    llm = Llama(models["text"], ctx_size=CTX, n_slots=1)
    state = ServerState(llm, ServerSettings("tiny", timeout=120, n_batch=N_BATCH))
    with ServerThread(state) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        s.http = c
        yield s


def test_infill_generates_llamacpps_greedy_text(srv, models, oracle):
    lc, ora = oracle
    want_ids = expected_prompt(ora["text"], PREFIX, SUFFIX, EXTRA, PROMPT, N_BATCH, -1, CTX)
    r = srv.http.post("/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX,
                                       "prompt": PROMPT, "input_extra": EXTRA,
                                       "n_predict": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["tokens_evaluated"] == len(want_ids)
    llm = ora["text"][0]
    assert got["prompt"] == llm.detokenize(want_ids, special=True).decode()
    ref = lc.Llama(str(models["text"]), n_ctx=CTX, verbose=False, n_threads=1)
    try:
        want = ref.create_completion(want_ids, max_tokens=8, temperature=0.0,
                                     repeat_penalty=1.0)
    finally:
        ref.close()
    assert got["content"] == want["choices"][0]["text"]
    assert got["tokens_predicted"] == want["usage"]["completion_tokens"]


@pytest.mark.parametrize("input_extra", [
    {}, {"filename": "ok"}, {"filename": 123}, {"filename": 123, "text": "abc"},
    {"filename": 123, "text": 456}])
def test_invalid_input_extra_is_400(srv, input_extra):
    """llama.cpp's own suite (test_infill.py::test_invalid_input_extra_req)."""
    r = srv.http.post("/infill", json={"input_extra": [input_extra], "input_prefix": PREFIX,
                                       "prompt": PROMPT, "input_suffix": SUFFIX})
    assert r.status_code == 400
    assert "error" in r.json()


def test_model_without_fim_tokens_is_501(models):
    """llama-server's post_infill: 501 naming each missing token."""
    import httpx

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    llm = Llama(models["none"], ctx_size=64, n_slots=1)
    state = ServerState(llm, ServerSettings("tiny", timeout=60))
    with ServerThread(state, warmup=False) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/infill", json={"input_prefix": "a", "input_suffix": "b"})
    assert r.status_code == 501
    err = r.json()["error"]
    assert err["type"] == "not_supported_error"
    assert err["message"] == ("Infill is not supported by this model: prefix token is missing. "
                              "suffix token is missing. middle token is missing. ")


def test_serve_flags_reach_the_settings():
    """llama-server's -b and --spm-infill (the two server flags format_prompt_infill reads)."""
    import argparse

    from jllama.cli import serve
    from jllama.config import load_config

    p = argparse.ArgumentParser()
    serve.register(p.add_subparsers())
    for argv, want in ((["-b", "512", "--spm-infill"], (512, True)), ([], (2048, False))):
        args = p.parse_args(["serve", "-m", "x.gguf", *argv])
        st = serve.settings_from_config(load_config(None, serve._overrides(args)), "a", [])
        assert (st.n_batch, st.spm_infill) == want
