"""Partial offload, llama.cpp's ``-ngl`` (jllama/models/offload.py).

On this CPU-only CI the flag is ignored, as by llama.cpp's CPU build; ``JLLAMA_OFFLOAD_ON_CPU=1``
makes the split on the CPU device (host layers in its host memory kind, copied to device memory
in the loop body), so the streaming code path runs for real: its logits must be the default's,
bit for bit, for every split. The fit check is tested against a fake device memory limit.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from tinymodels import write_tiny_llama

N_LAYER = 3
SHAPE = dict(n_layer=N_LAYER, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, head_dim=16)
PROMPT = [1, 5, 9, 33, 2, 71, 100, 7, 250, 3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("ngl") / "tiny.gguf", seed=4, **SHAPE)


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setenv("JLLAMA_OFFLOAD_ON_CPU", "1")


def _run(llm, steps: int = 3) -> list[np.ndarray]:
    """Logits after a 10-token prompt step, then after 3 one-token steps fed the argmax, then
    the prompt again (on the cache the steps gave back)."""
    out = [np.asarray(llm.engine.prefill(PROMPT))]
    for _ in range(steps):
        out.append(np.asarray(llm.engine.prefill([int(np.argmax(out[-1]))])))
    llm.engine.reset(0)
    out.append(np.asarray(llm.engine.prefill(PROMPT)))
    return out


@pytest.fixture(scope="module")
def baseline(tiny):
    from jllama.api import Llama

    llm = Llama(str(tiny), ctx_size=64, compile_cache=False)
    return _run(llm), llm.engine._forward_slot._cache_size()


def test_parse_values_as_llamacpp():
    from jllama.errors import ConfigError
    from jllama.models.offload import ALL, AUTO, parse_n_gpu_layers

    assert parse_n_gpu_layers(None) == AUTO
    assert parse_n_gpu_layers("auto") == AUTO and parse_n_gpu_layers(-1) == AUTO
    assert parse_n_gpu_layers("all") == ALL and parse_n_gpu_layers(-7) == ALL
    assert parse_n_gpu_layers("12") == 12 and parse_n_gpu_layers(0) == 0
    for bad in ("many", True, "1.5"):
        with pytest.raises(ConfigError):
            parse_n_gpu_layers(bad)


def test_split_counts_the_output_layer_last():
    """llama.cpp: of n_layer + 1 layers the last N are offloaded (i_gpu_start = n_layer + 1 -
    N); -ngl 1 is the output layer alone."""
    from jllama.models.offload import Split

    got = [(Split(4, n).n_host, Split(4, n).output_on_host) for n in range(6)]
    assert got == [(4, True), (4, False), (3, False), (2, False), (1, False), (0, False)]


def test_ignored_on_cpu_backend(tiny, monkeypatch):
    from jllama.api import Llama

    monkeypatch.delenv("JLLAMA_OFFLOAD_ON_CPU", raising=False)
    llm = Llama(str(tiny), ctx_size=64, compile_cache=False, n_gpu_layers=1)
    assert llm.offload is None and not hasattr(llm.model, "host_layers")


@pytest.mark.parametrize("ngl", [0, 1, N_LAYER - 1, N_LAYER])
def test_streamed_layers_give_the_same_bits(tiny, on_cpu, baseline, ngl):
    """Every split (all layers and the output layer streamed, all layers, some, one) gives the
    default's logits, bit for bit, for a prompt step and one-token steps; and it compiles no
    more programs (host weights are committed arrays, which once made a fed-back cache select
    a second program)."""
    from jllama.api import Llama

    llm = Llama(str(tiny), ctx_size=64, compile_cache=False, n_gpu_layers=ngl)
    n_host = min(N_LAYER, N_LAYER + 1 - ngl)
    assert llm.offload.n_host == n_host
    assert llm.model.host_layers.output_on_host == (ngl == 0)
    assert len(llm.model.blocks) == N_LAYER - n_host
    leaf = llm.model.host_layers.groups[0].blocks[0].attn_norm.weight.get_value()
    assert leaf.shape[0] == n_host  # stacked over the host layers
    got = _run(llm)
    for a, b in zip(got, baseline[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert llm.engine._forward_slot.jitted._cache_size() == baseline[1]


@pytest.mark.parametrize("ngl", ["all", N_LAYER + 1, 1000, -2])
def test_all_layers_is_no_split(tiny, on_cpu, ngl):
    from jllama.api import Llama

    llm = Llama(str(tiny), ctx_size=64, compile_cache=False, n_gpu_layers=ngl)
    assert llm.offload is None and not hasattr(llm.model, "host_layers")


def test_host_layers_sit_in_host_memory(tiny, on_cpu):
    """The CPU client has a pinned host memory kind (so CI runs the real copies); the streamed
    layers' weights are there, the device layers' in device memory."""
    import jax

    from jllama.api import Llama

    assert "pinned_host" in {m.kind for m in jax.devices()[0].addressable_memories()}
    llm = Llama(str(tiny), ctx_size=64, compile_cache=False, n_gpu_layers=2)
    w = llm.model.host_layers.groups[0].blocks[0].wq.weight.get_value().data
    assert w.sharding.memory_kind == "pinned_host" and w.shape[0] == N_LAYER - 1
    d = llm.model.blocks[0].wq.weight.get_value().data
    assert d.sharding.memory_kind == "device"
    # llama-server's sleep: the weights let go and loaded again, split the same way
    before = np.asarray(llm.engine.prefill(PROMPT))
    llm.release_memory()
    llm.restore_memory()
    w = llm.model.host_layers.groups[0].blocks[0].wq.weight.get_value().data
    assert w.sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(np.asarray(llm.engine.prefill(PROMPT)), before)


def _decode_hlo(llm) -> str:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jllama.numerics import use

    gd, st = nnx.split(llm.model)
    num = llm.numerics

    def step(st, tok, pos0, cache):
        with use(num):
            return nnx.merge(gd, st)(tok, pos0, cache, 64, jnp.zeros_like(pos0))

    return jax.jit(step, donate_argnums=3).lower(
        st, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32), llm.engine.cache
    ).compile().as_text()


def test_one_loop_per_part_whatever_the_depth(tmp_path, on_cpu):
    """Half the layers streamed: the decode step holds one loop for the host part and one for
    the device part, with the same instructions for 4 and 8 layers."""
    from jllama.api import Llama

    counts = []
    for n in (4, 8):
        path = write_tiny_llama(tmp_path / f"d{n}.gguf", seed=2, **dict(SHAPE, n_layer=n))
        llm = Llama(str(path), ctx_size=64, compile_cache=False, n_gpu_layers=n // 2 + 1)
        assert llm.offload.n_host == n // 2
        txt = _decode_hlo(llm)
        assert txt.count(" while(") == 2
        counts.append((txt.count("custom-call("), txt.count(" fusion(")))
    assert counts[0] == counts[1]


def _sizes(path):
    """Bytes per part, read from the file's tensor table here (the rule the README states:
    the device holds the token embedding, the KV cache, its layers' and the output layer's
    weights, and the largest streamed layer)."""
    from jllama.gguf.reader import read_gguf

    g = read_gguf(path)
    layer = [0] * N_LAYER
    out = embd = 0
    for name, ti in g.tensors.items():
        m = re.match(r"blk\.(\d+)\.", name)
        if m:
            layer[int(m.group(1))] += ti.data.nbytes
        elif name.startswith("output"):
            out += ti.data.nbytes
        else:
            embd += ti.data.nbytes
    # f16 K and V: n_layer x ctx x kv heads x head_dim x 2 bytes, each
    kv = 2 * N_LAYER * 64 * SHAPE["n_head_kv"] * SHAPE["head_dim"] * 2
    return layer, out, embd, kv


def test_fit_error_names_the_largest_split_that_fits(tiny, on_cpu, monkeypatch):
    from jllama.api import Llama
    from jllama.models import offload

    layer, out, embd, kv = _sizes(tiny)
    # room for -ngl 2 (the output layer, layer 2, layer 0..1 streamed) and not for -ngl 3
    need2 = embd + kv + out + layer[2] + max(layer[:2])
    need3 = embd + kv + out + layer[1] + layer[2] + layer[0]
    assert need3 > need2
    limit = offload.MARGIN_BYTES + need2
    monkeypatch.setattr(offload, "device_memory_limit", lambda device=None: limit)
    with pytest.raises(offload.OffloadError, match=r"-ngl 3 needs .* at most -ngl 2 fits"):
        Llama(str(tiny), ctx_size=64, compile_cache=False, n_gpu_layers=3)
    llm = Llama(str(tiny), ctx_size=64, compile_cache=False)  # auto: the most that fit
    assert llm.offload.n_gpu == 2
    monkeypatch.setattr(offload, "device_memory_limit", lambda device=None: 1 << 20)
    with pytest.raises(offload.OffloadError, match="not even -ngl 0 fits"):
        Llama(str(tiny), ctx_size=64, compile_cache=False, n_gpu_layers="auto")


def test_cli_flag_and_fit_error_line(tiny, on_cpu, monkeypatch, capsys):
    from jllama.cli.main import main
    from jllama.models import offload

    monkeypatch.setattr(offload, "device_memory_limit", lambda device=None: 1 << 20)
    for flag in ("-ngl", "--gpu-layers", "--n-gpu-layers"):
        assert main(["generate", "-m", str(tiny), "-p", "hi", "-n", "1", flag, "2"]) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and "-ngl 2 needs" in err[0], err
    with pytest.raises(SystemExit) as e:  # a usage error: one line, exit code 1
        main(["generate", "-m", str(tiny), "-p", "hi", "-n", "1", "-ngl", "lots"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'lots': expected a number of layers" in err[0]


def test_cli_on_cpu_warns_and_runs(tiny, monkeypatch, capsys):
    from jllama.cli.main import main

    monkeypatch.delenv("JLLAMA_OFFLOAD_ON_CPU", raising=False)
    assert main(["generate", "-m", str(tiny), "-p", "hi", "-n", "1", "--temp", "0",
                 "-ngl", "99"]) == 0
    assert "--gpu-layers option will be ignored" in capsys.readouterr().err


def test_serve_flag():
    """llama-server's -ngl was accepted and ignored before; now it is the setting."""
    from jllama.cli.main import build_parser
    from jllama.cli.serve import _overrides
    from jllama.config import load_config

    for v, want in (("0", 0), ("all", "all"), ("auto", "auto"), ("33", 33)):
        args = build_parser().parse_args(["serve", "-m", "m.gguf", "-ngl", v])
        assert load_config(None, _overrides(args)).runtime.n_gpu_layers == want


def test_config_key(tmp_path):
    from jllama.config import load_config
    from jllama.errors import ConfigError

    y = tmp_path / "run.yaml"
    y.write_text("model: x.gguf\nruntime:\n  n_gpu_layers: 12\n")
    assert load_config(y).runtime.n_gpu_layers == 12
    assert load_config(None).runtime.n_gpu_layers == "auto"
    assert load_config(None, ["runtime.n_gpu_layers=all"]).runtime.n_gpu_layers == "all"
    with pytest.raises(ConfigError, match="n_gpu_layers"):
        load_config(None, ["runtime.n_gpu_layers=lots"])


def _gemma3(path, n_layer: int):
    """A tiny Q8_0 gemma3 with a sliding window of 8: layer 5 global (pattern 6)."""
    import gguf
    from tinymodels import dense_hparams, dense_tensors, write_gguf

    shp = dict(n_embd=128, n_ff=256, n_head=4, n_head_kv=1, head_dim=64, n_layer=n_layer)
    t = dense_tensors(3, n_vocab=320, qk_norm=True, post_norms=True, tied=True, embd_std=0.05,
                      **shp)
    hp = dense_hparams(**shp, **{"rope.freq_base": 1e6, "attention.sliding_window": 8})
    return write_gguf(path, "gemma3", hp, t, qtype=gguf.GGMLQuantizationType.Q8_0)


def test_gemma3_pattern_streamed_same_bits(tmp_path, on_cpu):
    """Gemma 3's sliding/global layers, 7 of 8 streamed: five local layers (one loop), the
    global one, one more local one; the same bits as the default, and the context shift's
    rope of a streamed layer is its own kind's."""
    from jllama.api import Llama

    path = _gemma3(tmp_path / "g.gguf", 8)
    full = Llama(str(path), ctx_size=64, compile_cache=False)
    base = _run(full, steps=0)  # prompt steps only: a gemma3 program compiles slowly
    llm = Llama(str(path), ctx_size=64, compile_cache=False, n_gpu_layers=2)
    assert llm.offload.n_host == 7
    assert [(g.start, g.period, g.repeats) for g in llm.model.host_layers.groups] == \
        [(0, 1, 5), (5, 1, 1), (6, 1, 1)]
    for a, b in zip(_run(llm, steps=0), base, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [llm.model.kv_rope(i) for i in range(8)] == [full.model.kv_rope(i) for i in range(8)]


def test_unrolled_program_streams_too(tiny, on_cpu, baseline):
    """Per-layer caches (JLLAMA_NO_SCAN's unrolled program): the host layers run one by one,
    the same bits."""
    from jllama.api import Llama
    from jllama.numerics import Numerics

    llm = Llama(str(tiny), ctx_size=64, compile_cache=False, n_gpu_layers=2,
                numerics=Numerics(scan_layers=False))
    assert llm.offload.n_host == 2 and not llm.engine.cache.stacked
    for a, b in zip(_run(llm), baseline[0], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2"])
def test_moe_and_mla_layers_streamed_same_bits(tmp_path, on_cpu, arch):
    """Routed experts (stacked per layer, then per host group) and deepseek2's latent cache:
    every layer streamed but the output layer, the prompt's logits the default's."""
    import tinymodels_moe as tm

    from jllama.api import Llama

    write = tm.write_qwen3moe if arch == "qwen3moe" else tm.write_deepseek2
    path = write(tmp_path / f"{arch}.gguf", quant=tm.Q.Q8_0)
    base = _run(Llama(str(path), ctx_size=64, compile_cache=False), steps=0)
    llm = Llama(str(path), ctx_size=64, compile_cache=False, n_gpu_layers=1)
    assert llm.offload.n_host == llm.spec.n_layer and len(llm.model.blocks) == 0
    for a, b in zip(_run(llm, steps=0), base, strict=True):
        np.testing.assert_array_equal(a, b)
