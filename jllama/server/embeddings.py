"""llama-server's embedding and reranking endpoints: encoder models (``models.bert``) and, with
--embedding, decoders (their final norm's output, pooled).

An encoder has no KV cache and no decode loop, so it runs outside the decoder ``Scheduler``: one
``EncoderRunner`` holds the weights and runs whole sequences, one at a time under a lock, in the
HTTP server's thread pool. A ``DecoderRunner`` does the same with a decoder's weights and a fresh
KV cache per sequence, beside the Scheduler that still serves completions. The request/response shapes and error messages follow llama.cpp
0c1e570's tools/server (handle_embeddings_impl, post_rerank, format_prompt_rerank,
format_embeddings_response_oaicompat, format_response_rerank, common_embd_normalize); errors
answer llama-server's ``{"error": {"code", "message", "type"}}`` (plus ``param``).
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import numpy as np

from jllama.server.openai_schema import ApiError

# llama-server's error_type -> (HTTP status, type string)
_INVALID = (400, "invalid_request_error")
_NOT_SUPPORTED = (501, "not_supported_error")
_EXCEED = (400, "exceed_context_size_error")


def server_error(kind: tuple[int, str], message: str) -> ApiError:
    status, type_ = kind
    return ApiError(status, message, code=status, type_=type_)  # type: ignore[arg-type]


def normalize(v: np.ndarray, mode: int) -> np.ndarray:
    """common_embd_normalize: -1 none, 0 max-abs scaled to int16 range, 2 euclidean, else p-norm
    (1 taxicab); sums in double as llama.cpp does."""
    x = np.asarray(v, np.float32)
    d = x.astype(np.float64)
    if mode == -1:
        s = 1.0
    elif mode == 0:
        s = float(np.max(np.abs(d), initial=0.0)) / 32760.0
    elif mode == 2:
        s = float(np.sqrt(np.sum(d * d)))
    else:
        s = float(np.sum(np.abs(d) ** mode) ** (1.0 / mode))
    scale = np.float32(1.0 / s) if s > 0.0 else np.float32(0.0)
    return x * scale


class _Runner:
    """What the endpoints need of a model: ``tokenizer``, ``pooling``, ``n_ctx``, ``n_vocab``,
    ``run(ids)``; subclasses set those and ``_forward(length)`` (a compiled function of
    (padded ids, n))."""

    tokenizer: object
    pooling: str
    n_ctx: int
    n_vocab: int
    rerank_template: str | None = None
    # llama-server's physical batch (n_ubatch) for a model whose input cannot be split across
    # batches (non-causal encoders): a longer input is refused; None: no such limit
    n_ubatch: int | None = None

    def _init_run(self) -> None:
        self._lock = threading.Lock()
        self._jits: dict[int, object] = {}  # padded length -> compiled forward

    def bucket(self, n: int) -> int:
        """The padded length a sequence of n tokens runs at: powers of two from 16, at most the
        context."""
        return min(max(16, 1 << (n - 1).bit_length()), self.n_ctx)

    def run(self, ids: list[int]) -> np.ndarray:
        """The pooled output of one sequence ([n_embd], rank: [n_cls_out]; none: [n, n_embd])."""
        n = len(ids)
        length = self.bucket(n)
        padded = np.zeros(length, np.int32)
        padded[:n] = ids
        with self._lock:  # one sequence at a time: the CPU/accelerator is shared anyway
            f = self._jits.get(length)
            if f is None:
                f = self._jits[length] = self._forward(length)
            out = np.asarray(f(padded, np.int32(n)), np.float32)
        return out[:n] if self.pooling == "none" else out

    # ------------------------------------------------------------------ prompts
    def tokenize_entry(self, p, media=None) -> list:
        """tokenize_input_subprompt: a string (special tokens added and parsed) or token ids;
        {"prompt_string", "multimodal_data"} and OpenAI {"content": [parts]} go to ``media``
        (the server's: token ids and image chunks), which a server without images lacks."""
        if isinstance(p, dict) and "content" in p and not _has_media(p["content"]):
            # tokenize_oai_content_array without media: the text parts' texts, joined
            return self.tokenizer.encode("".join(
                c.get("text", "") if isinstance(c, dict) and isinstance(c.get("text"), str)
                else "" for c in p["content"]), add_special=True, parse_special=True)
        if isinstance(p, dict) and ("multimodal_data" in p or "content" in p):
            # (an encoder server has no decoder to read images for: media is None there)
            if media is None:
                raise server_error(_INVALID, "Multimodal data provided, but model does not "
                                   "support multimodal requests.")
            return media(p)
        if isinstance(p, dict) and isinstance(p.get("prompt_string"), str):
            p = p["prompt_string"]  # tokenize_input_subprompt's {"prompt_string": ...}
        if isinstance(p, str):
            return self.tokenizer.encode(p, add_special=True, parse_special=True)
        if isinstance(p, list) and all(_is_id(t) or isinstance(t, str) for t in p):
            # token ids, strings mixed in (tokenize_mixed: only a first string gets BOS)
            ids: list[int] = []
            for i, t in enumerate(p):
                if isinstance(t, str):
                    ids += self.tokenizer.encode(t, add_special=i == 0, parse_special=True)
                elif not 0 <= t < self.n_vocab:
                    raise server_error(_INVALID, f"token ids must be in 0..{self.n_vocab - 1}")
                else:
                    ids.append(t)
            return ids
        raise server_error(_INVALID, "each input must be a string or a list of token ids")

    def rerank_prompt(self, query: str, doc: str) -> list[int]:
        """format_prompt_rerank: the GGUF's ``rerank`` template with {query}/{document}, else
        [BOS] query [EOS, or SEP without one] [SEP] document [EOS] per the vocabulary's add_*."""
        tk = self.tokenizer
        if self.rerank_template is not None:
            text = self.rerank_template.replace("{query}", query).replace("{document}", doc)
            return tk.encode(text, add_special=False, parse_special=True)
        q = tk.encode(query, add_special=False, parse_special=False)
        d = tk.encode(doc, add_special=False, parse_special=False)
        eos = tk.eos_id if tk.eos_id is not None else tk.sep_id
        out = [tk.bos_id] if tk.add_bos and tk.bos_id is not None else []
        out += q
        if tk.add_eos and eos is not None:
            out.append(eos)
        if tk.add_sep and tk.sep_id is not None:
            out.append(tk.sep_id)
        out += d
        if tk.add_eos and eos is not None:
            out.append(eos)
        return out

    def check_length(self, ids: list) -> None:
        n = n_items(ids)
        if self.n_ubatch is not None and n > self.n_ubatch:
            raise server_error((500, "server_error"), f"input ({n} tokens) is too large to "
                               "process. increase the physical batch size (current batch "
                               f"size: {self.n_ubatch})")
        if n > self.n_ctx:
            e = server_error(_EXCEED, f"input ({n} tokens) is larger than the max "
                             f"context size ({self.n_ctx} tokens). skipping")
            e.extra = {"n_prompt_tokens": n, "n_ctx": self.n_ctx}
            raise e


class EncoderRunner(_Runner):
    """A loaded encoder GGUF: tokenizer, weights, pooling, the context limit."""

    def __init__(self, path, pooling: str | None = None, ctx_size: int | None = None,
                 n_ubatch: int | None = None):
        from jllama.gguf.reader import read_gguf
        from jllama.models import bert, load_weights
        from jllama.tokenizer import Tokenizer

        g = read_gguf(path)
        self.path = Path(path)
        self.spec = bert.spec_from_gguf(g)
        self.arch = self.spec.arch
        self.pooling = pooling or self.spec.pooling
        if self.pooling not in bert.POOLING.values():
            raise ValueError(f"unknown pooling '{self.pooling}'")
        self.weights = load_weights(g)
        self.tokenizer = Tokenizer.from_gguf(g)
        self.rerank_template = g.metadata.get("tokenizer.chat_template.rerank")
        # llama-server's slot context; learned positions cap it at the training context
        self.n_ctx = min(ctx_size or self.spec.n_ctx_train, self.spec.n_ctx_train)
        self.n_ubatch = n_ubatch
        self.n_vocab = self.tokenizer.n_vocab
        self._init_run()

    def _forward(self, length: int):
        import jax

        from jllama.models import bert
        from jllama.models.common import Weights

        spec, pooling, name, tensors = self.spec, self.pooling, str(self.path), self.weights.tensors

        def forward(tensors, ids, n):
            w = Weights(tensors, name)
            return bert.pool(spec, w, bert.hidden_states(spec, w, ids, n), pooling, n)

        f = jax.jit(forward)
        return lambda ids, n: f(tensors, ids, n)


# decoders (causal attention: padding after the sequence cannot change its rows); rank: the
# last token's row through the GGUF's cls.output head (Qwen3-reranker style)
DECODER_POOLING = ("none", "mean", "cls", "last", "rank")
# llama.cpp's build_pooling ends a rank head with a softmax over the labels for these
_RANK_SOFTMAX = ("qwen3", "qwen3vl")


class DecoderRunner(_Runner):
    """A decoder's embeddings, as llama-server --embedding computes them: the final norm's
    output (t_embd, before the output matmul) for each token of a fresh sequence, pooled as the
    GGUF's ``<arch>.pooling_type`` says (none without one: llama_context's default) or as
    ``pooling`` overrides. Shares the weights of the decoder the server already holds; ``g``
    is its GGUFFile (metadata; rank pooling's ``cls.output.weight``)."""

    def __init__(self, model, spec, tokenizer, g, n_ctx: int, path,
                 pooling: str | None = None, numerics=None):
        from jllama.models.bert import POOLING

        metadata = g.metadata

        self.model, self.spec, self.tokenizer = model, spec, tokenizer
        self.arch = spec.arch
        self.path = Path(path)
        code = metadata.get(f"{spec.arch}.pooling_type")
        self.pooling = pooling or (POOLING.get(int(code), "?") if code is not None else "none")
        if self.pooling not in DECODER_POOLING:
            raise ValueError(f"pooling '{self.pooling}' is not one jllama computes for a decoder "
                             f"({', '.join(DECODER_POOLING)})")
        self.n_ctx = n_ctx
        self.n_vocab = tokenizer.n_vocab
        self.numerics = numerics if numerics is not None else getattr(model, "numerics", None)
        self.rerank_template = metadata.get("tokenizer.chat_template.rerank")
        self.cls_out = None
        if self.pooling == "rank":
            if "cls.output.weight" not in g.tensors:
                raise ValueError("pooling 'rank' on a decoder needs a reranker GGUF (a "
                                 "cls.output.weight head); this one has none")
            import dataclasses

            from jllama.models import load_weights
            from jllama.numerics import DEFAULT

            head = dataclasses.replace(g, tensors={"cls.output.weight":
                                                   g.tensors["cls.output.weight"]})
            self.cls_out = load_weights(head, numerics=self.numerics or DEFAULT)(
                "cls.output.weight")
        self._init_run()

    def bucket(self, n: int) -> int:
        """The Engine's prompt buckets (7, 16, 63, ...: padding must not carry a short prompt
        into ggml's tiled GEMM or tiled flash-attention shapes, or the rows round differently
        from llama.cpp's), then powers of two up to the context: one whole sequence per call."""
        from jllama.engine.engine import PREFILL_BUCKETS

        for b in PREFILL_BUCKETS:
            if n <= b:
                return min(b, self.n_ctx)
        return min(1 << (n - 1).bit_length(), self.n_ctx)

    def _forward(self, length: int):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from jllama.models.bert import pool
        from jllama.models.cache import KVCache
        from jllama.models.common import linear
        from jllama.numerics import DEFAULT
        from jllama.numerics import use as use_numerics

        gd, state = nnx.split(self.model)
        num, spec, pooling = self.numerics or DEFAULT, self.spec, self.pooling
        make = getattr(self.model, "make_cache", None)
        softmax = spec.arch in _RANK_SOFTMAX

        def forward(state, cache, cls_out, ids, n):
            with use_numerics(num):
                h, _ = nnx.merge(gd, state)(ids[None], jnp.zeros(1, jnp.int32), cache, length,
                                            None, hidden=True)
                if pooling != "rank":
                    return pool(spec, None, h[0], pooling, n)  # rows past n: padding
                # causal rank: the last token (llama.cpp's inp_cls for a causal context)
                last = jax.lax.dynamic_slice_in_dim(h[0], n - 1, 1, 0)
                y = linear(last, cls_out)[0]
                return jax.nn.softmax(y) if softmax else y

        f = jax.jit(forward)
        cls_out = self.cls_out

        def run(ids, n):
            # a fresh cache per sequence (llama-server clears the slot for each embedding task)
            cache = (make(1, length, num.cache_type_k) if make is not None else
                     KVCache.create(spec.n_layer, 1, spec.n_head_kv, length, spec.head_dim,
                                    spec.head_dim_v, num.cache_type_k, num.cache_type_v))
            return f(state, cache, cls_out, ids, n)

        return run


    def run_items(self, items: list) -> np.ndarray:
        """The output of a prompt with images (token ids and ``multimodal.ImageChunk``s), as
        llama-server computes it: the text runs and images decoded in turn into one fresh
        cache (each image in its own batch, non-causally where libmtmd decodes it so), and
        the output taken from the LAST batch only (send_embedding reads the embeddings of
        the final llama_decode: llama_get_embeddings_seq pools that batch's tokens, i.e. the
        text after the last image; pooling none gives that batch's rows)."""
        if self.pooling == "rank":
            raise server_error(_INVALID, "rank pooling of prompts with images is not supported")
        runs: list = []
        for t in items:
            if isinstance(t, int):
                if runs and isinstance(runs[-1], list):
                    runs[-1].append(t)
                else:
                    runs.append([t])
            else:
                runs.append(t)
        if not isinstance(runs[-1], list):
            # llama-server would decode no text batch after the image and send no vector
            raise server_error(_INVALID, "a prompt for embeddings must end with text after its "
                               "last image")
        total = sum(len(r) if isinstance(r, list) else r.embd.shape[0] for r in runs)
        pads = [self.bucket(len(r)) if isinstance(r, list) else r.embd.shape[0] for r in runs]
        cache_len = 1 << (max(16, total + pads[-1]) - 1).bit_length()
        with self._lock:
            cache = self._new_cache(cache_len)
            pos = 0
            for r, t in zip(runs, pads):
                kv_len = min(cache_len, 1 << (max(256, pos + t) - 1).bit_length())
                last = r is runs[-1]
                if isinstance(r, list):
                    x = np.zeros((1, t), np.int32)
                    x[0, :len(r)] = r
                    n, bidir, is_embd = len(r), False, False
                else:
                    x = np.asarray(r.embd, np.float32)[None]
                    n, bidir, is_embd = t, bool(r.bidir), True
                out, cache = self._step(x, np.asarray([pos], np.int32), cache, np.int32(n),
                                        kv_len=kv_len, is_embd=is_embd, bidir=bidir,
                                        pool_out=last)
                pos += n
            out = np.asarray(out, np.float32)
        return out[:len(runs[-1])] if self.pooling == "none" else out

    def _new_cache(self, length: int):
        from jllama.models.cache import KVCache
        from jllama.numerics import DEFAULT

        num, spec = self.numerics or DEFAULT, self.spec
        make = getattr(self.model, "make_cache", None)
        if make is not None:
            return make(1, length, num.cache_type_k)
        return KVCache.create(spec.n_layer, 1, spec.n_head_kv, length, spec.head_dim,
                              spec.head_dim_v, num.cache_type_k, num.cache_type_v)

    def _step(self, x, pos0, cache, n, *, kv_len: int, is_embd: bool, bidir: bool,
              pool_out: bool):
        """One batch (token ids [1, T] or input embeddings [1, T, n_embd]) appended at pos0;
        returns (the batch's pooled output, or None before the last batch; the cache)."""
        key = (x.shape, kv_len, is_embd, bidir, pool_out)
        f = self._jits.get(key)
        if f is None:
            import jax
            from flax import nnx

            from jllama.models.bert import pool
            from jllama.numerics import DEFAULT
            from jllama.numerics import use as use_numerics

            gd, state = nnx.split(self.model)
            num, spec, pooling = self.numerics or DEFAULT, self.spec, self.pooling

            def step(state, x, pos0, cache, n):
                with use_numerics(num):
                    model = nnx.merge(gd, state)
                    if is_embd:
                        h, cache = model(None, pos0, cache, kv_len, None, hidden=True, embd=x,
                                         bidir=bidir)
                    else:
                        h, cache = model(x, pos0, cache, kv_len, None, hidden=True)
                    return (pool(spec, None, h[0], pooling, n) if pool_out else None), cache

            jitted = jax.jit(step)
            f = self._jits[key] = lambda *a: jitted(state, *a)
        return f(x, pos0, cache, n)


# ---------------------------------------------------------------------------- requests
def n_items(items: list) -> int:
    """A prompt's length in tokens, an image chunk counting its embeddings."""
    return sum(1 if isinstance(t, int) else t.embd.shape[0] for t in items)


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _has_media(content) -> bool:
    """Whether an OpenAI content list has parts other than text (images, audio, video)."""
    if not isinstance(content, list):
        raise server_error(_INVALID, '"content" must be an array')
    return any(isinstance(c, dict) and c.get("type", "text") != "text" for c in content)


def parse_embeddings(enc: EncoderRunner, body: dict, oai: bool, embedding_on: bool = True,
                     media=None, default_norm: int = 2):
    """(list of prompts: token-id lists, or with images ids and image chunks; response is
    OAI?, base64?, embd_normalize) for a request, or llama-server's error for it. ``media``:
    a prompt-with-images entry -> its items (``tokenize_entry``)."""
    if not embedding_on:
        raise server_error(_NOT_SUPPORTED, "This server does not support embeddings. Start it "
                           "with `--embeddings`")
    if oai and enc.pooling == "none":
        raise server_error(_INVALID, "Pooling type 'none' is not OAI compatible. Please use a "
                           "different pooling type")
    if "input" in body:
        prompt = body["input"]
    elif "content" in body:
        oai = False  # "content" is not OAI compatible
        prompt = body["content"]
    else:
        raise server_error(_INVALID, '"input" or "content" must be provided')
    use_b64 = False
    if "encoding_format" in body:
        fmt = body["encoding_format"]
        if fmt == "base64":
            use_b64 = True
        elif fmt != "float":
            raise server_error(_INVALID, "The format to return the embeddings in. Can be either "
                               "float or base64")
    # json_is_array_and_contains_numbers: a list with any token id in it is ONE prompt
    if isinstance(prompt, list) and not any(_is_id(t) for t in prompt):
        seqs = [enc.tokenize_entry(p, media) for p in prompt]
    else:
        seqs = [enc.tokenize_entry(prompt, media)]
    if not seqs:
        raise server_error(_INVALID, '"input" must not be empty')
    for ids in seqs:
        if not ids:
            raise server_error(_INVALID, "Input content cannot be empty")
        enc.check_length(ids)
    norm = body.get("embd_normalize", default_norm)  # default: llama-server's --embd-normalize
    if not isinstance(norm, int) or isinstance(norm, bool):
        raise server_error(_INVALID, '"embd_normalize" must be an integer')
    return seqs, oai, use_b64, norm


def embeddings_response(enc: EncoderRunner, body: dict, model: str, seqs: list[list[int]],
                        outs: list[np.ndarray], oai: bool, use_b64: bool, norm: int):
    if enc.pooling == "none":  # per-token vectors, never normalized
        results = [{"index": i, "embedding": o.tolist()} for i, o in enumerate(outs)]
    else:
        results = [{"index": i, "embedding": [normalize(o, norm).tolist()]}
                   for i, o in enumerate(outs)]
    if not oai:
        return results
    data = []
    for i, r in enumerate(results):
        vec = r["embedding"][0]
        if use_b64:
            raw = np.asarray(vec, "<f4").tobytes()
            data.append({"embedding": base64.b64encode(raw).decode("ascii"), "index": i,
                         "object": "embedding", "encoding_format": "base64"})
        else:
            data.append({"embedding": vec, "index": i, "object": "embedding"})
    n = sum(n_items(s) for s in seqs)
    return {"model": body.get("model", model), "object": "list",
            "usage": {"prompt_tokens": n, "total_tokens": n}, "data": data}


def parse_rerank(enc: EncoderRunner, body: dict, rerank_on: bool):
    """(prompts, documents, top_n, TEI format?) for a /rerank request."""
    if not rerank_on:
        raise server_error(_NOT_SUPPORTED, "This server does not support reranking. Start it "
                           "with `--reranking`")
    tei = "texts" in body
    if "query" not in body:
        raise server_error(_INVALID, '"query" must be provided')
    query = body["query"]
    if not isinstance(query, str):
        raise server_error(_INVALID, '"query" must be a string')
    docs = body.get("documents", body.get("texts", []))
    if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs) or not docs:
        raise server_error(_INVALID, '"documents" must be a non-empty string array')
    top_n = body.get("top_n", len(docs))
    if not isinstance(top_n, int) or isinstance(top_n, bool):
        raise server_error(_INVALID, '"top_n" must be an integer')
    prompts = [enc.rerank_prompt(query, d) for d in docs]
    for ids in prompts:
        enc.check_length(ids)
    return prompts, docs, max(top_n, 0), tei


def rerank_response(body: dict, model: str, prompts: list[list[int]], docs: list[str],
                    scores: list[float], top_n: int, tei: bool):
    label = "score" if tei else "relevance_score"
    ret_text = tei and bool(body.get("return_text", False))
    elems = []
    for i, s in enumerate(scores):
        e = {"index": i, label: s}
        if ret_text:
            e["text"] = docs[i]
        elems.append(e)
    elems.sort(key=lambda e: -e[label])  # highest score first, as llama-server sorts
    elems = elems[:top_n]
    if tei:
        return elems
    n = sum(len(p) for p in prompts)
    return {"model": body.get("model", model), "object": "list",
            "usage": {"prompt_tokens": n, "total_tokens": n}, "results": elems}
