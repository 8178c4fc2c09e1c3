"""jllama's vision encoder against libmtmd (llama-cpp-python 0.3.36) in one run.

    PYTHONPATH=. python experiments/vision_vs_libmtmd.py [--size 224 --patch 14 --dim 384
        --layers 6 --heads 6 --merge 4 --reps 3 --tokens 16]

Writes a random gemma3 mmproj in llama.cpp's layout (tests/visionmodels.py, f16 matrices as
convert_hf_to_gguf.py writes them) and the tiny gemma3 text model, then for three image
shapes: image embeddings of both (max |d|), encode time (median of ``--reps`` after one
warm-up; libmtmd: ``mtmd_encode_chunk``, jllama: preprocessing + the jitted encoder), and
greedy tokens after the image (libmtmd: ``mtmd_helper_eval_chunks``) and their speed
(decode steps per second after the first token, second of two rounds: jllama's first
compiles), interleaved.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--merge", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    a = ap.parse_args()

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
    V.write_text_model(d / "text.gguf")
    V.write_mmproj(d / "mmproj.gguf", image_size=a.size, patch=a.patch, d=a.dim,
                   n_layer=a.layers, n_head=a.heads, n_merge=a.merge)
    oracle = Mtmd(d / "text.gguf", d / "mmproj.gguf", n_ctx=512)
    vision = load_vision(d / "mmproj.gguf")
    g = read_gguf(d / "text.gguf")
    spec, model = build_model(g)
    eng = Engine(spec, model, ctx_size=512,
                 numerics=Numerics(cache_type_k="f16", cache_type_v="f16"))
    tok = Tokenizer.from_gguf(g)
    s = vision.spec
    print(f"mmproj: gemma3, image {s.image_size}, patch {s.patch_size}, "
          f"{s.n_patches_side ** 2} patches, d {s.n_embd}, {s.n_layer} layers, "
          f"{s.n_image_tokens} image tokens")
    rng = np.random.default_rng(0)
    prompt = "<start_of_turn>user\n<__media__>What is this?<end_of_turn>\n<start_of_turn>model\n"
    for shape in [(a.size, a.size), (300, 400), (97, 61)]:
        img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        ours_ms, ref_ms = [], []
        for _ in range(a.reps + 1):
            chunk = [c for c in oracle.tokenize("<__media__>", [img]) if isinstance(c, tuple)][0]
            ref, ms = oracle.encode(chunk)
            ref_ms.append(ms)
            t0 = time.perf_counter()
            ours = vision.encode(img)
            ours_ms.append((time.perf_counter() - t0) * 1e3)
        diff = float(np.abs(ours - ref).max())
        ref_tps, our_tps = [], []
        for _ in range(2):  # the first round compiles jllama's decode step: the second counts
            ref_toks = oracle.greedy(prompt, [img], a.tokens)
            ref_tps.append(oracle.n_decoded / oracle.decode_s)
            chs = multimodal.chunks(tok, vision, prompt, [img])
            got, t_first = [], 0.0
            for t in multimodal.generate(eng, chs, SamplingParams.greedy(), a.tokens,
                                         {tok.vocab.eos_id}):
                got.append(t)
                if len(got) == 1:
                    t_first = time.perf_counter()
            # decode steps per second after the first token (the prompt's own logits): the
            # same count libmtmd's loop makes, one llama_decode per token
            our_tps.append((len(got) - 1) / max(time.perf_counter() - t_first, 1e-9))
        agree = next((i for i, (x, y) in enumerate(zip(got, ref_toks)) if x != y),
                     min(len(got), len(ref_toks)))
        print(f"image {shape[0]}x{shape[1]}: max|d| {diff:.3g}  encode ms jllama "
              f"{statistics.median(ours_ms[1:]):.1f} (first {ours_ms[0]:.0f}) | libmtmd "
              f"{statistics.median(ref_ms[1:]):.1f}  greedy tokens identical "
              f"{agree}/{len(ref_toks)}{' (all)' if got == ref_toks else ''}  "
              f"tokens/s after the image jllama {our_tps[-1]:.1f} | libmtmd {ref_tps[-1]:.1f}")
    oracle.close()


if __name__ == "__main__":
    main()
