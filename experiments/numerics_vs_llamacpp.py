"""Layer-by-layer numerics: jllama against llama.cpp (llama-cpp-python 0.3.36) on one prompt.

    python experiments/numerics_vs_llamacpp.py [-m MODEL] [-p PROMPT] [--fa] [--ubatch N]
        [--exact] [--tensors attn_norm,Qcur,...] [--layers 0,1,29]

llama.cpp side: ``cb_eval`` (the scheduler's eval callback) copies every named graph tensor
("attn_norm-0", "Qcur-0", "kqv_out-0", "ffn_out-0", "l_out-0", "result_output", ...) as it is
computed. jllama side: ``Numerics(taps=True)`` sends to ``models.common.TAP_SINK`` the same quantities under the same names
from inside the jitted forward pass (``jax.debug.callback``). The report prints, per layer and
per tensor, the largest absolute and relative difference, so the first op where the two
diverge stands out; ``--fa`` runs llama.cpp with flash attention (what llama-perplexity and
llama-cli use by default), otherwise with the non-FA path (llama-cpp-python's default).

Relative difference = max|a - b| / max|b|. Differences of ~1e-6 are f32 summation order;
~1e-3 is f16 rounding; ~1e-2 means an activation crossed a Q8 rounding boundary differently.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

import numpy as np

# --------------------------------------------------------------------------- llama.cpp side
GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


class GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ggml at llama.cpp 0c1e570 (ggml/include/ggml.h)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _read_tensor(t: GGMLTensor) -> np.ndarray | None:
    """A host (CPU backend) f32/f16 tensor as numpy, shape in ggml order reversed."""
    if t.type not in (GGML_TYPE_F32, GGML_TYPE_F16) or not t.data:
        return None
    dt = np.float32 if t.type == GGML_TYPE_F32 else np.float16
    ne = [int(t.ne[i]) for i in range(GGML_MAX_DIMS)]
    nb = [int(t.nb[i]) for i in range(GGML_MAX_DIMS)]
    span = sum((n - 1) * s for n, s in zip(ne, nb)) + np.dtype(dt).itemsize
    buf = (ctypes.c_char * span).from_address(t.data)
    arr = np.lib.stride_tricks.as_strided(np.frombuffer(buf, dtype=np.uint8),
                                          shape=ne[::-1] + [np.dtype(dt).itemsize],
                                          strides=nb[::-1] + [1])
    return np.ascontiguousarray(arr).view(dt)[..., 0].astype(np.float32)


def _quiet(level, text, ud):
    pass


def _make_quiet():
    import llama_cpp as lc

    return lc.llama_log_callback(_quiet)


_QUIET = None


def open_llamacpp(path: str, cb_c, n_ctx: int, n_batch: int, n_ubatch: int, threads: int,
                  flash_attn: bool = True, extra_bufts: bool = False):
    """(model, context) of llama.cpp through its C API with the eval callback ``cb_c`` (a
    ``ggml_backend_sched_eval_callback``). Weights in extra buffers (AMX on Intel Xeons,
    repacked Q4_0/Q4_K) are not readable by the callback and crash on this CPU; without them
    ggml runs its stock kernels. The caller frees both (``close_llamacpp``)."""
    import llama_cpp as lc

    global _QUIET
    _QUIET = _QUIET or _make_quiet()
    lc.llama_log_set(_QUIET, None)
    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.use_extra_bufts = extra_bufts
    model = lc.llama_model_load_from_file(path.encode(), mp)
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_ubatch
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                          else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    cp.cb_eval = cb_c
    cp.cb_eval_user_data = None
    return model, lc.llama_init_from_model(model, cp)


def fill_batch(batch, tokens, pos0: int = 0) -> None:
    """One sequence's tokens at positions pos0.., logits for every row."""
    for i, tok in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos0 + i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, True
    batch.n_tokens = len(tokens)


def close_llamacpp(model, ctx) -> None:
    """Free both and hand llama.cpp's log back to llama-cpp-python's handler (ours is
    process-wide)."""
    import llama_cpp as lc
    from llama_cpp._logger import llama_log_callback

    lc.llama_free(ctx)
    lc.llama_model_free(model)
    lc.llama_log_set(llama_log_callback, ctypes.c_void_p(0))


def llamacpp_tensors(path: str, ids: list[int], flash_attn: bool, n_ubatch: int,
                     n_ctx: int = 512, threads: int = 2, extra_bufts: bool = False,
                     keep=None) -> dict[str, np.ndarray]:
    """Every named f32/f16 tensor llama.cpp computes while decoding ``ids`` in one batch
    (split into ubatches of ``n_ubatch``; later ubatches overwrite earlier ones' names, so
    the values are those of the last ubatch). ``keep(name)`` picks which to copy (a full
    window of every tensor of every layer is gigabytes)."""
    import llama_cpp as lc

    out: dict[str, np.ndarray] = {}

    def cb(tp, ask, _ud):
        t = ctypes.cast(tp, ctypes.POINTER(GGMLTensor)).contents
        if ask:
            return True
        name = t.name.decode(errors="replace")
        a = _read_tensor(t) if keep is None or keep(name) else None
        if a is not None:
            if name in out:  # a name reused along the graph (Qcur before and after rope)
                n = 1
                while f"{name}#{n}" in out:
                    n += 1
                out[f"{name}#{n}"] = out[name]
            out[name] = a
        return True

    cb_c = lc.ggml_backend_sched_eval_callback(cb)
    model, ctx = open_llamacpp(path, cb_c, n_ctx, max(n_ctx, len(ids)), n_ubatch, threads,
                               flash_attn, extra_bufts)
    batch = lc.llama_batch_init(len(ids), 0, 1)
    fill_batch(batch, ids)
    if lc.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(len(ids) * n_vocab,))
    out["logits"] = logits.reshape(len(ids), n_vocab).copy()
    lc.llama_batch_free(batch)
    close_llamacpp(model, ctx)
    del cb_c
    return out


# ------------------------------------------------------------------------------ jllama side
def jllama_tensors(path: str, ids: list[int], exact: bool, n_ctx: int = 512
                   ) -> dict[str, np.ndarray]:
    """The same quantities from jllama's forward pass over ``ids`` (one prefill)."""
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model, common
    from jllama.numerics import Numerics

    num = Numerics(match_llamacpp=not exact, taps=True)
    common.TAP_SINK.clear()
    spec, model = build_model(read_gguf(path), numerics=num)
    eng = Engine(spec, model, ctx_size=n_ctx)
    logits = eng.prefill(ids, all_logits=True)
    out = {k: v[0, : len(ids)] if v.ndim >= 2 and v.shape[0] == 1 else v
           for k, v in common.TAP_SINK.items()}
    out["logits"] = np.asarray(logits, np.float32)[: len(ids)]
    return out


# ---------------------------------------------------------------------------------- compare
def _align(ours: np.ndarray, ref: np.ndarray, n_tok: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Both as [n_tok, -1] when they hold the same number of values per token."""
    a = ours.reshape(n_tok, -1) if ours.size % n_tok == 0 else None
    while ref.ndim > 2 and ref.shape[0] == 1:
        ref = ref[0]
    b = ref.reshape(n_tok, -1) if ref.shape[0] == n_tok else None
    if a is None or b is None or a.shape != b.shape:
        return None
    return a, b


def compare(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], n_tok: int,
            names: list[str], layers: list[int]) -> list[tuple[str, float, float]]:
    rows = []
    keys = [f"{n}-{il}" for il in layers for n in names] + ["result_norm", "logits"]
    for k in keys:
        if k not in ours or k not in ref:
            continue
        ab = _align(ours[k], ref[k], n_tok)
        if ab is None:
            print(f"{k:24s} shapes differ: ours {ours[k].shape} llama.cpp {ref[k].shape}")
            continue
        a, b = ab
        d = float(np.abs(a - b).max())
        rows.append((k, d, d / max(float(np.abs(b).max()), 1e-30)))
    return rows


DEFAULT_TENSORS = "attn_norm,Qcur,Kcur,Vcur,kqv_out,attn_out,ffn_inp,ffn_norm,ffn_swiglu,l_out"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("-p", "--prompt", default="The capital of France is Paris, and the capital "
                    "of Germany is Berlin. The largest planet in the solar system is")
    ap.add_argument("--fa", action="store_true", help="llama.cpp with flash attention")
    ap.add_argument("--ubatch", type=int, default=512, help="llama.cpp n_ubatch")
    ap.add_argument("--exact", action="store_true", help="jllama without llama.cpp rounding")
    ap.add_argument("--tensors", default=DEFAULT_TENSORS)
    ap.add_argument("--layers", default="all")
    ap.add_argument("--tokens", type=int, default=0, help="repeat the prompt to N tokens")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jllama.registry import fetch

    path = str(fetch(args.model)) if not os.path.exists(args.model) else args.model
    import llama_cpp as lc

    tok = lc.Llama(model_path=path, vocab_only=True, verbose=False)
    ids = tok.tokenize(args.prompt.encode(), add_bos=True, special=True)
    if args.tokens:
        ids = (ids * (args.tokens // len(ids) + 1))[: args.tokens]
    del tok
    ref = llamacpp_tensors(path, ids, args.fa, args.ubatch)
    ours = jllama_tensors(path, ids, args.exact)
    n_layer = 1 + max(int(k.rsplit("-", 1)[1]) for k in ref if k.startswith("l_out-"))
    layers = (list(range(n_layer)) if args.layers == "all"
              else [int(x) for x in args.layers.split(",")])
    rows = compare(ours, ref, len(ids), args.tensors.split(","), layers)
    mode = "FA" if args.fa else "no FA"
    print(f"{args.model}: {len(ids)} tokens, llama.cpp {mode} (ubatch {args.ubatch}), jllama "
          f"{'exact f32' if args.exact else 'llama.cpp rounding'}")
    print(f"{'tensor':24s} {'max|Δ|':>10s} {'rel':>10s}")
    for k, d, r in rows:
        print(f"{k:24s} {d:10.3g} {r:10.3g}")
    lg_a, lg_b = ours["logits"], ref["logits"]
    print(f"logits: max|Δ| {np.abs(lg_a - lg_b).max():.4f}, argmax agree "
          f"{int((lg_a.argmax(-1) == lg_b.argmax(-1)).sum())}/{len(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
