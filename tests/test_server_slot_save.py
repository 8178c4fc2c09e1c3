"""llama-server's slot actions (POST /slots/{id}?action=save|restore|erase, --slot-save-path) on a
tiny random llama.

* a slot saved and restored (into another slot, over other contents) holds what it held: the
  logits of the tokens that follow its prefix are llama.cpp's (llama-cpp-python evaluating the
  prefix, then the rest, in one context), bit for bit;
* over HTTP, the flow of llama.cpp's own test_slot_save: the counts it reports (n_saved is the
  tokens the slot holds: the prompt and every generated token but the last), a restored slot
  reused as a prompt cache exactly as the slot it came from (same cache_n, same text), erase;
* llama-server's answers to bad requests: its status codes, error types and messages
  (server-context.cpp post_slots / handle_slots_*, common.cpp fs_validate_filename), a slot
  action on a busy slot waiting for it (llama-server defers the task).
"""

from __future__ import annotations

import threading

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

    t = dense_tensors(5, n_vocab=N_VOCAB, **SHP)
    return write_gguf(tmp_path_factory.mktemp("slot") / "tiny.gguf", "llama",
                      dense_hparams(**SHP), t, qtype=gguf.GGMLQuantizationType.Q8_0)


@pytest.fixture(scope="module")
def llm(tiny):
    from jllama.api import Llama

    return Llama(str(tiny), ctx_size=CTX, n_slots=2, compile_cache=False)


def test_restored_slot_continues_as_llamacpp(tiny, llm, tmp_path):
    """Save slot 1 to a file, restore it into slot 0 (holding something else), then evaluate
    more tokens there: llama.cpp's logits for the whole sequence (f16 cache, flash attention:
    the server's defaults)."""
    from jllama.server import slot_state

    eng = llm.engine
    rng = np.random.default_rng(3)
    prefix = rng.integers(3, N_VOCAB - 10, 30).tolist()
    rest = rng.integers(3, N_VOCAB - 10, 9).tolist()
    eng.reset()
    eng.prefill(prefix, 1)
    path = str(tmp_path / "s.bin")
    n, size = slot_state.save(eng, 1, path)
    assert n == len(prefix) and size == (tmp_path / "s.bin").stat().st_size
    eng.prefill(rng.integers(3, 200, 20).tolist(), 0)  # other contents, overwritten
    eng.rewind(1, 0)
    eng.prefill([7, 8, 9], 1)
    assert slot_state.restore(eng, 0, path) == (n, size)
    assert eng.tokens[0] == prefix and int(eng.pos[0]) == len(prefix)
    ours = np.asarray(eng.prefill(rest, 0, all_logits=True), np.float32)

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


def test_restore_refuses_other_layouts_and_bad_files(llm, tmp_path):
    from jllama.server import slot_state

    eng = llm.engine
    eng.reset()
    eng.prefill([5, 6, 7, 8], 0)
    path = tmp_path / "s.bin"
    slot_state.save(eng, 0, str(path))
    data = path.read_bytes()
    for bad in (data[:-3], b"not a slot file", data.replace(b'"llama"', b'"gemma"')):
        path.write_bytes(bad)
        with pytest.raises(slot_state.SlotFileError, match="invalid slot save file"):
            slot_state.restore(eng, 1, str(path))
    with pytest.raises(slot_state.SlotFileError):
        slot_state.restore(eng, 1, str(tmp_path / "missing.bin"))
    # a slot holding an image's cells restores only where a projector is loaded (llama-server:
    # "Cannot restore media tokens without an mmproj")
    eng.reset()
    eng.prefill([5, 6], 0)
    eng.prefill_embeddings(np.zeros((2, SHP["n_embd"]), np.float32), 0)
    slot_state.save(eng, 0, str(path))
    with pytest.raises(slot_state.SlotFileError, match="without an mmproj"):
        slot_state.restore(eng, 1, str(path), media=False)
    assert slot_state.restore(eng, 1, str(path))[0] == 4 and eng.tokens[1] == [5, 6, -1, -1]


@pytest.mark.parametrize("name,ok", [
    ("slot1.bin", True), ("a b", True), ("ünï", True), ("", False), ("../x", False),
    ("a/b", False), ("a\\b", False), ("..", False), (".", False), ("x.", False), (" x", False),
    ("x ", False), ("a:b", False), ("a*b", False), ("a?b", False), ('a"b', False),
    ("a<b", False), ("a|b", False), ("a\x01", False), ("a\u2215b", False), ("x" * 256, False),
])
def test_filenames_as_llama_server_validates_them(name, ok):
    from jllama.server.slot_state import valid_filename

    assert valid_filename(name) is ok


def test_slot_ids_wrap_as_llama_server():
    """get_slot_by_id's ``id_slot % slots.size()``: a negative int becomes an unsigned 64-bit
    number first (llama-server saves slot 1 for id -3 of 2 slots)."""
    from jllama.server.scheduler import slot_index

    assert [slot_index(i, 2) for i in (0, 1, 2, 5, -2, -3)] == [0, 1, 0, 1, 0, 1]
    assert [slot_index(-1, n) for n in (2, 3, 4)] == [1, 0, 3]


# ------------------------------------------------------------------ over HTTP
@pytest.fixture(scope="module")
def server(llm, tmp_path_factory):
    import httpx

    from jllama.server.app import ServerSettings, ServerState, ServerThread

    d = tmp_path_factory.mktemp("slots")
    state = ServerState(llm, ServerSettings("tiny", timeout=120, slot_save_path=f"{d}/"))
    with ServerThread(state, warmup=False) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        s.http, s.dir = c, d
        yield s


P1 = list(range(20, 41))  # 21 tokens
P2 = P1[:15] + [90, 91, 92, 93, 94, 95]  # shares 15 with P1


def _complete(server, prompt, id_slot, n=8):
    r = server.http.post("/completion", json={"prompt": prompt, "id_slot": id_slot,
                                              "cache_prompt": True, "n_predict": n,
                                              "temperature": 0.0})
    assert r.status_code == 200, r.text
    return r.json()


def _action(server, slot, action, body=None):
    return server.http.post(f"/slots/{slot}", params={"action": action}, json=body)


def test_save_restore_erase_flow(server):
    r = _complete(server, P1, 1)
    assert r["timings"]["prompt_n"] == 21 and r["id_slot"] == 1
    a = _action(server, 1, "save", {"filename": "slot1.bin"})
    assert a.status_code == 200, a.text
    a = a.json()
    size = (server.dir / "slot1.bin").stat().st_size
    assert a["id_slot"] == 1 and a["filename"] == "slot1.bin"
    assert a["n_saved"] == 21 + 8 - 1 and a["n_written"] == size
    assert r["tokens_cached"] == a["n_saved"]  # llama-server's: what the slot holds
    assert set(a["timings"]) == {"save_ms"}

    r1 = _complete(server, P2, 1)  # reuses the prefix it shares with what slot 1 holds
    assert (r1["timings"]["cache_n"], r1["timings"]["prompt_n"]) == (15, 6)

    b = _action(server, 0, "restore", {"filename": "slot1.bin"}).json()
    assert b == {"id_slot": 0, "filename": "slot1.bin", "n_restored": 28, "n_read": size,
                 "timings": {"restore_ms": b["timings"]["restore_ms"]}}
    r0 = _complete(server, P2, 0)  # slot 0 now does what slot 1 did
    assert r0["timings"] == {**r1["timings"], **{k: r0["timings"][k] for k in r0["timings"]
                                                  if k.endswith(("_ms", "_second"))}}
    assert r0["content"] == r1["content"]

    r1b = _complete(server, P2, 1)  # slot 1 untouched by the restore into slot 0
    assert (r1b["timings"]["cache_n"], r1b["timings"]["prompt_n"]) == (20, 1)

    e = _action(server, 1, "erase")
    assert e.status_code == 200 and e.json() == {"id_slot": 1, "n_erased": 21 + 8 - 1}
    assert _complete(server, P1, 1)["timings"]["cache_n"] == 0


def test_slot_action_errors(server):
    def err(resp, status, type_, message):
        assert resp.status_code == status, resp.text
        e = resp.json()["error"]
        assert (e["code"], e["type"]) == (status, type_) and message in e["message"], e

    bad = "invalid_request_error"
    err(_action(server, 0, "fly", {"filename": "x"}), 400, bad, "Invalid action")
    err(_action(server, "abc", "save", {"filename": "x"}), 400, bad, "Invalid slot ID")
    err(_action(server, " x1", "save", {"filename": "x"}), 400, bad, "Invalid slot ID")
    for name in ("../x", "a/b", ".."):
        err(_action(server, 0, "save", {"filename": name}), 400, bad, "Invalid filename")
    err(_action(server, 0, "restore", {"filename": "nothing.bin"}), 400, bad,
        "Unable to restore slot: No available space in KV cache or invalid slot save file")
    err(_action(server, 0, "save", {}), 500, "server_error", "key 'filename' not found")
    # ids wrap around the slot count (llama-server's get_slot_by_id): 3 is slot 1
    a = _action(server, 3, "save", {"filename": "wrap.bin"})
    assert a.status_code == 200 and a.json()["id_slot"] == 3


def test_without_slot_save_path_501(llm):
    from starlette.testclient import TestClient

    from jllama.server.app import ServerSettings, ServerState, create_app

    c = TestClient(create_app(ServerState(llm, ServerSettings("tiny")), warmup=False))
    r = c.post("/slots/0?action=save", json={"filename": "x"})
    assert r.status_code == 501
    assert r.json()["error"] == {
        "code": 501, "type": "not_supported_error", "param": None,
        "message": "This server does not support slots action. Start it with "
                   "`--slot-save-path`"}


def test_action_on_a_busy_slot_waits_for_it(server):
    """llama-server defers a slot action until the slot is released: the save sees the whole
    request, not a half-generated one."""
    out = {}
    started = threading.Event()

    def run():
        with server.http.stream("POST", "/completion", json={
                "prompt": P1, "id_slot": 0, "n_predict": 30, "temperature": 0.0,
                "stream": True}) as r:
            for _ in r.iter_lines():
                started.set()
        out["done"] = True

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(60)
    a = _action(server, 0, "save", {"filename": "busy.bin"})
    t.join(60)
    assert a.status_code == 200 and a.json()["n_saved"] == 21 + 30 - 1


def test_prompt_cache_reuses_images_by_content(llm, tmp_path):
    """llama-server's prompt cache with images (test_slot_save's image cases): a prompt that
    repeats an image reuses its cells, even in a slot restored from a file; a different image
    reuses only the text before it; counts include the image's cells (prompt_n)."""
    from jllama.engine.multimodal import ImageChunk
    from jllama.engine.sampling import SamplingParams
    from jllama.server import slot_state
    from jllama.server.scheduler import GenRequest, Scheduler

    rng = np.random.default_rng(0)
    cat, truck = (ImageChunk(rng.normal(0, 0.5, (5, SHP["n_embd"])).astype(np.float32), False)
                  for _ in range(2))
    sch = Scheduler(llm)
    sch.start()

    def run(items, slot):
        done, box, text = threading.Event(), {}, []

        def sink(ev):
            if ev.kind == "text":
                text.append(ev.text)
            elif ev.kind in ("done", "error"):
                box["ev"] = ev
                done.set()

        sch.submit(GenRequest([t for t in items if isinstance(t, int)], 6,
                              SamplingParams.greedy(), sink=sink, prompt_items=list(items),
                              id_slot=slot))
        assert done.wait(120) and box["ev"].kind == "done", box
        ev = box["ev"]
        return ev.prompt_tokens, ev.cached_tokens, "".join(text)

    try:
        llm.engine.reset()
        first = run([5, 6, cat, 7, 8], 0)
        assert first[:2] == (9, 0)
        assert run([5, 6, cat, 7, 8], 0) == (9, 8, first[2])
        assert run([5, 6, truck, 7, 8], 0)[:2] == (9, 2)
        run([5, 6, cat, 7, 8], 0)
        fut = sch.on_slot(0, lambda b: slot_state.save(llm.engine, b, str(tmp_path / "i.bin")))
        assert fut.result(60)[0] == 9 + 6 - 1
        run([1, 2, 3], 1)
        fut = sch.on_slot(1, lambda b: slot_state.restore(llm.engine, b, str(tmp_path / "i.bin")))
        assert fut.result(60)[0] == 14
        assert run([5, 6, cat, 7, 8], 1) == (9, 8, first[2])
        # a prompt cut inside an image decodes the whole image again
        assert run([5, 6, cat], 1)[:2] == (7, 2)
    finally:
        sch.stop()
