"""jllama's LLaVA-1.6 path against libmtmd (llama-cpp-python 0.3.36) in one run.

    PYTHONPATH=. python experiments/llava16_vs_libmtmd.py [--size 336 --patch 14 --dim 256
        --layers 4 --heads 4 --reps 2 --tokens 16]

Writes a random LLaVA-1.6 mmproj in the legacy converter's layout (tests/visionmodels.py:
llava-1.6's own pinpoints scaled to ``--size`` tiles, feature_layer, f16 matrices) and the
tiny llama text model, then for image shapes taking different pinpoint grids: the chunk
layout, every chunk's embeddings (max |d| over all chunks), whole-image encode time (median of
``--reps`` after one warm-up; libmtmd: ``mtmd_encode_chunk`` per chunk, jllama:
``Vision.encode_chunks``), and greedy tokens after the image (``mtmd_helper_eval_chunks``),
interleaved.
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
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
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

    t = a.size
    pins = ((t, 2 * t), (2 * t, t), (2 * t, 2 * t), (3 * t, t), (t, 3 * t))  # llava-1.6's
    d = Path(tempfile.mkdtemp())
    V.write_llama_text_model(d / "text.gguf")
    V.write_llava16_mmproj(d / "mmproj.gguf", image_size=t, patch=a.patch, d=a.dim,
                           n_hf_layer=a.layers + 1, n_head=a.heads, pinpoints=pins)
    n_ctx = 6 * (t // a.patch) ** 2 + 64
    oracle = Mtmd(d / "text.gguf", d / "mmproj.gguf", n_ctx=n_ctx)
    vision = load_vision(d / "mmproj.gguf")
    g = read_gguf(d / "text.gguf")
    spec, model = build_model(g)
    eng = Engine(spec, model, ctx_size=n_ctx,
                 numerics=Numerics(cache_type_k="f16", cache_type_v="f16"))
    tok = Tokenizer.from_gguf(g)
    s = vision.spec
    print(f"mmproj: mlp + pinpoints {pins}, tile {t}, patch {s.patch_size}, "
          f"{s.n_image_tokens} tokens a chunk, d {s.n_embd}, {s.n_layer_run} layers run")
    rng = np.random.default_rng(0)
    prompt = "USER: <__media__>\nWhat is shown? ASSISTANT:"
    for shape in [(t - 40, t - 20), (int(1.5 * t), int(1.2 * t)), (t // 2, int(2.5 * t))]:
        img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        ours_ms, ref_ms = [], []
        for _ in range(a.reps + 1):
            chunks = [c for c in oracle.tokenize("<__media__>", [img]) if isinstance(c, tuple)]
            refs, ms = zip(*[oracle.encode(c) for c in chunks])
            ref_ms.append(sum(ms))
            t0 = time.perf_counter()
            ours = vision.encode_chunks(img)
            ours_ms.append((time.perf_counter() - t0) * 1e3)
        diff = max(float(np.abs(x - y).max()) for x, y in zip(ours, refs))
        ref_toks = oracle.greedy(prompt, [img], a.tokens)
        chs = multimodal.chunks(tok, vision, prompt, [img])
        layout = [c if isinstance(c, list) else c[0] for c in oracle.tokenize(prompt, [img])]
        same_layout = layout == [c if isinstance(c, list) else c.embd.shape[0] for c in chs]
        got = list(multimodal.generate(eng, chs, SamplingParams.greedy(), a.tokens,
                                       {tok.vocab.eos_id}))
        agree = next((i for i, (x, y) in enumerate(zip(got, ref_toks)) if x != y),
                     min(len(got), len(ref_toks)))
        print(f"image {shape[0]}x{shape[1]}: {len(ours)} chunks ({len(refs)} libmtmd, layout "
              f"{'same' if same_layout else 'DIFFERENT'}) max|d| {diff:.3g}  encode ms jllama "
              f"{statistics.median(ours_ms[1:]):.0f} (first {ours_ms[0]:.0f}) | libmtmd "
              f"{statistics.median(ref_ms[1:]):.0f}  greedy tokens identical "
              f"{agree}/{len(ref_toks)}{' (all)' if got == ref_toks else ''}")
    oracle.close()


if __name__ == "__main__":
    main()
