"""`jllama convert-hf` on llama checkpoints: the same bytes as llama.cpp's convert_hf_to_gguf.py.

Two tiny random llama checkpoints with real tokenizers (tests/hfcheckpoints.py): Llama 3's BPE
``tokenizer.json`` with bf16 weights in two safetensors shards, and LLaMA 2's SentencePiece
``tokenizer.model`` with f32 weights and tied embeddings. Each is converted by the reference
(run once, all outtypes in one process) and by jllama; the files must be identical. Bad input
(missing files, unknown architecture, a tensor of the wrong shape) is one line and exit 1.
The converted Q8_0 file then runs in jllama (jllama.api.Llama) with the same tokens and logits
bit-equal to llama-cpp-python's.
"""

from __future__ import annotations

import json

import hfcheckpoints as H
import numpy as np
import pytest
from convert_reference import needs_reference_deps, run_reference, same_file

pytestmark = [pytest.mark.oracle, pytest.mark.data]

OUTTYPES_SPM = ("f32", "f16", "bf16", "q8_0")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    needs_reference_deps()
    root = tmp_path_factory.mktemp("convert_hf")
    rng = np.random.default_rng
    cfg = H.llama_config()
    bpe = H.write_checkpoint(root / "llama-bpe", cfg, H.dense_tensors(cfg, rng(0)), "llama3",
                             shards=2)
    cfg = H.llama_config("spm", bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    spm = H.write_checkpoint(root / "llama-spm", cfg, H.dense_tensors(cfg, rng(1), tied=True),
                             "spm", dtype="float32")
    jobs = [(bpe, root / "ref-bpe-auto.gguf", "auto")]
    jobs += [(spm, root / f"ref-spm-{t}.gguf", t) for t in OUTTYPES_SPM]
    run_reference(jobs)
    return root, bpe, spm


def _ours(src, out, outtype):
    from jllama.convert import convert_hf

    convert_hf(src, out, outtype)
    return out


def test_llama3_bpe_sharded_bf16_auto(converted, tmp_path):
    root, bpe, _ = converted
    ours = _ours(bpe, tmp_path / "ours.gguf", "auto")
    same_file(ours, root / "ref-bpe-auto.gguf")
    from jllama.gguf import read_gguf

    g = read_gguf(ours)
    assert g.metadata["tokenizer.ggml.pre"] == "llama-bpe"
    assert g.metadata["general.file_type"] == 32  # auto picked the checkpoint's bf16


@pytest.mark.parametrize("outtype", OUTTYPES_SPM)
def test_llama_spm_outtypes(converted, tmp_path, outtype):
    root, _, spm = converted
    same_file(_ours(spm, tmp_path / "ours.gguf", outtype), root / f"ref-spm-{outtype}.gguf")


# ----------------------------------------------------------------------------- bad input


def _cli(*argv, capsys):
    from jllama.cli.main import main

    rc = main(["convert-hf", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _copy(src, dst, skip=()):
    import shutil

    dst.mkdir()
    for p in src.iterdir():
        if p.name not in skip:
            shutil.copy(p, dst / p.name)
    return dst


def test_missing_config(converted, tmp_path, capsys):
    d = _copy(converted[2], tmp_path / "m", skip=("config.json",))
    rc, err = _cli(d, tmp_path / "o.gguf", capsys=capsys)
    assert rc == 1 and len(err) == 1 and "no config.json" in err[0]
    assert not (tmp_path / "o.gguf").exists()


def test_missing_weights_and_shard(converted, tmp_path, capsys):
    d = _copy(converted[2], tmp_path / "m", skip=("model.safetensors",))
    rc, err = _cli(d, tmp_path / "o.gguf", capsys=capsys)
    assert rc == 1 and len(err) == 1 and "no model weights" in err[0]
    d = _copy(converted[1], tmp_path / "b", skip=("model-00002-of-00002.safetensors",))
    rc, err = _cli(d, tmp_path / "o.gguf", capsys=capsys)
    assert rc == 1 and len(err) == 1 and "model-00002-of-00002.safetensors" in err[0]


def test_unknown_architecture(converted, tmp_path, capsys):
    d = _copy(converted[2], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    rc, err = _cli(d, tmp_path / "o.gguf", capsys=capsys)
    assert rc == 1 and len(err) == 1
    assert "FrobnicatorForCausalLM is not supported" in err[0] and "LlamaForCausalLM" in err[0]


def test_tensor_of_wrong_shape(converted, tmp_path, capsys):
    d = _copy(converted[2], tmp_path / "m", skip=("model.safetensors",))
    cfg = json.loads((d / "config.json").read_text())
    t = H.dense_tensors(cfg, np.random.default_rng(3), tied=True)
    t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:16]
    H.write_weights(d, t, "float32")
    rc, err = _cli(d, tmp_path / "o.gguf", capsys=capsys)
    assert rc == 1 and len(err) == 1
    assert "model.layers.1.self_attn.k_proj.weight" in err[0] and "[16, 64]" in err[0]
    assert "[32, 64]" in err[0]


def test_cli_writes_the_reference_file(converted, tmp_path, capsys):
    root, _, spm = converted
    rc, _ = _cli(spm, "--outfile", tmp_path / "o.gguf", "--outtype", "q8_0", capsys=capsys)
    assert rc == 0
    same_file(tmp_path / "o.gguf", root / "ref-spm-q8_0.gguf")


# ----------------------------------------------------------------------------- it runs


def test_converted_q8_0_runs_bit_exact_with_llamacpp(converted):
    from llamacpp_oracle import llama_cpp_module

    llama_cpp = llama_cpp_module()
    from jllama.api import Llama

    path = converted[0] / "ref-spm-q8_0.gguf"  # the same bytes as ours (tests above)
    oracle = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False,
                             n_threads=2, seed=0, flash_attn=True)
    llm = Llama(path, ctx_size=128, compile_cache=False)
    text = "The converted tokenizer splits this sentence, numbers 12345 and émigré alike."
    ids = llm.tokenize(text)
    assert ids == oracle.tokenize(text.encode())
    ids += np.random.default_rng(0).integers(3, 32000, 8).tolist()
    oracle.reset()
    oracle.eval(ids)
    ref = np.array(oracle.scores[: len(ids)], np.float32)
    ours = np.asarray(llm.logits(ids), np.float32)
    print(f"\nconverted llama q8_0: max|Δlogit| = {float(np.abs(ours - ref).max()):.6f}")
    assert np.array_equal(ours, ref)


def test_unknown_bpe_pre_tokenizer(converted, tmp_path, capsys):
    d = _copy(converted[1], tmp_path / "m")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\s+|\\S+"
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    rc, err = _cli(d, tmp_path / "o.gguf", capsys=capsys)
    assert rc == 1 and len(err) == 1 and "pre-tokenizer" in err[0]


def test_expert_of_wrong_shape(tmp_path, capsys):
    cfg = H.mixtral_config()
    t = H.dense_tensors(cfg, np.random.default_rng(6), moe="mixtral")
    bad = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    t[bad] = t[bad][:64]
    d = H.write_checkpoint(tmp_path / "m", cfg, t, "spm")
    rc, err = _cli(d, tmp_path / "o.gguf", capsys=capsys)
    assert rc == 1 and len(err) == 1
    assert bad in err[0] and "[64, 64]" in err[0] and "[128, 64]" in err[0]
