"""``jllama`` command line: one module per subcommand in ``jllama/cli/``.

Each module exposes ``register(subparsers)`` which adds its parser and sets ``func`` (taking the
parsed args, returning an exit code). Modules are imported only when listed, and JAX only inside
``func``, so ``jllama --help`` and ``jllama inspect`` stay fast.

User mistakes (``JllamaError``) print one line and exit 1; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jllama.errors import JllamaError

# order = order in --help
COMMANDS = [
    "run",
    "generate",
    "chat",
    "inspect",
    "quantize",
    "perplexity",
    "bench",
    "serve",
    "convert",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jllama",
        description="Run, study and serve GGUF models on JAX/XLA (llama.cpp's job).",
    )
    from jllama import __version__

    p.add_argument("--version", action="version", version=f"jllama {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"jllama.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"jllama.cli.{name}":
                continue  # command not built in this version
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except JllamaError as e:
        print(f"jllama {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
