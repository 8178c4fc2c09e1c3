"""llama.cpp's own grammar engine as an oracle: does a string parse under a GBNF grammar?

A vocabulary-only load of a tiny byte-level GGUF (tests/tinymodels.py: token ``b`` is byte
``b``) lets llama.cpp's grammar sampler judge text one byte at a time: ``llama_sampler_apply``
masks a token the grammar rejects to -inf, ``llama_sampler_accept`` advances it, and the end of
generation token is allowed only where a parse is complete.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from llamacpp_oracle import llama_cpp_module

SHP = dict(n_layer=1, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, head_dim=16)


class GrammarOracle:
    def __init__(self, tmp: Path):
        import gguf
        from tinymodels import dense_hparams, dense_tensors, write_gguf

        self.path = write_gguf(tmp / "bytes.gguf", "llama", dense_hparams(**SHP),
                               dense_tensors(1, n_vocab=320, **SHP),
                               qtype=gguf.GGMLQuantizationType.F16)
        self.low = llama_cpp_module().llama_cpp
        mp = self.low.llama_model_default_params()
        mp.vocab_only = True
        self.model = self.low.llama_model_load_from_file(str(self.path).encode(), mp)
        self.vocab = self.low.llama_model_get_vocab(self.model)
        self.eos = self.low.llama_vocab_eos(self.vocab)

    def parses(self, grammar: str) -> bool:
        s = self.low.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if s:
            self.low.llama_sampler_free(s)
        return bool(s)

    def _allowed(self, smpl, tok: int) -> bool:
        low = self.low
        arr = (low.llama_token_data * 1)(low.llama_token_data(tok, 0.0, 0.0))
        ta = low.llama_token_data_array(arr, 1, -1, False)
        low.llama_sampler_apply(smpl, ctypes.byref(ta))
        return arr[0].logit != float("-inf")

    def run(self, grammar: str, data: bytes) -> tuple[int, bool]:
        """(how many leading bytes the grammar lets through, whether it may end after all of
        them); raises ValueError when llama.cpp refuses the grammar."""
        s = self.low.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not s:
            raise ValueError("llama.cpp refused the grammar")
        try:
            for i, b in enumerate(data):
                if not self._allowed(s, b):
                    return i, False
                self.low.llama_sampler_accept(s, b)
            return len(data), self._allowed(s, self.eos)
        finally:
            self.low.llama_sampler_free(s)

    def accepts(self, grammar: str, text: str) -> bool:
        data = text.encode()
        n, end = self.run(grammar, data)
        return n == len(data) and end

    def close(self) -> None:
        self.low.llama_model_free(self.model)
