"""Soak a running OpenAI-compatible server with mixed requests (issue #18 item 5).

    python experiments/soak_server.py [-m MODEL] [-n 500] [-c 32] [--slots 4] [--url URL]

Without ``--url`` it starts ``jllama serve``'s app in this process on MODEL (SmolLM2 by default)
and also watches this process's RSS; with ``--url`` it drives any server (llama-server too: the
same kinds of request, the same checks). Request kinds, drawn in a fixed pseudo-random order:

- chat, not streamed, 1-24 tokens: exactly one 200 answer with a message and ``usage``;
- chat, streamed: chunks of one id, exactly one ``finish_reason`` and one ``[DONE]``;
- cancelled: a stream asking for the whole context (``ignore_eos``) that the client closes
  after its first chunk: its slot must come back at once (``settle_s``: how long after the last
  answer the slots took to be all idle; every other request has finished by then);
- over-long: a prompt beyond the context: a 4xx with an error message, nothing else affected;
- bad JSON: a body that does not parse: a 4xx with an error message;
- JSON schema: ``response_format`` json_schema; when it stops (not cut by max_tokens) the text
  parses and has the required key;
- tools: a chat with a ``tools`` list: a 200 answer with a message.

Afterwards: every request got exactly one outcome (no lost or duplicated response: ids unique),
``/health`` ok, ``/slots`` all idle, and (in-process) the RSS growth between the end of the first
quarter and the end. Prints a JSON report; ``run_soak`` is what tests/test_server_soak.py calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

KINDS = ("chat", "stream", "cancel", "overlong", "badjson", "schema", "tools")
WEIGHTS = (30, 25, 10, 8, 8, 12, 7)
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
          "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
WORDS = ("river mountain city bread music winter garden letter window travel paper "
         "ocean stone light story").split()


def rss_mib() -> float:
    """This process's resident set (Linux), MiB."""
    for ln in Path("/proc/self/status").read_text().splitlines():
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1]) / 1024
    return float("nan")


def _plan(n: int, seed: int) -> list[tuple[int, str, dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choices(KINDS, WEIGHTS)[0]
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        out.append((i, kind, {"words": words, "max_tokens": rng.randint(1, 24)}))
    return out


async def _one(client, i: int, kind: str, p: dict, ctx: int) -> dict:
    """One request; returns its outcome: {'i', 'kind', 'ok', 'id', 'why'}."""
    msgs = [{"role": "user", "content": f"Request {i}: {p['words']}"}]
    body: dict = {"messages": msgs, "max_tokens": p["max_tokens"], "temperature": 0.7,
                  "seed": i}
    res = {"i": i, "kind": kind, "ok": False, "id": None, "why": ""}
    try:
        if kind == "badjson":
            r = await client.post("/v1/chat/completions", content=b'{"messages": [',
                                  headers={"Content-Type": "application/json"})
            res["ok"] = 400 <= r.status_code < 500 and "error" in r.json()
            res["why"] = f"status {r.status_code}"
            return res
        if kind == "overlong":
            body["messages"] = [{"role": "user", "content": "word " * (ctx * 2)}]
            r = await client.post("/v1/chat/completions", json=body)
            res["ok"] = 400 <= r.status_code < 500 and "error" in r.json()
            res["why"] = f"status {r.status_code}"
            return res
        if kind in ("stream", "cancel"):
            body["stream"] = True
            if kind == "cancel":  # would run to the end of the context unless cancelled
                body.update(max_tokens=4 * ctx, ignore_eos=True)
            ids, finishes, done = set(), 0, 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    res["why"] = f"status {r.status_code}"
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done += 1
                        continue
                    ch = json.loads(data)
                    ids.add(ch["id"])
                    if ch["choices"] and ch["choices"][0].get("finish_reason"):
                        finishes += 1
                    if kind == "cancel":
                        res["ok"], res["why"] = True, "closed after the first chunk"
                        return res  # leaving the block closes the connection mid-stream
            res["id"] = next(iter(ids)) if len(ids) == 1 else None
            res["ok"] = len(ids) == 1 and finishes == 1 and done == 1
            res["why"] = f"ids {len(ids)}, finish chunks {finishes}, [DONE] {done}"
            return res
        if kind == "schema":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "c", "schema": SCHEMA}}
            body["max_tokens"] = 48
        if kind == "tools":
            body["tools"] = TOOLS
        r = await client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            res["why"] = f"status {r.status_code}: {r.text[:200]}"
            return res
        js = r.json()
        ch = js["choices"][0]
        res["id"] = js["id"]
        ok = "message" in ch and "usage" in js
        ok = ok and js["usage"]["completion_tokens"] <= body["max_tokens"]
        if kind == "schema" and ch["finish_reason"] == "stop":
            ok = ok and "city" in json.loads(ch["message"]["content"])
        res["ok"] = bool(ok)
        res["why"] = f"finish {ch['finish_reason']}"
        return res
    except Exception as e:  # an outcome to report, not a crash of the soak
        res["why"] = f"{type(e).__name__}: {e}"
        return res


async def _soak(url: str, n: int, conc: int, ctx: int, seed: int, key: str | None,
                on_quarter=None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    plan = _plan(n, seed)
    sem = asyncio.Semaphore(conc)
    out: list[dict] = []
    quarter = max(1, n // 4)
    marks: dict = {}
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers,
                                 limits=limits) as client:
        async def run(item):
            async with sem:
                o = await _one(client, *item, ctx=ctx)
            out.append(o)
            if len(out) == quarter and on_quarter is not None:
                marks["quarter"] = on_quarter()

        t0 = time.monotonic()
        await asyncio.gather(*(run(it) for it in plan))
        wall = time.monotonic() - t0
        t1 = time.monotonic()
        while True:
            slots = (await client.get("/slots")).json()
            if not any(s.get("is_processing") for s in slots) or time.monotonic() - t1 > 120:
                break
            await asyncio.sleep(0.1)
        settle = time.monotonic() - t1
        health = (await client.get("/health")).status_code
    ids = [o["id"] for o in out if o["id"] is not None]
    by_kind = {k: sum(1 for o in out if o["kind"] == k) for k in KINDS}
    return {"requests": n, "concurrency": conc, "wall_s": round(wall, 1),
            "settle_s": round(settle, 2),
            "outcomes": len(out), "distinct_requests": len({o["i"] for o in out}),
            "failed": [o for o in out if not o["ok"]], "ids": len(ids),
            "distinct_ids": len(set(ids)), "by_kind": by_kind, "health": health,
            "slots_busy_after": sum(1 for s in slots if s.get("is_processing")),
            "n_slots": len(slots), **marks}


def run_soak(url: str, n: int = 500, concurrency: int = 32, ctx: int = 512, seed: int = 0,
             key: str | None = None, watch_rss: bool = False) -> dict:
    """Drive the server at ``url``; see the module docstring. With ``watch_rss`` (server in
    this process) the report has ``rss_quarter_mib`` and ``rss_end_mib``."""
    rep = asyncio.run(_soak(url, n, concurrency, ctx, seed, key,
                            on_quarter=rss_mib if watch_rss else None))
    if watch_rss:
        rep["rss_quarter_mib"] = round(rep.pop("quarter"), 1)
        rep["rss_end_mib"] = round(rss_mib(), 1)
    return rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("-n", "--requests", type=int, default=500)
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=2048, help="total context (split over slots)")
    ap.add_argument("--url", help="drive this server instead of starting one")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.url:
        rep = run_soak(a.url, a.requests, a.concurrency, a.ctx // a.slots, a.seed)
    else:
        from jllama.api import Llama
        from jllama.server.app import ServerSettings, ServerState, ServerThread

        llm = Llama(a.model, ctx_size=a.ctx // a.slots, n_slots=a.slots)
        state = ServerState(llm, ServerSettings(a.model, max_queue=a.requests, timeout=600))
        with ServerThread(state) as s:
            rep = run_soak(s.url, a.requests, a.concurrency, a.ctx // a.slots, a.seed,
                           watch_rss=True)
    rep["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rep["machine"] = f"{os.cpu_count()} CPUs"
    print(json.dumps(rep, indent=1))
    return 0 if not rep["failed"] and rep["health"] == 200 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
