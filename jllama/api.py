"""A small llama-cpp-python-like Python API: load once, then tokenize / generate / chat / logits.

>>> from jllama import api
>>> llm = api.Llama("smollm2-135m-instruct")
>>> llm.generate("The capital of France is", max_tokens=8, temperature=0)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jllama.engine.sampling import SamplingParams
from jllama.errors import ConfigError, ContextError
from jllama.numerics import Numerics


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    prompt_s: float
    gen_s: float
    first_token_s: float

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def gen_tps(self) -> float:
        return len(self.tokens) / self.gen_s if self.gen_s else 0.0


def compile_cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    from jllama.registry import cache_dir

    return Path(path or os.environ.get("JLLAMA_XLA_CACHE") or cache_dir() / "xla")


def enable_compile_cache(path: str | os.PathLike[str] | None = None) -> None:
    """Persist XLA executables across processes so the second run starts warm."""
    import jax

    d = compile_cache_dir(path)
    d.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _mesh_config(mesh: object):
    """A MeshConfig from a MeshConfig or a ``{"data": d, "model": m}`` mapping."""
    from jllama.config import MeshConfig

    return MeshConfig(**mesh) if isinstance(mesh, dict) else mesh


def _rope_options(rope: object | None):
    """A RopeOptions from a RopeOptions or a mapping of its fields."""
    from jllama.models.spec import RopeOptions

    if rope is None or isinstance(rope, RopeOptions):
        return rope
    if isinstance(rope, dict):
        try:
            return RopeOptions(**rope)
        except TypeError as e:
            raise ConfigError(f"rope options {rope!r}: {e}") from None
    raise ConfigError(f"rope {rope!r}: expected a RopeOptions or a mapping of its fields")


def _scaled_paths(entries: list, what: str) -> list[tuple[str, float]]:
    """(path, scale) for each way ``Llama(lora=...)`` / ``Llama(control_vectors=...)`` takes
    a file: a path, (path, scale), {'path': ..., 'scale': ...} or an object with both."""
    out = []
    for e in entries:
        if isinstance(e, str | os.PathLike):
            out.append((os.fspath(e), 1.0))
        elif isinstance(e, dict) and "path" in e and set(e) <= {"path", "scale"}:
            out.append((os.fspath(e["path"]), float(e.get("scale", 1.0))))
        elif isinstance(e, tuple | list) and len(e) == 2:
            out.append((os.fspath(e[0]), float(e[1])))
        elif hasattr(e, "path") and hasattr(e, "scale"):
            out.append((os.fspath(e.path), float(e.scale)))
        else:
            raise ConfigError(f"{what} entry {e!r}: expected a path, (path, scale) or "
                              "{'path': ..., 'scale': ...}")
    return out


class Llama:
    """One loaded model: tokenizer + engine. ``model`` is a path or a registry name."""

    def __init__(self, model: str | os.PathLike[str], ctx_size: int = 2048, n_slots: int = 1,
                 cache_type: str | None = None, quant: dict | None = None,
                 compile_cache: bool = True, verbose: bool = False,
                 cache_type_v: str | None = None, mesh: object | None = None,
                 draft: object | None = None, flash_attn: bool | None = None,
                 prompt_matmul: str | None = None, numerics: Numerics | None = None,
                 lora: list | None = None, mmproj: str | os.PathLike[str] | None = None,
                 kv_overrides: dict | None = None, rope: object | None = None,
                 control_vectors: list | None = None,
                 control_vector_layer_range: tuple[int, int] = (-1, -1),
                 aot_cache: bool | None = None, n_gpu_layers: int | str | None = None,
                 kv_paged: bool | None = None, kv_pages: int | None = None):
        """``model``: a GGUF path, a registry name, or a ``jllama convert --to-orbax`` checkpoint
        directory. ``mesh``: a MeshConfig / ``{"data": d, "model": m}`` to shard weights and
        cache over (jllama.parallel). ``draft``: a DraftConfig / dict turning on speculative
        decoding (jllama.engine.speculative). ``flash_attn``: llama.cpp's ``-fa`` (see
        RuntimeConfig.flash_attn); ``prompt_matmul``: "int8" (bit-identical to llama.cpp) or
        "f32" (XLA's f32 GEMM for prompts, not exact); ``cache_type``/``cache_type_v``: the KV
        cache types (f16 by default, as llama.cpp). These set fields of ``numerics`` (default
        ``Numerics.from_env()``, see jllama/numerics.py), which this model and its programs
        carry; nothing here changes another loaded model. ``lora``: LoRA adapter GGUFs applied
        unmerged, in order: each a path (scale 1), a ``(path, scale)`` pair, a
        ``{"path", "scale"}`` mapping or a LoraConfig; ``set_lora_scales`` changes the scales
        later without recompiling. ``mmproj``: the model's vision projector GGUF (llama.cpp's
        ``--mmproj``); prompts then take ``images`` (see ``stream``). ``kv_overrides``: GGUF
        metadata key -> bool/int/float/str, applied before anything reads the file (llama.cpp's
        ``--override-kv``, llama-cpp-python's ``kv_overrides``). ``rope``: a RopeOptions or a
        mapping of its fields (``scaling``, ``freq_base``, ``freq_scale``, ``yarn_orig_ctx``,
        ``yarn_ext_factor``, ...): llama.cpp's rope context parameters (``--rope-freq-base``
        ...) over the file's, 0 / -1 / None keeping the file's. ``control_vectors``: control
        vector GGUFs, each a path (strength 1) or a ``(path, strength)`` pair, added to the
        layers' outputs in ``control_vector_layer_range`` (inclusive; <= 0: the first / last
        layer), as llama.cpp's ``--control-vector[-scaled]`` / ``--control-vector-layer-range``.
        ``kv_paged``: the slots' KV cache as a page pool of ``kv_pages`` 16-token pages (None:
        off by default, opt-in until run on a device; see Engine). ``aot_cache`` (default on; env
        ``JLLAMA_AOT_CACHE=0`` turns it off; needs ``compile_cache``): keep the
        generation programs ready-compiled next to the compile cache, keyed by the model file
        and these options, so a warm start skips tracing too (jllama/engine/aot.py; for a
        model loaded plainly: no quant, LoRA, overrides, rope options, control vectors or
        mesh). ``n_gpu_layers``: llama.cpp's ``-ngl`` (llama-cpp-python's ``n_gpu_layers``): of
        the n_layer + 1 layers (the output layer last) the last N keep their weights on the
        accelerator, the others stream from host memory each step; -1 or "auto" (the default,
        None) as many as fit the device, "all" or <= -2 every layer; a split that does not fit
        raises ``OffloadError`` naming the largest that does. Ignored on a CPU backend
        (jllama/models/offload.py)."""
        from jllama.engine.engine import Engine
        from jllama.tokenizer import Tokenizer

        base = numerics if numerics is not None else Numerics.from_env()
        given = dict(flash_attn=flash_attn, prompt_matmul=prompt_matmul, cache_type_k=cache_type,
                     cache_type_v=cache_type_v or cache_type)
        self.numerics = base.replace(**{k: v for k, v in given.items() if v is not None})
        if compile_cache:
            enable_compile_cache()
        t0 = time.perf_counter()
        cvec = (_scaled_paths(control_vectors or [], "control vector"), tuple(control_vector_layer_range))
        self._source = (model, quant, lora, mesh, kv_overrides, _rope_options(rope), cvec)
        self._offload_args = (n_gpu_layers, n_slots, ctx_size)
        self.offload = None  # models.offload.Split when some layers are in host memory
        self._load_model(*self._source)
        self.tokenizer = Tokenizer.from_gguf(self.gguf)
        plan = None
        if mesh is not None:
            from jllama.parallel import plan_engine

            plan = plan_engine(self.spec, n_slots, _mesh_config(mesh))
        if aot_cache is None:  # on unless JLLAMA_AOT_CACHE=0 (the test suite's setting)
            aot_cache = os.environ.get("JLLAMA_AOT_CACHE", "1") != "0"
        plain = not (quant or lora or mesh is not None or kv_overrides or cvec[0]
                     or (self._source[5] is not None and not self._source[5].is_default())
                     or self.path.is_dir() or self.offload is not None)
        aot = None
        if aot_cache and compile_cache and plain:
            from jllama.engine import aot as aot_mod

            aot = aot_mod.AotCache(
                compile_cache_dir() / "aot",
                repr(("llama", aot_mod.file_digest(self.path, self.gguf.data_offset),
                      self.numerics)))
        self.engine = Engine(self.spec, self.model, ctx_size=ctx_size, n_slots=n_slots,
                             plan=plan, aot=aot, paged=kv_paged, kv_pages=kv_pages)
        self.vision = None
        if mmproj is not None:
            from jllama.engine import multimodal
            from jllama.errors import ImageError
            from jllama.models.clip import load_vision

            if not Path(mmproj).is_file():
                raise ImageError(f"{mmproj}: mmproj file not found")
            self.vision = load_vision(mmproj, self.numerics)
            multimodal.check_pair(self.vision, self.spec.n_embd, self.spec.arch)
        self.speculative = None
        if draft is not None:
            from jllama.engine.draft import parse_draft
            from jllama.engine.speculative import Speculative

            cfg = parse_draft(draft)
            draft_llm = None
            if cfg.kind == "model":
                draft_llm = Llama(cfg.model, ctx_size=ctx_size, n_slots=1, numerics=self.numerics,
                                  compile_cache=False)
            self.speculative = Speculative(self, cfg, draft_llm)
        self.load_s = time.perf_counter() - t0
        if verbose:
            print(f"loaded {self.path} in {self.load_s:.2f} s")

    def _load_model(self, model, quant, lora, mesh, kv_overrides, rope, cvec) -> None:
        """The weights (and LoRA adapters) from ``model``: at load, and again when
        ``restore_memory`` undoes ``release_memory``."""
        from jllama import checkpoint
        from jllama.gguf.overrides import apply_kv_overrides
        from jllama.gguf.reader import read_gguf
        from jllama.models import build_model, load_weights
        from jllama.registry import resolve_model

        self.quant = quant
        self.lora = None  # models.lora.LoraSet when adapters are attached
        if Path(model).is_dir():  # an Orbax checkpoint (``jllama convert``)
            if quant:
                raise checkpoint.CheckpointError(
                    f"{model}: a checkpoint is already quantized; pass quant to "
                    "`jllama convert --quant` instead")
            if lora:
                raise ConfigError(f"{model}: LoRA adapters apply to a GGUF model, not to a "
                                  "checkpoint directory")
            if kv_overrides or (rope is not None and not rope.is_default()) or cvec[0]:
                raise ConfigError(f"{model}: metadata overrides, rope options and control "
                                  "vectors apply to a GGUF model, not to a checkpoint directory")
            split = self._plan_offload(None, mesh)
            if split is not None:
                raise ConfigError(f"{model}: partial offload (n_gpu_layers) loads a GGUF model, "
                                  "not a checkpoint directory")
            ck = checkpoint.restore(model, mesh, numerics=self.numerics)
            self.path, self.gguf, self.spec, self.model = Path(model), ck.gguf, ck.spec, ck.model
            self.quant = ck.meta.get("quant")
        else:
            self.path = resolve_model(model)
            self.gguf = apply_kv_overrides(read_gguf(self.path), kv_overrides)
            transform = None
            if quant:
                from jllama.quant.quantize import quantize_on_load

                transform = quantize_on_load(self.gguf, quant)
            split = self._plan_offload(self.gguf, mesh)
            on_host = None
            if split is not None:
                from jllama.models.offload import host_tensor

                on_host = host_tensor(split)
            weights = load_weights(self.gguf, transform, numerics=self.numerics,
                                   on_host=on_host)
            self.spec, self.model = build_model(self.gguf, weights, numerics=self.numerics,
                                                rope=rope)
            if lora:
                from jllama.models import lora as lora_mod

                self.lora = lora_mod.attach(
                    self.model, weights, self.gguf,
                    [(lora_mod.read_lora(p), s) for p, s in _scaled_paths(lora, "lora")],
                    numerics=self.numerics)
            if cvec[0]:
                from jllama.models import cvec as cvec_mod

                cvec_mod.attach(self.model, self.spec.n_embd,
                                cvec_mod.load_control_vectors(cvec[0]), *cvec[1])
            if split is not None:
                from jllama.models.offload import apply_split

                apply_split(self.model, split)
            self.offload = split
            # the weights are in device buffers now: the file's pages need not stay resident
            self.gguf.release_pages()

    def _plan_offload(self, g, mesh):
        """The -ngl split for GGUF ``g`` (None: every layer on the device, or a CPU backend,
        where the flag is ignored). ``g`` None: only whether a split was asked for."""
        from jllama.models import offload

        n_gpu_layers, n_slots, ctx_size = self._offload_args
        ngl = offload.parse_n_gpu_layers(n_gpu_layers)
        if not offload.offload_enabled():
            return None
        if g is None:
            return None if ngl in (offload.AUTO, offload.ALL) else offload.Split(0, 0)
        from jllama.models import arch_module
        from jllama.models.spec import spec_from_gguf

        mod = arch_module(g.architecture or "?")
        spec = mod.spec_from_gguf(g) if hasattr(mod, "spec_from_gguf") else spec_from_gguf(g)
        fp = offload.footprint(g, n_slots, ctx_size, self.numerics.cache_type_k,
                               self.numerics.cache_type_v, spec)
        split = offload.choose(ngl, fp, offload.device_memory_limit())
        if split.full:
            return None
        if mesh is not None:
            raise ConfigError("partial offload (n_gpu_layers below the layer count) and a "
                              "device mesh do not go together: one or the other")
        return split

    def release_memory(self, weights: bool = True) -> None:
        """Let go of the KV cache and (``weights``) the weights: llama-server's sleeping
        state (``--sleep-idle-seconds``). ``restore_memory`` loads them back from the same
        file; the compiled programs are kept, so nothing compiles again."""
        self._released_lora = list(self.lora.scales) if self.lora is not None else None
        self.engine.release(weights=weights)
        if weights:
            self.model = None
            self.lora = None
        import gc

        gc.collect()

    def restore_memory(self) -> None:
        if self.model is not None:  # only the cache went
            self.engine.restore()
            return
        self._load_model(*self._source)
        if self.lora is not None and self._released_lora is not None:
            from jllama.models import lora as lora_mod

            lora_mod.set_scales(self.lora, self._released_lora)
        self.engine.restore(self.model)

    def set_lora_scales(self, scales: list[float]) -> None:
        """New user scales for the attached LoRA adapters (one per adapter, in order; 0 turns
        one off): new state for the same compiled programs. Cached prompts are dropped."""
        if self.lora is None:
            raise ConfigError("this model was loaded without LoRA adapters")
        from jllama.models import lora as lora_mod

        lora_mod.set_scales(self.lora, scales)
        self.engine.update_params(self.model)

    # -------------------------------------------------------------- text <-> ids
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def logits(self, tokens: list[int] | str) -> np.ndarray:
        """Logits [T, V] for every position of ``tokens`` (a string is tokenized with BOS)."""
        ids = self.tokenize(tokens) if isinstance(tokens, str) else list(tokens)
        return self.engine.logits(ids)

    # -------------------------------------------------------------- images
    @staticmethod
    def with_media_markers(prompt: str, n_images: int) -> str:
        """The prompt with one media marker per image in front when it has none (as
        llama-mtmd-cli does)."""
        from jllama.engine.multimodal import MEDIA_MARKER

        if n_images and MEDIA_MARKER not in prompt:
            return MEDIA_MARKER * n_images + prompt
        return prompt

    def _image_chunks(self, prompt: str | list[int], images: list, parse_special: bool) -> list:
        from jllama.engine import multimodal
        from jllama.errors import ImageError
        from jllama.models.clip_image import decode_image, load_image

        if self.vision is None:
            raise ImageError("images need a vision projector: load the model with mmproj= "
                             "(--mmproj)")
        if not isinstance(prompt, str):
            raise ImageError("a prompt with images must be text (its <__media__> markers "
                             "place them), not token ids")
        arrays = []
        for im in images:
            if isinstance(im, np.ndarray):
                if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                    raise ImageError(f"an image array must be uint8 [height, width, 3], got "
                                     f"{im.dtype} {im.shape}")
                arrays.append(im)
            elif isinstance(im, bytes | bytearray):
                arrays.append(decode_image(bytes(im)))
            else:
                arrays.append(load_image(im))
        prompt = self.with_media_markers(prompt, len(arrays))
        t0 = time.perf_counter()
        chs = multimodal.chunks(self.tokenizer, self.vision, prompt, arrays,
                                parse_special=parse_special)
        self.image_encode_s = time.perf_counter() - t0
        return chs

    # -------------------------------------------------------------- generation
    def stream(self, prompt: str | list[int], max_tokens: int = 128,
               params: SamplingParams | None = None, stop: list[str] | None = None,
               parse_special: bool = True, on_text: Callable[[str], None] | None = None,
               images: list | None = None) -> Iterator[str]:
        """Yield text pieces as they complete (UTF-8 safe, stop strings held back).

        ``images`` (with ``mmproj``): paths, encoded bytes or uint8 [H, W, 3] arrays, placed at
        the prompt's ``<__media__>`` markers (one per image in front when it has none)."""
        from jllama.tokenizer import StreamDecoder

        params = params or SamplingParams()
        chs = None
        if images:
            from jllama.engine import multimodal

            chs = self._image_chunks(prompt, list(images), parse_special)
            n_prompt = multimodal.n_tokens(chs)
        else:
            ids = prompt if isinstance(prompt, list) else self.tokenize(
                prompt, parse_special=parse_special)
            n_prompt = len(ids)
        if n_prompt >= self.engine.ctx_size:
            raise ContextError(
                f"prompt is {n_prompt} tokens"
                + (" with its images" if chs is not None else "")
                + f", context size is {self.engine.ctx_size}"
            )
        stop = [s for s in (stop or []) if s]
        eog = {i for i in range(self.tokenizer.n_vocab) if self.tokenizer.is_eog(i)} if not hasattr(
            self, "_eog") else self._eog
        self._eog = eog
        dec = StreamDecoder(self.tokenizer)
        self._last_tokens: list[int] = []
        self.finish_reason = "length"
        pending = ""
        hold = max((len(s) for s in stop), default=0)
        if chs is not None:
            from jllama.engine import multimodal

            toks = multimodal.generate(self.engine, chs, params, max_tokens, eog,
                                       dry_breakers=self._dry_breakers(params))
        elif self.speculative is not None and not params.uses_extended():
            toks = self.speculative.generate(ids, params, max_tokens, eog)
        else:
            # speculative acceptance mirrors only top-k/top-p/min-p/temperature: requests using
            # llama.cpp's further samplers decode step by step instead
            toks = self.engine.generate(ids, params, max_tokens, eog,
                                        dry_breakers=self._dry_breakers(params))
        for tok in toks:
            self._last_tokens.append(tok)
            pending += dec.feed(tok)
            if stop:
                hit = min((pending.find(s) for s in stop if s in pending), default=-1)
                if hit >= 0:
                    if pending[:hit]:
                        yield pending[:hit]
                    self.finish_reason = "stop"
                    return
                if len(pending) > hold:
                    out, pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
                    yield out
            elif pending:
                yield pending
                pending = ""
        pending += dec.flush()
        if pending:
            yield pending
        t = self.engine.timings
        if t.gen_tokens < max_tokens and not t.extra.get("context_full"):
            self.finish_reason = "stop"  # an end-of-generation token; a full context is "length"

    def _dry_breakers(self, params: SamplingParams) -> dict | None:
        """DRY's restart sequences for this vocabulary, when the request uses DRY."""
        if not params.uses_dry():
            return None
        from jllama.engine.dry import process_breakers

        return process_breakers(self.tokenizer, tuple(params.dry_sequence_breakers))

    def complete(self, prompt: str | list[int], max_tokens: int = 128,
                 params: SamplingParams | None = None, stop: list[str] | None = None,
                 images: list | None = None) -> Completion:
        text = "".join(self.stream(prompt, max_tokens, params, stop, images=images))
        t = self.engine.timings
        return Completion(text, list(self._last_tokens), self.finish_reason, t.prompt_tokens,
                          t.prompt_s, t.gen_s, t.first_token_s)

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.8,
                 images: list | None = None, **sampling) -> str:
        params = SamplingParams(temperature=temperature, **sampling)
        return self.complete(prompt, max_tokens, params, images=images).text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list | None = None) -> str:
        """The model's chat template; ChatML when the GGUF has none (as llama-server does)."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt, tools,
                                                  fallback_chatml=True)

    def chat(self, messages: list[dict], max_tokens: int = 256,
             params: SamplingParams | None = None, stop: list[str] | None = None) -> Completion:
        prompt = self.apply_chat_template(messages)
        ids = self.tokenizer.encode(prompt, add_special=True, parse_special=True)
        return self.complete(ids, max_tokens, params, stop)
