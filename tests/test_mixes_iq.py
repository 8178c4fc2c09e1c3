"""The 1-3 bit file types (IQ1_S ... IQ3_M, TQ1_0, TQ2_0, MXFP4_MOE): tensor -> type maps equal
llama.cpp's, with and without an importance matrix, and the imatrix requirement is enforced.

llama.cpp's map comes from ``llama_model_quantize`` with ``dry_run`` (it decides every tensor's
type and logs it, without running ggml's slow lattice searches), read from its log."""

from __future__ import annotations

import ctypes
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from jllama.errors import QuantError
from jllama.gguf.constants import QType
from jllama.gguf.reader import read_gguf
from jllama.quant.mixes import FTYPES, mix_from_base, plan_from_tensors, plan_types
from jllama.quant.testing import tiny_llama

llama_cpp = pytest.importorskip("llama_cpp")

NEW_FTYPES = [
    "Q2_K_S", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S",
    "IQ3_M", "TQ1_0", "TQ2_0", "MXFP4_MOE",
]  # fmt: skip
_LINE = re.compile(r"\]\s+(\S+)\s+- \[.*?\], type =\s+(\w+), size =.*?(?:\((\w+)\))?\s*$")


def _random_imatrix(g) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for n, t in g.tensors.items():
        if len(t.shape) >= 2:
            ne2 = t.shape[0] if len(t.shape) == 3 else 1
            out[n] = rng.uniform(0.1, 2.0, t.shape[-1] * ne2).astype(np.float32)
    return out


def _oracle_plan(src: Path, ftype: str, imatrix: dict[str, np.ndarray] | None) -> dict[str, str]:
    """llama.cpp's chosen type per tensor: a dry run, its per-tensor log lines parsed."""
    text: list[str] = []

    @llama_cpp.llama_log_callback
    def log(level, msg, user):
        text.append(msg.decode(errors="replace"))

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[ftype][0]
    p.nthread = 1
    p.dry_run = True
    keep = None
    if imatrix:
        vals = {n: np.ascontiguousarray(v, np.float32) for n, v in imatrix.items()}
        arr = (llama_cpp.llama_model_imatrix_data * (len(vals) + 1))(
            *[
                llama_cpp.llama_model_imatrix_data(
                    n.encode(), v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
                )
                for n, v in vals.items()
            ],
            llama_cpp.llama_model_imatrix_data(None, None, 0),
        )
        keep = (vals, arr)
        p.imatrix = ctypes.cast(arr, type(p.imatrix))
    llama_cpp.llama_log_set(log, None)
    try:
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(src.with_suffix(".dry")).encode(), ctypes.byref(p)
        )
    finally:
        llama_cpp.llama_log_set(llama_cpp.llama_log_callback(0), None)
    del keep
    assert rc == 0, "".join(text)[-2000:]
    plan = {}
    for line in "".join(text).splitlines():
        m = _LINE.search(line)
        if m:
            plan[m.group(1)] = (m.group(3) or m.group(2)).upper()
    assert plan, "no per-tensor lines in llama.cpp's log"
    return plan


def _ours(g, ftype: str, has_imatrix: bool) -> dict[str, str]:
    spec = mix_from_base(ftype)
    spec.has_imatrix = has_imatrix
    return {n: QType(t).name for n, t in plan_types(g, spec).items()}


MODELS = {
    # n_embd 256, GQA 4, 8 layers, own output: every 256-block type applies
    "gqa4": {},
    # no GQA, tied embeddings, 16 layers: the other attn_v / ffn_down / attn_output branches
    "tied": {"n_layer": 16, "n_head": 4, "n_head_kv": 4, "tied": True, "seed": 1},
    # rows of 288: every 256-block type falls back
    "rows288": {"n_embd": 288, "n_head": 4, "n_head_kv": 2, "n_ff": 544, "n_layer": 4},
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory):
    p = tmp_path_factory.mktemp("mix") / f"{request.param}.gguf"
    tiny_llama(p, **MODELS[request.param])
    return p


@pytest.mark.parametrize("ftype", NEW_FTYPES)
def test_maps_match_llama_cpp(model, ftype: str) -> None:
    g = read_gguf(model)
    im = _random_imatrix(g)
    assert _ours(g, ftype, True) == _oracle_plan(model, ftype, im)
    assert _ours(g, ftype, False) == _oracle_plan(model, ftype, None)


@pytest.mark.parametrize("ftype", ["MXFP4_MOE", "IQ2_XXS", "IQ1_M", "IQ3_XS", "IQ3_M"])
def test_moe_maps_match_llama_cpp(tmp_path, ftype: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from tinymodels_moe import write_qwen3moe

    src = write_qwen3moe(tmp_path / "moe.gguf")
    g = read_gguf(src)
    assert _ours(g, ftype, True) == _oracle_plan(src, ftype, _random_imatrix(g))


@pytest.mark.parametrize(
    "ftype,needs",
    [
        ("IQ2_XXS", True),
        ("IQ1_M", True),
        ("IQ3_XS", True),
        ("Q2_K_S", True),
        ("IQ3_S", False),
        ("TQ1_0", False),
    ],  # fmt: skip
)
def test_imatrix_requirement_like_llama_quantize(model, ftype: str, needs: bool) -> None:
    """llama.cpp refuses exactly when a tensor's type needs an imatrix (tensor_requires_imatrix)."""
    from jllama.quant.mixes import check_imatrix

    g = read_gguf(model)
    tensors = {n: (t.shape, t.qtype) for n, t in g.tensors.items()}
    plan = plan_from_tensors(tensors, g.metadata, mix_from_base(ftype))
    needs_here = needs and model.stem != "rows288"  # there every such tensor falls back
    if needs_here:
        with pytest.raises(QuantError, match="requires an importance matrix"):
            check_imatrix(plan, mix_from_base(ftype))
    else:
        check_imatrix(plan, mix_from_base(ftype))
    from jllama.quant.testing import llama_cpp_quantize

    if needs_here:
        with pytest.raises(RuntimeError):
            llama_cpp_quantize(model, model.with_suffix(".q"), ftype)


@pytest.mark.parametrize("ftype", sorted(set(FTYPES) - set(NEW_FTYPES) - {"F32", "NVFP4"}))
def test_older_ftypes_with_imatrix_match_llama_cpp(model, ftype: str) -> None:
    """With an imatrix llama.cpp's rules change for some older file types too (Q4_0/Q5_0
    ffn_down, IQ4_NL/IQ4_XS ffn_down)."""
    g = read_gguf(model)
    if ftype == "Q1_0" and model.stem == "rows288":  # 288 columns, 128-blocks, no fallback type
        with pytest.raises(QuantError, match="no fallback type for Q1_0"):
            _ours(g, ftype, True)
        with pytest.raises(AssertionError, match="no tensor type fallback is defined"):
            _oracle_plan(model, ftype, _random_imatrix(g))  # llama.cpp refuses too
        return
    assert _ours(g, ftype, True) == _oracle_plan(model, ftype, _random_imatrix(g))
