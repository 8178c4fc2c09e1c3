"""A tiny llama whose weights are all IQ2_XXS / IQ1_S (written with our quantizers and an
importance matrix) runs end to end in jllama and in llama.cpp, and the file is byte-identical
to the one llama.cpp's ``llama_model_quantize`` writes from the same imatrix."""

from __future__ import annotations

import numpy as np
import pytest

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


def _llama_cpp_logits(path, tokens: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


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


@pytest.mark.parametrize("ftype", ["IQ2_XXS", "IQ1_S"])
def test_jllama_logits_match_llama_cpp(tiny, tmp_path, ftype: str) -> None:
    """Same file in both. Not bit-exact: llama.cpp's IQ dot products quantize the activations
    to Q8_K first; jllama dequantizes the weights and multiplies in f32."""
    from jllama.api import Llama

    path = tmp_path / f"tiny-{ftype}.gguf"
    _write_pure(tiny, path, ftype, _imatrix(read_gguf(tiny)))
    types = {t.type_name for t in read_gguf(path).tensors.values()}
    assert types == {ftype, "F32"}
    tokens = [1, 300, 301, 17, 302, 303, 42, 304]
    ref = _llama_cpp_logits(path, tokens)
    ours = np.asarray(Llama(path, ctx_size=64).logits(tokens), dtype=np.float32)
    assert ours.shape == ref.shape
    rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    print(f"{ftype}: relative L2 logit difference {rel:.4f}")
    assert rel < 0.05, rel
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.75
