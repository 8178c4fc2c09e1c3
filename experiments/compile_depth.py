"""Compile time and size of one decode step, scanned vs unrolled, for GGUF files of any depth.

    python experiments/compile_depth.py A.gguf [B.gguf ...] [--ctx 512]

Prints per file and mode the layer plan (models/common.py ``layer_plan``), lowering and XLA
compile seconds (persistent compilation cache off) and the compiled HLO text size. Deeper
copies of a real model come from experiments/deepen_gguf.py. Results: experiments/results/ttft.md.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--ctx", type=int, default=512)
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.models.cache import KVCache
    from jllama.models.common import layer_plan
    from jllama.numerics import Numerics, use

    jax.config.update("jax_enable_compilation_cache", False)  # time XLA, not a cache read
    for path in a.paths:
        for scan in (True, False):
            num = Numerics(scan_layers=scan)
            spec, m = build_model(read_gguf(path), numerics=num)
            gd, st = nnx.split(m)
            if hasattr(m, "make_cache"):  # MLA's latent cache
                cache = m.make_cache(1, a.ctx, "f16", stacked=scan)
            else:
                cache = KVCache.create(spec.n_layer, 1, spec.n_head_kv, a.ctx, spec.head_dim,
                                       spec.head_dim_v, "f16", "f16", stacked=scan)

            def step(st, tok, pos0, cache, gd=gd, num=num):
                with use(num):
                    return nnx.merge(gd, st)(tok, pos0, cache, a.ctx, jnp.zeros_like(pos0))

            with use(num):
                plan = layer_plan(list(m.blocks)) if scan else None
            t0 = time.perf_counter()
            lo = jax.jit(step, donate_argnums=3).lower(
                st, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32), cache)
            t1 = time.perf_counter()
            txt = lo.compile().as_text()
            t2 = time.perf_counter()
            print(f"{path.split('/')[-1]} layers {spec.n_layer} scan={scan} plan={plan} "
                  f"lower {t1 - t0:.1f}s compile {t2 - t1:.1f}s hlo {len(txt) / 1e6:.2f}M chars "
                  f"while {txt.count(' while(')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
