"""llama-server and ``jllama serve --embeddings`` on the same tiny gemma3 model + mmproj: the
embeddings of prompts with images (/embeddings multimodal_data, /v1/embeddings OpenAI content
parts), compared element by element.

    PYTHONPATH=. python experiments/vision_embeddings_parity.py [--pooling mean none]

llama-server pools only its LAST decode batch (the text after the last image); this prints the
max |difference| of every vector for one and two images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vision_server_parity import LLAMA_SERVER, start, tiny_files  # noqa: E402


def requests(imgs: list[str]) -> list[tuple[str, str, dict]]:
    url = "data:image/png;base64,"
    return [
        ("one image", "/embeddings", {"content": [
            {"prompt_string": "What is this: <__media__>\nA picture", "multimodal_data": [imgs[0]]},
            {"prompt_string": "<__media__> is this", "multimodal_data": [imgs[1]]},
            "text only: the text model's own gap"]}),
        ("two images", "/embeddings", {"content": {
            "prompt_string": "First <__media__> then <__media__> and then some words",
            "multimodal_data": [imgs[1], imgs[0]]}}),
        ("OAI content", "/v1/embeddings", {"input": [{"content": [
            {"type": "text", "text": "What is this: "},
            {"type": "image_url", "image_url": {"url": url + imgs[0]}},
            {"type": "text", "text": "\nok"}]}, "text only"], "embd_normalize": 1}),
    ]


def vectors(j) -> list[np.ndarray]:
    if isinstance(j, dict):
        return [np.asarray(d["embedding"], np.float64) for d in j["data"]]
    return [np.asarray(d["embedding"], np.float64) for d in j]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pooling", nargs="+", default=["mean", "none"])
    ap.add_argument("--port", type=int, default=18694)
    a = ap.parse_args()
    import httpx

    d, imgs = tiny_files()
    worst = 0.0
    for pooling in a.pooling:
        common = ["-m", str(d / "text.gguf"), "--mmproj", str(d / "mmproj.gguf"), "-c", "512",
                  "-np", "1", "--host", "127.0.0.1", "--embeddings", "--pooling", pooling]
        reqs = [r for r in requests(imgs) if pooling != "none" or r[1] == "/embeddings"]
        answers: dict[str, list] = {}
        for name, cmd in [("llama-server", [str(LLAMA_SERVER)]),
                          ("jllama", [sys.executable, "-m", "jllama", "serve"])]:
            p = start(cmd + common, a.port, d / f"{name}-{pooling}.log")
            try:
                out = []
                for _, path, body in reqs:
                    r = httpx.post(f"http://127.0.0.1:{a.port}{path}", timeout=300, json=body)
                    if r.status_code != 200:
                        raise RuntimeError(f"{name} {path}: HTTP {r.status_code} {r.text[:300]}")
                    out.append(vectors(r.json()))
                answers[name] = out
            finally:
                p.terminate()
                p.wait(30)
        for i, (label, _, _) in enumerate(reqs):
            for k, (x, y) in enumerate(zip(answers["llama-server"][i], answers["jllama"][i],
                                           strict=True)):
                if x.shape != y.shape:
                    print(f"pooling {pooling}, {label} [{k}]: shapes {x.shape} vs {y.shape}")
                    worst = float("inf")
                    continue
                diff = float(np.max(np.abs(x - y)))
                worst = max(worst, diff)
                print(f"pooling {pooling}, {label} [{k}]: shape {x.shape}, max |diff| {diff:.3e}"
                      f"{' (bit-exact)' if diff == 0 else ''}")
    print(f"worst max |diff| {worst:.3e}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
