"""Concurrent streaming throughput of `jllama serve` (and optionally llama.cpp's llama-server).

Starts the server on a GGUF with as many slots as the largest concurrency, then for each level
in --streams sends that many streaming /v1/completions requests at once (same prompt,
temperature 0, ignore_eos so random-weight models generate exactly --max-tokens tokens) and
reports: aggregate generated tokens/s (all tokens / wall time of the round), per-stream decode
t/s (median over streams of (tokens - 1) / (last token - first token)), time to first token
(median and max). Each level first runs one untimed round of 4 tokens, so compiles for that
batch shape are not counted. Standard library only (threads + http.client): it runs on a bare
device image.

  python experiments/gpu/serve_streams.py MODEL.gguf --platform gpu --streams 1,8,64 -n 128 \
      [--llama-server build-llamacpp-cuda/bin/llama-server] --out serve.md

CPU smoke test (tiny model, a few minutes on 2 cores):

  python -m jllama synth llama-3.2-1b /tmp/tiny.gguf --tiny --layers 2
  python experiments/gpu/serve_streams.py /tmp/tiny.gguf --streams 1,2 -n 16 \
      --llama-server ~/.cache/llamacpp-0c1e570/bin/llama-server --out /tmp/serve.md
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

PROMPT = ("The history of computing is a story of ideas meeting machines. Early mechanical "
          "calculators gave way to electronic computers, which in turn became smaller, faster "
          "and cheaper, until they fit into every pocket. Describe the next step in detail:")


@dataclass
class Result:
    t0: float
    t_first: float | None = None
    t_end: float | None = None
    tokens: int = 0
    error: str | None = None
    chunks: int = 0


@dataclass
class Round:
    server: str
    streams: int
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            return False
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def one_request(port: int, max_tokens: int, res: Result, timeout: float) -> None:
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            res.error = f"HTTP {r.status}: {r.read(200)!r}"
            return
        counted = None  # the server's own count (usage or llama-server's timings), if it sends one
        for raw in r:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            ev = json.loads(data)
            now = time.perf_counter()
            ch = ev.get("choices") or []
            if ch and ch[0].get("text"):
                res.chunks += 1
                if res.t_first is None:
                    res.t_first = now
                res.t_end = now
            if ev.get("usage"):
                counted = ev["usage"].get("completion_tokens", counted)
            elif ev.get("timings"):
                counted = ev["timings"].get("predicted_n", counted)
        res.tokens = counted if counted else res.chunks
    except (OSError, ValueError, http.client.HTTPException) as e:
        res.error = f"{type(e).__name__}: {e}"


def run_round(port: int, server: str, streams: int, max_tokens: int, timeout: float) -> Round:
    rnd = Round(server, streams)
    threads = []
    start = time.perf_counter()
    for _ in range(streams):
        res = Result(t0=time.perf_counter())
        rnd.results.append(res)
        t = threading.Thread(target=one_request, args=(port, max_tokens, res, timeout), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout + 5)
    rnd.wall = time.perf_counter() - start
    return rnd


def summarize(rnd: Round) -> dict:
    ok = [r for r in rnd.results if r.error is None and r.t_first is not None]
    errors = [r.error for r in rnd.results if r.error is not None]
    row = {"server": rnd.server, "streams": rnd.streams, "ok": len(ok), "errors": len(errors),
           "first_error": errors[0] if errors else ""}
    if not ok:
        return row
    tokens = sum(r.tokens for r in ok)
    wall = max(r.t_end for r in ok) - min(r.t0 for r in ok)
    per = [(r.tokens - 1) / (r.t_end - r.t_first) for r in ok if r.tokens > 1 and r.t_end > r.t_first]
    ttft = [r.t_first - r.t0 for r in ok]
    row.update(tokens=tokens, wall=wall, agg=tokens / wall if wall > 0 else 0.0,
               per_stream=statistics.median(per) if per else 0.0,
               ttft_med=statistics.median(ttft) * 1e3, ttft_max=max(ttft) * 1e3)
    return row


def table(rows: list[dict]) -> str:
    out = ["| server | streams | ok | agg t/s | per-stream t/s (median) | TTFT median ms "
           "| TTFT max ms | tokens | wall s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "agg" not in r:
            out.append(f"| {r['server']} | {r['streams']} | {r.get('ok', 0)} | - | - | - | - | - "
                       f"| - |")
            continue
        out.append(f"| {r['server']} | {r['streams']} | {r['ok']} | {r['agg']:.1f} "
                   f"| {r['per_stream']:.1f} | {r['ttft_med']:.0f} | {r['ttft_max']:.0f} "
                   f"| {r['tokens']} | {r['wall']:.2f} |")
    errs = [f"- {r['server']} x{r['streams']}: {r['errors']} failed, first: {r['first_error']}"
            for r in rows if r.get("errors")]
    return "\n".join(out + ([""] + errs if errs else [])) + "\n"


def bench_server(name: str, cmd: list[str], port: int, args, log_path: str,
                 deadline: float, rows: list[dict]) -> None:
    """Appends one row per level to ``rows`` as it goes (an interrupt keeps those)."""
    print(f"[{name}] starting: {shlex.join(cmd)}", flush=True)
    log = open(log_path, "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_ready(port, proc, min(args.startup_timeout, max(deadline - time.time(), 1))):
            print(f"[{name}] not ready after {time.time() - t0:.0f}s (exit {proc.poll()}); "
                  f"log: {log_path}", flush=True)
            rows += [{"server": name, "streams": s, "ok": 0, "errors": s,
                      "first_error": "server did not start"} for s in args.streams]
            return
        print(f"[{name}] ready in {time.time() - t0:.1f}s", flush=True)
        for s in args.streams:
            if time.time() > deadline:
                print(f"[{name}] x{s}: skipped, time budget spent", flush=True)
                rows.append({"server": name, "streams": s, "ok": 0, "errors": 0})
                continue
            run_round(port, name, s, 4, args.request_timeout)  # untimed: compiles this shape
            row = summarize(run_round(port, name, s, args.max_tokens, args.request_timeout))
            rows.append(row)
            print(table([row]).splitlines()[-1] if "agg" in row else row, flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="GGUF file")
    ap.add_argument("--streams", default="1,8,64", help="concurrency levels (default 1,8,64)")
    ap.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens per request")
    ap.add_argument("--slot-ctx", type=int, default=512, help="context per slot (default 512)")
    ap.add_argument("--llama-server", metavar="PATH", help="also measure llama.cpp's server")
    ap.add_argument("--llama-server-args", default="-ngl 99",
                    help="extra llama-server flags (default '-ngl 99')")
    ap.add_argument("--platform", default=None,
                    help="jllama serve's --platform (its default: JAX_PLATFORMS, else cpu)")
    ap.add_argument("--jllama-args", default="", help="extra `jllama serve` flags")
    ap.add_argument("--no-jllama", action="store_true", help="only llama-server")
    ap.add_argument("--startup-timeout", type=float, default=240, help="seconds (default 240)")
    ap.add_argument("--request-timeout", type=float, default=300, help="seconds (default 300)")
    ap.add_argument("--time-budget", type=float, default=0,
                    help="seconds for everything; levels not started by then are skipped")
    ap.add_argument("--out", help="write the markdown table here too")
    args = ap.parse_args(argv)
    try:
        args.streams = [int(s) for s in args.streams.split(",") if s]
        assert args.streams and min(args.streams) > 0
    except (ValueError, AssertionError):
        print(f"serve_streams: --streams wants positive integers, got '{args.streams}'")
        return 1
    if not os.path.isfile(args.model):
        print(f"serve_streams: no model file {args.model}")
        return 1
    if args.llama_server and not os.access(args.llama_server, os.X_OK):
        print(f"serve_streams: {args.llama_server} is not an executable")
        return 1
    deadline = time.time() + args.time_budget if args.time_budget > 0 else float("inf")
    n_slots = max(args.streams)
    ctx = n_slots * args.slot_ctx
    # server logs next to --out (on the device: $OUT, so they come back), else in /tmp
    log_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else tempfile.gettempdir()
    stem = os.path.splitext(os.path.basename(args.out))[0] if args.out else "serve_streams"
    rows: list[dict] = []
    servers = []
    if not args.no_jllama:
        port = free_port()
        servers.append(("jllama", [sys.executable, "-m", "jllama", "serve", "-m", args.model,
                                   "--host", "127.0.0.1", "--port", str(port), "-np",
                                   str(n_slots), "-c", str(ctx),
                                   *(["--platform", args.platform] if args.platform else []),
                                   *shlex.split(args.jllama_args)], port))
    if args.llama_server:
        port = free_port()
        servers.append(("llama-server", [args.llama_server, "-m", args.model, "--host",
                                         "127.0.0.1", "--port", str(port), "-np", str(n_slots),
                                         "-c", str(ctx), *shlex.split(args.llama_server_args)],
                        port))
    try:
        for name, cmd, port in servers:
            bench_server(name, cmd, port, args, os.path.join(log_dir, f"{stem}_{name}.log"),
                         deadline, rows)
    except KeyboardInterrupt:  # SIGINT from the device script's `timeout`: keep what finished
        print("serve_streams: interrupted, writing the levels that finished", flush=True)
    head = (f"## serve_streams: {os.path.basename(args.model)}\n\n"
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {args.max_tokens} tokens per request "
            f"(ignore_eos, temperature 0), prompt {len(PROMPT)} chars, {n_slots} slots x "
            f"{args.slot_ctx} ctx, load {os.getloadavg()[0]:.2f}\n\n")
    text = head + table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
