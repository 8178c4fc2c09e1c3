"""``jllama serve [CONFIG] [-m MODEL] [--port N] [--parallel N] ...``: the OpenAI-compatible server.

Flags override the config file's ``server``/``runtime`` sections, through the same validation
path as the YAML (``key.path=value`` overrides).
"""

from __future__ import annotations

import argparse

from jllama.cli.common import add_numerics_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("config", nargs="?", default=None, help="YAML config (see configs/serve-*.yaml)")
    p.add_argument("-m", "--model", default=None, help="GGUF path or registry name")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("-np", "--parallel", type=int, default=None,
                   help="slots: requests decoded together in one batch")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size per slot")
    add_numerics_args(p, via_config=True)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests allowed to wait for a slot before answering 503")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a request may take in all (queue + generation) before 504")
    p.add_argument("--alias", default=None, help="model id reported by /v1/models")
    from jllama.cli.common import add_platform_args

    add_platform_args(p)
    p.add_argument("--no-warmup", action="store_true", help="skip compiling before serving")
    from jllama.cli.common import add_draft_args

    add_draft_args(p)  # speculative decoding: single-slot servers (--parallel 1)
    from jllama.cli.common import add_lora_args

    add_lora_args(p)
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
    p.add_argument("--mmproj", metavar="FNAME", default=None,
                   help="the model's vision projector GGUF: chat messages may then carry "
                        "image_url parts (base64 data URLs)")
    p.add_argument("overrides", nargs="*", default=[], help="key.path=value overrides")
    p.set_defaults(func=run)


def _overrides(args) -> list[str]:
    ov = list(args.overrides)
    pairs = {"model": "model", "host": "server.host", "port": "server.port",
             "parallel": "server.parallel", "ctx_size": "runtime.ctx_size",
             "max_queue": "server.max_queue", "timeout": "server.timeout",
             "alias": "server.model_alias", "platform": "runtime.platform",
             "threads": "runtime.threads"}
    for attr, key in pairs.items():
        v = getattr(args, attr)
        if v is not None:
            ov.append(f"{key}={v}")
    from jllama.cli.common import overrides_from_args

    return ov + [o for o in overrides_from_args(args)
                 if o.startswith(("draft.", "runtime.flash_attn", "runtime.prompt_matmul", "lora=",
                                  "vision.mmproj="))]


def run(args) -> int:
    import sys

    from jllama.config import load_config
    from jllama.errors import ConfigError

    cfg = load_config(args.config, _overrides(args))
    if args.api_key is not None:  # not through YAML parsing: keys may look like numbers
        cfg.server.api_key = args.api_key
    s = cfg.server
    if s.parallel < 1:
        raise ConfigError(f"{cfg.source}: 'server.parallel' must be at least 1, got {s.parallel}")
    if s.max_queue < 0 or s.timeout <= 0:
        raise ConfigError(f"{cfg.source}: 'server.max_queue' must be >= 0 and 'server.timeout' "
                          "> 0")
    if cfg.distributed.num_processes > 1:
        raise ConfigError(f"{cfg.source}: jllama serve runs in one process; 'distributed' is "
                          "for run/generate (a mesh over this host's devices: 'mesh')")
    from jllama.cli.common import platform_origin, setup_platform, start_backend

    enc_path = _encoder_path(cfg, args)
    setup_platform(cfg.runtime.platform, cfg.runtime.threads, platform_origin(cfg))
    start_backend()
    import uvicorn

    if enc_path is not None:
        from jllama.server.embeddings import EncoderRunner

        print(f"jllama serve: loading encoder {enc_path} ...", file=sys.stderr)
        # llama-server's context defaults to the model's training context (-c 0)
        encoder = EncoderRunner(enc_path, pooling="rank" if args.reranking else args.pooling,
                                ctx_size=args.ctx_size)
        from jllama.server.app import ServerSettings, ServerState, create_app

        alias = s.model_alias or encoder.path.stem
        state = ServerState(None, ServerSettings(model_alias=alias, api_key=s.api_key,
                                                 max_queue=s.max_queue, timeout=s.timeout),
                            encoder=encoder)
        print(f"jllama serve: http://{s.host}:{s.port}/v1 (encoder '{alias}', pooling "
              f"{encoder.pooling}, context {encoder.n_ctx}: embeddings"
              f"{' and rerank' if encoder.pooling == 'rank' else ''})", file=sys.stderr)
        uvicorn.run(create_app(state, warmup=not args.no_warmup), host=s.host, port=s.port,
                    log_level="info", http="h11", loop="asyncio", timeout_graceful_shutdown=5)
        return 0

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, create_app

    print(f"jllama serve: loading {cfg.model} ({s.parallel} slots x {cfg.runtime.ctx_size} "
          "tokens) ...", file=sys.stderr)
    llm = Llama(cfg.model, ctx_size=cfg.runtime.ctx_size, n_slots=s.parallel,
                cache_type=cfg.runtime.cache_type_k, cache_type_v=cfg.runtime.cache_type_v,
                quant=cfg.quant,
                compile_cache=cfg.runtime.compile_cache, flash_attn=cfg.runtime.flash_attn,
                prompt_matmul=cfg.runtime.prompt_matmul,
                mesh=cfg.mesh if cfg.mesh.data * cfg.mesh.model > 1 else None,
                draft=cfg.draft if cfg.draft.kind else None, lora=cfg.lora,
                mmproj=cfg.vision.mmproj)
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
    state = ServerState(llm, ServerSettings(model_alias=alias, api_key=s.api_key,
                                            max_queue=s.max_queue, timeout=s.timeout),
                        encoder=embedder)
    print(f"jllama serve: http://{s.host}:{s.port}/v1 (model '{alias}', "
          f"auth {'on' if s.api_key else 'off'})", file=sys.stderr)
    uvicorn.run(create_app(state, warmup=not args.no_warmup), host=s.host, port=s.port,
                log_level="info", http="h11", loop="asyncio", timeout_graceful_shutdown=5)
    return 0



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
