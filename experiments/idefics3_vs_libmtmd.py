"""jllama's SmolVLM / Idefics3 vision path against libmtmd (llama-cpp-python 0.3.36), one run.

    PYTHONPATH=. python experiments/idefics3_vs_libmtmd.py [--size 512 --patch 16 --dim 768
        --layers 12 --heads 12 --merge 4 --edge 1024 --tokens 16]

Writes a random idefics3 mmproj in convert_hf_to_gguf.py's layout (tests/visionmodels.py;
defaults: SmolVLM-256M's vision tower, with a longest edge of 1024 instead of its 2048 to keep
the run short) projecting to the tiny SmolVLM-vocabulary llama text model, then per image
shape: the chunk layout (token ids) of both, every image chunk's embeddings (max |d| over
all tiles and the global image), the encode time of the whole image (libmtmd: the sum of
``mtmd_encode_chunk`` over its chunks; jllama: preprocessing + every tile's jitted encode,
after one warm-up image for the compile), and greedy tokens after the image.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--merge", type=int, default=4)
    ap.add_argument("--edge", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=16)
    a = ap.parse_args()

    import visionmodels as V
    from mtmd_oracle import Mtmd

    from jllama.api import Llama
    from jllama.engine import multimodal
    from jllama.engine.sampling import SamplingParams

    d = Path(tempfile.mkdtemp())
    V.write_smolvlm_text_model(d / "text.gguf")
    V.write_idefics3_mmproj(d / "mmproj.gguf", image_size=a.size, patch=a.patch, d=a.dim,
                            n_layer=a.layers, n_head=a.heads, scale_factor=a.merge,
                            longest_edge=a.edge)
    oracle = Mtmd(d / "text.gguf", d / "mmproj.gguf", n_ctx=1024)
    llm = Llama(str(d / "text.gguf"), ctx_size=1024, mmproj=str(d / "mmproj.gguf"))
    vision, tok = llm.vision, llm.tokenizer
    s = vision.spec
    print(f"mmproj: idefics3, tile {s.image_size}, patch {s.patch_size}, "
          f"{s.n_patches_side ** 2} patches, d {s.n_embd}, {s.n_layer} layers, merge "
          f"{s.n_merge}: {s.n_image_tokens} tokens per tile, longest edge {s.longest_edge}")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    vision.encode_idefics3(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    print(f"jllama warm-up (compile + 5 encodes): {time.perf_counter() - t0:.1f} s")
    prompt = "<|im_start|>User:<__media__>What is this?<end_of_utterance>\nAssistant:"
    for shape in [(600, 800), (300, 1000)]:
        img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        ref = oracle.tokenize(prompt, [img])
        ref_embd, ref_ms = [], 0.0
        for c in ref:
            if isinstance(c, tuple):
                e, ms = oracle.encode(c)
                ref_embd.append(e)
                ref_ms += ms
        t0 = time.perf_counter()
        chs = multimodal.chunks(tok, vision, prompt, [img])
        ours_ms = (time.perf_counter() - t0) * 1e3
        same_layout = ([c if isinstance(c, list) else c.embd.shape[0] for c in chs]
                       == [c if isinstance(c, list) else c[0] for c in ref])
        ours_embd = [c.embd for c in chs if not isinstance(c, list)]
        diff = max(float(np.abs(x - y).max()) for x, y in zip(ours_embd, ref_embd, strict=True))
        ref_toks = oracle.greedy(prompt, [img], a.tokens)
        got = llm.complete(prompt, a.tokens, SamplingParams.greedy(), images=[img]).tokens
        agree = next((i for i, (x, y) in enumerate(zip(got, ref_toks)) if x != y),
                     min(len(got), len(ref_toks)))
        print(f"image {shape[0]}x{shape[1]}: {len(ours_embd)} image chunks, layout identical "
              f"{same_layout}, max|d| {diff:.3g}, encode ms jllama {ours_ms:.0f} | libmtmd "
              f"{ref_ms:.0f}, greedy tokens identical {agree}/{len(ref_toks)}"
              f"{' (all)' if got == ref_toks else ''}")
    oracle.close()


if __name__ == "__main__":
    main()
