"""End-to-end prompt and generation speed on a GPU: Pallas kernels against the XLA reference path.

The real SmolLM2 / Gemma files are larger than what travels to a lent GPU machine, so this writes
a GGUF with the real model's shapes (SmolLM2-135M: 30 layers, n_embd 576, FFN 1536, 9/3 heads,
vocab 49152) and random quantized blocks (random codes, small finite f16 scales): speed depends on
shapes and types, not on the values. Each model is run twice in one process: with the kernels
chosen at trace time (Pallas on GPU/TPU) and with the reference path forced (dequantize the whole
weight in XLA, then a dot), printing pp/tg tokens/s and the ratio.

    python experiments/gpu/e2e_gpu.py --types Q4_0,Q4_1,Q8_0 [--layers 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2],
              "Q6_K": [208]}  # fmt: skip


def random_blocks(qname: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qname]]
    nb = cols // bs
    raw = rng.integers(0, 256, (rows, nb, ts), dtype=np.uint8)
    for off in F16_FIELDS[qname]:
        f = rng.uniform(0.0005, 0.002, (rows, nb)).astype(np.float16)
        raw[..., off : off + 2] = f[..., None].view(np.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, nb * ts)


def write_model(path: Path, qname: str, n_layer: int, n_embd: int, n_ff: int, n_head: int,
                n_kv: int, n_vocab: int, seed: int = 0) -> Path:
    from tinymodels import dense_hparams, gpt2_tokenizer

    rng = np.random.default_rng(seed)
    hd = n_embd // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random-smollm2-shape")
    for k, v in dense_hparams(n_layer, n_embd, n_ff, n_head, n_kv, hd).items():
        key = f"llama.{k}"
        if isinstance(v, int):
            w.add_uint32(key, v)
        else:
            w.add_float32(key, v)
    w.add_uint32("llama.rope.dimension_count", hd)
    toks, types, merges, bos, eos = gpt2_tokenizer()
    pad = [f"<|unused{i}|>" for i in range(n_vocab - len(toks))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(toks + pad)
    w.add_token_types(types + [int(gguf.TokenType.CONTROL)] * len(pad))
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    qt = gguf.GGMLQuantizationType[qname]

    def add_q(name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, random_blocks(qname, rows, cols, rng), raw_dtype=qt)

    def add_norm(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    add_q("token_embd.weight", n_vocab, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        add_norm(p + "attn_norm.weight", n_embd)
        add_q(p + "attn_q.weight", n_embd, n_embd)
        add_q(p + "attn_k.weight", n_kv * hd, n_embd)
        add_q(p + "attn_v.weight", n_kv * hd, n_embd)
        add_q(p + "attn_output.weight", n_embd, n_embd)
        add_norm(p + "ffn_norm.weight", n_embd)
        add_q(p + "ffn_gate.weight", n_ff, n_embd)
        add_q(p + "ffn_up.weight", n_ff, n_embd)
        add_q(p + "ffn_down.weight", n_embd, n_ff)
    add_norm("output_norm.weight", n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def measure(path: Path, pp: int, tg: int, reps: int) -> tuple[float, float, float, float]:
    """pp t/s, tg t/s with DECODE_CHUNK steps per dispatch (the default), tg t/s one step per
    dispatch (the host round trip per token that the device loop removes), load s."""
    from jllama.api import Llama
    from jllama.eval.bench import jllama_pp, jllama_tg, time_reps

    t0 = time.perf_counter()
    llm = Llama(str(path), ctx_size=pp + tg + 64, compile_cache=False)
    load = time.perf_counter() - t0
    tp = time_reps(jllama_pp(llm, pp), reps)
    tt = time_reps(jllama_tg(llm, tg), reps)
    llm.engine.loop_decode = False
    ts = time_reps(jllama_tg(llm, tg), reps)
    llm.engine.loop_decode = True
    return (pp / statistics.median(tp), tg / statistics.median(tt), tg / statistics.median(ts),
            load)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_0,Q4_1,Q8_0")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--embd", type=int, default=576)
    ap.add_argument("--ff", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    args = ap.parse_args()

    import jax

    from jllama.kernels import dispatch

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()}")
    print(f"| type | path | pp{args.p} t/s | tg{args.n} t/s | tg{args.n} t/s, a step per dispatch "
          "| load s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    # the kernel each matmul traces to (dispatch.qmatmul asks select_kernel at trace time);
    # "xla-reference" forces dequantize + dot for every type
    original = dispatch.select_kernel
    forced = lambda qtype, backend: dispatch.reference_qmatmul  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        for qname in args.types.split(","):
            path = write_model(Path(d) / f"{qname}.gguf", qname, args.layers, args.embd,
                               args.ff, args.heads, args.kv_heads, args.vocab)
            res = {}
            for label, kern in (("pallas", original), ("xla-reference", forced)):
                dispatch.select_kernel = kern
                res[label] = measure(path, args.p, args.n, args.r)
                pp, tg, tg1, load = res[label]
                print(f"| {qname} | {label} | {pp:.1f} | {tg:.1f} | {tg1:.1f} | {load:.1f} |",
                      flush=True)
            dispatch.select_kernel = original
            a, b = res["pallas"], res["xla-reference"]
            print(f"| {qname} | ratio | {a[0] / b[0]:.2f}x | {a[1] / b[1]:.2f}x | "
                  f"{a[2] / b[2]:.2f}x | |", flush=True)


if __name__ == "__main__":
    main()
