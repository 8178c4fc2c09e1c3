"""GBNF grammars (``grammar`` request field) and the grammar-constrained pick, against
llama.cpp's own grammar engine (tests/llamacpp_grammar.py): for every grammar and string, how
many bytes llama.cpp lets through and whether it allows the end there must be what ours says;
grammars llama.cpp refuses we refuse.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from jllama.server import gbnf
from jllama.server.grammar import GrammarConstraint, compile_grammar


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    from llamacpp_grammar import GrammarOracle

    o = GrammarOracle(tmp_path_factory.mktemp("grammar"))
    yield o
    o.close()


def ours(grammar: str, data: bytes) -> tuple[int, bool]:
    m = gbnf.Matcher(gbnf.Grammar(grammar))
    st = m.initial()
    for i, b in enumerate(data):
        nxt = m.feed_bytes(st, bytes([b]))
        if nxt is None:
            return i, False
        st = nxt
    return len(data), m.can_end(st)


JSON_GBNF = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
'''

CASES = [
    ('root ::= "a"{5,5}', ["aaaaa", "aaaa", "aaaaaa", "b"]),
    ('root ::= "ab"{2,4} "c"?', ["abab", "ababc", "ababababab", "ababab", "abc", "ababababc"]),
    ('root ::= [a-c]{2,} [^a-c]*', ["ab", "abcz", "a", "abzz", "abza", "cccccc1"]),
    ('root ::= ("x" | "yz")* "!"', ["!", "xyz!", "xy!", "yzyzx!", "x"]),
    ('root ::= [^\\x00-\\x40] .+', ["AB", "@B", "a\u00e9", "\u00e9\u4e2d", "\U0001F600x", "z"]),
    ('root ::= "\\u00e9" [\\u4e00-\\u9fff]+ "\\x41"', ["\u00e9\u4e2dA", "\u00e9A", "eA",
                                                     "\u00e9\u4e2d\u4e8cA"]),
    ('root ::= [\u00e0-\u00ff] | [\U0001F600-\U0001F64F]', ["\u00e9", "\U0001F601", "\U0001F650",
                                                          "a"]),
    ('# a comment\nroot ::= item ("," item){0,2} # trailing\nitem ::= [0-9]+\n',
     ["1", "1,2", "1,2,3", "1,2,3,4", "12,,3", ""]),
    ('root ::= (\n  "a"\n  | "b"\n)+ "."', ["a.", "ab.", "abba.", ".", "c."]),
    ('root ::= [\\]\\-\\\\]+', ["]-\\", "]", "a"]),
    ('root ::= "" | "q"', ["", "q", "qq"]),
    ('root ::= a b\na ::= "x"?\nb ::= "y"*', ["", "x", "xy", "xyyy", "yx", "y"]),
    ('root ::= [a-]+', ["a-a", "b"]),
    ('root ::= [^\\n]* "\\n"', ["abc\n", "\n", "a\nb\n"]),
    (JSON_GBNF, ['{"a": [1, 2.5e3, true, null, "x\\u00e9"]}', '{}', '[]', '{"a" 1}',
                 '{"b": {"c": -0.5}}\n  ', '{"e": "\u00fc\u4e2d"}']),
]


@pytest.mark.parametrize("grammar,texts", CASES, ids=[str(i) for i in range(len(CASES))])
def test_grammar_matches_llamacpp(oracle, grammar, texts):
    rng = random.Random(0)
    alphabet = sorted({c for t in texts for c in t} | {"a", " "})
    extra = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(40)]
    for t in texts + extra:
        data = t.encode()
        assert ours(grammar, data) == oracle.run(grammar, data), (grammar, t)


BAD = [
    "root ::= this is (not valid GBNF",
    'root ::= "a',
    "root ::= [a-z",
    "root ::= foo",
    'rot ::= "a"',
    'root ::= "a" {2',
    'root ::= "a"{,2}',
    'root ::= *"a"',
    'root ::= "\\q"',
    "root ::= root \"a\" | \"b\"",
    'root ::= x\nx ::= "" | root "a"',
    'root ::= "a"{3001}',
    "# only a comment",
    'root ::= "a" ) "b"',
    'root ::= "\\x4"',
    'root : "a"',
]


@pytest.mark.parametrize("grammar", BAD)
def test_bad_grammars_are_refused_like_llamacpp(oracle, grammar):
    assert not oracle.parses(grammar)
    with pytest.raises(gbnf.GrammarError):
        gbnf.Grammar(grammar)


def test_good_grammars_parse_in_both(oracle):
    for g, _ in CASES:
        assert oracle.parses(g)
        gbnf.Grammar(g)


def test_multibyte_tokens_and_token_ids(oracle):
    """Tokens of several bytes (split UTF-8 included) advance as llama.cpp's accept_token does;
    <[id]> terminals match by token id."""
    g = compile_grammar('root ::= "h\u00e9llo" <[7]> [0-9]')
    vocab = [b"h", b"\xc3", b"\xa9ll", b"o", b"x", b"h\xc3\xa9", b"llo", b"zz", b"5", b"\xa9"]
    c = GrammarConstraint(vocab, frozenset({9}), g)
    for tok in (5, 6, 7, 8):
        assert c.accepts(tok) is not None, tok
        assert c.accepts(4) is None
        c.advance(tok)
    assert c.done
    c = GrammarConstraint(vocab, frozenset(), g)
    for tok in (0, 1, 2, 3):
        c.advance(tok)
    assert c.accepts(4) is None and c.accepts(7) is not None and not c.done


def test_pick_takes_the_best_valid_token():
    g = compile_grammar('root ::= [0-9]+ ("." [0-9])?')
    vocab = [b"a", b"1", b"22", b".", b".5", b"b"]
    eog = frozenset({6})
    c = GrammarConstraint(vocab + [b""], eog, g)
    logits = np.array([9.0, 1.0, 2.0, 8.0, 7.0, 3.0, 10.0], np.float32)
    rng = np.random.default_rng(0)
    assert c.pick(0, logits, 0.0, 1.0, rng) == 2  # 'a' and EOG are invalid at the start
    c.advance(2)
    assert c.pick(0, logits, 0.0, 1.0, rng) == 6  # EOG is allowed now and is the best
    assert c.pick(3, logits, 0.0, 1.0, rng) == 3  # a valid draw stands
    c.advance(4)
    assert c.done  # nothing can follow ".5"


# ---------------------------------------------------------------------------- the server
# A tiny random llama served by `jllama serve`'s app, against llama-cpp-python on the same file:
# greedy grammar-constrained text must be llama.cpp's (its grammar sampler masks the whole
# vocabulary, then takes the argmax), logprobs llama.cpp's numbers.
SRV_SHP = dict(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, head_dim=16)
PROMPT = [101, 102, 103, 104, 105]
GRAMMARS = ['root ::= [a-z]{2,5} " " ("cat" | "dog" | [0-9]{1,3}) "."',
            'root ::= "{" [a-z]+ ":" ("x" | "yy")* "}"',
            # a control token matches its text (llama.cpp's grammar sees special pieces)
            'root ::= ("<|im_start|>" | "<<") [a-z]{3}']


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import gguf
    from tinymodels import dense_hparams, dense_tensors, write_gguf

    return write_gguf(tmp_path_factory.mktemp("srv") / "tiny.gguf", "llama",
                      dense_hparams(**SRV_SHP), dense_tensors(5, n_vocab=320, **SRV_SHP),
                      qtype=gguf.GGMLQuantizationType.F16)


@pytest.fixture(scope="module")
def theirs(tiny):
    from llamacpp_oracle import llama_cpp_module

    lc = llama_cpp_module()
    llm = lc.Llama(model_path=str(tiny), n_ctx=256, logits_all=True, verbose=False,
                   n_threads=1)
    yield lc, llm
    llm.close()


@pytest.fixture(scope="module")
def srv(tiny):
    import httpx

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    llm = Llama(tiny, ctx_size=256, n_slots=4)
    state = ServerState(llm, ServerSettings("tiny", timeout=120))
    with ServerThread(state) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        s.http = c
        yield s


def _complete(srv, **body) -> dict:
    r = srv.http.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("grammar,prompt", [(g, PROMPT) for g in GRAMMARS]
                         + [(GRAMMARS[-1], [5, 6, 7])])  # here llama.cpp takes <|im_start|>
def test_greedy_grammar_output_is_llamacpps(srv, theirs, grammar, prompt):
    lc, llm = theirs
    want = llm.create_completion(prompt, max_tokens=24, temperature=0.0, repeat_penalty=1.0,
                                 grammar=lc.LlamaGrammar.from_string(grammar, verbose=False))
    got = _complete(srv, grammar=grammar, max_tokens=24, prompt=prompt)
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
    # llama-server also counts the end-of-generation token llama.cpp samples once the grammar
    # allows nothing else (n_gen grows before process_token sees it); llama-cpp-python's usage
    # leaves it out
    eog = want["choices"][0]["finish_reason"] == "stop"
    assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"] + eog


def test_json_schema_output_parses_and_validates(srv):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3,
                                                     "maximum": 40},
                                               "s": {"enum": ["a", "bc"]}},
              "required": ["n", "s"], "additionalProperties": False}
    for body in ({"json_schema": schema},
                 {"response_format": {"type": "json_schema",
                                      "json_schema": {"name": "x", "schema": schema}}}):
        got = _complete(srv, max_tokens=60, **body)
        assert got["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(got["choices"][0]["text"]), schema)
    got = _complete(srv, max_tokens=20, response_format={"type": "json_object",
                                                         "schema": {"const": "foo"}})
    assert got["choices"][0]["text"] == '"foo"'


def test_bad_grammar_fails_only_that_request(srv):
    r = srv.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4,
                                               "grammar": "root ::= this is (not valid GBNF"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == 400 and err["type"] == "invalid_request_error"
    assert "failed to parse grammar" in err["message"]
    for rf in ({"type": "json_object", "schema": 123},
               {"type": "json_object", "schema": {"type": "hiccup"}}):
        r = srv.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4,
                                                   "response_format": rf})
        assert r.status_code == 400, rf
    assert _complete(srv, max_tokens=3)["usage"]["completion_tokens"] == 3


def test_logprobs_are_llamacpps(srv, theirs):
    _, llm = theirs
    want = llm.create_completion(PROMPT, max_tokens=6, temperature=0.0, repeat_penalty=1.0,
                                 logprobs=3)["choices"][0]["logprobs"]
    got = _complete(srv, max_tokens=6, n_probs=3)["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in got] == want["tokens"]
    # the engine's logits for this F16 toy differ from llama.cpp's by up to ~4e-3 (measured),
    # so the numbers agree to that, not to float rounding
    for g, lp, top in zip(got, want["token_logprobs"], want["top_logprobs"], strict=True):
        assert g["logprob"] == pytest.approx(lp, abs=1e-2)
        assert bytes(g["bytes"]).decode() == g["token"]
        assert len(g["top_logprobs"]) == 3
        mine = {t["token"]: t["logprob"] for t in g["top_logprobs"]}
        assert set(mine) == set(top)
        for k, v in top.items():
            assert mine[k] == pytest.approx(v, abs=1e-2)
    # streamed: the same entries, spread over the chunks
    with srv.http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6,
                                                          "temperature": 0, "n_probs": 3,
                                                          "stream": True}) as r:
        import json

        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    streamed = [t for c in chunks for ch in c["choices"] if ch["logprobs"]
                for t in ch["logprobs"]["content"]]
    assert [t["id"] for t in streamed] == [t["id"] for t in got]


def test_n_choices_and_ignore_eos(srv, theirs):
    _, llm = theirs
    one = _complete(srv, max_tokens=5)
    two = _complete(srv, max_tokens=5, n=2)
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert all(c["text"] == one["choices"][0]["text"] for c in two["choices"])
    # llama-server answers n > 1 with its first task's result (its usage), choices appended
    assert two["usage"]["completion_tokens"] == 5
    eos = llm.token_eos()
    forced = {"logit_bias": {str(eos): 100}}
    # the end-of-generation token drawn is counted, as llama-server counts it
    assert _complete(srv, max_tokens=7, **forced)["usage"]["completion_tokens"] == 1
    got = _complete(srv, max_tokens=7, ignore_eos=True, **forced)
    assert got["usage"]["completion_tokens"] == 7 and got["choices"][0]["finish_reason"] == "length"
    r = srv.http.post("/v1/completions", json={"prompt": PROMPT, "n": 99})
    assert r.status_code == 400


def test_redraw_follows_llamacpps_chain_order():
    """A rejected draw is redrawn among valid tokens with top-k / top-p / min-p applied before
    the temperature (llama.cpp's default sampler order)."""
    g = compile_grammar('root ::= [0-9]')
    vocab = [b"x", b"1", b"2", b"3"]
    logits = np.array([5.0, 2.0, 1.9, 0.0], np.float32)
    rng = np.random.default_rng(1)

    def draws(**kw) -> set[int]:
        return {GrammarConstraint(vocab, frozenset(), g).pick(0, logits, 1.5, 1.0, rng, **kw)
                for _ in range(200)}

    assert draws() == {1, 2, 3}
    assert draws(top_k=2) == {1, 2}
    assert draws(top_k=1) == {1}
    # min-p 0.5 against the untempered probabilities: exp(-2) < 0.5 drops token 3, even though
    # at temperature 1.5 its share would pass
    assert draws(min_p=0.5) == {1, 2}


def test_native_completion_endpoint(srv, theirs):
    """llama-server's /completion: its response fields, completion_probabilities for n_probs,
    stop_type, and ignore_eos's -inf biases (null in JSON) in generation_settings, as
    llama.cpp's tools/server/tests (test_completion.py, test_ignore_eos.py) read them."""
    import json

    _, llm = theirs
    want = llm.create_completion(PROMPT, max_tokens=5, temperature=0.0, repeat_penalty=1.0)
    r = srv.http.post("/completion", json={"prompt": PROMPT, "n_predict": 5, "temperature": 0,
                                           "n_probs": 2})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["content"] == want["choices"][0]["text"]
    assert d["tokens_predicted"] == 5 and d["tokens_evaluated"] == len(PROMPT)
    assert d["stop_type"] == "limit" and d["stop"] is True
    assert d["generation_settings"]["logit_bias"] == []
    probs = d["completion_probabilities"]
    assert len(probs) == 5 and all(len(p["top_logprobs"]) == 2 for p in probs)
    assert "".join(p["token"] for p in probs) == d["content"]
    word = d["content"][2:4]
    d = srv.http.post("/completion", json={"prompt": PROMPT, "n_predict": 5, "temperature": 0,
                                           "stop": [word]}).json()
    assert d["stop_type"] == "word" and d["stopping_word"] == word
    eos = llm.token_eos()
    d = srv.http.post("/completion", json={"prompt": PROMPT, "n_predict": 4, "ignore_eos": True,
                                           "logit_bias": {str(eos): 100}}).json()
    assert d["tokens_predicted"] == 4
    assert d["generation_settings"]["logit_bias"] and all(
        e["bias"] is None for e in d["generation_settings"]["logit_bias"])
    with srv.http.stream("POST", "/completion", json={"prompt": PROMPT, "n_predict": 5,
                                                      "temperature": 0, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line[6:]) for line in lines]
    assert chunks[-1]["stop"] is True and not any(c["stop"] for c in chunks[:-1])
    assert "".join(c["content"] for c in chunks) == want["choices"][0]["text"]


def test_native_completion_batch_of_prompts(srv, theirs):
    """A list of prompts (no token ids at its top level) is llama-server's batch: a list of
    results in prompt order, each llama.cpp's greedy completion of its prompt."""
    _, llm = theirs
    prompts = [PROMPT, PROMPT[:-3]]
    want = [llm.create_completion(p, max_tokens=4, temperature=0.0, repeat_penalty=1.0)
            ["choices"][0]["text"] for p in prompts]
    r = srv.http.post("/completion", json={"prompt": prompts, "n_predict": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    d = r.json()
    assert isinstance(d, list) and [x["index"] for x in d] == [0, 1]
    assert [x["content"] for x in d] == want
    assert [x["tokens_evaluated"] for x in d] == [len(p) for p in prompts]
    d = srv.http.post("/completion", json={
        "prompt": PROMPT, "n_predict": 4, "temperature": 0,
        "response_fields": ["content", "generation_settings/n_predict", "nope/x"]}).json()
    assert d == {"content": want[0], "generation_settings/n_predict": 4}
    r = srv.http.post("/completion", json={"prompt": prompts, "n_predict": 4, "stream": True})
    assert r.status_code == 400 and "batch" in r.text


def test_unsatisfiable_grammar_fails_only_its_request(srv):
    """A grammar no token can continue (a token terminal outside the vocabulary) ends its own
    request with an error while a stream beside it runs to the end."""
    import json

    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}
    with srv.http.stream("POST", "/v1/completions", json=body) as r:
        it = r.iter_lines()
        first = next(line for line in it if line.startswith("data: {"))
        bad = srv.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4,
                                                     "grammar": "root ::= <[99999]>"})
        rest = [line for line in it if line.startswith("data: ")]
    assert bad.status_code == 500 and "sampling failed" in bad.json()["error"]["message"]
    chunks = [json.loads(x[6:]) for x in [first] + rest if x != "data: [DONE]"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert srv.state.scheduler.error is None
    assert _complete(srv, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_n_streamed_choices_interleave(srv):
    import json

    one = _complete(srv, max_tokens=6)["choices"][0]["text"]
    with srv.http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6,
                                                          "temperature": 0, "n": 3,
                                                          "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    texts = ["", "", ""]
    finishes = [None] * 3
    for line in lines[:-1]:
        ch = json.loads(line[6:])["choices"][0]
        texts[ch["index"]] += ch["text"]
        finishes[ch["index"]] = ch["finish_reason"] or finishes[ch["index"]]
    assert texts == [one] * 3 and finishes == ["length"] * 3


# ---------------------------------------------------------------------------- llama.cpp's cases
# test_grammar / test_schema of llama.cpp 0c1e570's tests/test-grammar-integration.cpp (extracted
# by tests/data/extract_llamacpp_grammar_cases.py): strings its grammar engine must match and
# must not, run as its match_string does (text one code point at a time as token 0, token(id)
# markers as that token with the piece "<[id]>").
def _load_integration():
    import json
    from pathlib import Path

    path = Path(__file__).parent / "data" / "llamacpp_grammar_integration.json"
    return json.loads(path.read_text(encoding="utf-8"))


INTEGRATION = _load_integration()


def _match_string(m: gbnf.Matcher, parts: list) -> bool:
    st = m.initial()
    for kind, v in parts:
        if kind == "t":
            pieces = [(v, f"<[{v}]>".encode())]
        else:
            text = bytes.fromhex(v).decode("utf-8", "replace")
            pieces = [(0, c.encode()) for c in text]
        for tok, piece in pieces:
            st = m.feed_token(st, tok, piece)
            if st is None:
                return False
    return m.can_end(st)


@pytest.mark.parametrize("case", INTEGRATION,
                         ids=[f"{i}-{c['name']}" for i, c in enumerate(INTEGRATION)])
def test_llamacpp_grammar_integration_cases(case):
    import json

    from jllama.server.json_schema import schema_to_grammar

    text = case["text"] if case["kind"] == "grammar" else schema_to_grammar(json.loads(case["text"]))
    m = gbnf.Matcher(gbnf.Grammar(text))
    for parts in case["pass"]:
        assert _match_string(m, parts), parts
    for parts in case["fail"]:
        assert not _match_string(m, parts), parts


def _parser_cases():
    import json
    from pathlib import Path

    path = Path(__file__).parent / "data" / "llamacpp_grammar_parser.json"
    return json.loads(path.read_text(encoding="utf-8"))


PARSER_CASES = _parser_cases()


def _flat(g: gbnf.Grammar) -> list[list]:
    """Our rules as llama.cpp's flat element arrays (llama_grammar_element types/values)."""
    out = []
    for alts in g.rules:
        for k, alt in enumerate(alts):
            if k:
                out.append(["ALT", 0])
            for el in alt:
                if el[0] == gbnf.REF:
                    out.append(["RULE_REF", el[1]])
                elif el[0] == gbnf.TOK:
                    out.append(["TOKEN_NOT" if el[1] else "TOKEN", el[2]])
                elif el[2] == ((0, 0xFFFFFFFF),) and not el[1]:
                    out.append(["CHAR_ANY", 0])
                else:
                    for j, (lo, hi) in enumerate(el[2]):
                        out.append(["CHAR_ALT" if j else ("CHAR_NOT" if el[1] else "CHAR"), lo])
                        if hi != lo:
                            out.append(["CHAR_RNG_UPPER", hi])
        out.append(["END", 0])
    return out


@pytest.mark.parametrize("case", PARSER_CASES, ids=[str(i) for i in range(len(PARSER_CASES))])
def test_llamacpp_grammar_parser_cases(case):
    """llama.cpp's test-grammar-parser: the same symbol ids and rule elements (the rewrite of
    repetitions into helper rules included), and the same refusals."""
    if not case["ok"]:
        with pytest.raises(gbnf.GrammarError):
            gbnf.Grammar(case["grammar"])
        return
    g = gbnf.Grammar(case["grammar"])
    assert {v: k for k, v in g.names.items()} == case["symbols"]
    assert _flat(g) == case["elements"]


@pytest.mark.parametrize("top_k,top_p,min_p,temp", [(40, 0.95, 0.05, 0.8), (0, 0.5, 0.0, 1.0),
                                                    (5, 1.0, 0.2, 1.5), (40, 0.95, 0.05, 0.0)])
def test_post_sampling_probs_are_llamacpps_chain(top_k, top_p, min_p, temp):
    """post_sampling_probs lists what llama.cpp's sampler chain (top-k, top-p, min-p,
    temperature, dist) leaves and the probabilities it draws with, on the same logits."""
    import ctypes

    from llamacpp_oracle import llama_cpp_module

    from jllama.engine.sampling import SamplingParams
    from jllama.server.scheduler import post_sampling_probs

    low = llama_cpp_module().llama_cpp
    logits = np.random.default_rng(3).normal(0, 2, 300).astype(np.float32)
    chain = low.llama_sampler_chain_init(low.llama_sampler_chain_default_params())
    for s in (low.llama_sampler_init_top_k(top_k), low.llama_sampler_init_top_p(top_p, 1),
              low.llama_sampler_init_min_p(min_p, 1), low.llama_sampler_init_temp(temp),
              low.llama_sampler_init_dist(1234)):
        low.llama_sampler_chain_add(chain, s)
    arr = (low.llama_token_data * len(logits))(
        *[low.llama_token_data(i, float(v), 0.0) for i, v in enumerate(logits)])
    ta = low.llama_token_data_array(arr, len(logits), -1, False)
    low.llama_sampler_apply(chain, ctypes.byref(ta))
    want = [(arr[i].id, arr[i].p) for i in range(ta.size) if arr[i].p > 0]
    chosen = arr[ta.selected].id
    low.llama_sampler_free(chain)
    p = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p)
    got = post_sampling_probs(logits, p, chosen, 1000, lambda t: b"x")
    assert [e["id"] for e in got["top_probs"]] == [i for i, _ in want]
    assert [e["prob"] for e in got["top_probs"]] == pytest.approx([q for _, q in want],
                                                                  abs=1e-6)
    assert got["prob"] == pytest.approx(dict(want)[chosen], abs=1e-6)

