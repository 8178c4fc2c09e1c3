"""The C++ flash attention on a real model's tensors: llama.cpp (flash attention on) runs a
prompt, then decodes one token; its own Qcur/Kcur/Vcur of every layer go through
``cpu_attention.ggml_flash_attn`` and the result must equal its ``kqv_out`` bit for bit.

    python experiments/fa_kernel_vs_llamacpp.py [-m smollm2-135m-instruct] [--prompt 600]
        [--threads 2] [--kernel-threads N]

The prompt (WikiText-2 tokens) is one ubatch: ``--prompt`` >= 64 takes ggml's tiled path, less
the one_chunk path. The decode step takes the split-KV path once llama.cpp's n_kv (positions
padded to 256) reaches 512, chunked by ``--threads``; ``--kernel-threads`` different from it is
a control that must report differences there.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numerics_vs_llamacpp as nv  # noqa: E402

# Gemma 3: Q scaled by 1/sqrt(head_dim) before attention (scale 1), 5 of 6 layers windowed
MODELS = {
    "smollm2-135m-instruct": dict(q_scale=1.0, scale=0.125, window=None, swa=None),
    "gemma3-270m": dict(q_scale=0.0625, scale=1.0, window=512, swa=lambda il: (il + 1) % 6 != 0),
}
NAMES = ("Qcur", "Kcur", "Vcur", "kqv_out")


def llama_steps(path: str, ids: list[int], threads: int, n_ctx: int) -> list[dict]:
    """llama.cpp's Q/K/V (after rope) and attention output of each layer, for the prompt
    ``ids[:-1]`` (one ubatch) and then the decode of ``ids[-1]``."""
    import llama_cpp as lc

    cur: dict[str, np.ndarray] = {}

    def cb(tp, ask, _ud):
        if ask:
            return True
        t = ctypes.cast(tp, ctypes.POINTER(nv.GGMLTensor)).contents
        name = t.name.decode(errors="replace")
        if name.split("-")[0] in NAMES:
            a = nv._read_tensor(t)
            if a is not None:
                cur[name] = a  # the last of a reused name: Qcur/Kcur after rope
        return True

    cb_c = lc.ggml_backend_sched_eval_callback(cb)
    model, ctx = nv.open_llamacpp(path, cb_c, n_ctx, n_ctx, n_ctx, threads)
    steps = []
    for chunk, p0 in ((ids[:-1], 0), (ids[-1:], len(ids) - 1)):
        cur.clear()
        batch = lc.llama_batch_init(len(chunk), 0, 1)
        nv.fill_batch(batch, chunk, p0)
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        steps.append(dict(cur))
        lc.llama_batch_free(batch)
    nv.close_llamacpp(model, ctx)
    del cb_c
    return steps


def main() -> int:
    from jllama.api import Llama
    from jllama.kernels import cpu_attention
    from jllama.registry import fetch

    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct", choices=sorted(MODELS))
    ap.add_argument("--prompt", type=int, default=600, help="prompt tokens before the decode")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--kernel-threads", type=int, default=0, help="n_threads given to ours")
    a = ap.parse_args()
    cfg = MODELS[a.model]
    n_ctx = 2048
    text = (Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw")
    ids = Llama(a.model, ctx_size=n_ctx).tokenize(text.read_text()[:50000])[: a.prompt + 1]
    pre, dec = llama_steps(str(fetch(a.model)), ids, a.threads, n_ctx)
    n = len(ids)
    kth = a.kernel_threads or a.threads
    same = total = 0
    for step, (tensors, t, p0) in enumerate(((pre, n - 1, 0), (dec, 1, n - 1))):
        kv_len = min(n_ctx, max(256, -(-(p0 + t) // 256) * 256))  # llama.cpp's n_kv
        layers = sorted({int(k.split("-")[1]) for k in tensors if k.startswith("kqv_out-")})
        for il in layers:
            q = tensors[f"Qcur-{il}"].reshape(1, t, -1, tensors[f"Qcur-{il}"].shape[-1])
            q = q * np.float32(cfg["q_scale"])
            kvh, d = pre[f"Kcur-{il}"].shape[-2:]
            k = np.zeros((1, kvh, kv_len, d), np.float16)
            v = np.zeros((1, kvh, kv_len, pre[f"Vcur-{il}"].shape[-1]), np.float16)
            for src, p, m in ((pre, 0, n - 1), (dec, n - 1, 1)) if step else ((pre, 0, n - 1),):
                k[0, :, p:p + m] = src[f"Kcur-{il}"].reshape(m, kvh, -1).transpose(1, 0, 2)
                v[0, :, p:p + m] = src[f"Vcur-{il}"].reshape(m, kvh, -1).transpose(1, 0, 2)
            window = cfg["window"] if cfg["swa"] and cfg["swa"](il) else None
            got = np.asarray(cpu_attention.ggml_flash_attn(
                jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray([p0], jnp.int32),
                kv_len, cfg["scale"], window=window, n_threads=kth))[0]
            ref = tensors[f"kqv_out-{il}"].reshape(t, -1)
            nd = int(np.count_nonzero(got.view(np.uint32) != ref.view(np.uint32)))
            total += 1
            same += nd == 0
            if nd:
                print(f"  {'decode' if step else 'prompt'} layer {il}: {nd} values differ, "
                      f"max {np.abs(got - ref).max():.3g}")
        path = "split-KV" if step and kv_len >= 512 else ("tiled" if t >= 64 else "one_chunk")
        print(f"{a.model} {'decode' if step else 'prompt'} T={t} pos0={p0} n_kv={kv_len} "
              f"({path}, llama.cpp {a.threads} threads, ours {kth})")
    print(f"{same}/{total} layer outputs bit-identical")
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
