"""The HTTP side: OpenAI-compatible routes on Starlette, served by uvicorn.

Handlers never touch the engine. A generation request is validated, rendered to token ids,
queued on the ``Scheduler`` and then fed by the events it sends back. For streams the HTTP
status is only committed once the first event arrives, so queue timeouts and prompt errors still
get a proper status code; after that, problems are reported as an SSE ``error`` event as OpenAI
does. Whatever way a handler exits (done, timeout, client gone) it cancels its request, which
frees the slot at the scheduler's next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from jllama.engine.sampling import SamplingParams
from jllama.server import embeddings as emb
from jllama.server import openai_schema as oa
from jllama.server import tools as tl
from jllama.server.grammar import JsonConstraint
from jllama.server.metrics import Metrics
from jllama.server.openai_schema import ApiError
from jllama.server.scheduler import Event, GenRequest, QueueFull, Scheduler, SchedulerDead

DISCONNECT_POLL_S = 0.5


@dataclass
class ServerSettings:
    model_alias: str
    api_key: str | None = None
    max_queue: int = 64
    timeout: float = 600.0
    # llama-server's switches (jllama serve's flags of the same names; config 'server')
    api_keys: list[str] = field(default_factory=list)  # any of them works (plus api_key)
    metrics: bool = True  # /metrics (llama-server: off unless --metrics; the CLI follows it)
    slots: bool = True  # GET /slots
    props: bool = False  # POST /props
    cors_origins: str = "*"
    n_predict: int = -1  # default max tokens of a request (-1: no limit but the context)
    defaults: dict = field(default_factory=dict)  # request fields a request may leave out
    aliases: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    cache_prompt: bool = True
    max_body: int = 16 * 1024 * 1024  # bytes; larger request bodies get 413

    def keys(self) -> list[str]:
        return [k for k in [self.api_key, *self.api_keys] if k]


class ServerState:
    """The loaded model, its scheduler and the counters, shared by all handlers.

    ``llm`` is a decoder (``api.Llama``) served by the scheduler, or None when the server runs
    an ``encoder`` (``embeddings.EncoderRunner``: /embeddings and /rerank only, as llama-server
    started with --embeddings). A decoder with ``encoder`` (``embeddings.DecoderRunner``) serves
    both: llama-server --embedding on a decoder still answers completions."""

    def __init__(self, llm, settings: ServerSettings, encoder=None):
        self.llm = llm
        self.encoder = encoder
        self.settings = settings
        self.metrics = Metrics()
        self.scheduler = (Scheduler(llm, max_queue=settings.max_queue, metrics=self.metrics)
                          if llm is not None else None)
        self.created = oa.now()
        self.ctx_size = llm.engine.ctx_size if llm is not None else encoder.n_ctx
        self.tokenizer = llm.tokenizer if llm is not None else encoder.tokenizer

    def warmup(self) -> None:
        """Compile prefill, first-token sampling and the batched step before the first request
        (seconds of XLA compilation would otherwise land on a client's latency)."""
        if self.encoder is not None:
            self.encoder.run(self.tokenizer.encode("Hello", add_special=True))
        if self.llm is None:
            return
        sch = self.scheduler
        done = threading.Event()
        req = GenRequest(self.llm.tokenize("Hello", add_special=True), max_tokens=2,
                         params=SamplingParams(temperature=0.0), cache_prompt=False,
                         sink=lambda ev: done.set() if ev.kind != "text" else None)
        sch.submit(req)
        done.wait(600)
        self.metrics.forget_work()


# ---------------------------------------------------------------------------- helpers
def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def json_body(request: Request, limit: int | None = None) -> dict:
    if limit is None:
        limit = getattr(request.app.state, "max_body", 16 * 1024 * 1024)
    chunks, n = [], 0
    async for chunk in request.stream():  # counted as it arrives: chunked bodies too
        n += len(chunk)
        if n > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes",
                           code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") \
            from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def check_auth(state: ServerState, request: Request) -> None:
    """llama-server's rule: 'Authorization: Bearer KEY', else Anthropic's 'X-Api-Key: KEY'.
    Every key is compared in constant time (hmac.compare_digest) so the answer's timing does
    not tell how much of a guess was right."""
    keys = state.settings.keys()
    if not keys:
        return
    got = request.headers.get("authorization", "")
    if not got:
        got = request.headers.get("x-api-key", "")
    if got[:7].lower() == "bearer ":
        got = got[7:].strip()
    given = got.encode("utf-8", "surrogateescape")
    ok = False
    for k in keys:  # no early exit: the time does not depend on which key matched
        ok |= hmac.compare_digest(given, k.encode("utf-8"))
    if not ok:
        raise ApiError(401, "Invalid API Key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key")


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class ClientGone(Exception):
    pass


async def next_event(request: Request, req: GenRequest, q: asyncio.Queue, deadline: float,
                     watch_disconnect: bool) -> Event:
    """The next scheduler event; raises ApiError(504) past the deadline and ClientGone when
    the client hung up while we were waiting (non-streaming requests have no other way to
    notice)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            req.cancel()
            raise ApiError(504, "the request timed out (server --timeout); try a smaller "
                           "max_tokens or retry later", code="timeout")
        try:
            return await asyncio.wait_for(q.get(), min(left, DISCONNECT_POLL_S))
        except asyncio.TimeoutError:
            if watch_disconnect and await request.is_disconnected():
                req.cancel()
                raise ClientGone() from None


def tokenize_prompt(state: ServerState, text: str) -> list[int]:
    tk = state.llm.tokenizer
    add = True
    if tk.add_bos and tk.bos_id is not None and text.startswith(tk.piece_text(tk.bos_id)):
        add = False  # the template already wrote BOS
    return tk.encode(text, add_special=add, parse_special=True)


def render_prompt(llm, messages: list[dict], tools: list[dict] | None) -> str:
    """The GGUF's chat template applied to the conversation (with the generation prompt)."""
    return llm.apply_chat_template(messages, tools=tools)


def prompt_ids(state: ServerState, prompt) -> list[int]:
    """A completion prompt in llama-server's forms (tokenize_input_prompts): a string, token
    ids, a list mixing ids and strings (only a string that comes first gets BOS), or
    {"prompt_string": ...} (with "multimodal_data": refused, no projector is loaded); a list
    holding one prompt counts as that prompt. Runs off the event loop (pure Python)."""
    tk = state.llm.tokenizer
    n_vocab = state.llm.spec.n_vocab
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list, dict)):
        prompt = prompt[0]
    if isinstance(prompt, dict):
        if "multimodal_data" in prompt:
            raise oa.bad("prompt", "Multimodal data provided, but model does not support "
                         "multimodal requests.")
        prompt = prompt.get("prompt_string")
        if not isinstance(prompt, str):
            raise oa.bad("prompt", "'prompt.prompt_string' must be a string", "invalid_type")
    if isinstance(prompt, str):
        return tk.encode(prompt, add_special=True, parse_special=True)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, str) or (isinstance(t, int) and not isinstance(t, bool))
            for t in prompt):
        ids: list[int] = []
        for i, t in enumerate(prompt):
            if isinstance(t, str):
                ids += tk.encode(t, add_special=i == 0, parse_special=True)
            elif not 0 <= t < n_vocab:
                raise oa.bad("prompt", "token ids in 'prompt' must be inside the vocabulary")
            else:
                ids.append(t)
        return ids
    raise oa.bad("prompt", "'prompt' must be a string, a list of token ids (strings may be "
                 "mixed in), {\"prompt_string\": ...}, or a list holding one of those "
                 "(batches of prompts are not supported)", "invalid_type")


def check_prompt(state: ServerState, ids: list[int]) -> None:
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt", code="empty_prompt")
    if len(ids) >= state.ctx_size:
        raise ApiError(400, f"the prompt is {len(ids)} tokens but the context size is "
                       f"{state.ctx_size} tokens per slot (--ctx-size); at most "
                       f"{state.ctx_size - 1} prompt tokens leave room for one generated token",
                       param="messages", code="context_length_exceeded")


# ---------------------------------------------------------------------------- generation
@dataclass
class Job:
    """One generation request in flight, seen from the HTTP side."""

    req: GenRequest
    queue: asyncio.Queue
    t0: float
    deadline: float
    stream: bool
    include_usage: bool
    rid: str
    created: int
    model: str
    t_first: float = 0.0


def submit(state: ServerState, ids: list[int], opts: oa.GenOptions, constraint,
           progress: bool = False) -> Job:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def sink(ev: Event) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
            loop.call_soon_threadsafe(q.put_nowait, ev)

    req = GenRequest(ids, opts.max_tokens, opts.params, opts.stop, sink, constraint,
                     opts.cache_prompt, lora=opts.lora, return_progress=progress)
    try:
        state.scheduler.submit(req)
    except SchedulerDead as e:
        raise ApiError(503, str(e), code="unavailable", type_="unavailable_error") from None
    except QueueFull as e:
        raise ApiError(503, f"server busy: {e}; retry later", code="queue_full",
                       type_="server_overloaded") from None
    t0 = time.monotonic()
    return Job(req, q, t0, t0 + state.settings.timeout, opts.stream, opts.include_usage, "", 0,
               state.settings.model_alias)


async def first_event(request: Request, job: Job) -> Event:
    ev = await next_event(request, job.req, job.queue, job.deadline, True)
    job.t_first = time.monotonic()
    if ev.kind == "error":
        raise ApiError(ev.status, ev.message)
    return ev


async def collect(request: Request, job: Job, first: Event) -> tuple[str, Event]:
    parts = []
    ev = first
    while ev.kind == "text":
        parts.append(ev.text)
        ev = await next_event(request, job.req, job.queue, job.deadline, True)
    if ev.kind == "error":
        raise ApiError(ev.status, ev.message)
    return "".join(parts), ev


def usage_of(ev: Event) -> dict:
    return oa.usage(ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens)


def make_constraint(state: ServerState, opts: oa.GenOptions,
                    tool: dict | None = None) -> JsonConstraint | None:
    """JSON output for ``response_format`` (guided by its schema, if any) or for the arguments of
    a forced tool call (guided by the tool's parameter schema)."""
    rf = opts.response_format
    if tool is None and rf is None:
        return None
    if tool is not None:
        schema = tool["function"].get("parameters") or {"type": "object"}
    elif rf["type"] == "json_schema":
        schema = rf["json_schema"].get("schema") or {"type": "object"}
    else:
        schema = None
    sch = state.scheduler
    return JsonConstraint(sch.token_bytes(), sch.eog, root="object", schema=schema)


def _params_json(p: SamplingParams, n_predict: int | None, seed: int | None = None) -> dict:
    """llama-server's task_params.to_json(only_metrics) for the fields jllama has."""
    n = -1 if n_predict is None else n_predict
    return {"seed": p.seed if p.seed is not None else (-1 if seed is None else seed),
            "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
            "min_p": p.min_p, "repeat_last_n": p.repeat_last_n,
            "repeat_penalty": p.repeat_penalty, "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty, "max_tokens": n, "n_predict": n}


def native_progress(ev: Event) -> dict:
    """llama-server's prompt_progress chunk (return_progress): counts and prompt timings so far
    (the first one before any prompt token is evaluated)."""
    n = max(ev.processed - ev.cached_tokens, 0)
    ms = ev.seconds * 1e3
    return {"index": 0, "content": "", "tokens": [], "stop": False, "id_slot": -1,
            "prompt_progress": {"total": ev.prompt_tokens, "cache": ev.cached_tokens,
                                "processed": ev.processed, "time_ms": ms},
            "timings": {"cache_n": ev.cached_tokens, "prompt_n": n, "prompt_ms": ms,
                        "prompt_per_token_ms": ms / n if n else 0.0,
                        "prompt_per_second": 1e3 * n / ms if n and ms > 0 else 0.0,
                        "predicted_n": 0, "predicted_ms": 0.0, "predicted_per_token_ms": 0.0,
                        "predicted_per_second": 0.0}}


def native_completion(job: Job, text: str, done: Event, ids: list[int]) -> dict:
    """llama-server's /completion answer (its completion result to_json, non-OAI): the text,
    stop type, token counts and timings. The first generated token comes from the prompt's
    logits, so the generation rate is over the tokens after it, as llama-server counts."""
    end = time.monotonic()
    t_first = job.t_first or end
    prompt_n = max(done.prompt_tokens - done.cached_tokens, 0)
    pred_n = done.completion_tokens
    prompt_ms = max((t_first - job.t0) * 1e3, 1e-3)
    pred_ms = max((end - t_first) * 1e3, 0.0)
    steps = max(pred_n - 1, 0)
    timings = {"cache_n": done.cached_tokens, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
               "prompt_per_token_ms": prompt_ms / max(prompt_n, 1),
               "prompt_per_second": 1e3 * prompt_n / prompt_ms,
               "predicted_n": pred_n, "predicted_ms": pred_ms,
               "predicted_per_token_ms": pred_ms / steps if steps and pred_ms > 0 else 0.0,
               "predicted_per_second": 1e3 / pred_ms * steps if steps and pred_ms > 0 else 0.0}
    stop_type = {"stop": "eos", "length": "limit"}.get(done.finish or "", "none")
    return {"index": 0, "content": text, "tokens": [], "id_slot": -1, "stop": True,
            "model": job.model, "tokens_predicted": pred_n,
            "tokens_evaluated": done.prompt_tokens, "prompt": "", "has_new_line": "\n" in text,
            "truncated": False, "stop_type": stop_type, "stopping_word": "",
            "tokens_cached": done.prompt_tokens + pred_n, "timings": timings}


class Handlers:
    def __init__(self, state: ServerState):
        self.state = state

    # ------------------------------------------------------------------ plumbing
    async def _run(self, request: Request, endpoint: str, fn, auth: bool = True) -> Response:
        try:
            if auth:
                check_auth(self.state, request)
            resp = await fn(request)
        except ApiError as e:
            resp = error_response(e)
        except ClientGone:
            resp = Response(status_code=499)
        self.state.metrics.observe_request(endpoint, resp.status_code)
        return resp

    async def chat(self, request: Request) -> Response:
        return await self._run(request, "/v1/chat/completions", self._generating(self._chat))

    async def completions(self, request: Request) -> Response:
        return await self._run(request, "/v1/completions", self._generating(self._completions))

    def _generating(self, fn):
        if self.state.llm is not None:
            return fn

        async def refuse(request: Request) -> Response:
            raise emb.server_error((501, "not_supported_error"), "This server does not support "
                                   "completions. Start it without `--embeddings`")
        return refuse

    async def embeddings_oai(self, request: Request) -> Response:
        return await self._run(request, "/v1/embeddings", self._embeddings_oai)

    async def embeddings(self, request: Request) -> Response:
        return await self._run(request, "/embeddings", self._embeddings)

    async def rerank(self, request: Request) -> Response:
        return await self._run(request, "/rerank", self._rerank)

    async def models(self, request: Request) -> Response:
        return await self._run(request, "/v1/models", self._models)

    def with_defaults(self, body: dict) -> dict:
        """The server's defaults (llama-server's --temp, --seed, -n, ...) for the fields a
        request leaves out; llama-server's n_predict is max_tokens under its own name."""
        st = self.state.settings
        out = {**{k: v for k, v in st.defaults.items() if body.get(k) is None}, **body}
        if out.get("max_tokens") is None and out.get("max_completion_tokens") is None:
            n = out.get("n_predict")
            if n is None or (isinstance(n, int) and n < 0):
                n = st.n_predict
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                out["max_tokens"] = n
        if "cache_prompt" not in body and not st.cache_prompt:
            out["cache_prompt"] = False
        return out

    async def tokenize(self, request: Request) -> Response:
        return await self._run(request, "/tokenize", self._tokenize)

    async def detokenize(self, request: Request) -> Response:
        return await self._run(request, "/detokenize", self._detokenize)

    async def health(self, request: Request) -> Response:
        sch = self.state.scheduler
        if sch is None:
            return JSONResponse({"status": "ok"})
        if sch.dead is not None:  # the scheduler thread cannot go on: no request will be served
            return error_response(ApiError(503, f"the scheduler stopped: {sch.dead}",
                                           code="unavailable", type_="unavailable_error"))
        busy = sch.busy_slots()
        body = {"status": "ok", "slots_idle": sch.n_slots - busy, "slots_processing": busy,
                "requests_queued": len(sch.queue)}
        return JSONResponse(body)

    async def lora_adapters(self, request: Request) -> Response:
        return await self._run(request, "/lora-adapters", self._lora_adapters)

    async def metrics(self, request: Request) -> Response:
        return await self._run(request, "/metrics", self._metrics)

    async def _metrics(self, request: Request) -> Response:
        if not self.state.settings.metrics:
            raise emb.server_error((501, "not_supported_error"), "This server does not support "
                                   "metrics endpoint. Start it with `--metrics`")
        return PlainTextResponse(self.state.metrics.render(),
                                 media_type="text/plain; version=0.0.4",
                                 headers={"Process-Start-Time-Unix":
                                          str(int(self.state.metrics.started))})

    async def slots(self, request: Request) -> Response:
        return await self._run(request, "/slots", self._slots)

    async def _slots(self, request: Request) -> Response:
        """llama-server's GET /slots (its slot to_json with only_metrics)."""
        st = self.state
        if not st.settings.slots:
            raise emb.server_error((501, "not_supported_error"), "This server does not support "
                                   "slots endpoint. Start it with `--slots`")
        if request.method == "POST":
            raise emb.server_error((501, "not_supported_error"), "This server does not support "
                                   "slots action. Start it with `--slot-save-path`")
        sch = st.scheduler
        out = []
        for b in range(sch.n_slots if sch is not None else 1):
            a = sch.slots[b] if sch is not None else None
            d = {"id": b, "n_ctx": st.ctx_size,
                 "speculative": bool(sch is not None and sch.speculative is not None),
                 "is_processing": a is not None}
            if a is not None:
                d["n_prompt_tokens"] = len(a.req.prompt_ids)
                d["n_prompt_tokens_cache"] = a.req.cached_tokens
                d["params"] = _params_json(a.req.params, a.req.max_tokens)
                d["next_token"] = [{"has_next_token": True, "n_decoded":
                                    a.req.completion_tokens}]
            out.append(d)
        if request.query_params.get("fail_on_no_slot") and all(d["is_processing"] for d in out):
            raise emb.server_error((503, "unavailable_error"), "no slot available")
        return JSONResponse(out)

    async def props(self, request: Request) -> Response:
        return await self._run(request, "/props", self._props)

    async def _props(self, request: Request) -> Response:
        """llama-server's GET /props (POST: its --props switch; nothing is settable yet)."""
        st = self.state
        if request.method == "POST":
            if not st.settings.props:
                raise emb.server_error((501, "not_supported_error"), "This server does not "
                                       "support changing global properties. Start it with "
                                       "`--props`")
            raise emb.server_error((501, "not_supported_error"), "changing global properties "
                                   "is not built in jllama yet")
        from jllama.engine.sampling import SamplingParams

        d = st.settings.defaults
        sp = SamplingParams(**{k: d[k] for k in ("temperature", "top_k", "top_p", "min_p",
                                                  "repeat_penalty", "frequency_penalty",
                                                  "presence_penalty", "seed") if k in d})
        tk = st.tokenizer
        path = st.llm.path if st.llm is not None else st.encoder.path

        def piece(i):
            return tk.token_to_piece(i).decode("utf-8", "replace") if i is not None else ""

        return JSONResponse({
            "default_generation_settings": {
                "params": _params_json(sp, st.settings.n_predict, d.get("seed", -1)),
                "n_ctx": st.ctx_size},
            "total_slots": st.scheduler.n_slots if st.scheduler is not None else 1,
            "model_alias": st.settings.model_alias, "model_path": str(path),
            "modalities": {"vision": False, "video": False, "audio": False},
            "endpoint_slots": st.settings.slots, "endpoint_props": st.settings.props,
            "endpoint_metrics": st.settings.metrics, "ui": False,
            "chat_template": getattr(tk, "chat_template", None) or "",
            "bos_token": piece(getattr(tk, "bos_id", None)),
            "eos_token": piece(getattr(tk, "eos_id", None)),
            "build_info": "jllama", "is_sleeping": False})

    # ------------------------------------------------------------------ endpoints
    async def _models(self, request: Request) -> Response:
        st = self.state
        if st.llm is None:
            meta = {"n_ctx": st.ctx_size, "n_vocab": st.tokenizer.n_vocab, "n_slots": 1,
                    "arch": st.encoder.arch, "pooling": st.encoder.pooling}
        else:
            meta = {"n_ctx": st.ctx_size, "n_vocab": st.llm.spec.n_vocab,
                    "n_slots": st.scheduler.n_slots, "arch": st.llm.spec.arch}
        m = {"id": st.settings.model_alias, "aliases": st.settings.aliases or
             [st.settings.model_alias], "tags": st.settings.tags, "object": "model",
             "created": st.created, "owned_by": "llamacpp", "meta": meta}
        return JSONResponse({"object": "list", "data": [m]})

    async def _lora_adapters(self, request: Request) -> Response:
        """llama-server's GET (the adapters and their default scales) and POST (new default
        scales; adapters left out get 0) /lora-adapters."""
        sch = self.state.scheduler
        if sch is None:
            raise emb.server_error((501, "not_supported_error"), "an encoder server has no LoRA "
                                   "adapters")
        if request.method == "POST":
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not valid JSON: {e}",
                               code="invalid_json") from None
            if not isinstance(body, list):
                raise ApiError(400, "Request body must be an array", code="invalid_request")
            sch.set_lora_default(oa.lora_scales(body, "body"))
            return JSONResponse({"success": True})
        lora = getattr(self.state.llm, "lora", None)
        files = lora.files if lora is not None else []
        return JSONResponse([{"id": i, "path": lf.path, "scale": s, "task_name": lf.task_name,
                              "prompt_prefix": lf.prompt_prefix}
                             for i, (lf, s) in enumerate(zip(files, sch.lora_default,
                                                             strict=True))])

    async def _tokenize(self, request: Request) -> Response:
        body = await json_body(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise oa.bad("content", "'content' must be a string", "invalid_type")
        add = body.get("add_special", False)
        parse = body.get("parse_special", True)
        if not isinstance(add, bool) or not isinstance(parse, bool):
            raise oa.bad("add_special", "'add_special' and 'parse_special' must be booleans")
        tk = self.state.tokenizer
        ids = tk.encode(content, add_special=add, parse_special=parse)
        if body.get("with_pieces"):
            toks = [{"id": i, "piece": tk.token_to_piece(i).decode("utf-8", "replace")}
                    for i in ids]
            return JSONResponse({"tokens": toks})
        return JSONResponse({"tokens": ids})

    async def _detokenize(self, request: Request) -> Response:
        body = await json_body(request)
        toks = body.get("tokens")
        n = self.state.tokenizer.n_vocab
        if not isinstance(toks, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n for t in toks):
            raise oa.bad("tokens", f"'tokens' must be a list of token ids in 0..{n - 1}")
        return JSONResponse({"content": self.state.tokenizer.decode(toks)})

    async def _embeddings_oai(self, request: Request) -> Response:
        return await self._embed(request, oai=True)

    async def _embeddings(self, request: Request) -> Response:
        return await self._embed(request, oai=False)

    def _encoder(self):
        enc = self.state.encoder
        if enc is None:
            raise emb.server_error((501, "not_supported_error"), "This server does not support "
                                   "embeddings. Start it with `--embeddings`")
        return enc

    async def _embed(self, request: Request, oai: bool) -> Response:
        """llama-server's handle_embeddings_impl: OAI (/v1/embeddings) or its own shape."""
        enc = self._encoder()
        body = await json_body(request)
        seqs, oai, b64, norm = await run_in_threadpool(emb.parse_embeddings, enc, body, oai)
        outs = [await run_in_threadpool(enc.run, ids) for ids in seqs]
        return JSONResponse(emb.embeddings_response(enc, body, self.state.settings.model_alias,
                                                    seqs, outs, oai, b64, norm))

    async def _rerank(self, request: Request) -> Response:
        enc = self._encoder()
        body = await json_body(request)
        prompts, docs, top_n, tei = await run_in_threadpool(emb.parse_rerank, enc, body,
                                                            enc.pooling == "rank")
        scores = [float((await run_in_threadpool(enc.run, ids))[0]) for ids in prompts]
        return JSONResponse(emb.rerank_response(body, self.state.settings.model_alias, prompts,
                                                docs, scores, top_n, tei))

    async def _native_events(self, request: Request, job: Job, first: Event, prefix: str,
                             ids: list[int]) -> AsyncIterator[str]:
        """llama-server's own stream: {"content", "stop": false} per piece, then the last
        object with "stop": true, the counts and the timings."""
        try:
            if prefix:
                yield sse({"content": prefix, "stop": False, "index": 0, "id_slot": -1})
            async for ev in self._stream_events(request, job, first):
                if ev.kind == "text":
                    yield sse({"content": ev.text, "stop": False, "index": 0, "id_slot": -1,
                               "tokens": []})
                elif ev.kind == "progress":
                    yield sse(native_progress(ev))
                    job.t_first = time.monotonic()  # prompt timings end at the last chunk
                elif ev.kind == "done":
                    yield sse(native_completion(job, "", ev, ids))
                else:
                    yield sse(ApiError(ev.status, ev.message).body())
        finally:
            job.req.cancel()

    async def _completions(self, request: Request) -> Response:
        st = self.state
        # llama-server: /completion and /completions answer in its own shape, /v1/... in OAI's
        native = request.url.path in ("/completion", "/completions")
        body = self.with_defaults(await json_body(request))
        opts = oa.parse_common(body, st.llm.spec.n_vocab)
        ids = await run_in_threadpool(prompt_ids, st, body.get("prompt"))
        for name in ("suffix", "best_of"):
            if body.get(name) not in (None, 1):
                raise oa.bad(name, f"'{name}' is not supported", "unsupported_parameter")
        echo = bool(body.get("echo", False))
        check_prompt(st, ids)
        job = submit(st, ids, opts, make_constraint(st, opts),
                     progress=native and opts.stream and body.get("return_progress") is True)
        job.rid, job.created = oa.new_id("cmpl"), oa.now()
        prefix = st.llm.tokenizer.decode(ids) if echo else ""
        try:
            first = await first_event(request, job)
        except BaseException:
            job.req.cancel()
            raise
        if not opts.stream:
            try:
                text, done = await collect(request, job, first)
            finally:
                job.req.cancel()
            self.state.metrics.observe_latency(time.monotonic() - job.t0, job.t_first - job.t0)
            if native:
                return JSONResponse(native_completion(job, prefix + text, done, ids))
            return JSONResponse(oa.completion_response(job.rid, job.model, job.created,
                                                       prefix + text, done.finish,
                                                       usage_of(done)))
        if native:
            return StreamingResponse(self._native_events(request, job, first, prefix, ids),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def events() -> AsyncIterator[str]:
            try:
                if prefix:
                    yield sse(oa.completion_response(job.rid, job.model, job.created, prefix,
                                                     None, None))
                async for ev in self._stream_events(request, job, first):
                    if ev.kind == "text":
                        yield sse(oa.completion_response(job.rid, job.model, job.created,
                                                         ev.text, None, None))
                    elif ev.kind == "done":
                        yield sse(oa.completion_response(job.rid, job.model, job.created, "",
                                                         ev.finish, None))
                        if job.include_usage:
                            d = oa.completion_response(job.rid, job.model, job.created, "",
                                                       None, usage_of(ev))
                            d["choices"] = []
                            yield sse(d)
                    else:
                        yield sse(ApiError(ev.status, ev.message).body())
                yield "data: [DONE]\n\n"
            finally:
                job.req.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _chat(self, request: Request) -> Response:
        st = self.state
        body = self.with_defaults(await json_body(request))
        opts = oa.parse_common(body, st.llm.spec.n_vocab)
        messages = oa.parse_messages(body)
        tools, choice = oa.parse_tools(body)
        template = st.llm.tokenizer.chat_template or ""
        msgs, tmpl_tools = tl.prepare_messages(messages, tools, choice, template)
        try:
            text = await run_in_threadpool(render_prompt, st.llm, msgs, tmpl_tools)
        except Exception as e:  # jinja raise_exception(...) or a template bug
            raise ApiError(400, f"the chat template rejected the messages: {e}",
                           param="messages", code="invalid_messages") from None
        prefix, forced = tl.forced_prefix(choice, tools)
        ids = await run_in_threadpool(tokenize_prompt, st, text + prefix)
        check_prompt(st, ids)
        tool = next((t for t in tools or [] if t["function"]["name"] == forced), None)
        job = submit(st, ids, opts, make_constraint(st, opts, tool))
        job.rid, job.created = oa.new_id("chatcmpl"), oa.now()
        try:
            first = await first_event(request, job)
        except BaseException:
            job.req.cancel()
            raise
        if not opts.stream:
            try:
                text, done = await collect(request, job, first)
            finally:
                job.req.cancel()
            self.state.metrics.observe_latency(time.monotonic() - job.t0, job.t_first - job.t0)
            content, calls, finish = text, None, done.finish
            if forced is not None:
                content, calls = None, [tl.make_call(forced, text)]
            elif tools:
                content, calls = tl.parse_tool_calls(text, tools)
            if calls:
                finish = "tool_calls" if finish == "stop" else finish
            return JSONResponse(oa.chat_response(job.rid, job.model, job.created, content,
                                                 calls or None, finish, usage_of(done)))

        def chunk(delta: dict, finish: str | None = None) -> str:
            return sse(oa.chat_chunk(job.rid, job.model, job.created, delta, finish))

        async def events() -> AsyncIterator[str]:
            ts = tl.ToolStream(tools) if tools and forced is None else None
            try:
                yield chunk({"role": "assistant", "content": "" if forced is None else None})
                if forced is not None:
                    call = tl.make_call(forced, "")
                    yield chunk({"tool_calls": [{"index": 0, **call}]})
                async for ev in self._stream_events(request, job, first):
                    if ev.kind == "text":
                        if forced is not None:
                            yield chunk({"tool_calls": [{"index": 0, "function":
                                                         {"arguments": ev.text}}]})
                        else:
                            out = ts.feed(ev.text) if ts else ev.text
                            if out:
                                yield chunk({"content": out})
                    elif ev.kind == "done":
                        finish = ev.finish
                        if forced is not None and finish == "stop":
                            finish = "tool_calls"
                        if ts is not None:
                            rest, calls = ts.finish()
                            if rest:
                                yield chunk({"content": rest})
                            if calls:
                                yield chunk({"tool_calls": [{"index": i, **c}
                                                            for i, c in enumerate(calls)]})
                                finish = "tool_calls" if finish == "stop" else finish
                        yield chunk({}, finish)
                        if job.include_usage:
                            yield sse(oa.chat_chunk(job.rid, job.model, job.created, {},
                                                    usage_=usage_of(ev), choices=False))
                    else:
                        yield sse(ApiError(ev.status, ev.message).body())
                yield "data: [DONE]\n\n"
            finally:
                job.req.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _stream_events(self, request: Request, job: Job,
                             first: Event) -> AsyncIterator[Event]:
        """Events up to and including the last one; a timeout becomes an error event."""
        ev = first
        while True:
            yield ev
            if ev.kind not in ("text", "progress"):
                break
            try:
                # the response task notices a hang-up itself (Starlette cancels it)
                ev = await next_event(request, job.req, job.queue, job.deadline, False)
            except ApiError as e:
                yield Event("error", status=e.status, message=e.message)
                break
        self.state.metrics.observe_latency(time.monotonic() - job.t0, job.t_first - job.t0)


# ---------------------------------------------------------------------------- app
def create_app(state: ServerState, warmup: bool = True) -> HttpRules:
    h = Handlers(state)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if state.scheduler is not None:
            state.scheduler.start()
        if warmup:
            await asyncio.get_running_loop().run_in_executor(None, state.warmup)
        yield
        if state.scheduler is not None:
            state.scheduler.stop()

    routes = []
    for path, fn, methods in (
        ("/v1/chat/completions", h.chat, ["POST"]), ("/chat/completions", h.chat, ["POST"]),
        ("/v1/completions", h.completions, ["POST"]), ("/completions", h.completions, ["POST"]),
        ("/completion", h.completions, ["POST"]),
        ("/props", h.props, ["GET", "POST"]), ("/slots", h.slots, ["GET"]),
        ("/slots/{id_slot}", h.slots, ["POST"]),
        ("/v1/models", h.models, ["GET"]), ("/models", h.models, ["GET"]),
        ("/tokenize", h.tokenize, ["POST"]), ("/detokenize", h.detokenize, ["POST"]),
        ("/health", h.health, ["GET"]), ("/v1/health", h.health, ["GET"]),
        ("/metrics", h.metrics, ["GET"]),
        ("/lora-adapters", h.lora_adapters, ["GET", "POST"]),
        ("/v1/embeddings", h.embeddings_oai, ["POST"]),
        # llama-server's own (non-OAI) shape on these two, as its server.cpp routes them
        ("/embeddings", h.embeddings, ["POST"]), ("/embedding", h.embeddings, ["POST"]),
        ("/rerank", h.rerank, ["POST"]), ("/reranking", h.rerank, ["POST"]),
        ("/v1/rerank", h.rerank, ["POST"]), ("/v1/reranking", h.rerank, ["POST"]),
    ):
        routes.append(Route(path, fn, methods=methods))

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        msg = (f"no route {request.method} {request.url.path}" if status == 404
               else f"method {request.method} not allowed on {request.url.path}")
        return error_response(ApiError(status, msg, code="not_found" if status == 404
                                       else "method_not_allowed"))

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: not_found})
    app.state.max_body = state.settings.max_body
    return HttpRules(app, state.settings)


def _title(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Header names as llama-server writes them ('Access-Control-Allow-Origin'): Starlette
    lowercases them, and clients that copy headers into a plain dict (llama.cpp's own test
    suite does) look them up by llama-server's casing. h11 sends names as given."""
    return [(k.decode("latin-1").title().encode("latin-1"), v) for k, v in headers]


def origin_is_localhost(origin: str) -> bool:
    try:
        host = urlsplit(origin).hostname
    except ValueError:
        return False
    return host in ("localhost", "127.0.0.1", "::1")


class HttpRules:
    """What llama-server does before routing (server-http.cpp's pre-routing handler): CORS
    headers on every answer (--cors-origins: '*' echoes the Origin, 'localhost' echoes loopback
    origins only, anything else is sent as is), OPTIONS answered at once without a key, and a
    body larger than the limit refused from its Content-Length before it is read."""

    METHODS = "GET, POST, DELETE, OPTIONS"

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings
        self.state = app.state  # ServerThread and tests reach the Starlette app's state

    def _allow_origin(self, origin: str | None) -> str | None:
        rule = self.settings.cors_origins
        if rule == "*":
            return origin or "*"
        if rule == "localhost":
            return origin if origin and origin_is_localhost(origin) else None
        return rule

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        allow = self._allow_origin(headers.get("origin"))
        extra = [(b"access-control-allow-origin", allow.encode("latin-1"))] if allow else []
        if scope["method"] == "OPTIONS":
            hdrs = extra + [(b"access-control-allow-credentials", b"true"),
                            (b"access-control-allow-methods", self.METHODS.encode()),
                            (b"access-control-allow-headers", b"*"),
                            (b"content-type", b"text/html"), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 200, "headers": _title(hdrs)})
            await send({"type": "http.response.body", "body": b""})
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.settings.max_body:
            resp = error_response(ApiError(413, "the request body is larger than "
                                           f"{self.settings.max_body} bytes",
                                           code="body_too_large"))
            return await resp(scope, receive, send)

        async def send_cors(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": _title(list(msg.get("headers", [])) + extra)}
            await send(msg)

        await self.app(scope, receive, send_cors)


class ServerThread:
    """uvicorn in a background thread (tests, notebooks): ``with ServerThread(...) as s:``."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0,
                 warmup: bool = True):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.state = state
        cfg = uvicorn.Config(create_app(state, warmup), log_level="warning", http="h11",
                             loop="asyncio", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="jllama-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 600.0) -> ServerThread:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start in time")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
