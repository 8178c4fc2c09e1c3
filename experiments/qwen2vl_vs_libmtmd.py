"""jllama's Qwen2-VL / Qwen2.5-VL path (vision tower + qwen2vl_merger / qwen2.5vl_merger,
qwen2vl text model with M-RoPE) against libmtmd (llama-cpp-python 0.3.36) in one run.

    PYTHONPATH=. python experiments/qwen2vl_vs_libmtmd.py [--dim 64 --depth 3 --heads 4
        --reps 3 --tokens 16] [--qwen25]

Writes a tiny random Qwen2VLForConditionalGeneration (``--qwen25``: Qwen2_5_VL, 4 layers,
window attention in layers 0 and 2) vision tower in HF's layout, converts it
with llama.cpp's own ``convert_hf_to_gguf.py --mmproj`` (f16 and f32), checks that
tests/visionmodels.py's direct writer gives the same file (tensors and keys), writes the tiny
Q8_0 qwen2vl text model, then per image shape: the token grid, image embeddings of both
(max |d|), encode time (median of ``--reps`` after one warm-up; libmtmd: ``mtmd_encode_chunk``,
jllama: preprocessing + the jitted encoder, one compile per encoder input size), the logits
after a prompt with the image (max |d|) and greedy tokens, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def _same_file(a_path, b_path) -> bool:
    from jllama.gguf.reader import read_gguf

    a, b = read_gguf(a_path), read_gguf(b_path)
    ka = {k: v for k, v in a.metadata.items() if not k.startswith("general.")}
    kb = {k: v for k, v in b.metadata.items() if not k.startswith("general.")}
    return ka == kb and list(a.tensors) == list(b.tensors) and all(
        a.tensors[n].qtype == b.tensors[n].qtype and a.tensors[n].shape == b.tensors[n].shape
        and bytes(a.tensors[n].data) == bytes(b.tensors[n].data) for n in a.tensors)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--qwen25", action="store_true")
    a = ap.parse_args()

    import convert_reference as R
    import gguf
    import visionmodels as V
    from mtmd_oracle import Mtmd

    from jllama.engine import multimodal
    from jllama.engine.engine import Engine
    from jllama.engine.sampling import SamplingParams
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.models.clip import load_vision
    from jllama.numerics import Numerics
    from jllama.tokenizer import Tokenizer

    d = Path(tempfile.mkdtemp())
    if a.qwen25:
        cfg = V.qwen25vl_config()
        V.write_qwen25vl_checkpoint(d / "hf", cfg)
        write = V.write_qwen25vl_mmproj
    else:
        cfg = V.qwen2vl_config(embed_dim=a.dim, depth=a.depth, num_heads=a.heads)
        V.write_qwen2vl_checkpoint(d / "hf", cfg)
        write = V.write_qwen2vl_mmproj
    R.run_reference([(d / "hf", d / "mmproj-f16.gguf", "f16", "--mmproj"),
                     (d / "hf", d / "mmproj-f32.gguf", "f32", "--mmproj")])
    for kind, dt in (("f16", np.float16), ("f32", np.float32)):
        write(d / f"direct-{kind}.gguf", dtype=dt, cfg=cfg)
        print(f"direct writer == convert_hf_to_gguf.py --mmproj ({kind}):",
              _same_file(d / f"direct-{kind}.gguf", d / f"mmproj-{kind}.gguf"))
    V.write_qwen2vl_text_model(d / "text.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    g = read_gguf(d / "text.gguf")
    spec, model = build_model(g)
    eng = Engine(spec, model, ctx_size=1024,
                 numerics=Numerics(cache_type_k="f16", cache_type_v="f16"))
    tok = Tokenizer.from_gguf(g)
    prompt = ("<|im_start|>user\n<__media__>What is in this picture?<|im_end|>\n"
              "<|im_start|>assistant\n")
    rng = np.random.default_rng(0)
    for kind in ("f16", "f32"):
        oracle = Mtmd(d / "text.gguf", d / f"mmproj-{kind}.gguf", n_ctx=1024)
        vision = load_vision(d / f"mmproj-{kind}.gguf")
        s = vision.spec
        print(f"mmproj {kind} {s.projector}: d {s.n_embd}, {s.n_layer} layers, {s.n_head} "
              f"heads, patch 14, window pattern {s.n_wa_pattern}")
        for shape in [(56, 84), (150, 130), (224, 308), (97, 61)]:
            img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            ours_ms, ref_ms = [], []
            for _ in range(a.reps + 1):
                chunk = [c for c in oracle.tokenize("<__media__>", [img])
                         if isinstance(c, tuple)][0]
                ref, ms = oracle.encode(chunk)
                ref_ms.append(ms)
                t0 = time.perf_counter()
                ours = vision.encode(img)
                ours_ms.append((time.perf_counter() - t0) * 1e3)
            nx, ny = vision.token_grid(*shape)
            diff = float(np.abs(ours - ref).max()) if ours.shape == ref.shape else float("nan")
            ref_logits = oracle.eval_chunks(prompt, [img])
            chs = multimodal.chunks(tok, vision, prompt, [img])
            eng.reset(0)
            for c in chs:
                logits = (eng.prefill(c, 0) if isinstance(c, list)
                          else multimodal.prefill_image(eng, c, 0))
            ldiff = float(np.abs(np.asarray(logits) - ref_logits).max())
            ref_toks = oracle.greedy(prompt, [img], a.tokens)
            got = list(multimodal.generate(eng, chs, SamplingParams.greedy(), a.tokens,
                                           {tok.vocab.eos_id}))
            agree = next((i for i, (x, y) in enumerate(zip(got, ref_toks)) if x != y),
                         min(len(got), len(ref_toks)))
            print(f"  image {shape[0]}x{shape[1]} -> {nx}x{ny} tokens: embd max|d| {diff:.3g}"
                  f"  encode ms jllama {statistics.median(ours_ms[1:]):.1f} (first "
                  f"{ours_ms[0]:.0f}) | libmtmd {statistics.median(ref_ms[1:]):.1f}  logits "
                  f"max|d| {ldiff:.3g}  greedy identical {agree}/{len(ref_toks)}"
                  f"{' (all)' if got == ref_toks else ''}")
        oracle.close()


if __name__ == "__main__":
    main()
