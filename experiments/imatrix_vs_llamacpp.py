"""jllama imatrix against llama.cpp's collection on the same model and text.

    python experiments/imatrix_vs_llamacpp.py [-m MODEL] [-f TEXT] [-c 128] [--chunks 4]
        [--jllama FILE] [--llama-imatrix FILE]

llama.cpp side: llama-cpp-python (= llama.cpp 0c1e570) with an eval callback that does what
llama-imatrix's ``collect_imatrix`` does for dense weights: for every MUL_MAT whose weight is
named ``blk.*`` and whose activations (src1) are F32 with at least 16 rows, add each column's
squared activations (row after row, in f32) and count the rows. The chunks are cut as
llama-imatrix cuts them (BOS first, logits for all tokens), one chunk per decode.
``--jllama FILE`` / ``--llama-imatrix FILE`` compare files already made (``jllama imatrix``, the
llama-imatrix binary); otherwise jllama's collection runs here. Prints the largest relative
difference per weight kind and overall: |a - b| / max|b| over each entry.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from numerics_vs_llamacpp import GGMLTensor, close_llamacpp, fill_batch, open_llamacpp  # noqa: E402

GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID = 29, 30  # enum ggml_op at 0c1e570 (GGML_OP_NONE = 0)
GGML_TYPE_F32 = 0


def _src(t: GGMLTensor, i: int) -> GGMLTensor:
    return ctypes.cast(t.src[i], ctypes.POINTER(GGMLTensor)).contents


def _array(t: GGMLTensor, dt=np.float32) -> np.ndarray:
    """A host tensor (4-byte elements, any strides) in numpy order [ne3, ne2, ne1, ne0]."""
    ne = [int(t.ne[i]) for i in range(4)]
    nb = [int(t.nb[i]) for i in range(4)]
    span = sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + 4
    buf = (ctypes.c_char * span).from_address(t.data)
    a = np.lib.stride_tricks.as_strided(np.frombuffer(buf, dtype=dt), shape=ne[::-1],
                                        strides=nb[::-1])
    return np.ascontiguousarray(a)


def _rows(t: GGMLTensor) -> np.ndarray:
    """An F32 host tensor as [rows, ne0]."""
    return _array(t).reshape(-1, int(t.ne[0]))


def llamacpp_imatrix(path: str, chunks: np.ndarray, threads: int = 2) -> dict:
    """name -> (sums f32 [ne0], count) over the chunks ``[n, n_ctx]`` (dense weights)."""
    import llama_cpp as lc

    stats: dict[str, list] = {}

    def cb(tp, ask, _ud):
        t = ctypes.cast(tp, ctypes.POINTER(GGMLTensor)).contents
        if t.op == GGML_OP_MUL_MAT_ID:
            if not ask:
                _collect_id(t)
            return True
        if t.op != GGML_OP_MUL_MAT:
            return False if ask else True
        s0, s1 = _src(t, 0), _src(t, 1)
        name = s0.name.decode(errors="replace")
        if not name.startswith("blk.") or s1.type != GGML_TYPE_F32 or s1.ne[1] < 16:
            return False if ask else True
        if ask:
            return True
        x = _rows(s1)
        e = stats.setdefault(name, [np.zeros(x.shape[1], np.float32), 0])
        acc = e[0]
        for r in x:  # ggml's loop: row after row, each column in f32
            acc += r * r
        e[1] += x.shape[0]
        return True

    def _collect_id(t: GGMLTensor) -> None:
        """mul_mat_id: src1 [n_tokens, n_used or 1, ne0], ids [n_tokens, n_used]; per expert,
        slot after slot and token after token, as collect_imatrix walks them."""
        s0, s1, s2 = _src(t, 0), _src(t, 1), _src(t, 2)
        name = s0.name.decode(errors="replace")
        n_as, ne0 = int(s0.ne[2]), int(s1.ne[0])
        x = _array(s1)[0]  # [n_tokens, ne1, ne0]
        ids = _array(s2, np.int32)[0, 0]  # [n_tokens, n_used]
        e = stats.setdefault(name, [np.zeros((n_as, ne0), np.float32), np.zeros(n_as, np.int64)])
        for idx in range(ids.shape[1]):
            for row in range(ids.shape[0]):
                ex = int(ids[row, idx])
                r = x[row, idx % x.shape[1]]
                e[0][ex] += r * r
                e[1][ex] += 1

    cb_c = lc.ggml_backend_sched_eval_callback(cb)
    n_ctx = chunks.shape[1]
    model, ctx = open_llamacpp(path, cb_c, n_ctx, n_ctx, n_ctx, threads)
    batch = lc.llama_batch_init(n_ctx, 0, 1)
    try:
        for chunk in chunks:
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            fill_batch(batch, [int(t) for t in chunk])
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
    finally:
        lc.llama_batch_free(batch)
        close_llamacpp(model, ctx)
    del cb_c
    return {k: (np.asarray(v[0]).reshape(-1), v[1]) for k, v in stats.items()}


def compare(ours, ref) -> tuple[float, dict[str, float]]:
    """(max relative difference, per weight kind) between two name -> (sums, count) maps."""
    worst, kinds = 0.0, {}
    if set(ours) != set(ref):
        raise SystemExit(
            f"entries differ: only ours {sorted(set(ours) - set(ref))[:5]}, "
            f"only llama.cpp {sorted(set(ref) - set(ours))[:5]}"
        )
    for name, (s_ref, c_ref) in ref.items():
        s, c = ours[name]
        if not np.array_equal(np.atleast_1d(c), np.atleast_1d(c_ref)):
            raise SystemExit(f"{name}: count {c} vs llama.cpp {c_ref}")
        d = float(np.abs(s - s_ref).max() / max(float(np.abs(s_ref).max()), 1e-30))
        kind = name.split(".")[2]
        kinds[kind] = max(kinds.get(kind, 0.0), d)
        worst = max(worst, d)
    return worst, kinds


def from_file(path: str) -> dict:
    from jllama.quant.imatrix import read_imatrix

    im = read_imatrix(path)
    return {n: (e.sums, e.counts if e.n_mat > 1 else int(e.counts[0])) for n, e in im.entries.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("-f", "--file", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("-c", "--ctx-size", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--jllama", default=None, help="a jllama imatrix file to compare")
    ap.add_argument("--llama-imatrix", default=None, help="a llama-imatrix GGUF file to compare")
    args = ap.parse_args(argv)

    from jllama.eval.perplexity import chunk_tokens, read_text
    from jllama.gguf.reader import read_gguf
    from jllama.registry import resolve_model
    from jllama.tokenizer import Tokenizer

    path = str(resolve_model(args.model))
    tk = Tokenizer.from_gguf(read_gguf(path))
    tokens = tk.encode(read_text(args.file), add_special=True)
    chunks = chunk_tokens(tokens, args.ctx_size, args.chunks, tk.bos_id, tk.add_bos)
    ref = llamacpp_imatrix(path, chunks)
    print(f"llama.cpp (cb_eval): {len(ref)} entries over {len(chunks)} chunks of {args.ctx_size}")
    for label, f in (("jllama", args.jllama), ("llama-imatrix", args.llama_imatrix)):
        if f:
            worst, kinds = compare(from_file(f), ref)
            print(f"{label} {f}: max relative difference {worst:.3e}")
            for k, d in sorted(kinds.items()):
                print(f"  {k:12s} {d:.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
