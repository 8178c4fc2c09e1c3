"""Speculative decoding: tokens/s plain vs with a draft model vs with n-gram prompt lookup.

    python experiments/bench_speculative.py [--tokens 128] [--draft-n 16] [--out FILE]

Target SmolLM2-135M-Instruct requantized to Q8_0 on load, draft the same model in Q4_0 (same
vocabulary, the closest "well-matched" draft available offline), greedy, on a few prompts
including repetitive / code-like ones where prompt lookup shines. Warm-up runs compile every
shape first, so the figures are steady-state generation speed (prompt time excluded). Also
measures what bounds the speed-up on this machine: the cost of one verify forward of k+1 tokens
against one decode step of the target and of the draft.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

CODE = '''class Vector:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __add__(self, other):
        return Vector(self.x + other.x, self.y + other.y)

    def __sub__(self, other):
        return Vector(self.x - other.x, self.y - other.y)

    def __mul__(self, other):
        return Vector(self.x * other.x, self.y * other.y)

    def __truediv__(self, other):
'''
PASSAGE = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
           "France. It is named after the engineer Gustave Eiffel, whose company designed and "
           "built the tower from 1887 to 1889. Locally nicknamed La dame de fer, it was "
           "constructed as the centrepiece of the 1889 World's Fair.")
PROMPTS = {
    "code (continue a class)": ("raw", CODE),
    "repeat a passage (chat)": ("chat", "Repeat this text word for word:\n\n" + PASSAGE),
    "list continuation": ("raw", "Colors: red, green, blue, red, green, blue, red,"),
    "open question (chat)": ("chat", "Why is the sky blue? Answer in a paragraph."),
}


def _ids(llm, kind: str, text: str) -> list[int]:
    if kind == "chat":
        text = llm.apply_chat_template([{"role": "user", "content": text}])
        return llm.tokenizer.encode(text, add_special=True, parse_special=True)
    return llm.tokenize(text)


def _run(gen, eng, ids, n, eog, g):
    eng.reset()
    out = list(gen(ids, g, n, eog))
    t = eng.timings
    return out, t.gen_tokens / t.gen_s if t.gen_s else 0.0, dict(t.extra)


def _costs(target, draft, reps: int = 20) -> dict:
    """Seconds per target decode step, per target verify forward of 1+k tokens, per draft step."""
    from jllama.engine.speculative import _Decoder, verify_forward

    out = {}
    for name, llm in (("target", target), ("draft", draft)):
        eng = llm.engine
        eng.reset()
        eng.prefill(list(range(100, 164)), 0)
        dec = _Decoder(eng)
        dec.step(0, 5)
        eng.rewind(0, 64)
        t0 = time.perf_counter()
        for _ in range(reps):
            dec.step(0, 5)
            eng.rewind(0, 64)
        out[f"{name}_step"] = (time.perf_counter() - t0) / reps
    eng = target.engine
    for k in (1, 3, 7, 15):  # verify blocks of 2 / 4 / 8 / 16 tokens (speculative's buckets)
        verify_forward(eng, 0, list(range(200, 201 + k)))
        eng.rewind(0, 64)
        t0 = time.perf_counter()
        for _ in range(reps):
            verify_forward(eng, 0, list(range(200, 201 + k)))
            eng.rewind(0, 64)
        out[f"verify_{k + 1}"] = (time.perf_counter() - t0) / reps
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--draft-n", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "speculative.md"))
    args = ap.parse_args()

    import jax

    from jllama.api import Llama
    from jllama.config import DraftConfig
    from jllama.engine.sampling import SamplingParams
    from jllama.engine.speculative import Speculative

    t0 = time.perf_counter()
    target = Llama(args.model, ctx_size=1024, quant={"base": "q8_0"})
    draft = Llama(args.model, ctx_size=1024, quant={"base": "q4_0"})
    print(f"loaded target Q8_0 + draft Q4_0 in {time.perf_counter() - t0:.1f} s")
    eng = target.engine
    eog = target.tokenizer.eog_ids
    g = SamplingParams.greedy()
    modes = {
        "draft model Q4_0": Speculative(target, DraftConfig(kind="model", n=args.draft_n), draft),
        "n-gram lookup": Speculative(target, DraftConfig(kind="ngram", n=args.draft_n)),
        "n-gram, draft-min 4": Speculative(target, DraftConfig(kind="ngram", n=args.draft_n,
                                                               n_min=4)),
    }
    costs = _costs(target, draft)
    print({k: f"{v * 1e3:.1f} ms" for k, v in costs.items()})
    rows = []
    for name, (kind, text) in PROMPTS.items():
        ids = _ids(target, kind, text)
        if not rows:  # warm-up: compile the shapes every run touches (kv bucket, verify chunk)
            _run(eng.generate, eng, ids, args.tokens, eog, g)
            for sp in modes.values():
                _run(sp.generate, eng, ids, args.tokens, eog, g)
        ref, tps0, _ = _run(eng.generate, eng, ids, args.tokens, eog, g)
        for mode, sp in modes.items():
            out, tps, ex = _run(sp.generate, eng, ids, args.tokens, eog, g)
            same = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), None)
            ident = "yes" if same is None and len(out) == len(ref) else None
            if ident is None:  # where they part, the target's own top-2 margin (a near-tie?)
                at = min(len(out), len(ref)) if same is None else same
                lg = eng.logits(ids + ref[:at])[-1]
                eos = max(eog, key=lambda e: lg[e])  # the stop token that ended a shorter one
                a_tok = ref[at] if at < len(ref) else eos
                b_tok = out[at] if at < len(out) else eos
                ident = f"first {at}, then margin {abs(lg[a_tok] - lg[b_tok]):.2f}"
            rows.append(dict(prompt=name, mode=mode, tokens=len(out), plain=tps0, spec=tps,
                             acc=ex["draft_accepted"], prop=ex["draft_proposed"],
                             rounds=ex["rounds"], steps=ex["plain_steps"],
                             draft_s=ex["draft_s"], verify_s=ex["verify_s"],
                             identical=ident))
            r = rows[-1]
            print(f"{name:26s} {mode:17s} plain {tps0:6.1f} t/s  spec {tps:6.1f} t/s  "
                  f"x{tps / tps0:4.2f}  accepted {r['acc']}/{r['prop']}  rounds {r['rounds']} "
                  f"plain steps {r['steps']}  identical: {r['identical']}")

    lines = [
        "# Speculative decoding (SmolLM2-135M-Instruct Q8_0 target)",
        "",
        f"`python experiments/bench_speculative.py --tokens {args.tokens} --draft-n "
        f"{args.draft_n}` on {jax.default_backend()} ({platform.processor() or platform.machine()},"
        " 2 cores shared with other jobs), greedy, steady state (compiled shapes warmed up).",
        "Draft model: the same SmolLM2 requantized to Q4_0 on load; n-gram: prompt lookup "
        "(last 3 tokens matched in prompt + output). llama.cpp's defaults: up to 16 drafted "
        "tokens (trimmed to 15 so [last + drafts] fills one 16-token forward; shorter blocks are "
        "padded to 2 / 4 / 8), p_min 0.75.",
        "",
        "| prompt | draft | plain t/s | speculative t/s | speed-up | accepted / drafted | "
        "target forwards (verify + plain) | same tokens as plain |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rate = f"{r['acc']}/{r['prop']} ({r['acc'] / r['prop']:.0%})" if r["prop"] else "0/0"
        lines.append(f"| {r['prompt']} | {r['mode']} | {r['plain']:.1f} | {r['spec']:.1f} | "
                     f"{r['spec'] / r['plain']:.2f}x | {rate} | {r['rounds']} + {r['steps']} "
                     f"for {r['tokens']} tokens | {r['identical']} |")
    lines += [
        "",
        "Cost of the pieces (ms per call, same run):",
        "",
        "| target decode step | draft decode step | target verify 2 | verify 4 | verify 8 | "
        "verify 16 |",
        "|---:|---:|---:|---:|---:|---:|",
        "| " + " | ".join(f"{costs[k] * 1e3:.1f} ({costs[k] / costs['target_step']:.1f} steps)"
                         for k in ("target_step", "draft_step", "verify_2", "verify_4",
                                   "verify_8", "verify_16")) + " |",
        "",
    ]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
