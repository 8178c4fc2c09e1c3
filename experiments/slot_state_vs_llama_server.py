"""Slot save/restore/erase and context shift: the same requests to llama-server and to
``jllama serve`` (same model, same flags), their answers side by side (timings left out).

    PYTHONPATH=. python experiments/slot_state_vs_llama_server.py [--model GGUF] [--port 19380]

Both servers start with ``-c 512 -np 2 --slot-save-path DIR --context-shift``; a table of every
field that should agree (counts, ids, errors, greedy text) goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

LLAMA_SERVER = Path.home() / ".cache" / "llamacpp-0c1e570" / "bin" / "llama-server"

P1 = "What is the capital of France?"
P2 = "What is the capital of Germany?"
LONG = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
        "incididunt ut labore et dolore magna aliqua. ") * 4


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    t0 = time.time()
    while time.time() - t0 < 900:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        if p.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: see {log}")
        time.sleep(1)
    raise RuntimeError("server did not start")


def scenario(url: str) -> list[tuple[str, object]]:
    c = httpx.Client(base_url=url, timeout=600)
    out: list[tuple[str, object]] = []

    def comp(tag, prompt, **kw):
        r = c.post("/completion", json={"prompt": prompt, "temperature": 0.0, "n_predict": 16,
                                        "cache_prompt": True, **kw})
        b = r.json()
        if r.status_code != 200:
            out.append((tag, (r.status_code, b["error"]["message"])))
            return
        t = b["timings"]
        out.append((tag, {"prompt_n": t["prompt_n"], "cache_n": t["cache_n"],
                          "predicted_n": t["predicted_n"], "truncated": b["truncated"],
                          "tokens_cached": b["tokens_cached"], "id_slot": b["id_slot"],
                          "content": b["content"]}))

    def act(tag, slot, action, body=None):
        r = c.post(f"/slots/{slot}", params={"action": action}, json=body)
        b = r.json()
        if r.status_code != 200:
            out.append((tag, (r.status_code, b["error"]["type"], b["error"]["message"])))
        else:
            b.pop("timings", None)
            b.pop("n_written", None)  # file formats differ
            b.pop("n_read", None)
            out.append((tag, b))

    comp("P1 on slot 1", P1, id_slot=1)
    act("save slot 1", 1, "save", {"filename": "s1.bin"})
    comp("P2 on slot 1", P2, id_slot=1)
    act("restore into slot 0", 0, "restore", {"filename": "s1.bin"})
    comp("P2 on slot 0", P2, id_slot=0)
    comp("P2 on slot 1 again", P2, id_slot=1)
    act("erase slot 1", 1, "erase")
    comp("P1 on slot 1 after erase", P1, id_slot=1)
    act("bad action", 0, "fly", {"filename": "x"})
    act("bad slot id", "abc", "save", {"filename": "x"})
    act("negative slot id", -3, "save", {"filename": "x"})
    act("slot id 3 (wraps)", 3, "save", {"filename": "w.bin"})
    act("filename ../x", 0, "save", {"filename": "../x"})
    act("missing file", 0, "restore", {"filename": "none.bin"})
    comp("shift: long prompt, 200 tokens", LONG, n_predict=200, id_slot=0)
    comp("shift: n_keep -1", LONG, n_predict=200, id_slot=1, n_keep=-1)
    comp("same prompt after n_keep -1", LONG, n_predict=4, id_slot=1)
    comp("prompt over the context", LONG * 3, n_predict=4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--port", type=int, default=19380)
    a = ap.parse_args()
    if a.model is None:
        from jllama.registry import fetch

        a.model = str(fetch("smollm2-135m-instruct", quiet=True))
    work = Path(tempfile.mkdtemp(prefix="slotcmp"))
    flags = ["-m", a.model, "-c", "512", "-np", "2", "--context-shift", "--temp", "0"]
    results = {}
    for name, cmd in (("llama-server", [str(LLAMA_SERVER), "-t", "2", "--no-webui"]),
                      ("jllama", [sys.executable, "-m", "jllama", "serve"])):
        d = work / name
        d.mkdir()
        port = a.port + (0 if name == "llama-server" else 1)
        p = start(cmd + flags + ["--port", str(port), "--slot-save-path", str(d)], port,
                  work / f"{name}.log")
        try:
            results[name] = scenario(f"http://127.0.0.1:{port}")
        finally:
            p.terminate()
            p.wait(30)
    print("| step | llama-server | jllama | same |\n|---|---|---|---|")
    for (tag, x), (_, y) in zip(results["llama-server"], results["jllama"], strict=True):
        xs, ys = json.dumps(x, ensure_ascii=False), json.dumps(y, ensure_ascii=False)
        print(f"| {tag} | `{xs}` | `{ys}` | {'yes' if x == y else '**no**'} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
