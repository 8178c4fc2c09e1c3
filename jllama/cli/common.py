"""Helpers shared by the generation commands (run, generate, chat)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from jllama.errors import ConfigError, JllamaError

if TYPE_CHECKING:  # jllama.config imports JAX; the parser is built without it
    from jllama.config import Config

_GPU = {"gpu", "cuda", "rocm"}  # JAX's aliases: a "gpu" backend answers to all three


def setup_platform(platform: str | None, threads: int | None = None,
                   where: str = "runtime.platform") -> None:
    """Choose the JAX backend and the CPU thread counts before JAX starts its backends (JAX
    reads JAX_PLATFORMS when it is imported, so the choice also goes to ``jax.config``).

    ``platform``: a value from the config or ``--platform`` (named by ``where``) wins over an
    inherited JAX_PLATFORMS, with a note on stderr when the two differ; None keeps
    JAX_PLATFORMS when it is set, else cpu; "auto" leaves the choice to JAX (JAX_PLATFORMS
    when set, else its own order: TPU, GPU, CPU). ``threads`` (llama.cpp's ``-t``): XLA:CPU's
    intra-op pool size (its ``NPROC`` setting) and the C++ kernels' helper threads
    (``JLLAMA_CPU_KERNEL_THREADS``); 1 also turns off XLA's multi-threaded Eigen ops."""
    env = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platform is None:
        want = env or "cpu"
    elif platform.strip().lower() == "auto":
        want = env
    else:
        want = platform.strip().lower()
        if env and env != want:
            print(f"jllama: using platform '{want}' ({where}) instead of JAX_PLATFORMS={env}",
                  file=sys.stderr)
    thread_env = {}
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be at least 1, got {threads}")
        thread_env = {"NPROC": str(threads), "JLLAMA_CPU_KERNEL_THREADS": str(threads)}
    if _backends_started():
        # a second command in one process (tests, a Python caller): JAX keeps its backends
        import jax

        have = jax.default_backend()
        first = want.split(",")[0]
        if first and not (first == have or (first in _GPU and have in _GPU)):
            raise ConfigError(f"JAX already runs on '{have}' in this process; {where} asks "
                              f"for '{first}'")
        if any(os.environ.get(k) != v for k, v in thread_env.items()):
            raise ConfigError(f"JAX's backends already started in this process; "
                              f"runtime.threads={threads} cannot apply any more")
        return
    if want:
        os.environ["JAX_PLATFORMS"] = want
    else:
        os.environ.pop("JAX_PLATFORMS", None)
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_platforms", want or None)
    os.environ.update(thread_env)
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()


def _backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def start_backend() -> str:
    """Start JAX's backend now, so that a platform JAX cannot open is one line naming it (JAX
    says RuntimeError, or a bare AssertionError for CUDA without a GPU). Returns its name."""
    import jax

    try:
        return jax.default_backend()
    except Exception as e:  # noqa: BLE001 - whatever the plugin raises
        asked = os.environ.get("JAX_PLATFORMS") or "auto"
        msg = str(e).split(" (set JAX_PLATFORMS")[0].split(" (you may need")[0].strip()
        msg = msg.splitlines()[0] if msg else f"no '{asked}' device found"
        raise JllamaError(f"JAX cannot start platform '{asked}': {msg} (set runtime.platform "
                          "/ --platform to one this machine has, e.g. cpu)") from None


# llama.cpp's further samplers: flag dest -> generation.sampling key (common/arg.cpp's names)
EXTENDED_SAMPLING = {"typical_p": "typical_p", "top_n_sigma": "top_n_sigma",
                     "xtc_probability": "xtc_probability", "xtc_threshold": "xtc_threshold",
                     "dynatemp_range": "dynatemp_range", "dynatemp_exp": "dynatemp_exponent",
                     "min_keep": "min_keep", "mirostat": "mirostat",
                     "mirostat_lr": "mirostat_eta", "mirostat_ent": "mirostat_tau",
                     "dry_multiplier": "dry_multiplier", "dry_base": "dry_base",
                     "dry_allowed_length": "dry_allowed_length",
                     "dry_penalty_last_n": "dry_penalty_last_n"}


def dry_breakers_override(args) -> list[str]:
    """--dry-sequence-breaker (repeatable; the first replaces the defaults, "none" clears
    them, as common/arg.cpp does) as a config override."""
    brk = getattr(args, "dry_sequence_breaker", None)
    if brk is None:
        return []
    import json

    out: list[str] = []
    for b in brk:
        if b == "none":
            out = []
        else:
            out.append(process_escapes(b))
    return [f"generation.sampling.dry_sequence_breakers={json.dumps(out)}"]


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("'"): b"'",
            ord('"'): b'"', ord("\\"): b"\\"}


def process_escapes(text: str) -> str:
    """common's string_process_escapes: \\n, \\r, \\t, \\', \\", \\\\ and \\xHH; any other
    backslash stays as written."""
    src, out, i = text.encode(), bytearray(), 0
    while i < len(src):
        c = src[i]
        if c == 0x5C and i + 1 < len(src):
            i += 1
            e = src[i]
            if e in _ESCAPES:
                out += _ESCAPES[e]
            elif (e == ord("x") and i + 2 < len(src)
                  and all(chr(h) in "0123456789abcdefABCDEF" for h in src[i + 1 : i + 3])):
                out.append(int(src[i + 1 : i + 3], 16))
                i += 2
            else:
                out += bytes((0x5C, e))
        else:
            out.append(c)
        i += 1
    return out.decode("utf-8", "replace")


def add_extended_sampling_args(g) -> None:
    g.add_argument("--typical", "--typical-p", dest="typical_p", type=float, default=None,
                   help="locally typical sampling p (1.0 = off)")
    g.add_argument("--top-nsigma", "--top-n-sigma", dest="top_n_sigma", type=float,
                   default=None, help="keep logits within n std of the top one (-1 = off)")
    g.add_argument("--xtc-probability", type=float, default=None, help="XTC chance (0 = off)")
    g.add_argument("--xtc-threshold", type=float, default=None, help="XTC threshold (0.1)")
    g.add_argument("--dynatemp-range", type=float, default=None,
                   help="dynamic temperature range (0 = off)")
    g.add_argument("--dynatemp-exp", type=float, default=None,
                   help="dynamic temperature exponent (1.0)")
    g.add_argument("--min-keep", type=int, default=None,
                   help="tokens each sampler must keep at least (0 = off)")
    g.add_argument("--mirostat", type=int, default=None,
                   help="Mirostat sampling (0 = off, 1 = Mirostat, 2 = Mirostat 2.0); top-k, "
                        "top-p, typical-p and the penalties are then not used")
    g.add_argument("--mirostat-lr", type=float, default=None,
                   help="Mirostat learning rate, eta (0.1)")
    g.add_argument("--mirostat-ent", type=float, default=None,
                   help="Mirostat target entropy, tau (5.0)")
    g.add_argument("--dry-multiplier", type=float, default=None,
                   help="DRY sampling multiplier (0 = off)")
    g.add_argument("--dry-base", type=float, default=None,
                   help="DRY base value (1.75; below 1 keeps it)")
    g.add_argument("--dry-allowed-length", type=int, default=None,
                   help="DRY: repeats longer than this are penalised (2)")
    g.add_argument("--dry-penalty-last-n", type=int, default=None,
                   help="DRY: tokens scanned for repeats (64, 0 = off)")
    g.add_argument("--dry-sequence-breaker", action="append", default=None,
                   help="DRY sequence breaker (repeatable; replaces the defaults '\\n', ':', "
                        "'\"', '*'; 'none' for none)")


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
    add_extended_sampling_args(g)
    p.add_argument("-c", "--ctx-size", type=int, default=None)
    add_numerics_args(p, via_config=True)
    add_platform_args(p)
    add_cache_type_args(p)
    add_kv_paged_args(p)
    add_draft_args(p)
    add_distributed_args(p)
    add_lora_args(p)
    add_model_args(p)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """llama.cpp's model-loading flags (common/arg.cpp) that change what a GGUF loads as."""
    g = p.add_argument_group("model loading (llama.cpp's flags)")
    g.add_argument("--override-kv", metavar="KEY=TYPE:VALUE", action="append", default=None,
                   help="override a GGUF metadata key; TYPE int, float, bool or str (repeatable; "
                   "comma-separated values too), e.g. tokenizer.ggml.add_bos_token=bool:false")
    g.add_argument("--rope-scaling", metavar="{none,linear,yarn}", default=None,
                   help="RoPE frequency scaling method (default: the model's, else linear)")
    g.add_argument("--rope-scale", metavar="N", dest="rope_freq_scale", action=_RopeScale,
                   default=None, help="RoPE context scaling factor: --rope-freq-scale 1/N")
    g.add_argument("--rope-freq-base", metavar="N", default=None,
                   help="RoPE base frequency (default: the model's)")
    g.add_argument("--rope-freq-scale", metavar="N", default=None,
                   help="RoPE frequency scaling factor, expands the context by 1/N")
    g.add_argument("--yarn-orig-ctx", metavar="N", default=None,
                   help="YaRN: the model's original context (default: the model's training one)")
    for flag, what in (("ext-factor", "extrapolation mix factor (0: full interpolation)"),
                       ("attn-factor", "attention magnitude scale"),
                       ("beta-slow", "high correction dim or alpha"),
                       ("beta-fast", "low correction dim or beta")):
        g.add_argument(f"--yarn-{flag}", metavar="N", default=None,
                       help=f"YaRN: {what} (default: the model's)")
    g.add_argument("--control-vector", metavar="FNAME", action="append", default=None,
                   help="add a control vector GGUF (repeatable; comma-separated values too)")
    g.add_argument("--control-vector-scaled", metavar="FNAME:SCALE", action="append",
                   default=None, help="add a control vector with a scale (FNAME:SCALE,... too)")
    g.add_argument("--control-vector-layer-range", metavar=("START", "END"), nargs=2,
                   default=None, help="layers the control vectors apply to (inclusive)")


def _cvec_overrides(args) -> list[str]:
    """--control-vector entries then --control-vector-scaled ones (argparse keeps the two flags
    apart, so plain vectors come first; the sum does not depend on the order)."""
    import json

    out = []
    for v in getattr(args, "control_vector", None) or []:
        out += [{"path": f, "scale": 1.0} for f in v.split(",") if f]
    for v in getattr(args, "control_vector_scaled", None) or []:
        for item in (x for x in v.split(",") if x):
            parts = item.split(":")
            try:
                if len(parts) != 2 or not parts[0]:
                    raise ValueError
                out.append({"path": parts[0], "scale": float(parts[1])})
            except ValueError:
                raise ConfigError(f"--control-vector-scaled {item!r}: expected FNAME:SCALE") \
                    from None
    ov = [f"control_vectors={json.dumps(out)}"] if out else []
    rng = getattr(args, "control_vector_layer_range", None)
    if rng is not None:
        try:
            a, b = (int(x) for x in rng)
        except ValueError:
            raise ConfigError(f"--control-vector-layer-range {' '.join(rng)}: expected two "
                              "integers START END") from None
        ov.append(f"control_vector_layer_range=[{a}, {b}]")
    return ov


class _RopeScale(argparse.Action):
    """--rope-scale N sets what --rope-freq-scale 1/N does (the later flag wins, as there)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, ("1/", values))


_ROPE_FLAGS = {"rope_freq_base": ("--rope-freq-base", "freq_base", float),
               "rope_freq_scale": ("--rope-freq-scale", "freq_scale", float),
               "yarn_orig_ctx": ("--yarn-orig-ctx", "yarn_orig_ctx", int),
               "yarn_ext_factor": ("--yarn-ext-factor", "yarn_ext_factor", float),
               "yarn_attn_factor": ("--yarn-attn-factor", "yarn_attn_factor", float),
               "yarn_beta_slow": ("--yarn-beta-slow", "yarn_beta_slow", float),
               "yarn_beta_fast": ("--yarn-beta-fast", "yarn_beta_fast", float)}


def _rope_overrides(args) -> list[str]:
    ov = []
    sc = getattr(args, "rope_scaling", None)
    if sc is not None:
        if sc not in ("none", "linear", "yarn"):
            raise ConfigError(f"--rope-scaling {sc!r}: expected none, linear or yarn")
        ov.append(f"rope.scaling={sc}")
    for attr, (flag, key, kind) in _ROPE_FLAGS.items():
        v = getattr(args, attr, None)
        if v is None:
            continue
        inverse = isinstance(v, tuple)
        if inverse:
            flag, v = "--rope-scale", v[1]
        try:
            x = kind(v)
            if inverse:
                x = 1.0 / x
        except (ValueError, ZeroDivisionError):
            what = "an integer" if kind is int else "a nonzero number" if inverse else "a number"
            raise ConfigError(f"{flag} {v!r}: expected {what}") from None
        ov.append(f"rope.{key}={f'!!float {x!r}' if kind is float else x}")
    return ov


def model_overrides_from_args(args) -> list[str]:
    """Config overrides for add_model_args's flags."""
    import json

    ov = []
    if getattr(args, "override_kv", None):
        from jllama.gguf.overrides import parse_kv_overrides

        kv = parse_kv_overrides(args.override_kv)
        # a YAML flow mapping: JSON scalars, floats tagged (YAML 1.1 reads 1e-05 as a string)
        items = (f"{json.dumps(k)}: {f'!!float {v!r}' if isinstance(v, float) else json.dumps(v)}"
                 for k, v in kv.items())
        ov.append(f"kv_overrides={{{', '.join(items)}}}")
    return ov + _rope_overrides(args) + _cvec_overrides(args)


def model_load_kwargs(cfg: Config) -> dict:
    """Llama's keyword arguments for add_model_args's config keys."""
    return dict(kv_overrides=cfg.kv_overrides, rope=cfg.rope,
                control_vectors=[(c.path, c.scale) for c in cfg.control_vectors],
                control_vector_layer_range=tuple(cfg.control_vector_layer_range),
                n_gpu_layers=n_gpu_layers_value(cfg.runtime.n_gpu_layers),
                kv_paged=cfg.runtime.kv_paged, kv_pages=cfg.runtime.kv_pages)


def add_lora_args(p: argparse.ArgumentParser) -> None:
    """llama.cpp's adapter flags (common/arg.cpp), applied unmerged in the order given."""
    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--lora", metavar="FNAME", action="append", default=None,
                   help="LoRA adapter GGUF, scale 1 (repeatable; comma-separated values too)")
    g.add_argument("--lora-scaled", metavar="FNAME:SCALE", action="append", default=None,
                   help="LoRA adapter with a user scale (repeatable; FNAME:SCALE,... too)")


def lora_from_args(args) -> list[dict]:
    """``--lora`` then ``--lora-scaled`` entries as config ``lora`` items (llama.cpp parses the
    two flags into one list in that order per flag occurrence; argparse keeps them apart, so
    plain adapters come first)."""
    out = []
    for v in getattr(args, "lora", None) or []:
        out += [{"path": f, "scale": 1.0} for f in v.split(",") if f]
    for v in getattr(args, "lora_scaled", None) or []:
        for item in (x for x in v.split(",") if x):
            f, sep, s = item.rpartition(":")
            try:
                if not sep or not f:
                    raise ValueError
                out.append({"path": f, "scale": float(s)})
            except ValueError:
                raise ConfigError(f"--lora-scaled {item!r}: expected FNAME:SCALE") from None
    return out


def add_platform_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform", default=None,
                   help="cpu | gpu | tpu | auto (default: JAX_PLATFORMS if set, else cpu; "
                   "given here it wins over JAX_PLATFORMS)")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="CPU threads, as llama.cpp's -t (default: all cores)")
    p.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", dest="n_gpu_layers", metavar="N",
                   type=_ngl_arg, default=None,
                   help="max. number of layers to store in VRAM, either an exact number, "
                   "'auto', or 'all' (default: auto); the rest stream from host memory. "
                   "Ignored on a CPU backend, as by llama.cpp's CPU build")


KV_CACHE_TYPES = "f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1"  # models/kvquant.py


def add_cache_type_args(p) -> None:
    """llama.cpp's -ctk / -ctv (a parser or an argument group)."""
    for short, name, which in (("-ctk", "--cache-type-k", "K"), ("-ctv", "--cache-type-v", "V")):
        p.add_argument(short, name, default=None, metavar="TYPE",
                       help=f"KV cache type for {which}: {KV_CACHE_TYPES} (default f16)")


def add_kv_paged_args(p: argparse.ArgumentParser) -> None:
    """The paged KV cache (jllama's own: llama.cpp has no paged cache) for run, serve, bench."""
    p.add_argument("--kv-paged", action="store_true", default=None,
                   help="KV cache as a pool of 16-token pages (memory follows the live tokens; "
                   "ragged paged attention on GPU/TPU). Off by default: not yet measured on "
                   "a device")
    p.add_argument("--kv-pages", type=int, default=None, metavar="N",
                   help="pages in the --kv-paged pool (default: every slot's full context)")


def _ngl_arg(value: str) -> int | str:
    """-ngl's value as llama.cpp parses it: a number, auto or all (a bad one: argparse's
    usage line, exit code 1)."""
    v = value.strip().lower()
    if v in ("auto", "all"):
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected a number of layers, 'auto' or 'all'") from None


def n_gpu_layers_value(v: int | str | None) -> int | str | None:
    """A config / flag value as Llama's ``n_gpu_layers`` (numbers as int)."""
    if isinstance(v, str) and v not in ("auto", "all"):
        return int(v)
    return v


def warn_ngl_ignored(value: int | str | None) -> None:
    """llama.cpp's CPU build accepts -ngl and says it ignores it; so does a CPU backend here.
    Call after the backend started."""
    import jax

    if value is None or value == "auto" or jax.default_backend() != "cpu":
        return
    if os.environ.get("JLLAMA_OFFLOAD_ON_CPU", "") == "1":
        return
    print("jllama: warning: no accelerator backend, --gpu-layers option will be ignored "
          "(--platform gpu|tpu picks one)", file=sys.stderr)


def add_numerics_args(p: argparse.ArgumentParser, via_config: bool = False) -> None:
    """The two numerics switches: llama.cpp's -fa and the prompt matmul. ``via_config``: the
    command reads a run config, so unset flags stay None and the config's values apply."""
    p.add_argument("-fa", "--flash-attn", choices=("on", "off", "auto"),
                   default=None if via_config else "on",
                   help="llama.cpp's flash attention numerics (default on; auto = on, as "
                   "llama.cpp's auto picks on its CPU backend)")
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
        "platform": "runtime.platform", "threads": "runtime.threads",
        "n_gpu_layers": "runtime.n_gpu_layers",
        "kv_paged": "runtime.kv_paged", "kv_pages": "runtime.kv_pages",
        "cache_type_k": "runtime.cache_type_k", "cache_type_v": "runtime.cache_type_v",
        "model_draft": "draft.model", "draft_n": "draft.n",
        "draft_min": "draft.n_min", "draft_min_p": "draft.p_min",
        "coordinator": "distributed.coordinator", "num_processes": "distributed.num_processes",
        "process_id": "distributed.process_id",
    }
    pairs.update({a: f"generation.sampling.{k}" for a, k in EXTENDED_SAMPLING.items()})
    for attr, key in pairs.items():
        v = getattr(args, attr, None)
        if v is not None:
            ov.append(f"{key}={v}")
    ov += dry_breakers_override(args)
    ov += model_overrides_from_args(args)
    if getattr(args, "flash_attn", None) is not None:
        ov.append(f"runtime.flash_attn={'false' if args.flash_attn == 'off' else 'true'}")
    if getattr(args, "prompt_matmul", None) is not None:
        ov.append(f"runtime.prompt_matmul={args.prompt_matmul}")
    lora = lora_from_args(args)
    if lora:  # JSON is YAML: paths with any characters survive the override parser
        import json

        ov.append(f"lora={json.dumps(lora)}")
    if getattr(args, "mmproj", None):
        import json

        ov.append(f"vision.mmproj={json.dumps(args.mmproj)}")
    if getattr(args, "image", None):
        import json

        ov.append(f"vision.images={json.dumps(args.image)}")
    if getattr(args, "draft_ngram", False):
        ov.append("draft.kind=ngram")
    mesh = getattr(args, "mesh", None)
    if mesh:
        try:
            d, m = (int(x) for x in mesh.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--mesh {mesh!r}: expected DATAxMODEL, e.g. 1x4") from None
        ov += [f"mesh.data={d}", f"mesh.model={m}"]
    return ov


def platform_origin(cfg: Config) -> str:
    """Where a run's platform was chosen, for setup_platform's note."""
    if cfg.source == "<defaults>":
        return "--platform"
    return f"runtime.platform in {cfg.source.removesuffix(' (with overrides)')}"


def is_main_process(cfg: Config) -> bool:
    """Only process 0 of a multi-process run prints; the others run the same steps quietly."""
    return cfg.distributed.num_processes <= 1 or cfg.distributed.process_id == 0


def load_llama(cfg: Config, verbose: bool = True):
    setup_platform(cfg.runtime.platform, cfg.runtime.threads, platform_origin(cfg))
    if cfg.distributed.num_processes > 1:
        from jllama.parallel.distributed import initialize

        initialize(cfg.distributed)
    start_backend()
    verbose = verbose and is_main_process(cfg)
    if verbose:
        warn_ngl_ignored(cfg.runtime.n_gpu_layers)
    from jllama.api import Llama

    if verbose:
        print(f"jllama: loading {cfg.model} ...", file=sys.stderr)
    llm = Llama(cfg.model, ctx_size=cfg.runtime.ctx_size, n_slots=1,
                cache_type=cfg.runtime.cache_type_k, cache_type_v=cfg.runtime.cache_type_v,
                quant=cfg.quant,
                compile_cache=cfg.runtime.compile_cache, flash_attn=cfg.runtime.flash_attn,
                prompt_matmul=cfg.runtime.prompt_matmul,
                mesh=cfg.mesh if cfg.mesh.data * cfg.mesh.model > 1 else None,
                draft=cfg.draft if cfg.draft.kind else None, lora=cfg.lora,
                mmproj=cfg.vision.mmproj, **model_load_kwargs(cfg))
    if verbose:
        import jax

        print(f"jllama: {llm.spec.arch}, {llm.spec.n_layer} layers, n_embd {llm.spec.n_embd}, "
              f"vocab {llm.spec.n_vocab}; loaded in {llm.load_s:.2f} s on "
              f"{jax.default_backend()}", file=sys.stderr)
        if llm.offload is not None:
            print(f"jllama: {llm.offload.describe()}", file=sys.stderr)
    return llm


def add_vision_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vision (llama-mtmd-cli's flags)")
    g.add_argument("--mmproj", metavar="FNAME", default=None,
                   help="the model's vision projector GGUF (vision.mmproj)")
    g.add_argument("--image", metavar="FNAME", action="append", default=None,
                   help="an image for the prompt (repeatable; placed at the prompt's "
                        "<__media__> markers, else first)")


def messages_with_images(messages: list[dict], n_images: int) -> list[dict]:
    """Chat messages for ``n_images`` images: when no message has a media marker, one per
    image goes in front of the first user message (llama-mtmd-cli puts them in front of its
    prompt, the user message)."""
    from jllama.engine.multimodal import MEDIA_MARKER

    if not n_images or any(MEDIA_MARKER in str(m.get("content", "")) for m in messages):
        return messages
    out = [dict(m) for m in messages]
    for m in out:
        if m.get("role") == "user":
            m["content"] = MEDIA_MARKER * n_images + str(m.get("content", ""))
            return out
    raise ConfigError("images need a user message to go in")


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
    for piece in llm.stream(prompt, g.max_tokens, params, stop=(stop or []) + g.sampling.stop,
                            images=cfg.vision.images or None):
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
