"""Run configs: typed dataclasses loaded from YAML, with ``key.path=value`` overrides.

Every error names the file, the key path and what was expected, because users launch sweeps of
configs and a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jllama.engine.draft import DraftConfig
from jllama.errors import ConfigError
from jllama.models.spec import RopeOptions


@dataclass
class RuntimeConfig:
    # JAX backend: cpu | gpu | tpu | auto (JAX's own choice). Unset (null): JAX_PLATFORMS when
    # the environment sets it, else cpu; a value set here (or --platform) wins over JAX_PLATFORMS
    platform: str | None = None
    ctx_size: int = 2048
    # llama.cpp's -t: XLA:CPU's intra-op thread pool and the C++ kernels' helper threads
    # (None = every core the process may use); 1 also turns off XLA's multi-threaded Eigen ops
    threads: int | None = None
    cache_type_k: str = "f16"  # llama.cpp's default
    cache_type_v: str = "f16"
    compile_cache: bool = True
    # llama.cpp's -fa: on (its CPU default) = its flash-attention kernel's rounding, bit for bit
    # on CPU with an f16 cache; off = the rounding of its non-FA graph (llama-cpp-python's default)
    flash_attn: bool = True
    # prompt matmuls on CPU: "int8" = ggml's own arithmetic (bit-identical logits/perplexity);
    # "f32" = dequantized tiles + XLA's f32 GEMM (the path for CPUs without the int8 GEMM):
    # llama.cpp's activation rounding kept, perplexity within its rounding noise, not exact
    prompt_matmul: str = "int8"
    # llama.cpp's -ngl / --gpu-layers / --n-gpu-layers: how many of the n_layer + 1 layers
    # (the output layer counts, and is the last) hold their weights on the accelerator, the
    # others streamed from host memory: a number, "auto" (llama.cpp's default: as many as fit
    # the device) or "all". Ignored on a CPU backend, as by llama.cpp's CPU build
    n_gpu_layers: int | str = "auto"
    # the slots' KV cache as a pool of 16-token pages (a block table per sequence, ragged paged
    # attention off the CPU): memory follows the live tokens, not slots x ctx_size. Off by
    # default until a device run has measured it; kv_pages sizes the pool (null: every slot's
    # full context, as the dense cache)
    kv_paged: bool = False
    kv_pages: int | None = None


@dataclass
class MeshConfig:
    data: int = 1
    model: int = 1


@dataclass
class DistributedConfig:
    """Multi-process runs through ``jax.distributed`` (one process per host)."""

    coordinator: str | None = None  # HOST:PORT of process 0
    num_processes: int = 1
    process_id: int = 0


@dataclass
class SamplingConfig:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # llama.cpp's further samplers (--typical, --top-nsigma, --xtc-*, --dynatemp-*, --min-keep)
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    min_keep: int = 0
    # mirostat (--mirostat 1|2, --mirostat-ent tau, --mirostat-lr eta) and DRY (--dry-*)
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    # SamplingParams' default (sampling.DRY_BREAKERS; not imported here: that loads JAX)
    dry_sequence_breakers: list[str] = field(default_factory=lambda: ["\n", ":", "\"", "*"])


@dataclass
class Message:
    role: str
    content: str


@dataclass
class GenerationConfig:
    prompt: str | None = None
    messages: list[Message] | None = None
    max_tokens: int = 128
    stream: bool = True
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4
    api_key: str | None = None
    max_queue: int = 64
    timeout: float = 600.0
    model_alias: str | None = None  # names for the API, comma-separated (llama-server's -a)
    # llama-server's switches (its defaults): /metrics, GET /slots, POST /props
    metrics: bool = False
    slots: bool = True
    props: bool = False
    cors_origins: str = "*"  # comma-separated; "localhost": loopback origins only
    n_predict: int = -1  # default tokens per request (-1: until the context is full)
    kv_unified: bool = False  # every slot gets the whole ctx (-c) instead of ctx / parallel
    cache_prompt: bool = True  # requests reuse a slot's cached prefix unless they say not
    max_body: int = 16 * 1024 * 1024  # request bodies larger than this get 413
    media_path: str | None = None  # llama-server's --media-path: file:// images come from here
    allow_remote_media: bool = False  # fetch http(s) image URLs (llama-server always does)
    n_batch: int = 2048  # llama-server's -b: /infill sizes its prefix/suffix/extra by it
    spm_infill: bool = False  # llama-server's --spm-infill: suffix before prefix in /infill
    context_shift: bool = False  # llama-server's --context-shift (its default: off)
    # llama-server's --cache-reuse: min chunk of a slot's cached tokens moved into place by KV
    # shift past the common prefix (0: off; a request's n_cache_reuse overrides it)
    cache_reuse: int = 0
    # llama-server's --swa-full: jllama's sliding-window caches always hold the whole context;
    # the flag only allows the context shift llama-server allows with it
    swa_full: bool = False
    slot_save_path: str | None = None  # llama-server's --slot-save-path: POST /slots/{id}
    # llama-server's --sleep-idle-seconds: let go of the model after this long idle (-1: never)
    sleep_idle_seconds: int = -1
    # llama-server's --cache-ram (MiB of host prompt cache; -1: no limit, 0: off) and
    # --cache-idle-slots (idle slots go to that cache when a task starts)
    cache_ram: int = 8192
    cache_idle_slots: bool = True
    # llama-server's request defaults a request may override: --ignore-eos, --keep (n_keep),
    # --embd-normalize (-1 none, 0 max-abs int16, 1 taxicab, 2 euclidean, >2 p-norm), and the
    # constraint of requests that send no grammar/json_schema/response_format: --grammar
    # (GBNF text) or -j (a JSON schema, as JSON text); --grammar-file/-jf read files into them
    ignore_eos: bool = False
    n_keep: int = 0
    embd_normalize: int = 2
    grammar: str | None = None
    json_schema: str | None = None
    # llama-server's -sps: a free slot is picked for a prompt when more than this share of the
    # prompt is its cached prefix (0: never by similarity, the first free slot)
    slot_prompt_similarity: float = 0.1
    # llama-server's --api-prefix (every route under it, no trailing '/'), --path (static
    # files from this directory at the prefix's '/') and --ssl-key-file/--ssl-cert-file (TLS
    # when both are given)
    api_prefix: str = ""
    static_path: str | None = None
    ssl_key_file: str | None = None
    ssl_cert_file: str | None = None


@dataclass
class PerplexityConfig:
    """A perplexity job (``jllama perplexity --config`` or ``jllama run`` when ``file`` is set):
    llama-perplexity's ``-f``, ``-c`` (the window, also the model's context for this job),
    ``--chunks`` and the chunks evaluated per compiled batch."""

    file: str | None = None  # relative paths: relative to the config file when it is there
    ctx: int = 512
    chunks: int | None = None
    batch: int = 2


@dataclass
class LoraConfig:
    """A LoRA adapter GGUF applied unmerged (llama.cpp's --lora / --lora-scaled FNAME:SCALE)."""

    path: str = ""  # required (checked in load_config)
    scale: float = 1.0


@dataclass
class ControlVectorConfig:
    """A control vector GGUF (llama.cpp's --control-vector / --control-vector-scaled
    FNAME:SCALE): its direction.N tensors, times scale, added to layer N's output."""

    path: str = ""  # required (checked in load_config)
    scale: float = 1.0


@dataclass
class VisionConfig:
    """Images in (llama-mtmd-cli's --mmproj / --image): the vision projector GGUF of the model
    and the images of a generation job (relative paths: relative to the config file when
    there). The prompt's ``<__media__>`` markers place them; without markers one per image
    goes first, as llama-mtmd-cli does."""

    mmproj: str | None = None
    images: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: str = "smollm2-135m-instruct"
    quant: dict[str, Any] | None = None  # quantize-on-load mix (see jllama.quant.mixes)
    # adapters in the order given (a relative path is relative to the config file when there)
    lora: list[LoraConfig] = field(default_factory=list)
    # GGUF metadata overrides at load (llama.cpp's --override-kv): key -> bool/int/float/str
    kv_overrides: dict[str, Any] | None = None
    # llama.cpp's rope context parameters (--rope-scaling, --rope-freq-base, --yarn-*): 0 / -1 /
    # null keep the model's value
    rope: RopeOptions = field(default_factory=RopeOptions)
    # control vectors, summed (relative paths: relative to the config file when there), and the
    # layers they apply to (inclusive; <= 0: the first / last layer: --control-vector-layer-range)
    control_vectors: list[ControlVectorConfig] = field(default_factory=list)
    control_vector_layer_range: list[int] = field(default_factory=lambda: [-1, -1])
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    source: str = field(default="<defaults>", repr=False)  # where it was loaded from


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None)) + " (or null)"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp) if f.name != 'source')}"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"{src}: '{key}' must be {_describe(tp)}, got {type(value).__name__} {value!r}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, src)
            except ConfigError as e:
                errs.append(e)
        raise bad()
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (et,) = typing.get_args(tp)
        return [_coerce(v, et, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, f"{key}.{k}", src): _coerce(v, vt, f"{key}.{k}", src) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key, src)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise bad()


# keys older configs may still carry: each is an error that says what to write instead
_REMOVED = {
    "runtime.dtype": "activations are always f32, as llama.cpp's CPU backend computes them; "
                     "the KV cache's types are runtime.cache_type_k / cache_type_v",
    "runtime.n_slots": "the slot count is server.parallel (jllama serve --parallel); "
                       "run/generate/chat decode one sequence",
}


def _build(cls: type, data: dict, prefix: str, src: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key in _REMOVED:
            raise ConfigError(f"{src}: '{key}' is no longer a setting: {_REMOVED[key]}")
        if k not in fields:
            raise ConfigError(f"{src}: unknown key '{key}' (known keys here: {', '.join(sorted(fields))})")
        kwargs[k] = _coerce(v, hints[k], key, src)
    return cls(**kwargs)


def _set_path(d: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{path}': '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for it in items:
        if "=" not in it:
            raise ConfigError(f"override '{it}' is not of the form key.path=value")
        k, v = it.split("=", 1)
        try:
            val = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            val = v
        out.append((k.strip(), val))
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML run config (or the defaults) and apply ``key.path=value`` overrides."""
    data: dict = {}
    src = "<defaults>"
    if path is not None:
        p = Path(path)
        src = str(p)
        if not p.exists():
            raise ConfigError(f"{src}: config file not found")
        if p.is_dir():
            raise ConfigError(f"{src}: is a directory, expected a YAML run config")
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{src}: cannot read the config file: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{src}: not a UTF-8 text file") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{src}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{src}: top level must be a mapping of sections, got {type(data).__name__}")
    for k, v in parse_overrides(overrides or []):
        _set_path(data, k, v)
    if src != "<defaults>" and overrides:
        src = f"{src} (with overrides)"
    cfg = _build(Config, data, "", src)
    cfg.source = src
    if cfg.generation.prompt is not None and cfg.generation.messages is not None:
        raise ConfigError(f"{src}: set either 'generation.prompt' or 'generation.messages', not both")
    if cfg.runtime.ctx_size < 16:
        raise ConfigError(f"{src}: 'runtime.ctx_size' must be at least 16, got {cfg.runtime.ctx_size}")
    if cfg.runtime.threads is not None and cfg.runtime.threads < 1:
        raise ConfigError(f"{src}: 'runtime.threads' must be at least 1 (or null: all cores), "
                          f"got {cfg.runtime.threads}")
    ngl = cfg.runtime.n_gpu_layers
    if isinstance(ngl, str) and ngl.strip().lower() not in ("auto", "all"):
        raise ConfigError(f"{src}: 'runtime.n_gpu_layers' must be a number of layers, 'auto' or "
                          f"'all', got {ngl!r}")
    if cfg.runtime.kv_pages is not None and cfg.runtime.kv_pages < 2:
        raise ConfigError(f"{src}: 'runtime.kv_pages' must be at least 2 (page 0 is scratch), "
                          f"got {cfg.runtime.kv_pages}")
    if cfg.runtime.platform is not None and not cfg.runtime.platform.strip():
        raise ConfigError(f"{src}: 'runtime.platform' must be cpu, gpu, tpu or auto (or null), "
                          "got an empty string")
    pp = cfg.perplexity
    if pp.ctx < 16 or pp.batch < 1 or (pp.chunks is not None and pp.chunks < 1):
        raise ConfigError(f"{src}: perplexity settings out of range (ctx >= 16, batch >= 1, "
                          f"chunks >= 1 or null): {pp}")
    if pp.file is not None and (cfg.generation.prompt is not None
                                or cfg.generation.messages is not None):
        raise ConfigError(f"{src}: a job is either a generation ('generation.prompt' / "
                          "'generation.messages') or a perplexity run ('perplexity.file'), "
                          "not both")
    if cfg.runtime.prompt_matmul not in ("int8", "f32"):
        raise ConfigError(f"{src}: 'runtime.prompt_matmul' must be int8 or f32, "
                          f"got {cfg.runtime.prompt_matmul!r}")
    sm = cfg.generation.sampling
    if sm.mirostat not in (0, 1, 2):
        raise ConfigError(f"{src}: 'generation.sampling.mirostat' must be 0 (off), 1 or 2, "
                          f"got {sm.mirostat}")
    if sm.dry_penalty_last_n < 0 or sm.dry_allowed_length < 0:
        raise ConfigError(f"{src}: 'generation.sampling.dry_penalty_last_n' and "
                          "'dry_allowed_length' must be at least 0, got "
                          f"{sm.dry_penalty_last_n} and {sm.dry_allowed_length}")
    if sm.dry_base < 1.0:  # as llama.cpp's --dry-base: a base below 1 leaves the default
        sm.dry_base = SamplingConfig.dry_base
    d = cfg.draft
    if d.kind not in (None, "model", "ngram"):
        raise ConfigError(f"{src}: 'draft.kind' must be model, ngram or null, got {d.kind!r}")
    if d.kind is None and d.model:
        d.kind = "model"
    if d.kind == "model" and not d.model:
        raise ConfigError(f"{src}: 'draft.kind' is model but 'draft.model' is not set")
    if d.n < 1 or d.n_min < 0 or not 0.0 <= d.p_min <= 1.0 or d.ngram < 1:
        raise ConfigError(f"{src}: draft settings out of range (n >= 1, n_min >= 0, "
                          f"0 <= p_min <= 1, ngram >= 1): {d}")
    di = cfg.distributed
    if di.num_processes < 1 or not 0 <= di.process_id < di.num_processes:
        raise ConfigError(f"{src}: 'distributed.process_id' must be in [0, num_processes), "
                          f"got {di.process_id} of {di.num_processes}")
    if di.num_processes > 1 and not di.coordinator:
        raise ConfigError(f"{src}: 'distributed.coordinator' (HOST:PORT) is needed for "
                          f"num_processes={di.num_processes}")
    # relative model and text paths are relative to the config file (when the file is there)
    if path is not None and not os.path.isabs(cfg.model) and cfg.model.endswith(".gguf"):
        cand = Path(path).parent / cfg.model
        if cand.exists():
            cfg.model = str(cand)
    if len(cfg.control_vector_layer_range) != 2:
        raise ConfigError(f"{src}: 'control_vector_layer_range' must be [START, END]")
    for i, lo in enumerate([*cfg.lora, *cfg.control_vectors]):
        if not lo.path:
            sec = "lora" if i < len(cfg.lora) else "control_vectors"
            j = i if i < len(cfg.lora) else i - len(cfg.lora)
            raise ConfigError(f"{src}: '{sec}[{j}].path' is empty")
        if path is not None and not os.path.isabs(lo.path):
            cand = Path(path).parent / lo.path
            if cand.exists():
                lo.path = str(cand)
    vi = cfg.vision
    if vi.images and not vi.mmproj:
        raise ConfigError(f"{src}: 'vision.images' needs 'vision.mmproj' (the model's vision "
                          "projector GGUF)")
    if path is not None:
        if vi.mmproj and not os.path.isabs(vi.mmproj) and (Path(path).parent / vi.mmproj).exists():
            vi.mmproj = str(Path(path).parent / vi.mmproj)
        vi.images = [str(Path(path).parent / im)
                     if not os.path.isabs(im) and (Path(path).parent / im).exists() else im
                     for im in vi.images]
    if path is not None and pp.file is not None and not os.path.isabs(pp.file):
        cand = Path(path).parent / pp.file
        if cand.exists():
            pp.file = str(cand)
    return cfg


def sampling_params(s: SamplingConfig):
    """The engine's SamplingParams: every field of it has a same-named key here (the config
    adds only ``stop``, which the caller handles)."""
    import dataclasses

    from jllama.engine.sampling import SamplingParams

    vals = {f.name: getattr(s, f.name) for f in dataclasses.fields(SamplingParams)}
    vals["logit_bias"] = dict(s.logit_bias)
    vals["dry_sequence_breakers"] = tuple(s.dry_sequence_breakers)
    return SamplingParams(**vals)
