"""libmtmd (llama-cpp-python 0.3.36's ``llama_cpp.mtmd_cpp``) as the oracle of jllama's vision
path: its chunking of a prompt with images, its image embeddings (``mtmd_encode_chunk``), and
greedy tokens after ``mtmd_helper_eval_chunks``."""

from __future__ import annotations

import ctypes
import time

import numpy as np
from llamacpp_oracle import llama_cpp_module

FLASH_ATTN_ENABLED = 1  # llama_flash_attn_type; libmtmd's AUTO picks it on the CPU


class Mtmd:
    def __init__(self, text_gguf, mmproj, n_ctx: int = 256, threads: int = 2,
                 pooling: int | None = None):
        """``pooling`` (a llama_pooling_type): a context with embeddings on (``embed_last``)."""
        llama_cpp = llama_cpp_module()
        from llama_cpp import mtmd_cpp as M

        self.M, self.lc = M, llama_cpp
        extra = {} if pooling is None else {"embedding": True, "pooling_type": pooling}
        # flash attention on as llama.cpp's default; f16 KV cache (its default)
        self.llm = llama_cpp.Llama(model_path=str(text_gguf), n_ctx=n_ctx, n_batch=n_ctx,
                                   n_ubatch=n_ctx, verbose=False, n_threads=threads, seed=0,
                                   flash_attn=True, **extra)
        self.pooling = pooling
        cp = M.mtmd_context_params_default()
        cp.use_gpu, cp.n_threads, cp.print_timings, cp.warmup = False, threads, False, False
        cp.flash_attn_type = FLASH_ATTN_ENABLED
        self.ctx = M.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, cp)
        if not self.ctx:
            raise RuntimeError(f"libmtmd could not load {mmproj}")
        self._keep: list = []

    def close(self) -> None:
        self.M.mtmd_free(self.ctx)
        self.llm.close()

    def tokenize(self, prompt: str, images: list[np.ndarray]) -> list:
        """Chunks: token lists for text, (n_tokens, chunk pointer) for images."""
        M = self.M
        bmps = []
        for img in images:
            buf = np.ascontiguousarray(img, np.uint8)
            self._keep.append(buf)
            h, w, _ = buf.shape
            bmps.append(M.mtmd_bitmap_init(w, h, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte))))
        data = prompt.encode()
        txt = M.mtmd_input_text(text=data, text_len=len(data), add_special=True,
                                parse_special=True)
        self.chunks = M.mtmd_input_chunks_init()
        arr = (M.mtmd_bitmap_p_ctypes * max(1, len(bmps)))(*bmps)
        rc = M.mtmd_tokenize(self.ctx, self.chunks, ctypes.byref(txt), arr, len(bmps))
        if rc != 0:
            raise RuntimeError(f"mtmd_tokenize returned {rc}")
        out = []
        for i in range(M.mtmd_input_chunks_size(self.chunks)):
            c = M.mtmd_input_chunks_get(self.chunks, i)
            if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                p = M.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                out.append([int(p[j]) for j in range(n.value)])
            else:
                out.append((M.mtmd_input_chunk_get_n_tokens(c), c))
        return out

    def encode(self, chunk) -> tuple[np.ndarray, float]:
        """An image chunk's embeddings [n_tokens, n_embd] and the encode time in ms."""
        n, c = chunk
        t0 = time.perf_counter()
        if self.M.mtmd_encode_chunk(self.ctx, c) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")
        ms = (time.perf_counter() - t0) * 1e3
        n_embd = self.lc.llama_model_n_embd(self.llm.model)
        p = self.M.mtmd_get_output_embd(self.ctx)
        return np.ctypeslib.as_array(p, shape=(n * n_embd,)).reshape(n, n_embd).copy(), ms

    def _eval_fresh(self):
        """``mtmd_helper_eval_chunks`` of the tokenized chunks into an emptied context."""
        lc, M = self.lc, self.M
        lc.llama_memory_clear(lc.llama_get_memory(self.llm.ctx), True)
        n_past = lc.llama_pos(0)
        rc = M.mtmd_helper_eval_chunks(self.ctx, self.llm.ctx, self.chunks, 0, 0,
                                       self.llm.n_batch, True, ctypes.byref(n_past))
        if rc != 0:
            raise RuntimeError(f"mtmd_helper_eval_chunks returned {rc}")
        return n_past

    def eval_chunks(self, prompt: str, images: list[np.ndarray]) -> np.ndarray:
        """``mtmd_helper_eval_chunks`` into an empty context; the logits after the prompt."""
        lc = self.lc
        self.tokenize(prompt, images)
        n_past = self._eval_fresh()
        self.n_past = n_past.value
        n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.llm.model))
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(self.llm.ctx, -1),
                                     shape=(n_vocab,)).copy()

    def greedy(self, prompt: str, images: list[np.ndarray], n: int) -> list[int]:
        """``mtmd_helper_eval_chunks`` then ``n`` greedy tokens (stopping at EOS)."""
        lc = self.lc
        self.eval_chunks(prompt, images)
        vocab = lc.llama_model_get_vocab(self.llm.model)
        n_vocab, eos = lc.llama_vocab_n_tokens(vocab), lc.llama_vocab_eos(vocab)
        out: list[int] = []
        t0 = time.perf_counter()  # decoding after the prompt (self.decode_s: benchmarks)
        while len(out) < n:
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.llm.ctx, -1),
                                           shape=(n_vocab,))
            tok = int(np.argmax(logits))
            if tok == eos:
                break
            out.append(tok)
            arr = (lc.llama_token * 1)(tok)
            if lc.llama_decode(self.llm.ctx, lc.llama_batch_get_one(arr, 1)) != 0:
                raise RuntimeError("llama_decode failed")
        self.decode_s, self.n_decoded = time.perf_counter() - t0, len(out)
        return out

    def embed_last(self, prompt: str, images: list[np.ndarray]) -> np.ndarray:
        """``mtmd_helper_eval_chunks`` with embeddings on, then what llama-server's
        send_embedding reads after it: the last decode's pooled vector
        (llama_get_embeddings_seq; [n_embd]) or, pooling none, that decode's rows
        (llama_get_embeddings_ith; [n_last_text_tokens, n_embd]). Raw, not normalised."""
        lc = self.lc
        chs = self.tokenize(prompt, images)
        self._eval_fresh()
        n_embd = lc.llama_model_n_embd(self.llm.model)
        if self.pooling != lc.LLAMA_POOLING_TYPE_NONE:
            p = lc.llama_get_embeddings_seq(self.llm.ctx, 0)
            return np.ctypeslib.as_array(p, shape=(n_embd,)).copy()
        rows = [np.ctypeslib.as_array(lc.llama_get_embeddings_ith(self.llm.ctx, i),
                                      shape=(n_embd,)).copy() for i in range(len(chs[-1]))]
        return np.stack(rows)
