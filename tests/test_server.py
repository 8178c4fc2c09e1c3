"""End to end: the real server on 127.0.0.1 with SmolLM2, 4 slots, driven by the real ``openai``
client (and httpx for raw HTTP), responses validated against OpenAI's published spec.

One server for the module. References come from outside the server: greedy outputs of the same
engine computed before the server starts (single sequence, no batching), token counts from the
oracle's tokenizer (llama-cpp-python), and the OpenAPI schemas from OpenAI's spec (fixture
``openai_spec_path``: ``shared/data/openai``, or the copy vendored in ``tests/data``).
"""

from __future__ import annotations

import copy
import json
import random
import threading
import time

import httpx
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

KEY = "test-key-123"
CTX = 512
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three colors.", "Say hello in Spanish."]
REF_TOKENS = 16


def _msgs(p: str) -> list[dict]:
    return [{"role": "user", "content": p}]


@pytest.fixture(scope="module")
def server():
    from jllama.api import Llama
    from jllama.engine.sampling import SamplingParams
    from jllama.server.app import ServerSettings, ServerState, ServerThread, render_prompt

    llm = Llama("smollm2-135m-instruct", ctx_size=CTX, n_slots=4)
    # single-sequence greedy references, computed before the scheduler owns the engine
    refs = {}
    for p in PROMPTS:
        llm.engine.reset()  # no prompt-cache reuse: the server requests below disable it too
        ids = llm.tokenizer.encode(render_prompt(llm, _msgs(p), None), add_special=True,
                                   parse_special=True)
        c = llm.complete(ids, REF_TOKENS, SamplingParams.greedy())
        refs[p] = (ids, c.tokens)
    llm.engine.reset()
    state = ServerState(llm, ServerSettings("smollm2", api_key=KEY, max_queue=32, timeout=120))
    with ServerThread(state) as s:
        s.refs = refs
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def oracle_tok():
    llama_cpp = pytest.importorskip("llama_cpp")
    from jllama.registry import fetch

    return llama_cpp.Llama(str(fetch("smollm2-135m-instruct")), n_ctx=64, vocab_only=True,
                           verbose=False)


def _nullable(node):
    """OpenAI's 3.1 spec still carries a few 3.0 ``nullable: true``; make them JSON Schema."""
    if isinstance(node, list):
        return [_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="module")
def validate(openai_spec_path):
    import yaml
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    path = openai_spec_path
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    doc = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    root = {"components": {"schemas": _nullable(doc["components"]["schemas"])}}
    uri = "urn:openai"
    reg = Registry().with_resource(uri, Resource.from_contents(root,
                                                               default_specification=DRAFT202012))
    cache = {}

    def check(obj, name):
        if name not in cache:
            cache[name] = jsonschema.Draft202012Validator(
                {"$ref": f"{uri}#/components/schemas/{name}"}, registry=reg)
        errs = sorted(cache[name].iter_errors(obj), key=lambda e: list(e.path))
        assert not errs, f"{name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errs[:5])

    return check


def _ref_text(server, prompt, n=REF_TOKENS):
    return server.state.llm.tokenizer.decode(server.refs[prompt][1][:n])


def _wait_idle(http, timeout=15.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        h = http.get("/health").json()
        if h["slots_processing"] == 0 and h["requests_queued"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"slots still busy: {h}")


# ---------------------------------------------------------------------------- basics
def test_models_health_metrics(client, http, validate):
    models = http.get("/v1/models").json()
    validate(models, "ListModelsResponse")
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["slots_idle"] + h["slots_processing"] == 4
    # llama-server asks for the key on /metrics too (only /health is public)
    assert httpx.get(http.base_url.join("/metrics")).status_code == 401
    text = http.get("/metrics").text
    assert "llamacpp:prompt_tokens_total" in text and "llamacpp:n_decode_total" in text
    for name in ("prompt_tokens_total", "tokens_generated_total", "request_duration_seconds_bucket",
                 "requests_processing", "requests_queued", "tokens_per_second"):
        assert f"jllama_{name}" in text


def test_tokenize_detokenize_match_oracle(http, oracle_tok):
    text = "Hello world! Ünïcödé and <|im_start|> special"
    ids = http.post("/tokenize", json={"content": text}).json()["tokens"]
    assert ids == oracle_tok.tokenize(text.encode(), add_bos=False, special=True)
    back = http.post("/detokenize", json={"tokens": ids}).json()["content"]
    assert back == oracle_tok.detokenize(ids, special=True).decode()  # as llama-server does


# ---------------------------------------------------------------------------- chat
def test_chat_greedy_matches_single_sequence_reference(server, client, validate, oracle_tok):
    p = PROMPTS[0]
    r = client.chat.completions.create(model="smollm2", messages=_msgs(p), temperature=0,
                                       max_tokens=REF_TOKENS, extra_body={"cache_prompt": False})
    validate(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    ids, ref = server.refs[p]
    assert r.choices[0].message.content == _ref_text(server, p)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if len(ref) == REF_TOKENS else "stop")
    assert r.usage.completion_tokens == len(ref)
    # the prompt the template produced, counted by llama.cpp's tokenizer
    rendered = server.state.llm.tokenizer.decode(ids)
    assert r.usage.prompt_tokens == len(oracle_tok.tokenize(rendered.encode(), add_bos=False,
                                                            special=True))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream(server, client, validate):
    p = PROMPTS[1]
    # a reused prefix is evaluated in other chunks than a full prompt, which may flip a
    # near-tie; both sides here evaluate the whole prompt (the cache is checked below)
    kw = dict(model="smollm2", messages=_msgs(p), temperature=0, max_tokens=REF_TOKENS,
              extra_body={"cache_prompt": False})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    for c in chunks:
        validate(c.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1
    assert full.choices[0].message.content == _ref_text(server, p)
    # with the prompt cache on, a repeated prompt is found in a slot
    again = client.chat.completions.create(**{**kw, "extra_body": {}})
    assert again.usage.prompt_tokens_details.cached_tokens == full.usage.prompt_tokens - 1


def test_stop_strings_are_held_back(server, client):
    p = PROMPTS[0]
    ref = _ref_text(server, p)
    stop = ref[8:12]
    r = client.chat.completions.create(model="smollm2", messages=_msgs(p), temperature=0,
                                       max_tokens=REF_TOKENS, stop=[stop],
                                       extra_body={"cache_prompt": False})
    assert r.choices[0].message.content == ref[: ref.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(model="smollm2", messages=_msgs(p), temperature=0,
                                       max_tokens=REF_TOKENS, stop=[stop], stream=True,
                                       extra_body={"cache_prompt": False})
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == \
        ref[: ref.find(stop)]


def test_seeded_sampling_reproducible_whatever_the_neighbours(client):
    # the prompt cache is off: a reused prefix is evaluated in other chunks, which can move
    # logits by rounding and so a draw; what is tested here is independence from neighbours
    kw = dict(model="smollm2", messages=_msgs("Tell me a story."), temperature=1.0,
              max_tokens=12, seed=1234, extra_body={"cache_prompt": False})
    alone = client.chat.completions.create(**kw).choices[0].message.content
    other = client.chat.completions.create(**{**kw, "seed": 99}).choices[0].message.content
    assert other != alone  # the seed matters
    out = {}

    def run(i):
        k = kw if i == 0 else {**kw, "seed": i, "max_tokens": 6 + 3 * i}
        out[i] = client.chat.completions.create(**k).choices[0].message.content

    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out[0] == alone


# ---------------------------------------------------------------------------- completions
def test_completions_stream_and_not(server, client, validate):
    prompt = "The capital of France is"
    r = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=12)
    validate(r.model_dump(exclude_unset=True), "CreateCompletionResponse")
    ids = server.state.llm.tokenizer.encode(prompt, add_special=True, parse_special=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    assert r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="smollm2", prompt=prompt, temperature=0,
                                            max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    # llama-server's last chunk: the finish reason with usage and timings on it
    validate(chunks[-1].model_dump(exclude_unset=True), "CreateCompletionResponse")
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12
    by_ids = client.completions.create(model="smollm2", prompt=ids, temperature=0, max_tokens=12)
    assert by_ids.choices[0].text == r.choices[0].text


def test_logit_bias_bans_and_forces_tokens(server, client):
    prompt = "The capital of France is"
    r = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=4)
    tok = server.state.llm.tokenizer
    first = tok.encode(r.choices[0].text, add_special=False)[0]
    banned = client.completions.create(model="smollm2", prompt=prompt, temperature=0,
                                       max_tokens=4, logit_bias={str(first): -100})
    assert not banned.choices[0].text.startswith(tok.decode([first]))
    forced_id = tok.encode(" banana", add_special=False)[0]
    forced = client.completions.create(model="smollm2", prompt=prompt, temperature=0.7,
                                       max_tokens=3, logit_bias={str(forced_id): 100})
    assert forced.choices[0].text == tok.decode([forced_id] * 3)


# ---------------------------------------------------------------------------- tools / JSON
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def test_tool_call_round_trip(client, validate):
    msgs = [{"role": "user", "content": "What is the weather like in Paris?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="smollm2", messages=msgs, tools=[WEATHER],
                                       tool_choice=choice, temperature=0, max_tokens=24)
    validate(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    # arguments were generated under the tool's parameter schema
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # the same call streamed: deltas assemble to the same arguments
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=msgs, tools=[WEATHER], tool_choice=choice, temperature=0,
        max_tokens=24, stream=True))
    for c in chunks:
        validate(c.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # round trip: the tool's answer goes back, the model answers in text
    msgs += [r.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'}]
    final = client.chat.completions.create(model="smollm2", messages=msgs, tools=[WEATHER],
                                           temperature=0, max_tokens=12)
    assert final.choices[0].message.content
    assert final.usage.prompt_tokens > r.usage.prompt_tokens


def test_json_response_formats(client):
    msgs = [{"role": "user", "content": 'Give a JSON object with keys "name" and "age" for '
             "Bob, who is 30."}]
    r = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=60,
                                       response_format={"type": "json_object"}, messages=msgs)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    r = client.chat.completions.create(
        model="smollm2", temperature=0.7, seed=5, max_tokens=40, messages=msgs,
        response_format={"type": "json_schema", "json_schema": {"name": "person",
                                                                "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


# ---------------------------------------------------------------------------- errors
def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    # llama-server's context-size error adds n_prompt_tokens and n_ctx
    assert set(err) - {"n_prompt_tokens", "n_ctx"} == {"message", "type", "param", "code"}
    assert err["message"]
    return err


def test_errors(server, client, http):
    _error(http.post("/v1/chat/completions", content=b'{"messages": ['), 400)
    e = _error(http.post("/v1/chat/completions", json={"messages": _msgs("hi"),
                                                       "temperature": "hot"}), 400)
    assert e["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=[], max_tokens=4)
    e = _error(http.post("/v1/completions", json={"prompt": "word " * (CTX + 10)}), 400)
    assert str(CTX) in e["message"] and e["type"] == "exceed_context_size_error"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="smollm2", messages=_msgs("hi"), max_tokens=4)
    _error(httpx.post(server.url + "/v1/completions", json={"prompt": "x"}), 401)
    _error(http.get("/v1/nothing"), 404)
    st = server.state
    st.scheduler.max_queue = 0
    try:
        with pytest.raises(openai.InternalServerError) as ei:
            client.completions.create(model="smollm2", prompt="hi", max_tokens=4)
        assert ei.value.status_code == 503
    finally:
        st.scheduler.max_queue = 32
    st.settings.timeout = 0.3
    try:
        e = _error(http.post("/v1/completions", json={"prompt": "Once upon a time",
                                                      "max_tokens": 400}), 504)
        assert "timed out" in e["message"]
    finally:
        st.settings.timeout = 120
    _wait_idle(http)


# ---------------------------------------------------------------------------- load
def test_sixteen_concurrent_streams_are_correct(server, http):
    """16 streaming clients, 4 slots: each output equals its single-sequence reference."""
    jobs = [(PROMPTS[i % 4], 2 + (i * 5) % (REF_TOKENS - 1)) for i in range(16)]
    out: dict[int, tuple[str, str | None]] = {}

    def run(i, prompt, n):
        body = {"messages": _msgs(prompt), "temperature": 0, "max_tokens": n, "stream": True,
                "cache_prompt": False}
        text, finish = [], None
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ch = json.loads(line[6:])["choices"][0]
                text.append(ch["delta"].get("content") or "")
                finish = ch["finish_reason"] or finish
        out[i] = ("".join(text), finish)

    ts = [threading.Thread(target=run, args=(i, p, n)) for i, (p, n) in enumerate(jobs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    for i, (p, n) in enumerate(jobs):
        ref = server.refs[p][1]
        assert out[i][0] == _ref_text(server, p, n), (i, p, n)
        assert out[i][1] == ("length" if n <= len(ref) else "stop")
    _wait_idle(http)


def test_disconnects_free_slots(server, http):
    """Clients that hang up mid-stream or mid-wait leave no slot behind."""
    rng = random.Random(0)
    before = server.state.metrics.cancelled

    def run(i):
        body = {"messages": _msgs(PROMPTS[i % 4]), "max_tokens": 300, "temperature": 0.8,
                "stream": i % 3 != 0}
        try:
            if body["stream"]:
                with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    for k, _ in enumerate(r.iter_lines()):
                        if k >= rng.randint(1, 12):
                            break  # closing the response hangs up
            else:
                httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.5,
                           headers={"Authorization": f"Bearer {KEY}"})
        except httpx.TimeoutException:
            pass

    ts = [threading.Thread(target=run, args=(i,)) for i in range(9)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    h = _wait_idle(http, timeout=20)
    assert h["slots_idle"] == 4
    assert server.state.metrics.cancelled - before >= 6
    text = http.get("/metrics").text
    assert "jllama_requests_processing 0" in text and "jllama_requests_queued 0" in text
    # and the server still answers correctly
    r = http.post("/v1/chat/completions", json={"messages": _msgs(PROMPTS[3]), "temperature": 0,
                                                "max_tokens": 8, "cache_prompt": False}).json()
    assert r["choices"][0]["message"]["content"] == _ref_text(server, PROMPTS[3], 8)


def test_schema_helper_catches_bad_payloads(validate):
    good = {"object": "list", "data": [{"id": "m", "object": "model", "created": 1,
                                        "owned_by": "x"}]}
    validate(good, "ListModelsResponse")
    broken = copy.deepcopy(good)
    del broken["data"][0]["owned_by"]
    with pytest.raises(AssertionError):
        validate(broken, "ListModelsResponse")
