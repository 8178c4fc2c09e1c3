"""Run llama.cpp 0c1e570's own server test suite against llama-server AND ``jllama serve``.

    PYTHONPATH=. /work/main/.venv/bin/python experiments/server_suite.py \
        [--files test_basic test_tokenize ...] [--servers llama-server jllama] \
        [--out experiments/results/server_suite.md] [--file-timeout 1800]

The suite (``tools/server/tests``, copied by ``../shared/tools/build-llamacpp.sh`` to
``~/.cache/llamacpp-0c1e570/server-tests``) starts whatever binary ``LLAMA_SERVER_BIN_PATH``
names with llama-server's flags, and asks for Hugging Face models (``--hf-repo/--hf-file``),
which cannot be downloaded here. For each server this script:

* copies the suite into a scratch folder, with three harness-only changes: the session fixture
  that pre-downloads every preset model does nothing, ``wget`` (imported for downloads) is a
  stub that refuses (the files the suite downloads, a LoRA adapter and a draft model, are put
  where its ``download_file`` looks first, see ``downloads``), and a server gets 240 s instead
  of 60 to start (jllama compiles first);
* writes a wrapper "binary" that swaps ``--hf-repo/--hf-file`` for ``--model LOCAL.gguf`` through
  ONE mapping shared by both servers (``MODEL_MAP``), drops ``--offline``, and execs either
  llama-server or ``python -m jllama serve`` with the rest of the flags unchanged;
* gives a server started with no model (test_router's ``ServerPreset.router()``, which
  llama-server fills from its Hugging Face cache) ``--models-preset`` naming the cache ids the
  suite asks for, each mapped to the same local GGUF as above (``ROUTER_MODELS``);
* runs pytest file by file with ``--junitxml`` and reads the per-test outcomes back.

The table in ``--out`` lists, per test, passed/failed/skipped for each server and the totals.
Requests for a model without a mapping make the wrapper exit 1 with a one-line reason (the
test then fails for both servers, visibly).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMACPP = Path(os.environ.get("LLAMACPP_BIN", Path.home() / ".cache" / "llamacpp-0c1e570"))
SUITE = LLAMACPP / "server-tests"
LLAMA_SERVER = LLAMACPP / "bin" / "llama-server"
LLAMACPP_SRC = Path("/tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp")

DEFAULT_FILES = ["test_basic", "test_tokenize", "test_slot_save", "test_ctx_shift",
                 "test_infill", "test_metrics", "test_security", "test_completion"]


def model_map(root: Path) -> dict:
    """HF repo[/file] the suite asks for -> local GGUF (the same for both servers), or
    {"model": GGUF, "mmproj": GGUF} for a vision preset. The tiny 'stories' llamas become
    SmolLM2-135M Q4_1 (tests that expect their exact text fail on both servers alike), but the
    infill one a tiny random llama with FIM tokens (tests/tinymodels.write_server_model);
    tinygemma3 (a tiny Gemma 3 + SigLIP trained on CIFAR-10) becomes a tiny RANDOM gemma3
    text model + gemma3 mmproj from tests/visionmodels.py: every request path works, but
    tests that expect the real model's words ("cat", "frog") fail on both servers."""
    from jllama.registry import fetch

    smol = str(fetch("smollm2-135m-instruct", quiet=True))
    out: dict = {
        "ggml-org/test-model-stories260K": smol,
        "ggml-org/stories15M_MOE/stories15M_MOE-F16.gguf": smol,
        "ggml-org/models/tinyllamas/stories260K.gguf": smol,
    }
    sys.path.insert(0, str(REPO / "tests"))
    import visionmodels

    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    text, mmproj = models / "tinygemma3-text.gguf", models / "tinygemma3-mmproj.gguf"
    visionmodels.write_text_model(text)
    visionmodels.write_mmproj(mmproj)
    out["ggml-org/tinygemma3-GGUF:Q8_0"] = {"model": str(text), "mmproj": str(mmproj)}
    # SmolLM2 has no FIM prefix/suffix/middle tokens (both servers answer /infill with 501), so
    # the infill preset gets a tiny random llama whose vocab has Qwen's FIM tokens: the
    # request paths run, the stories model's exact words do not come out of either server
    import tinymodels

    fim = models / "tiny-fim.gguf"
    tinymodels.write_server_model(fim)
    out["ggml-org/test-model-stories260K-infill"] = str(fim)
    # bge-small / jina-reranker-v1-tiny: tiny RANDOM bert encoders as tests/test_arch_bert.py
    # writes them (CLS pooling / the rank head), trained context 512 as the presets' n_ctx;
    # tests that expect a real model's ranking or token counts fail on both servers
    import test_arch_bert

    bge, rerank = models / "bert-bge-small.gguf", models / "jina-reranker-tiny.gguf"
    test_arch_bert._write(bge, 2, n_ctx=512)
    test_arch_bert._write(rerank, 4, n_ctx=512)
    out["ggml-org/models/bert-bge-small/ggml-model-f16.gguf"] = str(bge)
    out["ggml-org/models/jina-reranker-v1-tiny-en/ggml-model-f16.gguf"] = str(rerank)
    return out


# test_router starts a server with no model, so that it lists the models of its Hugging Face
# cache (ids "repo:TAG"). Both servers get instead one --models-preset naming the same ids,
# each a [section] with `model = LOCAL.gguf` from MODEL_MAP (the tinygemma3 text model alone:
# the router tests only chat and tokenize)
ROUTER_MODELS = {"ggml-org/tinygemma3-GGUF:Q8_0": "ggml-org/tinygemma3-GGUF:Q8_0",
                 "ggml-org/test-model-stories260K:F32": "ggml-org/test-model-stories260K",
                 "ggml-org/test-model-stories260K-infill:F32":
                     "ggml-org/test-model-stories260K-infill"}


def router_preset(root: Path, mapping: dict) -> Path:
    path = root / "router-models.ini"
    lines = ["version = 1", ""]
    for rid, key in ROUTER_MODELS.items():
        m = mapping[key]
        lines += [f"[{rid}]", f"model = {m['model'] if isinstance(m, dict) else m}", ""]
    path.write_text("\n".join(lines))
    return path


def downloads(root: Path, smol: str) -> dict[str, Path]:
    """The files the suite fetches with download_file (it skips a file already in ./tmp):
    test_lora's adapter -> a random LoRA (rank 8 on every attn_q/attn_v) for SmolLM2 written
    by tests/tinymodels.write_lora; test_speculative's draft model -> SmolLM2 itself (same
    vocabulary as the mapped main model)."""
    import tinymodels

    from jllama.gguf.reader import read_gguf

    lora = root / "models" / "smollm2-lora.gguf"
    if not lora.exists():
        base = read_gguf(smol).tensors
        targets = [n for n in base if n.endswith((".attn_q.weight", ".attn_v.weight"))]
        tinymodels.write_lora(lora, "llama", base, targets)
    return {"moe_shakespeare15M.gguf": lora, "stories15M-q4_0.gguf": Path(smol)}


# the suite's remote images (test_vision_api.py, test_slot_save.py) and its two "bad URL"
# cases, served from a loopback http server the harness starts: nothing leaves the machine
HF_TEST_IMAGES = "https://huggingface.co/ggml-org/tinygemma3-GGUF/resolve/main/test/"
URL_REWRITES = {HF_TEST_IMAGES: "{base}/test/", "https://google.com/404": "{base}/404",
                '"https://ggml.ai"': '"{base}/ggml.html"'}


def media_server(root: Path, port: int):
    """Serve root/media (the suite's two CIFAR-10 test images as locally drawn 32x32 PNGs,
    and an HTML page) on 127.0.0.1:port from a daemon thread."""
    import functools
    import http.server
    import threading

    import numpy as np
    from PIL import Image

    d = root / "media" / "test"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("11_truck.png", "91_cat.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / name)
    (root / "media" / "ggml.html").write_text("<html><body>not an image</body></html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", port), functools.partial(Quiet, directory=str(root / "media")))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}"


WRAPPER = r'''#!{python}
# generated by experiments/server_suite.py: llama-server's flags in, local models out
import os, sys
MAP = {mapping}
TARGET = {target}
REMOTE = {remote}
ROUTER = {router}
args, repo, file, i = [], None, None, 1
argv = sys.argv
while i < len(argv):
    a = argv[i]
    if a in ("-hf", "-hfr", "--hf-repo"):
        repo = argv[i + 1]; i += 2; continue
    if a in ("-hff", "--hf-file"):
        file = argv[i + 1]; i += 2; continue
    if a == "--offline":
        i += 1; continue
    args.append(a); i += 1
if repo is not None:
    key = repo if file is None else repo + "/" + file
    if key not in MAP:
        print(f"server_suite wrapper: no local model mapped for {{key!r}}", file=sys.stderr)
        sys.exit(1)
    m = MAP[key]
    if isinstance(m, dict):  # a vision preset: its projector too, unless the test says not
        pre = ["--model", m["model"]]
        if "--no-mmproj" not in args:
            pre += ["--mmproj", m["mmproj"]] + REMOTE
        args = pre + args
    else:
        args = ["--model", m] + args
elif not any(a in ("-m", "--model", "--models-dir", "--models-preset") for a in args):
    args = ["--models-preset", ROUTER] + args  # router mode: the suite's cache ids, mapped
os.execv(TARGET[0], TARGET + args)
'''


def make_workdir(root: Path, server: str, mapping: dict, media: str,
                 router: Path, files: dict[str, Path]) -> tuple[Path, Path]:
    # the suite sits at tools/server/tests as in llama.cpp's tree: test_security's
    # --media-path ../../../tools then finds tools/mtmd/test-1.jpeg (llama.cpp's own file)
    top = root / server
    if top.exists():
        shutil.rmtree(top)
    work = top / "tools" / "server" / "tests"
    shutil.copytree(SUITE, work)
    (top / "tools" / "mtmd").mkdir(parents=True)
    shutil.copy(LLAMACPP_SRC / "tools" / "mtmd" / "test-1.jpeg", top / "tools" / "mtmd")
    # --chat-template-file ../../../models/templates/X.jinja (test_template, test_tool_call)
    shutil.copytree(LLAMACPP_SRC / "models" / "templates", top / "models" / "templates")
    for f in (work / "unit").glob("test_*.py"):
        text = f.read_text()
        if HF_TEST_IMAGES in text:
            for a, b in URL_REWRITES.items():
                text = text.replace(a, b.format(base=media))
            f.write_text(text)
    conf = work / "conftest.py"
    text = conf.read_text()
    assert "ServerPreset.load_all()" in text, "the suite's conftest changed: update the harness"
    conf.write_text(text.replace("ServerPreset.load_all()", "pass  # server_suite: no downloads"))
    # jllama compiles its programs while starting (~25-60 s on this shared 2-core machine):
    # both servers get 240 s to answer /health instead of the suite's 60
    utils = work / "utils.py"
    text = utils.read_text()
    assert "DEFAULT_HTTP_TIMEOUT = 60" in text, "the suite's utils changed: update the harness"
    utils.write_text(text.replace("DEFAULT_HTTP_TIMEOUT = 60", "DEFAULT_HTTP_TIMEOUT = 240"))
    # the suite's TMP_DIR (LLAMA_CACHE below), which its download fixture would have created:
    # test_router writes its preset INIs there, test_slot_save's presets save slots to
    # "./tmp" (without it both servers refuse --slot-save-path)
    (work / "tmp").mkdir(exist_ok=True)
    for name, src in files.items():
        (work / "tmp" / name).symlink_to(src)
    (work / "wget.py").write_text("def download(*a, **k):\n"
                                  "    raise RuntimeError('server_suite: no downloads here')\n")
    if server == "llama-server":
        target, remote = [str(LLAMA_SERVER)], []  # llama-server always fetches http(s) images
    else:
        # jllama fetches http(s) image URLs only when told to (they point at the harness's
        # loopback server here)
        target, remote = [sys.executable, "-m", "jllama", "serve"], ["--allow-remote-media"]
    wrapper = work / f"bin-{server}"
    wrapper.write_text(WRAPPER.format(python=sys.executable, mapping=json.dumps(mapping),
                                      target=json.dumps(target), remote=json.dumps(remote),
                                      router=json.dumps(str(router))))
    wrapper.chmod(0o755)
    return work, wrapper


def run_file(work: Path, wrapper: Path, name: str, port: int, timeout: float,
             log, select: str | None = None) -> Path:
    xml = work / f"junit-{name}.xml"
    env = {**os.environ, "LLAMA_SERVER_BIN_PATH": str(wrapper), "PORT": str(port),
           "PYTHONPATH": str(REPO), "LLAMA_CACHE": str(work / "tmp")}
    # -v: one PASSED/FAILED line per test in the log, read back when a timeout leaves no xml
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o",
           "junit_family=xunit2", f"--junitxml={xml}", f"unit/{name}.py"]
    if select:
        cmd += ["-k", select]
    t0 = time.monotonic()
    # its own process group: on a timeout the server the test had started goes too (left
    # running, it would answer the next file's tests on the same port)
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"  {name}: timed out after {timeout:.0f} s", file=sys.stderr)
    print(f"  {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return xml


def log_outcomes(log: Path) -> dict[str, tuple[str, str]]:
    """What ``outcomes`` reads from the junit xml, from pytest -v's log instead (a file that
    timed out has no xml): the tests that finished before the timeout, without reasons."""
    import re

    out = {}
    pat = re.compile(r"^unit/(test_\w+)\.py::(.+?) (PASSED|FAILED|ERROR|SKIPPED)( |$)")
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        m = pat.match(line)
        if m:
            out[f"{m[1]}::{m[2]}"] = (m[3].lower(), "")
    return out


def outcomes(xml: Path) -> dict[str, tuple[str, str]]:
    """test id -> (passed|failed|error|skipped, one-line reason)."""
    if not xml.exists():
        return log_outcomes(xml.parent / xml.name.replace("junit-", "log-").replace(".xml",
                                                                                  ".txt"))
    out = {}
    for tc in ET.parse(xml).getroot().iter("testcase"):
        tid = f"{tc.get('classname', '').split('.')[-1]}::{tc.get('name')}"
        state, why = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                state = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                why = (child.get("message") or "").splitlines()[0][:110] if child.get(
                    "message") else ""
                break
        out[tid] = (state, why)
    return out


def write_table(path: Path, files: list[str], results: dict[str, dict[str, tuple[str, str]]],
                servers: list[str], secs: dict[str, float], cmd: str) -> None:
    ids = []
    for r in results.values():
        for t in r:
            if t not in ids:
                ids.append(t)
    ids.sort(key=lambda t: (files.index(t.split("::")[0]) if t.split("::")[0] in files else 99,
                            t))
    tot = {s: {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "missing": 0}
           for s in servers}
    rows = []
    for t in ids:
        cells = []
        for s in servers:
            st, why = results[s].get(t, ("missing", ""))
            tot[s][st] += 1
            cells.append(st)
        why = next((results[s][t][1] for s in reversed(servers)
                    if results[s].get(t, ("", ""))[0] in ("failed", "error")), "")
        rows.append(f"| `{t.replace('|', chr(92) + '|')}` | " + " | ".join(cells) + f" | {why.replace('|', '/')} |")
    both = sum(1 for t in ids if all(results[s].get(t, ("",))[0] == "passed" for s in servers))
    gap = [t for t in ids if results[servers[0]].get(t, ("",))[0] == "passed"
           and any(results[s].get(t, ("",))[0] != "passed" for s in servers[1:])]
    lines = [
        "# llama.cpp's server test suite: llama-server vs jllama serve",
        "",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Machine: "
        f"{platform.machine()} 2-vCPU AMD EPYC Zen 3 (AVX2+FMA+F16C, no AVX-512), shared with "
        "other sessions. llama.cpp 0c1e570's `tools/server/tests/unit`, one run, both servers, "
        "file by file (each test starts its own server).",
        "",
        f"Command: `{cmd}`",
        "",
        "Model mapping (both servers): every 'stories' llama the suite asks for -> "
        "SmolLM2-135M-Instruct Q4_1 (registry `smollm2-135m-instruct`); tests that compare "
        "against the stories models' exact text fail on both servers for that reason alone. "
        "The infill preset (stories260K-infill) -> a tiny random llama with Qwen's FIM tokens "
        "(tests/tinymodels.write_server_model; SmolLM2 has none). "
        "tinygemma3 -> a tiny random gemma3 text model + gemma3 mmproj (tests/visionmodels.py): "
        "tests that expect the real model's words ('cat', 'frog') fail on both servers. The "
        "suite's Hugging Face image URLs (and its two bad URLs) point at a loopback http server "
        "the harness runs; jllama gets --allow-remote-media (llama-server fetches unasked). "
        "A server started without a model (test_router) gets --models-preset naming the "
        "suite's cache ids with these local files (ROUTER_MODELS). "
        "bge-small and jina-reranker-v1-tiny -> tiny random bert encoders (CLS pooling / rank "
        "head, tests/test_arch_bert.py): tests that expect the real models' token counts or "
        "ranking fail on both servers. test_lora's adapter -> a random LoRA for SmolLM2 "
        "(tests/tinymodels.write_lora), test_speculative's draft model -> SmolLM2 itself.",
        "",
        "| server | passed | failed | error | skipped | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for s in servers:
        c = tot[s]
        lines.append(f"| {s} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} "
                     f"| {secs.get(s, 0):.0f} |")
    lines += ["", f"Passed by both: {both}. Passed by {servers[0]} but not by "
              f"{', '.join(servers[1:])}: {len(gap)}.", "",
              "| test | " + " | ".join(servers) + " | first failure message (last server "
              "that failed) |", "|---|" + "---|" * len(servers) + "---|"] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="+", default=DEFAULT_FILES,
                    help="suite files under unit/ (without .py)")
    ap.add_argument("--servers", nargs="+", default=["llama-server", "jllama"],
                    choices=["llama-server", "jllama"])
    ap.add_argument("--work", default="/tmp/jllama-server-suite")
    ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "server_suite.md"))
    ap.add_argument("--port", type=int, default=18480,
                    help="first port (the machine is shared: keep clear of 8080); servers "
                    "take PORT, PORT+10, the loopback media server PORT+100: runs side by "
                    "side need ports 200 apart")
    ap.add_argument("--file-timeout", type=float, default=1800.0)
    ap.add_argument("-k", dest="select", default=None,
                    help="pytest -k expression: rerun only these tests (checking a fix)")
    a = ap.parse_args()
    for need in (SUITE, LLAMA_SERVER):
        if not need.exists():
            print(f"server_suite: {need} not found (../shared/tools/build-llamacpp.sh builds "
                  "it)", file=sys.stderr)
            return 1
    root = Path(a.work)
    root.mkdir(parents=True, exist_ok=True)
    mapping = model_map(root)
    media = media_server(root, a.port + 100)
    results: dict[str, dict[str, tuple[str, str]]] = {s: {} for s in a.servers}
    secs: dict[str, float] = {s: 0.0 for s in a.servers}
    router = router_preset(root, mapping)
    files = downloads(root, mapping["ggml-org/test-model-stories260K"])
    dirs = {s: make_workdir(root, s, mapping, media, router, files) for s in a.servers}
    # file by file, servers interleaved: the shared machine's load hits both alike
    for name in a.files:
        for k, s in enumerate(a.servers):
            work, wrapper = dirs[s]
            print(f"{s}: {name}", file=sys.stderr)
            t0 = time.monotonic()
            with open(work / f"log-{name}.txt", "w") as log:
                xml = run_file(work, wrapper, name, a.port + 10 * k, a.file_timeout, log,
                               a.select)
            secs[s] += time.monotonic() - t0
            results[s].update(outcomes(xml))
        write_table(Path(a.out), a.files, results, a.servers, secs,
                    "PYTHONPATH=. python experiments/server_suite.py " + " ".join(sys.argv[1:]))
    for s in a.servers:
        c = [st for st, _ in results[s].values()]
        print(f"{s}: {c.count('passed')} passed, {c.count('failed') + c.count('error')} failed, "
              f"{c.count('skipped')} skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
