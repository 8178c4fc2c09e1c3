"""``jllama serve [CONFIG] [-m MODEL] [--port N] [--parallel N] ...``: the OpenAI-compatible server.

Flags override the config file's ``server``/``runtime`` sections, through the same validation
path as the YAML (``key.path=value`` overrides).
"""

from __future__ import annotations

import argparse
import json
import sys

from jllama.cli.common import (
    EXTENDED_SAMPLING,
    add_cache_type_args,
    add_extended_sampling_args,
    add_numerics_args,
    dry_breakers_override,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching "
                       "(takes llama-server's flags)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (see configs/serve-*.yaml)")
    p.add_argument("-m", "--model", default=None, help="GGUF path or registry name")
    p.add_argument("--host", default=None, help="address(es) to listen on, comma-separated")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("-np", "--parallel", type=int, default=None,
                   help="slots: requests decoded together in one batch (-1: the default, 4)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context of all slots together, as llama-server's -c: each slot gets "
                   "ctx-size / parallel (all of it with --kv-unified); 0 = the model's training "
                   "context per slot")
    add_numerics_args(p, via_config=True)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (or X-Api-Key); several keys: "
                   "comma-separated")
    p.add_argument("--api-key-file", default=None, help="file of API keys, one per line")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests allowed to wait for a slot before answering 503")
    p.add_argument("--timeout", "-to", type=float, default=None,
                   help="seconds a request may take in all (queue + generation) before 504")
    p.add_argument("-a", "--alias", default=None,
                   help="model name(s) for the API, comma-separated (/v1/models)")
    p.add_argument("--tags", default=None, help="model tags, comma-separated (informational)")
    from jllama.cli.common import add_kv_paged_args, add_platform_args

    add_platform_args(p)
    add_kv_paged_args(p)
    p.add_argument("--no-warmup", action="store_true", help="skip compiling before serving")
    p.add_argument("--warmup", dest="no_warmup", action="store_false")
    from jllama.cli.common import add_draft_args

    add_draft_args(p)  # speculative decoding: single-slot servers (--parallel 1)
    p.add_argument("--spec-draft-n-max", dest="draft_n", type=int, default=None)
    p.add_argument("--spec-draft-n-min", dest="draft_min", type=int, default=None)
    p.add_argument("--spec-draft-p-min", dest="draft_min_p", type=float, default=None)
    p.add_argument("--spec-draft-model", dest="model_draft", default=None)
    from jllama.cli.common import add_lora_args, add_model_args

    add_lora_args(p)
    add_model_args(p)
    p.add_argument("--lora-init-without-apply", action="store_true",
                   help="load the LoRA adapters with scale 0 (set them later: POST /lora-adapters)")
    p.add_argument("--embedding", "--embeddings", action="store_true",
                   help="serve /v1/embeddings, /embeddings (encoder GGUFs: bert, nomic-bert, "
                   "jina-bert-v2; implied for them: no completions; a decoder serves both)")
    p.add_argument("--pooling", choices=["none", "mean", "cls", "last", "rank"], default=None,
                   help="pooling of the encoder's or (with --embedding) decoder's output (default: "
                        "the GGUF's pooling_type; none for a decoder without one)")
    p.add_argument("--reranking", "--rerank", action="store_true",
                   help="serve /rerank (sets --embedding --pooling rank; encoder rerankers, or a decoder "
                        "with a cls.output.weight head)")
    p.add_argument("-mm", "--mmproj", metavar="FNAME", default=None,
                   help="the model's vision projector GGUF: chat messages may then carry "
                        "image_url parts (base64 data URLs; file:// under --media-path; "
                        "http(s) with --allow-remote-media)")
    p.add_argument("--media-path", metavar="PATH", default=None,
                   help="llama-server's: a directory whose files requests may name as "
                   "file://RELATIVE/PATH images (default: file:// URLs refused)")
    p.add_argument("--allow-remote-media", action="store_true", default=None,
                   help="fetch http(s) image URLs (at most 10 MB, 10 s each). llama-server "
                   "always fetches them; jllama refuses them unless this is given")
    _add_llama_server_args(p)
    r = p.add_argument_group("router mode (several models: no -m; one child jllama serve each)")
    r.add_argument("--models-dir", default=None, metavar="PATH",
                   help="directory of models for the router: NAME.gguf files, or NAME/ "
                   "folders holding a model and an mmproj*.gguf")
    r.add_argument("--models-preset", default=None, metavar="PATH",
                   help="INI file of model presets for the router ([NAME] sections of "
                   "serve's flag names without dashes: model = FILE, c = 4096, ...)")
    r.add_argument("--models-max", type=int, default=4, metavar="N",
                   help="models loaded at once; the least recently used idle one is "
                   "stopped for another (default 4, 0 = no limit)")
    r.add_argument("--models-autoload", dest="models_autoload", action="store_true",
                   default=True, help="load a requested model on demand (default)")
    r.add_argument("--no-models-autoload", dest="models_autoload", action="store_false",
                   help="requests for a model that is not loaded get 400 (POST /models/load "
                   "first)")
    p.add_argument("overrides", nargs="*", default=[], help="key.path=value overrides")
    p.set_defaults(func=run, _parser=p)


class _Refuse(argparse.Action):
    """A llama-server flag jllama cannot honour yet: remembered, then refused in one line by
    ``run`` (argparse's own errors would print the whole usage)."""

    def __init__(self, option_strings, dest, reason: str = "", **kw):
        self.reason = reason
        super().__init__(option_strings, dest="_refused", default=None, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, "_refused", None) is None:
            namespace._refused = []
        namespace._refused.append(f"{option_string}: {self.reason}")


# llama-server flags that jllama takes without a setting of its own: what the flag asks for is
# what jllama does anyway (or it only tunes llama.cpp's own machinery), so nothing is lost
_ACCEPTED = [
    (("-cb", "--cont-batching"), 0),  # jllama always batches continuously
    # llama.cpp's sampling on the backend device: jllama's sampler always runs in the jitted
    # step on the model's device (the request field of the same name is read and ignored)
    (("--backend_sampling", "-bs", "--backend-sampling"), 0),
    (("--offline",), 0),
    (("--log-disable", "--log-colors", "--log-prefix", "--log-timestamps"), "?"),
    (("--no-ui", "--no-webui"), 0),  # jllama serves no web UI
    (("--no-mmproj", "--no-mmproj-auto"), 0),  # jllama loads a projector only with --mmproj
    (("--threads-http",), 1), (("--no-perf", "--perf"), 0),
    (("-tb", "--threads-batch"), 1),  # one thread pool for prompts and decoding (-t)
    (("-no-kvu", "--no-kv-unified"), 0),  # llama-server's default: ctx-size / parallel per slot
    (("--repack", "--no-repack", "-nr", "--mmap", "--no-mmap", "--mlock"), 0),
]

_REFUSED = [
    (("-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-mu", "--model-url", "-dr",
      "--docker-repo"), 1, "jllama serve does not download models; pass -m FILE.gguf or a "
     "registry name"),
    (("-nocb", "--no-cont-batching"), 0, "jllama always batches continuously"),
    (("--spec-synth-len", "--spec-synth-rates"), 1, "synthetic draft acceptance "
     "(benchmarking) is not built"),
    (("--grp-attn-n", "-gan", "--grp-attn-w", "-gaw"), 1, "group attention (self-extend) is not "
     "built"),
    (("-mmu", "--mmproj-url"), 1, "jllama serve does not download projectors; pass "
     "--mmproj FILE.gguf"),
    (("-dev", "--device", "-sm", "--split-mode", "-ts", "--tensor-split", "-mg", "--main-gpu",
      "--rpc"), 1, "device placement is the JAX platform's (--platform) and config 'mesh'"),
]


def _add_llama_server_args(p: argparse.ArgumentParser) -> None:
    """llama-server's flags under their names (tools/server/README.md, common/arg.cpp)."""
    g = p.add_argument_group("llama-server's flags")
    g.add_argument("-n", "--n-predict", "--predict", dest="n_predict", type=int, default=None,
                   help="default tokens to generate per request (-1: until the context is full)")
    g.add_argument("--temp", "--temperature", dest="temp", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repeat-penalty", type=float, default=None)
    g.add_argument("--repeat-last-n", type=int, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("-s", "--seed", type=int, default=None, help="default seed (-1: random)")
    add_extended_sampling_args(g)
    add_cache_type_args(g)
    g.add_argument("-kvu", "--kv-unified", action="store_true",
                   help="every slot gets the whole --ctx-size")
    g.add_argument("-b", "--batch-size", dest="batch_size", type=int, default=None,
                   help="logical batch size: /infill fits its prefix and suffix in it "
                   "(prompts are evaluated in jllama's own chunks whatever it is)")
    g.add_argument("--spm-infill", action="store_true",
                   help="/infill prompts in suffix/prefix/middle order (default "
                   "prefix/suffix/middle)")
    g.add_argument("--ignore-eos", action="store_true", default=None,
                   help="requests ignore end-of-generation tokens unless they say otherwise")
    g.add_argument("--keep", dest="n_keep", type=int, default=None,
                   help="default n_keep: prompt tokens kept by the context shift (-1: all)")
    g.add_argument("--embd-normalize", type=int, default=None,
                   help="default embeddings normalisation (-1 none, 0 max absolute int16, "
                   "1 taxicab, 2 euclidean (default), >2 p-norm)")
    g.add_argument("-sps", "--slot-prompt-similarity", dest="slot_prompt_similarity",
                   type=float, default=None,
                   help="share of a prompt a free slot's cache must match for the slot to be "
                   "picked for it (default 0.10, 0: disabled)")
    g.add_argument("--grammar", default=None,
                   help="GBNF grammar constraining requests that bring no grammar or schema")
    g.add_argument("--grammar-file", default=None, help="a file holding that grammar")
    g.add_argument("-j", "--json-schema", default=None,
                   help="JSON schema constraining requests that bring no grammar or schema")
    g.add_argument("-jf", "--json-schema-file", default=None,
                   help="a file holding that JSON schema")
    g.add_argument("--api-prefix", default=None,
                   help="prefix path the server serves from, without the trailing slash")
    g.add_argument("--path", dest="static_path", default=None,
                   help="directory whose files are served at the prefix's /")
    g.add_argument("--ssl-key-file", default=None, help="PEM private key: HTTPS with "
                   "--ssl-cert-file")
    g.add_argument("--ssl-cert-file", default=None, help="PEM certificate: HTTPS with "
                   "--ssl-key-file")
    g.add_argument("--metrics", action="store_true", help="serve /metrics (Prometheus)")
    g.add_argument("--slots", dest="slots", action="store_true", default=True,
                   help="serve GET /slots (default)")
    g.add_argument("--no-slots", dest="slots", action="store_false")
    g.add_argument("--props", action="store_true", help="allow POST /props")
    g.add_argument("--jinja", dest="jinja", action="store_true", default=True,
                   help="the chat template through a Jinja renderer (default)")
    g.add_argument("--no-jinja", dest="jinja", action="store_false",
                   help="llama.cpp's built-in template that the chat template's text selects "
                   "instead (no tools, no thoughts); an unknown template is refused")
    g.add_argument("--reasoning-format", default=None,
                   help="none: thoughts stay in message.content; deepseek (default), "
                   "deepseek-legacy, auto: thoughts go to message.reasoning_content")
    g.add_argument("-rea", "--reasoning", default=None,
                   help="on, off or auto (default: thinking when the template has it)")
    g.add_argument("--reasoning-budget", type=int, default=None,
                   help="-1 (default): unlimited thoughts; 0: none; N: the end of thinking is "
                   "forced after N tokens of thoughts")
    g.add_argument("--reasoning-budget-message", default=None,
                   help="text forced before the end-of-thinking tag when the budget runs out")
    g.add_argument("--reasoning-effort", default=None,
                   help="reasoning_effort for the chat template ('default': the template's)")
    g.add_argument("--chat-template", default=None,
                   help="a Jinja chat template, or the name of one of llama.cpp's built-in "
                   "templates (chatml, llama3, gemma, command-r, ...), instead of the GGUF's")
    g.add_argument("--chat-template-file", default=None,
                   help="a file holding a Jinja chat template instead of the GGUF's")
    g.add_argument("--chat-template-kwargs", default=None,
                   help="JSON object of extra chat template variables, e.g. "
                   "'{\"enable_thinking\": false}'")
    g.add_argument("--cors-origins", default=None,
                   help="allowed CORS origins, comma-separated (default *; 'localhost': "
                   "loopback origins only)")
    g.add_argument("--tools", default=None, metavar="TOOL1,TOOL2,...",
                   help="experimental: built-in tools for AI agents at GET/POST /tools - do "
                   "not enable in untrusted environments ('all', or some of: read_file, "
                   "file_glob_search, grep_search, exec_shell_command, write_file, edit_file, "
                   "get_info); --cors-origins then defaults to localhost")
    g.add_argument("--tools-runtime", default=None, metavar="OPTION",
                   help="where the tools run: none (default: this host), docker:IMAGE / "
                   "podman:IMAGE (one container, removed at exit), docker-container:ID / "
                   "podman-container:ID (an existing one), ssh:TARGET (key-based auth only)")
    g.add_argument("--mcp-servers-config", default=None, metavar="PATH",
                   help="experimental: JSON file of MCP servers (Cursor's 'mcpServers' format, "
                   "stdio only) whose tools join /tools as SERVER_TOOL; --cors-origins then "
                   "defaults to localhost")
    g.add_argument("--mcp-servers-json", default=None, metavar="JSON",
                   help="the same MCP server definitions given inline")
    g.add_argument("--ui-mcp-proxy", "--webui-mcp-proxy", dest="ui_mcp_proxy",
                   action="store_true", default=None,
                   help="experimental: /cors-proxy?url=URL for the web UI to reach remote MCP "
                   "servers - do not enable in untrusted environments")
    g.add_argument("--no-ui-mcp-proxy", "--no-webui-mcp-proxy", dest="ui_mcp_proxy",
                   action="store_false")
    g.add_argument("-ag", "--agent", dest="agent", action="store_true", default=None,
                   help="--tools all and --ui-mcp-proxy together (--cors-origins then defaults "
                   "to localhost)")
    g.add_argument("-no-ag", "--no-agent", dest="agent", action="store_false")
    g.add_argument("--context-shift", dest="context_shift", action="store_true", default=None,
                   help="when a slot's context is full, drop half of what follows the request's "
                   "n_keep tokens and go on generating (default: off; the request then ends)")
    g.add_argument("--no-context-shift", dest="context_shift", action="store_false")
    g.add_argument("--cache-reuse", dest="cache_reuse", type=int, default=None, metavar="N",
                   help="min chunk size to attempt reusing from the cache via KV shifting, "
                   "requires prompt caching (default: 0, off; a request's n_cache_reuse)")
    g.add_argument("--swa-full", action="store_true", default=None,
                   help="accepted: jllama's sliding-window caches always hold the whole "
                   "context; as with llama-server, it lets --context-shift work on them")
    g.add_argument("--slot-save-path", default=None, metavar="PATH",
                   help="directory for POST /slots/{id}?action=save|restore (jllama's own file "
                   "format: llama.cpp's slot files do not load, nor ours in llama-server)")
    g.add_argument("--spec-type", action="append", default=None,
                   help="speculative types, comma-separated: draft-simple (a draft model, -md) "
                   "or none; the others are not built")
    # decoders: prompts go in jllama's own chunks; encoders: llama-server's input limit (-b
    # above is also /infill's layout batch)
    g.add_argument("-ub", "--ubatch-size", type=int, default=None,
                   help="an encoder's input limit in tokens, as llama-server's physical batch "
                   "(default 512, at most -b)")
    g.add_argument("--sleep-idle-seconds", type=int, default=None, metavar="SECONDS",
                   help="after this many seconds with no task, let go of the model and its KV "
                   "cache until the next request (default -1: never)")
    g.add_argument("-cram", "--cache-ram", type=int, default=None, metavar="N",
                   help="host-memory prompt cache size in MiB: a slot's KV is kept there when "
                   "the slot gets another prompt (default 8192, -1: no limit, 0: off)")
    g.add_argument("--cache-idle-slots", dest="cache_idle_slots", action="store_true",
                   default=None, help="copy idle slots to the prompt cache when a task starts, "
                   "and empty them with --kv-unified (default; needs --cache-ram)")
    g.add_argument("--no-cache-idle-slots", dest="cache_idle_slots", action="store_false")
    g.add_argument("-v", "--verbose", "--log-verbose", dest="verbose", action="store_true",
                   help="the server's debug log on stderr, and llama-server's debug answers: "
                   "every request's 'verbose' defaults to true (whole answers carry '__verbose')")
    g.add_argument("--cache-prompt", dest="cache_prompt", action="store_true", default=None)
    g.add_argument("--no-cache-prompt", dest="cache_prompt", action="store_false")
    for flags, nargs in _ACCEPTED:
        kw = {"nargs": nargs} if nargs != 0 else {"action": "store_true"}
        g.add_argument(*flags, dest=f"_accepted_{flags[0].lstrip('-')}", default=None,
                       help=argparse.SUPPRESS, **kw)
    for flags, nargs, reason in _REFUSED:
        g.add_argument(*flags, action=_Refuse, reason=reason, nargs=nargs,
                       help=argparse.SUPPRESS)


def _overrides(args) -> list[str]:
    ov = list(args.overrides)
    pairs = {"model": "model", "host": "server.host", "port": "server.port",
             "max_queue": "server.max_queue", "timeout": "server.timeout",
             "platform": "runtime.platform", "threads": "runtime.threads",
             "n_gpu_layers": "runtime.n_gpu_layers",
             "kv_paged": "runtime.kv_paged", "kv_pages": "runtime.kv_pages",
             "cache_type_k": "runtime.cache_type_k", "cache_type_v": "runtime.cache_type_v",
             "n_predict": "server.n_predict", "batch_size": "server.n_batch",
             "cors_origins": "server.cors_origins",
             "media_path": "server.media_path",
             "slot_save_path": "server.slot_save_path", "cache_reuse": "server.cache_reuse",
             "n_keep": "server.n_keep", "embd_normalize": "server.embd_normalize",
             "api_prefix": "server.api_prefix", "static_path": "server.static_path",
             "ssl_key_file": "server.ssl_key_file", "ssl_cert_file": "server.ssl_cert_file",
             "slot_prompt_similarity": "server.slot_prompt_similarity",
             "temp": "generation.sampling.temperature", "top_k": "generation.sampling.top_k",
             "top_p": "generation.sampling.top_p", "min_p": "generation.sampling.min_p",
             "repeat_penalty": "generation.sampling.repeat_penalty",
             "repeat_last_n": "generation.sampling.repeat_last_n",
             "presence_penalty": "generation.sampling.presence_penalty",
             "frequency_penalty": "generation.sampling.frequency_penalty",
             **{a: f"generation.sampling.{k}" for a, k in EXTENDED_SAMPLING.items()}}
    for attr, key in pairs.items():
        v = getattr(args, attr, None)
        if v is not None:
            ov.append(f"{key}={json.dumps(v) if isinstance(v, str) else v}")
    ov += dry_breakers_override(args)
    if args.parallel is not None and args.parallel != -1:  # -1: llama-server's "auto"
        ov.append(f"server.parallel={args.parallel}")
    if args.seed is not None:  # llama-server's -1: a random seed per request
        ov.append(f"generation.sampling.seed={'null' if args.seed == -1 else args.seed}")
    if args.context_shift is not None:
        ov.append(f"server.context_shift={'true' if args.context_shift else 'false'}")
    for flag in ("metrics", "props", "kv_unified", "allow_remote_media", "swa_full",
                 "spm_infill", "ignore_eos"):
        if getattr(args, flag, False):
            ov.append(f"server.{flag}=true")
    if args.slots is False:
        ov.append("server.slots=false")
    if args.cache_prompt is not None:
        ov.append(f"server.cache_prompt={'true' if args.cache_prompt else 'false'}")
    if args.cache_idle_slots is not None:
        ov.append(f"server.cache_idle_slots={'true' if args.cache_idle_slots else 'false'}")
    for attr in ("sleep_idle_seconds", "cache_ram"):
        if getattr(args, attr) is not None:
            ov.append(f"server.{attr}={getattr(args, attr)}")
    from jllama.cli.common import overrides_from_args

    return ov + [o for o in overrides_from_args(args)
                 if o.startswith(("draft.", "runtime.flash_attn", "runtime.prompt_matmul", "lora=",
                                  "vision.mmproj=", "kv_overrides=", "rope.", "control_vector"))]


def _check_llama_server_args(args) -> None:
    from jllama.errors import ConfigError

    refused = getattr(args, "_refused", None)
    if refused:
        raise ConfigError(f"jllama serve {refused[0]}")
    if args.reasoning_format not in (None, "none", "auto", "deepseek", "deepseek-legacy"):
        raise ConfigError(f"jllama serve --reasoning-format {args.reasoning_format}: one of none, "
                          "deepseek, deepseek-legacy, auto")
    if args.sleep_idle_seconds is not None and (args.sleep_idle_seconds == 0
                                                or args.sleep_idle_seconds < -1):
        raise ConfigError(f"jllama serve --sleep-idle-seconds {args.sleep_idle_seconds}: "
                          "invalid value: cannot be 0 or less than -1")
    if args.reasoning not in (None, "on", "off", "auto"):
        raise ConfigError(f"jllama serve --reasoning {args.reasoning}: one of on, off, auto")
    if args.reasoning_budget is not None and args.reasoning_budget < -1:
        raise ConfigError(f"jllama serve --reasoning-budget {args.reasoning_budget}: invalid "
                          "value (-1: unlimited, 0: no thoughts, N: at most N tokens)")
    spec = [t.strip() for v in (args.spec_type or []) for t in v.split(",") if t.strip()]
    other = [t for t in spec if t not in ("draft-simple", "none")]
    if other:
        raise ConfigError(f"jllama serve --spec-type {other[0]}: only draft-simple (a draft "
                          "model, -md) and none are built (n-gram drafting: --draft-ngram)")
    if "draft-simple" in spec and not args.model_draft:
        raise ConfigError("jllama serve --spec-type draft-simple: needs a draft model (-md)")
    if args.ctx_size is not None and args.ctx_size < 0:
        raise ConfigError(f"jllama serve -c {args.ctx_size}: must be >= 0")


def _constraint_flags(args, s) -> None:
    """llama-server's --grammar/--grammar-file/-j/-jf into the config's server.grammar or
    server.json_schema (text as given: a grammar spans lines, so not through YAML parsing)."""
    from jllama.errors import ConfigError

    given = [f for f, a in (("--grammar", "grammar"), ("--grammar-file", "grammar_file"),
                            ("-j", "json_schema"), ("-jf", "json_schema_file"))
             if getattr(args, a, None) is not None]
    if len(given) > 1:
        raise ConfigError(f"{given[0]} and {given[1]}: give one grammar or JSON schema")
    for attr, key in (("grammar_file", "grammar"), ("json_schema_file", "json_schema")):
        path = getattr(args, attr, None)
        if path is not None:
            try:
                text = open(path, encoding="utf-8").read()
            except OSError as e:
                flag = "--grammar-file" if key == "grammar" else "--json-schema-file"
                raise ConfigError(f"{flag} {path}: {e.strerror or e}") from None
            setattr(s, key, text)
    if args.grammar is not None:
        s.grammar = args.grammar
    if args.json_schema is not None:
        s.json_schema = args.json_schema


def server_grammar(s) -> str:
    """The GBNF text of the config's server.grammar or server.json_schema (llama-server's
    --grammar / -j: a schema is turned into a grammar once, at start-up), "" when neither."""
    from jllama.errors import ConfigError

    if s.grammar and s.json_schema:
        raise ConfigError("server.grammar and server.json_schema: give one of them")
    if not s.json_schema:
        return s.grammar or ""
    from jllama.server.json_schema import SchemaError, schema_to_grammar

    try:
        schema = json.loads(s.json_schema)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--json-schema: not JSON: {e}") from None
    if isinstance(schema, dict) and not schema:  # as llama-server's requests: any object
        schema = {"type": "object"}
    try:
        return schema_to_grammar(schema)
    except SchemaError as e:
        raise ConfigError(f"--json-schema: {e}") from None


def _api_keys(args, cfg) -> list[str]:
    """llama-server's --api-key (comma-separated) and --api-key-file (one per line, '#'
    comments), or the config's server.api_key."""
    from jllama.errors import ConfigError

    keys = []
    if args.api_key is not None:  # not through YAML parsing: keys may look like numbers
        keys += [k for k in args.api_key.split(",") if k]
    if args.api_key_file is not None:
        try:
            lines = open(args.api_key_file, encoding="utf-8").read().splitlines()
        except OSError as e:
            raise ConfigError(f"--api-key-file {args.api_key_file}: {e.strerror or e}") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not keys and cfg.server.api_key:
        keys = [cfg.server.api_key]
    return keys


def _slot_ctx(cfg, args) -> None:
    """llama-server's -c is the context of all slots together: each gets ctx / parallel (the
    whole of it with --kv-unified); 0 = the model's training context."""
    if args.ctx_size is None:
        return
    from jllama.errors import ConfigError

    total = args.ctx_size
    if total == 0:
        from pathlib import Path

        if Path(str(cfg.model)).is_dir():
            raise ConfigError("-c 0 (the model's training context) needs a GGUF model")
        from jllama.gguf.overrides import apply_kv_overrides
        from jllama.gguf.reader import read_gguf
        from jllama.registry import resolve_model

        g = apply_kv_overrides(read_gguf(resolve_model(cfg.model)), cfg.kv_overrides)
        cfg.runtime.ctx_size = int(g.get(f"{g.architecture}.context_length", 2048))
        return
    per = total if cfg.server.kv_unified else total // cfg.server.parallel
    if per < 16:
        raise ConfigError(f"-c {total} over {cfg.server.parallel} slots leaves {per} tokens per "
                          "slot; at least 16 are needed")
    cfg.runtime.ctx_size = per


def settings_from_config(cfg, alias: str, api_keys: list[str], tags: list[str] | None = None):
    """ServerSettings out of a loaded Config (the one place serve turns config into settings)."""
    from jllama.server.app import ServerSettings
    from jllama.server.gcp import GcpParams

    s = cfg.server
    sp = cfg.generation.sampling
    defaults = {"temperature": sp.temperature, "top_k": sp.top_k, "top_p": sp.top_p,
                "min_p": sp.min_p, "repeat_penalty": sp.repeat_penalty,
                "frequency_penalty": sp.frequency_penalty,
                "presence_penalty": sp.presence_penalty,
                **{k: getattr(sp, k) for k in EXTENDED_SAMPLING.values()},
                "dry_sequence_breakers": list(sp.dry_sequence_breakers)}
    if sp.seed is not None:
        defaults["seed"] = sp.seed
    if s.ignore_eos:  # llama-server's --ignore-eos, --keep: what a request leaves out
        defaults["ignore_eos"] = True
    if s.n_keep:
        defaults["n_keep"] = s.n_keep
    names = [a for a in alias.split(",") if a]
    return ServerSettings(model_alias=names[0] if len(names) == 1 else sorted(names)[0],
                          api_keys=list(api_keys),
                          max_queue=s.max_queue, timeout=s.timeout, metrics=s.metrics,
                          slots=s.slots, props=s.props, cors_origins=s.cors_origins, n_predict=s.n_predict,
                          defaults=defaults, aliases=names, tags=tags or [],
                          cache_prompt=s.cache_prompt, max_body=s.max_body,
                          media_path=_media_dir(s.media_path),
                          allow_remote_media=s.allow_remote_media, n_batch=s.n_batch,
                          spm_infill=s.spm_infill,
                          context_shift=s.context_shift, swa_full=s.swa_full,
                          cache_reuse=s.cache_reuse,
                          slot_save_path=_slot_dir(s.slot_save_path),
                          sleep_idle_seconds=s.sleep_idle_seconds, cache_ram=s.cache_ram,
                          cache_idle_slots=s.cache_idle_slots, kv_unified=s.kv_unified,
                          grammar=server_grammar(s), embd_normalize=s.embd_normalize,
                          slot_prompt_similarity=s.slot_prompt_similarity,
                          api_prefix=s.api_prefix, static_path=_static_dir(s.static_path),
                          gcp=GcpParams.from_env())


def _scheme(s) -> str:
    return "https" if s.ssl_key_file and s.ssl_cert_file else "http"


def _static_dir(path: str | None) -> str | None:
    """llama-server's --path check: the directory must exist (else it does not start)."""
    if not path:
        return None
    import os

    from jllama.errors import ConfigError

    if not os.path.isdir(path):
        raise ConfigError(f"--path {path}: static assets path not found")
    return path


def uvicorn_config(app, s, log_level: str = "info"):
    """uvicorn's settings for serve: TLS from llama-server's --ssl-key-file and
    --ssl-cert-file when both are given (one alone: plain HTTP, as llama-server)."""
    import uvicorn

    tls = {}
    if s.ssl_key_file and s.ssl_cert_file:
        import os

        from jllama.errors import ConfigError

        for flag, p in (("--ssl-key-file", s.ssl_key_file), ("--ssl-cert-file", s.ssl_cert_file)):
            if not os.path.isfile(p):
                raise ConfigError(f"{flag} {p}: no such file")
        tls = {"ssl_keyfile": s.ssl_key_file, "ssl_certfile": s.ssl_cert_file}
    return uvicorn.Config(app, log_level=log_level, http="h11", loop="asyncio",
                          timeout_graceful_shutdown=5, **tls)


def _slot_dir(path: str | None) -> str | None:
    """llama-server's --slot-save-path check: an existing directory."""
    if not path:
        return None
    import os

    from jllama.errors import ConfigError

    if not os.path.isdir(path):
        raise ConfigError(f"--slot-save-path {path}: not a directory")
    return os.path.join(path, "")


def _media_dir(path: str | None) -> str | None:
    """llama-server's --media-path check: an existing directory (file:// paths join it)."""
    if not path:
        return None
    import os

    from jllama.errors import ConfigError

    if not os.path.isdir(path):
        raise ConfigError(f"--media-path {path}: not a directory")
    return os.path.join(path, "")


def _serve(app, s, tools=None) -> None:
    """uvicorn on every address of llama-server's comma-separated --host; ``tools``
    (agent.ServerTools) have their MCP calls cancelled as soon as the stop signal comes (else
    uvicorn would wait for them to drain) and their child processes ended after."""
    import socket

    import uvicorn

    hosts, port = s.host, s.port
    cfg = uvicorn_config(app, s)  # before binding: a missing TLS file fails first
    socks = []
    for h in [h.strip() for h in hosts.split(",") if h.strip()]:
        fam = socket.AF_INET6 if ":" in h else socket.AF_INET
        sk = socket.socket(fam, socket.SOCK_STREAM)
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            sk.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sk.bind((h, port))
        except OSError as e:
            from jllama.errors import ConfigError

            raise ConfigError(f"--host {h} --port {port}: cannot listen there: "
                              f"{e.strerror or e}") from None
        socks.append(sk)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if tools is not None:
                tools.shutdown()
            super().handle_exit(sig, frame)
    try:
        Server(cfg).run(sockets=socks)
    finally:
        if tools is not None:
            tools.close()


def _agent_tools(args, cfg) -> dict:
    """llama-server's --tools/--tools-runtime/--mcp-servers-*/--ui-mcp-proxy/--agent as
    ServerSettings fields (MCP servers warmed up here, before the model loads, so a bad config
    fails fast); with tools or MCP servers and no --cors-origins, CORS answers localhost
    origins only."""
    from jllama.errors import ConfigError
    from jllama.server.agent import ServerTools

    tools, proxy = args.tools, bool(args.ui_mcp_proxy)
    if args.agent is not None:
        tools, proxy = ("all", True) if args.agent else (None, False)
    fields = {"ui_mcp_proxy": proxy}
    if ((tools or args.mcp_servers_config or args.mcp_servers_json)
            and args.cors_origins is None and cfg.server.cors_origins == "*"):
        fields["cors_origins"] = "localhost"
    try:
        fields["tools"] = ServerTools.setup(tools, args.tools_runtime, args.mcp_servers_config,
                                            args.mcp_servers_json)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return fields


# router flags a child must not inherit: the router sets them itself (address, name) or they
# are the router's alone (its key, its sources), as llama-server's unset_reserved_args
_ROUTER_ONLY = {"model", "host", "port", "api_key", "api_key_file", "alias", "tags", "models_dir",
                "models_preset", "models_max", "models_autoload", "config",
                # the router answers /tools and /cors-proxy itself: no MCP servers per child
                "tools", "tools_runtime", "mcp_servers_config", "mcp_servers_json",
                "ui_mcp_proxy", "agent",
                # the router answers over TLS itself and talks plain HTTP to its children
                "ssl_key_file", "ssl_cert_file"}


def _n_values(act: argparse.Action, argv: list[str], i: int) -> int:
    """How many of argv[i+1:] the option argv[i] takes, as argparse counts them."""
    rest = argv[i + 1:]
    if act.nargs == 0:
        return 0
    if act.nargs is None:
        return 1
    if isinstance(act.nargs, int):
        return act.nargs
    n = 0
    while n < len(rest) and not (rest[n].startswith("-") and len(rest[n]) > 1
                                 and not rest[n][1].isdigit()):
        n += 1
        if act.nargs == "?":
            break
    return n


def child_args(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The router's serve flags less those a child must not get (_ROUTER_ONLY)."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        inline = tok.startswith("--") and "=" in tok
        act = parser._option_string_actions.get(tok.split("=", 1)[0] if inline else tok)
        if act is None:  # a key.path=value override
            out.append(tok)
            i += 1
            continue
        n = 0 if inline else _n_values(act, argv, i)
        if act.dest not in _ROUTER_ONLY:
            out += argv[i:i + 1 + n]
        i += 1 + n
    return out


def preset_flag(parser: argparse.ArgumentParser, key: str) -> tuple[str, bool] | None:
    """serve's flag for a preset key ('c', 'ctx-size', 'model'): (its long name, whether it
    takes a value), or None when serve has no such flag."""
    act = parser._option_string_actions.get(("-" if len(key) == 1 else "--") + key)
    if act is None:
        act = parser._option_string_actions.get("-" + key) or parser._option_string_actions.get(
            "--" + key)
    if act is None or not act.option_strings:
        return None
    long = max(act.option_strings, key=lambda o: (o.startswith("--"), len(o)))
    return long.lstrip("-"), act.nargs != 0


def _run_router(args) -> int:
    """No -m and --models-dir/--models-preset: llama-server's router mode (server/router.py)."""
    import functools

    from jllama.config import load_config
    from jllama.errors import ConfigError
    from jllama.server.app import ServerSettings
    from jllama.server.router import Router, RouterConfig, create_router_app

    if args.config is not None:
        raise ConfigError("router mode (--models-dir/--models-preset) takes no config file: "
                          "give settings as flags, every model gets them")
    if args.api_prefix or args.static_path:
        raise ConfigError("--api-prefix and --path are not built in router mode "
                          "(--models-dir/--models-preset)")
    if args.models_max < 0:
        raise ConfigError(f"--models-max {args.models_max}: must be >= 0 (0 = no limit)")
    cfg = load_config(None, [o for o in _overrides(args) if o.startswith("server.")])
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    if "serve" in argv:
        argv = argv[argv.index("serve") + 1:]
    parser = args._parser
    settings = ServerSettings(model_alias="", api_keys=_api_keys(args, cfg),
                              timeout=cfg.server.timeout, cors_origins=cfg.server.cors_origins,
                              max_body=cfg.server.max_body)
    settings.__dict__.update(_agent_tools(args, cfg))
    router = Router(RouterConfig(models_dir=args.models_dir, models_preset=args.models_preset,
                                 models_max=args.models_max, autoload=args.models_autoload,
                                 base_args=child_args(parser, argv),
                                 flag=functools.partial(preset_flag, parser),
                                 settings=settings))
    names = ", ".join(router.models) or "none"
    print(f"jllama serve: router on {_scheme(cfg.server)}://{cfg.server.host}:{cfg.server.port} "
          f"({len(router.models)} models: {names}; at most "
          f"{args.models_max or 'any number'} loaded)", file=sys.stderr)
    _serve(create_router_app(router), cfg.server, settings.tools)
    return 0


def run(args) -> int:

    from jllama.config import load_config
    from jllama.errors import ConfigError

    _check_llama_server_args(args)
    if args.verbose:
        import logging

        log = logging.getLogger("jllama.server")
        log.setLevel(logging.DEBUG)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
    if args.models_dir is not None or args.models_preset is not None:
        if args.model is not None:
            raise ConfigError("--models-dir/--models-preset start the router (several "
                              "models): give them without -m")
        return _run_router(args)
    chat_fields, chat_template = _chat_flags(args)
    cfg = load_config(args.config, _overrides(args))
    s = cfg.server
    if args.alias is not None:  # not through YAML parsing: names may look like numbers
        s.model_alias = args.alias
    _constraint_flags(args, s)
    keys = _api_keys(args, cfg)
    if s.parallel < 1:
        raise ConfigError(f"{cfg.source}: 'server.parallel' must be at least 1, got {s.parallel}")
    if s.max_queue < 0 or s.timeout <= 0:
        raise ConfigError(f"{cfg.source}: 'server.max_queue' must be >= 0 and 'server.timeout' "
                          "> 0")
    if cfg.distributed.num_processes > 1:
        raise ConfigError(f"{cfg.source}: jllama serve runs in one process; 'distributed' is "
                          "for run/generate (a mesh over this host's devices: 'mesh')")
    _slot_ctx(cfg, args)
    from jllama.server.gcp import GcpParams

    gcp = GcpParams.from_env()
    if gcp is not None:  # llama-server: AIP_HTTP_PORT overrides --port in Google Cloud mode
        s.port = gcp.port
    tags = [t for t in (args.tags or "").split(",") if t]
    agent_fields = _agent_tools(args, cfg)
    try:
        return _run_single(args, cfg, s, keys, tags, chat_fields, chat_template, agent_fields)
    finally:
        if agent_fields["tools"] is not None:  # a model that failed to load leaves nothing
            agent_fields["tools"].close()


def _run_single(args, cfg, s, keys, tags, chat_fields, chat_template, agent_fields) -> int:

    from jllama.cli.common import (
        model_load_kwargs,
        platform_origin,
        setup_platform,
        start_backend,
        warn_ngl_ignored,
    )
    from jllama.errors import ConfigError

    enc_path = _encoder_path(cfg, args)
    setup_platform(cfg.runtime.platform, cfg.runtime.threads, platform_origin(cfg))
    start_backend()
    warn_ngl_ignored(cfg.runtime.n_gpu_layers)

    if enc_path is not None:
        from jllama.server.embeddings import EncoderRunner

        print(f"jllama serve: loading encoder {enc_path} ...", file=sys.stderr)
        # llama-server's context defaults to the model's training context (-c 0)
        encoder = EncoderRunner(enc_path, pooling="rank" if args.reranking else args.pooling,
                                ctx_size=args.ctx_size or None,
                                # llama_context: n_ubatch = min(n_batch, n_ubatch)
                                n_ubatch=min(args.batch_size or 2048, args.ubatch_size or 512))
        from jllama.server.app import ServerState, create_app

        alias = s.model_alias or encoder.path.stem
        settings = settings_from_config(cfg, alias, keys, tags)
        settings.__dict__.update(agent_fields)
        state = ServerState(None, settings, encoder=encoder)
        print(f"jllama serve: {_scheme(s)}://{s.host}:{s.port}{s.api_prefix}/v1 (encoder "
              f"'{alias}', pooling {encoder.pooling}, context {encoder.n_ctx}: embeddings"
              f"{' and rerank' if encoder.pooling == 'rank' else ''})", file=sys.stderr)
        _serve(create_app(state, warmup=not args.no_warmup), s, settings.tools)
        return 0

    from jllama.api import Llama
    from jllama.server.app import ServerState, create_app

    print(f"jllama serve: loading {cfg.model} ({s.parallel} slots x {cfg.runtime.ctx_size} "
          "tokens) ...", file=sys.stderr)
    llm = Llama(cfg.model, ctx_size=cfg.runtime.ctx_size, n_slots=s.parallel,
                cache_type=cfg.runtime.cache_type_k, cache_type_v=cfg.runtime.cache_type_v,
                quant=cfg.quant,
                compile_cache=cfg.runtime.compile_cache, flash_attn=cfg.runtime.flash_attn,
                prompt_matmul=cfg.runtime.prompt_matmul,
                mesh=cfg.mesh if cfg.mesh.data * cfg.mesh.model > 1 else None,
                draft=cfg.draft if cfg.draft.kind else None, lora=cfg.lora,
                mmproj=cfg.vision.mmproj, **model_load_kwargs(cfg))
    if args.lora_init_without_apply and llm.lora is not None:
        llm.set_lora_scales([0.0] * len(llm.lora.files))
    alias = s.model_alias or llm.path.stem
    embedder = None
    if args.embedding or args.reranking:  # llama-server: completions and embeddings/rerank
        from jllama.server.embeddings import DecoderRunner

        try:
            embedder = DecoderRunner(llm.model, llm.spec, llm.tokenizer, llm.gguf,
                                     llm.engine.ctx_size, llm.path,
                                     "rank" if args.reranking else args.pooling, llm.numerics)
        except ValueError as e:
            raise ConfigError(f"{cfg.model}: {e}") from None
    settings = settings_from_config(cfg, alias, keys, tags)
    for k, v in chat_fields.items():
        setattr(settings, k, v)
    if args.verbose:  # llama-server: params.verbose = verbosity > 9, a request may override it
        settings.defaults["verbose"] = True
    if chat_template is not None:
        llm.tokenizer.chat_template = chat_template
    if not args.jinja:
        _check_legacy_template(llm.tokenizer.chat_template)
    settings.__dict__.update(agent_fields)
    state = ServerState(llm, settings, encoder=embedder)
    print(f"jllama serve: {_scheme(s)}://{s.host}:{s.port}{s.api_prefix}/v1 (model '{alias}', "
          f"auth {'on' if keys else 'off'})", file=sys.stderr)
    _serve(create_app(state, warmup=not args.no_warmup), s, settings.tools)
    return 0


def _chat_flags(args) -> tuple[dict, str | None]:
    """llama-server's chat template and reasoning flags: (ServerSettings fields, the chat
    template that replaces the GGUF's or None), checked before the model loads."""
    from jllama.errors import ConfigError
    from jllama.tokenizer.chat import CHATML_TEMPLATE
    from jllama.tokenizer.chat_builtin import BUILTIN_TEMPLATES, is_builtin

    kwargs = {}
    if args.chat_template_kwargs is not None:
        try:
            kwargs = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--chat-template-kwargs: not JSON: {e}") from None
        if not isinstance(kwargs, dict):
            raise ConfigError("--chat-template-kwargs: must be a JSON object")
    if args.reasoning in ("on", "off"):  # llama-server sets the kwarg as well
        kwargs["enable_thinking"] = args.reasoning == "on"
    if args.reasoning_effort not in (None, "default"):
        kwargs["reasoning_effort"] = args.reasoning_effort
    fields = {"template_kwargs": kwargs, "reasoning": {"on": 1, "off": 0}.get(args.reasoning, -1),
              "jinja": args.jinja}
    if args.reasoning_format is not None:
        fields["reasoning_format"] = args.reasoning_format
    if args.reasoning_budget is not None:
        fields["reasoning_budget"] = args.reasoning_budget
    if args.reasoning_budget_message is not None:
        fields["reasoning_budget_message"] = args.reasoning_budget_message
    template = None
    if args.chat_template_file is not None:
        try:
            template = open(args.chat_template_file, encoding="utf-8").read()
        except OSError as e:
            raise ConfigError(f"--chat-template-file {args.chat_template_file}: "
                              f"{e.strerror or e}") from None
    elif args.chat_template is not None:
        if args.chat_template == "chatml":
            template = CHATML_TEMPLATE
        elif is_builtin(args.chat_template):  # rendered as llama.cpp's llama_chat_apply_template
            template = args.chat_template
        elif "{{" in args.chat_template or "{%" in args.chat_template:
            template = args.chat_template
        else:
            raise ConfigError(f"--chat-template {args.chat_template}: not one of llama.cpp's "
                              f"built-in templates ({', '.join(BUILTIN_TEMPLATES)}) nor a Jinja "
                              "template text (or use --chat-template-file)")
    if template is not None:
        from jllama.tokenizer.chat import ChatTemplateError, check_template

        try:
            check_template(template)
        except ChatTemplateError as e:
            raise ConfigError(f"--chat-template: {e}") from None
    return fields, template


def _check_legacy_template(template: str | None) -> None:
    """--no-jinja: llama-server starts only when a built-in template renders the chat
    template (its example conversation at load time)."""
    from jllama.errors import ConfigError
    from jllama.tokenizer.chat import CHATML_TEMPLATE
    from jllama.tokenizer.chat_builtin import detect

    if detect(template or CHATML_TEMPLATE) is None:
        raise ConfigError("--no-jinja: the chat template is not one llama.cpp's built-in "
                          "templates know (this custom template is not supported, try using "
                          "--jinja, or --chat-template NAME)")


def _encoder_path(cfg, args):
    """The GGUF path when the model is a BERT-family encoder (an embeddings/rerank server), None
    for a decoder. A decoder takes --embedding (--pooling none/mean/cls/last/rank) and
    --reranking (a reranker GGUF: cls.output.weight); --pooling without either is refused.
    Reads metadata only (before the backend starts)."""
    from pathlib import Path

    from jllama.errors import ConfigError
    from jllama.models.bert import ENCODERS

    wants = args.pooling is not None and not (args.embedding or args.reranking)
    arch = None
    if not Path(str(cfg.model)).is_dir():
        from jllama.gguf.reader import read_gguf
        from jllama.registry import resolve_model

        path = resolve_model(cfg.model)
        arch = read_gguf(path).architecture
        if arch in ENCODERS:
            return path
    if wants:
        raise ConfigError(f"{cfg.model}: --pooling on a decoder ('{arch or 'a checkpoint'}') "
                          "needs --embedding")
    return None
