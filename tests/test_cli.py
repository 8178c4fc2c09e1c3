"""The command line's contract with a new user.

* every failure is one line on stderr and exit code 1 (Ctrl-C: 130), no traceback, whatever
  raised it: a user mistake, the OS (a directory where a file was expected, no permission), a
  GGUF with impossible sizes, JAX unable to start the asked platform, or a bug (whose traceback
  JLLAMA_DEBUG=1 shows);
* every config key does what it says: ``perplexity:`` runs ``jllama perplexity --config`` and
  ``jllama run``; ``runtime.threads`` sizes XLA's CPU pool and the kernels' threads;
* a platform the config (or ``--platform``) names beats an inherited JAX_PLATFORMS;
* a generation that fills the context ends with finish reason "length" (Python API, CLI, server);
* ``jllama bench`` names the model by its counted parameters, not by general.size_label.

The model is a tiny random llama (tests/tinymodels.py) whose end-of-generation rows are zero, so
greedy decoding never picks them and a long enough generation always reaches the context's end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jllama.cli.main import main

REPO = Path(__file__).resolve().parents[1]
SHP = dict(n_layer=1, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, head_dim=16)
N_VOCAB = 320
TEXT = ("the quick brown fox jumps over the lazy dog. the cat sat on the mat and the dog sat on "
        "the log. in the beginning there was the word, and the word was with the model. ") * 6


def _write_tiny(path: Path, **hparams) -> Path:
    import gguf
    from tinymodels import dense_hparams, dense_tensors, gpt2_tokenizer, write_gguf

    t = dense_tensors(11, n_vocab=N_VOCAB, **SHP)
    n_normal = len(gpt2_tokenizer()[0]) - 3  # the three specials, then padding: all control
    t["token_embd.weight"][n_normal:] = 0.0  # tied output: their logits are 0, never the max
    hp = dense_hparams(**SHP)
    hp.update(hparams)
    return write_gguf(path, "llama", hp, t, qtype=gguf.GGMLQuantizationType.F16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    # a misleading size label: bench must not print it
    return _write_tiny(tmp_path_factory.mktemp("cli") / "tiny.gguf",
                       **{".general.size_label": "7B", ".general.file_type": 1})


def _cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``jllama ARGS`` in a fresh process (JAX reads its platform once per process)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for k in ("JAX_PLATFORMS", "JLLAMA_DEBUG", "NPROC", "JLLAMA_CPU_KERNEL_THREADS"):
        e.pop(k, None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "jllama.cli.main", *args], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    errors = [ln for ln in lines if ln.startswith(f"jllama {command}: error: ")]
    assert len(errors) == 1, err
    return errors[0]


# ---------------------------------------------------------------------------- 1. one-line errors
def test_directory_as_config_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path)]) == 1
    line = _one_error_line(capsys.readouterr().err, "run")
    assert str(tmp_path) in line and "directory" in line


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files whatever their mode")
def test_unreadable_model_is_one_line(tiny, tmp_path, capsys):
    p = tmp_path / "locked.gguf"
    p.write_bytes(tiny.read_bytes())
    p.chmod(0)
    assert main(["inspect", str(p)]) == 1
    line = _one_error_line(capsys.readouterr().err, "inspect")
    assert str(p) in line and "ermission" in line


def test_os_errors_are_one_line(monkeypatch, tmp_path, capsys):
    """An OSError from anywhere below a command (here: opening the GGUF) is its file and the
    system's reason, as `cat` would say it."""
    import errno

    import jllama.gguf.reader as reader

    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF")

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(reader, "read_gguf", denied)
    assert main(["inspect", str(p)]) == 1
    line = _one_error_line(capsys.readouterr().err, "inspect")
    assert line == f"jllama inspect: error: {p}: {os.strerror(errno.EACCES)}"


def test_zero_head_count_names_file_and_key(tiny, tmp_path, capsys):
    from jllama.errors import ModelError
    from jllama.gguf.reader import read_gguf
    from jllama.models.spec import spec_from_gguf

    bad = _write_tiny(tmp_path / "heads0.gguf", **{"attention.head_count": 0})
    with pytest.raises(ModelError, match=r"heads0\.gguf.*'llama\.attention\.head_count' = 0"):
        spec_from_gguf(read_gguf(bad))
    assert main(["generate", "-m", str(bad), "-p", "hi", "-n", "1"]) == 1
    line = _one_error_line(capsys.readouterr().err, "generate")
    assert str(bad) in line and "llama.attention.head_count" in line
    for key in ("block_count", "embedding_length", "attention.head_count_kv"):
        f = _write_tiny(tmp_path / f"{key}.gguf", **{key: 0})
        with pytest.raises(ModelError, match=rf"'llama\.{key}' = 0"):
            spec_from_gguf(read_gguf(f))


def test_unknown_platform_is_one_line(tiny):
    """JAX cannot start the platform asked for (by --platform, or by JAX_PLATFORMS when the
    command does not name one): one line naming it, before the model loads."""
    r = _cli("generate", "-m", str(tiny), "-p", "hi", "-n", "1", "--platform", "nosuchchip")
    assert r.returncode == 1
    assert "'nosuchchip'" in _one_error_line(r.stderr, "generate")
    r = _cli("bench", "-m", str(tiny), "-p", "8", "-n", "0", "-r", "1",
             env={"JAX_PLATFORMS": "nosuchchip"})
    assert r.returncode == 1
    assert "'nosuchchip'" in _one_error_line(r.stderr, "bench")


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="this machine has an NVIDIA GPU")
def test_cuda_without_a_gpu_is_one_line(tiny):
    # JAX skips CUDA when no GPU is visible and then fails a bare assert: no message of its own
    r = _cli("generate", "-m", str(tiny), "-p", "hi", "-n", "1", "--platform", "cuda")
    assert r.returncode == 1
    assert "'cuda'" in _one_error_line(r.stderr, "generate")


def test_bug_is_one_line_unless_debug(monkeypatch, capsys):
    import jllama.cli.inspect as cmd

    def bug(args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(cmd, "run", bug)
    assert main(["inspect", "x.gguf"]) == 1
    line = _one_error_line(capsys.readouterr().err, "inspect")
    assert "TypeError: unsupported operand" in line and "JLLAMA_DEBUG=1" in line
    monkeypatch.setenv("JLLAMA_DEBUG", "1")
    with pytest.raises(TypeError):
        main(["inspect", "x.gguf"])


def test_ctrl_c_exits_130_quietly(monkeypatch, capsys):
    import jllama.cli.inspect as cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cmd, "run", interrupted)
    assert main(["inspect", "x.gguf"]) == 130
    assert capsys.readouterr().err.strip() == ""


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate"])  # -p is required
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "-p/--prompt" in err


# ---------------------------------------------------------------------------- 2. config keys
def _ppl_line(out: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.startswith("Final estimate")]
    return line


def test_perplexity_section_runs_the_job(tiny, tmp_path, capsys):
    """perplexity.{file, ctx, chunks, batch} from a config (file relative to the config) give
    what the same flags give, through `jllama perplexity --config` and `jllama run`."""
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    cfg = tmp_path / "ppl.yaml"
    cfg.write_text(f"model: {tiny}\nruntime: {{platform: cpu}}\n"
                   "perplexity: {file: text.txt, ctx: 32, chunks: 2, batch: 1}\n")
    assert main(["perplexity", "-m", str(tiny), "-f", str(tmp_path / "text.txt"), "-c", "32",
                 "--chunks", "2", "-b", "1"]) == 0
    ref = capsys.readouterr().out
    assert "[1]" in ref and "[2]" in ref and "[3]" not in ref  # two chunks were scored
    assert main(["perplexity", "--config", str(cfg)]) == 0
    assert _ppl_line(capsys.readouterr().out) == _ppl_line(ref)
    assert main(["run", str(cfg)]) == 0
    assert _ppl_line(capsys.readouterr().out) == _ppl_line(ref)
    # a flag wins over the config; a job is a generation or a perplexity run, not both
    assert main(["perplexity", "--config", str(cfg), "--chunks", "1"]) == 0
    assert "[2]" not in capsys.readouterr().out
    assert main(["run", str(cfg), "generation.prompt=hi"]) == 1
    assert "not both" in _one_error_line(capsys.readouterr().err, "run")
    assert main(["perplexity", "-m", str(tiny)]) == 1
    assert "-f FILE" in _one_error_line(capsys.readouterr().err, "perplexity")


def test_threads_reach_setup_platform(monkeypatch, tiny, tmp_path, capsys):
    """runtime.threads (and -t) reach the place that sizes the thread pools, for every command
    that reads a run config."""
    import jllama.cli.common as common
    from jllama.errors import JllamaError

    seen = []

    def record(platform, threads=None, where=""):
        seen.append((platform, threads))
        raise JllamaError("stop here")

    monkeypatch.setattr(common, "setup_platform", record)
    (tmp_path / "t.txt").write_text(TEXT)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny}\nruntime: {{platform: cpu, threads: 3}}\n"
                   "generation: {prompt: hi}\n")
    ppl = tmp_path / "ppl.yaml"
    ppl.write_text(f"model: {tiny}\nruntime: {{threads: 2}}\nperplexity: {{file: t.txt}}\n")
    for argv in (["run", str(cfg)], ["generate", "-m", str(tiny), "-p", "x", "-t", "5"],
                 ["serve", str(cfg)], ["perplexity", "--config", str(ppl)],
                 ["run", str(ppl)], ["perplexity", "-f", str(tmp_path / "t.txt"), "-t", "4"]):
        assert main(argv) == 1
    assert "stop here" in capsys.readouterr().err
    assert seen == [("cpu", 3), (None, 5), ("cpu", 3), (None, 2), (None, 2), (None, 4)]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_threads_size_xla_cpu_pool():
    """setup_platform(threads=N) before JAX starts: XLA's intra-op pool has N threads (named
    tf_XLAEigen) and the C++ kernels are told N."""
    code = (
        "import os, sys\n"
        "from jllama.cli.common import setup_platform\n"
        "setup_platform('cpu', int(sys.argv[1]))\n"
        "import jax.numpy as jnp\n"
        "jnp.ones((256, 256)).sum().block_until_ready()\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip()\n"
        "         for t in os.listdir('/proc/self/task')]\n"
        "print(names.count('tf_XLAEigen'), os.environ['JLLAMA_CPU_KERNEL_THREADS'])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NPROC", None)
    for n in (1, 3):
        r = subprocess.run([sys.executable, "-c", code, str(n)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split() == [str(n), str(n)]


# ---------------------------------------------------------------------------- 3. config vs env
def test_config_platform_beats_jax_platforms(tiny, tmp_path):
    cfg = tmp_path / "cpu.yaml"
    cfg.write_text(f"model: {tiny}\nruntime: {{platform: cpu, ctx_size: 32}}\n"
                   "generation: {prompt: hi, max_tokens: 2, sampling: {temperature: 0}}\n")
    r = _cli("run", str(cfg), env={"JAX_PLATFORMS": "nosuchchip"})
    assert r.returncode == 0, r.stderr[-3000:]
    notes = [ln for ln in r.stderr.splitlines() if "JAX_PLATFORMS" in ln]
    assert len(notes) == 1 and "'cpu'" in notes[0] and "nosuchchip" in notes[0]
    assert str(cfg) in notes[0] and "on cpu" in r.stderr


# ---------------------------------------------------------------------------- 4. finish reason
def _no_eog(llm) -> dict[int, float]:
    return {i: -100.0 for i in range(llm.tokenizer.n_vocab) if llm.tokenizer.is_eog(i)}


@pytest.fixture(scope="module")
def tiny_llm(tiny):
    from jllama.api import Llama

    return Llama(tiny, ctx_size=32, n_slots=1, compile_cache=False)


def test_full_context_finishes_with_length(tiny_llm):
    from jllama.engine.sampling import SamplingParams

    llm = tiny_llm
    params = SamplingParams(temperature=0.0, logit_bias=_no_eog(llm))
    ids = llm.tokenize("the cat sat")
    c = llm.complete(ids, 100, params)
    assert c.finish_reason == "length" and 0 < len(c.tokens) < 100
    assert len(ids) + len(c.tokens) > llm.engine.ctx_size  # it ran to the context's end
    c = llm.chat([{"role": "user", "content": "hi"}], max_tokens=100, params=params)
    assert c.finish_reason == "length" and len(c.tokens) < 100
    # the other two endings keep their reasons
    assert llm.complete(ids, 3, params).finish_reason == "length"
    eog = min(_no_eog(llm))
    forced = SamplingParams(temperature=0.0, logit_bias={eog: 100.0})
    c = llm.complete(ids, 100, forced)
    assert c.finish_reason == "stop" and c.tokens == []


def test_cli_full_context_prints_length(tiny, capsys):
    assert main(["generate", "-m", str(tiny), "-p", "the cat", "-c", "32", "-n", "100",
                 "--temp", "0", "--platform", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "finish: length" in err


def test_server_full_context_is_length(tiny_llm):
    httpx = pytest.importorskip("httpx")
    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    llm = Llama(tiny_llm.path, ctx_size=32, n_slots=2, compile_cache=False)
    bias = {str(k): v for k, v in _no_eog(llm).items()}
    state = ServerState(llm, ServerSettings("tiny", max_queue=4, timeout=120))
    with ServerThread(state, warmup=False) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        for stream in (False, True):
            for path, body in (("/v1/completions", {"prompt": "the cat sat"}),
                               ("/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "hi"}]})):
                for extra in ({}, {"max_tokens": 500}):
                    req = {**body, **extra, "temperature": 0, "logit_bias": bias,
                           "stream": stream}
                    r = c.post(path, json=req)
                    assert r.status_code == 200, r.text
                    if stream:
                        events = [json.loads(ln[6:]) for ln in r.text.splitlines()
                                  if ln.startswith("data: {")]
                        reasons = [ch["finish_reason"] for e in events for ch in e["choices"]
                                   if ch.get("finish_reason")]
                    else:
                        reasons = [ch["finish_reason"] for ch in r.json()["choices"]]
                    assert reasons == ["length"], (path, extra, stream, reasons)


# ---------------------------------------------------------------------------- 5. bench's label
def test_size_label_matches_gguf_py():
    from gguf.utility import model_weight_count_rounded_notation as ref

    from jllama.eval.bench import size_label

    rng = np.random.default_rng(0)
    counts = [999, 1000, 1001, 134_515_008, 268_098_176, 999_999, 6_738_415_616,
              1_000_000_001, 70_553_706_496, 1_234_567_890_123]
    counts += [int(x) for x in 10 ** rng.uniform(3, 13, 200)]
    for n in counts:
        assert size_label(n) == ref(n), n


def test_bench_names_model_by_counted_parameters(tiny):
    from gguf.utility import model_weight_count_rounded_notation

    from jllama.eval.bench import ftype_desc, model_type
    from jllama.gguf.reader import read_gguf

    g = read_gguf(tiny)
    n = sum(int(np.prod(t.shape)) for t in g.tensors.values())
    want = f"llama {model_weight_count_rounded_notation(n)} F16"
    assert g.metadata["general.size_label"] == "7B"
    assert model_type(g, "llama") == want
    r = _cli("bench", "-m", str(tiny), "-p", "8", "-n", "2", "-r", "1", "--platform", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| llama")]
    assert len(rows) == 2 and all(ln.startswith(f"| {want} | ") for ln in rows)
    assert f"| {n / 1e6:.2f} M |" in rows[0] and "7B" not in r.stdout
    # llama.cpp's names for file types, and its guess when general.file_type is missing
    g.metadata["general.file_type"] = 15
    assert ftype_desc(g) == "Q4_K - Medium"
    del g.metadata["general.file_type"]
    assert ftype_desc(g) == "F16 (guessed)"


@pytest.mark.parametrize("argv", [["generate", "-p", "hi"], ["chat"], ["serve"],
                                  ["perplexity", "-f", "x.txt"], ["bench"]])
def test_cache_type_flags_like_llama_cpp(argv):
    """-ctk / -ctv (llama-cli, llama-server, llama-perplexity, llama-bench) on every command
    that runs a model, each type llama.cpp's --cache-type-k accepts reaching the config."""
    from jllama.cli.common import KV_CACHE_TYPES, overrides_from_args
    from jllama.cli.main import build_parser
    from jllama.models.kvquant import KV_TYPES

    assert KV_CACHE_TYPES.split(", ") == list(KV_TYPES)
    args = build_parser().parse_args([*argv, "-ctk", "q5_1", "--cache-type-v", "iq4_nl"])
    assert (args.cache_type_k, args.cache_type_v) == ("q5_1", "iq4_nl")
    if argv[0] in ("generate", "chat", "perplexity"):
        ov = overrides_from_args(args)
        assert "runtime.cache_type_k=q5_1" in ov and "runtime.cache_type_v=iq4_nl" in ov


def test_unknown_cache_type_is_one_line(tiny):
    r = _cli("generate", "-m", str(tiny), "-p", "hi", "-n", "1", "-ctk", "q9_9")
    assert r.returncode == 1
    assert "unknown KV cache type 'q9_9'" in _one_error_line(r.stderr, "generate")
