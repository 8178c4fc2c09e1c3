"""Time the Pallas kernels against the XLA reference path on a GPU (or TPU).

qmatmul: for each supported ggml type and SmolLM2-135M / Gemma-3-270M weight shape, the Pallas
kernel on ``prepare_pallas`` planes vs ``reference_qmatmul`` (dequantize the GGUF blocks in XLA,
then an f32 dot), for decode row counts (1, 4, 16) and a prefill GEMM (``--rows``). Printed:
best time, GB/s of the weight's GGUF bytes (what one pass must read; the bandwidth roofline for
decode) and that as a percentage of the card's HBM bandwidth (``--hbm-gbs``, else looked up from
the device kind), GFLOP/s, and the speed-up over XLA (> 1: Pallas faster). The planes' bytes
over the GGUF bytes (padding of n_out to 128 and n_in to the chunk) are printed per shape.

decode attention: Pallas flash-decoding vs the XLA masked softmax over the whole cache, at a few
(batch, cache length, filled fraction) points; GB/s counts only the K/V bytes below the lengths.

    python experiments/gpu/bench_pallas.py                  # on the GPU machine
    python experiments/gpu/bench_pallas.py --interpret --small   # CPU smoke test (slow, tiny)
    python experiments/gpu/bench_pallas.py --types Q5_0,IQ4_XS --rows 1,16 --skip-attention
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jllama.gguf.constants import QType, qtype_info
from jllama.kernels import pallas_attention as pa
from jllama.kernels import pallas_qmatmul as pq
from jllama.kernels.dispatch import reference_qmatmul
from jllama.quant.qtensor import QTensor
from jllama.quant.testing import random_blocks

# (label, n_out, n_in): SmolLM2-135M (dim 576, ffn 1536, vocab 49152), Gemma-3-270M (dim 640,
# ffn 2048, 4 x 256 query heads, vocab 262144).
SHAPES = [
    ("smollm2.ffn_up", 1536, 576),
    ("smollm2.ffn_down", 576, 1536),
    ("smollm2.output", 49152, 576),
    ("gemma3.attn_q", 1024, 640),
    ("gemma3.ffn_up", 2048, 640),
    ("gemma3.ffn_down", 640, 2048),
    ("gemma3.output", 262144, 640),
]
SMALL_SHAPES = [("small.a", 200, 256), ("small.b", 72, 768)]
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "MXFP4", "Q2_K", "Q3_K", "Q4_K",
         "Q5_K", "Q6_K", "IQ4_XS", "TQ1_0", "TQ2_0", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
         "IQ3_S", "IQ1_S", "IQ1_M"]  # fmt: skip
# Peak HBM bandwidth (GB/s, vendor figures) by a prefix of jax's device_kind.
HBM_GBS = [("NVIDIA H200", 4800), ("NVIDIA H100 NVL", 3900), ("NVIDIA H100 PCIe", 2000),
           ("NVIDIA H100", 3350), ("NVIDIA A100-SXM4-80GB", 2039), ("NVIDIA A100", 1555),
           ("NVIDIA L4", 300), ("TPU v4", 1200), ("TPU v5 lite", 819), ("TPU v5", 2765),
           ("TPU v6 lite", 1640)]  # fmt: skip

# (label, batch, n_heads, n_kv_heads, head_dim, max_len, filled fraction)
ATTN = [
    ("smollm2", 1, 9, 3, 64, 8192, 0.25),
    ("smollm2", 16, 9, 3, 64, 4096, 0.5),
    ("gemma3", 1, 4, 1, 256, 8192, 0.25),
    ("gemma3", 16, 4, 1, 256, 4096, 0.5),
]
SMALL_ATTN = [("small", 2, 4, 2, 32, 128, 0.5)]


def best_time(f, *args, reps: int) -> float:
    """Median-of-best: the machine may be shared, keep the lower half's median."""
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return statistics.median(ts[: max(1, len(ts) // 2)])


def hbm_gbs(args: argparse.Namespace) -> float | None:
    if args.hbm_gbs:
        return args.hbm_gbs
    kind = jax.devices()[0].device_kind
    return next((g for prefix, g in HBM_GBS if kind.startswith(prefix)), None)


def bench_qmatmul(args: argparse.Namespace) -> None:
    shapes = SMALL_SHAPES if args.small else SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s[0] in args.shapes.split(",")]
    rows = [int(r) for r in args.rows.split(",")] if not args.small else [1, 4, 16]
    peak = hbm_gbs(args)
    print(f"device {jax.devices()[0].device_kind}: HBM peak "
          f"{f'{peak:.0f} GB/s' if peak else 'unknown (pass --hbm-gbs)'}")  # fmt: skip
    # GB/s and %HBM count the GGUF bytes; pl%HBM the planes' bytes the kernel reads (more for
    # the grid types, decoded at load to 4-bit codes; padding for small shapes)
    print(f"{'type':6} {'shape':18} {'n_out x n_in':>14} {'m':>4} | {'pallas ms':>9} "
          f"{'GB/s':>7} {'%HBM':>5} {'pl%HBM':>6} {'GFLOP/s':>8} | {'xla ms':>8} {'GB/s':>7} | "
          f"{'speedup':>7}")  # fmt: skip
    for tname in args.types.split(","):
        qtype = int(QType[tname])
        info = qtype_info(qtype)
        for label, n_out, n_in in shapes:
            if n_in % info.block_size:
                continue  # llama.cpp never stores such a tensor in this type
            raw = random_blocks(QType(qtype), n_out, n_in, seed=n_out + n_in)
            gguf_qt = QTensor(jnp.asarray(raw), qtype, (n_out, n_in))
            pal_qt = pq.prepare_pallas(gguf_qt)
            gbytes = raw.nbytes / 1e9
            pbytes = sum(int(p.nbytes) for p in pal_qt.data) / 1e9
            print(f"{tname:6} {label:18} planes/GGUF bytes {pbytes / gbytes:.3f}", flush=True)
            for m in rows:
                rng = np.random.default_rng(m)
                x = jnp.asarray(rng.standard_normal((m, n_in)).astype(np.float32))
                f_pal = jax.jit(
                    lambda x, w: pq.pallas_qmatmul(
                        x, w, interpret=args.interpret, vector_rows=args.vector_rows
                    )
                )
                f_xla = jax.jit(reference_qmatmul)
                tp = best_time(f_pal, x, pal_qt, reps=args.reps)
                tx = best_time(f_xla, x, gguf_qt, reps=args.reps)
                if args.check:
                    err = float(jnp.max(jnp.abs(f_pal(x, pal_qt) - f_xla(x, gguf_qt))))
                    scale = float(jnp.max(jnp.abs(f_xla(x, gguf_qt)))) + 1e-30
                    # XLA:GPU's f32 dot defaults to TF32 inputs (10-bit mantissa): ~1e-3 relative
                    tol = 1e-4 if jax.default_backend() == "cpu" else 2e-3
                    assert err <= tol * scale, (tname, label, m, err, scale)
                flops = 2.0 * m * n_out * n_in / 1e9
                pct = f"{100 * gbytes / tp / peak:5.1f}" if peak else "    -"
                ppct = f"{100 * pbytes / tp / peak:6.1f}" if peak else "     -"
                print(f"{tname:6} {label:18} {n_out:>6} x {n_in:<5} {m:>4} | {tp * 1e3:9.3f} "
                      f"{gbytes / tp:7.1f} {pct} {ppct} {flops / tp:8.1f} | {tx * 1e3:8.3f} "
                      f"{gbytes / tx:7.1f} | {tx / tp:6.2f}x", flush=True)  # fmt: skip


# Ops that move or describe data rather than compute on it (not counted by ``kernel_ops``).
_NOT_ALU = {"get", "swap", "multiple_of", "broadcast_in_dim", "reshape", "squeeze", "scan",
            "pjit", "iota", "bitcast_convert_type"}  # fmt: skip


def kernel_ops(tname: str, m: int, n_in: int = 4096) -> tuple[float, dict[str, float]]:
    """Vector element-operations per weight in the kernel's loop body (from its jaxpr, as traced
    for Triton), and the same split by primitive. A static proxy for the ALU work per weight
    that decode must fit under the bandwidth roofline; no GPU needed. ``jit`` is jnp.where (a
    select), ``i2f`` an int -> float convert."""
    qtype = int(QType[tname])
    shape = (256, n_in)
    planes = tuple(
        jnp.asarray(p) for p in pq.repack(np, random_blocks(QType(qtype), *shape, 0), qtype, shape)
    )

    def f(x, planes):
        return pq.matmul_planes(x, planes, qtype, shape, k_splits=1, backend="cuda")

    jx = jax.make_jaxpr(f)(jnp.ones((m, n_in), jnp.float32), planes)
    call = next(e for e in jx.jaxpr.eqns if e.primitive.name == "pallas_call")
    loop = next(e for e in call.params["jaxpr"].eqns if e.primitive.name == "scan")
    body = loop.params["jaxpr"].jaxpr
    by: dict[str, float] = {}
    for e in body.eqns:
        name = e.primitive.name
        if name in _NOT_ALU or not e.outvars or not getattr(e.outvars[0].aval, "shape", ()):
            continue
        src = e.invars[0].aval if name.startswith("reduce") or name == "dot_general" else None
        size = int(np.prod(src.shape if src is not None else e.outvars[0].aval.shape))
        if name == "dot_general":  # m x k x n multiply-adds
            size = int(np.prod(e.invars[0].aval.shape)) * e.invars[1].aval.shape[-1]
        if name == "convert_element_type" and jnp.issubdtype(e.params["new_dtype"], jnp.floating):
            # int -> f32 converts: a quarter or an eighth of the FMA rate on NVIDIA GPUs
            name = "i2f" if jnp.issubdtype(e.invars[0].aval.dtype, jnp.integer) else "f2f"
        by[name] = by.get(name, 0) + size
    weights = pq.chunk_of(qtype) * call.params["out_avals"][0].shape[-1]
    by = {k: v / weights for k, v in sorted(by.items(), key=lambda kv: -kv[1])}
    return sum(by.values()), by


def report_ops(args: argparse.Namespace) -> None:
    rows = [int(r) for r in args.rows.split(",") if int(r) <= 16]
    print(f"{'type':8} {'B/weight':>8} " + " ".join(f"{f'ops/w m={m}':>11}" for m in rows)
          + "   (m=1: top primitives per weight)")  # fmt: skip
    for tname in args.types.split(","):
        info = qtype_info(int(QType[tname]))
        res = [kernel_ops(tname, m) for m in rows]
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(res[0][1].items())[:5])
        print(f"{tname:8} {info.type_size / info.block_size:8.4f} "
              + " ".join(f"{r[0]:11.1f}" for r in res) + f"   {top}", flush=True)  # fmt: skip


def xla_decode_attention(q, k, v, lengths, scale):
    b, h, d = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, kvh, h // kvh, d)
    s = jnp.einsum("bkgd,bksd->bkgs", qg, k.astype(jnp.float32)) * scale
    mask = jnp.arange(k.shape[2])[None, :] < lengths[:, None]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bkgs,bksd->bkgd", p, v.astype(jnp.float32)).reshape(b, h, -1)


def bench_attention(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(1)
    dt = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}[args.cache_dtype]
    print(f"\n{'attn':8} {'B':>3} {'H/KV':>6} {'D':>4} {'max_len':>7} {'filled':>6} | "
          f"{'pallas ms':>9} {'GB/s':>7} | {'xla ms':>8} {'GB/s':>7} | {'speedup':>7}")  # fmt: skip
    for label, b, h, kvh, d, max_len, frac in SMALL_ATTN if args.small else ATTN:
        q = jnp.asarray(rng.standard_normal((b, h, d)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((b, kvh, max_len, d)), dt)
        v = jnp.asarray(rng.standard_normal((b, kvh, max_len, d)), dt)
        lengths = jnp.full((b,), int(max_len * frac), jnp.int32)
        scale = d**-0.5
        f_pal = jax.jit(
            lambda q, k, v, n, s=scale: pa.pallas_decode_attention(
                q, k, v, n, scale=s, interpret=args.interpret
            )
        )
        f_xla = jax.jit(lambda q, k, v, n, s=scale: xla_decode_attention(q, k, v, n, s))
        tp = best_time(f_pal, q, k, v, lengths, reps=args.reps)
        tx = best_time(f_xla, q, k, v, lengths, reps=args.reps)
        if args.check:
            err = float(jnp.max(jnp.abs(f_pal(q, k, v, lengths) - f_xla(q, k, v, lengths))))
            assert err < 1e-3, (label, b, err)
        used = 2 * b * kvh * int(max_len * frac) * d * jnp.dtype(dt).itemsize / 1e9
        print(f"{label:8} {b:>3} {h:>3}/{kvh:<2} {d:>4} {max_len:>7} {frac:6.2f} | "
              f"{tp * 1e3:9.3f} {used / tp:7.1f} | {tx * 1e3:8.3f} {used / tx:7.1f} | "
              f"{tx / tp:6.2f}x", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument(
        "--rows",
        default="1,4,16,64,512",
        help="activation row counts (decode: up to 16; prefill above)",
    )
    ap.add_argument("--shapes", default="", help="comma-separated shape labels (default: all)")
    ap.add_argument(
        "--hbm-gbs",
        type=float,
        default=None,
        help="the card's HBM bandwidth (default: looked up from the device kind)",
    )
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--cache-dtype", default="f16", choices=["f32", "f16", "bf16"])
    ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip comparing the outputs of the two paths")  # fmt: skip
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--vector-rows", type=int, default=4,
                    help="rows up to which the kernel multiplies and reduces instead of a dot "
                    "(max 16; 16 to compare the two at 5-16 rows)")  # fmt: skip
    ap.add_argument(
        "--count-ops",
        action="store_true",
        help="only print the kernel's vector ops per weight (traced, runs anywhere)",
    )
    args = ap.parse_args()
    if args.small:
        args.reps = min(args.reps, 2)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    if args.count_ops:
        report_ops(args)
        return
    bench_qmatmul(args)
    if not args.skip_attention:
        bench_attention(args)


if __name__ == "__main__":
    main()
