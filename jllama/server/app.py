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
import dataclasses
import functools
import hmac
import json
import logging
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
from jllama.server import agent, media, slot_state, streams
from jllama.server import anthropic as anth
from jllama.server import chat_formats as cf
from jllama.server import cors_proxy as cp
from jllama.server import embeddings as emb
from jllama.server import infill as inf
from jllama.server import native as nat
from jllama.server import openai_schema as oa
from jllama.server import reasoning_budget as rb
from jllama.server import responses as resp
from jllama.server import tools as tl
from jllama.server.gbnf import GrammarError
from jllama.server.gcp import GcpParams, gcp_routes
from jllama.server.grammar import GrammarConstraint, JsonConstraint, compile_grammar
from jllama.server.json_schema import SchemaError, schema_to_grammar
from jllama.server.metrics import Metrics
from jllama.server.openai_schema import ApiError
from jllama.server.prompt_cache import PromptCache
from jllama.server.scheduler import Event, GenRequest, QueueFull, Scheduler, SchedulerDead
from jllama.tokenizer.chat import CHATML_TEMPLATE

DISCONNECT_POLL_S = 0.5
log = logging.getLogger("jllama.server")


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
    media_path: str | None = None  # llama-server's --media-path: file:// images read under it
    allow_remote_media: bool = False  # jllama's --allow-remote-media: fetch http(s) images
    context_shift: bool = False  # llama-server's --context-shift
    cache_reuse: int = 0  # llama-server's --cache-reuse (min chunk reused by KV shift; 0: off)
    swa_full: bool = False  # llama-server's --swa-full (allows the shift on SWA models)
    slot_save_path: str | None = None  # llama-server's --slot-save-path (ends with a '/')
    media_marker: str = field(default_factory=media.media_marker)  # places images in prompts
    n_batch: int = 2048  # llama-server's -b (its /infill layout depends on it)
    spm_infill: bool = False  # llama-server's --spm-infill
    gcp: GcpParams | None = None  # Google Cloud's /predict (AIP_MODE=PREDICTION): gcp.py
    # llama-server's --reasoning-format, --reasoning (-1 auto, 0 off, 1 on), --reasoning-budget
    # and --chat-template-kwargs (jllama/server/tools.py plan_chat)
    reasoning_format: str = "deepseek"
    reasoning: int = -1
    reasoning_budget: int = -1
    reasoning_budget_message: str = ""  # llama-server's --reasoning-budget-message
    template_kwargs: dict = field(default_factory=dict)
    jinja: bool = True  # llama-server's --jinja (default) / --no-jinja: built-in templates
    # llama-server's --sleep-idle-seconds (-1: never sleep), --cache-ram in MiB (-1: no limit,
    # 0: no host prompt cache; jllama serve's default is llama-server's 8192),
    # --cache-idle-slots and --kv-unified (jllama/server/prompt_cache.py, scheduler.py)
    sleep_idle_seconds: int = -1
    cache_ram: int = 0
    cache_idle_slots: bool = True
    kv_unified: bool = False
    # llama-server's --tools / --mcp-servers-* (agent.ServerTools, None: /tools answers 403)
    # and --ui-mcp-proxy (/cors-proxy)
    tools: agent.ServerTools | None = None
    ui_mcp_proxy: bool = False
    # llama-server's --grammar/-j (as GBNF): the constraint of requests that bring none
    grammar: str = ""
    slot_prompt_similarity: float = 0.1  # llama-server's -sps (scheduler.py _admit)
    embd_normalize: int = 2  # llama-server's --embd-normalize: requests' default
    api_prefix: str = ""  # llama-server's --api-prefix: every route under it
    static_path: str | None = None  # llama-server's --path: files from it at the prefix's /

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
        self.scheduler = None
        if llm is not None:
            eng = llm.engine
            cache = None
            if settings.cache_ram != 0:  # llama-server's n_ctx: the whole context's tokens
                cache = PromptCache(settings.cache_ram, eng.ctx_size *
                                    (1 if settings.kv_unified else eng.n_slots))
            idle = settings.cache_idle_slots
            if idle and cache is None:
                log.warning("--cache-idle-slots requires --cache-ram, disabling")
                idle = False
            elif idle:
                log.debug("__TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__")
            self.scheduler = Scheduler(llm, max_queue=settings.max_queue, metrics=self.metrics,
                                       context_shift=settings.context_shift,
                                       swa_full=settings.swa_full, prompt_cache=cache,
                                       cache_idle_slots=idle, kv_unified=settings.kv_unified,
                                       sleep_idle_s=settings.sleep_idle_seconds,
                                       cache_reuse=settings.cache_reuse,
                                       slot_similarity=settings.slot_prompt_similarity)
            # an embeddings runner on the same model keeps its weights through sleep
            self.scheduler.release_weights = encoder is None
            # first on going to sleep (before the model goes), last on waking up, as
            # llama-server registers its cached responses before loading the model
            self.scheduler.sleep_hooks.insert(0, self._on_sleep)
        # what /metrics reports while sleeping (llama-server's cached_metrics), and whether a
        # scrape then emptied its throughput buckets (the live ones are emptied on waking)
        self.metrics_asleep: Metrics | None = None
        self._scraped_asleep = False
        self.created = oa.now()
        self.ctx_size = llm.engine.ctx_size if llm is not None else encoder.n_ctx
        self.tokenizer = llm.tokenizer if llm is not None else encoder.tokenizer
        self.streams = streams.Sessions()  # resumable answers (X-Conversation-Id)

    @property
    def sleeping(self) -> bool:
        return self.scheduler is not None and self.scheduler.sleeping

    def _on_sleep(self, sleeping: bool) -> None:
        if sleeping:
            self.metrics_asleep = self.metrics.snapshot()
            self._scraped_asleep = False
        else:
            if self._scraped_asleep:
                self.metrics.reset_bucket()
            self.metrics_asleep = None

    async def awake(self) -> None:
        """llama-server's wait_until_no_sleep: a request that needs the model wakes the
        server up and waits for it."""
        if self.sleeping:
            await run_in_threadpool(self.scheduler.wait_awake)

    def scrape(self) -> str:
        """/metrics' text; the throughput buckets start over after each scrape, those of the
        sleep snapshot while sleeping."""
        snap = self.metrics_asleep if self.sleeping else None
        m = snap if snap is not None else self.metrics
        text = m.render()
        m.reset_bucket()
        if snap is not None:
            self._scraped_asleep = True
        return text

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
                         sink=lambda ev: done.set() if ev.kind != "text" else None,
                         warmup=True)
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


def render_prompt(llm, messages: list[dict], tools: list[dict] | None,
                  context: dict | None = None, generation_prompt: bool = True,
                  jinja: bool = True) -> str:
    """The GGUF's chat template (ChatML without one, as llama-server) applied to the
    conversation; ``context``: more template variables (enable_thinking, kwargs, dates).
    ``jinja=False``: the built-in template llama.cpp picks for it (--no-jinja)."""
    return llm.tokenizer.apply_chat_template(messages, generation_prompt, tools,
                                             fallback_chatml=True, jinja=jinja,
                                             **(context or {}))


def child_options(opts: oa.GenOptions, k: int) -> oa.GenOptions:
    """Choice k of an n > 1 request, as llama-server's child task k (server_task::add_child):
    no slot of its own choosing, and a fixed seed moved on by k."""
    if k == 0:
        return opts
    p = opts.params
    if p.seed is not None and p.seed % 2**32 != 0xFFFFFFFF:  # LLAMA_DEFAULT_SEED: random
        p = dataclasses.replace(p, seed=(p.seed + k) % 2**32)
    return dataclasses.replace(opts, id_slot=-1, params=p)


def n_out_of_range(n: int, n_slots: int) -> ApiError:
    """llama-server's words for n_cmpl past its hard limit (the slot count)."""
    return oa.bad("n", f"Field 'n': Value must be between 1 <= value <= {n_slots}, but got {n}")


def legacy_chat_checks(body: dict, tools) -> None:
    """llama-server's refusals without Jinja (oaicompat_chat_params_parse, a 500)."""
    if tools:
        raise emb.server_error((500, "server_error"), "tools param requires --jinja flag")
    choice = body.get("tool_choice")
    if isinstance(choice, str) and choice != "auto":
        raise emb.server_error((500, "server_error"), "tool_choice param requires --jinja flag")


def image_prompt(state: ServerState, text: str, images: list[tuple[str, str]]) -> list:
    """The chat prompt with its images (image_url parts) as scheduler items: token ids and
    ImageChunks (the images read, decoded and encoded here, off the event loop)."""
    need_vision(state, images[0][0])
    st = state.settings
    files = [(param, media.media_bytes(param, url, st.media_path, st.allow_remote_media))
             for param, url in images]
    tk = state.llm.tokenizer
    add = not (tk.add_bos and tk.bos_id is not None and text.startswith(tk.piece_text(tk.bos_id)))
    return media_items(state, text, files, add, "messages")


def need_vision(state: ServerState, param: str) -> None:
    if getattr(state.llm, "vision", None) is None:
        # llama-server's words and status (a runtime_error in its chat parsing: 500)
        raise ApiError(500, "image input is not supported - hint: if this is unexpected, you "
                       "may need to provide the mmproj (--mmproj)", param=param,
                       code="unsupported_content")


def media_items(state: ServerState, text: str, files: list[tuple[str, bytes]], add: bool,
                param: str) -> list:
    """A prompt with ``<__media__>`` markers and one encoded image per marker -> scheduler
    items (token ids and ImageChunks); ApiError(400) for an image that does not decode or a
    marker count that does not match."""
    from jllama.engine import multimodal
    from jllama.errors import ImageError, JllamaError
    from jllama.models.clip_image import decode_image

    arrays = []
    for p, data in files:
        try:
            arrays.append(decode_image(data, p))
        except ImageError as e:
            raise ApiError(400, str(e), param=p, code="invalid_image") from None
    try:
        chs = multimodal.chunks(state.llm.tokenizer, state.llm.vision, text, arrays,
                                add_special=add, marker=state.settings.media_marker)
    except JllamaError as e:
        raise ApiError(400, str(e), param=param, code="invalid_image") from None
    items: list = []
    for c in chs:
        if isinstance(c, list):
            items.extend(c)
        else:
            items.append(c)
    return items


def embedding_media(state: ServerState, entry: dict) -> list:
    """An /embeddings entry with images -> token ids and ImageChunks, as llama-server's
    handle_embeddings_impl reads it: {"prompt_string", "multimodal_data": [base64]}
    (process_mtmd_prompt) or OpenAI {"content": [text and image_url parts]}
    (tokenize_oai_content_array: the texts joined, each image a media marker; no image: the
    text tokenized as is)."""
    if "content" in entry:
        urls: list[tuple[str, str]] = []
        content = entry["content"]
        if not isinstance(content, list):
            raise emb.server_error((400, "invalid_request_error"), '"content" must be an array')
        text = oa.message_text(content, "input.content", urls, state.settings.media_marker)
        if not urls:
            return state.llm.tokenizer.encode(text, add_special=True, parse_special=True)
        need_vision(state, urls[0][0])
        st = state.settings
        files = [(param, media.media_bytes(param, url, st.media_path, st.allow_remote_media))
                 for param, url in urls]
        return media_items(state, text, files, True, "input")
    if getattr(state.llm, "vision", None) is None:
        raise emb.server_error((400, "invalid_request_error"), "Multimodal data provided, but "
                               "model does not support multimodal requests.")
    text, data = entry.get("prompt_string"), entry.get("multimodal_data")
    if not isinstance(text, str):
        raise oa.bad("input", "'prompt_string' must be a string", "invalid_type")
    return media_items(state, text, _b64_files(data, "input.multimodal_data",
                                              "multimodal_data"), True, "input")


def _b64_files(data, field: str, name: str) -> list[tuple[str, bytes]]:
    """llama-server's ``multimodal_data``: a list of base64 strings, decoded and named for
    error messages (``name[i]``)."""
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise oa.bad(field, "'multimodal_data' must be a list of base64 strings",
                     "invalid_type")
    return [(f"{name}[{i}]", media.b64(f"{name}[{i}]", d)) for i, d in enumerate(data)]


def prompt_text(state: ServerState, items: list) -> str:
    """The prompt's text for echo and the native ``prompt`` field: its token ids decoded (an
    image's embeddings have no text)."""
    return state.llm.tokenizer.decode([t for t in items if isinstance(t, int)])


def prompt_length(items: list) -> int:
    return sum(1 if isinstance(t, int) else t.embd.shape[0] for t in items)


def prompt_ids(state: ServerState, prompt) -> list[int]:
    """A completion prompt in llama-server's forms (tokenize_input_prompts): a string, token
    ids, a list mixing ids and strings (only a string that comes first gets BOS), or
    {"prompt_string": ..., "multimodal_data": [base64 images]} (token ids and ImageChunks); a list
    holding one prompt counts as that prompt. Runs off the event loop (pure Python)."""
    tk = state.llm.tokenizer
    n_vocab = state.llm.spec.n_vocab
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list, dict)):
        prompt = prompt[0]
    if isinstance(prompt, dict):
        text = prompt.get("prompt_string")
        if not isinstance(text, str):
            raise oa.bad("prompt", "'prompt.prompt_string' must be a string", "invalid_type")
        if "multimodal_data" in prompt:
            if getattr(state.llm, "vision", None) is None:
                raise oa.bad("prompt", "Multimodal data provided, but model does not support "
                             "multimodal requests.")
            files = _b64_files(prompt["multimodal_data"], "prompt.multimodal_data",
                               "prompt.multimodal_data")
            return media_items(state, text, files, True, "prompt")
        prompt = text
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
                 "(or, on /completion, a list of such prompts)", "invalid_type")


def check_prompt(state: ServerState, ids: list[int]) -> None:
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt", code="empty_prompt")
    n = prompt_length(ids)
    if n >= state.ctx_size:
        # llama-server's words and error (ERROR_TYPE_EXCEED_CONTEXT_SIZE: code 400, with the
        # prompt's length and the slot's context), with or without context shift
        e = emb.server_error((400, "exceed_context_size_error"),
                             f"request ({n} tokens) exceeds the available context size "
                             f"({state.ctx_size} tokens), try increasing it")
        e.extra = {"n_prompt_tokens": n, "n_ctx": state.ctx_size}
        raise e


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
    probs: list = field(default_factory=list)  # token probabilities collected so far


def submit(state: ServerState, ids: list, opts: oa.GenOptions, constraint,
           progress: bool = False, budget=None) -> Job:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def sink(ev: Event) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
            loop.call_soon_threadsafe(q.put_nowait, ev)

    items = None
    if not all(isinstance(t, int) for t in ids):  # a prompt with images
        items, ids = ids, [t for t in ids if isinstance(t, int)]
    req = GenRequest(ids, opts.max_tokens, opts.params, opts.stop, sink, constraint,
                     opts.cache_prompt, lora=opts.lora, n_probs=opts.n_probs,
                     ignore_eos=opts.ignore_eos, post_sampling=opts.post_sampling_probs,
                     prompt_items=items, return_progress=progress, id_slot=opts.id_slot,
                     n_keep=opts.n_keep, n_discard=opts.n_discard,
                     n_cache_reuse=opts.n_cache_reuse,
                     reasoning_budget=budget() if budget is not None else None)
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
    checked = time.monotonic()
    while ev.kind == "text":
        parts.append(ev.text)
        job.probs += ev.probs or []
        # tokens keep arriving, so next_event never idles long enough to look for a hang-up:
        # look every DISCONNECT_POLL_S here, or a gone client's request runs to its end
        if time.monotonic() - checked > DISCONNECT_POLL_S:
            checked = time.monotonic()
            if await request.is_disconnected():
                job.req.cancel()
                raise ClientGone()
        ev = await next_event(request, job.req, job.queue, job.deadline, True)
    if ev.kind == "error":
        raise ApiError(ev.status, ev.message)
    return "".join(parts), ev


def job_timings(job: Job, done: Event | None = None) -> dict:
    """llama-server's result_timings of a request so far (``done``: its last event)."""
    now = time.monotonic()
    t_first = job.t_first or now
    req = job.req
    return nat.timings(req.cached_tokens, max(len(req.prompt_ids) - req.cached_tokens, 0),
                       t_first - job.t0, done.completion_tokens if done is not None
                       else req.completion_tokens, now - t_first)


def usage_of(ev: Event) -> dict:
    return oa.usage(ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens)


def make_constraint(state: ServerState, opts: oa.GenOptions,
                    tool: dict | None = None) -> JsonConstraint | None:
    """The arguments of a forced tool call (JSON guided by the tool's parameter schema), or
    llama-server's grammar: ``grammar`` (GBNF) or a JSON schema (``json_schema``,
    ``response_format``) turned into one with llama.cpp's rules. A grammar or schema llama.cpp
    would refuse fails this request alone, with llama-server's 400."""
    sch = state.scheduler
    if tool is not None:
        schema = tool["function"].get("parameters") or {"type": "object"}
        return JsonConstraint(sch.token_bytes(), sch.eog, root="object", schema=schema)
    text = opts.grammar
    if not text and opts.json_schema is None:  # llama-server: the request's own wins
        text = state.settings.grammar
    if opts.json_schema is not None:
        try:
            text = schema_to_grammar(opts.json_schema)
        except SchemaError as e:
            raise emb.server_error((400, "invalid_request_error"), f'"json_schema": {e}') \
                from None
    if not text:
        return None
    tk = state.llm.tokenizer

    def token_id(piece: str) -> int | None:  # <token> terminals: exactly one token
        ids = tk.encode(piece, add_special=False, parse_special=True)
        return ids[0] if len(ids) == 1 else None

    try:
        g = compile_grammar(text, token_id=token_id)
    except GrammarError as e:
        raise emb.server_error((400, "invalid_request_error"), "Failed to initialize samplers: "
                               f"failed to parse grammar ({e})") from None
    return GrammarConstraint(sch.grammar_token_bytes(), sch.eog, g)


class Handlers:
    def __init__(self, state: ServerState):
        self.state = state

    # ------------------------------------------------------------------ plumbing
    async def _run(self, request: Request, endpoint: str, fn, auth: bool = True) -> Response:
        # llama-server's status reads: they neither wake a sleeping server nor count as work
        status_read = endpoint in ("/metrics", "/v1/models") or (
            endpoint == "/props" and request.method == "GET")
        try:
            if auth:
                check_auth(self.state, request)
            if not status_read:
                await self.state.awake()
            resp = await fn(request)
        except ApiError as e:
            resp = error_response(e)
        except ClientGone:
            resp = Response(status_code=499)
        if not status_read:
            self.state.metrics.observe_request(endpoint, resp.status_code)
        return resp

    async def chat(self, request: Request) -> Response:
        return await self._run(request, "/v1/chat/completions", self._generating(self._chat))

    async def completions(self, request: Request) -> Response:
        return await self._run(request, "/v1/completions", self._generating(self._completions))

    async def completion_native(self, request: Request) -> Response:
        return await self._run(request, "/completion", self._generating(self._completion_native))

    def _generating(self, fn):
        if self.state.llm is not None:
            async def resumable(request: Request) -> Response:
                return streams.detach(self.state.streams, request, await fn(request))
            return resumable

        async def refuse(request: Request) -> Response:
            raise emb.server_error((501, "not_supported_error"), "This server does not support "
                                   "completions. Start it without `--embeddings`")
        return refuse

    async def stream_get(self, request: Request) -> Response:
        return await self._run(request, "/v1/stream",
                               lambda r: streams.get_route(self.state.streams, r))

    async def stream_delete(self, request: Request) -> Response:
        async def fn(request):
            return streams.delete_route(self.state.streams, request)
        return await self._run(request, "/v1/stream", fn)

    async def streams_lookup(self, request: Request) -> Response:
        return await self._run(request, "/v1/streams/lookup",
                               lambda r: streams.lookup_route(self.state.streams, r))

    async def embeddings_oai(self, request: Request) -> Response:
        return await self._run(request, "/v1/embeddings", self._embeddings_oai)

    async def embeddings(self, request: Request) -> Response:
        return await self._run(request, "/embeddings", self._embeddings)

    async def rerank(self, request: Request) -> Response:
        return await self._run(request, "/rerank", self._rerank)

    async def cors_proxy(self, request: Request) -> Response:
        return await self._run(request, "/cors-proxy",
                               cp.proxy_handler(self.state.settings.ui_mcp_proxy))

    async def tools(self, request: Request) -> Response:
        return await self._run(request, "/tools", agent.tools_handler(self.state.settings.tools))

    async def models(self, request: Request) -> Response:
        return await self._run(request, "/v1/models", self._models)

    def bias_tokens(self, text: str) -> list[int]:
        """A logit_bias string's tokens, as llama-server's common_tokenize(vocab, text, false)."""
        return self.state.llm.tokenizer.encode(text, add_special=False, parse_special=False)

    def with_defaults(self, body: dict) -> dict:
        """The server's defaults (llama-server's --temp, --seed, -n, ...) for the fields a
        request leaves out; llama-server's n_predict is max_tokens under its own name."""
        st = self.state.settings
        out = {**{k: v for k, v in st.defaults.items() if body.get(k) is None}, **body}
        n = out.get("n_predict")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < -1):
            raise oa.bad("n_predict", "'n_predict' must be an integer >= -1", "invalid_type")
        if n is not None and n != -1:  # llama-server: n_predict, when given, wins over max_tokens
            out.pop("max_completion_tokens", None)
            out["max_tokens"] = n
        elif n == -1 or (out.get("max_tokens") is None and out.get("max_completion_tokens") is None):
            out.pop("max_tokens", None)
            out.pop("max_completion_tokens", None)
            if st.n_predict is not None and st.n_predict > 0:
                out["max_tokens"] = st.n_predict
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
        return PlainTextResponse(self.state.scrape(),
                                 media_type="text/plain; version=0.0.4",
                                 headers={"Process-Start-Time-Unix":
                                          str(int(self.state.metrics.started))})

    async def slots(self, request: Request) -> Response:
        return await self._run(request, "/slots", self._slots)

    async def _slots(self, request: Request) -> Response:
        """llama-server's GET /slots (its slot to_json with only_metrics)."""
        st = self.state
        if request.method == "POST":  # llama-server's post_slots: not gated by --slots
            return JSONResponse(await slot_state.post_slot_action(st, request))
        if not st.settings.slots:
            raise emb.server_error((501, "not_supported_error"), "This server does not support "
                                   "slots endpoint. Start it with `--slots`")
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
                d["params"] = nat.params_json(a.req.params, a.req.max_tokens)
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
        names = {f.name for f in dataclasses.fields(SamplingParams)} - {"logit_bias"}
        sp = SamplingParams(**{k: v for k, v in d.items() if k in names})
        tk = st.tokenizer
        path = st.llm.path if st.llm is not None else st.encoder.path

        def piece(i):
            return tk.token_to_piece(i).decode("utf-8", "replace") if i is not None else ""

        return JSONResponse({
            "default_generation_settings": {
                "params": nat.params_json(sp, st.settings.n_predict, d.get("seed")),
                "n_ctx": st.ctx_size},
            "total_slots": st.scheduler.n_slots if st.scheduler is not None else 1,
            "model_alias": st.settings.model_alias, "model_path": str(path),
            "modalities": {"vision": getattr(st.llm, "vision", None) is not None,
                           "video": False, "audio": False},
            "media_marker": st.settings.media_marker,
            "endpoint_slots": st.settings.slots, "endpoint_props": st.settings.props,
            "endpoint_metrics": st.settings.metrics, "ui": False,
            "chat_template": getattr(tk, "chat_template", None) or "",
            "bos_token": piece(getattr(tk, "bos_id", None)),
            "eos_token": piece(getattr(tk, "eos_id", None)),
            "build_info": "jllama", "is_sleeping": st.sleeping})

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
        # llama-server's get_res_models: an Ollama-style "models" entry beside the OAI list,
        # whose capabilities say whether images are accepted (a projector is loaded)
        caps = ["completion"] + (["multimodal"] if getattr(st.llm, "vision", None) else [])
        ollama = {"name": st.settings.model_alias, "model": st.settings.model_alias,
                  "modified_at": "", "size": "", "digest": "", "type": "model",
                  "description": "", "tags": [""], "capabilities": caps, "parameters": "",
                  "details": {"parent_model": "", "format": "gguf", "family": "",
                              "families": [""], "parameter_size": "",
                              "quantization_level": ""}}
        return JSONResponse({"models": [ollama], "object": "list", "data": [m]})

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
        mm = (functools.partial(embedding_media, self.state) if self.state.llm is not None
              else None)
        seqs, oai, b64, norm = await run_in_threadpool(emb.parse_embeddings, enc, body, oai,
                                                       True, mm,
                                                       self.state.settings.embd_normalize)
        outs = [await run_in_threadpool(
            enc.run if all(isinstance(t, int) for t in ids) else enc.run_items, ids)
            for ids in seqs]
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

    async def _completions(self, request: Request) -> Response:
        """OpenAI's /v1/completions (llama-server's /completion and /completions answer in its
        own shape: ``_completion_native``)."""
        st = self.state
        body = self.with_defaults(await json_body(request))
        opts = oa.parse_common(body, st.llm.spec.n_vocab, tokenize=self.bias_tokens)
        ids = await run_in_threadpool(prompt_ids, st, body.get("prompt"))
        for name in ("suffix", "best_of"):
            if body.get(name) not in (None, 1):
                raise oa.bad(name, f"'{name}' is not supported", "unsupported_parameter")
        echo = bool(body.get("echo", False))
        check_prompt(st, ids)
        prefix = prompt_text(st, ids) if echo else ""
        if opts.n > 1:
            return await self._many(request, ids, opts, lambda: make_constraint(st, opts),
                                    prefix=prefix)
        job = submit(st, ids, opts, make_constraint(st, opts))
        job.rid, job.created = oa.new_id("cmpl"), oa.now()
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
            out = oa.completion_response(job.rid, job.model, job.created, prefix + text,
                                         done.finish, usage_of(done), oa.logprobs_of(job.probs))
            out["timings"] = job_timings(job, done)  # llama-server: a final result's stats
            return JSONResponse(self._verbose(body, out, job, opts, ids, text, done))

        async def events() -> AsyncIterator[str]:
            try:
                if prefix:
                    yield sse(oa.completion_response(job.rid, job.model, job.created, prefix,
                                                     None, None))
                async for ev in self._stream_events(request, job, first):
                    if ev.kind == "text":
                        yield sse(oa.completion_response(job.rid, job.model, job.created,
                                                         ev.text, None, None,
                                                         oa.logprobs_of(ev.probs)))
                    elif ev.kind == "done":  # llama-server: usage and timings on it, always
                        yield sse({**oa.completion_response(job.rid, job.model, job.created, "",
                                                            ev.finish, usage_of(ev)),
                                   "timings": job_timings(job, ev)})
                    else:
                        yield sse(ApiError(ev.status, ev.message).body())
                yield "data: [DONE]\n\n"
            finally:
                job.req.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _render_chat(self, body: dict, tools, choice,
                           images: list, allow_empty: bool = False
                           ) -> tuple[str, str, tl.ChatPlan]:
        """The chat request's prompt text, what its generation prompt added, and its plan
        (jllama/server/tools.py); ``images`` collects its image_url parts."""
        st = self.state
        ss = st.settings
        messages = oa.parse_messages(body, images, ss.media_marker, allow_empty)
        template = st.llm.tokenizer.chat_template or CHATML_TEMPLATE
        add_gen = body.get("add_generation_prompt", True) is not False
        cont = oa.continuation(body, messages)
        if not ss.jinja:  # llama.cpp's legacy path: a bare conversation, no tools, no thoughts
            legacy_chat_checks(body, tools)
            messages = oa.legacy_messages(body, ss.media_marker)
            tools, choice, template = None, None, ""
            if cont is not None:  # rendered whole, without a generation prompt
                cont, add_gen = None, False
        if cont is not None:  # common_chat_templates_apply: the rest, its generation prompt,
            messages, add_gen = messages[:-1], True  # then the final message's text
        plan = tl.plan_chat(body, messages, tools, choice, template, ss.reasoning_format,
                            ss.reasoning, ss.reasoning_budget, ss.template_kwargs,
                            ss.reasoning_budget_message)
        msgs, context = (plan.messages, plan.context) if ss.jinja else (messages, {})
        try:
            text = await run_in_threadpool(render_prompt, st.llm, msgs, plan.template_tools,
                                           context, add_gen, ss.jinja)
            bare = await run_in_threadpool(render_prompt, st.llm, msgs, plan.template_tools,
                                           context, False, ss.jinja)
        except Exception as e:  # jinja raise_exception(...) or a template bug
            raise ApiError(400, f"the chat template rejected the messages: {e}",
                           param="messages", code="invalid_messages") from None
        gen = cf.generation_prompt(text, bare)
        if cont is not None:
            text, gen = text + cont, gen + cont
        return text, gen, plan

    async def _apply_template(self, request: Request) -> Response:
        """llama-server's /apply-template: the chat prompt a request would get."""
        body = await json_body(request)
        tools, choice = oa.parse_tools(body)
        text, gen, plan = await self._render_chat(body, tools, choice, [])
        return JSONResponse({"prompt": text + plan.budget_suffix(gen)})

    async def apply_template(self, request: Request) -> Response:
        return await self._run(request, "/apply-template",
                               self._generating(self._apply_template))

    async def _chat_prompt(self, body: dict, tools, choice, allow_empty: bool = False
                           ) -> tuple[list, str | None, tl.ChatReply]:
        """The chat request's prompt as scheduler items (token ids, and ImageChunks for its
        image_url parts), the tool a tool_choice forces (or None) and the reader of its reply
        (reasoning and tool calls in the template's format)."""
        st = self.state
        images: list[tuple[str, str]] = []
        text, gen, plan = await self._render_chat(body, tools, choice, images, allow_empty)
        suffix = plan.budget_suffix(gen)
        gen += suffix
        prefix, forced = tl.forced_prefix(choice, tools, plan.fmt, plan.thinking_open(gen))
        text += suffix + prefix
        if images:
            ids = await run_in_threadpool(image_prompt, st, text, images)
        else:
            ids = await run_in_threadpool(tokenize_prompt, st, text)
        reply = plan.reply(gen)
        reply.budget = rb.budget_factory(
            plan.fmt.think, plan.budget,
            plan.budget_message, gen + prefix,
            lambda s: st.llm.tokenizer.encode(s, add_special=False, parse_special=True),
            st.scheduler.token_piece)
        return ids, forced, reply

    async def _chat_tokens(self, request: Request) -> Response:
        """llama-server's /chat/completions/input_tokens: the prompt's length (images count
        as their embeddings' tokens) without generating."""
        body = await json_body(request)
        tools, choice = oa.parse_tools(body)
        ids, _, _ = await self._chat_prompt(body, tools, choice)
        return JSONResponse({"input_tokens": prompt_length(ids)})

    async def chat_tokens(self, request: Request) -> Response:
        return await self._run(request, "/v1/chat/completions/input_tokens",
                               self._generating(self._chat_tokens))

    async def _chat(self, request: Request) -> Response:
        st = self.state
        body = self.with_defaults(await json_body(request))
        opts = oa.parse_common(body, st.llm.spec.n_vocab, chat=True,
                               tokenize=self.bias_tokens)
        tools, choice = oa.parse_tools(body)
        if tools and opts.grammar:
            raise emb.server_error((400, "invalid_request_error"),
                                   "Cannot use custom grammar constraints with tools.")
        ids, forced, reply = await self._chat_prompt(body, tools, choice)
        check_prompt(st, ids)
        tool = next((t for t in tools or [] if t["function"]["name"] == forced), None)
        if opts.n > 1:
            return await self._many(request, ids, opts, lambda: make_constraint(st, opts, tool),
                                    chat=True, forced=forced, tools=tools, reply=reply,
                                    progress=opts.stream and body.get("return_progress") is True)
        job = submit(st, ids, opts, make_constraint(st, opts, tool),
                     progress=opts.stream and body.get("return_progress") is True,
                     budget=reply.budget)
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
            reasoning, finish = None, done.finish
            if forced is not None:
                content, calls = None, [tl.make_call(forced, text)]
            else:
                content, reasoning, calls = reply.final(text)
            if calls:
                finish = "tool_calls" if finish == "stop" else finish
            out = oa.chat_response(job.rid, job.model, job.created, content, calls or None,
                                   finish, usage_of(done), oa.logprobs_of(job.probs),
                                   reasoning)
            out["timings"] = job_timings(job, done)  # llama-server: a final result's stats
            return JSONResponse(self._verbose(body, out, job, opts, ids, text, done))
        # llama-server: timings on every chunk group's last chunk with timings_per_token (and
        # always on the final group's last chunk); progress chunks repeat the role delta
        per_token = body.get("timings_per_token") is True

        def chunk(delta: dict, finish: str | None = None, probs: list | None = None,
                  **extra) -> str:
            return sse({**oa.chat_chunk(job.rid, job.model, job.created, delta, finish,
                                        logprobs=oa.logprobs_of(probs)), **extra})

        def tm() -> dict:
            return {"timings": job_timings(job)} if per_token else {}

        async def events() -> AsyncIterator[str]:
            try:
                # llama-server's first chunk: the role, content null
                yield chunk({"role": "assistant", "content": None})
                if forced is not None:
                    call = tl.make_call(forced, "")
                    yield chunk({"tool_calls": [{"index": 0, **call}]})
                async for ev in self._stream_events(request, job, first):
                    if ev.kind == "progress":
                        yield chunk({"role": "assistant", "content": None}, **tm(),
                                    prompt_progress={"total": ev.prompt_tokens,
                                                     "cache": ev.cached_tokens,
                                                     "processed": ev.processed,
                                                     "time_ms": ev.seconds * 1e3})
                        job.t_first = time.monotonic()  # prompt timings end at the last one
                    elif ev.kind == "text":
                        if forced is not None:
                            yield chunk({"tool_calls": [{"index": 0, "function":
                                                         {"arguments": ev.text}}]},
                                        probs=ev.probs, **tm())
                        else:
                            deltas = reply.feed(ev.text)
                            for k, d in enumerate(deltas):
                                last = k == len(deltas) - 1
                                yield chunk(d, probs=ev.probs if last else None,
                                            **(tm() if last else {}))
                            if not deltas and ev.probs:  # (llama-server: no chunk)
                                yield chunk({"content": ""}, probs=ev.probs, **tm())
                    elif ev.kind == "done":
                        finish = ev.finish
                        if forced is not None and finish == "stop":
                            finish = "tool_calls"
                        group: list[dict] = []
                        if forced is None:
                            deltas, called = reply.finish()
                            group += [oa.chat_chunk(job.rid, job.model, job.created, d)
                                      for d in deltas]
                            if called:
                                finish = "tool_calls" if finish == "stop" else finish
                        group.append(oa.chat_chunk(job.rid, job.model, job.created, {}, finish))
                        if job.include_usage:
                            group.append(oa.chat_chunk(job.rid, job.model, job.created, {},
                                                       usage_=usage_of(ev), choices=False))
                        group[-1]["timings"] = job_timings(job, ev)
                        if body.get("verbose") is True:
                            # streamed: the text already went out, as llama-server's
                            group[0] = {**group[0], "__verbose": self._verbose(
                                body, {}, job, opts, ids, "", ev)["__verbose"]}
                        for d in group:
                            yield sse(d)
                    else:
                        yield sse(ApiError(ev.status, ev.message).body())
                yield "data: [DONE]\n\n"
            finally:
                job.req.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    # -------------------------------------------- APIs llama-server answers from its chat path
    async def messages(self, request: Request) -> Response:
        return await self._run(request, "/v1/messages", self._generating(self._messages))

    async def messages_tokens(self, request: Request) -> Response:
        return await self._run(request, "/v1/messages/count_tokens",
                               self._generating(self._messages_tokens))

    async def responses(self, request: Request) -> Response:
        return await self._run(request, "/v1/responses", self._generating(self._responses))

    async def responses_tokens(self, request: Request) -> Response:
        return await self._run(request, "/v1/responses/input_tokens",
                               self._generating(self._responses_tokens))

    async def _messages(self, request: Request) -> Response:
        body = anth.to_chat(await json_body(request))
        rid, model = oa.new_id("chatcmpl"), self.state.settings.model_alias
        return await self._converted_chat(
            request, body, lambda r: anth.message(rid, model, r), anth.Stream(rid, model),
            allow_empty=True)

    async def _messages_tokens(self, request: Request) -> Response:
        body = anth.to_chat(await json_body(request))
        tools, choice = oa.parse_tools(body)
        ids, _, _ = await self._chat_prompt(body, tools, choice, allow_empty=True)
        return JSONResponse({"input_tokens": prompt_length(ids)})

    async def _responses(self, request: Request) -> Response:
        body = resp.to_chat(await json_body(request))
        model = self.state.settings.model_alias
        return await self._converted_chat(request, body, lambda r: resp.response(model, r),
                                          resp.Stream(model))

    async def _responses_tokens(self, request: Request) -> Response:
        body = resp.to_chat(await json_body(request))
        tools, choice = oa.parse_tools(body)
        ids, _, _ = await self._chat_prompt(body, tools, choice)
        return JSONResponse({"input_tokens": prompt_length(ids),
                             "object": "response.input_tokens"})

    async def _converted_chat(self, request: Request, body: dict, final, stream,
                              allow_empty: bool = False) -> Response:
        """A chat request converted from another API (``body``, already in chat form) run as
        /v1/chat/completions runs one, answered through ``final`` (a ChatOutcome -> the
        response object) or, streamed, through ``stream``'s events (anthropic.Stream,
        responses.Stream). With ``timings_per_token``, text events carry timings;
        ``return_progress`` adds prompt-progress events."""
        st = self.state
        body = self.with_defaults(body)
        opts = oa.parse_common(body, st.llm.spec.n_vocab, chat=True, tokenize=self.bias_tokens)
        tools, choice = oa.parse_tools(body)
        if tools and opts.grammar:
            raise emb.server_error((400, "invalid_request_error"),
                                   "Cannot use custom grammar constraints with tools.")
        ids, forced, reply = await self._chat_prompt(body, tools, choice, allow_empty)
        check_prompt(st, ids)
        tool = next((t for t in tools or [] if t["function"]["name"] == forced), None)
        job = submit(st, ids, opts, make_constraint(st, opts, tool),
                     progress=opts.stream and body.get("return_progress") is True,
                     budget=reply.budget)
        try:
            first = await first_event(request, job)
        except BaseException:
            job.req.cancel()
            raise

        def timings(done: Event | None = None) -> dict:
            return job_timings(job, done)

        def outcome(text: str, done: Event) -> oa.ChatOutcome:
            # the reply read as /v1/chat/completions reads it (the template's tool-call format;
            # its reasoning is not carried into these APIs' answers)
            if forced is not None:
                content, calls = None, [tl.make_call(forced, text)]
            else:
                content, _, calls = reply.fresh().final(text)
            return oa.ChatOutcome(content, calls or None, done.finish, job.req.stop_word,
                                  done.prompt_tokens, done.cached_tokens,
                                  done.completion_tokens, timings(done))

        if not opts.stream:
            try:
                text, done = await collect(request, job, first)
            finally:
                job.req.cancel()
            st.metrics.observe_latency(time.monotonic() - job.t0, job.t_first - job.t0)
            return JSONResponse(final(outcome(text, done)))
        per_token = body.get("timings_per_token") is True

        async def events() -> AsyncIterator[str]:
            texts: list[str] = []
            try:
                for e in stream.start(len(job.req.prompt_ids), job.req.cached_tokens):
                    yield e
                async for ev in self._stream_events(request, job, first):
                    if ev.kind == "progress":
                        for e in stream.progress({"total": ev.prompt_tokens,
                                                  "cache": ev.cached_tokens,
                                                  "processed": ev.processed,
                                                  "time_ms": ev.seconds * 1e3}):
                            yield e
                        job.t_first = time.monotonic()
                    elif ev.kind == "text":
                        texts.append(ev.text)
                        if forced is None:
                            out = "".join(d.get("content", "") for d in reply.feed(ev.text))
                            for e in stream.text(out, timings() if per_token else None):
                                yield e
                    elif ev.kind == "done":
                        r = outcome("".join(texts), ev)
                        if forced is None:
                            deltas, _ = reply.finish()
                            rest = "".join(d.get("content", "") for d in deltas)
                            if rest:
                                for e in stream.text(rest):
                                    yield e
                        for e in stream.done(r):
                            yield e
                    else:
                        yield stream.error(ApiError(ev.status, ev.message).body())
                end = stream.end()
                if end:
                    yield end
            finally:
                job.req.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def infill(self, request: Request) -> Response:
        return await self._run(request, "/infill", self._generating(self._infill))

    async def _infill(self, request: Request) -> Response:
        """llama-server's /infill: the FIM prompt (infill.prompt_tokens) completed as
        /completion completes a prompt of token ids, with its answer."""
        st = self.state
        tk = st.llm.tokenizer
        missing = inf.unsupported(tk.vocab.fim)
        if missing:
            raise emb.server_error((501, "not_supported_error"), missing)
        body = self.with_defaults(await json_body(request))
        extra = inf.check(body)
        prompt = body.get("prompt")
        p_ids = tk.encode(prompt, add_special=False, parse_special=True) \
            if isinstance(prompt, str) else []
        n_predict = st.settings.n_predict if st.settings.n_predict is not None else -1
        body["prompt"] = inf.prompt_tokens(tk, tk.vocab.fim, body["input_prefix"],
                                           body["input_suffix"], extra, p_ids,
                                           st.settings.n_batch, n_predict, st.ctx_size,
                                           st.settings.spm_infill)
        return await self._completion_native(request, body)

    def _verbose(self, body: dict, out: dict, job: Job, opts: oa.GenOptions, ids: list,
                 text: str, done: Event) -> dict:
        """llama-server's request field ``verbose`` (default: the server's --verbose): a whole
        OpenAI answer carries ``__verbose``, the answer in its own /completion shape (the
        prompt as text, generation_settings, timings); a streamed chat answer carries it on
        its final chunk group's first chunk."""
        if body.get("verbose") is True:
            st = self.state
            settings = nat.generation_settings(opts, st.scheduler.eog, st.settings.model_alias)
            out["__verbose"] = self._native_final(job, prompt_text(st, ids), settings, text,
                                                  done, stream=False)
        return out

    @staticmethod
    def _native_final(job: Job, prompt_text: str, settings: dict, content: str, done: Event,
                      stream: bool) -> dict:
        now = time.monotonic()
        t_first = job.t_first or now
        tm = nat.timings(done.cached_tokens, max(done.prompt_tokens - done.cached_tokens, 0),
                         t_first - job.t0, done.completion_tokens, now - t_first,
                         done.draft_n, done.draft_accepted)
        return nat.final(content, model=job.model, prompt=prompt_text,
                         n_prompt=done.prompt_tokens, n_gen=done.completion_tokens,
                         finish=done.finish, stop_word=job.req.stop_word,
                         settings=settings, probs=job.probs, timing=tm, stream=stream,
                         id_slot=done.id_slot, truncated=done.truncated,
                         tokens_cached=done.tokens_cached)

    async def _native_batch(self, request: Request, opts: oa.GenOptions, prompts: list,
                            settings: dict, pick) -> Response:
        """Several prompts in one /completion request, or ``n`` > 1 completions of each: one
        job each (they share the slots like separate requests; choice k of a prompt as
        llama-server's child task k), answered as llama-server does, a list of results in
        prompt-then-choice order, each with its ``index``."""
        st = self.state
        all_ids = [await run_in_threadpool(prompt_ids, st, p) for p in prompts]
        for ids in all_ids:
            check_prompt(st, ids)
        runs = [(ids, child_options(opts, k)) for ids in all_ids for k in range(opts.n)]
        jobs = []
        try:
            for ids, o in runs:
                jobs.append(submit(st, ids, o, make_constraint(st, o)))
            out = []
            for i, (job, (ids, o)) in enumerate(zip(jobs, runs)):
                first = await first_event(request, job)
                text, done = await collect(request, job, first)
                st.metrics.observe_latency(time.monotonic() - job.t0, job.t_first - job.t0)
                mine = settings if o is opts else {  # a child's own settings (its seed)
                    **settings, **nat.generation_settings(o, st.scheduler.eog,
                                                          st.settings.model_alias)}
                res = self._native_final(job, prompt_text(st, ids), mine, text, done, False)
                out.append(pick({**res, "index": i}))
        finally:
            for job in jobs:
                job.req.cancel()
        return JSONResponse(out)

    async def _completion_native(self, request: Request, body: dict | None = None) -> Response:
        """llama-server's own /completion and /completions (its non-OAI handler): ``prompt`` in
        its forms, ``n_predict`` (< 0: the server's -n), its response shape with ``timings``,
        ``stop_type``/``stopping_word`` and ``generation_settings``,
        ``completion_probabilities`` for ``n_probs``, and streams of partial results (with
        ``return_progress``: prompt_progress chunks first) without a [DONE]."""
        st = self.state
        if body is None:  # else: a body already read and completed (/infill's)
            body = self.with_defaults(await json_body(request))
        opts = oa.parse_common(body, st.llm.spec.n_vocab, tokenize=self.bias_tokens)
        if opts.n > st.scheduler.n_slots:
            raise n_out_of_range(opts.n, st.scheduler.n_slots)
        settings = nat.generation_settings(opts, st.scheduler.eog, st.settings.model_alias)
        fields = body.get("response_fields")
        if fields is not None and not (isinstance(fields, list)
                                       and all(isinstance(f, str) for f in fields)):
            raise oa.bad("response_fields", "'response_fields' must be a list of strings",
                         "invalid_type")
        pick = (lambda d: nat.nested_values(fields, d)) if fields else (lambda d: d)
        prompt = body.get("prompt")
        if (isinstance(prompt, list) and len(prompt) > 1
                and not any(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            # llama-server's tokenize_input_prompts: a list without token ids at its top level
            # is a batch of prompts, answered with a list of results
            if opts.stream:
                raise oa.bad("prompt", "a batch of prompts cannot be streamed (send them as "
                             "separate requests)", "unsupported_parameter")
            return await self._native_batch(request, opts, prompt, settings, pick)
        if opts.n > 1 and not opts.stream:
            return await self._native_batch(request, opts, [prompt], settings, pick)
        ids = await run_in_threadpool(prompt_ids, st, prompt)
        check_prompt(st, ids)
        if opts.n > 1:
            return await self._native_stream_many(request, opts, ids, settings, pick,
                                                  body.get("return_progress") is True)
        job = submit(st, ids, opts, make_constraint(st, opts),
                     progress=opts.stream and body.get("return_progress") is True)
        try:
            first = await first_event(request, job)
        except BaseException:
            job.req.cancel()
            raise
        text0 = prompt_text(st, ids)

        def final(content: str, done: Event, stream: bool) -> dict:
            return pick(self._native_final(job, text0, settings, content, done, stream))

        if not opts.stream:
            try:
                text, done = await collect(request, job, first)
            finally:
                job.req.cancel()
            st.metrics.observe_latency(time.monotonic() - job.t0, job.t_first - job.t0)
            return JSONResponse(final(text, done, False))

        async def events() -> AsyncIterator[str]:
            try:
                async for ev in self._stream_events(request, job, first):
                    if ev.kind == "text":
                        yield sse(nat.partial(ev.text, len(ids), ev.completion_tokens,
                                              ev.probs, ev.tokens))
                    elif ev.kind == "progress":
                        yield sse(nat.progress(ev.prompt_tokens, ev.cached_tokens,
                                               ev.processed, ev.seconds))
                        job.t_first = time.monotonic()  # prompt timings end at the last chunk
                    elif ev.kind == "done":
                        yield sse(final("", ev, True))
                    else:
                        yield sse(ApiError(ev.status, ev.message).body())
            finally:
                job.req.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _native_stream_many(self, request: Request, opts: oa.GenOptions, ids: list,
                                  settings: dict, pick, progress: bool) -> Response:
        """``n`` > 1 streamed on /completion: the choices' partial results interleaved as they
        are generated, each with its ``index`` (choice k: llama-server's child task k)."""
        st = self.state
        runs = [child_options(opts, k) for k in range(opts.n)]
        jobs: list[Job] = []
        try:
            for o in runs:
                jobs.append(submit(st, ids, o, make_constraint(st, o), progress=progress))
        except BaseException:
            for j in jobs:
                j.req.cancel()
            raise
        text0 = prompt_text(st, ids)
        merged, tasks = self._merged_streams(request, jobs)

        async def events() -> AsyncIterator[str]:
            try:
                left = len(jobs)
                while left:
                    i, ev = await merged.get()
                    if ev.kind == "text":
                        d = nat.partial(ev.text, len(ids), ev.completion_tokens, ev.probs,
                                        ev.tokens)
                    elif ev.kind == "progress":
                        jobs[i].t_first = time.monotonic()
                        d = nat.progress(ev.prompt_tokens, ev.cached_tokens, ev.processed,
                                         ev.seconds)
                    elif ev.kind == "done":
                        left -= 1
                        mine = settings if i == 0 else {**settings, **nat.generation_settings(
                            runs[i], st.scheduler.eog, st.settings.model_alias)}
                        d = {**self._native_final(jobs[i], text0, mine, "", ev, True),
                             "index": i}
                        yield sse(pick(d))
                        continue
                    else:
                        left -= 1
                        yield sse(ApiError(ev.status, ev.message).body())
                        continue
                    yield sse({**d, "index": i})
            finally:
                for j in jobs:
                    j.req.cancel()
                for t in tasks:
                    t.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _many(self, request: Request, ids: list[int], opts: oa.GenOptions, make,
                    chat: bool = False, forced: str | None = None, tools: list | None = None,
                    prefix: str = "", reply: tl.ChatReply | None = None,
                    progress: bool = False) -> Response:
        """``n`` > 1: n requests on the same prompt (llama-server's n_cmpl child tasks, which
        copy the parent's parameters, and its reasoning budget as a state of their own),
        answered as one response whose choices are indexed 0..n-1; streamed chunks of the
        choices interleave as they are generated. As llama-server's: a whole response carries
        the first choice's usage and timings; a stream ends each choice with its own (the
        children copy the parent's prompt state, so its prompt figures are the first's)."""
        st = self.state
        sch = st.scheduler
        if opts.n > sch.n_slots:
            raise n_out_of_range(opts.n, sch.n_slots)
        constraints = [make() for _ in range(opts.n)]  # a bad grammar fails before any runs
        jobs: list[Job] = []
        try:
            for k, c in enumerate(constraints):
                jobs.append(submit(st, ids, child_options(opts, k), c, progress=progress,
                                   budget=reply.budget if reply is not None else None))
        except BaseException:
            for j in jobs:
                j.req.cancel()
            raise
        rid, created, model = oa.new_id("chatcmpl" if chat else "cmpl"), oa.now(), \
            st.settings.model_alias
        t0 = jobs[0].t0

        def finish_of(text: str, finish: str) -> tuple:
            content, calls, reasoning = text, None, None
            if forced is not None:
                content, calls = None, [tl.make_call(forced, text)]
            elif reply is not None:
                content, reasoning, calls = reply.fresh().final(text)
            if calls and finish == "stop":
                finish = "tool_calls"
            return content, calls or None, finish, reasoning

        if not opts.stream:
            results = []
            try:
                for j in jobs:
                    text, done = await collect(request, j, await first_event(request, j))
                    results.append((text, done, j.probs))
            finally:
                for j in jobs:
                    j.req.cancel()
            st.metrics.observe_latency(time.monotonic() - t0, jobs[0].t_first - t0)
            use = usage_of(results[0][1])
            choices = []
            for i, (text, done, probs) in enumerate(results):
                if chat:
                    content, calls, finish, reasoning = finish_of(text, done.finish)
                    d = oa.chat_response(rid, model, created, content, calls, finish, use,
                                         oa.logprobs_of(probs), reasoning)
                else:
                    d = oa.completion_response(rid, model, created, prefix + text, done.finish,
                                               use, oa.logprobs_of(probs), index=i)
                d["choices"][0]["index"] = i
                choices.append(d["choices"][0])
            d["choices"] = choices
            d["timings"] = job_timings(jobs[0], results[0][1])
            return JSONResponse(d)

        merged, tasks = self._merged_streams(request, jobs)
        # n > 1 streams of replies that need reading send each choice whole at its end
        reasoning_split = reply is not None and reply.splits_reasoning

        def stats(i: int, ev: Event) -> tuple[dict, dict]:
            """Choice i's usage and timings: its generation after the first's prompt."""
            p = jobs[0]
            t_first = jobs[i].t_first or time.monotonic()
            use = oa.usage(ev.prompt_tokens, ev.completion_tokens, p.req.cached_tokens)
            return use, nat.timings(p.req.cached_tokens,
                                    max(len(p.req.prompt_ids) - p.req.cached_tokens, 0),
                                    (p.t_first or t_first) - p.t0, ev.completion_tokens,
                                    time.monotonic() - t_first)

        def piece(i: int, text: str | None, finish: str | None, probs=None, delta=None) -> str:
            lp = oa.logprobs_of(probs)
            if chat:
                return sse(oa.chat_chunk(rid, model, created, delta if delta is not None else
                                         ({"content": text} if text is not None else {}),
                                         finish, logprobs=lp, index=i))
            return sse(oa.completion_response(rid, model, created, text or "", finish, None, lp,
                                              index=i))

        async def events() -> AsyncIterator[str]:
            texts = [""] * len(jobs)
            # llama-server's role chunk opens a choice; with return_progress its progress chunks
            # come first (the role repeated in each) and the role chunk with the first token
            opened = [not progress] * len(jobs)
            try:
                for i in range(len(jobs)):
                    if chat and not progress:
                        yield piece(i, None, None, delta={"role": "assistant", "content": None})
                    elif prefix:
                        yield piece(i, prefix, None)
                left = len(jobs)
                while left:
                    i, ev = await merged.get()
                    if ev.kind == "progress":
                        jobs[i].t_first = time.monotonic()  # prompt timings end at the last one
                        # a child slot reports once, its prompt copied whole from the first's
                        if chat and (i == 0 or ev.processed >= ev.prompt_tokens):
                            yield sse({**oa.chat_chunk(rid, model, created,
                                                       {"role": "assistant", "content": None},
                                                       index=i),
                                       "prompt_progress": {"total": ev.prompt_tokens,
                                                           "cache": ev.cached_tokens if i == 0
                                                           else jobs[0].req.cached_tokens,
                                                           "processed": ev.processed,
                                                           "time_ms": ev.seconds * 1e3}})
                    elif ev.kind == "text":
                        if chat and not opened[i]:
                            opened[i] = True
                            yield piece(i, None, None, delta={"role": "assistant",
                                                              "content": None})
                        texts[i] += ev.text
                        if not (chat and (forced is not None or tools or reasoning_split)):
                            yield piece(i, ev.text, None, ev.probs)
                    elif ev.kind == "done":
                        left -= 1
                        finish = ev.finish
                        if chat and (forced is not None or tools or reasoning_split):
                            content, calls, finish, reasoning = finish_of(texts[i], finish)
                            delta = {"content": content} if content else {}
                            if reasoning:
                                delta["reasoning_content"] = reasoning
                            if calls:
                                delta["tool_calls"] = [{"index": k, **c}
                                                       for k, c in enumerate(calls)]
                            yield piece(i, None, None, delta=delta)
                        use, tms = stats(i, ev)
                        if not chat:  # llama-server: usage on each final chunk
                            yield sse({**oa.completion_response(rid, model, created, "", finish,
                                                                use, index=i), "timings": tms})
                        elif opts.include_usage:
                            yield piece(i, None, finish)
                            yield sse({**oa.chat_chunk(rid, model, created, {}, usage_=use,
                                                       choices=False), "timings": tms})
                        else:
                            yield sse({**oa.chat_chunk(rid, model, created, {}, finish,
                                                       index=i), "timings": tms})
                    else:
                        left -= 1
                        yield sse(ApiError(ev.status, ev.message).body())
                yield "data: [DONE]\n\n"
            finally:
                for j in jobs:
                    j.req.cancel()
                for t in tasks:
                    t.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def _merged_streams(self, request: Request, jobs: list[Job]):
        """The events of n > 1 streamed choices on one queue as ``(choice, event)``, each
        choice's failure an error event of its own; returns (queue, pump tasks)."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, j: Job) -> None:
            try:
                async for ev in self._stream_events(request, j, await first_event(request, j)):
                    await merged.put((i, ev))
            except ApiError as e:
                await merged.put((i, Event("error", status=e.status, message=e.message)))
            except ClientGone:
                await merged.put((i, Event("error", status=499, message="client gone")))

        return merged, [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]

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
        ("/v1/chat/completions/input_tokens", h.chat_tokens, ["POST"]),
        ("/chat/completions/input_tokens", h.chat_tokens, ["POST"]),
        # llama-server: /completion and /completions are its own (non-OAI) handler
        ("/v1/completions", h.completions, ["POST"]),
        ("/completion", h.completion_native, ["POST"]),
        ("/completions", h.completion_native, ["POST"]),
        ("/props", h.props, ["GET", "POST"]), ("/slots", h.slots, ["GET"]),
        ("/slots/{id_slot}", h.slots, ["POST"]),
        ("/v1/models", h.models, ["GET"]), ("/models", h.models, ["GET"]),
        ("/tokenize", h.tokenize, ["POST"]), ("/detokenize", h.detokenize, ["POST"]),
        ("/apply-template", h.apply_template, ["POST"]),
        ("/health", h.health, ["GET"]), ("/v1/health", h.health, ["GET"]),
        ("/metrics", h.metrics, ["GET"]),
        ("/lora-adapters", h.lora_adapters, ["GET", "POST"]),
        ("/v1/embeddings", h.embeddings_oai, ["POST"]),
        # llama-server's own (non-OAI) shape on these two, as its server.cpp routes them
        ("/embeddings", h.embeddings, ["POST"]), ("/embedding", h.embeddings, ["POST"]),
        ("/rerank", h.rerank, ["POST"]), ("/reranking", h.rerank, ["POST"]),
        ("/v1/rerank", h.rerank, ["POST"]), ("/v1/reranking", h.rerank, ["POST"]),
        ("/v1/messages", h.messages, ["POST"]),
        ("/v1/messages/count_tokens", h.messages_tokens, ["POST"]),
        ("/v1/responses", h.responses, ["POST"]), ("/responses", h.responses, ["POST"]),
        ("/v1/responses/input_tokens", h.responses_tokens, ["POST"]),
        ("/responses/input_tokens", h.responses_tokens, ["POST"]),
        ("/infill", h.infill, ["POST"]),
        ("/cors-proxy", h.cors_proxy, ["GET", "POST"]),
        ("/tools", h.tools, ["GET", "POST"]),
        ("/v1/stream", h.stream_get, ["GET"]), ("/v1/stream", h.stream_delete, ["DELETE"]),
        ("/v1/streams/lookup", h.streams_lookup, ["POST"]),
    ):
        routes.append(Route(path, fn, methods=methods))
    if state.settings.gcp is not None:
        routes += gcp_routes(routes, state.settings.gcp)
    routes = static_routes(routes, state.settings.api_prefix, state.settings.static_path)

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


def static_routes(routes: list, prefix: str, static_path: str | None) -> list:
    """llama-server's --api-prefix (every route registered under it) and --path (a mount
    point at the prefix's '/' serving the directory's files, index.html for a directory). Its
    HTTP library looks for a file before the routes; here the routes come first, so a file
    named like an endpoint is not served."""
    if prefix:
        routes = [Route(prefix + r.path, r.endpoint,
                        methods=[m for m in (r.methods or ()) if m != "HEAD"])
                  for r in routes]
    if static_path:
        from starlette.routing import Mount
        from starlette.staticfiles import StaticFiles

        routes.append(Mount(prefix, app=StaticFiles(directory=static_path, html=True)))
    return routes


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
