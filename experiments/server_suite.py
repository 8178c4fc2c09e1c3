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
  stub that refuses, and a server gets 240 s instead of 60 to start (jllama compiles first);
* writes a wrapper "binary" that swaps ``--hf-repo/--hf-file`` for ``--model LOCAL.gguf`` through
  ONE mapping shared by both servers (``MODEL_MAP``), drops ``--offline``, and execs either
  llama-server or ``python -m jllama serve`` with the rest of the flags unchanged;
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
    SmolLM2-135M Q4_1 (tests that expect their exact text fail on both servers alike);
    tinygemma3 (a tiny Gemma 3 + SigLIP trained on CIFAR-10) becomes a tiny RANDOM gemma3
    text model + gemma3 mmproj from tests/visionmodels.py: every request path works, but
    tests that expect the real model's words ("cat", "frog") fail on both servers."""
    from jllama.registry import fetch

    smol = str(fetch("smollm2-135m-instruct", quiet=True))
    out: dict = {
        "ggml-org/test-model-stories260K": smol,
        "ggml-org/test-model-stories260K-infill": smol,  # SmolLM2's vocab has FIM tokens
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
    return out


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
os.execv(TARGET[0], TARGET + args)
'''


def make_workdir(root: Path, server: str, mapping: dict, media: str) -> tuple[Path, Path]:
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
                                      target=json.dumps(target), remote=json.dumps(remote)))
    wrapper.chmod(0o755)
    return work, wrapper


def run_file(work: Path, wrapper: Path, name: str, port: int, timeout: float,
             log, select: str | None = None) -> Path:
    xml = work / f"junit-{name}.xml"
    env = {**os.environ, "LLAMA_SERVER_BIN_PATH": str(wrapper), "PORT": str(port),
           "PYTHONPATH": str(REPO), "LLAMA_CACHE": str(work / "tmp")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
           "junit_family=xunit2", f"--junitxml={xml}", f"unit/{name}.py"]
    if select:
        cmd += ["-k", select]
    t0 = time.monotonic()
    try:
        subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                       timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"  {name}: timed out after {timeout:.0f} s", file=sys.stderr)
    print(f"  {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return xml


def outcomes(xml: Path) -> dict[str, tuple[str, str]]:
    """test id -> (passed|failed|error|skipped, one-line reason)."""
    if not xml.exists():
        return {}
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
        rows.append(f"| `{t}` | " + " | ".join(cells) + f" | {why.replace('|', '/')} |")
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
        "tinygemma3 -> a tiny random gemma3 text model + gemma3 mmproj (tests/visionmodels.py): "
        "tests that expect the real model's words ('cat', 'frog') fail on both servers. The "
        "suite's Hugging Face image URLs (and its two bad URLs) point at a loopback http server "
        "the harness runs; jllama gets --allow-remote-media (llama-server fetches unasked).",
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
                    help="first port (the machine is shared: keep clear of 8080)")
    ap.add_argument("--file-timeout", type=float, default=1800.0)
    ap.add_argument("-k", dest="select", default=None,
                    help="pytest -k expression: only these tests of the files")
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
    dirs = {s: make_workdir(root, s, mapping, media) for s in a.servers}
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
