"""Bounded load test of ``jllama serve``: one stream vs many concurrent streams on one server.

Starts ``jllama serve`` as a subprocess on 127.0.0.1 (loopback only), then
  1. one streaming client at a time (the single-stream baseline),
  2. as many concurrent clients as slots, equal lengths,
  3. 16 concurrent clients with different lengths (more clients than slots: queueing),
and prints aggregate generated tokens/s, the ratio to the single stream, and latency / time-to-
first-token percentiles, next to llama.cpp's figures from shared/reference/llama-cpp-cpu.md.
End-of-generation tokens are banned with logit_bias so every request generates exactly
max_tokens, which makes token counts comparable. Everything is bounded: request count, tokens
and a wall-clock limit (--time-limit).

    python experiments/bench_server.py [--parallel 4] [--tokens 48] [--clients 16]

Side by side with llama-server (issue #18 item 6), one run, same model and flags for both
(``-np N -c N*ctx``, llama-server's names, which ``jllama serve`` takes): for each N in
``--streams`` a fresh server of each kind with N slots gets N concurrent streams of
``--tokens`` tokens (after a warm-up round), and the table gives aggregate tokens/s, latency
and time-to-first-token p50/p95, and jllama's ratio:

    python experiments/bench_server.py --vs-llama-server [BIN] [--streams 4,16,64] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time, in a small village by the sea,",
           "The history of the printing press begins",
           "Here is a list of ten fruits:",
           "In computer science, a hash table is"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


async def one(client: httpx.AsyncClient, prompt: str, n: int, ban: dict) -> dict:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "logit_bias": ban, "cache_prompt": False,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, text = None, 0, []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            for c in d["choices"]:
                if c["text"] and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(c["text"])
    return {"latency": time.perf_counter() - t0, "ttft": ttft or float("nan"), "tokens": tokens,
            "text": "".join(text)}


async def scenario(url: str, jobs: list[tuple[str, int]], ban: dict) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(client, p, n, ban) for p, n in jobs))
        wall = time.perf_counter() - t0
    toks = sum(r["tokens"] for r in res)
    return {"wall": wall, "tokens": toks, "tps": toks / wall, "results": res,
            "lat": [r["latency"] for r in res], "ttft": [r["ttft"] for r in res]}


def start_server(cmd: list[str], url: str, limit: float) -> tuple[subprocess.Popen, float]:
    """Start a server and wait for /health: (process, seconds to ready)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        if time.perf_counter() - t0 > limit:
            proc.kill()
            raise RuntimeError(f"{cmd[0]} did not start in {limit:.0f} s")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def compare(args) -> int:
    """jllama serve and llama-server side by side at each stream count (module docstring)."""
    from jllama.registry import resolve_model

    model = str(resolve_model(args.model))
    bin_ = args.vs_llama_server
    streams = [int(x) for x in args.streams.split(",")]
    rows = []
    for n in streams:
        for kind in ("llama-server", "jllama"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            common = ["-m", model, "-np", str(n), "-c", str(n * args.ctx_size), "--host",
                      "127.0.0.1", "--port", str(port), "-t", str(args.threads)]
            cmd = ([bin_, *common] if kind == "llama-server" else
                   [sys.executable, "-m", "jllama", "serve", *common, "--max-queue",
                    str(max(64, n)), "--timeout", str(args.time_limit)])
            proc, up = start_server(cmd, url, args.time_limit)
            try:
                tok = httpx.post(url + "/tokenize",
                                 json={"content": "<|im_end|><|endoftext|>"}).json()
                ban = {str(t): -100 for t in tok["tokens"]}
                jobs = [(PROMPTS[i % 4], args.tokens) for i in range(n)]
                asyncio.run(scenario(url, [(p, 8) for p, _ in jobs], ban))  # warm-up
                r = asyncio.run(scenario(url, jobs, ban))
            finally:
                stop_server(proc)
            ok = all(x["tokens"] == args.tokens for x in r["results"])
            rows.append((n, kind, up, r, ok))
            print(f"{kind:>12} {n:>3} streams: {r['tps']:7.1f} tok/s, latency p50 "
                  f"{pct(r['lat'], 50):.2f} s, ttft p50 {pct(r['ttft'], 50):.2f} s "
                  f"(ready in {up:.1f} s; every stream got its tokens: {ok})", flush=True)
    print(f"\n{args.model}, {args.tokens} tokens per stream (EOS banned, greedy, no prompt "
          f"cache), ctx {args.ctx_size} per slot, -t {args.threads}, {os.cpu_count()} CPUs\n")
    print("| streams | server | tok/s | latency p50 / p95 s | TTFT p50 / p95 s | jllama / "
          "llama-server tok/s |")
    print("| ---: | --- | ---: | --- | --- | ---: |")
    by = {(n, k): r for n, k, _, r, _ in rows}
    for n, kind, _, r, _ in rows:
        ratio = (f"{r['tps'] / by[(n, 'llama-server')]['tps']:.2f}" if kind == "jllama"
                 else "")
        print(f"| {n} | {kind} | {r['tps']:.1f} | {pct(r['lat'], 50):.2f} / "
              f"{pct(r['lat'], 95):.2f} | {pct(r['ttft'], 50):.2f} / {pct(r['ttft'], 95):.2f} "
              f"| {ratio} |")
    return 0 if all(ok for *_, ok in rows) else 1


def llamacpp_figures() -> str:
    p = REPO.parent / "shared" / "reference" / "llama-cpp-cpu.md"
    if not p.exists():
        return "(reference file not found)"
    text = p.read_text()
    out = []
    m = re.search(r"SmolLM2-135M-Instruct Q4_1 \| [^|]+\| (\d+) \| (\d+) \|", text)
    if m:
        out.append(f"llama.cpp llama-bench SmolLM2 Q4_1, 2 threads: pp512 {m.group(1)} t/s, "
                   f"tg128 {m.group(2)} t/s (single stream)")
    m = re.search(r"## Server.*?\n\n(.*?)\n\n", text, re.S)
    if m:
        out.append("llama-server: " + " ".join(m.group(1).split()))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--ctx-size", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=48, help="tokens per request (baseline)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--singles", type=int, default=2, help="single-stream repetitions")
    ap.add_argument("--time-limit", type=float, default=900.0)
    ap.add_argument("--vs-llama-server", nargs="?", metavar="BIN", const=str(
        Path.home() / ".cache" / "llamacpp-0c1e570" / "bin" / "llama-server"),
        help="side by side with this llama-server (default: the shared build's)")
    ap.add_argument("--streams", default="4,16,64")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if args.vs_llama_server:
        if args.ctx_size == 512 and args.tokens == 48:
            args.tokens = 64
        return compare(args)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "jllama", "serve", "-m", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--parallel", str(args.parallel), "--ctx-size",
           str(args.ctx_size), "--max-queue", str(max(64, args.clients)), "--timeout",
           str(args.time_limit)]
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if proc.poll() is not None:
                print(proc.stderr.read(), file=sys.stderr)
                return 1
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t_start > args.time_limit:
                print("server did not start in time", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"server up in {time.perf_counter() - t_start:.1f} s (load + compile)")
        tok = httpx.post(url + "/tokenize", json={"content": "<|im_end|><|endoftext|>"}).json()
        ban = {str(t): -100 for t in tok["tokens"]}
        n = args.tokens
        # warm every shape the scenarios use (first-call compiles are not throughput)
        asyncio.run(scenario(url, [(p, 8) for p in PROMPTS[: args.parallel]], ban))
        asyncio.run(scenario(url, [(PROMPTS[0], 8)], ban))

        single = [asyncio.run(scenario(url, [(PROMPTS[i % 4], n)], ban))
                  for i in range(args.singles)]
        base_tps = sorted(s["tps"] for s in single)[len(single) // 2]
        par = asyncio.run(scenario(url, [(PROMPTS[i % 4], n) for i in range(args.parallel)],
                                   ban))
        lengths = [n // 2 + (i * 7) % n for i in range(args.clients)]
        many = asyncio.run(scenario(url, [(PROMPTS[i % 4], lengths[i])
                                          for i in range(args.clients)], ban))
        ok = all(r["tokens"] == lengths[i] for i, r in enumerate(many["results"]))
        # greedy outputs must not depend on the batch: same prompt+length -> same text as
        # the prefix of the single-stream/parallel outputs for that prompt
        ref = {PROMPTS[i % 4]: r["text"] for i, r in enumerate(par["results"])}
        same = all(ref[PROMPTS[i % 4]].startswith(r["text"]) or r["text"].startswith(
            ref[PROMPTS[i % 4]]) for i, r in enumerate(many["results"]))
        metrics = httpx.get(url + "/metrics").text
        busy = re.search(r"^jllama_requests_processing (\d+)", metrics, re.M)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()

    print(f"\nmodel {args.model}, {args.parallel} slots, ctx {args.ctx_size} per slot, "
          f"{os.cpu_count()} CPUs visible; greedy, EOS banned\n")
    print(f"{'scenario':<38} {'reqs':>4} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'x1':>5} "
          f"{'lat p50':>7} {'p90':>6} {'p99':>6} {'ttft p50':>8} {'p90':>6}")

    def row(name: str, s: dict) -> None:
        print(f"{name:<38} {len(s['results']):>4} {s['tokens']:>6} {s['wall']:>7.2f} "
              f"{s['tps']:>7.1f} {s['tps'] / base_tps:>5.2f} {pct(s['lat'], 50):>7.2f} "
              f"{pct(s['lat'], 90):>6.2f} {pct(s['lat'], 99):>6.2f} {pct(s['ttft'], 50):>8.2f} "
              f"{pct(s['ttft'], 90):>6.2f}")

    for i, s in enumerate(single):
        row(f"1 stream x {n} tokens (run {i + 1})", s)
    row(f"{args.parallel} concurrent x {n} tokens", par)
    row(f"{args.clients} concurrent, {min(lengths)}-{max(lengths)} tokens", many)
    print(f"\nspeed-up with {args.parallel} slots: {par['tps'] / base_tps:.2f}x "
          f"({args.clients} clients: {many['tps'] / base_tps:.2f}x); goal >= 2.5x")
    print(f"all {args.clients} clients got their token count: {ok}; outputs consistent with "
          f"the batch-free ones: {same}; slots busy afterwards: "
          f"{busy.group(1) if busy else '?'}")
    print("\n" + llamacpp_figures())
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
