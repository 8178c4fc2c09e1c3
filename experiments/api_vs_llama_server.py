"""/infill, /v1/messages and /v1/responses: the same requests to llama-server and to
``jllama serve`` on one tiny generated llama (ChatML template, Qwen's FIM tokens), greedy;
prints, per request, whether the answers agree (text, token counts, the infill prompt text).

    PYTHONPATH=. python experiments/api_vs_llama_server.py [--model M.gguf]

Without --model the model is tests/tinymodels.write_server_model(seed=8). Both
servers get llama-server's flags of llama.cpp's infill preset (-c 2048 -b 1024 -np 1 -n 64
--temp 0 -s 42).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
LLAMA_SERVER = Path.home() / ".cache" / "llamacpp-0c1e570" / "bin" / "llama-server"
FLAGS = ["-c", "2048", "-b", "1024", "-np", "1", "-n", "64", "--temp", "0", "-s", "42"]
PRE = "#include <cstdio>\n#include \"llama.h\"\n\nint main() {\n"
REQUESTS = [
    ("/infill", {"input_prefix": PRE, "prompt": "    int n_threads = llama_",
                 "input_suffix": "}\n"}),
    ("/infill", {"input_extra": [{"filename": "llama.h",
                                  "text": "LLAMA_API int32_t llama_n_threads();\n"}],
                 "input_prefix": PRE, "prompt": "    int n_threads = llama_",
                 "input_suffix": "}\n"}),
    # prefix and suffix cut to the batch, extra context to what the context leaves
    ("/infill", {"input_extra": [{"text": "x" * 3000}, {"filename": "b.c", "text": "int y;\n"}],
                 "input_prefix": PRE * 40, "input_suffix": "}\n" * 400, "n_predict": 8}),
    ("/infill", {"input_prefix": ["int ", 300, " x"], "input_suffix": "", "n_predict": 8}),
    ("/v1/messages", {"max_tokens": 16, "system": [{"type": "text", "text": "Be brief."}],
                      "messages": [{"role": "user", "content": "Say hello"}]}),
    ("/v1/messages", {"max_tokens": 16, "stop_sequences": ["m m"],
                      "messages": [{"role": "user", "content": "Count to 10"}]}),
    ("/v1/messages/count_tokens", {"system": "You are terse.",
                                   "messages": [{"role": "user", "content": "Hello world"}]}),
    ("/v1/responses", {"instructions": "Book", "input": "What is the best book",
                       "max_output_tokens": 16}),
    ("/v1/responses/input_tokens", {"instructions": "x", "input": "Hello world"}),
]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    p = subprocess.Popen(cmd + ["--port", str(port)], stdout=log.open("w"),
                         stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        if p.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited; see {log}")
        time.sleep(1)
    raise SystemExit(f"{cmd[0]} did not start; see {log}")


def summary(path: str, d: dict) -> dict:
    """The fields both servers must agree on (ids and times differ by design)."""
    if path == "/infill":
        return {k: d.get(k) for k in ("content", "prompt", "tokens_evaluated",
                                      "tokens_predicted", "stop_type")}
    if path == "/v1/messages":
        return {k: d.get(k) for k in ("content", "stop_reason", "stop_sequence")} | {
            "tokens": d["usage"]["input_tokens"] + d["usage"]["cache_read_input_tokens"],
            "output_tokens": d["usage"]["output_tokens"]}
    if path == "/v1/responses":
        return {"output": [c["text"] for o in d["output"] for c in o.get("content", [])],
                "usage": {k: d["usage"][k] for k in ("input_tokens", "output_tokens")}}
    return d


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--work", default="/tmp/api_vs_llama_server")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = a.model
    if model is None:
        sys.path.insert(0, str(REPO / "tests"))
        from tinymodels import write_server_model

        # seed 8: greedy text that is not only newlines (the stop sequence below is met)
        model = str(write_server_model(work / "tiny-fim.gguf", seed=8))
    out = {}
    for name, cmd, port in (
            ("llama-server", [str(LLAMA_SERVER), "-m", model, *FLAGS], 18431),
            ("jllama", [sys.executable, "-m", "jllama", "serve", "-m", model, *FLAGS], 18432)):
        p = start(cmd, port, work / f"{name}.log")
        try:
            out[name] = [summary(path, httpx.post(f"http://127.0.0.1:{port}{path}", json=body,
                                                  timeout=300).json())
                         for path, body in REQUESTS]
        finally:
            p.terminate()
            p.wait(30)
    same = 0
    for i, (path, _) in enumerate(REQUESTS):
        a_, b_ = out["llama-server"][i], out["jllama"][i]
        same += a_ == b_
        print(f"{i} {path}: {'same' if a_ == b_ else 'DIFFERENT'}: "
              f"{json.dumps(a_, ensure_ascii=False)[:160]}")
        if a_ != b_:
            print("  llama-server:", json.dumps(a_, ensure_ascii=False)[:400])
            print("  jllama:      ", json.dumps(b_, ensure_ascii=False)[:400])
    print(f"{same}/{len(REQUESTS)} answers agree")
    return 0 if same == len(REQUESTS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
