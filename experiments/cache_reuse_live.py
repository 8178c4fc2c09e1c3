"""--cache-reuse / n_cache_reuse on llama-server 0c1e570 and on jllama serve (in process), with
the tiny random llama and the hand-built prompts of tests/test_cache_reuse.py (cached:
P J1 C1 J2 C2 J3, then P C1 C2 X; see MOVES there): per request cache_n and the greedy tokens.

    cd <worktree> && PYTHONPATH=. /work/main/.venv/bin/python experiments/cache_reuse_live.py

llama-server runs with --cache-ram 0 (else its host prompt cache brings the whole second
prompt back and cache_n is the prompt less one whatever n_cache_reuse says), -np 1, -fa on.
"""
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import gguf  # noqa: E402
import test_cache_reuse as t  # noqa: E402
from tinymodels import dense_hparams, dense_tensors, write_gguf  # noqa: E402

PORT = 18791
SEED = 27  # the server test's prompts


def requests(post, cached, new):
    base = {"temperature": 0.0, "cache_prompt": True, "id_slot": 0}
    rows = []
    for reuse in (None, 5, 0):  # None: the server's --cache-reuse 8
        post({**base, "prompt": cached, "n_predict": 1})
        body = {**base, "prompt": new, "n_predict": 6, "n_probs": 1}
        if reuse is not None:
            body["n_cache_reuse"] = reuse
        r = post(body)
        toks = [p["id"] for p in r["completion_probabilities"]]
        rows.append((reuse, r["timings"]["cache_n"], toks))
    return rows


def main():
    path = write_gguf(Path("/tmp/cache_reuse_live.gguf"), "llama", dense_hparams(**t.SHP),
                      dense_tensors(5, n_vocab=300, **t.SHP),
                      qtype=gguf.GGMLQuantizationType.Q8_0)
    cached, new = t._prompts(SEED)
    exe = Path.home() / ".cache/llamacpp-0c1e570/bin/llama-server"
    p = subprocess.Popen([str(exe), "-m", str(path), "-c", str(t.CTX), "-np", "1", "--port",
                          str(PORT), "--cache-reuse", "8", "-t", "1", "-fa", "on",
                          "--cache-ram", "0"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)

    def post(body):
        req = urllib.request.Request(f"http://127.0.0.1:{PORT}/completion",
                                     json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        return json.load(urllib.request.urlopen(req))

    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health")
                break
            except Exception:
                time.sleep(0.5)
        theirs = requests(post, cached, new)
    finally:
        p.terminate()
        p.wait()
    from jllama.api import Llama

    llm = Llama(str(path), ctx_size=t.CTX, n_slots=1, compile_cache=False)
    _, c = t._server(llm, cache_reuse=8)
    with c:
        ours = requests(lambda b: c.post("/completion", json=b).json(), cached, new)
    print("| n_cache_reuse | llama-server cache_n | jllama cache_n | llama-server tokens | "
          "jllama tokens |\n|---|---|---|---|---|")
    for (reuse, n1, t1), (_, n2, t2) in zip(theirs, ours):
        print(f"| {'(server 8)' if reuse is None else reuse} | {n1} | {n2} | {t1} | {t2} |")


if __name__ == "__main__":
    main()
