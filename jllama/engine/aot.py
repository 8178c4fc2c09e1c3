"""Compiled programs kept across processes by what goes into them, so a warm start skips
tracing and lowering as well as XLA's compile (issue #16 item 4).

JAX's persistent compilation cache is keyed by the lowered program: every process still traces
the model and lowers it to StableHLO before it can look the executable up (~0.7 s of a warm
SmolLM2 start, ~0.9 s at 8B). This cache is keyed by everything the trace depends on instead:
jllama's source files, the model file's header (hyperparameters, tensor names, types and
shapes), the numerics and engine shape the caller passes in (``base``), jax/jaxlib versions,
the device, the host CPU's flags, the JAX trace context and the JAX/XLA/JLLAMA environment, and
per call the static arguments, the argument tree and every argument's shape and dtype. An
entry is the serialized executable (``jax.experimental.serialize_executable``) with that key's
full text; it is used only when the text matches exactly, and any failure (unreadable entry,
version skew, an argument the executable rejects) falls back to the ordinary jit.

What it cannot see is code changed at run time (a monkeypatched kernel switch, a test double):
such a process would get the executable of the unpatched code. jllama as shipped changes none,
so the cache is on by default (a warm SmolLM2 start 0.6 s shorter, experiments/results/ttft.md);
the test suite, which monkeypatches, turns it off with ``JLLAMA_AOT_CACHE=0``
(tests/conftest.py), as anyone can (or ``Llama(aot_cache=False)``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import platform
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax._src import config as jax_config

from jllama.kernels import cpu_attention, cpu_ffi, cpu_ggml_f32

log = logging.getLogger(__name__)


def _register_kernels() -> None:
    """Register the C++ kernels' FFI targets, as tracing a model does: a loaded entry skips the
    trace, and XLA refuses to deserialize a program whose custom calls have no handler ("No FFI
    handler registered for jllama_flash_attn")."""
    if jax.default_backend() == "cpu":
        cpu_ffi.available()
        cpu_attention.available()
        cpu_ggml_f32.available()

FORMAT = 1  # bump when an entry's layout changes

# XLA:CPU cannot run an executable deserialized a second time in one process ("Function ...
# not found" when dispatched), so each executable is loaded once per process, found by its
# bytes: entries of other keys that compiled to the same program share it. The programs this
# cache holds are also named apart (``aot_`` prefix) from the ordinary jit's, so that jax's own
# persistent cache never loads one of them a second time.
_LOADED: dict[tuple, Any] = {}


@functools.cache
def source_digest() -> str:
    """Digest of jllama's own code (Python and the C++ kernels' sources)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.suffix in (".py", ".cc", ".h") and p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _simple(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str) or (
        isinstance(v, tuple) and all(_simple(x) for x in v))


@functools.cache
def environment_key() -> str:
    """The process's side of the key: versions, device, CPU, environment."""
    import jaxlib

    dev = jax.devices()[0]
    env = sorted((k, v) for k, v in os.environ.items()
                 if k.startswith(("JAX_", "XLA_", "JLLAMA_", "TF_CPP")) and k != "JLLAMA_XLA_CACHE")
    ctx = [repr(v) if _simple(v) or hasattr(v, "value") else type(v).__name__
           for v in jax_config.trace_context()]
    return repr((FORMAT, jax.__version__, jaxlib.__version__, dev.platform, dev.device_kind,
                 len(jax.devices()), _cpu_flags(), env, ctx, source_digest()))


def file_digest(path: str | os.PathLike[str], header_bytes: int) -> str:
    """Digest of a model file's header (metadata and tensor table): what a trace reads of it."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(header_bytes)).hexdigest()


def _aval(x: Any) -> tuple:
    """(shape, dtype, weak type) of a leaf. Every call of a wrapped function takes this of all
    its leaves (a model's state: hundreds), so jax arrays take the attribute fast path: with
    ``str(dtype)`` and an ABC ``isinstance`` it cost ~7 ms a call, as much as a SmolLM2 decode
    step (experiments/results/ttft.md)."""
    try:
        return (x.shape, x.dtype, x.weak_type)  # jax.Array
    except AttributeError:
        pass
    if isinstance(x, bool | int | float):
        return ((), type(x).__name__, True)  # Python scalars trace weakly typed
    a = np.asarray(x)
    return (tuple(a.shape), a.dtype, False)


def _aval_text(sig: tuple) -> str:
    """The avals as the key's text (dtype names, not objects)."""
    return repr(tuple((tuple(s), str(d), bool(w)) for s, d, w in sig))


class AotCache:
    """Entries under ``directory`` for one loaded model and engine (``base``: the caller's side
    of the key, e.g. the model file's digest and numerics)."""

    def __init__(self, directory: str | os.PathLike[str], base: str):
        self.dir = Path(directory)
        self.base = base

    def extend(self, more: str) -> AotCache:
        """The same directory, with more of the key (the engine's side)."""
        return AotCache(self.dir, f"{self.base}\n{more}")

    def wrap(self, name: str, jitted, static: tuple[str, ...] = ()) -> AotFunction:
        return AotFunction(self, name, jitted, static)

    def _path(self, key: str) -> Path:
        return self.dir / f"aot-{hashlib.sha256(key.encode()).hexdigest()}.bin"

    def load(self, key: str):
        p = self._path(key)
        if not p.is_file():
            return None
        from jax.experimental import serialize_executable

        with open(p, "rb") as f:
            fmt, text, payload, in_tree, out_tree = pickle.load(f)
        if fmt != FORMAT or text != key:  # a hash collision or another layout: not ours
            return None
        ident = (hashlib.sha256(payload).hexdigest(), in_tree, out_tree)
        if ident not in _LOADED:
            _register_kernels()
            _LOADED[ident] = serialize_executable.deserialize_and_load(payload, in_tree,
                                                                       out_tree)
        return _LOADED[ident]

    def store(self, key: str, compiled) -> None:
        from jax.experimental import serialize_executable

        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
        _LOADED.setdefault((hashlib.sha256(payload).hexdigest(), in_tree, out_tree), compiled)
        blob = pickle.dumps((FORMAT, key, payload, in_tree, out_tree))
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".aot-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self._path(key))  # readers see a whole entry or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class AotFunction:
    """A jitted function whose executables come from (and go to) an ``AotCache``; called as
    the jitted function is (static arguments by name, in ``static``)."""

    def __init__(self, cache: AotCache, name: str, jitted, static: tuple[str, ...]):
        self.cache, self.name, self.jitted, self.static = cache, name, jitted, static
        self._mem: dict[tuple, Any] = {}  # signature -> Compiled, or None: use the jit
        # positional argument index -> (the object, its signature part) for large pytrees:
        # flattening a model's state (nnx, ~270 leaves) took ~1 ms a call, and the engine
        # passes the same state object every step
        self._last: dict[int, tuple[Any, tuple]] = {}

    def _cache_size(self) -> int:
        return len(self._mem) + self.jitted._cache_size()

    def _sig(self, st: tuple, args: tuple, dyn: dict) -> tuple:
        parts = []
        for i, a in enumerate(args):
            last = self._last.get(i)
            if last is not None and last[0] is a:
                parts.append(last[1])
                continue
            leaves, tree = jax.tree.flatten(a)
            part = (tree, tuple(_aval(x) for x in leaves))
            if len(leaves) > 16:
                self._last[i] = (a, part)
            parts.append(part)
        leaves, tree = jax.tree.flatten(dyn)
        return (st, tuple(parts), tree, tuple(_aval(x) for x in leaves))

    def __call__(self, *args, **kwargs):
        st = tuple(sorted((k, kwargs[k]) for k in self.static if k in kwargs))
        dyn = {k: v for k, v in kwargs.items() if k not in self.static}
        sig = self._sig(st, args, dyn)
        if sig in self._mem:
            c = self._mem[sig]
            if c is None:
                return self.jitted(*args, **kwargs)
            try:
                return c(*args, **dyn)
            except TypeError:  # a remembered argument changed in place: look it all up again
                self._last.clear()
                if self._sig(st, args, dyn) == sig:
                    raise  # nothing was stale: the arguments are wrong
                return self(*args, **kwargs)
        leaves, tree = jax.tree.flatten((args, dyn))
        key = "\n".join((self.cache.base, environment_key(), self.name, repr(st), str(tree),
                         _aval_text(tuple(_aval(x) for x in leaves))))
        compiled = None
        try:
            compiled = self.cache.load(key)
        except Exception as e:  # a damaged or foreign entry: compile as usual
            log.debug("aot cache: %s unreadable (%s)", self.name, e)
        if compiled is not None:
            try:
                out = compiled(*args, **dyn)  # checks the arguments before running
            except (TypeError, ValueError) as e:
                log.debug("aot cache: %s rejected its arguments (%s)", self.name, e)
                self._mem[sig] = None
                return self.jitted(*args, **kwargs)
            self._mem[sig] = compiled
            return out
        try:
            # compiled afresh, never taken from jax's persistent cache: an executable that XLA:CPU
            # deserialized from there serializes into an entry whose functions are missing when
            # a later process runs it ("Function ... not found": seen after an upgrade, when this
            # cache missed and jax's hit)
            with jax_config.enable_compilation_cache(False):
                compiled = self.jitted.lower(*args, **kwargs).compile()
        except Exception as e:
            log.debug("aot cache: %s cannot be compiled ahead (%s)", self.name, e)
            self._mem[sig] = None
            return self.jitted(*args, **kwargs)
        try:
            self.cache.store(key, compiled)
        except Exception as e:  # not serializable, disk full: still run it
            log.debug("aot cache: %s not stored (%s)", self.name, e)
        self._mem[sig] = compiled
        return compiled(*args, **dyn)
