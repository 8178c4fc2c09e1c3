"""Cost of the grammar-constrained pick on a real vocabulary (SmolLM2, 49,152 tokens).

For a JSON document tokenized by the model's tokenizer, every step checks the token that comes
next (the usual case: the draw is valid) and, as the worst case of a rejected draw, 256 other
candidates (the scan). Compared: the GBNF matcher with llama.cpp's JSON-object grammar, and the
hand-written byte-level JSON recognizer it replaced for ``response_format``.

    PYTHONPATH=. python experiments/grammar_speed.py
"""

from __future__ import annotations

import json
import time

import numpy as np

from jllama.registry import fetch
from jllama.server.grammar import GrammarConstraint, JsonConstraint, compile_grammar
from jllama.server.json_schema import schema_to_grammar
from jllama.tokenizer import Tokenizer

DOC = json.dumps({"name": "Bob", "age": 30, "tags": ["a", "b", "c"],
                  "address": {"street": "1 Main St", "zip": "12345"}, "ok": True,
                  "score": -12.5e3, "notes": None}, indent=1)


def main() -> None:
    from jllama.gguf.reader import read_gguf

    tok = Tokenizer.from_gguf(read_gguf(str(fetch("smollm2-135m-instruct"))))
    eog = frozenset(i for i in range(tok.n_vocab) if tok.is_eog(i))
    table = [b"" if i in eog else bytes(tok.token_to_piece(i, special=False))
             for i in range(tok.n_vocab)]
    ids = tok.encode(DOC, add_special=False)
    rng = np.random.default_rng(0)
    scan = rng.choice(tok.n_vocab, size=256, replace=False)
    g = compile_grammar(schema_to_grammar({"type": "object"}))
    for name, make in (("gbnf", lambda: GrammarConstraint(table, eog, g)),
                       ("json recognizer", lambda: JsonConstraint(table, eog))):
        for rnd in ("cold", "warm"):
            c = make()
            t_ok = t_scan = 0.0
            for t in ids:
                t0 = time.perf_counter()
                assert c.accepts(t) is not None
                t1 = time.perf_counter()
                for s in scan:
                    c.accepts(int(s))
                t2 = time.perf_counter()
                c.advance(t)
                t_ok += t1 - t0
                t_scan += t2 - t1
            print(f"{name:16s} {rnd}: {len(ids)} tokens, valid-draw check "
                  f"{t_ok / len(ids) * 1e6:7.1f} us/token, 256-candidate scan "
                  f"{t_scan / len(ids) * 1e3:6.2f} ms/token")


if __name__ == "__main__":
    main()
