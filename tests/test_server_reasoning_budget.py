"""llama-server's reasoning budget (--reasoning-budget N, --reasoning-budget-message,
reasoning_budget_tokens): jllama/server/reasoning_budget.py.

* the state machine: every case of llama.cpp 0c1e570's tests/test-reasoning-budget.cpp (its
  token sequences, budgets, initial states and the steps where one token is forced) and its
  common_utf8_is_complete cases;
* over HTTP on a tiny random llama with QwQ's template (its generation prompt opens the
  thoughts): the thoughts are llama.cpp's own greedy first N tokens (llama-cpp-python on the
  same prompt) followed by the forced message, then the reply goes on after the end tag;
* with ``n`` > 1 each choice runs its own budget (llama-server's child tasks copy the
  parent's sampling parameters, its budget sampler included): every choice is the reply of
  a request with n = 1 (checked against llama-server 0c1e570 on this model:
  experiments/results/server_suite.md).
"""

from __future__ import annotations

import httpx
import pytest

from jllama.server.reasoning_budget import COUNTING, IDLE, ReasoningBudget, utf8_complete

NEVER = None


def _forcing_steps(seq, starts, ends, forced, budget, initial):
    """test_reasoning_budget's loop: before each token of ``seq`` is accepted, is one token
    forced? The first and last such steps (it stops looking once forcing stopped)."""
    rb = ReasoningBudget(starts, ends, forced, budget, None, initial)
    first = last = None
    for i, t in enumerate(seq):
        f = rb.forced()
        rb.accept(t)
        if f is not None:
            first = i if first is None else first
            last = i
        elif first is not None:
            break
    return first, last


# (name, sequence, starts, ends, forced, budget, initial state, force start, force end)
CASES = [
    ("natural end before budget exhausted", [100, 50, 51, 101, 52], [[100]], [[101]], [102],
     5, IDLE, NEVER, NEVER),
    ("budget exhausted forcing", [100, 50, 51, 52, 53], [[100]], [[101]], [102, 101], 2, IDLE,
     3, 4),
    ("activate immediately budget=0", [100, 50, 51, 52], [[100]], [[101]], [102, 101], 0,
     COUNTING, 0, 1),
    ("no start/end configured", [50, 51, 52, 53], [[]], [[]], [102], 2, IDLE, NEVER, NEVER),
    ("activate immediately with budget", [50, 51, 52, 53], [[100]], [[101]], [102, 101], 2,
     COUNTING, 2, 3),
    ("multi-block re-arms budget after DONE", [100, 50, 101, 100, 60, 61, 62, 63], [[100]],
     [[101]], [102, 101], 2, IDLE, 6, 7),
    ("multiple start sequences", [110, 111, 50, 51, 52, 53], [[100], [110, 111]], [[101]],
     [102, 101], 2, IDLE, 4, 5),
    ("multiple end sequences", [100, 50, 103, 104, 52], [[100]], [[101], [103, 104]],
     [102, 101], 5, IDLE, NEVER, NEVER),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_llamacpp_cases(case):
    _, seq, starts, ends, forced, budget, initial, want_first, want_last = case
    first, last = _forcing_steps(seq, starts, ends, forced, budget, initial)
    assert first == want_first
    if want_last is not None:
        assert last >= want_last


def test_forced_tokens_in_order_and_utf8_wait():
    rb = ReasoningBudget([[100]], [[101]], [102, 101], 1,
                         lambda t: {60: b"\xe2\x80", 61: b"\x9c"}.get(t, b"a"))
    rb.accept(100)
    rb.accept(60)  # budget spent inside a character: wait for it to complete
    assert rb.forced() is None
    rb.accept(61)  # llama.cpp looks at each token's own piece: a lone continuation byte
    assert rb.forced() is None  # is not complete either
    rb.accept(62)
    assert rb.forced() == 102
    rb.accept(102)
    assert rb.forced() == 101
    rb.accept(101)
    assert rb.forced() is None


def test_utf8_boundary_detection():
    for s in (b"hello", b"", b"\xc2\xa0", b"\xe2\x80\x9c", b"\xf0\x9f\x98\x80", b"abc\xc3\xa9",
              b"hello\xc3\xa9"):
        assert utf8_complete(s), s
    for s in (b"\xc2", b"\xe2\x80", b"\xe2", b"\xf0\x9f\x98", b"\xf0\x9f", b"\xf0", b"\x80",
              b"hello\xc3"):
        assert not utf8_complete(s), s


def test_serve_flags():
    from jllama.cli.main import build_parser
    from jllama.cli.serve import _chat_flags, _check_llama_server_args
    from jllama.errors import ConfigError

    args = build_parser().parse_args(["serve", "-m", "m.gguf", "--reasoning-budget", "7",
                                      "--reasoning-budget-message", "Enough."])
    _check_llama_server_args(args)
    fields, _ = _chat_flags(args)
    assert fields["reasoning_budget"] == 7 and fields["reasoning_budget_message"] == "Enough."
    args = build_parser().parse_args(["serve", "-m", "m.gguf", "--reasoning-budget", "-2"])
    with pytest.raises(ConfigError, match="--reasoning-budget -2"):
        _check_llama_server_args(args)


SHP = dict(n_layer=2, n_embd=64, n_ff=96, n_head=2, n_head_kv=1, head_dim=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import gguf
    from tinymodels import dense_hparams, dense_tensors, write_gguf

    return write_gguf(tmp_path_factory.mktemp("rbudget") / "tiny.gguf", "llama",
                      dense_hparams(**SHP), dense_tensors(3, n_vocab=300, **SHP),
                      qtype=gguf.GGMLQuantizationType.Q8_0)


@pytest.fixture(scope="module")
def models(tiny):
    from llamacpp_oracle import llama_cpp_module
    from test_server_chat_formats import template

    from jllama.api import Llama

    o = llama_cpp_module().Llama(model_path=str(tiny), n_ctx=256, verbose=False, n_threads=1)
    llm = Llama(str(tiny), ctx_size=512, n_slots=2, compile_cache=False)  # 2 x 256
    llm.tokenizer.chat_template = template("Qwen-QwQ-32B")
    yield o, llm
    o.close()


@pytest.mark.oracle
@pytest.mark.parametrize("budget,message", [(3, ""), (4, "Enough thinking."), (0, "Stop.")])
def test_budget_over_http(models, budget, message):
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    o, llm = models
    llm.engine.reset()
    # a random byte-level model mostly draws bytes that are no UTF-8 (the budget then waits
    # for a whole character, as llama.cpp's does): biased towards a few letters, it writes text
    bias = {o.tokenize(ch.encode(), add_bos=False, special=False)[0]: 50.0 for ch in "abcdefg "}
    st = ServerSettings("tiny", timeout=120, reasoning_budget=budget,
                        reasoning_budget_message=message)
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0,
            "max_tokens": 40, "logit_bias": {str(k): v for k, v in bias.items()}}
    with ServerThread(ServerState(llm, st), warmup=False) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        prompt = c.post("/apply-template", json=body).json()["prompt"]
        assert prompt.endswith("<think>\n")  # QwQ's generation prompt opens the thoughts
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        msg = r.json()["choices"][0]["message"]
        raw = c.post("/v1/chat/completions", json={**body, "reasoning_format": "none"}).json()
    ids = o.tokenize(prompt.encode(), add_bos=False, special=True)
    # llama.cpp's sampler is fed the generation prompt: the tokens after its start tag
    # ("\n") already spend the budget
    tag = o.tokenize(b"<think>", add_bos=False, special=True)
    after = next(len(ids) - i - len(tag) for i in range(len(ids) - len(tag), -1, -1)
                 if ids[i:i + len(tag)] == tag)
    n = max(budget - after, 0)
    thoughts = o.create_completion(ids, max_tokens=n, temperature=0.0, repeat_penalty=1.0,
                                   logit_bias=bias)["choices"][0]["text"] if n else ""
    # the message's tokens then the end tag's; prompt tokens fed after the budget ran out
    # (budget 0: the "\n") step through them too, as in llama.cpp's sampler
    forced = (o.tokenize(message.encode(), add_bos=False, special=True) if message else [])
    forced += o.tokenize(b"</think>", add_bos=False, special=True)
    forced_text = o.detokenize(forced[max(after - budget, 0):]).decode()
    # llama.cpp: the thought tokens the budget leaves, then the forced tokens
    want = thoughts + forced_text
    assert want.endswith("</think>")
    assert msg.get("reasoning_content", "").strip() == want[:-len("</think>")].strip()
    assert msg["content"]  # the reply goes on after the thoughts
    # reasoning_format none: the whole text as generated, the forced tokens in it
    assert raw["choices"][0]["message"]["content"].startswith("<think>\n" + want)


def test_budget_per_choice(models):
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    o, llm = models
    llm.engine.reset()
    bias = {o.tokenize(ch.encode(), add_bos=False, special=False)[0]: 50.0 for ch in "abcdefg "}
    st = ServerSettings("tiny", timeout=120, reasoning_budget=3)
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0,
            "max_tokens": 30, "logit_bias": {str(k): v for k, v in bias.items()}}
    with ServerThread(ServerState(llm, st), warmup=False) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        for extra in ({}, {"reasoning_budget_tokens": 5, "reasoning_budget_message": "Enough."}):
            one = c.post("/v1/chat/completions", json={**body, **extra}).json()
            msg = one["choices"][0]["message"]
            assert msg.get("reasoning_content") and msg["content"]
            two = c.post("/v1/chat/completions", json={**body, **extra, "n": 2}).json()
            assert [ch["message"] for ch in two["choices"]] == [msg, msg]
