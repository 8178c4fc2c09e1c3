"""llama-server (llama.cpp 0c1e570's binary) vs jllama's server on the tiny generated test model
(tests/tinymodels.write_server_model, seed 8): POST /completion, greedy, with DRY, mirostat and
the repetition penalty, one slot each. Greedy so the two servers' different PRNGs do not matter;
the text must be identical.

    PYTHONPATH=. python experiments/mirostat_dry_vs_llama_server.py [/tmp/tiny.gguf]
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tinymodels import write_server_model  # noqa: E402

from jllama.api import Llama  # noqa: E402
from jllama.server.app import ServerSettings, ServerState, ServerThread  # noqa: E402

BIN = os.path.expanduser("~/.cache/llamacpp-0c1e570/bin/llama-server")
CASES = {
    "dry greedy": dict(temperature=0.0, dry_multiplier=2.0, dry_allowed_length=1),
    "dry greedy, breakers [' ']": dict(temperature=0.0, dry_multiplier=1.0,
                                       dry_allowed_length=2, dry_sequence_breakers=[" "]),
    "dry greedy + repeat penalty": dict(temperature=0.0, dry_multiplier=0.8, repeat_penalty=1.3),
    "mirostat 2, temp 0, repeat penalty": dict(temperature=0.0, mirostat=2, repeat_penalty=1.5),
    "mirostat 1, temp 0": dict(temperature=0.0, mirostat=1),
    "plain greedy, repeat penalty": dict(temperature=0.0, repeat_penalty=1.5),
}
PROMPTS = ["Once upon a time, there", "The cat: the cat: the"]


def run(url: str) -> dict:
    out = {}
    with httpx.Client(base_url=url, timeout=300) as c:
        for p in PROMPTS:
            for k, v in CASES.items():
                r = c.post("/completion", json={"prompt": p, "n_predict": 24,
                                                "cache_prompt": False, **v})
                out[(p, k)] = r.json().get("content")
    return out


def wait_health(url: str, tries: int = 100) -> None:
    """Until ``url``'s /health answers 200 (0.3 s apart), else exit."""
    for _ in range(tries):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("llama-server did not start")


def main() -> None:
    path = write_server_model(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny_miro.gguf",
                              seed=8)
    proc = subprocess.Popen([BIN, "-m", str(path), "--port", "18931", "-c", "256", "-np", "1",
                             "-t", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_health("http://127.0.0.1:18931")
        ref = run("http://127.0.0.1:18931")
    finally:
        proc.terminate()
        proc.wait()
    llm = Llama(str(path), ctx_size=256, n_slots=1)
    with ServerThread(ServerState(llm, ServerSettings("tiny"))) as s:
        ours = run(s.url)
    same = 0
    for key in ref:
        ok = ref[key] == ours[key]
        same += ok
        print(f"| {key[0]!r} | {key[1]} | {'same' if ok else 'DIFFERENT'} | {ref[key]!r} | "
              f"{ours[key]!r} |")
    print(same, "of", len(ref), "identical")


if __name__ == "__main__":
    main()
