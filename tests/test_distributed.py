"""Multi-process runs (jllama.parallel.distributed): two CLI processes, one mesh, same tokens.

Two ``jllama generate`` processes on 127.0.0.1, each with 2 simulated CPU devices, share a
data=1 x model=4 mesh (attention, FFN, vocabulary and KV heads split across both processes,
cross-process collectives over gloo). The reference is the single-process, single-device run
of the same command: greedy text must be identical, printed by process 0 only. The model is a
tiny random llama with F16 weights (8 heads / 4 KV heads): float weights keep activations
unquantized, so a partitioned matmul's different summation order cannot flip a ggml rounding
step, and its well-spread logits keep greedy choices far from ties.

The same run is repeated from an Orbax checkpoint (each process restoring only its shards).
Every subprocess has a timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROMPT = "the quick brown fox"
N_TOKENS = 16


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory) -> Path:
    import gguf
    from tinymodels import dense_hparams, dense_tensors, write_gguf

    shp = dict(n_layer=2, n_embd=256, n_ff=192, n_head=8, n_head_kv=4, head_dim=32)
    t = dense_tensors(5, n_vocab=320, tied=False, **shp)
    path = tmp_path_factory.mktemp("dist") / "tiny-f16.gguf"
    return write_gguf(path, "llama", dense_hparams(**shp), t, qtype=gguf.GGMLQuantizationType.F16)


def _env(devices: int, timeout_s: int | None = None) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    if timeout_s is not None:
        env["JLLAMA_DIST_TIMEOUT"] = str(timeout_s)
    return env


def _generate_cmd(model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jllama", "generate", "-m", str(model), "-p", PROMPT,
            "-n", str(N_TOKENS), "--temp", "0", "-c", "128", "--platform", "cpu", *extra]


_GLOO = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. "
                   r"Expected number of connected peer ranks is : \d+\n?")


def _text(stdout: str) -> str:
    """Generated text: stdout minus gloo's connection notices, which its C++ code prints
    wherever stdout happens to be (mid-line too, split over writes)."""
    out = _GLOO.sub("", stdout)
    # pieces of a notice split by another thread's write
    return "\n".join(ln for ln in out.split("\n")
                     if "[Gloo]" not in ln and "connected peer ranks" not in ln)


@pytest.fixture(scope="module")
def reference_text(tiny_f16) -> str:
    ref = subprocess.run(_generate_cmd(tiny_f16), capture_output=True, text=True, timeout=120,
                         env=_env(1))
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert _text(ref.stdout).strip(), "single-process run generated nothing"
    return _text(ref.stdout)


def _two_processes(model: Path) -> list[tuple[str, str]]:
    """(stdout, stderr) of processes 0 and 1 generating over one 1x4 mesh."""
    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        _generate_cmd(model, "--coordinator", addr, "--num-processes", "2",
                      "--process-id", str(i), "--mesh", "1x4"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(2, 60))
        for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_two_processes_match_single_process(tiny_f16, reference_text):
    outs = _two_processes(tiny_f16)
    assert _text(outs[0][0]) == reference_text
    assert _text(outs[1][0]).strip() == ""  # only process 0 prints the completion
    assert "generation" in outs[0][1] and "generation" not in outs[1][1]  # ... and timings


def test_two_processes_from_checkpoint(tiny_f16, reference_text, tmp_path):
    """The same run started from an Orbax checkpoint: each process restores only its shards
    of the 1x4 mesh (jllama.checkpoint), and the text is still the single-process one."""
    from jllama.cli.main import main

    ck = tmp_path / "tiny-orbax"
    assert main(["convert", str(tiny_f16), "--to-orbax", str(ck)]) == 0
    outs = _two_processes(ck)
    assert _text(outs[0][0]) == reference_text
    assert _text(outs[1][0]).strip() == ""


def test_missing_peer_fails_clearly(tiny_f16):
    """num_processes=2 with only process 0 started: a one-line error after the timeout."""
    t0 = time.monotonic()
    r = subprocess.run(_generate_cmd(tiny_f16, "--coordinator", f"127.0.0.1:{_free_port()}",
                                     "--num-processes", "2", "--process-id", "0"),
                       capture_output=True, text=True, timeout=120, env=_env(1, 10))
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, r.stderr[-3000:]
    assert "jllama generate: error: process 0 of 2 could not join the run" in r.stderr
    assert "JLLAMA_DIST_TIMEOUT" in r.stderr
    assert "Traceback" not in r.stderr
    assert elapsed < 90


def test_distributed_argument_errors(tiny_f16, capsys):
    from jllama.cli.main import main
    from jllama.parallel.distributed import DistributedError, parse_coordinator, timeout_s

    assert parse_coordinator("10.0.0.1:1234") == ("10.0.0.1", 1234)
    assert parse_coordinator("[::1]:80") == ("::1", 80)
    for bad in ("localhost", "host:0", "host:99999", ":123", "host:port", None):
        with pytest.raises(DistributedError, match="HOST:PORT"):
            parse_coordinator(bad)
    os.environ["JLLAMA_DIST_TIMEOUT"] = "soon"
    try:
        with pytest.raises(DistributedError, match="JLLAMA_DIST_TIMEOUT"):
            timeout_s()
    finally:
        del os.environ["JLLAMA_DIST_TIMEOUT"]
    base = ["generate", "-m", str(tiny_f16), "-p", "x", "--num-processes", "2"]
    # validated before JAX starts: this process stays single-process
    assert main([*base, "--coordinator", "localhost", "--process-id", "0"]) == 1
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert main([*base, "--coordinator", "127.0.0.1:1234", "--process-id", "2"]) == 1
    assert "process_id" in capsys.readouterr().err
    assert main([*base, "--process-id", "1"]) == 1
    assert "coordinator" in capsys.readouterr().err
