"""Multi-process runs: every process runs the same program over one global device mesh.

``initialize`` must run before anything touches JAX's backends (``jax.devices()`` would freeze a
single-process view). Afterwards ``jax.devices()`` lists every process's devices, so
``plan_engine`` builds the mesh over all of them; each process holds the shards on its own
devices, the host-read outputs are replicated (``mesh._replicated_outputs``), and so every
process samples the same tokens. Only process 0 prints.

On CPU, cross-process collectives need an implementation (gloo): without it the first sharded
step fails. A peer that never comes up must not hang the others forever: the connection phase is
bounded by ``JLLAMA_DIST_TIMEOUT`` seconds (default 300, jax's default) and its failure becomes a
one-line ``DistributedError``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from jllama.errors import JllamaError

ENV_TIMEOUT = "JLLAMA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


class DistributedError(JllamaError):
    """A multi-process run could not be set up (bad address, missing peer, late start)."""


def parse_coordinator(addr: str | None) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port), with a message naming the flag."""
    if not addr or ":" not in addr:
        raise DistributedError(f"distributed.coordinator / --coordinator {addr!r}: expected "
                               "HOST:PORT of process 0, e.g. 10.0.0.1:1234")
    host, _, port = addr.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not host or not 0 < p < 65536:
        raise DistributedError(f"distributed.coordinator / --coordinator {addr!r}: expected "
                               "HOST:PORT with a port in 1..65535")
    return host, p


def timeout_s(cfg: Any = None) -> int:
    """The connection timeout: ``cfg.timeout`` if the config has one, else the environment."""
    t = getattr(cfg, "timeout", None)
    if t is None:
        raw = os.environ.get(ENV_TIMEOUT, "")
        try:
            t = int(float(raw)) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise DistributedError(f"{ENV_TIMEOUT}={raw!r}: expected seconds") from None
    if int(t) < 1:
        raise DistributedError(f"distributed timeout must be >= 1 s, got {t}")
    return int(t)


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: let jax complain itself
        return False


def _enable_cpu_collectives() -> None:
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # option gone (gloo the default) or renamed
        pass


def initialize(cfg: Any) -> None:
    """Join the run described by ``cfg`` (a DistributedConfig). No-op for one process."""
    n = int(cfg.num_processes)
    pid = int(cfg.process_id)
    if n < 1 or not 0 <= pid < n:
        raise DistributedError(f"distributed.process_id must be in [0, num_processes): got "
                               f"{pid} of {n}")
    if n == 1:
        return
    parse_coordinator(cfg.coordinator)
    t = timeout_s(cfg)
    import jax

    if jax.distributed.is_initialized():
        if jax.process_count() != n or jax.process_index() != pid:
            raise DistributedError(f"jax.distributed is already initialized as process "
                                   f"{jax.process_index()} of {jax.process_count()}")
        return
    if _backends_started():
        raise DistributedError("jax.distributed must be initialized before JAX is used "
                               "(call jllama.parallel.distributed.initialize first)")
    _enable_cpu_collectives()
    try:
        with _connect_errors_raise():
            jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=n,
                                       process_id=pid, initialization_timeout=t)
    except Exception as e:  # JaxRuntimeError & co: deadline exceeded, connection refused
        _forget_failed_client()
        first = (str(e).strip().splitlines() or [""])[0][:200]
        detail = f" [{first}]" if first and "bad_cast" not in first else ""
        raise DistributedError(
            f"process {pid} of {n} could not join the run at {cfg.coordinator} within {t} s: "
            f"are all {n} processes started, with the same --coordinator and distinct "
            f"--process-id? (raise the wait with {ENV_TIMEOUT}=SECONDS){detail}") from None


@contextlib.contextmanager
def _connect_errors_raise():
    """Make a failed connection raise instead of aborting the process.

    jaxlib's distributed client reports errors to a callback whose default logs FATAL (abort,
    no Python exception, no clean message). With any callback passed from Python instead, a
    failed ``connect()`` raises (jaxlib 0.10 cannot even convert the status for the Python
    callback: the exception is a ``std::bad_cast``, thrown on the connecting thread). jax's
    ``initialize`` does not expose that argument, so the client factory is wrapped for the
    duration of the call (private API: if it moved, the call runs unwrapped and a missing peer
    aborts after the timeout instead). Later errors (a peer dying mid-run) are raised on a
    background thread and still end the process, as jax's default does.
    """
    try:
        from jax._src import distributed as jd

        lib = jd._jax
        orig = lib.get_distributed_runtime_client
    except (ImportError, AttributeError):
        yield
        return

    def on_error(*_args: Any) -> None:
        os._exit(1)  # only reachable after connect: a peer failed, as jax's default ends it

    def client(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("missed_heartbeat_callback", on_error)
        return orig(*args, **kwargs)

    try:
        lib.get_distributed_runtime_client = client
    except (AttributeError, TypeError):
        yield
        return
    try:
        yield
    finally:
        lib.get_distributed_runtime_client = orig


def _forget_failed_client() -> None:
    """Drop the half-initialized client/service so jax's exit hook does not re-report the
    failure as a traceback."""
    try:
        from jax._src import distributed as jd

        st = jd.global_state
        st.client = None
        st.preemption_sync_manager = None
        if st.service is not None:
            with contextlib.suppress(Exception):
                st.service.shutdown()
            st.service = None
    except (ImportError, AttributeError):
        pass


def is_main() -> bool:
    """Whether this process is the one that prints (process 0; always true single-process)."""
    import jax

    return jax.process_index() == 0


def shared_seed() -> int:
    """A random sampling seed equal on every process (process 0's, broadcast), so unseeded
    sampling draws the same tokens everywhere."""
    import jax
    import numpy as np

    seed = np.array(int.from_bytes(np.random.bytes(4), "little") >> 1, np.int32)
    if jax.process_count() == 1:
        return int(seed)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(seed))
