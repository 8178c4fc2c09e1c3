"""Many devices: mesh sharding of an Engine, multi-process runs, Orbax checkpoints.

Import-light on purpose: ``plan_engine`` pulls in JAX only when called.
"""

from __future__ import annotations

from typing import Any


def plan_engine(spec: Any, n_slots: int, mesh_cfg: Any, devices: list | None = None,
                strict: bool = False):
    """The sharding plan an Engine is built with (see ``mesh.plan_engine``)."""
    from jllama.parallel.mesh import plan_engine as _plan

    return _plan(spec, n_slots, mesh_cfg, devices=devices, strict=strict)


__all__ = ["plan_engine"]
