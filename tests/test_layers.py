"""The package's import graph: no loops (function-level imports count), and layers read bottom-up.

Layers: gguf -> quant -> kernels -> models (with their cache) -> engine -> eval / server /
parallel / checkpoint -> api / config -> cli. A module may import its own layer or lower ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jllama"

# first matching prefix wins; rank = layer, lower is more basic
LAYERS: list[tuple[str, int]] = [
    ("jllama.errors", 0), ("jllama.numerics", 0),
    ("jllama.gguf", 1), ("jllama.registry", 1),
    ("jllama.quant", 2),
    ("jllama.kernels", 3),
    ("jllama.models", 4), ("jllama.tokenizer", 4), ("jllama.convert", 4),
    ("jllama.engine", 5),
    ("jllama.eval", 6), ("jllama.server", 6), ("jllama.parallel", 6), ("jllama.checkpoint", 6),
    ("jllama.api", 7), ("jllama.config", 7),
    ("jllama.cli", 8), ("jllama.__main__", 8),
    ("jllama", 0),  # the package root: its version and default XLA flags, no imports
]


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _graph() -> dict[str, set[str]]:
    """module -> the jllama modules it imports anywhere in its body."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t) if t.split(".")[0] == "jllama" else None
                if r and r != m:
                    graph[m].add(r)
    return graph


def _rank(mod: str) -> int:
    for prefix, rank in LAYERS:
        if mod == prefix or mod.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{mod} has no layer in LAYERS")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_loops():
    assert _cycles(_graph()) == []


def test_layers_read_bottom_up():
    up = sorted(f"{m} ({_rank(m)}) imports {t} ({_rank(t)})"
                for m, ts in _graph().items() for t in ts if _rank(t) > _rank(m))
    assert up == []


def test_the_checker_sees_a_loop_and_a_function_level_import():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(g) == [["a", "b", "c"]]
    src = "def f():\n    from jllama.api import Llama\n"
    found = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)]
    assert found and found[0].module == "jllama.api"


@pytest.mark.parametrize("mod", sorted(_modules()))
def test_every_module_has_a_layer(mod):
    _rank(mod)
