"""Server pieces that need no model: JSON constraint, tool-call parsing, request validation,
metrics, and the scheduler's slot bookkeeping driven by a fake engine.

Expected values come from independent references: ``json.loads`` for the JSON recognizer,
hand-written OpenAI payloads for the parsers, and the fake engine's own token rule for the
scheduler.
"""

from __future__ import annotations

import json
import random
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from jllama.server import grammar as g
from jllama.server import openai_schema as oa
from jllama.server import tools as tl
from jllama.server.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- JSON recognizer
VALID = ['{}', '{"a": 1}', '{ "k" : "v" , "n":-12.0E+5}', '{"é": "ü", "e": "\\u00e9\\n"}',
         '{"a": [1, 2.5e-3, -0, true, false, null, "x"], "b": {"c": {}, "d": []}}']
INVALID = ['[]', '"x"', '{"a" 1}', '{"a": 01}', '{"a": tru}', '{a: 1}', '{"a": 1,}',
           '{"a": "\x01"}', '{"a": 1}}', '{"a": .5}', '{"a": 1.}', '{"a": "\\x"}']


@pytest.mark.parametrize("doc", VALID)
def test_json_recognizer_accepts_every_prefix_of_valid_json(doc):
    assert isinstance(json.loads(doc), dict)
    s = g.initial()
    for i, b in enumerate(doc.encode()):
        assert not g.is_done(s) or doc[i:].strip() == ""
        s = g.step(s, b)
        assert s is not None, f"rejected at byte {i} of {doc!r}"
    assert g.is_done(s)


@pytest.mark.parametrize("doc", INVALID)
def test_json_recognizer_rejects_invalid_json(doc):
    s = g.feed(g.initial(), doc.encode())
    assert s is None or not g.is_done(s)


def test_json_recognizer_done_implies_json_loads():
    """Random walks over JSON's alphabet: whenever the recognizer says 'complete', json.loads
    must parse the bytes into an object."""
    rng = random.Random(0)
    alphabet = list(b'{}[]",:0123456789.-+eEtrufalsn \\')
    done = 0
    for _ in range(30000):
        s, buf = g.initial(), bytearray()
        for _ in range(rng.randint(1, 12)):
            c = rng.choice(alphabet)
            nxt = g.step(s, c)
            if nxt is None:
                break
            s = nxt
            buf.append(c)
        if g.is_done(s):
            done += 1
            assert isinstance(json.loads(buf.decode()), dict), buf
    assert done > 10


def test_constraint_pick_masks_invalid_tokens():
    vocab = [b"", b"{", b'"a"', b":", b" 1", b"}", b"hello", b"{}", b"\n"]
    c = g.JsonConstraint(vocab, eog=frozenset({0}))
    logits = np.array([5.0, 1.0, 0, 0, 0, 0, 9.0, 2.0, 0])
    rng = np.random.default_rng(0)
    assert c.pick(6, logits, 0.0, 1.0, rng) == 7  # "hello" is invalid, best valid is "{}"
    assert c.pick(1, logits, 0.0, 1.0, rng) == 1  # a valid draw is kept
    c.advance(7)
    assert c.done
    assert c.pick(6, logits, 0.0, 1.0, rng) == 0  # complete: only end-of-generation remains
    with pytest.raises(ValueError):
        g.JsonConstraint(vocab, frozenset({0})).advance(6)


SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                      "units": {"enum": ["c", "f"]}},
     "required": ["city", "days", "units"]},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "number"}},
                                      "ok": {"type": "boolean"}, "o": {"type": "object"},
                                      "any": {}, "n": {"type": "null"}}},
]


@pytest.mark.parametrize("doc,si", [
    ({"city": 'Paris "x" é', "days": 3, "units": "f"}, 0),
    ({"xs": [1, 2.5, -3e2], "ok": True, "o": {"a": [1, {"b": None}]}, "any": 12, "n": None}, 1),
    ({"xs": [], "ok": False, "o": {}, "any": [1, "s"], "n": None}, 1),
])
def test_schema_constraint_accepts_canonical_documents(doc, si):
    st = g.schema_feed(g.schema_initial(g.compile_schema(SCHEMAS[si])),
                       json.dumps(doc, ensure_ascii=False).encode())
    assert st == ()  # complete


@pytest.mark.parametrize("text", ['{"city": 3, "days": 3, "units": "c"}', '{"days": 3}',
                                  '{"city": "a", "days": 3.5, "units": "c"}',
                                  '{"city": "a", "days": -01, "units": "c"}',
                                  '{"city": "a", "days": 3, "units": "k"}'])
def test_schema_constraint_rejects_violations(text):
    assert g.schema_feed(g.schema_initial(g.compile_schema(SCHEMAS[0])), text.encode()) is None


@pytest.mark.parametrize("si", [0, 1])
def test_schema_constraint_completions_validate(si):
    """Random walks through allowed bytes: every completed output is JSON that the schema
    accepts (checked by the jsonschema package)."""
    import jsonschema

    node, rng, done = g.compile_schema(SCHEMAS[si]), random.Random(si), 0
    alphabet = list(b'{}[]",:0123456789.-+eEtrufalsn \\abcdiyxok')
    for _ in range(500):
        st, buf = g.schema_initial(node), bytearray()
        for _ in range(60):
            opts = [c for c in alphabet if g.schema_step(st, c) is not None]
            if not opts or st == ():
                break
            c = rng.choice(opts)
            st = g.schema_step(st, c)
            buf.append(c)
        if st == ():
            done += 1
            jsonschema.validate(json.loads(buf.decode()), SCHEMAS[si])
    assert done > 5


# ---------------------------------------------------------------------------- tool calls
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def test_parse_hermes_tool_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    content, calls = tl.parse_tool_calls(text, TOOLS)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)


@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
    '```json\n{"name": "get_weather", "parameters": {"city": "Oslo"}}\n```',
    '[{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}]',
    '{"tool_calls": [{"type": "function", "function": {"name": "get_weather", '
    '"arguments": {"city": "Oslo"}}}]}',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}',  # unclosed at the end
])
def test_parse_json_fallback_tool_calls(text):
    content, calls = tl.parse_tool_calls(text, TOOLS)
    assert content is None
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}


@pytest.mark.parametrize("text", ["The weather is nice.", '{"name": "unknown", "arguments": {}}',
                                  '{"city": "Oslo"}', "<tool_call>{broken</tool_call>"])
def test_parse_plain_text_is_not_a_tool_call(text):
    assert tl.parse_tool_calls(text, TOOLS) == (text, [])


def _stream(pieces):
    ts = tl.ToolStream(TOOLS)
    shown = "".join(ts.feed(p) for p in pieces)
    rest, calls = ts.finish()
    return shown + rest, calls


def test_tool_stream_holds_back_calls_and_releases_text():
    shown, calls = _stream(["Sure", ", one moment. <tool", "_call>{\"name\": \"add\", ",
                            "\"arguments\": {\"a\": 2}}</tool_call>"])
    assert shown.strip() == "Sure, one moment."
    assert calls[0]["function"]["name"] == "add"
    shown, calls = _stream(["Plain ", "answer with <tool", " in it"])
    assert (shown, calls) == ("Plain answer with <tool in it", [])
    shown, calls = _stream(["{\"not\": ", "\"a call\"}"])
    assert (shown, calls) == ('{"not": "a call"}', [])


def test_prepare_messages_without_template_tool_support():
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    out, tools = tl.prepare_messages(msgs, TOOLS, "auto", "{{ messages }}")
    assert tools is None
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert '"city": "Rome"' in out[2]["content"] and "<tool_call>" in out[2]["content"]
    assert "sunny" in out[3]["content"]
    same, tools = tl.prepare_messages(msgs, TOOLS, "auto", "{% for t in tools %}{% endfor %}")
    assert same is msgs and tools is TOOLS
    prefix, name = tl.forced_prefix({"type": "function", "function": {"name": "add"}}, TOOLS)
    assert name == "add" and prefix.endswith('"arguments": ')


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("body,param", [
    ({"temperature": "hot"}, "temperature"), ({"temperature": 3}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"), ({"stop": 5}, "stop"), ({"n": 0}, "n"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"), ({"logit_bias": {"5": "big"}}, "logit_bias"),
    ({"logit_bias": [[5, 1, 2]]}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"response_format": {"type": "xml"}}, "response_format"), ({"seed": 1.5}, "seed"),
])
def test_invalid_fields_name_the_param(body, param):
    with pytest.raises(oa.ApiError) as ei:
        oa.parse_common(body, n_vocab=1000)
    assert ei.value.status == 400 and ei.value.param == param
    err = ei.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"}


def test_valid_fields_map_to_sampling_params():
    o = oa.parse_common({"temperature": 0, "top_p": 0.5, "seed": 7, "max_tokens": 9,
                         "stop": "x", "logit_bias": {"5": -100, "6": 3}, "stream": True,
                         "stream_options": {"include_usage": True}}, n_vocab=1000)
    assert o.params.temperature == 0 and o.params.top_p == 0.5 and o.params.seed == 7
    assert o.max_tokens == 9 and o.stop == ["x"] and o.include_usage
    assert o.params.logit_bias[5] < -1e8 and o.params.logit_bias[6] == 3


def test_llama_servers_further_sampler_fields():
    """server-schema.cpp: typical_p, top_n_sigma, xtc_*, dynatemp_*, min_keep, mirostat* and
    dry_* reach the sampler; soft limits (xtc, mirostat) clamp rather than refuse, DRY's
    lengths are hard limits, a dry_base below 1 takes the default and the breakers must be a
    non-empty list of strings."""
    o = oa.parse_common({"typical_p": 0.7, "top_n_sigma": 1.5, "xtc_probability": 3,
                         "xtc_threshold": -1, "dynatemp_range": 0.3, "dynatemp_exponent": 2,
                         "min_keep": 4}, n_vocab=1000)
    p = o.params
    assert (p.typical_p, p.top_n_sigma, p.xtc_probability, p.xtc_threshold) == (0.7, 1.5, 1, 0)
    assert (p.dynatemp_range, p.dynatemp_exponent, p.min_keep) == (0.3, 2.0, 4)
    assert p.uses_extended() and not oa.parse_common({}, n_vocab=1000).params.uses_extended()
    p = oa.parse_common({"mirostat": 7, "mirostat_tau": 3, "mirostat_eta": 0.2},
                        n_vocab=1000).params
    assert (p.mirostat, p.mirostat_tau, p.mirostat_eta) == (2, 3.0, 0.2) and p.uses_extended()
    assert oa.parse_common({"mirostat": -1}, n_vocab=1000).params.mirostat == 0
    p = oa.parse_common({"dry_multiplier": 0.8, "dry_base": 0.5, "dry_allowed_length": 3,
                         "dry_penalty_last_n": 128, "dry_sequence_breakers": ["\n", "::"]},
                        n_vocab=1000).params
    assert (p.dry_multiplier, p.dry_base, p.dry_allowed_length, p.dry_penalty_last_n) == \
        (0.8, 1.75, 3, 128)
    assert p.dry_sequence_breakers == ("\n", "::") and p.uses_dry() and p.uses_extended()
    for body in ({"dry_allowed_length": -1}, {"dry_penalty_last_n": -1},
                 {"dry_sequence_breakers": []}, {"dry_sequence_breakers": "\n"},
                 {"dry_sequence_breakers": [1]}):
        with pytest.raises(oa.ApiError) as ei:
            oa.parse_common(body, n_vocab=1000)
        assert ei.value.status == 400 and ei.value.param == next(iter(body))
    # DRY only when on, and never under mirostat (its chain has no DRY)
    assert not oa.parse_common({"dry_multiplier": 0.8, "mirostat": 1},
                               n_vocab=1000).params.uses_dry()
    assert not oa.parse_common({"dry_multiplier": 0.8, "dry_penalty_last_n": 0},
                               n_vocab=1000).params.uses_dry()


def test_logit_bias_in_llama_servers_forms():
    """llama-server's logit_bias (server-schema.cpp): an object or a list of [key, bias]
    pairs; a key is a token id or a text standing for each of its tokens (tokenized without
    BOS); false bans the token."""
    def tokenize(text):
        return {"hello": [7, 8]}[text]

    for lb in ({"5": 2.5, "hello": -1, "9": False}, [[5, 2.5], ["hello", -1], [9, False]]):
        o = oa.parse_common({"logit_bias": lb}, n_vocab=1000, tokenize=tokenize)
        assert o.params.logit_bias == {5: 2.5, 7: -1.0, 8: -1.0, 9: float("-inf")}


def test_n_predict_wins_over_max_tokens():
    """llama-server reads n_predict first and max_tokens / max_completion_tokens as its
    aliases; -1 (unlimited) falls back to the server's -n."""
    from jllama.server.app import Handlers

    def h(n_predict):
        state = types.SimpleNamespace(settings=types.SimpleNamespace(
            defaults={}, n_predict=n_predict, cache_prompt=True))
        return Handlers(state)

    assert h(None).with_defaults({"max_tokens": 5, "n_predict": 9})["max_tokens"] == 9
    assert h(None).with_defaults({"max_completion_tokens": 5})["max_completion_tokens"] == 5
    assert h(12).with_defaults({"max_tokens": 5, "n_predict": -1})["max_tokens"] == 12
    assert "max_tokens" not in h(-1).with_defaults({"max_tokens": 5, "n_predict": -1})
    assert h(12).with_defaults({})["max_tokens"] == 12
    with pytest.raises(oa.ApiError) as ei:
        h(None).with_defaults({"n_predict": "ten"})
    assert ei.value.param == "n_predict"


def test_messages_and_tools_validation():
    with pytest.raises(oa.ApiError):
        oa.parse_messages({"messages": []})
    with pytest.raises(oa.ApiError):
        oa.parse_messages({"messages": [{"role": "robot", "content": "x"}]})
    msgs = oa.parse_messages({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]}]})
    assert msgs == [{"role": "system", "content": "ab"}]
    with pytest.raises(oa.ApiError):
        oa.parse_tools({"tools": TOOLS, "tool_choice": {"type": "function",
                                                        "function": {"name": "nope"}}})
    assert oa.parse_tools({"tools": TOOLS, "tool_choice": "none"}) == (None, "none")


def test_metrics_render_is_prometheus_text():
    m = Metrics()
    m.generated_tokens = 5
    m.observe_step(4, 0.01)
    m.observe_request("/v1/completions", 200)
    m.observe_latency(0.3, 0.1)
    text = m.render()
    assert "jllama_tokens_generated_total 5" in text
    assert 'jllama_requests_total{endpoint="/v1/completions",status="200"} 1' in text
    assert 'jllama_request_duration_seconds_bucket{le="0.5"} 1' in text
    assert 'jllama_request_duration_seconds_bucket{le="0.25"} 0' in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.split(" ")) == 2, line


# ---------------------------------------------------------------------------- scheduler
V = 64


class FakeEngine:
    """Deterministic stand-in: a slot's next token depends only on its own last token, its
    PRNG key and step, so batch neighbours must not change a request's output."""

    def __init__(self, n_slots: int, ctx_size: int = 64):
        import jax.numpy as jnp

        self.n_slots, self.ctx_size = n_slots, ctx_size
        self.pos = np.zeros(n_slots, np.int32)
        self.tokens = [[] for _ in range(n_slots)]
        self.history = jnp.full((n_slots, 8), -1, jnp.int32)
        self.mu = np.zeros(n_slots, np.float32)  # mirostat state, as the Engine keeps it
        self.batch_sizes: list[int] = []
        self.cuts: list[list[int]] = [[] for _ in range(n_slots)]  # prefill lengths per slot

    def common_prefix(self, ids, slot):
        n = 0
        for a, b in zip(self.tokens[slot], ids):
            if a != b:
                break
            n += 1
        return n

    def rewind(self, slot, n):
        self.pos[slot] = n
        del self.tokens[slot][n:]

    def prefill(self, toks, slot):
        import jax.numpy as jnp

        self.cuts[slot].append(len(toks))
        self.tokens[slot] += list(toks)
        self.pos[slot] += len(toks)
        logits = np.full(V, -10.0, np.float32)
        logits[3 + sum(self.tokens[slot]) % (V - 3)] = 10.0
        return jnp.asarray(logits)

    def step(self, tokens, active, sp, keys, steps, bias=None, dry=None, host=None):
        self.batch_sizes.append(int(active.sum()))
        keys = np.asarray(keys)
        nxt = (tokens * 7 + steps + keys[:, 1].astype(np.int64)) % (V - 3) + 3
        for b in np.nonzero(active)[0]:
            self.tokens[b].append(int(tokens[b]))
        self.pos[active] += 1
        time.sleep(0.002)
        return nxt.astype(np.int32), np.zeros((self.n_slots, V), np.float32)


class FakeTok:
    n_vocab = V

    def is_eog(self, i):
        return i == 2

    def token_to_piece(self, i, special=True):
        return f"<{i}>".encode()

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


class FakeDecoder:
    def __init__(self, tok):
        pass

    def feed(self, i):
        return f"<{i}>"

    def flush(self):
        return ""


@pytest.fixture
def fake_scheduler(monkeypatch):
    import jllama.tokenizer as jt
    from jllama.server.scheduler import Scheduler

    monkeypatch.setattr(jt, "StreamDecoder", FakeDecoder, raising=False)
    llm = types.SimpleNamespace(engine=FakeEngine(4), tokenizer=FakeTok(),
                                spec=types.SimpleNamespace(n_vocab=V))
    sch = Scheduler(llm, max_queue=4)
    sch.start()
    yield sch
    sch.stop()


def _run(sch, prompt, n, seed, stop=(), cancel_after=None):
    from jllama.engine.sampling import SamplingParams
    from jllama.server.scheduler import GenRequest

    out, done = [], threading.Event()
    box = {}

    def sink(ev):
        if ev.kind == "text":
            out.append(ev.text)
            if cancel_after is not None and len(out) >= cancel_after:
                req.cancel()
        else:
            box["ev"] = ev
            done.set()

    req = GenRequest(list(prompt), n, SamplingParams(temperature=1.0, seed=seed), list(stop),
                     sink)
    sch.submit(req)
    return req, out, done, box


def test_scheduler_batches_and_isolates_requests(fake_scheduler):
    sch = fake_scheduler
    _, alone, done, box = _run(sch, [5, 6, 7], 12, seed=3)
    assert done.wait(30) and box["ev"].finish == "length" and len(alone) == 12
    runs = [_run(sch, [5, 6, 7] if i == 0 else [9, i], 12 + 5 * i, seed=3 + i) for i in range(4)]
    for run in runs:
        assert run[2].wait(30)
    assert runs[0][1] == alone  # same seed and prompt, different neighbours: same tokens
    assert max(sch.engine.batch_sizes) == 4  # the four were decoded together
    assert [len(r[1]) for r in runs] == [12, 17, 22, 27]
    assert runs[0][3]["ev"].cached_tokens == 2  # prompt prefix reused from the first run
    time.sleep(0.05)
    assert sch.busy_slots() == 0


def test_scheduler_cuts_prompts_where_the_engine_does(monkeypatch):
    """Busy or idle, a prompt is prefilled in the chunks ``Engine.prefill`` cuts for a lone
    request (a GEMM rounds differently per chunk shape, so other cuts can flip a near-tie and
    change a greedy answer under load), at most one chunk per loop iteration."""
    import jllama.tokenizer as jt
    from jllama.engine.engine import PREFILL_CHUNK
    from jllama.server.scheduler import Scheduler

    monkeypatch.setattr(jt, "StreamDecoder", FakeDecoder, raising=False)
    eng = FakeEngine(4, ctx_size=8 * PREFILL_CHUNK)
    llm = types.SimpleNamespace(engine=eng, tokenizer=FakeTok(), spec=types.SimpleNamespace(n_vocab=V))
    sch = Scheduler(llm, max_queue=8)
    sizes = [2 * PREFILL_CHUNK + 276, PREFILL_CHUNK + 188, 37, 38]
    per_iter = []
    orig = sch._prefill

    def counted():
        before = sum(map(sum, eng.cuts))
        orig()
        per_iter.append(sum(map(sum, eng.cuts)) - before)

    sch._prefill = counted
    sch.start()
    try:
        with sch.cv:  # all four arrive together
            runs = [_run(sch, [3 + (i + j) % 50 for j in range(n)], 3, seed=i)
                    for i, n in enumerate(sizes)]
        for run in runs:
            assert run[2].wait(30)
    finally:
        sch.stop()
    want = [[PREFILL_CHUNK] * (n // PREFILL_CHUNK) + [n % PREFILL_CHUNK] for n in sizes]
    assert sorted(c for c in eng.cuts if c) == sorted(want)
    assert max(per_iter) <= PREFILL_CHUNK


def test_scheduler_full_context_is_length(monkeypatch):
    """A request that fills its slot's context ends with "length" (not "stop"), with or without
    max_tokens, and the slot is free again."""
    import jllama.tokenizer as jt
    from jllama.server.scheduler import Scheduler

    monkeypatch.setattr(jt, "StreamDecoder", FakeDecoder, raising=False)
    eng = FakeEngine(2, ctx_size=16)
    llm = types.SimpleNamespace(engine=eng, tokenizer=FakeTok(), spec=types.SimpleNamespace(n_vocab=V))
    sch = Scheduler(llm, max_queue=4)
    sch.start()
    try:
        for max_tokens in (None, 1000):
            _, out, done, box = _run(sch, [5, 6, 7], max_tokens, seed=3)
            assert done.wait(30) and box["ev"].finish == "length"
            # llama-server's rule: it ends once prompt + generated tokens reach the context
            # (its test_ctx_shift_disabled_short_prompt: 8 + 248 = 256)
            assert box["ev"].completion_tokens == len(out) == 16 - 3
            assert box["ev"].truncated
        t0 = time.monotonic()
        while sch.busy_slots() and time.monotonic() - t0 < 10:  # freed right after "done"
            time.sleep(0.01)
        assert sch.busy_slots() == 0
    finally:
        sch.stop()


def test_scheduler_stop_strings_cancel_and_queue_limit(fake_scheduler):
    sch = fake_scheduler
    _, out, done, box = _run(sch, [5, 6, 7], 20, seed=3)
    assert done.wait(30)
    full = "".join(out)
    stop = full[10:16]
    _, out, done, box = _run(sch, [5, 6, 7], 20, seed=3, stop=[stop])
    assert done.wait(30) and box["ev"].finish == "stop"
    assert "".join(out) == full[: full.find(stop)]
    # a cancelled request frees its slot without a final event
    req, out, done, _ = _run(sch, [1, 2], 10_000, seed=1, cancel_after=3)
    t0 = time.monotonic()
    while (sch.metrics.cancelled == 0 or sch.busy_slots()) and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert sch.busy_slots() == 0 and not done.is_set() and sch.metrics.cancelled == 1
    # the queue holds at most max_queue waiting requests
    from jllama.server.scheduler import QueueFull

    with sch.cv:  # freeze the loop so nothing is admitted meanwhile
        for _ in range(4):
            _run(sch, [1], 1, seed=0)
        with pytest.raises(QueueFull):
            _run(sch, [1], 1, seed=0)


# ---------------------------------------------------------------------------- CLI
def test_serve_cli_flags_become_config(tmp_path):
    from jllama.cli.main import build_parser
    from jllama.cli.serve import _overrides, _slot_ctx
    from jllama.config import load_config

    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("model: smollm2-135m-instruct\nserver: {port: 9000, parallel: 2}\n")
    args = build_parser().parse_args(["serve", str(cfg_file), "--parallel", "4", "-c", "1024",
                                      "--api-key", "k", "--max-queue", "3", "--timeout", "9"])
    cfg = load_config(args.config, _overrides(args))
    _slot_ctx(cfg, args)
    assert (cfg.server.port, cfg.server.parallel, cfg.server.max_queue) == (9000, 4, 3)
    # llama-server's -c: the context of all slots together
    assert cfg.server.timeout == 9.0 and cfg.runtime.ctx_size == 1024 // 4
    assert args.api_key == "k"
    shipped = load_config(REPO / "configs" / "serve-smollm2.yaml")
    assert shipped.server.parallel == 4


def test_serve_cli_rejects_bad_values(tmp_path):
    from jllama.cli.main import main

    assert main(["serve", "-m", "smollm2-135m-instruct", "--parallel", "0"]) == 1


def test_serve_takes_llama_server_flags():
    """The argv llama.cpp's server test suite builds for its tinyllama2 preset (utils.py), read
    with llama-server's meanings (test_basic's asserts): -c is all slots together, -n/--temp/
    --seed are request defaults, --no-slots turns GET /slots off, an alias list's id is its
    alphabetically first name."""
    from jllama.cli.main import build_parser
    from jllama.cli.serve import _overrides, _slot_ctx, settings_from_config
    from jllama.config import load_config

    argv = ["serve", "--port", "8080", "--temp", "0.8", "--seed", "42", "--host", "127.0.0.1",
            "--model", "m.gguf", "--batch-size", "32", "--no-slots", "--alias",
            "tinyllama-2,fim,code", "--tags", "chat,fim", "--ctx-size", "512", "--parallel",
            "2", "--n-predict", "64", "--no-jinja", "-cb", "--metrics", "-fa", "auto", "-ngl",
            "0", "-ctk", "q8_0", "-ctv", "q8_0", "--api-key", "a,b"]
    args = build_parser().parse_args(argv)
    cfg = load_config(None, _overrides(args))
    _slot_ctx(cfg, args)
    assert getattr(args, "_refused", None) is None
    assert (cfg.server.parallel, cfg.runtime.ctx_size, cfg.server.n_predict) == (2, 256, 64)
    assert cfg.runtime.flash_attn and cfg.runtime.cache_type_k == cfg.runtime.cache_type_v \
        == "q8_0"
    st = settings_from_config(cfg, args.alias, ["a", "b"], args.tags.split(","))
    assert st.model_alias == "code" and set(st.aliases) == {"tinyllama-2", "fim", "code"}
    assert st.metrics and not st.slots and st.n_predict == 64 and st.keys() == ["a", "b"]
    assert st.defaults["temperature"] == 0.8 and st.defaults["seed"] == 42
    args = build_parser().parse_args(["serve", "-m", "m.gguf", "--typical", "0.5",
                                      "--top-nsigma", "1", "--xtc-probability", "0.2",
                                      "--xtc-threshold", "0.2", "--dynatemp-range", "0.1",
                                      "--dynatemp-exp", "1.5", "--min-keep", "2"])
    st = settings_from_config(load_config(None, _overrides(args)), "m", [])
    assert {k: st.defaults[k] for k in ("typical_p", "top_n_sigma", "xtc_probability",
                                        "xtc_threshold", "dynatemp_range",
                                        "dynatemp_exponent", "min_keep")} == \
        {"typical_p": 0.5, "top_n_sigma": 1.0, "xtc_probability": 0.2, "xtc_threshold": 0.2,
         "dynatemp_range": 0.1, "dynatemp_exponent": 1.5, "min_keep": 2}
    args = build_parser().parse_args(["serve", "-m", "m.gguf", "--mirostat", "1",
                                      "--mirostat-lr", "0.2", "--mirostat-ent", "3",
                                      "--dry-multiplier", "0.5", "--dry-base", "2",
                                      "--dry-allowed-length", "4", "--dry-penalty-last-n", "9",
                                      "--dry-sequence-breaker", "::"])
    assert getattr(args, "_refused", None) is None
    st = settings_from_config(load_config(None, _overrides(args)), "m", [])
    assert {k: st.defaults[k] for k in ("mirostat", "mirostat_eta", "mirostat_tau",
                                        "dry_multiplier", "dry_base", "dry_allowed_length",
                                        "dry_penalty_last_n", "dry_sequence_breakers")} == \
        {"mirostat": 1, "mirostat_eta": 0.2, "mirostat_tau": 3.0, "dry_multiplier": 0.5,
         "dry_base": 2.0, "dry_allowed_length": 4, "dry_penalty_last_n": 9,
         "dry_sequence_breakers": ["::"]}
    args = build_parser().parse_args(["serve", "-m", "m.gguf", "-c", "512", "--kv-unified",
                                      "-np", "4", "-s", "-1"])
    cfg = load_config(None, _overrides(args))
    _slot_ctx(cfg, args)
    assert cfg.runtime.ctx_size == 512 and cfg.generation.sampling.seed is None
    # test_slot_save / test_ctx_shift presets: --slot-save-path (a directory, kept with a
    # trailing separator as llama-server does), --context-shift, --swa-full; off by default
    st = settings_from_config(load_config(None, _overrides(build_parser().parse_args(
        ["serve", "-m", "m.gguf"]))), "m", [])
    assert (st.context_shift, st.swa_full, st.slot_save_path) == (False, False, None)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        args = build_parser().parse_args(["serve", "-m", "m.gguf", "--slot-save-path", d,
                                          "--context-shift", "--swa-full"])
        st = settings_from_config(load_config(None, _overrides(args)), "m", [])
        assert st.context_shift and st.swa_full and st.slot_save_path == d + "/"


def test_completion_prompt_forms():
    """llama-server's prompt forms (server-common.cpp tokenize_input_prompts/tokenize_mixed):
    BOS only when the first element is a string; {"prompt_string"}; multimodal data refused."""
    from jllama.server.app import prompt_ids
    from jllama.server.openai_schema import ApiError

    class Tok:
        def encode(self, text, add_special=False, parse_special=False):
            return ([1] if add_special else []) + [100 + ord(c) % 50 for c in text]

    st = types.SimpleNamespace(llm=types.SimpleNamespace(tokenizer=Tok(),
                                                         spec=types.SimpleNamespace(n_vocab=200)))
    ab = [100 + ord("a") % 50, 100 + ord("b") % 50]
    assert prompt_ids(st, "ab") == [1, *ab]
    assert prompt_ids(st, ["ab"]) == [1, *ab]
    assert prompt_ids(st, [5, 6]) == [5, 6] and prompt_ids(st, [[5, 6]]) == [5, 6]
    assert prompt_ids(st, ["ab", 7, "ab"]) == [1, *ab, 7, *ab]
    assert prompt_ids(st, [7, "ab"]) == [7, *ab]
    assert prompt_ids(st, {"prompt_string": "ab"}) == [1, *ab]
    for bad in ({"prompt_string": "ab", "multimodal_data": ["x"]}, [5, 999], [], None, 3.5,
                [[1], [2]]):
        with pytest.raises(ApiError) as e:
            prompt_ids(st, bad)
        assert e.value.status == 400 and e.value.param == "prompt"
