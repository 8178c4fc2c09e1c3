"""Tiny random GGUF models for the MoE / MLA architectures, written with gguf-py's GGUFWriter.

They carry a valid gpt2-style byte-level tokenizer (256 byte tokens, a few merges, BOS/EOS) so
llama.cpp loads them, and well-scaled random weights (std 1/sqrt(fan_in), norms near 1, a
sharper output head) so logits are neither flat nor saturated and greedy decoding is stable.
``quant`` (a gguf.GGMLQuantizationType) quantizes every matmul weight except the router and the
norms, experts included (3-D blocks).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

MERGES = ["Ġ t", "h e", "i n", "Ġ a", "e r", "o n", "Ġt he", "e s", "Ġ s", "a n"]


def _byte_tokens() -> list[str]:
    """GPT-2's bytes_to_unicode order: token id b is the printable stand-in for byte b."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + \
        list(range(0xAE, 0xFF + 1))
    extra = 0
    out = []
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _tokenizer(wr: gguf.GGUFWriter) -> int:
    toks = _byte_tokens() + [m.replace(" ", "") for m in MERGES] + ["<s>", "</s>"]
    types = [1] * (len(toks) - 2) + [3, 3]
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("default")
    wr.add_token_list(toks)
    wr.add_token_types(types)
    wr.add_token_merges(MERGES)
    wr.add_bos_token_id(len(toks) - 2)
    wr.add_eos_token_id(len(toks) - 1)
    wr.add_add_bos_token(True)
    return len(toks)


class _Tensors:
    def __init__(self, wr: gguf.GGUFWriter, rng: np.random.Generator, quant: Q | None):
        self.wr, self.rng, self.quant = wr, rng, quant

    def mat(self, name: str, shape: tuple[int, ...], gain: float = 1.0, quantize: bool = True):
        a = (self.rng.standard_normal(shape) * gain / np.sqrt(shape[-1])).astype(np.float32)
        self.put(name, a, quantize)

    def norm(self, name: str, n: int):
        self.put(name, (1.0 + 0.1 * self.rng.standard_normal(n)).astype(np.float32), False)

    def vec(self, name: str, n: int, std: float):
        self.put(name, (std * self.rng.standard_normal(n)).astype(np.float32), False)

    def put(self, name: str, a: np.ndarray, quantize: bool):
        if quantize and self.quant is not None and a.ndim >= 2:
            self.wr.add_tensor(name, _quantize(a, self.quant), raw_dtype=self.quant)
        else:
            self.wr.add_tensor(name, a)


def _quantize(a: np.ndarray, quant: Q) -> np.ndarray:
    """Raw GGUF rows of ``a``: gguf-py's quantizer, or jllama's where gguf-py has none (IQ4_NL,
    NVFP4; byte-identical to ggml's, tests/test_quant_iq.py, test_quant_formats.py). Both
    engines read the same file."""
    if quant in (Q.IQ4_NL, Q.NVFP4):
        from jllama.quant.quantizers import quantize_np

        return quantize_np(np.ascontiguousarray(a, np.float32), int(quant))
    return gguf.quants.quantize(a, quant)


def _common(wr, arch, *, n_layer, n_embd, n_head, n_head_kv, n_ff, ctx=512, base=10000.0):
    wr.add_context_length(ctx)
    wr.add_embedding_length(n_embd)
    wr.add_block_count(n_layer)
    wr.add_feed_forward_length(n_ff)
    wr.add_head_count(n_head)
    wr.add_head_count_kv(n_head_kv)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_rope_freq_base(base)
    wr.add_file_type(0)


def _experts(t: _Tensors, p: str, n_expert: int, n_embd: int, n_ff: int):
    t.mat(p + "ffn_gate_inp.weight", (n_expert, n_embd), gain=2.0, quantize=False)
    t.mat(p + "ffn_gate_exps.weight", (n_expert, n_ff, n_embd))
    t.mat(p + "ffn_up_exps.weight", (n_expert, n_ff, n_embd))
    t.mat(p + "ffn_down_exps.weight", (n_expert, n_embd, n_ff))


def _head(t: _Tensors, n_vocab: int, n_embd: int):
    t.put("token_embd.weight", t.rng.standard_normal((n_vocab, n_embd)).astype(np.float32),
          True)
    t.norm("output_norm.weight", n_embd)
    t.mat("output.weight", (n_vocab, n_embd), gain=4.0)


def write_llama_moe(path: Path, quant: Q | None = None, seed: int = 0) -> Path:
    """Mixtral-style llama: 2 layers, 4 experts, top-2, GQA 4/2 heads of 16."""
    n_layer, n_embd, n_head, n_kv, n_ff, n_exp = 2, 64, 4, 2, 96, 4
    wr = gguf.GGUFWriter(str(path), "llama")
    _common(wr, "llama", n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_kv,
            n_ff=n_ff)
    wr.add_rope_dimension_count(n_embd // n_head)
    wr.add_expert_count(n_exp)
    wr.add_expert_used_count(2)
    n_vocab = _tokenizer(wr)
    t = _Tensors(wr, np.random.default_rng(seed), quant)
    _head(t, n_vocab, n_embd)
    hd = n_embd // n_head
    for i in range(n_layer):
        p = f"blk.{i}."
        t.norm(p + "attn_norm.weight", n_embd)
        t.mat(p + "attn_q.weight", (n_head * hd, n_embd))
        t.mat(p + "attn_k.weight", (n_kv * hd, n_embd))
        t.mat(p + "attn_v.weight", (n_kv * hd, n_embd))
        t.mat(p + "attn_output.weight", (n_embd, n_head * hd))
        t.norm(p + "ffn_norm.weight", n_embd)
        _experts(t, p, n_exp, n_embd, n_ff)
    return _finish(wr, path)


def write_qwen3moe(path: Path, quant: Q | None = None, seed: int = 1, n_layer: int = 2) -> Path:
    """qwen3moe: 2 layers, 8 experts, top-3, head_dim 32 != n_embd / n_head, Q/K norms."""
    n_embd, n_head, n_kv, hd, n_ff, n_exp = 64, 4, 2, 32, 64, 8
    wr = gguf.GGUFWriter(str(path), "qwen3moe")
    _common(wr, "qwen3moe", n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_kv,
            n_ff=n_ff * 3, base=1000000.0)
    wr.add_key_length(hd)
    wr.add_value_length(hd)
    wr.add_expert_count(n_exp)
    wr.add_expert_used_count(3)
    wr.add_expert_feed_forward_length(n_ff)
    n_vocab = _tokenizer(wr)
    t = _Tensors(wr, np.random.default_rng(seed), quant)
    _head(t, n_vocab, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        t.norm(p + "attn_norm.weight", n_embd)
        t.mat(p + "attn_q.weight", (n_head * hd, n_embd))
        t.mat(p + "attn_k.weight", (n_kv * hd, n_embd))
        t.mat(p + "attn_v.weight", (n_kv * hd, n_embd))
        t.norm(p + "attn_q_norm.weight", hd)
        t.norm(p + "attn_k_norm.weight", hd)
        t.mat(p + "attn_output.weight", (n_embd, n_head * hd))
        t.norm(p + "ffn_norm.weight", n_embd)
        _experts(t, p, n_exp, n_embd, n_ff)
    return _finish(wr, path)



def write_deepseek2(path: Path, quant: Q | None = None, seed: int = 2, *, q_lora: bool = True,
                    v3: bool = True, yarn: bool = True, split_kv_b: bool = True,
                    n_layer: int = 3, width: int = 1) -> Path:
    """deepseek2 with MLA: 3 layers (1 leading dense), 8 experts top-2 + 1 shared expert.

    ``v3``: sigmoid gating + selection bias ``exp_probs_b``, 4 expert groups of which 2 are used,
    normalised and scaled (2.5) weights; otherwise V2-style softmax, unnormalised, scale 1.
    ``q_lora=False`` writes a plain ``attn_q`` (the Lite layout); ``split_kv_b=False`` writes the
    older unsplit ``attn_kv_b`` without the ``*_mla`` key lengths (llama.cpp then runs MHA).
    llama.cpp 0c1e570 decides "Lite" (no q LoRA) from the layer count: 27 layers.
    ``width`` multiplies every size but the head count, expert count and rope width (for
    benchmarks: ``width=8`` is a ~25M-parameter model).
    """
    n_embd, n_head, n_ff, n_ff_exp, n_exp = 64 * width, 4, 96 * width, 32 * width, 8
    q_rank, kv_rank, nope, rope_dim, v_dim = 32 * width, 64 * width, 32 * width, 16, 32 * width
    arch = "deepseek2"
    wr = gguf.GGUFWriter(str(path), arch)
    _common(wr, arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=1 if split_kv_b
            else n_head, n_ff=n_ff)
    wr.add_leading_dense_block_count(1)
    if q_lora:
        wr.add_q_lora_rank(q_rank)
    wr.add_kv_lora_rank(kv_rank)
    if split_kv_b:  # MLA layout: the cache holds the latent + rope key, V is the latent
        wr.add_key_length(kv_rank + rope_dim)
        wr.add_value_length(kv_rank)
        wr.add_uint32(f"{arch}.attention.key_length_mla", nope + rope_dim)
        wr.add_uint32(f"{arch}.attention.value_length_mla", v_dim)
    else:
        wr.add_key_length(nope + rope_dim)
        wr.add_value_length(v_dim)
    wr.add_rope_dimension_count(rope_dim)
    wr.add_expert_count(n_exp)
    wr.add_expert_used_count(2)
    wr.add_expert_feed_forward_length(n_ff_exp)
    wr.add_expert_shared_count(1)
    if v3:
        wr.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        wr.add_expert_weights_norm(True)
        wr.add_expert_weights_scale(2.5)
        wr.add_expert_group_count(4)
        wr.add_expert_group_used_count(2)
    else:
        wr.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        wr.add_expert_weights_scale(1.0)
    if yarn:
        wr.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        wr.add_rope_scaling_factor(4.0)
        wr.add_rope_scaling_orig_ctx_len(64)
        wr.add_rope_scaling_yarn_log_mul(0.1 * 0.707)
    n_vocab = _tokenizer(wr)
    t = _Tensors(wr, np.random.default_rng(seed), quant)
    _head(t, n_vocab, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        t.norm(p + "attn_norm.weight", n_embd)
        if q_lora:
            t.mat(p + "attn_q_a.weight", (q_rank, n_embd))
            t.norm(p + "attn_q_a_norm.weight", q_rank)
            t.mat(p + "attn_q_b.weight", (n_head * (nope + rope_dim), q_rank))
        else:
            t.mat(p + "attn_q.weight", (n_head * (nope + rope_dim), n_embd))
        t.mat(p + "attn_kv_a_mqa.weight", (kv_rank + rope_dim, n_embd))
        t.norm(p + "attn_kv_a_norm.weight", kv_rank)
        kv_b = (t.rng.standard_normal((n_head, nope + v_dim, kv_rank)) / np.sqrt(kv_rank))
        kv_b = kv_b.astype(np.float32)
        if split_kv_b:
            t.put(p + "attn_k_b.weight", np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1)),
                  True)
            t.put(p + "attn_v_b.weight", np.ascontiguousarray(kv_b[:, nope:]), True)
        else:
            t.put(p + "attn_kv_b.weight", kv_b.reshape(n_head * (nope + v_dim), kv_rank), True)
        t.mat(p + "attn_output.weight", (n_embd, n_head * v_dim))
        t.norm(p + "ffn_norm.weight", n_embd)
        if i < 1:
            t.mat(p + "ffn_gate.weight", (n_ff, n_embd))
            t.mat(p + "ffn_up.weight", (n_ff, n_embd))
            t.mat(p + "ffn_down.weight", (n_embd, n_ff))
            continue
        _experts(t, p, n_exp, n_embd, n_ff_exp)
        if v3:
            t.vec(p + "exp_probs_b.bias", n_exp, 0.3)
        t.mat(p + "ffn_gate_shexp.weight", (n_ff_exp, n_embd))
        t.mat(p + "ffn_up_shexp.weight", (n_ff_exp, n_embd))
        t.mat(p + "ffn_down_shexp.weight", (n_embd, n_ff_exp))
    return _finish(wr, path)


def write_qwen2moe(path: Path, quant: Q | None = None, seed: int = 3) -> Path:
    """qwen2moe: 2 layers, QKV biases, 6 experts top-2 (unnormalised), gated shared expert."""
    n_layer, n_embd, n_head, n_kv, n_ff, n_sh, n_exp = 2, 64, 4, 2, 32, 64, 6
    hd = n_embd // n_head
    wr = gguf.GGUFWriter(str(path), "qwen2moe")
    _common(wr, "qwen2moe", n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_kv,
            n_ff=n_ff * 4, base=1000000.0)
    wr.add_expert_count(n_exp)
    wr.add_expert_used_count(2)
    wr.add_expert_feed_forward_length(n_ff)
    wr.add_expert_shared_feed_forward_length(n_sh)
    n_vocab = _tokenizer(wr)
    t = _Tensors(wr, np.random.default_rng(seed), quant)
    _head(t, n_vocab, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        t.norm(p + "attn_norm.weight", n_embd)
        for name, rows in (("q", n_head * hd), ("k", n_kv * hd), ("v", n_kv * hd)):
            t.mat(p + f"attn_{name}.weight", (rows, n_embd))
            t.vec(p + f"attn_{name}.bias", rows, 0.3)
        t.mat(p + "attn_output.weight", (n_embd, n_head * hd))
        t.norm(p + "ffn_norm.weight", n_embd)
        _experts(t, p, n_exp, n_embd, n_ff)
        t.vec(p + "ffn_gate_inp_shexp.weight", n_embd, 0.3)
        t.mat(p + "ffn_gate_shexp.weight", (n_sh, n_embd))
        t.mat(p + "ffn_up_shexp.weight", (n_sh, n_embd))
        t.mat(p + "ffn_down_shexp.weight", (n_embd, n_sh))
    return _finish(wr, path)


def write_test_models(d: Path) -> dict[str, Path]:
    """The tiny MoE files test_arch_moe.py and test_arch_moe_f32_cache.py compare with
    llama.cpp, by name."""
    return {
        "llama_f32": write_llama_moe(d / "llama_moe_f32.gguf"),
        "llama_q8_0": write_llama_moe(d / "llama_moe_q8_0.gguf", quant=Q.Q8_0),
        "qwen3moe_f32": write_qwen3moe(d / "qwen3moe_f32.gguf"),
        "qwen3moe_q4_0": write_qwen3moe(d / "qwen3moe_q4_0.gguf", quant=Q.Q4_0),
        "qwen3moe_iq4_nl": write_qwen3moe(d / "qwen3moe_iq4_nl.gguf", quant=Q.IQ4_NL),
        "qwen3moe_nvfp4": write_qwen3moe(d / "qwen3moe_nvfp4.gguf", quant=Q.NVFP4),
        "qwen2moe_f32": write_qwen2moe(d / "qwen2moe_f32.gguf"),
        "qwen2moe_q8_0": write_qwen2moe(d / "qwen2moe_q8_0.gguf", quant=Q.Q8_0),
    }


def _finish(wr: gguf.GGUFWriter, path: Path) -> Path:
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


# ---------------------------------------------------------------- oracle comparison helpers
def prompt_ids(n_vocab: int, n: int = 40, seed: int = 5) -> list[int]:
    """BOS then random byte tokens (ids straight into both engines: no tokenizer involved)."""
    rng = np.random.default_rng(seed)
    return [n_vocab - 2] + rng.integers(0, 256, n).tolist()


KV_TYPES = {"f32": 0, "f16": 1}  # ggml type ids


def oracle(path: Path, n_ctx: int = 256, cache: str = "f32", flash_attn: bool = False):
    """llama.cpp on ggml's stock CPU kernels (tests/llamacpp_oracle.py). An f32 KV cache and no
    flash attention unless a test is about those: ``cache="f16", flash_attn=True`` is llama.cpp's
    CPU default, the setting jllama reproduces bit for bit."""
    from llamacpp_oracle import llama_cpp_module

    llama_cpp = llama_cpp_module()
    # one thread: below 512 keys no ggml op's bits depend on the thread count, and two threads
    # spin at every op's barrier while the other pytest worker holds a core (2-4x slower)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                           n_threads=1 if n_ctx < 512 else 2, seed=0, type_k=KV_TYPES[cache], type_v=KV_TYPES[cache],
                           flash_attn=flash_attn)


def oracle_logits(ref, ids: list[int]) -> np.ndarray:
    ref.reset()
    ref.eval(ids)
    return np.array(ref.scores[: len(ids)], np.float32)


def oracle_greedy(ref, ids: list[int], n: int) -> list[int]:
    ref.reset()
    out = []
    for tok in ref.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(tok)
        if len(out) == n:
            break
    return out


def jllama_engine(path: Path, build=None, ctx: int = 256, cache: str = "f32",
                  flash_attn: bool = False):
    """Engine over a GGUF; ``build(spec, weights, gguf)`` overrides the arch dispatch."""
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model, load_weights
    from jllama.models.spec import spec_from_gguf
    from jllama.numerics import Numerics

    g = read_gguf(path)
    if build is None:
        spec, model = build_model(g)
    else:
        spec = spec_from_gguf(g)
        model = build(spec, load_weights(g), g)
    num = Numerics(cache_type_k=cache, cache_type_v=cache, flash_attn=flash_attn)  # as the oracle
    return Engine(spec, model, ctx_size=ctx, numerics=num)


def compare(path: Path, build=None, tol: float = 1e-3, n_greedy: int = 32, cache: str = "f32",
            flash_attn: bool = False) -> dict:
    """Logits on a 41-token sequence and 32 greedy tokens, jllama vs llama.cpp (``tol=0``: bit
    for bit)."""
    from jllama.engine.sampling import SamplingParams

    ref = oracle(path, cache=cache, flash_attn=flash_attn)
    eng = jllama_engine(path, build, cache=cache, flash_attn=flash_attn)
    ids = prompt_ids(eng.spec.n_vocab)
    r = oracle_logits(ref, ids)
    o = eng.logits(ids)
    diff = float(np.abs(o - r).max())
    top1 = float((o.argmax(-1) == r.argmax(-1)).mean())
    want = oracle_greedy(ref, ids[:8], n_greedy)
    got = list(eng.generate(ids[:8], SamplingParams.greedy(), max_tokens=n_greedy))
    print(f"\n{path.name}: max|Δlogit| = {diff:.2e} (logit range {np.abs(r).max():.1f}), "
          f"top-1 agreement {top1:.3f}, greedy {n_greedy} identical: {want == got}")
    assert diff <= tol if tol == 0 else diff < tol
    assert top1 >= (1.0 if tol < 0.01 else 0.95)
    assert got == want
    return {"diff": diff, "top1": top1}
