"""Compile time and size of one decode step, scanned vs unrolled, for GGUF files of any depth.

    python experiments/compile_depth.py A.gguf [B.gguf ...]

Prints per file and mode the layer plan (models/common.py ``layer_plan``), lowering and XLA
compile seconds (persistent compilation cache off) and the compiled HLO text size. Deeper
copies of a real model come from experiments/deepen_gguf.py. Results: experiments/results/ttft.md.
"""
import sys, time
import jax, jax.numpy as jnp
jax.config.update("jax_enable_compilation_cache", False)
from flax import nnx
from jllama.gguf.reader import read_gguf
from jllama.models import build_model
from jllama.models.cache import KVCache
from jllama.models.common import layer_plan
from jllama.numerics import Numerics, use

for path in sys.argv[1:]:
    for scan in (True, False):
        num = Numerics(scan_layers=scan)
        spec, m = build_model(read_gguf(path), numerics=num)
        gd, st = nnx.split(m)
        cache = KVCache.create(spec.n_layer, 1, spec.n_head_kv, 512, spec.head_dim,
                               spec.head_dim_v, "f16", "f16", stacked=scan)
        def step(st, tok, pos0, cache):
            with use(num):
                return nnx.merge(gd, st)(tok, pos0, cache, 512, jnp.zeros_like(pos0))
        with use(num):
            plan = layer_plan(list(m.blocks)) if scan else None
        t0 = time.perf_counter()
        lo = jax.jit(step, donate_argnums=3).lower(st, jnp.zeros((1, 1), jnp.int32),
                                                   jnp.zeros((1,), jnp.int32), cache)
        t1 = time.perf_counter()
        ex = lo.compile()
        t2 = time.perf_counter()
        txt = ex.as_text()
        print(f"{path.split('/')[-1]} layers {spec.n_layer} scan={scan} plan={plan} "
              f"lower {t1-t0:.1f}s compile {t2-t1:.1f}s hlo {len(txt)/1e6:.2f}M chars "
              f"while {txt.count(' while(')}", flush=True)
