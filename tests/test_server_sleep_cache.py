"""llama-server's --sleep-idle-seconds and --cache-ram / --cache-idle-slots on a tiny random
llama.

* the host prompt cache (server_prompt_cache): a slot's KV copied out, the slot overwritten,
  the entry copied back into another slot: the logits of what follows are llama.cpp's
  (llama-cpp-python evaluating the prefix and then the rest in one context), bit for bit; its
  entry rules (already held, held whole by the new one, oldest dropped past the limits);
* over HTTP, llama.cpp's test_kv_keep_only_active flow (2 slots, unified KV): an idle slot goes
  to the cache when another slot starts and is emptied; the same prompt later comes back from
  the cache (cache_n > 0) with the same answer as computed fresh;
* over HTTP, llama.cpp's test_sleep flow: the server sleeps after the idle time with its
  weights and KV cache let go, /health /props /models /metrics answer without waking it (the
  metrics from the snapshot taken on going to sleep), a request wakes it and gets the same
  answer as before.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from llamacpp_oracle import llama_cpp_module
from tinymodels import dense_hparams, dense_tensors, write_gguf

SHP = dict(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, head_dim=16)
N_VOCAB = 300
CTX = 64  # per slot


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import gguf

    t = dense_tensors(11, n_vocab=N_VOCAB, **SHP)
    return write_gguf(tmp_path_factory.mktemp("sleep") / "tiny.gguf", "llama",
                      dense_hparams(**SHP), t, qtype=gguf.GGMLQuantizationType.Q8_0)


@pytest.fixture(scope="module")
def llm(tiny):
    from jllama.api import Llama

    return Llama(str(tiny), ctx_size=CTX, n_slots=2, compile_cache=False)


def test_cached_prompt_continues_as_llamacpp(tiny, llm):
    from jllama.server.prompt_cache import PromptCache

    eng = llm.engine
    rng = np.random.default_rng(5)
    prefix = rng.integers(3, N_VOCAB - 10, 30).tolist()
    rest = rng.integers(3, N_VOCAB - 10, 9).tolist()
    eng.reset()
    eng.prefill(prefix, 0)
    pc = PromptCache(100, 2 * CTX)
    assert pc.save(eng, 0) and pc.n_tokens() == 30
    eng.rewind(0, 0)
    eng.prefill(rng.integers(3, 200, 20).tolist(), 0)  # slot 0 now holds something else
    eng.prefill([7, 8, 9], 1)
    assert pc.load(eng, 1, prefix + rest)
    assert pc.states == [] and eng.tokens[1] == prefix and int(eng.pos[1]) == 30
    ours = np.asarray(eng.prefill(rest, 1, all_logits=True), np.float32)

    lc = llama_cpp_module()
    o = lc.Llama(model_path=str(tiny), n_ctx=CTX, logits_all=True, verbose=False, n_threads=1,
                 seed=0, flash_attn=True)
    try:
        o.eval(prefix)
        o.eval(rest)
        ref = np.array(o.scores[len(prefix): len(prefix) + len(rest)], np.float32)
    finally:
        o.close()
    np.testing.assert_array_equal(ours, ref)


def test_cache_entry_rules(llm):
    """server_prompt_cache's alloc/load/update rules."""
    from jllama.server.prompt_cache import PromptCache

    eng = llm.engine
    a, b = list(range(10, 40)), list(range(50, 80))
    eng.reset()
    pc = PromptCache(-1, 50)  # no size limit: the token limit decides
    assert not pc.save(eng, 0)  # an empty slot saves nothing
    eng.prefill(a[:20], 0)
    assert pc.save(eng, 0)
    assert not pc.save(eng, 0)  # already held whole
    eng.prefill(a[20:], 0)
    assert pc.save(eng, 0)  # holds the 20-token entry whole: that one goes
    assert [len(e.tokens) for e in pc.states] == [30]
    eng.prefill(b, 1)
    assert pc.save(eng, 1)
    pc.update()  # 60 tokens > 50: the oldest goes
    assert [e.tokens for e in pc.states] == [b]
    # an entry that would keep less than a quarter of itself is not loaded
    eng.rewind(0, 0)
    assert pc.load(eng, 0, b[:5] + a) and eng.tokens[0] == [] and len(pc.states) == 1
    assert pc.load(eng, 0, b[:10] + a) and eng.tokens[0] == b and pc.states == []
    # a size limit below one entry refuses it
    small = PromptCache(1)
    small.limit_size = 100
    assert not small.save(eng, 0) and small.states == []


# ------------------------------------------------------------------ over HTTP
def _server(llm, **kw):
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    llm.engine.reset()
    return ServerThread(ServerState(llm, ServerSettings("tiny", timeout=120, **kw)),
                        warmup=False)


P_LONG = list(range(20, 60))  # 40 tokens
P_OTHER = [200, 201, 202, 203]


def _complete(c, prompt, id_slot=-1, n=4):
    r = c.post("/completion", json={"prompt": prompt, "id_slot": id_slot, "cache_prompt": True,
                                    "n_predict": n, "temperature": 0.0})
    assert r.status_code == 200, r.text
    return r.json()


def test_idle_slot_goes_to_the_cache_and_comes_back(llm, caplog):
    import logging

    import httpx

    caplog.set_level(logging.DEBUG, logger="jllama.server")
    with _server(llm, cache_ram=100, kv_unified=True) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        assert "__TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__" in caplog.text
        first = _complete(c, P_LONG, 0)
        assert first["timings"]["prompt_n"] == 40
        assert "__TEST_TAG_CACHE_IDLE_SLOT__" not in caplog.text  # slot 1 holds nothing
        _complete(c, P_OTHER, 1)
        assert "__TEST_TAG_CACHE_IDLE_SLOT__" in caplog.text
        assert llm.engine.tokens[0] == []  # unified KV: the idle slot was emptied
        caplog.clear()
        again = _complete(c, P_LONG)
        assert "updating prompt cache" in caplog.text
        assert again["timings"]["cache_n"] == 39 and again["timings"]["prompt_n"] == 1
        assert again["content"] == first["content"]  # the answer computed fresh
        caplog.clear()
        _complete(c, P_LONG + [90, 91])
        assert "__TEST_TAG_CACHE_IDLE_SLOT__" not in caplog.text
    with _server(llm, cache_ram=100, kv_unified=True, cache_idle_slots=False) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        caplog.clear()
        _complete(c, P_LONG, 0)
        _complete(c, P_OTHER, 1)
        assert "__TEST_TAG_CACHE_IDLE_SLOT__" not in caplog.text
        assert len(llm.engine.tokens[0]) == 43  # kept in its slot


def _wait_sleep(c, timeout=20.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if c.get("/props").json()["is_sleeping"]:
            return
        time.sleep(0.1)
    raise TimeoutError("the server did not go to sleep")


def _metric(text, name):
    [v] = [ln.split(" ")[1] for ln in text.splitlines() if ln.startswith(f"llamacpp:{name} ")]
    return float(v)


def test_sleep_lets_go_of_the_model_and_wakes_on_a_request(llm):
    import httpx

    with _server(llm, sleep_idle_seconds=1, metrics=True) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        before = _complete(c, P_LONG, n=6)
        assert not c.get("/props").json()["is_sleeping"]
        assert _metric(c.get("/metrics").text, "predicted_tokens_seconds") > 0
        awake = c.get("/metrics").text  # the buckets were emptied by the scrape before
        assert _metric(awake, "predicted_tokens_seconds") == 0
        _wait_sleep(c)
        assert llm.model is None and llm.engine.state is None and llm.engine.cache is None
        assert c.get("/health").status_code == 200
        m = c.get("/v1/models").json()
        assert m["data"][0]["id"] == "tiny"
        assert c.get("/metrics").text == awake  # the snapshot taken on going to sleep
        assert c.get("/props").json()["is_sleeping"]  # none of these woke it up
        after = _complete(c, P_LONG, n=6)  # wakes it up, and is answered
        assert not c.get("/props").json()["is_sleeping"]
        assert after["content"] == before["content"] and after["timings"]["cache_n"] == 0
        assert llm.model is not None
        _wait_sleep(c)
        assert c.post("/tokenize", json={"content": "a"}).status_code == 200
        assert not c.get("/props").json()["is_sleeping"]


def test_metrics_buckets_across_sleep(llm):
    """llama.cpp's test_server_sleep_metrics_buckets: the first scrape while sleeping reports
    the last generation's throughput, the next ones an empty window, and waking up does not
    report it again."""
    import httpx

    with _server(llm, sleep_idle_seconds=1, metrics=True) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        _complete(c, P_OTHER, n=8)
        _wait_sleep(c)
        assert _metric(c.get("/metrics").text, "predicted_tokens_seconds") > 0
        assert _metric(c.get("/metrics").text, "predicted_tokens_seconds") == 0
        assert c.post("/tokenize", json={"content": "a"}).status_code == 200
        assert not c.get("/props").json()["is_sleeping"]
        assert _metric(c.get("/metrics").text, "predicted_tokens_seconds") == 0


def test_router_lists_a_sleeping_child(llm):
    """Router mode: a child started with --sleep-idle-seconds is listed as "sleeping" while it
    sleeps (llama-server's SERVER_MODEL_STATUS_SLEEPING) and "loaded" again once a request has
    woken it. The child here is an in-process server on the tiny model."""
    import asyncio

    import httpx

    from jllama.server.router import Model, Router, RouterConfig

    class Proc:  # the child process as the watcher sees it: running
        def poll(self):
            return None

    with _server(llm, sleep_idle_seconds=1) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        r = Router(RouterConfig(models_dir=None, models_preset=None))
        m = Model("tiny", "models_dir", {}, status="loaded", port=s.port, proc=Proc(),
                  args=["jllama", "serve", "--sleep-idle-seconds", "1"])
        r.models["tiny"] = m

        def value():
            return r.listing()["data"][0]["status"]["value"]

        async def watch_until(want: str) -> None:
            task = asyncio.ensure_future(r._watch(m, m.proc))
            try:
                t0 = time.monotonic()
                while value() != want and time.monotonic() - t0 < 20:
                    await asyncio.sleep(0.1)
            finally:
                task.cancel()

        asyncio.run(watch_until("sleeping"))
        assert value() == "sleeping"
        _complete(c, P_OTHER, n=2)  # wakes the child
        asyncio.run(watch_until("loaded"))
        assert value() == "loaded"


def test_serve_flags_reach_the_settings():
    """llama-server's flag names and defaults (common/arg.cpp): --cache-ram 8192 and
    --cache-idle-slots on unless told, --sleep-idle-seconds -1 (0 and < -1 refused)."""
    from jllama.cli.main import build_parser
    from jllama.cli.serve import _check_llama_server_args, _overrides, settings_from_config
    from jllama.config import load_config
    from jllama.errors import ConfigError

    def settings(*flags):
        args = build_parser().parse_args(["serve", "-m", "m.gguf", *flags])
        _check_llama_server_args(args)
        return settings_from_config(load_config(None, _overrides(args)), "m", [])

    s = settings()
    assert (s.cache_ram, s.cache_idle_slots, s.sleep_idle_seconds, s.kv_unified) == \
        (8192, True, -1, False)
    s = settings("-cram", "100", "--no-cache-idle-slots", "--sleep-idle-seconds", "3", "-kvu")
    assert (s.cache_ram, s.cache_idle_slots, s.sleep_idle_seconds, s.kv_unified) == \
        (100, False, 3, True)
    assert settings("--cache-ram", "-1", "--cache-idle-slots").cache_ram == -1
    for bad in ("0", "-2"):
        with pytest.raises(ConfigError, match="cannot be 0 or less than -1"):
            settings("--sleep-idle-seconds", bad)
