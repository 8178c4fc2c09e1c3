"""A tiny llama whose weights are all IQ2_XXS / IQ2_XS / IQ2_S / IQ1_S / IQ1_M (written with our quantizers and an
importance matrix) runs end to end in jllama and in llama.cpp with bit-identical logits and
greedy tokens (the int8 kernels), and the file is byte-identical to the one llama.cpp's
``llama_model_quantize`` writes from the same imatrix."""

from __future__ import annotations

import numpy as np
import pytest
from llamacpp_oracle import llama_cpp_logits_and_greedy

from jllama.gguf.constants import QType
from jllama.gguf.reader import read_gguf
from jllama.gguf.writer import TensorSpec, write_gguf
from jllama.quant.mixes import MixSpec, plan_from_tensors
from jllama.quant.quantize import output_metadata
from jllama.quant.quantizers import quantize_np
from jllama.quant.testing import llama_cpp_quantize, tiny_llama

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    tiny_llama(p, n_layer=2)
    return p


def _imatrix(g) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        n: rng.lognormal(0, 1, t.shape[-1]).astype(np.float32)
        for n, t in g.tensors.items()
        if len(t.shape) == 2
    }


def _write_pure(src, dst, ftype: str, imatrix: dict[str, np.ndarray]) -> None:
    """``llama-quantize --pure --imatrix`` done by jllama: every quantizable weight in one type."""
    g = read_gguf(src)
    spec = MixSpec(ftype=ftype, pure=True, has_imatrix=True)
    plan = plan_from_tensors(
        {n: (t.shape, t.qtype) for n, t in g.tensors.items()}, g.metadata, spec
    )
    md, mt = output_metadata(g.metadata, g.metadata_types, spec.ftype_id)
    specs = []
    for name, new in plan.types.items():
        t = g.tensors[name]

        def produce(t=t, new=new, name=name) -> np.ndarray:
            x = np.asarray(t.data).view(np.float32).reshape(t.shape)  # the F32 source
            if new == QType.F32:
                return x.view(np.uint8).reshape(-1)
            return quantize_np(x, int(new), imatrix[name]).reshape(-1)

        specs.append(TensorSpec(name, t.shape, int(new), produce))
    write_gguf(dst, md, specs, mt)


def test_iq2_xxs_file_identical_to_llama_cpp(tiny, tmp_path) -> None:
    im = _imatrix(read_gguf(tiny))
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    _write_pure(tiny, ours, "IQ2_XXS", im)
    llama_cpp_quantize(tiny, ref, "IQ2_XXS", pure=True, imatrix=im)
    a, b = read_gguf(ours), read_gguf(ref)
    assert {n: t.type_name for n, t in a.tensors.items()} == {
        n: t.type_name for n, t in b.tensors.items()
    }
    for n, t in a.tensors.items():
        assert np.array_equal(np.asarray(t.data), np.asarray(b.tensors[n].data)), n
    assert ours.read_bytes() == ref.read_bytes()


# weight type -> the file type whose --pure weights are all of it (llama.cpp's IQ2_S file type
# is IQ2_XS-based; IQ2_M's is IQ2_S)
FTYPES = {"IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_M", "IQ1_S": "IQ1_S",
          "IQ1_M": "IQ1_M"}  # fmt: skip


@pytest.fixture(scope="module", params=list(FTYPES))
def iq_model(tiny, tmp_path_factory, request):
    """(type, file, llama.cpp's logits at every position of TOKENS, its 16 greedy tokens)."""
    ftype = request.param
    path = tmp_path_factory.mktemp("iq") / f"tiny-{ftype}.gguf"
    _write_pure(tiny, path, FTYPES[ftype], _imatrix(read_gguf(tiny)))
    assert {t.type_name for t in read_gguf(path).tensors.values()} == {ftype, "F32"}
    ref, greedy = llama_cpp_logits_and_greedy(path, TOKENS)
    return ftype, path, ref, greedy


TOKENS = [1, 300, 301, 17, 302, 303, 42, 304]


def test_jllama_logits_and_greedy_tokens_match_llama_cpp(iq_model) -> None:
    """Same file in both. With the int8 kernels (ggml's AVX2 vec_dot and, from 8 rows, its
    tiled GEMM for IQ1/IQ2; AVX2 + FMA + F16C CPUs) every logit is bit-identical, and so are
    the greedy tokens."""
    from jllama.api import Llama
    from jllama.engine.sampling import SamplingParams
    from jllama.kernels import xla_cpu

    ftype, path, ref, ref_greedy = iq_model
    llm = Llama(path, ctx_size=64)
    got = np.asarray(llm.engine.logits(TOKENS), dtype=np.float32)
    ours = list(llm.engine.generate(TOKENS, SamplingParams.greedy(), max_tokens=16))
    assert got.shape == ref.shape
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"\n{ftype}: rel L2 {rel:.2e}, max|diff| {float(np.abs(got - ref).max()):.3g}")
    if not xla_cpu.q8_on(int(QType[ftype])):
        pytest.skip("no int8 kernels on this CPU (AVX2 + FMA + F16C): the f32 test below runs")
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert ours == ref_greedy


def test_f32_fallback_close_to_llama_cpp(iq_model) -> None:
    """Without the int8 kernels the weights are dequantized and multiplied in f32 by
    activations rounded as ggml's q8_K rounds them: close, not bit for bit."""
    from jllama.api import Llama
    from jllama.numerics import Numerics

    ftype, path, ref, _ = iq_model
    llm = Llama(path, ctx_size=64, numerics=Numerics().replace(q8_kernels=False))
    got = np.asarray(llm.engine.logits(TOKENS), dtype=np.float32)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"\n{ftype} f32 path: rel L2 {rel:.2e}, max|diff| {float(np.abs(got - ref).max()):.3g}")
    assert rel < 0.03, rel  # measured 2.6e-7 (IQ2_XXS) .. 7.6e-3 (IQ1_S)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75
