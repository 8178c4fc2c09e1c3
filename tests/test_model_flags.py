"""llama.cpp's model-loading flags (--override-kv, the rope flags) against llama-cpp-python on a
tiny random llama: every logit bit-identical with the same settings given to both programs."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from tinymodels import dense_hparams, dense_tensors, write_gguf

Q = gguf.GGMLQuantizationType
N_VOCAB = 320
SHP = dict(n_layer=3, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, head_dim=32)
IDS = [int(t) for t in np.random.default_rng(0).integers(0, N_VOCAB, 40)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model_flags")
    t = dense_tensors(11, n_vocab=N_VOCAB, tied=False, **SHP)
    return write_gguf(d / "m.gguf", "llama", dense_hparams(**SHP), t, qtype=Q.Q8_0)


def _oracle(path, **kw):
    from llamacpp_oracle import llama_cpp_module

    return llama_cpp_module().Llama(model_path=str(path), n_ctx=256, logits_all=True,
                                    verbose=False, n_threads=2, seed=0, flash_attn=True, **kw)


def _oracle_logits(o, ids):
    o.reset()
    o.eval(ids)
    return np.array(o.scores[: len(ids)], np.float32)


def _ours(path, **kw):
    from jllama.api import Llama

    return Llama(path, ctx_size=256, compile_cache=False, **kw)


def _same(ours, ref):
    rows = np.flatnonzero((ours != ref).any(-1))
    assert rows.size == 0, f"{rows.size} rows differ, max|Δ| {np.abs(ours - ref).max():.3g}"


KV = {"llama.rope.freq_base": 500.0, "tokenizer.ggml.add_bos_token": True,
      "tokenizer.ggml.bos_token_id": 7}


@pytest.mark.oracle
def test_kv_overrides_equal_llamacpps(model):
    """A float hparam and a tokenizer flag overridden: llama.cpp's logits and tokens."""
    o = _oracle(model, kv_overrides=KV)
    llm = _ours(model, kv_overrides=KV)
    ref = _oracle_logits(o, IDS)
    _same(llm.engine.logits(IDS), ref)
    assert o.tokenize(b"hello world", add_bos=True) == llm.tokenize("hello world")
    # the override does change the model (else this test could not fail)
    plain = _oracle(model)
    assert np.abs(_oracle_logits(plain, IDS) - ref).max() > 1e-3
    assert plain.tokenize(b"hello world", add_bos=True) != o.tokenize(b"hello world", add_bos=True)


def _greedy_text(o, prompt: str, n: int) -> str:
    o.reset()
    toks = []
    for t in o.generate(o.tokenize(prompt.encode(), add_bos=False, special=True), top_k=1,
                        temp=0.0, repeat_penalty=1.0):
        toks.append(t)
        if len(toks) == n:
            break
    # a random model's byte tokens are not all valid UTF-8: ours prints U+FFFD for those
    return o.detokenize(toks).decode("utf-8", errors="replace")


@pytest.mark.oracle
def test_cli_override_kv_is_llamacpps_completion(model, capsys):
    """``jllama generate --override-kv K=float:V,K2=int:N``: llama.cpp's greedy completion."""
    from jllama.cli.main import main

    ref = _greedy_text(_oracle(model, kv_overrides={"llama.rope.freq_base": 321.5}), "the fox", 10)
    assert main(["generate", "-m", str(model), "-p", "the fox", "-n", "10", "--temp", "0",
                 "-c", "256", "--override-kv",
                 "llama.rope.freq_base=float:321.5,llama.context_length=int:512"]) == 0
    assert capsys.readouterr().out == ref + "\n"


@pytest.mark.parametrize("cmd", ["generate", "serve"])
@pytest.mark.parametrize("flag,msg", [
    (["--override-kv", "foo"], "malformed"),
    (["--override-kv", "a=double:1"], "invalid type"),
    (["--override-kv", "a=int:1.5"], "not an integer"),
    (["--override-kv", "a=float:x"], "not a number"),
    (["--override-kv", "a=bool:yes"], "invalid boolean"),
    (["--rope-scaling", "ntk"], "expected none, linear or yarn"),
    (["--rope-scale", "0"], "expected a nonzero number"),
    (["--rope-freq-base", "x"], "expected a number"),
    (["--yarn-orig-ctx", "1.5"], "expected an integer"),
    (["--yarn-beta-fast", ""], "expected a number"),
    (["--control-vector-scaled", "a.gguf:1:2"], "expected FNAME:SCALE"),
])
def test_bad_model_flags_are_one_line(model, capsys, cmd, flag, msg):
    from jllama.cli.main import main

    extra = ["-p", "x", "-n", "1"] if cmd == "generate" else ["--port", "0"]
    assert main([cmd, "-m", str(model), *extra, *flag]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and msg in err[0], err


# llama-cpp-python's rope_scaling_type: 0 none, 1 linear, 2 yarn
ROPE_CASES = {
    "base": (dict(freq_base=2500.0), dict(rope_freq_base=2500.0)),
    "linear": (dict(scaling="linear", freq_scale=0.25),
               dict(rope_scaling_type=1, rope_freq_scale=0.25)),
    "none": (dict(scaling="none", freq_scale=0.25, freq_base=777.0),
             dict(rope_scaling_type=0, rope_freq_scale=0.25, rope_freq_base=777.0)),
    "yarn": (dict(scaling="yarn", freq_scale=0.125, yarn_orig_ctx=64),
             dict(rope_scaling_type=2, rope_freq_scale=0.125, yarn_orig_ctx=64)),
    "yarn_knobs": (dict(scaling="yarn", freq_scale=0.5, yarn_orig_ctx=32, yarn_ext_factor=0.7,
                        yarn_beta_fast=16.0, yarn_beta_slow=2.0, freq_base=3000.0),
                   dict(rope_scaling_type=2, rope_freq_scale=0.5, yarn_orig_ctx=32,
                        yarn_ext_factor=0.7, yarn_beta_fast=16.0, yarn_beta_slow=2.0,
                        rope_freq_base=3000.0)),
}


@pytest.mark.oracle
def test_yarn_gguf_loads_as_llamacpps(tmp_path):
    """A GGUF whose own rope scaling is YaRN (factor 4, original context 64): llama.cpp's logits
    with default context parameters, and with --rope-freq-base over it."""
    t = dense_tensors(11, n_vocab=N_VOCAB, tied=False, **SHP)
    h = dense_hparams(**SHP, **{"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
                                "rope.scaling.original_context_length": 64})
    path = write_gguf(tmp_path / "yarn.gguf", "llama", h, t, qtype=Q.Q8_0)
    _same(_ours(path).engine.logits(IDS), _oracle_logits(_oracle(path), IDS))
    _same(_ours(path, rope={"freq_base": 4000.0}).engine.logits(IDS),
          _oracle_logits(_oracle(path, rope_freq_base=4000.0), IDS))


@pytest.mark.oracle
@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_options_equal_llamacpps(model, case):
    ours_kw, theirs_kw = ROPE_CASES[case]
    o = _oracle(model, **theirs_kw)
    ref = _oracle_logits(o, IDS)
    _same(_ours(model, rope=ours_kw).engine.logits(IDS), ref)
    assert np.abs(_oracle_logits(_oracle(model), IDS) - ref).max() > 1e-3


@pytest.mark.oracle
def test_cli_rope_flags_are_llamacpps_completion(model, capsys):
    """``jllama generate --rope-scaling yarn --rope-scale 4 --yarn-orig-ctx 64
    --rope-freq-base 5000``: llama.cpp's greedy completion with those context parameters."""
    from jllama.cli.main import main

    o = _oracle(model, rope_scaling_type=2, rope_freq_scale=0.25, yarn_orig_ctx=64,
                rope_freq_base=5000.0)
    ref = _greedy_text(o, "the fox", 10)
    assert main(["generate", "-m", str(model), "-p", "the fox", "-n", "10", "--temp", "0",
                 "-c", "256", "--rope-scaling", "yarn", "--rope-scale", "4", "--yarn-orig-ctx",
                 "64", "--rope-freq-base", "5e3"]) == 0
    assert capsys.readouterr().out == ref + "\n"


def test_rope_config_section(model, tmp_path):
    from jllama.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text(f"model: {model}\nrope:\n  scaling: yarn\n  freq_scale: 0.5\n  yarn_orig_ctx: 64\n"
                 "kv_overrides:\n  llama.rope.freq_base: 500.0\n")
    cfg = load_config(p, ["rope.yarn_beta_fast=!!float 1e1"])
    assert (cfg.rope.scaling, cfg.rope.freq_scale, cfg.rope.yarn_orig_ctx,
            cfg.rope.yarn_beta_fast) == ("yarn", 0.5, 64, 10.0)
    assert cfg.kv_overrides == {"llama.rope.freq_base": 500.0}


def _write_cvec(path, layers: dict[int, np.ndarray]):
    """A control vector GGUF as llama.cpp's cvector-generator writes it (F32 direction.N)."""
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", len(layers))
    for il, v in layers.items():
        w.add_tensor(f"direction.{il}", v.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def cvecs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cvec")
    rng = np.random.default_rng(3)
    a = {il: rng.standard_normal(SHP["n_embd"]).astype(np.float32) * 0.5 for il in (1, 2, 3)}
    b = {2: rng.standard_normal(SHP["n_embd"]).astype(np.float32) * 0.5}
    return dict(a=_write_cvec(d / "a.gguf", a), b=_write_cvec(d / "b.gguf", b), va=a, vb=b)


CVEC_CASES = {"all": (-1, -1), "layer2": (2, 2), "from2": (2, -1)}


@pytest.mark.oracle
@pytest.mark.parametrize("case", sorted(CVEC_CASES))
def test_control_vectors_equal_llamacpps(model, cvecs, case):
    """Two files (one scaled), in a layer range: llama.cpp's logits with the same vectors set by
    llama_set_adapter_cvec (the buffer as common_control_vector_load sums it: layer il at row
    il - 1, strength products in f32; direction.3 lies past the last layer that takes one)."""
    import ctypes

    import llama_cpp.llama_cpp as low

    start, end = CVEC_CASES[case]
    n = SHP["n_embd"]
    buf = np.zeros((3, n), np.float32)
    for il, v in cvecs["va"].items():
        buf[il - 1] += v * np.float32(1.0)
    for il, v in cvecs["vb"].items():
        buf[il - 1] += v * np.float32(-0.7)
    o = _oracle(model)
    plain = _oracle_logits(o, IDS)
    flat = np.ascontiguousarray(buf.reshape(-1))
    ptr = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert low.llama_set_adapter_cvec(o._ctx.ctx, ptr, flat.size, n, start if start > 0 else 1,
                                      end if end > 0 else SHP["n_layer"]) == 0
    ref = _oracle_logits(o, IDS)
    llm = _ours(model, control_vectors=[str(cvecs["a"]), (str(cvecs["b"]), -0.7)],
                control_vector_layer_range=(start, end))
    _same(llm.engine.logits(IDS), ref)
    assert np.abs(plain - ref).max() > 1e-3


def _oracle_with_cvec(model, cvecs, scale_b: float, start: int, end: int):
    import ctypes

    import llama_cpp.llama_cpp as low

    n = SHP["n_embd"]
    buf = np.zeros((3, n), np.float32)
    for il, v in cvecs["va"].items():
        buf[il - 1] += v * np.float32(1.0)
    for il, v in cvecs["vb"].items():
        buf[il - 1] += v * np.float32(scale_b)
    o = _oracle(model)
    o._jllama_cvec = flat = np.ascontiguousarray(buf.reshape(-1))
    ptr = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert low.llama_set_adapter_cvec(o._ctx.ctx, ptr, flat.size, n, start, end) == 0
    return o


@pytest.mark.oracle
def test_cli_control_vector_flags_are_llamacpps_completion(model, cvecs, capsys):
    from jllama.cli.main import main

    ref = _greedy_text(_oracle_with_cvec(model, cvecs, 2.5, 2, 3), "the fox", 10)
    assert main(["generate", "-m", str(model), "-p", "the fox", "-n", "10", "--temp", "0",
                 "-c", "256", "--control-vector", str(cvecs["a"]), "--control-vector-scaled",
                 f"{cvecs['b']}:2.5", "--control-vector-layer-range", "2", "3"]) == 0
    assert capsys.readouterr().out == ref + "\n"


def test_bad_control_vectors_are_one_line(model, cvecs, capsys, tmp_path):
    from jllama.cli.main import main

    zero = _write_cvec(tmp_path / "zero.gguf", {0: np.ones(SHP["n_embd"], np.float32)})
    wide = _write_cvec(tmp_path / "wide.gguf", {1: np.ones(64, np.float32)})
    for extra, msg in ((["--control-vector-scaled", "x.gguf"], "expected FNAME:SCALE"),
                       (["--control-vector-scaled", "x.gguf:y"], "expected FNAME:SCALE"),
                       (["--control-vector-layer-range", "1", "x"], "two integers"),
                       (["--control-vector", str(tmp_path / "none.gguf")], "none.gguf"),
                       (["--control-vector", str(zero)], "zero"),
                       (["--control-vector", str(wide)], "does not match")):
        assert main(["generate", "-m", str(model), "-p", "x", "-n", "1", "-c", "256",
                     *extra]) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines()
               if ln.strip() and not ln.startswith("jllama: loading")]
        assert len(err) == 1 and msg in err[0], err


def test_serve_takes_the_model_flags_as_llama_server(cvecs):
    """llama-server's spelling of every flag reaches serve's config (no longer refused)."""
    from jllama.cli.main import build_parser
    from jllama.cli.serve import _overrides
    from jllama.config import load_config

    args = build_parser().parse_args([
        "serve", "-m", "x.gguf", "--override-kv", "a.b=int:7,c=str:hi", "--override-kv",
        "d=bool:true", "--rope-scaling", "yarn", "--rope-freq-scale", "0.5", "--rope-scale", "4",
        "--rope-freq-base", "1e6", "--yarn-orig-ctx", "4096", "--yarn-ext-factor", "0.5",
        "--yarn-attn-factor", "1.5", "--yarn-beta-slow", "2", "--yarn-beta-fast", "16",
        "--control-vector", f"{cvecs['a']},{cvecs['b']}", "--control-vector-scaled",
        f"{cvecs['b']}:-0.5", "--control-vector-layer-range", "1", "2"])
    cfg = load_config(None, _overrides(args))
    assert cfg.kv_overrides == {"a.b": 7, "c": "hi", "d": True}
    r = cfg.rope
    assert (r.scaling, r.freq_scale, r.freq_base, r.yarn_orig_ctx, r.yarn_ext_factor,
            r.yarn_attn_factor, r.yarn_beta_slow, r.yarn_beta_fast) == (
        "yarn", 0.25, 1e6, 4096, 0.5, 1.5, 2.0, 16.0)  # --rope-scale 4 given last
    assert [(c.path, c.scale) for c in cfg.control_vectors] == [
        (str(cvecs["a"]), 1.0), (str(cvecs["b"]), 1.0), (str(cvecs["b"]), -0.5)]
    assert cfg.control_vector_layer_range == [1, 2]


@pytest.mark.oracle
def test_context_shift_under_yarn_is_llamacpps(model):
    """A context shift with YaRN on: llama.cpp's K-shift rotates with the same YaRN parameters
    (magnitude factor included); the logits after it are llama.cpp's bit for bit (oracle:
    test_ctx_shift's llama_memory_seq_rm/seq_add procedure)."""
    from test_ctx_shift import CTX, _oracle_after_shift

    from jllama.api import Llama

    kw = dict(scaling="yarn", freq_scale=0.25, yarn_orig_ctx=64)
    eng = Llama(model, ctx_size=CTX, n_slots=1, compile_cache=False, rope=kw).engine
    rng = np.random.default_rng(9)
    prompt, after = rng.integers(3, 290, 40).tolist(), rng.integers(3, 290, 12).tolist()
    eng.reset(0)
    eng.prefill(prompt, 0)
    assert eng.shift_context(0, 5, 17) == 17
    ours = np.asarray(eng.prefill(after, 0, all_logits=True), np.float32)
    ref = _oracle_after_shift(model, prompt, 5, 17, after, rope_scaling_type=2,
                              rope_freq_scale=0.25, yarn_orig_ctx=64)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.oracle
def test_gemma3_rope_options_reach_the_global_layers_only(tmp_path):
    """gemma3: --rope-freq-base / --rope-freq-scale change the global layers (the sliding-window
    ones keep their own base and no scaling, as llama.cpp's get_rope_freq_base/_scale); an F32
    tiny gemma3 is within test_arch_gemma3's tolerance of llama.cpp (not bit-exact there)."""
    shp = dict(n_layer=6, n_embd=128, n_ff=256, n_head=4, n_head_kv=1, head_dim=64)  # 5 global
    t = dense_tensors(3, n_vocab=N_VOCAB, qk_norm=True, post_norms=True, tied=True,
                      embd_std=0.05, **shp)
    h = dense_hparams(**shp, **{"rope.freq_base": 1e6, "attention.sliding_window": 8})
    path = write_gguf(tmp_path / "g.gguf", "gemma3", h, t)
    ref = _oracle_logits(_oracle(path, rope_freq_base=3000.0, rope_freq_scale=0.5), IDS)
    ours = _ours(path, rope={"freq_base": 3000.0, "freq_scale": 0.5}).engine.logits(IDS)
    print(f"\ngemma3 rope options: max|Δlogit| {np.abs(ours - ref).max():.2g}")
    assert np.abs(ours - ref).max() < 0.01
    assert np.abs(_oracle_logits(_oracle(path), IDS) - ref).max() > 0.05
