"""LoRA adapters (models/lora.py) against llama.cpp on a tiny random llama.

The base is Q8_0 (the int8 kernels: bit-identical to llama.cpp without adapters); the adapters
are random, written by tests/tinymodels.py in convert_lora_to_gguf.py's layout, and loaded by
both programs (llama-cpp-python: ``lora_path``/``lora_scale``, or llama_adapter_lora_init +
llama_set_adapters_lora for several).
"""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
from tinymodels import dense_hparams, dense_tensors, write_gguf, write_lora

Q = gguf.GGMLQuantizationType
N_VOCAB = 320
SHP = dict(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, head_dim=32)
ALL = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
       "blk.0.attn_output.weight", "blk.1.attn_q.weight", "blk.1.attn_v.weight",
       "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.1.ffn_down.weight",
       "output.weight", "token_embd.weight"]
IDS = [[int(t) for t in np.random.default_rng(0).integers(0, N_VOCAB, 40)], [5, 17, 300, 42]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    base = dense_tensors(11, n_vocab=N_VOCAB, tied=False, **SHP)
    model = write_gguf(d / "base.gguf", "llama", dense_hparams(**SHP), base, qtype=Q.Q8_0)
    return dict(
        base=base, model=model, dir=d,
        a=write_lora(d / "a.gguf", "llama", base, ALL, rank=8, alpha=16.0, seed=1),
        b=write_lora(d / "b.gguf", "llama", base, ALL[:4] + ["blk.1.ffn_up.weight"], rank=16,
                     alpha=0.0, seed=2, std=0.05),
        h=write_lora(d / "h.gguf", "llama", base, ALL, rank=32, alpha=32.0, seed=3,
                     qtype=Q.F16),
        q=write_lora(d / "q.gguf", "llama", base, ALL[:-1], rank=32, alpha=32.0, seed=4,
                     qtype=Q.Q8_0),
    )


def llamacpp_order(ptrs: list[int]) -> list[int]:
    """The order llama.cpp adds several adapters in: that of its ``std::unordered_map<
    llama_adapter_lora *, float>``, as libstdc++ iterates it (13 buckets up to 13 entries, the
    address as hash; a new key goes to the front of the list when its bucket is empty, else just
    before the first key of its bucket). Indices into ``ptrs`` (insertion order). Checked on
    eight runs of four adapters, one with a shared bucket."""
    order: list[int] = []
    for i, p in enumerate(ptrs):
        same = [j for j, k in enumerate(order) if ptrs[k] % 13 == p % 13]
        order.insert(same[0] if same else 0, i)
    return order


def _oracle(files, adapters, reordered: bool | None = False):
    """llama-cpp-python on the base with these (file key, scale) adapters set on its context.

    Several adapters: llama.cpp's summation order depends on their addresses
    (``llamacpp_order``); with ``reordered=False`` they are loaded again until llama.cpp adds
    the last given first (jllama's order: no shared bucket, or one that keeps that order);
    ``reordered=True`` until it does not; None takes the first addresses. ``o.jllama_order`` is
    the order to give jllama for llama.cpp's sums."""
    from llamacpp_oracle import llama_cpp_module

    llama_cpp = llama_cpp_module()
    import llama_cpp.llama_cpp as low

    kw = dict(n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0, flash_attn=True)
    if len(adapters) == 1:  # the high-level API's own way
        (k, s), = adapters
        return llama_cpp.Llama(model_path=str(files["model"]), lora_path=str(files[k]),
                               lora_scale=s, **kw)
    o = llama_cpp.Llama(model_path=str(files["model"]), **kw)
    o._jllama_adapters = []  # freed with the model; held so that reloads land elsewhere
    for _ in range(64):
        ads = [low.llama_adapter_lora_init(o._model.model, str(files[k]).encode())
               for k, _ in adapters]
        assert all(ads)
        o._jllama_adapters += ads
        ptrs = [ctypes.cast(x, ctypes.c_void_p).value for x in ads]
        moved = llamacpp_order(ptrs) != list(range(len(ads)))[::-1]
        if reordered is None or moved == reordered:
            break
    else:
        raise AssertionError("could not place the adapters as asked")
    arr = (low.llama_adapter_lora_p_ctypes * len(ads))(*ads)
    sc = (ctypes.c_float * len(ads))(*[s for _, s in adapters])
    assert low.llama_set_adapters_lora(o._ctx.ctx, arr, len(ads), sc) == 0
    o.jllama_order = [adapters[i] for i in reversed(llamacpp_order(ptrs))]
    return o


def _ours(files, adapters):
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model, load_weights, lora

    g = read_gguf(files["model"])
    w = load_weights(g)
    spec, m = build_model(g, w)
    ls = lora.attach(m, w, g, [(lora.read_lora(files[k]), s) for k, s in adapters])
    return Engine(spec, m, ctx_size=256), m, ls


def _oracle_logits(o, ids):
    o.reset()
    o.eval(ids)
    return np.array(o.scores[: len(ids)], np.float32)


# F32 adapters (ggml's f32 mul_mat step by step), an F16 one (activations rounded to f16 first),
# a Q8_0 one (the int8 kernels), one without alpha (scale used as is), several at once
# (llama.cpp's order: last given first)
CASES = {"one": [("a", 0.7)], "four": [("a", 1.0), ("b", -1.3), ("h", 0.5), ("q", 1.1)]}


@pytest.mark.oracle
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_llamacpps(files, case):
    """Every logit at every position bit-identical to llama.cpp's with the same adapters."""
    eng, _, _ = _ours(files, CASES[case])
    o = _oracle(files, CASES[case])
    for ids in IDS:
        ref = _oracle_logits(o, ids)
        ours = eng.logits(ids)
        rows = np.flatnonzero((ours != ref).any(-1))
        assert rows.size == 0, f"{rows.size} rows differ, max|Δ| {np.abs(ours - ref).max():.3g}"
    # the adapters do change the model (else this test could not fail)
    base = _oracle(files, [])
    assert np.abs(_oracle_logits(base, IDS[1]) - _oracle_logits(o, IDS[1])).max() > 0.1


@pytest.mark.oracle
def test_llamacpps_order_when_adapter_addresses_share_a_bucket(files):
    """When two of llama.cpp's adapters share a hash bucket its order is not last-given-first:
    given that order, jllama's logits are llama.cpp's bit for bit again (the arithmetic is the
    same; only the order of the sums differs, by rounding)."""
    adapters = CASES["four"]
    o = _oracle(files, adapters, reordered=True)
    assert o.jllama_order != adapters
    eng, _, _ = _ours(files, o.jllama_order)
    np.testing.assert_array_equal(eng.logits(IDS[1]), _oracle_logits(o, IDS[1]))


@pytest.mark.oracle
def test_greedy_and_scale_change_without_recompiling(files):
    """16 greedy tokens equal llama.cpp's (decode steps: one row through the adapters); then a
    new scale is new state for the same compiled programs, and the logits follow llama.cpp's
    with that scale."""
    from jllama.engine.sampling import SamplingParams
    from jllama.models import lora

    eng, m, ls = _ours(files, [("a", 0.7), ("b", -1.3)])
    o = _oracle(files, [("a", 0.7), ("b", -1.3)])
    o.reset()
    ref = []
    for t in o.generate(IDS[1], top_k=1, temp=0.0, repeat_penalty=1.0):
        ref.append(t)
        if len(ref) == 16:
            break
    assert list(eng.generate(IDS[1], SamplingParams.greedy(), max_tokens=16)) == ref
    eng.logits(IDS[0])
    sizes = (eng._forward_slot._cache_size(), eng._decode_sample._cache_size())
    lora.set_scales(ls, [0.25, 2.0])
    eng.update_params(m)
    ours = eng.logits(IDS[0])
    assert (eng._forward_slot._cache_size(), eng._decode_sample._cache_size()) == sizes
    np.testing.assert_array_equal(ours, _oracle_logits(_oracle(files, [("a", 0.25), ("b", 2.0)]),
                                                       IDS[0]))


def test_without_adapters_the_model_is_unchanged(files):
    """No adapter: no LoRA terms in the program (the layers' lora slot stays None)."""
    from flax import nnx

    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.models.common import Embedding, Linear

    _, m = build_model(read_gguf(files["model"]))
    mods = [x for _, x in nnx.iter_graph(m) if isinstance(x, Linear | Embedding)]
    assert len(mods) == 2 * 7 + 2 and all(x.lora is None for x in mods)


def test_reads_the_converters_layout(files):
    from jllama.models import lora

    lf = lora.read_lora(files["a"])
    assert (lf.arch, lf.alpha, sorted(lf.pairs)) == ("llama", 16.0, sorted(ALL))
    a, b = lf.pairs["blk.0.attn_k.weight"]
    assert (a.shape, b.shape) == ((8, 128), (64, 8))
    a, b = lf.pairs["token_embd.weight"]
    assert (a.shape, b.shape) == ((N_VOCAB, 8), (128, 8))  # lora_a transposed for the rows
    # llama_adapter_lora_weight::get_scale in f32: 0.7 * 16 / 8; no alpha: the scale itself
    assert lf.scale_for("blk.0.attn_k.weight", 0.7) == np.float32(np.float32(0.7 * 16) / 8)
    assert lora.read_lora(files["b"]).scale_for("blk.0.attn_q.weight", -1.3) == np.float32(-1.3)


def _bad_lora(tmp_path, meta: dict, tensors: dict[str, np.ndarray]):
    from jllama.gguf.writer import TensorSpec
    from jllama.gguf.writer import write_gguf as jl_write

    specs = [TensorSpec(n, a.shape, 0, lambda a=a: np.ascontiguousarray(a, np.float32)
                        .view(np.uint8)) for n, a in tensors.items()]
    p = tmp_path / "bad.gguf"
    jl_write(p, {"general.architecture": "llama", "general.type": "adapter",
                 "adapter.type": "lora", "adapter.lora.alpha": 8.0, **meta}, specs)
    return p


def test_bad_adapters_are_refused_with_their_reason(files, tmp_path):
    from jllama.errors import ModelError
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model, load_weights, lora

    g = read_gguf(files["model"])
    w = load_weights(g)
    _, m = build_model(g, w)
    z = np.zeros
    with pytest.raises(ModelError, match="not a LoRA adapter"):
        lora.read_lora(files["model"])
    with pytest.raises(ModelError, match="adapter.type is 'ia3'"):
        lora.read_lora(_bad_lora(tmp_path, {"adapter.type": "ia3"},
                                 {"blk.0.attn_q.weight.lora_a": z((8, 128))}))
    with pytest.raises(ModelError, match="missing one component"):
        lora.read_lora(_bad_lora(tmp_path, {}, {"blk.0.attn_q.weight.lora_a": z((8, 128))}))
    with pytest.raises(ModelError, match="neither .lora_a nor .lora_b"):
        lora.read_lora(_bad_lora(tmp_path, {}, {"blk.0.attn_q.weight": z((8, 128))}))
    cases = [
        ({}, {"blk.0.attn_k.weight.lora_a": z((8, 128)), "blk.0.attn_k.weight.lora_b": z((128, 8))},
         r"'blk.0.attn_k.weight' has lora_a \[8, 128\], lora_b \[128, 8\]; the base tensor "
         r"\[64, 128\] needs"),
        ({}, {"blk.9.attn_q.weight.lora_a": z((8, 128)), "blk.9.attn_q.weight.lora_b": z((128, 8))},
         "does not exist in the base model"),
        ({"general.architecture": "qwen2"}, {"blk.0.attn_q.weight.lora_a": z((8, 128)),
                                             "blk.0.attn_q.weight.lora_b": z((128, 8))},
         "architecture 'qwen2'"),
    ]
    for meta, t, msg in cases:
        with pytest.raises(ModelError, match=msg):
            lora.attach(m, w, g, [(lora.read_lora(_bad_lora(tmp_path, meta, t)), 1.0)])


# ------------------------------------------------------------------------------ user surface
def _one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    errors = [ln for ln in lines if ln.startswith(f"jllama {command}: error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.oracle
def test_cli_generate_with_adapters_is_llamacpps_completion(files, capsys):
    """``jllama generate --lora F --lora-scaled F:S``: the greedy completion llama.cpp gives with
    the same adapters (its --lora entries come before --lora-scaled ones here too)."""
    from jllama.cli.main import main

    prompt = "the quick brown fox"
    o = _oracle(files, [("a", 1.0), ("b", -1.3)])
    o.reset()
    toks = []
    for t in o.generate(o.tokenize(prompt.encode(), add_bos=False, special=True), top_k=1,
                        temp=0.0, repeat_penalty=1.0):
        toks.append(t)
        if len(toks) == 12:
            break
    # a random model's byte tokens are not all valid UTF-8: ours prints U+FFFD for those
    ref = o.detokenize(toks).decode("utf-8", errors="replace")
    assert main(["generate", "-m", str(files["model"]), "-p", prompt, "-n", "12", "--temp", "0",
                 "--lora", str(files["a"]), "--lora-scaled", f"{files['b']}:-1.3",
                 "-c", "256"]) == 0
    out = capsys.readouterr().out
    assert out == ref + "\n"


def test_cli_bad_adapters_are_one_line(files, capsys, tmp_path):
    """A file that is no adapter, one for another base, a malformed flag, a missing file, a
    quantized adapter given to export-lora: one error line each, exit code 1."""
    from tinymodels import write_lora

    from jllama.cli.main import main

    other = dense_tensors(1, n_vocab=N_VOCAB, tied=False, **{**SHP, "n_embd": 64})
    wrong = write_lora(tmp_path / "wrong.gguf", "llama", other, ["blk.0.attn_q.weight"])
    for extra, msg in ((["--lora", str(files["model"])], "not a LoRA adapter"),
                       (["--lora", str(wrong)], "wrong base model?"),
                       (["--lora-scaled", str(files["a"])], "expected FNAME:SCALE"),
                       (["--lora", str(tmp_path / "none.gguf")], "none.gguf")):
        assert main(["generate", "-m", str(files["model"]), "-p", "x", "-n", "1", *extra]) == 1
        assert msg in _one_error_line(capsys.readouterr().err, "generate")
    assert main(["export-lora", "-m", str(files["model"]), "--lora", str(files["q"]),
                 "-o", str(tmp_path / "m.gguf")]) == 1
    assert "quantized LoRA adapters cannot be merged" in _one_error_line(
        capsys.readouterr().err, "export-lora")


def test_config_lora_section(tmp_path):
    from jllama.config import load_config
    from jllama.errors import ConfigError

    (tmp_path / "a.gguf").write_bytes(b"")
    p = tmp_path / "run.yaml"
    p.write_text("model: m.gguf\nlora:\n  - path: a.gguf\n  - {path: /x/b.gguf, scale: 0.5}\n")
    cfg = load_config(p)
    assert [(lo.path, lo.scale) for lo in cfg.lora] == [(str(tmp_path / "a.gguf"), 1.0),
                                                        ("/x/b.gguf", 0.5)]
    p.write_text("lora:\n  - scale: 0.5\n")
    with pytest.raises(ConfigError, match=r"'lora\[0\].path' is empty"):
        load_config(p)


# ------------------------------------------------------------------------ export-lora (merging)
def _ggml_merge(base_f32: np.ndarray, parts, embed: bool, out_f16: bool) -> np.ndarray:
    """llama-export-lora's merge graph (tools/export-lora/export-lora.cpp, merge_tensor) on
    ggml itself: for each adapter delta = mul_mat(cont(transpose(cast(A))), cast(B)) (token_embd:
    mul_mat(cast(B), cast(A))), ggml_scale by scale * alpha / rank, cur = add(delta, cur); then
    cast to the output type. ``parts``: (A, B, ggml type of both, effective scale)."""
    from llamacpp_oracle import GgmlInitParams, ggml_fill, ggml_libs

    base, cpu = ggml_libs()
    ctx = base.ggml_init(GgmlInitParams(64 << 20, None, False))
    assert ctx
    try:
        n_out, n_in = base_f32.shape
        cur = base.ggml_new_tensor_2d(ctx, 0, n_in, n_out)
        ggml_fill(base, cur, base_f32)
        for a, b, t, s in parts:
            ta = base.ggml_new_tensor_2d(ctx, t, a.shape[1], a.shape[0])
            tb = base.ggml_new_tensor_2d(ctx, t, b.shape[1], b.shape[0])
            ggml_fill(base, ta, a.astype(np.float16 if t else np.float32))
            ggml_fill(base, tb, b.astype(np.float16 if t else np.float32))
            fa, fb = base.ggml_cast(ctx, ta, 0), base.ggml_cast(ctx, tb, 0)
            if embed:
                delta = base.ggml_mul_mat(ctx, fb, fa)
            else:
                delta = base.ggml_mul_mat(ctx, base.ggml_cont(ctx, base.ggml_transpose(ctx, fa)),
                                          fb)
            cur = base.ggml_add(ctx, base.ggml_scale(ctx, delta, float(s)), cur)
        out = base.ggml_cast(ctx, cur, 1 if out_f16 else 0)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, 2) == 0
        res = np.empty((n_out, n_in), np.float16 if out_f16 else np.float32)
        ctypes.memmove(res.ctypes.data, base.ggml_get_data(out), res.nbytes)
        return res
    finally:
        base.ggml_free(ctx)


@pytest.mark.oracle
def test_export_lora_merges_as_llama_export_lora(files, capsys):
    """``jllama export-lora``: every merged tensor bit-identical to llama-export-lora's graph
    run by ggml (Q8_0 base tensors dequantized, merged, written F16; the rest copied); the
    merged model's logits close to llama.cpp's with the adapters unmerged (the merged matrices
    are F16, so neither llama.cpp's nor our logits of the merged file equal the unmerged ones:
    the tolerances say how close)."""
    from jllama.cli.main import main
    from jllama.gguf.reader import read_gguf
    from jllama.models import lora
    from jllama.quant.formats import dequantize_np

    out = files["dir"] / "merged.gguf"
    assert main(["export-lora", "-m", str(files["model"]), "--lora", str(files["a"]),
                 "--lora-scaled", f"{files['h']}:0.5", "-o", str(out), "--quiet"]) == 0
    g, src = read_gguf(out), read_gguf(files["model"])
    assert list(g.tensors) == sorted(src.tensors)  # llama-export-lora's std::map order
    assert g.metadata["general.file_type"] == 1
    la, lh = lora.read_lora(files["a"]), lora.read_lora(files["h"])
    for name, ti in src.tensors.items():
        got = g.tensors[name]
        if name not in la.pairs:
            assert (got.qtype, bytes(got.data)) == (ti.qtype, bytes(ti.data))
            continue
        w = (dequantize_np(ti.data.reshape(ti.shape[0], -1), ti.qtype, ti.shape[1])
             if ti.qtype else np.frombuffer(ti.data, np.float32).reshape(ti.shape))
        parts = []
        for lf, s, t in ((la, 1.0, 0), (lh, 0.5, 1)):
            a, b = (np.frombuffer(x.data, np.float16 if t else np.float32).reshape(x.shape)
                    for x in lf.pairs[name])
            parts.append((a, b, t, lf.scale_for(name, s)))
        ref = _ggml_merge(w, parts, name == "token_embd.weight", out_f16=ti.qtype != 0)
        assert got.qtype == (1 if ti.qtype else 0)
        ours = np.frombuffer(got.data, ref.dtype).reshape(ref.shape)
        np.testing.assert_array_equal(ours, ref, err_msg=name)
    # the merged model against llama.cpp running the base with the adapters
    from jllama.api import Llama

    o = _oracle(files, [("a", 1.0), ("h", 0.5)])
    ref = _oracle_logits(o, IDS[0])
    got = Llama(out, ctx_size=256, compile_cache=False).engine.logits(IDS[0])
    from llamacpp_oracle import llama_cpp_module

    theirs = llama_cpp_module().Llama(model_path=str(out), n_ctx=256, logits_all=True,
                                      verbose=False, n_threads=2, flash_attn=True)
    merged_ref = _oracle_logits(theirs, IDS[0])
    diff = float(np.abs(got - ref).max())
    same_file = float(np.abs(got - merged_ref).max())
    theirs_diff = float(np.abs(merged_ref - ref).max())
    print(f"\nmax|Δlogit|: ours merged vs llama.cpp unmerged {diff:.4f}; llama.cpp merged vs "
          f"unmerged {theirs_diff:.4f}; ours vs llama.cpp on the merged file {same_file:.2e}; "
          f"logit std {ref.std():.2f}")
    # measured: 0.112, 0.109 (the merge's own f16 rounding), 0.037 (F16 matrices go through
    # XLA's f32 GEMM, not ggml's f16 order); logit std 1.13
    assert same_file < 0.06
    assert diff < 0.2 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


# ------------------------------------------------------------------------------------ server
def _oracle_text(files, adapters, prompt: str, n: int) -> str:
    o = _oracle(files, adapters)
    toks = []
    for t in o.generate(o.tokenize(prompt.encode(), add_bos=False, special=True), top_k=1,
                        temp=0.0, repeat_penalty=1.0):
        toks.append(t)
        if len(toks) == n:
            break
    return o.detokenize(toks).decode("utf-8", errors="replace")


@pytest.mark.oracle
def test_server_lora_adapters_and_per_request_scales(files):
    """llama-server's LoRA surface: GET/POST /lora-adapters (default scales; ids left out: 0)
    and a request's own ``lora`` list; every greedy completion equals llama.cpp's with those
    scales, also for two requests with different scales sent together (they are not batched
    together: the second waits for the first)."""
    import concurrent.futures

    import httpx

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    llm = Llama(files["model"], ctx_size=256, n_slots=2, compile_cache=False,
                lora=[str(files["a"]), (str(files["b"]), -1.3)])
    prompt, n = "the quick brown fox", 8
    state = ServerState(llm, ServerSettings("tiny", timeout=120))
    with ServerThread(state) as s, httpx.Client(base_url=s.url, timeout=120) as http:
        def complete(lora=None) -> str:
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0.0, "top_k": 1,
                    "cache_prompt": False}
            if lora is not None:
                body["lora"] = lora
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        got = http.get("/lora-adapters").json()
        assert [(e["id"], e["path"], e["scale"]) for e in got] == [
            (0, str(files["a"]), 1.0), (1, str(files["b"]), -1.3)]
        assert complete() == _oracle_text(files, [("a", 1.0), ("b", -1.3)], prompt, n)
        assert complete([{"id": 0, "scale": 0.5}]) == _oracle_text(files, [("a", 0.5)], prompt,
                                                                    n)
        assert http.post("/lora-adapters", json=[{"id": 1, "scale": 2.0}]).json() == {
            "success": True}
        assert [e["scale"] for e in http.get("/lora-adapters").json()] == [0.0, 2.0]
        want_b = _oracle_text(files, [("b", 2.0)], prompt, n)
        want_a = _oracle_text(files, [("a", 0.3)], prompt, n)
        assert want_a != want_b
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            fb = ex.submit(complete)
            fa = ex.submit(complete, [{"id": 0, "scale": 0.3}])
            assert (fb.result(), fa.result()) == (want_b, want_a)
        r = http.post("/v1/completions", json={"prompt": "x", "lora": [{"scale": 1}]})
        assert r.status_code == 400 and "lora" in r.text
        assert http.post("/lora-adapters", json={"id": 0}).status_code == 400


# ------------------------------------------------------------------------------ real models
@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_real_model_with_adapter_is_bit_identical(model, request, tmp_path):
    """A random rank-16 adapter on every attention and feed-forward matrix of SmolLM2 (Q4_1)
    and Gemma 3 270M (K-quants, its embedding scale and post-norms): all logits equal
    llama.cpp's with the same adapter."""
    from llamacpp_oracle import llama_cpp_module

    from jllama.api import Llama
    from jllama.gguf.reader import read_gguf

    path = request.getfixturevalue(f"{model}_path")
    g = read_gguf(path)
    shapes = {n: np.zeros(t.shape, np.float32) for n, t in g.tensors.items()
              if len(t.shape) == 2}
    keys = ("attn_q.", "attn_k.", "attn_v.", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    targets = [n for n in shapes if any(k in n for k in keys)]
    ad = write_lora(tmp_path / "lora.gguf", g.architecture, shapes, targets, rank=16,
                    alpha=32.0, seed=5, std=0.02)
    o = llama_cpp_module().Llama(model_path=str(path), n_ctx=512, logits_all=True,
                                 verbose=False, n_threads=2, flash_attn=True, lora_path=str(ad),
                                 lora_scale=0.8)
    ids = o.tokenize(b"The capital of France is Paris, and the capital of Germany is",
                     add_bos=True, special=True)
    ref = _oracle_logits(o, ids)
    ours = Llama(path, ctx_size=512, lora=[(str(ad), 0.8)]).engine.logits(ids)
    rows = np.flatnonzero((ours != ref).any(-1))
    assert rows.size == 0, f"{rows.size} rows differ, max|Δ| {np.abs(ours - ref).max():.3g}"


def test_which_tensors_take_adapters_in_moe_and_mla_models(tmp_path, caplog):
    """deepseek2: llama.cpp multiplies its MLA projections and output by a plain ggml_mul_mat
    (src/models/deepseek2.cpp), so adapters there are ignored (with a warning) as there, while
    attn_output and the shared expert take theirs; a stacked-experts or router adapter is
    refused by name."""
    import tinymodels_moe as tm

    from jllama.errors import ModelError
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model, load_weights, lora

    def load(path):
        g = read_gguf(path)
        w = load_weights(g)
        return g, w, build_model(g, w)[1]

    g, w, m = load(tm.write_deepseek2(tmp_path / "ds.gguf"))
    shapes = {n: np.zeros(t.shape, np.float32) for n, t in g.tensors.items()
              if len(t.shape) == 2}
    names = ["blk.0.attn_q_a.weight", "blk.1.attn_kv_a_mqa.weight", "blk.1.attn_output.weight",
             "blk.1.ffn_up_shexp.weight"]
    ad = write_lora(tmp_path / "ds-lora.gguf", "deepseek2", shapes, names)
    with caplog.at_level("WARNING", logger="jllama"):
        ls = lora.attach(m, w, g, [(lora.read_lora(ad), 1.0)])
    assert sorted(n for n, _ in ls.pairs[0]) == names[2:]
    assert "2 adapted tensors" in caplog.text and m.blocks[0].wq_a.lora is None
    assert m.blocks[1].wo.lora is not None
    g, w, m = load(tm.write_qwen2moe(tmp_path / "q2.gguf"))
    shapes = {n: np.zeros(t.shape, np.float32) for n, t in g.tensors.items()
              if len(t.shape) == 2}
    ad = write_lora(tmp_path / "q2-lora.gguf", "qwen2moe", shapes, ["blk.0.ffn_gate_inp.weight"])
    with pytest.raises(ModelError, match="'blk.0.ffn_gate_inp.weight' are not supported"):
        lora.attach(m, w, g, [(lora.read_lora(ad), 1.0)])
