"""Op by op: llama.cpp's rounding error against jllama's, each op fed llama.cpp's own inputs.

    python experiments/op_errors_vs_llamacpp.py [-m MODEL] [--chunk 0] [--layers 0,1,15,29]

A whole 512-token window of WikiText-2 (llama-perplexity's chunk ``--chunk``, BOS first) goes
through llama.cpp with flash attention (n_ubatch 512, as llama-perplexity); its eval callback
dumps the inputs and outputs of every op of the chosen layers. Each op is then recomputed from
llama.cpp's inputs three ways: jllama's function (f32, default ``Numerics``: llama.cpp's roundings), and
exactly in float64 with the inputs as given (``exact``, no activation rounding). Printed per op:

- ``rms(lc-ex)``, ``rms(jl-ex)``: the rms error of each against exact, relative to rms(exact);
  these are the "noise" each implementation injects at that op. If llama.cpp's is larger
  than ours somewhere, llama.cpp rounds (or approximates) where we do not: a bias in PPL,
  since every bit of noise in the logits raises the expected NLL.
- ``rms(lc-jl)`` and ``mean(lc-jl)`` (signed, relative): how well we reproduce llama.cpp.

The ``llama`` architecture (SmolLM2) and ``gemma3`` are wired up.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def _sq(a: np.ndarray) -> np.ndarray:
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    return a


STATS: list[dict] = []  # one entry per printed row (tests/test_op_numerics.py reads them)


def _row(name: str, lc, jl, ex) -> str:
    lc, jl, ex = (np.asarray(a, np.float64).reshape(lc.shape[0], -1) for a in (lc, jl, ex))
    r = np.sqrt((ex**2).mean())

    def rms(a):
        return float(np.sqrt((a**2).mean()) / r)

    st = dict(op=name, lc_ex=rms(lc - ex), jl_ex=rms(jl - ex), lc_jl=rms(lc - jl),
              mean_lc_jl=float((lc - jl).mean() / r), mean_lc_ex=float((lc - ex).mean() / r))
    STATS.append(st)
    return (f"{name:16s} {st['lc_ex']:10.3e} {st['jl_ex']:10.3e} {st['lc_jl']:10.3e} "
            f"{st['mean_lc_jl']:+10.2e} {st['mean_lc_ex']:+10.2e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("-f", "--file", default="/work/shared/data/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--layers", default="0,1,15,29")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jllama.eval.llamacpp import llama_cpp_stock
    from jllama.eval.perplexity import chunk_tokens
    from jllama.registry import fetch

    path = str(fetch(args.model)) if not os.path.exists(args.model) else args.model
    lc = llama_cpp_stock()
    tok = lc.Llama(model_path=path, vocab_only=True, verbose=False)
    text = Path(args.file).read_text(encoding="utf-8")
    toks = tok.tokenize(text.encode(), add_bos=True, special=True)
    ids = chunk_tokens(toks, args.ctx, args.chunk + 1, tok.token_bos(), True)[args.chunk]
    print(f"{args.model}: chunk {args.chunk} ({len(ids)} tokens), llama.cpp FA, "
          "rel. to rms(exact)")
    analyse(path, ids.tolist(), [int(x) for x in args.layers.split(",")], args.ctx)
    return 0


def analyse(path: str, ids: list[int], layers: list[int], n_ctx: int) -> list[dict]:
    """Print (and return) the per-op rows for ``ids`` in one llama.cpp batch with FA."""
    import jax.numpy as jnp
    from numerics_vs_llamacpp import llamacpp_tensors

    from jllama.gguf.reader import read_gguf
    from jllama.kernels.dispatch import dequantize
    from jllama.models import build_model, common

    spec, model = build_model(read_gguf(path))
    STATS.clear()
    last = spec.n_layer - 1
    want = {f"-{il}" for il in layers} | {f"-{il - 1}" for il in layers if il > 0}
    want_kv = {f"_l{il} (view) (permuted)" for il in layers}

    def keep(name: str) -> bool:
        base = name.split("#")[0]
        return (any(base.endswith(w) for w in want)
                or base in ("embd", "inp_scaled", "result_norm")
                or any(base.endswith(w) for w in want_kv)
                or (base == "result_output") or (last in layers and base.startswith("node_")))

    ref = {k: _sq(v) for k, v in llamacpp_tensors(path, ids, True, n_ctx, n_ctx=n_ctx,
                                                   keep=keep).items()}
    t = len(ids)
    pos = jnp.arange(t, dtype=jnp.int32)[None]

    def f64(a):
        return np.asarray(a, np.float64)

    def wmat(lin):
        return np.asarray(dequantize(lin.weight.get_value(), jnp.float32), np.float64)

    def run_lin(lin, x):
        return np.asarray(common.linear(jnp.asarray(x, jnp.float32), lin.weight.get_value()))

    print(f"{'op':16s} {'rms(lc-ex)':>10s} {'rms(jl-ex)':>10s} {'rms(lc-jl)':>10s} "
          f"{'mean(lc-jl)':>10s} {'mean(lc-ex)':>10s}")
    if spec.arch == "gemma3":
        _gemma3(spec, model, ref, layers, t, pos, run_lin, wmat, f64)
        layers = []
    for il in layers:
        blk = model.blocks[il]
        x_in = ref["embd"] if il == 0 else ref[f"l_out-{il - 1}"]
        x_in = x_in.reshape(t, -1)
        w = np.asarray(blk.attn_norm.weight.get_value(), np.float64)
        ex = f64(x_in) / np.sqrt((f64(x_in) ** 2).mean(-1, keepdims=True) + spec.norm_eps) * w
        jl = np.asarray(blk.attn_norm(jnp.asarray(x_in)))
        print(_row(f"attn_norm-{il}", ref[f"attn_norm-{il}"], jl, ex))
        h = ref[f"attn_norm-{il}"].reshape(t, -1)
        for nm, lin, key in (("Q", blk.wq, f"Qcur-{il}#1"), ("K", blk.wk, f"Kcur-{il}#1"),
                             ("V", blk.wv, f"Vcur-{il}#1")):
            print(_row(f"{nm}mat-{il}", ref[key], run_lin(lin, h), f64(h) @ wmat(lin).T))
        # rope
        for nm, key in (("Q", "Qcur"), ("K", "Kcur")):
            xin = ref[f"{key}-{il}#2"].reshape(1, t, -1, spec.head_dim)
            jl = np.asarray(common.rope(jnp.asarray(xin), pos, spec.rope_base, spec.rope_dim,
                                        neox=False, scale=spec.rope_scale))
            half = spec.rope_dim // 2
            inv = float(spec.rope_base) ** (-np.arange(half) * 2.0 / spec.rope_dim)
            ang = np.arange(t)[:, None] * inv
            c, s_ = np.cos(ang)[:, None], np.sin(ang)[:, None]
            x64 = f64(xin[0])
            x1, x2 = x64[..., 0::2], x64[..., 1::2]
            ex = np.stack([x1 * c - x2 * s_, x1 * s_ + x2 * c], -1).reshape(x64.shape)
            print(_row(f"rope{nm}-{il}", ref[f"{key}-{il}"], jl[0], ex))
        # attention on llama.cpp's roped q and its f16 cache
        q = ref[f"Qcur-{il}"].reshape(1, t, spec.n_head, spec.head_dim)
        kc = ref[f"cache_k_l{il} (view) (permuted)"].reshape(1, spec.n_head_kv, -1, spec.head_dim)
        vc = ref[f"cache_v_l{il} (view) (permuted)"].reshape(1, spec.n_head_kv, -1,
                                                             spec.head_dim_v)
        kv = kc.shape[2]
        scale = 1.0 / np.sqrt(spec.head_dim)
        jl = np.asarray(common.attention(jnp.asarray(q), jnp.asarray(kc, jnp.float16),
                                         jnp.asarray(vc, jnp.float16), jnp.zeros(1, jnp.int32),
                                         kv, scale, k_type="f16", v_type="f16"))
        g = spec.n_head // spec.n_head_kv
        q64 = f64(q[0]).reshape(t, spec.n_head_kv, g, -1)
        sc = np.einsum("tkgd,ksd->kgts", q64, f64(kc[0])) * scale
        sc = np.where(np.arange(kv)[None, :] <= np.arange(t)[:, None], sc, -np.inf)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ex = np.einsum("kgts,ksd->tkgd", p, f64(vc[0])).reshape(t, -1)
        print(_row(f"attn-{il}", ref[f"kqv_out-{il}"], jl[0], ex))
        a = ref[f"kqv_out-{il}"].reshape(t, -1)
        print(_row(f"Omat-{il}", ref[f"attn_out-{il}"], run_lin(blk.wo, a),
                   f64(a) @ wmat(blk.wo).T))
        fi = ref[f"ffn_inp-{il}"].reshape(t, -1)
        w = np.asarray(blk.ffn_norm.weight.get_value(), np.float64)
        ex = f64(fi) / np.sqrt((f64(fi) ** 2).mean(-1, keepdims=True) + spec.norm_eps) * w
        print(_row(f"ffn_norm-{il}", ref[f"ffn_norm-{il}"],
                   np.asarray(blk.ffn_norm(jnp.asarray(fi))), ex))
        h = ref[f"ffn_norm-{il}"].reshape(t, -1)
        for nm, lin in (("gate", blk.ffn.gate), ("up", blk.ffn.up)):
            print(_row(f"{nm}-{il}", ref[f"ffn_{nm}-{il}"], run_lin(lin, h),
                       f64(h) @ wmat(lin).T))
        gt, up = ref[f"ffn_gate-{il}"].reshape(t, -1), ref[f"ffn_up-{il}"].reshape(t, -1)
        g64 = f64(gt)
        print(_row(f"swiglu-{il}", ref[f"ffn_swiglu-{il}"],
                   np.asarray(common.swiglu(jnp.asarray(gt), jnp.asarray(up))),
                   g64 / (1 + np.exp(-g64)) * f64(up)))
        sw = ref[f"ffn_swiglu-{il}"].reshape(t, -1)
        print(_row(f"down-{il}", ref[f"ffn_out-{il}"], run_lin(blk.ffn.down, sw),
                   f64(sw) @ wmat(blk.ffn.down).T))
    rn = ref["result_norm"].reshape(t, -1)
    emb = model.tok_embd
    e64 = np.asarray(dequantize(emb.weight.get_value(), jnp.float32), np.float64)
    print(_row("output", ref["result_output"], np.asarray(emb.attend(jnp.asarray(rn))),
               np.concatenate([f64(rn[i : i + 64]) @ e64.T for i in range(0, t, 64)])))
    return list(STATS)


def _rms64(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * np.asarray(w, np.float64)


def _attn64(q, kc, vc, t, window=None):
    """Exact causal GQA attention: q [T, H, D], caches [KVH, S, D] -> [T, H * Dv]."""
    kvh, kv = kc.shape[0], kc.shape[1]
    q64 = np.asarray(q, np.float64).reshape(t, kvh, q.shape[1] // kvh, -1)
    sc = np.einsum("tkgd,ksd->kgts", q64, np.asarray(kc, np.float64))
    kp, qp = np.arange(kv)[None, :], np.arange(t)[:, None]
    ok = (kp <= qp) & ((kp > qp - window) if window else True)
    sc = np.where(ok, sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("kgts,ksd->tkgd", p, np.asarray(vc, np.float64)).reshape(t, -1)


def _gemma3(spec, model, ref, layers, t, pos, run_lin, wmat, f64) -> None:
    import jax.numpy as jnp

    from jllama.models import common, gemma3

    eps = spec.norm_eps
    hd = spec.head_dim
    for il in layers:
        blk = model.blocks[il]
        x_in = (ref["inp_scaled"] if il == 0 else ref[f"l_out-{il - 1}"]).reshape(t, -1)
        print(_row(f"attn_norm-{il}", ref[f"attn_norm-{il}"],
                   np.asarray(blk.attn_norm(jnp.asarray(x_in))),
                   _rms64(x_in, blk.attn_norm.weight.get_value(), eps)))
        h = ref[f"attn_norm-{il}"].reshape(t, -1)
        for nm, lin, key in (("Q", blk.wq, f"Qcur-{il}#1"), ("K", blk.wk, f"Kcur-{il}#1"),
                             ("V", blk.wv, f"Vcur-{il}#1")):
            print(_row(f"{nm}mat-{il} {lin.weight.get_value().type_name}", ref[key],
                       run_lin(lin, h), f64(h) @ wmat(lin).T))
        for nm, key, norm in (("Q", "Qcur", blk.q_norm), ("K", "Kcur", blk.k_norm)):
            xin = ref[f"{key}-{il}#1"].reshape(t, -1, hd)
            print(_row(f"{nm}norm-{il}", ref[f"{key}_normed-{il}"],
                       np.asarray(norm(jnp.asarray(xin))),
                       _rms64(xin, norm.weight.get_value(), eps)))
            xn = ref[f"{key}_normed-{il}"].reshape(1, t, -1, hd)
            jl = np.asarray(common.rope(jnp.asarray(xn), pos, blk.rope_base, spec.rope_dim,
                                        neox=True, scale=blk.rope_scale))
            half = spec.rope_dim // 2
            inv = float(blk.rope_base) ** (-np.arange(half) * 2.0 / spec.rope_dim)
            ang = np.arange(t)[:, None] * inv / (1.0 / blk.rope_scale)
            c, s_ = np.cos(ang)[:, None], np.sin(ang)[:, None]
            x64 = f64(xn[0])
            x1, x2 = x64[..., :half], x64[..., half:]
            ex = np.concatenate([x1 * c - x2 * s_, x2 * c + x1 * s_], -1)
            print(_row(f"rope{nm}-{il}", ref[f"{key}-{il}"], jl[0], ex))
        q = ref[f"Qcur-{il}"].reshape(1, t, spec.n_head, hd) * np.float32(spec.extra["q_scale"])
        kc = ref[f"cache_k_l{il} (view) (permuted)"].reshape(1, spec.n_head_kv, -1, hd)
        vc = ref[f"cache_v_l{il} (view) (permuted)"].reshape(1, spec.n_head_kv, -1,
                                                             spec.head_dim_v)
        jl = np.asarray(common.attention(jnp.asarray(q), jnp.asarray(kc, jnp.float16),
                                         jnp.asarray(vc, jnp.float16), jnp.zeros(1, jnp.int32),
                                         kc.shape[2], 1.0, window=blk.window, k_type="f16",
                                         v_type="f16"))
        print(_row(f"attn-{il}", ref[f"kqv_out-{il}"], jl[0],
                   _attn64(q[0], kc[0], vc[0], t, blk.window)))
        h = ref[f"ffn_norm-{il}"].reshape(t, -1)
        for nm, lin in (("gate", blk.ffn.gate), ("up", blk.ffn.up)):
            print(_row(f"{nm}-{il} {lin.weight.get_value().type_name}", ref[f"ffn_{nm}-{il}"],
                       run_lin(lin, h), f64(h) @ wmat(lin).T))
        gt, up = ref[f"ffn_gate-{il}"].reshape(t, -1), ref[f"ffn_up-{il}"].reshape(t, -1)
        g64 = f64(gt)
        ex = 0.5 * g64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64**3))) * f64(up)
        print(_row(f"geglu-{il}", ref[f"ffn_geglu-{il}"],
                   np.asarray(gemma3.gelu(jnp.asarray(gt)) * jnp.asarray(up)), ex))
        gg = ref[f"ffn_geglu-{il}"].reshape(t, -1)
        print(_row(f"down-{il} {blk.down.weight.get_value().type_name}", ref[f"ffn_out-{il}"],
                   run_lin(blk.down, gg), f64(gg) @ wmat(blk.down).T))
        fo = ref[f"ffn_out-{il}"].reshape(t, -1)
        print(_row(f"ffn_post_norm-{il}", ref[f"ffn_post_norm-{il}"],
                   np.asarray(blk.post_ffn_norm(jnp.asarray(fo))),
                   _rms64(fo, blk.post_ffn_norm.weight.get_value(), eps)))


if __name__ == "__main__":
    sys.exit(main())
