"""Many devices: mesh sharding of an Engine, multi-process runs, Orbax checkpoints.

Import-light on purpose: ``apply_mesh`` pulls in JAX only when called.
"""

from __future__ import annotations

from typing import Any


def apply_mesh(engine: Any, mesh_cfg: Any, devices: list | None = None, strict: bool = False):
    """Shard an Engine's weights and KV cache over a ("data", "model") mesh (see ``mesh.py``)."""
    from jllama.parallel.mesh import apply_mesh as _apply

    return _apply(engine, mesh_cfg, devices=devices, strict=strict)


__all__ = ["apply_mesh"]
