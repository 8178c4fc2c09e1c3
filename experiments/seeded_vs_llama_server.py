"""llama-server (llama.cpp 0c1e570's binary) vs jllama's server on SmolLM2-135M-Instruct Q4_1:
POST /completion with a fixed seed at temperature > 0, one slot each (llama.cpp's logits are
then bit-identical to ours). The text, and with n_probs + post_sampling_probs the reported
candidates and probabilities, must be identical.

    PYTHONPATH=. python experiments/seeded_vs_llama_server.py [CASE-SUBSTRING]
"""
import os
import subprocess
import sys

import httpx
from mirostat_dry_vs_llama_server import wait_health

from jllama import registry
from jllama.api import Llama
from jllama.server.app import ServerSettings, ServerState, ServerThread

BIN = os.path.expanduser("~/.cache/llamacpp-0c1e570/bin/llama-server")
CASES = {
    "defaults, seed 42": dict(seed=42),
    "temp 1, seed 4242": dict(seed=4242, temperature=1.0),
    "temp 1.3, top_k 0, top_p 0.9": dict(seed=7, temperature=1.3, top_k=0, top_p=0.9),
    "top_k 0, top_p 1, min_p 0.02 (token order)": dict(seed=9, temperature=1.0, top_k=0,
                                                       top_p=1.0, min_p=0.02),
    "typical 0.8": dict(seed=11, temperature=1.0, typical_p=0.8, top_p=1.0),
    "xtc": dict(seed=13, temperature=1.0, xtc_probability=0.5, xtc_threshold=0.05),
    "dynatemp": dict(seed=17, temperature=0.9, dynatemp_range=0.4),
    "repeat + presence penalty": dict(seed=19, temperature=1.0, repeat_penalty=1.2,
                                      presence_penalty=0.3),
    "grammar (redraws)": dict(seed=23, temperature=1.2,
                              grammar='root ::= [A-Z] [a-z]+ (" " [a-z]+)* "."'),
    "post_sampling_probs": dict(seed=29, temperature=1.0, n_probs=5, post_sampling_probs=True),
    "mirostat 1 + post_sampling_probs": dict(seed=31, temperature=1.0, mirostat=1,
                                             n_probs=3, post_sampling_probs=True),
    "mirostat 2, tau 4": dict(seed=37, temperature=0.9, mirostat=2, mirostat_tau=4.0),
}
PROMPTS = ["<|im_start|>user\nTell me a story about a dragon.<|im_end|>\n<|im_start|>assistant\n",
           "The capital of France is"]


def run(url: str) -> dict:
    out = {}
    with httpx.Client(base_url=url, timeout=600) as c:
        for p in PROMPTS:
            for k, v in CASES.items():
                if len(sys.argv) > 1 and sys.argv[1] not in k:
                    continue
                r = c.post("/completion", json={"prompt": p, "n_predict": 48,
                                                "cache_prompt": False, **v}).json()
                probs = [(e["id"], [(t["id"], t["prob"]) for t in e["top_probs"]])
                         for e in r.get("completion_probabilities", [])]
                out[(p, k)] = (r.get("content"), probs)
    return out


def main() -> None:
    path = registry.fetch("smollm2-135m-instruct", quiet=True)
    proc = subprocess.Popen([BIN, "-m", str(path), "--port", "18937", "-c", "512", "-np", "1",
                             "-t", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_health("http://127.0.0.1:18937", tries=400)
        ref = run("http://127.0.0.1:18937")
    finally:
        proc.terminate()
        proc.wait()
    llm = Llama(str(path), ctx_size=512, n_slots=1)
    with ServerThread(ServerState(llm, ServerSettings("smollm2"))) as s:
        ours = run(s.url)
    same = 0
    print("| prompt | case | text | probs | llama-server text |")
    print("|---|---|---|---|---|")
    for key in ref:
        t_ok = ref[key][0] == ours[key][0]
        p_ok = ref[key][1] == ours[key][1]
        same += t_ok and p_ok
        print(f"| {key[0][:24]!r} | {key[1]} | {'same' if t_ok else 'DIFFERENT'} | "
              f"{'same' if p_ok else 'DIFFERENT'} | {ref[key][0][:60]!r} |")
        if not t_ok:
            print(f"|  | jllama |  |  | {ours[key][0][:60]!r} |")
    print(same, "of", len(ref), "identical")


if __name__ == "__main__":
    main()
