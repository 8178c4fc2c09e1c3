"""Partial offload, llama.cpp's ``-ngl N`` / ``--gpu-layers`` / ``--n-gpu-layers``.

llama.cpp 0c1e570 (src/llama-model.cpp, common/arg.cpp) counts n_layer + 1 offloadable layers,
the output layer (output norm and projection) being the last, and puts the *last* N on the GPU:
``i_gpu_start = max(n_layer + 1 - N, 0)``. So ``-ngl 1`` offloads only the output layer,
``-ngl n_layer + 1`` (or more, or ``all``) everything, ``-ngl 0`` nothing; the token embedding
(the input layer) always stays in host memory. ``auto`` (its default, -1) fits the count to the
device's free memory (``common_fit_params``). A CPU build accepts the flag and ignores it.

jllama does the same split with JAX memory kinds: the first ``n_host`` decoder layers' weights
(and the output layer's when N is 0) live in host memory (``pinned_host``) and are copied into
device memory inside the compiled step, one layer at a time, as the loop reaches them
(``stream_layers``); the rest are device arrays as without the flag. The host layers are stacked
per ``layer_plan`` group at load (one array per weight over the group's layers), so they run as
one ``lax.scan`` per group, not one copy of the block per layer: compile time does not grow with
depth. What differs from llama.cpp: the token embedding stays on the device (it is a gather of a
few rows there; counted in the fit check), the KV cache of every layer is on the device (as
llama.cpp's default ``--kv-offload``), and the host layers run on the accelerator with their
weights streamed, not on the CPU backend.

On a JAX CPU backend the flag is ignored, as by llama.cpp's CPU build, unless
``JLLAMA_OFFLOAD_ON_CPU=1``: then the split is made on the CPU device, host layers in its host
memory kind, which runs the streaming code path for real (the tests do; the bits are the same).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jllama.errors import ConfigError, JllamaError

AUTO = -1  # llama.cpp's default: fit to the device's memory
ALL = -2  # llama.cpp's ``all``; any value <= -2 means it

HOST_KIND = "pinned_host"

# llama.cpp's fit keeps 1 GiB of each device free (common_params.fit_params_target)
MARGIN_BYTES = 1 << 30

_LAYER = re.compile(r"blk\.(\d+)\.")
OUTPUT_TENSORS = ("output.weight", "output.bias", "output_norm.weight", "output_norm.bias")


class OffloadError(JllamaError):
    """The chosen split does not fit the device (or cannot be made for this model)."""


def parse_n_gpu_layers(value: object) -> int:
    """llama.cpp's ``-ngl`` value: an integer, ``auto`` (-1) or ``all`` (-2); None is auto."""
    if value is None:
        return AUTO
    if isinstance(value, bool):
        raise ConfigError(f"n_gpu_layers {value!r}: expected a number of layers, 'auto' or 'all'")
    if isinstance(value, int):
        return ALL if value <= ALL else value
    s = str(value).strip().lower()
    if s == "auto":
        return AUTO
    if s == "all":
        return ALL
    try:
        n = int(s)
    except ValueError:
        raise ConfigError(f"n_gpu_layers {value!r}: expected a number of layers, 'auto' or "
                          "'all'") from None
    return ALL if n <= ALL else n


def offload_enabled() -> bool:
    """Whether -ngl takes effect: on an accelerator backend, or on the CPU when asked to."""
    return jax.default_backend() != "cpu" or os.environ.get("JLLAMA_OFFLOAD_ON_CPU", "") == "1"


@dataclass(frozen=True)
class Split:
    """``n_gpu`` of llama.cpp's n_layer + 1 layers on the device: decoder layers
    [n_host, n_layer) and, when ``n_gpu`` >= 1, the output layer."""

    n_layer: int
    n_gpu: int  # 0 .. n_layer + 1

    @property
    def n_host(self) -> int:
        return min(self.n_layer, self.n_layer + 1 - self.n_gpu)

    @property
    def output_on_host(self) -> bool:
        return self.n_gpu == 0

    @property
    def full(self) -> bool:
        return self.n_gpu == self.n_layer + 1

    def describe(self) -> str:
        return (f"offloaded {self.n_gpu}/{self.n_layer + 1} layers to the device "
                f"({self.n_layer - self.n_host} repeating layers"
                f"{'' if self.output_on_host else ' and the output layer'}; "
                f"{self.n_host} layers streamed from host memory)")


def device_memory_limit(device=None) -> int | None:
    """The bytes the allocator may still use on ``device``: its limit less what is in use
    (another model loaded in this process); None where the backend does not say, as on the
    CPU."""
    d = device if device is not None else jax.devices()[0]
    try:
        stats = d.memory_stats()
    except Exception:  # backends without memory statistics
        return None
    if not stats:
        return None
    v = stats.get("bytes_limit")
    return int(v) - int(stats.get("bytes_in_use", 0)) if v else None


@dataclass(frozen=True)
class Footprint:
    """What the device must hold, from the GGUF header: bytes per decoder layer, of the
    output layer, of the token embedding (always on the device), of the KV cache."""

    layer: tuple[int, ...]
    output: int
    embd: int
    kv: int

    def device_bytes(self, n_gpu: int) -> int:
        s = Split(len(self.layer), n_gpu)
        b = self.embd + self.kv + sum(self.layer[s.n_host:])
        if not s.output_on_host:
            b += self.output
        if s.n_host:
            # the streamed layer in device memory (XLA may also bring the next one early:
            # the margin is for that and the activations)
            b += max(self.layer[:s.n_host])
        if s.output_on_host:
            b += self.output
        return b


def footprint(g, n_slots: int, ctx_size: int, cache_type_k: str, cache_type_v: str,
              spec) -> Footprint:
    """Bytes per part of a GGUF model (``g``: a GGUFFile; ``spec``: its ModelSpec), and of the
    KV cache the Engine will allocate (an estimate for caches of other layouts, e.g. MLA)."""
    from jllama.models.kvquant import bytes_per_token

    layer = [0] * spec.n_layer
    output = embd = 0
    for name, ti in g.tensors.items():
        n = int(ti.data.nbytes)
        m = _LAYER.match(name)
        if m and int(m.group(1)) < spec.n_layer:
            layer[int(m.group(1))] += n
        elif name in OUTPUT_TENSORS:
            output += n
        else:
            embd += n
    per_tok = (bytes_per_token(cache_type_k, spec.head_dim, spec.n_head_kv)
               + bytes_per_token(cache_type_v, spec.head_dim_v, spec.n_head_kv))
    kv = int(spec.n_layer * n_slots * ctx_size * per_tok)
    return Footprint(tuple(layer), output, embd, kv)


def _mib(b: int) -> str:
    return f"{b / (1 << 20):.0f} MiB"


def choose(n_gpu_layers: int, fp: Footprint, limit: int | None) -> Split:
    """The split for a requested -ngl against ``limit`` device bytes (None: unknown, nothing
    checked). ``auto``: the most layers that fit; an explicit count that does not fit raises
    OffloadError naming the largest that does."""
    n_layer = len(fp.layer)
    top = n_layer + 1
    want = top if n_gpu_layers in (ALL,) or n_gpu_layers > top else n_gpu_layers
    if limit is None:
        return Split(n_layer, top if want == AUTO else want)
    room = limit - MARGIN_BYTES
    fits = [n for n in range(top + 1) if fp.device_bytes(n) <= room]
    best = max(fits) if fits else None
    if want == AUTO:
        if best is None:
            raise OffloadError(_no_fit_msg(fp, limit))
        return Split(n_layer, best)
    need = fp.device_bytes(want)
    if need > room:
        raise OffloadError(
            f"-ngl {want} needs {_mib(need)} of device memory (weights "
            f"{_mib(need - fp.kv)}, KV cache {_mib(fp.kv)}) plus a {_mib(MARGIN_BYTES)} margin, "
            f"but the device has {_mib(limit)} free: "
            + (f"at most -ngl {best} fits" if best is not None else _no_fit_msg(fp, limit)))
    return Split(n_layer, want)


def _no_fit_msg(fp: Footprint, limit: int) -> str:
    return (f"not even -ngl 0 fits: the token embedding ({_mib(fp.embd)}), the KV cache "
            f"({_mib(fp.kv)}) and one streamed layer need {_mib(fp.device_bytes(0))} plus a "
            f"{_mib(MARGIN_BYTES)} margin, the device has {_mib(limit)} free (lower "
            "--ctx-size)")


def host_tensor(split: Split):
    """``load_weights``'s predicate: which tensors stay in host memory (not on the device)."""

    def on_host(name: str) -> bool:
        m = _LAYER.match(name)
        if m:
            return int(m.group(1)) < split.n_host
        return split.output_on_host and name in OUTPUT_TENSORS

    return on_host


# ---------------------------------------------------------------------------- the model side


def _memory_kinds(device) -> set[str]:
    try:
        return {m.kind for m in device.addressable_memories()}
    except Exception:
        return set()


def host_sharding(device=None):
    """Where host layers live: the device's pinned host memory (its default memory where the
    backend has no host memory kind)."""
    d = device if device is not None else jax.devices()[0]
    kinds = _memory_kinds(d)
    kind = HOST_KIND if HOST_KIND in kinds else ("unpinned_host" if "unpinned_host" in kinds
                                                 else None)
    return jax.sharding.SingleDeviceSharding(d, memory_kind=kind)


def to_device(x: jax.Array) -> jax.Array:
    """Inside a compiled step: ``x`` (a host-memory weight) copied to device memory."""
    return jax.device_put(x, jax.memory.Space.Device)


def _leaf_sig(blk) -> tuple:
    """What alike host layers share (every weight is stacked, so: structure, shapes, dtypes;
    the treedef holds each quantized weight's ggml type and layout)."""
    gd, st = nnx.split(blk)
    leaves, tdef = jax.tree.flatten(st)
    return gd, tdef, tuple((tuple(np.shape(v)), str(v.dtype)) for v in leaves)


class HostGroup(nnx.Module):
    """Layers [start, start + p*k) of the host part: a pattern of p blocks repeated k times,
    each pattern position a block whose every weight is stacked over the k repeats (in host
    memory)."""

    def __init__(self, start: int, period: int, repeats: int, blocks: list):
        self.start, self.period, self.repeats = start, period, repeats
        self.blocks = nnx.List(blocks)


class HostLayers(nnx.Module):
    """The decoder layers [0, n) kept in host memory (see the module docstring)."""

    def __init__(self, n: int, groups: list[HostGroup], output_on_host: bool):
        self.n = n
        self.groups = nnx.List(groups)
        self.output_on_host = output_on_host

    def __call__(self, x, pos, pos0, kf, vf, kv_len: int, kv_types, extra: dict | None = None,
                 stacked: bool = True):
        """Run the host layers (``stream_layers``); common.decoder_forward calls this first."""
        return stream_layers(self, x, pos, pos0, kf, vf, kv_len, kv_types, extra, stacked)

    def fetch_output(self, output):
        """The output layer in device memory (copied there each step when -ngl is 0)."""
        return fetch(output) if self.output_on_host else output

    def template(self, layer: int):
        """A block of layer ``layer``'s kind (its static attributes; its weights stacked)."""
        for g in self.groups:
            if g.start <= layer < g.start + g.period * g.repeats:
                return g.blocks[(layer - g.start) % g.period]
        raise IndexError(layer)


def _stack_blocks(layers: list, sharding):
    """One block whose weights are the layers' stacked along a new axis, in host memory."""
    gd, _ = nnx.split(layers[0])
    cols = None
    tdef = None
    for blk in layers:
        _, st = nnx.split(blk)
        leaves, tdef = jax.tree.flatten(st)
        cols = [[v] for v in leaves] if cols is None else [c + [v] for c, v in zip(cols, leaves)]
    stacked = [jax.device_put(np.stack([np.asarray(v) for v in c]), sharding) for c in cols]
    return nnx.merge(gd, jax.tree.unflatten(tdef, stacked))


def apply_split(model, split: Split, device=None) -> None:
    """Move the first ``split.n_host`` blocks of ``model`` (and its output layer when
    ``split.output_on_host``) into host memory, stacked per group; ``model.blocks`` keeps the
    device part. Blocks with LoRA adapters cannot be stacked."""
    from jllama.models.common import layer_plan

    if split.n_host == 0 and not split.output_on_host:
        return
    blocks = list(model.blocks)
    if len(blocks) != split.n_layer:
        raise OffloadError(f"the model has {len(blocks)} blocks, the split counts "
                           f"{split.n_layer}")
    for b in blocks[:split.n_host]:
        if any(getattr(m, "lora", None) is not None for _, m in nnx.iter_graph(b)
               if isinstance(m, nnx.Module)):
            raise OffloadError("LoRA adapters and partial offload (-ngl below the layer "
                               "count) do not go together yet: offload all layers")
    sh = host_sharding(device)
    host = blocks[:split.n_host]
    groups = []
    for a, p, k in layer_plan(host, signature=_leaf_sig):
        pattern = [_stack_blocks([host[a + r * p + j] for r in range(k)], sh) for j in range(p)]
        groups.append(HostGroup(a, p, k, pattern))
    model.host_layers = HostLayers(split.n_host, groups, split.output_on_host)
    model.blocks = nnx.List(blocks[split.n_host:])
    if split.output_on_host and model.output is not None:
        gd, st = nnx.split(model.output)
        model.output = nnx.merge(gd, jax.tree.map(lambda v: jax.device_put(np.asarray(v), sh),
                                                  st))


def fetch(module):
    """``module`` with every weight copied to device memory (inside a compiled step)."""
    gd, st = nnx.split(module)
    return nnx.merge(gd, jax.tree.map(to_device, st))


def _layer_block(blk, r):
    """Entry ``r`` (traced or static) of a stacked block, in device memory."""
    gd, st = nnx.split(blk)
    return nnx.merge(gd, jax.tree.map(
        lambda v: to_device(jax.lax.dynamic_index_in_dim(v, r, 0, keepdims=False)), st))


def stream_layers(host: HostLayers, x, pos, pos0, kf, vf, kv_len: int, kv_types,
                  extra: dict | None = None, stacked: bool = True):
    """The host layers over the cache: per group one ``lax.scan`` over its repeats, each
    layer's weights copied to device memory in the loop body. ``stacked``: kf/vf are the
    stacked cache halves [B, L, ...] (else lists of per-layer arrays, run unrolled)."""
    from jllama.models.cache import LayerCache

    extra = extra or {}
    if not stacked:
        ks, vs = kf, vf
        for g in host.groups:
            for r in range(g.repeats):
                for j, blk in enumerate(g.blocks):
                    il = g.start + r * g.period + j
                    with jax.named_scope(f"host_blk{il}"):
                        x, ks[il], vs[il] = _layer_block(blk, r)(x, pos, pos0, ks[il], vs[il],
                                                                  kv_len, kv_types, **extra)
        return x, ks, vs
    for g in host.groups:
        # the stacked weights are the loop's xs: the loop body gets one layer's slice, still
        # in host memory, and copies it to the device
        split = [nnx.split(b) for b in g.blocks]

        def body(carry, xs, g=g, split=split):
            x, kf, vf = carry
            r, layer_states = xs
            for j, ((gd, _), st) in enumerate(zip(split, layer_states)):
                il = g.start + r * g.period + j
                blk = nnx.merge(gd, jax.tree.map(to_device, st))
                x, kc, vc = blk(x, pos, pos0, LayerCache(kf, il), LayerCache(vf, il), kv_len,
                                kv_types, **extra)
                kf, vf = kc.full, vc.full
            return (x, kf, vf), None

        with jax.named_scope(f"host_blk{g.start}-{g.start + g.period * g.repeats - 1}"):
            (x, kf, vf), _ = jax.lax.scan(
                body, (x, kf, vf),
                (jnp.arange(g.repeats, dtype=jnp.int32), [st for _, st in split]))
    return x, kf, vf
