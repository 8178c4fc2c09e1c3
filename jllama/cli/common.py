"""Helpers shared by the generation commands (run, generate, chat)."""

from __future__ import annotations

import argparse
import os
import sys

from jllama.config import Config


def setup_platform(platform: str | None, threads: int | None = None) -> None:
    """Pick the JAX backend before JAX starts (it reads these once)."""
    if platform and platform != "auto":
        os.environ.setdefault("JAX_PLATFORMS", platform)
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (llama.cpp's defaults)")
    g.add_argument("-n", "--max-tokens", type=int, default=None, help="tokens to generate")
    g.add_argument("--temp", type=float, default=None, help="temperature; 0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repeat-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("-c", "--ctx-size", type=int, default=None)
    add_numerics_args(p, via_config=True)
    p.add_argument("--platform", default=None, help="cpu | gpu | tpu | auto")
    add_draft_args(p)
    add_distributed_args(p)


def add_numerics_args(p: argparse.ArgumentParser, via_config: bool = False) -> None:
    """The two numerics switches: llama.cpp's -fa and the prompt matmul. ``via_config``: the
    command reads a run config, so unset flags stay None and the config's values apply."""
    p.add_argument("-fa", "--flash-attn", choices=("on", "off"),
                   default=None if via_config else "on",
                   help="llama.cpp's flash attention numerics (default on, as llama.cpp on CPU)")
    p.add_argument("--prompt-matmul", choices=("int8", "f32"),
                   default=None if via_config else "int8",
                   help="int8: bit-identical to llama.cpp (default; also the faster on "
                   "AVX-512 VNNI); f32: XLA's GEMM, perplexity within rounding noise")


def add_draft_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--model-draft", "-md", default=None, help="draft model (same vocabulary)")
    g.add_argument("--draft-ngram", action="store_true",
                   help="draft by prompt lookup (n-gram match), no second model")
    g.add_argument("--draft-n", "--draft-max", dest="draft_n", type=int, default=None,
                   help="max tokens drafted per step (default 16)")
    g.add_argument("--draft-min", type=int, default=None)
    g.add_argument("--draft-min-p", "--draft-p-min", dest="draft_min_p", type=float, default=None)


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("many devices")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (jax.distributed)")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--mesh", default=None, help="DATAxMODEL, e.g. 1x4 (mesh.data x mesh.model)")


def overrides_from_args(args) -> list[str]:
    """Turn CLI flags into config overrides so flags and YAML share one validation path."""
    ov = []
    pairs = {
        "max_tokens": "generation.max_tokens", "temp": "generation.sampling.temperature",
        "top_k": "generation.sampling.top_k", "top_p": "generation.sampling.top_p",
        "min_p": "generation.sampling.min_p", "repeat_penalty": "generation.sampling.repeat_penalty",
        "frequency_penalty": "generation.sampling.frequency_penalty",
        "presence_penalty": "generation.sampling.presence_penalty",
        "seed": "generation.sampling.seed", "ctx_size": "runtime.ctx_size",
        "platform": "runtime.platform", "model_draft": "draft.model", "draft_n": "draft.n",
        "draft_min": "draft.n_min", "draft_min_p": "draft.p_min",
        "coordinator": "distributed.coordinator", "num_processes": "distributed.num_processes",
        "process_id": "distributed.process_id",
    }
    for attr, key in pairs.items():
        v = getattr(args, attr, None)
        if v is not None:
            ov.append(f"{key}={v}")
    if getattr(args, "flash_attn", None) is not None:
        ov.append(f"runtime.flash_attn={'true' if args.flash_attn == 'on' else 'false'}")
    if getattr(args, "prompt_matmul", None) is not None:
        ov.append(f"runtime.prompt_matmul={args.prompt_matmul}")
    if getattr(args, "draft_ngram", False):
        ov.append("draft.kind=ngram")
    mesh = getattr(args, "mesh", None)
    if mesh:
        try:
            d, m = (int(x) for x in mesh.lower().split("x"))
        except ValueError:
            from jllama.errors import ConfigError

            raise ConfigError(f"--mesh {mesh!r}: expected DATAxMODEL, e.g. 1x4") from None
        ov += [f"mesh.data={d}", f"mesh.model={m}"]
    return ov


def is_main_process(cfg: Config) -> bool:
    """Only process 0 of a multi-process run prints; the others run the same steps quietly."""
    return cfg.distributed.num_processes <= 1 or cfg.distributed.process_id == 0


def load_llama(cfg: Config, verbose: bool = True):
    setup_platform(cfg.runtime.platform, cfg.runtime.threads)
    if cfg.distributed.num_processes > 1:
        from jllama.parallel.distributed import initialize

        initialize(cfg.distributed)
    verbose = verbose and is_main_process(cfg)
    from jllama.api import Llama

    if verbose:
        print(f"jllama: loading {cfg.model} ...", file=sys.stderr)
    llm = Llama(cfg.model, ctx_size=cfg.runtime.ctx_size, n_slots=1,
                cache_type=cfg.runtime.cache_type_k, cache_type_v=cfg.runtime.cache_type_v,
                quant=cfg.quant,
                compile_cache=cfg.runtime.compile_cache, flash_attn=cfg.runtime.flash_attn,
                prompt_matmul=cfg.runtime.prompt_matmul,
                mesh=cfg.mesh if cfg.mesh.data * cfg.mesh.model > 1 else None,
                draft=cfg.draft if cfg.draft.kind else None)
    if verbose:
        import jax

        print(f"jllama: {llm.spec.arch}, {llm.spec.n_layer} layers, n_embd {llm.spec.n_embd}, "
              f"vocab {llm.spec.n_vocab}; loaded in {llm.load_s:.2f} s on "
              f"{jax.default_backend()}", file=sys.stderr)
    return llm


def stream_to_stdout(llm, prompt, cfg: Config, stop: list[str] | None = None) -> str:
    from jllama.config import sampling_params

    g = cfg.generation
    params = sampling_params(g.sampling)
    if cfg.distributed.num_processes > 1 and params.seed is None:
        import dataclasses

        from jllama.parallel.distributed import shared_seed

        params = dataclasses.replace(params, seed=shared_seed())  # same draws on every process
    show = is_main_process(cfg)
    out = []
    for piece in llm.stream(prompt, g.max_tokens, params, stop=(stop or []) + g.sampling.stop):
        out.append(piece)
        if g.stream and show:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if show:
        if not g.stream:
            sys.stdout.write("".join(out))
        sys.stdout.write("\n")
        sys.stdout.flush()
    return "".join(out)


def print_timings(llm, cfg: Config | None = None) -> None:
    if cfg is not None and not is_main_process(cfg):
        return
    t = llm.engine.timings
    print(
        f"\njllama: prompt {t.prompt_tokens} tokens in {t.prompt_s * 1e3:.0f} ms "
        f"({t.prompt_tps:.1f} t/s, first token incl. compile {t.first_token_s:.2f} s) | "
        f"generation {t.gen_tokens} tokens in {t.gen_s * 1e3:.0f} ms ({t.gen_tps:.1f} t/s) | "
        f"finish: {llm.finish_reason}",
        file=sys.stderr,
    )
