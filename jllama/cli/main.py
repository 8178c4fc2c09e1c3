"""``jllama`` command line: one module per subcommand in ``jllama/cli/``.

Each module exposes ``register(subparsers)`` which adds its parser and sets ``func`` (taking the
parsed args, returning an exit code). Modules are imported only when listed, and JAX only inside
``func``, so ``jllama --help`` and ``jllama inspect`` stay fast.

Errors: every failure is one line on stderr, ``jllama COMMAND: error: ...``, and exit code 1;
no traceback. That covers user mistakes (``JllamaError``: a bad file, config key, request),
the system's answers (``OSError``: a file that cannot be read or written, a full disk;
``MemoryError``), JAX failing to start a backend, and anything unexpected (a bug in jllama:
the line names the exception type). ``JLLAMA_DEBUG=1`` shows the full traceback instead.
Ctrl-C exits 130 without one; a closed output pipe (``jllama ... | head``) exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from jllama.errors import JllamaError

# order = order in --help
COMMANDS = [
    "run",
    "generate",
    "chat",
    "inspect",
    "quantize",
    "imatrix",
    "perplexity",
    "bench",
    "serve",
    "convert",
    "convert-hf",
    "export-lora",
    "synth",
]


EPILOG = ("Errors print one line and exit 1; set JLLAMA_DEBUG=1 to see the traceback of "
          "an error instead. Ctrl-C exits 130.")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line and exit code 1 like every other error."""

    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _debug() -> bool:
    return os.environ.get("JLLAMA_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return " ".join(lines)


def describe_error(e: BaseException) -> str:
    """The one line the CLI prints for an error that ended a command."""
    if isinstance(e, JllamaError):
        return _one_line(e)
    if isinstance(e, OSError) and e.strerror:
        what = e.strerror
        if e.filename is not None:
            what = f"{e.filename}: {what}"
            if e.filename2 is not None:
                what += f" ({e.filename2})"
        return what
    if isinstance(e, MemoryError):
        return "out of memory (host RAM): try a smaller --ctx-size, fewer slots or a smaller model"
    if isinstance(e, OSError):
        return _one_line(e) or type(e).__name__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    if type(e).__module__.split(".")[0] in ("jax", "jaxlib"):
        # XLA's runtime errors (out of device memory, a device lost, ...) carry multi-line
        # reports: the first line says what happened
        return f"JAX {msg}"
    return (f"{msg} (unexpected: probably a bug in jllama; JLLAMA_DEBUG=1 shows the "
            "traceback)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jllama",
        description="Run, study and serve GGUF models on JAX/XLA (llama.cpp's job).",
        epilog=EPILOG,
    )
    from jllama import __version__

    p.add_argument("--version", action="version", version=f"jllama {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"jllama.cli.{name.replace('-', '_')}")
        except ModuleNotFoundError as e:
            if e.name == f"jllama.cli.{name.replace('-', '_')}":
                continue  # command not built in this version
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the router passes flags on
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("", file=sys.stderr)  # end the ^C line; no traceback
        return 130
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly, and keep Python from complaining
        # while it flushes stdout at exit
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if _debug():
            raise
        print(f"jllama {args.command}: error: {describe_error(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
