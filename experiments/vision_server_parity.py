"""llama-server and ``jllama serve`` on the same tiny gemma3 model + mmproj: the same requests
with images, greedy, and their answers side by side.

    PYTHONPATH=. python experiments/vision_server_parity.py [--tokens 16]

The suite's vision tests (experiments/server_suite.py) can only check that both servers answer
(the tiny random model never says "cat"); this checks that they answer the same: chat with an
image_url data URL, /completion with multimodal_data, two images in one prompt, and the
prompt length of /chat/completions/input_tokens.
"""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LLAMA_SERVER = Path(os.environ.get("LLAMACPP_BIN", Path.home() / ".cache" / "llamacpp-0c1e570")
                    ) / "bin" / "llama-server"


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    import httpx

    p = subprocess.Popen(cmd + ["--port", str(port)], stdout=open(log, "w"),
                         stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO),
                              # llama-server's media marker is random per process without it
                              "LLAMA_MEDIA_MARKER": "<__media__>"})
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        if p.poll() is not None:
            raise RuntimeError(f"{cmd[0]} died: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(1)
    p.kill()
    raise RuntimeError(f"{cmd[0]} did not start: see {log}")


def tiny_files() -> tuple[Path, list[str]]:
    """A tiny gemma3 text model + mmproj (tests/visionmodels.py) in a temporary folder, and two
    random PNG images as base64."""
    sys.path.insert(0, str(REPO / "tests"))
    import visionmodels as V
    from PIL import Image

    d = Path(tempfile.mkdtemp())
    V.write_text_model(d / "text.gguf")
    V.write_mmproj(d / "mmproj.gguf")
    rng = np.random.default_rng(1)
    imgs = []
    for i, shape in enumerate([(32, 32), (48, 80)]):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(d / f"{i}.png")
        imgs.append(base64.b64encode((d / f"{i}.png").read_bytes()).decode())
    return d, imgs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--port", type=int, default=18690)
    a = ap.parse_args()
    import httpx

    d, imgs = tiny_files()
    common = ["-m", str(d / "text.gguf"), "--mmproj", str(d / "mmproj.gguf"), "-c", "512",
              "-np", "1", "--host", "127.0.0.1"]

    def part(i):
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + imgs[i]}}

    reqs = [
        ("chat, one image", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this:\n"}, part(0)]}]}),
        ("chat, two images", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            part(1), {"type": "text", "text": " and "}, part(0)]}]}),
        ("/completion multimodal_data", "/completion", {"prompt": {
            "prompt_string": "What is this: <__media__>\n", "multimodal_data": [imgs[1]]}}),
        ("chat, text only (the text model's own gap)", "/v1/chat/completions", {"messages": [
            {"role": "user", "content": "What is this: a picture of a cat?"}]}),
        ("input_tokens", "/chat/completions/input_tokens", {"messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is this:"}, part(0)]}]}),
    ]
    answers: dict[str, list] = {}
    for name, cmd in [("llama-server", [str(LLAMA_SERVER)]),
                      ("jllama", [sys.executable, "-m", "jllama", "serve"])]:
        p = start(cmd + common, a.port, d / f"{name}.log")
        try:
            out = []
            for _, path, body in reqs:
                r = httpx.post(f"http://127.0.0.1:{a.port}{path}", timeout=300, json={
                    **body, "temperature": 0, "n_predict": a.tokens, "n_probs": 5,
                    "logprobs": True, "top_logprobs": 5})
                j = r.json()
                if r.status_code != 200:
                    out.append((f"HTTP {r.status_code}: {j.get('error', j)}", []))
                elif "input_tokens" in path:
                    out.append((j["input_tokens"], []))
                elif path == "/completion":
                    out.append((j["content"], [[(t["id"], t["logprob"]) for t in p["top_logprobs"]]
                                               for p in j["completion_probabilities"]]))
                else:
                    c = j["choices"][0]
                    out.append((c["message"]["content"],
                                [[(t["id"], t["logprob"]) for t in p["top_logprobs"]]
                                 for p in c["logprobs"]["content"]]))
            answers[name] = out
        finally:
            p.terminate()
            p.wait(30)
    same = 0
    for i, (label, _, _) in enumerate(reqs):
        (x, px), (y, py) = answers["llama-server"][i], answers["jllama"][i]
        same += x == y
        # the top-5 candidates (token ids) at every generated token: same ids, and how far apart
        # their log-probabilities are
        ids_same = [[t for t, _ in a] for a in px] == [[t for t, _ in b] for b in py]
        dmax = max((abs(u - v) for a, b in zip(px, py, strict=False)
                    for (_, u), (_, v) in zip(a, b, strict=False)), default=0.0)
        sets_same = [sorted(t for t, _ in a) for a in px] == [sorted(t for t, _ in b) for b in py]
        if not ids_same:
            k = next(j for j, (a, b) in enumerate(zip(px, py, strict=False)) if a != b)
            print(f"  first differing token {k}: llama-server {px[k]}\n  jllama {py[k]}")
        extra = (f"  top-5 candidates at {len(px)} tokens: {'same' if ids_same else 'DIFFERENT'}"
                 f" (as sets: {'same' if sets_same else 'different'})"
                 f", max |d logprob| {dmax:.2e}" if px or py else "")
        print(f"{label}: {'same' if x == y else 'DIFFERENT'}{extra}\n  llama-server {x!r}\n"
              f"  jllama       {y!r}")
    print(f"{same}/{len(reqs)} identical")
    return 0 if same == len(reqs) else 1


if __name__ == "__main__":
    sys.exit(main())
