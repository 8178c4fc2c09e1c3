"""engine/heap.py: the C heap is trimmed once after XLA compiles a program, not per call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jllama.engine import heap


def test_trim_once_after_a_compile(monkeypatch):
    heap.install()
    if heap._state["trim"] is None:
        pytest.skip("this C library has no malloc_trim (not glibc)")
    calls = []
    monkeypatch.setitem(heap._state, "trim", lambda pad: calls.append(pad) or 1)
    heap.trim_after_compile()  # whatever compiled before this test
    calls.clear()

    def f(x):  # a program no other test compiles: a real backend compile
        return jnp.sin(x) * 3.25 + 0.125

    x = jnp.arange(7, dtype=jnp.float32)
    jax.jit(f)(x).block_until_ready()
    assert heap.trim_after_compile() and calls == [0]
    jax.jit(f)(x).block_until_ready()  # the same program again: nothing new, no trim
    assert not heap.trim_after_compile() and calls == [0]
