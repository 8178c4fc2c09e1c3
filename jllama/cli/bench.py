"""``jllama bench -m MODEL -p 512 -n 128 -r 3``: llama-bench's table (and ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys

from jllama.cli.common import (
    add_cache_type_args,
    add_kv_paged_args,
    add_numerics_args,
    add_platform_args,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="prompt/generation speed, llama-bench style")
    p.add_argument("-m", "--model", default="smollm2-135m-instruct")
    p.add_argument("-p", "--n-prompt", type=int, action="append", default=None,
                   help="prompt lengths (default 512; repeatable; 0 skips)")
    p.add_argument("-n", "--n-gen", type=int, action="append", default=None,
                   help="generation lengths (default 128; repeatable; 0 skips)")
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-c", "--ctx-size", type=int, default=None)
    p.add_argument("--json", action="store_true")
    add_platform_args(p)
    add_cache_type_args(p)
    add_kv_paged_args(p)
    add_numerics_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from jllama.cli.common import (
        n_gpu_layers_value,
        setup_platform,
        start_backend,
        warn_ngl_ignored,
    )

    setup_platform(args.platform, args.threads, "--platform")
    start_backend()
    warn_ngl_ignored(args.n_gpu_layers)
    import jax

    from jllama.api import Llama
    from jllama.eval.bench import (
        BenchResult,
        count_params,
        jllama_pp,
        jllama_tg,
        model_type,
        peak_rss_mib,
        time_reps,
    )

    pps = [p for p in (args.n_prompt or [512]) if p > 0]
    tgs = [n for n in (args.n_gen or [128]) if n > 0]
    ctx = args.ctx_size or max([*pps, *tgs, 256]) + 16
    llm = Llama(args.model, ctx_size=ctx, flash_attn=args.flash_attn != "off",
                prompt_matmul=args.prompt_matmul,
                n_gpu_layers=n_gpu_layers_value(args.n_gpu_layers),
                kv_paged=args.kv_paged, kv_pages=args.kv_pages,
                **{k: v for k, v in (("cache_type", args.cache_type_k),
                                     ("cache_type_v", args.cache_type_v)) if v is not None})
    size = sum(t.nbytes for t in llm.gguf.tensors.values()) / 2**20
    params = count_params(llm.gguf) / 1e6
    name = model_type(llm.gguf, llm.spec.arch)
    results = []
    for n in pps:
        results.append(BenchResult(str(llm.path.name), size, params, jax.default_backend(),
                                   f"pp{n}", n, time_reps(jllama_pp(llm, n), args.repetitions)))
    for n in tgs:
        results.append(BenchResult(str(llm.path.name), size, params, jax.default_backend(),
                                   f"tg{n}", n, time_reps(jllama_tg(llm, n), args.repetitions)))
    rss = peak_rss_mib()
    if args.json:
        print(json.dumps({"model_type": name, "results": [r.as_dict() for r in results],
                          "peak_rss_mib": rss, "load_s": llm.load_s}))
        return 0
    print("| model | size | params | backend | test | t/s |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for r in results:
        print(f"| {name} | {r.size_mib:.2f} MiB | {r.params_m:.2f} M | {r.backend} | "
              f"{r.test} | {r.tps:.2f} ± {r.tps_sd:.2f} |")
    print(f"\npeak RSS {rss:.0f} MiB, load {llm.load_s:.2f} s", file=sys.stderr)
    return 0
