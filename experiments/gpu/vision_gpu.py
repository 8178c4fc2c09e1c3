"""The vision encoder on an accelerator: its quantized matrices in the Pallas layout, embeddings
against libmtmd's (issue #20 item 4).

    python experiments/gpu/vision_gpu.py --make-ref    # here, with the oracle: writes the reference
    python experiments/gpu/vision_gpu.py               # on the device machine

The tiny gemma3 mmproj (tests/visionmodels.py, Q8_0 encoder matrices) is written the same way on
both machines (seeded numpy), so only libmtmd's embeddings of one image travel with the tree
(experiments/gpu/vision_ref.npz, from ``mtmd_encode_chunk`` on the CPU). On the device the
script checks that the encoder's Q8_0 weights were loaded in the Pallas planes layout (the text
model's loader), encodes the image, and prints the relative max difference to libmtmd's
embeddings (not bit-exact off the CPU: XLA/Pallas sum in other orders) and the encode time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
REF = Path(__file__).resolve().parent / "vision_ref.npz"
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def files(d: Path) -> tuple[Path, Path, np.ndarray]:
    import gguf
    import visionmodels as V

    V.write_text_model(d / "text.gguf")
    V.write_mmproj(d / "mmproj.gguf", block_type=gguf.GGMLQuantizationType.Q8_0, seed=11)
    return d / "text.gguf", d / "mmproj.gguf", V.gradient_image((40, 70), seed=3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make-ref", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp())
    text, mm, img = files(d)
    if a.make_ref:
        from mtmd_oracle import Mtmd

        o = Mtmd(text, mm)
        try:
            chunk = [c for c in o.tokenize("<__media__>", [img]) if isinstance(c, tuple)][0]
            ref = o.encode(chunk)[0]
        finally:
            o.close()
        np.savez_compressed(REF, embd=ref)
        print(f"wrote {REF}: {ref.shape}")
        return 0
    import jax

    from jllama.models.clip import load_vision

    ref = np.load(REF)["embd"]
    vision = load_vision(mm)
    layout = vision.encoder.w["v.blk.0.attn_q.weight"].layout
    t0 = time.perf_counter()
    ours = vision.encode(img)
    first = time.perf_counter() - t0
    times = []
    for _ in range(a.reps):
        vision._cache.clear()  # time the encoder, not the embedding cache
        t0 = time.perf_counter()
        vision.encode(img)
        times.append(time.perf_counter() - t0)
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); Q8_0 weights in "
          f"layout '{layout}'; embeddings {ours.shape}, max |d| / max |libmtmd| = {err:.2e}; "
          f"encode first {first * 1e3:.0f} ms (compile), then median "
          f"{sorted(times)[len(times) // 2] * 1e3:.1f} ms")
    ok = ours.shape == ref.shape and err < 2e-2
    ok = ok and (layout == "pallas" or jax.default_backend() == "cpu")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
