"""llama-server's built-in agent tools (``--tools``, ``--tools-runtime``; tools/server/
server-tools.cpp of llama.cpp 0c1e570): read_file, file_glob_search, grep_search,
exec_shell_command, write_file, edit_file and get_info, behind GET/POST /tools.

The tools run on the host, or inside an "isolate" (a docker/podman container or an ssh host)
that every file operation reaches through a POSIX shell command, as llama-server's. Results use
its two shapes: ``{"plain_text_response": text}`` or a JSON object (``{"error": ...}``,
``{"result": ...}``); a tool that fails before it runs (an unknown runtime, a missing required
argument) is a 500. Only what ``--tools`` names is served, and nothing at all without it.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

# limits, as llama-server's
GIT_LS_FILES_MAX_OUTPUT = 8 * 1024 * 1024
LIST_ENTRIES_TIMEOUT = 15  # s, one listing (git or the walker)
ISOLATE_EXEC_TIMEOUT = 15  # s, the helper commands run in an isolate
ISOLATE_READ_FILE_MAX = 64 * 1024 * 1024
READ_FILE_MAX = 16 * 1024
READ_FILE_MAX_BASE64 = 32 * 1024 * 1024
FILE_SEARCH_MAX_RESULTS = 100
GREP_MAX_RESULTS = 100
EXEC_MAX_OUTPUT = 16 * 1024
EXEC_MAX_TIMEOUT = 60
GET_INFO_MAX_OUTPUT = 4096
GET_INFO_TIMEOUT = 5

# directories a listing reports but never walks into: they can be enormous
JUNK_DIRS = (".git", ".svn", ".hg", "node_modules", "__pycache__", ".venv", "venv", "dist",
             "build", "target", ".cache", ".idea", ".vscode")

TOOL_NAMES = ("read_file", "file_glob_search", "grep_search", "exec_shell_command",
              "write_file", "edit_file", "get_info")


class ToolFailure(Exception):
    """The call could not run at all (llama-server's exception path: HTTP 500)."""


class BadArguments(ToolFailure):
    """Arguments of the wrong shape (llama-server's JSON exceptions: HTTP 400)."""


class ToolNotFound(Exception):
    """Unknown tool, or stream asked of a tool that cannot stream (HTTP 404)."""


def _val(params: dict, key: str, default):
    """nlohmann's json_value: the default when the key is missing, null or of another type."""
    v = params.get(key)
    if v is None:
        return default
    if isinstance(default, bool):
        return v if isinstance(v, bool) else default
    if isinstance(default, int):
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default
    if isinstance(default, str):
        return v if isinstance(v, str) else default
    return v


def _req(params: dict, key: str, kind=str):
    """A required argument (llama-server's params.at(key).get<T>(): a 500 when absent)."""
    if key not in params:
        raise BadArguments(f"[json.exception.out_of_range.403] key '{key}' not found")
    v = params[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise BadArguments(f"[json.exception.type_error.302] type must be {kind.__name__}, but "
                          f"is {type(v).__name__}")
    return v


# ---------------------------------------------------------------------------- globs
def _glob_regex(pattern: str) -> re.Pattern:
    """common.cpp's glob_match as a regex: '**' crosses '/', '*' and '?' do not, '[...]' is a
    class ('!' negates, a leading ']' or '-' is literal), an unclosed '[' is a literal."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "]-":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append(re.escape("["))
                i += 1
                continue
            body = pattern[i + 1:j]
            neg = body.startswith("!")
            if neg:
                body = body[1:]
            items, k = [], 0
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    items.append(f"{re.escape(body[k])}-{re.escape(body[k + 2])}")
                    k += 3
                else:
                    items.append(re.escape(body[k]))
                    k += 1
            out.append(f"[{'^' if neg else ''}{''.join(items)}]" if items else
                       ("(?s:.)" if neg else "(?!)"))
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out), re.S)


def glob_match(pattern: str, text: str) -> bool:
    return _glob_regex(pattern).fullmatch(text) is not None


def path_glob_match(pattern: str, rel: str) -> bool:
    """No '/' in the pattern: match the basename at any depth; else the whole relative path,
    anchored with '**/' unless it already is."""
    if "/" not in pattern:
        return glob_match(pattern, rel.rsplit("/", 1)[-1])
    if pattern == "**" or pattern.startswith(("**/", "/")):
        return glob_match(pattern, rel)
    return glob_match("**/" + pattern, rel)


# ---------------------------------------------------------------------------- processes
@dataclass
class ExecResult:
    output: str = ""
    exit_code: int = -1
    timed_out: bool = False


def run_subprocess(args: list[str], max_output: int, timeout_s: float, on_chunk=None,
                   combine_stderr: bool = True, cwd: str = "",
                   stdin_data: bytes | None = None, raw: bool = False):
    """Run ``args`` (PATH searched, environment inherited) with stdin closed after
    ``stdin_data``; keep at most ``max_output`` bytes (the rest is drained, else the child
    blocks) and kill it after ``timeout_s``. ``on_chunk`` gets the output as it arrives and
    returning False from it kills the child. ``raw``: the output stays bytes."""
    res = ExecResult()
    try:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT if combine_stderr else subprocess.DEVNULL,
                                cwd=cwd or None)
    except (OSError, ValueError):
        res.output = b"failed to spawn process" if raw else "failed to spawn process"
        return res
    done = threading.Event()
    timed_out = threading.Event()

    def watchdog():
        if not done.wait(timeout_s):
            timed_out.set()
            _kill(proc)
    threading.Thread(target=watchdog, daemon=True).start()
    try:
        if stdin_data:
            proc.stdin.write(stdin_data)
        proc.stdin.close()
    except OSError:  # a short write is not an error by itself: the exit code decides
        pass
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    out, truncated = bytearray(), False
    fd = proc.stdout.fileno()
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        except OSError:
            break
        if not chunk:
            break
        if truncated:
            continue
        room = max_output - len(out)
        if len(chunk) > room:
            chunk, truncated = chunk[:room], True
        out += chunk
        if on_chunk is not None and chunk:
            if not on_chunk(dec.decode(chunk)) and not truncated:
                _kill(proc)
                break
    done.set()
    proc.stdout.close()
    code = proc.wait()
    # subprocess.h reports a child ended by a signal as EXIT_FAILURE
    res.exit_code = code if code >= 0 else 1
    res.timed_out = timed_out.is_set()
    if raw:
        res.output = bytes(out) + (b"\n[output truncated]" if truncated else b"")
    else:
        res.output = out.decode("utf-8", "replace") + ("\n[output truncated]" if truncated else "")
    return res


def _kill(proc: subprocess.Popen) -> None:
    try:
        proc.send_signal(signal.SIGKILL)
    except OSError:
        pass


# ---------------------------------------------------------------------------- tool I/O
class HostIO:
    """Files and commands on this machine; relative paths resolve against ``cwd`` (the
    x-tool-cwd header) or the server's working directory."""

    def __init__(self, cwd: str = ""):
        self.cwd = cwd

    def resolve(self, path: str) -> str:
        p = path
        if p.startswith("~") and (len(p) == 1 or p[1] in "/\\"):
            home = os.environ.get("HOME", "")
            if home:
                p = home + p[1:]
        if not os.path.isabs(p):
            base = self.cwd or os.getcwd()
            p = os.path.join(base, p)
        # '.' and '..' never reach git or the client
        return os.path.normpath(p)

    def is_directory(self, path: str) -> bool:
        return os.path.isdir(self.resolve(path))

    def is_regular_file(self, path: str) -> bool:
        return os.path.isfile(self.resolve(path))

    def file_size(self, path: str) -> int | None:
        try:
            return os.stat(self.resolve(path)).st_size
        except OSError:
            return None

    def read_file(self, path: str) -> bytes | None:
        try:
            with open(self.resolve(path), "rb") as f:
                return f.read()
        except OSError:
            return None

    def write_file(self, path: str, content: bytes) -> bool:
        full = self.resolve(path)
        try:
            os.makedirs(os.path.dirname(full) or ".", exist_ok=True)
            with open(full, "wb") as f:
                f.write(content)
            return True
        except OSError:
            return False

    def list_entries(self, base: str, max_depth: int, kind: str):
        """(entries [(rel, is_dir)], error, truncated) under the absolute ``base``:
        git's view of the files when it is a work tree, else a walk that skips links and
        junk directories. max_depth 0: unlimited, 1: direct children only."""
        if not os.path.isdir(base):
            return [], "path does not exist or is not a directory", False
        deadline = time.monotonic() + LIST_ENTRIES_TIMEOUT
        if kind == "file":  # git ls-files cannot list directories
            r = self.run(["git", "-C", base, "ls-files", "--cached", "--others",
                          "--exclude-standard"], GIT_LS_FILES_MAX_OUTPUT, LIST_ENTRIES_TIMEOUT)
            if r.exit_code == 0 and not r.timed_out:
                out = []
                for line in r.output.splitlines():
                    line = line.rstrip("\r").replace("\\", "/")
                    if not line or (max_depth > 0 and line.count("/") + 1 > max_depth):
                        continue
                    if os.path.isfile(os.path.join(base, line)):
                        out.append((line, False))
                return out, "", False
        entries, truncated = [], False
        stack = [(base, "", 0)]
        while stack:
            if time.monotonic() >= deadline:
                return entries, "", True
            d, rel, depth = stack.pop()
            try:
                it = list(os.scandir(d))
            except PermissionError:
                continue
            except OSError:
                truncated = True
                continue
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                try:
                    is_dir = e.is_dir()
                except OSError:
                    continue
                if is_dir:
                    if kind in ("dir", "all"):
                        entries.append((r, True))
                    if e.name in JUNK_DIRS:
                        continue
                    if not e.is_symlink() and (max_depth == 0 or depth + 1 < max_depth):
                        stack.append((e.path, r, depth + 1))
                elif kind in ("file", "all"):
                    try:
                        if e.is_file():
                            entries.append((r, False))
                    except OSError:
                        pass
        return entries, "", truncated

    def run(self, args, max_output, timeout_s, on_chunk=None) -> ExecResult:
        return run_subprocess(args, max_output, timeout_s, on_chunk, True, self.cwd)


class IsolateIO(HostIO):
    """Every operation as a POSIX command inside an isolate (sh, cat, wc, mkdir, dirname,
    find, timeout); subclasses say how a command reaches it (``argv``)."""

    def argv(self, inner: list[str], needs_stdin: bool) -> list[str]:
        raise NotImplementedError

    def resolve(self, path: str) -> str:
        if not self.cwd or path.startswith("/"):
            return path
        return f"{self.cwd}/{path}"

    def _exec(self, inner, max_output, combine_stderr=True, raw=False) -> ExecResult:
        return run_subprocess(self.argv(inner, False), max_output, ISOLATE_EXEC_TIMEOUT,
                              None, combine_stderr, raw=raw)

    def _test(self, flag: str, path: str) -> bool:
        r = self._exec(["sh", "-c", f'[ {flag} "$1" ]', "_", path], 4096)
        return r.exit_code == 0 and not r.timed_out

    def is_directory(self, path):
        return self._test("-d", self.resolve(path))

    def is_regular_file(self, path):
        return self._test("-f", self.resolve(path))

    def file_size(self, path):
        r = self._exec(["sh", "-c", 'wc -c < "$1"', "_", self.resolve(path)], 64)
        if r.exit_code != 0 or r.timed_out:
            return None
        m = re.match(r"\s*(\d+)", r.output)
        return int(m.group(1)) if m else None

    def read_file(self, path):
        # stderr is kept out of the raw bytes of the file
        r = self._exec(["cat", "--", self.resolve(path)], ISOLATE_READ_FILE_MAX, False, raw=True)
        return r.output if r.exit_code == 0 and not r.timed_out else None

    def write_file(self, path, content):
        # the content travels on stdin: nothing for the far side to re-parse
        r = run_subprocess(self.argv(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"',
                                      "_", self.resolve(path)], True),
                           4096, ISOLATE_EXEC_TIMEOUT, None, True, "", content)
        return r.exit_code == 0 and not r.timed_out

    def list_entries(self, base, max_depth, kind):
        base = self.resolve(base)
        if not self.is_directory(base):
            return [], "path does not exist or is not a directory", False
        if kind == "file":
            r = self._exec(["sh", "-c", 'cd "$1" && git ls-files --cached --others '
                            "--exclude-standard", "_", base], GIT_LS_FILES_MAX_OUTPUT)
            if r.exit_code == 0 and not r.timed_out:
                return [(x, False) for x in _lines(r.output, False)
                        if not (max_depth > 0 and x.count("/") + 1 > max_depth)], "", False
        out, truncated = [], False
        for dirs in ((True, False) if kind == "all" else ((kind == "dir"),)):
            prune = " -o ".join(f"-name {n}" for n in JUNK_DIRS)
            cmd = 'cd "$1" && find . -mindepth 1'
            if max_depth > 0:
                cmd += f" -maxdepth {max_depth}"
            cmd += f" \\( {prune} \\) -prune"
            cmd += " -print -o -type d -print" if dirs else " -o -type f -print"
            r = self._exec(["sh", "-c", cmd, "_", base], GIT_LS_FILES_MAX_OUTPUT)
            truncated = truncated or r.timed_out
            out += [(x, dirs) for x in _lines(r.output, True)]
        return out, "", truncated

    def run(self, args, max_output, timeout_s, on_chunk=None):
        # an in-isolate `timeout`: killing the host-side client does not kill what runs there
        inner = ["timeout", f"{int(timeout_s)}s", *args]
        if self.cwd:  # 127: what a shell reports for a command it could not run
            inner = ["sh", "-c", 'cd "$1" || exit 127; shift; exec "$@"', "_", self.cwd, *inner]
        return run_subprocess(self.argv(inner, True), max_output, timeout_s + 5, on_chunk, True)


def _lines(text: str, strip_dot_slash: bool) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.rstrip("\r")
        if not line:
            continue
        if strip_dot_slash and line.startswith("./"):
            line = line[2:]
        out.append(line.replace("\\", "/"))
    return out


class ContainerIO(IsolateIO):
    def __init__(self, engine: str, container_id: str, cwd: str = ""):
        super().__init__(cwd)
        self.engine, self.container_id = engine, container_id

    def argv(self, inner, needs_stdin):
        return [self.engine, "exec", *(["-i"] if needs_stdin else []), self.container_id, *inner]


class SshIO(IsolateIO):
    """Remoting, not isolation: the tools can do what the target account can."""

    def __init__(self, target: str, cwd: str = ""):
        super().__init__(cwd)
        self.target = target

    def argv(self, inner, needs_stdin):
        # no console to answer a prompt: key-based auth and a known host key only
        base = ["ssh", "-o", "BatchMode=yes", "-o", "PasswordAuthentication=no",
                "-o", "KbdInteractiveAuthentication=no", "-o", "StrictHostKeyChecking=yes"]
        # the remote shell re-parses the command line: one single-quoted word per argument
        quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in inner)
        return [*base, *([] if needs_stdin else ["-n"]), self.target, quoted]


def _valid_ssh_target(t: str) -> bool:
    # ssh reads options from its argv: '-oProxyCommand=...' would run on the host
    return bool(t) and t[0] != "-" and all(c.isalnum() or c in ".-_@" for c in t)


def _valid_container_id(c: str) -> bool:
    # the id lands on the `<engine> exec` line: '--privileged' would be an option
    return bool(c) and c[0].isalnum() and all(c2.isalnum() or c2 in ".-_" for c2 in c)


def parse_container_spec(spec: str):
    """'<engine>-container:<id>' (attach) or '<engine>:<image>' (spawn): (engine, arg,
    attach), or None."""
    for engine in ("docker", "podman"):
        if spec.startswith(f"{engine}-container:"):
            return engine, spec[len(engine) + 11:], True
        if spec.startswith(f"{engine}:"):
            return engine, spec[len(engine) + 1:], False
    return None


def make_io(params: dict) -> HostIO:
    """The I/O a call runs through: the host unless params['runtime'] names an isolate; never
    the host when an isolate was asked for and cannot be used."""
    cwd = _val(params, "cwd", "")
    runtime = _val(params, "runtime", "")
    if not runtime:
        return HostIO(cwd)
    c = parse_container_spec(runtime)
    if c is not None:
        engine, cid, attach = c
        if not attach:  # spawning belongs to --tools-runtime; a call only attaches
            raise ToolFailure(f"tool runtime must name a running container: {runtime}")
        if not _valid_container_id(cid):
            raise ToolFailure(f"invalid container id: {cid}")
        return ContainerIO(engine, cid, cwd)
    if runtime.startswith("ssh:"):
        target = runtime[4:]
        if not _valid_ssh_target(target):
            raise ToolFailure(f"invalid ssh target: {target}")
        return SshIO(target, cwd)
    raise ToolFailure(f"unknown tool runtime: {runtime}")


# ---------------------------------------------------------------------------- tools
def _fn(name: str, description: str, properties: dict, required: list[str] | None) -> dict:
    params = {"type": "object", "properties": properties}
    if required is not None:
        params["required"] = required
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": params}}


def _p(type_: str, description: str) -> dict:
    return {"type": type_, "description": description}


class Tool:
    name = ""
    display_name = ""
    write = False
    stream = False
    uses_cwd = True
    kind = "server"

    def definition(self) -> dict:
        raise NotImplementedError

    def invoke(self, params: dict, push=None) -> dict | None:
        raise NotImplementedError

    def to_json(self) -> dict:
        return {"display_name": self.display_name, "tool": self.name, "type": self.kind,
                "permissions": {"write": self.write}, "uses_cwd": self.uses_cwd,
                "definition": self.definition()}


def _getlines(data: bytes) -> list[bytes]:
    """std::getline's lines: a final newline does not open an empty last line."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


class ReadFile(Tool):
    name, display_name = "read_file", "Read file"

    def definition(self):
        return _fn(self.name, "Read the contents of a file. Optionally specify a 1-based line "
                   "range. If append_loc is true, each line is prefixed with its line number "
                   "(e.g. \"1\u2192...\").",
                   {"path": _p("string", "Path to the file"),
                    "start_line": _p("integer", "First line to read, 1-based (default: 1)"),
                    "end_line": _p("integer", "Last line to read, 1-based inclusive (default: "
                                   "end of file)"),
                    "append_loc": _p("boolean", "Prefix each line with its line number")},
                   ["path"])

    def invoke(self, params, push=None):
        import base64

        path = _req(params, "path")
        start = _val(params, "start_line", 1)
        end = _val(params, "end_line", -1)
        loc = _val(params, "append_loc", False)
        as_b64 = _val(params, "resp_type", "") == "base64"  # x-resp-type, not the model's
        io = make_io(params)
        size = io.file_size(path)
        if size is None:
            return {"error": f"cannot stat file: {path}"}
        if as_b64:
            if size > READ_FILE_MAX_BASE64:
                return {"error": f"file too large ({size} bytes, max {READ_FILE_MAX_BASE64})"}
            data = io.read_file(path)
            if data is None:
                return {"error": f"failed to open file: {path}"}
            return {"base64": base64.b64encode(data).decode("ascii"), "size_bytes": len(data)}
        if size > READ_FILE_MAX and end == -1:
            return {"error": f"file too large ({size} bytes, max {READ_FILE_MAX}). Use "
                    "start_line/end_line to read a portion."}
        data = io.read_file(path)
        if data is None:
            return {"error": f"failed to open file: {path}"}
        out = bytearray()
        for no, line in enumerate(_getlines(data), 1):
            if no < start:
                continue
            if end != -1 and no > end:
                break
            piece = (f"{no}\u2192".encode() if loc else b"") + line + b"\n"
            if len(out) + len(piece) > READ_FILE_MAX:
                out += b"[output truncated]"
                break
            out += piece
        return {"plain_text_response": out.decode("utf-8", "replace")}


class FileGlobSearch(Tool):
    name, display_name = "file_glob_search", "File search"

    def definition(self):
        return _fn(self.name,
                   "Recursively search for files matching a glob pattern under a directory. "
                   "Automatically skips files ignored by .gitignore (when the directory is "
                   "inside a git repo) and common junk directories (.git, node_modules, build, "
                   "dist, etc.) otherwise. A pattern with no '/' (e.g. \"*.cpp\") matches the "
                   "file's basename at any depth. A pattern containing '/' matches the full "
                   "relative path; unless already anchored with \"**/\" or a leading '/', it is "
                   "automatically prefixed with \"**/\". Use type=\"dir\" or \"all\" to also "
                   "list directories; directory entries are suffixed with '/' in the output. "
                   "Note: directory listings do not apply .gitignore filtering.",
                   {"path": _p("string", "Base directory to search in"),
                    "include": _p("string", "Glob pattern for files to include (e.g. \"*.cpp\" "
                                  "or \"src/**/*.cpp\"). Default: **"),
                    "exclude": _p("string", "Glob pattern for files to exclude"),
                    "type": _p("string", "Entry type to return: \"file\" (default), \"dir\" or "
                               "\"all\""),
                    "max_depth": _p("integer", "Maximum depth to descend into subdirectories "
                                    "(default: 0 = unlimited; 1 = direct children only)"),
                    "limit": _p("integer", "Maximum number of results to return, capped at "
                                f"{FILE_SEARCH_MAX_RESULTS} (default {FILE_SEARCH_MAX_RESULTS})")},
                   ["path"])

    def invoke(self, params, push=None):
        io = make_io(params)
        path = _req(params, "path")
        base = io.resolve(path)
        include = _val(params, "include", "**")
        exclude = _val(params, "exclude", "")
        kind = _val(params, "type", "file")
        max_depth = max(0, _val(params, "max_depth", 0))
        limit = _val(params, "limit", FILE_SEARCH_MAX_RESULTS)
        if limit < 1:
            return {"error": f"invalid limit: {limit} (expected 1 or more)"}
        limit = min(limit, FILE_SEARCH_MAX_RESULTS)
        if kind not in ("file", "dir", "all"):
            return {"error": f"invalid type: {kind} (expected \"file\", \"dir\" or \"all\")"}
        entries, err, truncated = io.list_entries(base, max_depth, kind)
        if err:
            return {"error": f"{err}: {path}"}
        matches = [(r, d) for r, d in entries if path_glob_match(include, r)
                   and not (exclude and path_glob_match(exclude, r))]
        shown = matches[:limit]
        text = "".join(f"{r}{'/' if d else ''}\n" for r, d in shown)
        text += f"\n---\nTotal matches: {len(matches)}\n"
        if len(matches) > len(shown):
            text += (f"[{len(shown)} results limit reached ({len(matches)} total matches). "
                     "Refine the glob pattern to narrow the search.]\n")
        if truncated:
            text += "[results truncated: time budget or unreadable directory]\n"
        # `base` is absolute so a client (the web UI's picker) can join the entries to it
        return {"plain_text_response": text,
                "entries": [{"path": r, "type": "dir" if d else "file"} for r, d in shown],
                "base": base}


class GrepSearch(Tool):
    name, display_name = "grep_search", "Grep search"

    def definition(self):
        return _fn(self.name,
                   "Search for a pattern in files under a path. Returns matching lines with file "
                   "paths (and, unless searching a single file, paths relative to the given "
                   "directory). Automatically skips files ignored by .gitignore (when the "
                   "directory is inside a git repo) and common junk directories (.git, "
                   "node_modules, build, dist, etc.) otherwise. include/exclude: a pattern with "
                   "no '/' matches the basename at any depth; a pattern containing '/' matches "
                   "the full relative path (auto-anchored with \"**/\" unless already anchored).",
                   {"path": _p("string", "File or directory to search in"),
                    "pattern": _p("string", "Pattern to search for (regular expression unless "
                                  "literal is true)"),
                    "include": _p("string", "Glob pattern to filter files (default: **)"),
                    "exclude": _p("string", "Glob pattern to exclude files"),
                    "return_line_numbers": _p("boolean", "If true, include line numbers in "
                                              "results"),
                    "literal": _p("boolean", "Treat pattern as a literal string instead of a "
                                  "regular expression (default: false)"),
                    "ignore_case": _p("boolean", "Case-insensitive search (default: false)"),
                    "context_lines": _p("integer", "Number of lines of context to show before "
                                        "and after each match (default: 0)")},
                   ["path", "pattern"])

    def invoke(self, params, push=None):
        path = _req(params, "path")
        pat = _req(params, "pattern")
        include = _val(params, "include", "**")
        exclude = _val(params, "exclude", "")
        show_no = _val(params, "return_line_numbers", False)
        ctx = max(0, _val(params, "context_lines", 0))
        if _val(params, "literal", False):
            pat = re.escape(pat)
        try:
            rx = re.compile(pat, re.I if _val(params, "ignore_case", False) else 0)
        except re.error as e:
            return {"error": f"invalid regex: {e}"}
        io = make_io(params)
        files = []
        abs_path = io.resolve(path)
        if io.is_regular_file(abs_path):
            files.append((abs_path, path))
        elif io.is_directory(abs_path):
            entries, err, _ = io.list_entries(abs_path, 0, "file")
            if err:
                return {"error": f"{err}: {path}"}
            files = [(os.path.join(abs_path, r), r) for r, _d in entries
                     if path_glob_match(include, r) and not (exclude and
                                                            path_glob_match(exclude, r))]
        else:
            return {"error": f"path does not exist: {path}"}
        out, total, capped = [], 0, False
        show_no = show_no or ctx > 0
        for fpath, shown in files:
            if capped:
                break
            data = io.read_file(fpath)
            if data is None:
                continue
            lines = [ln.decode("utf-8", "replace") for ln in _getlines(data)]
            for i, line in enumerate(lines):
                if total >= GREP_MAX_RESULTS:
                    capped = True
                    break
                if not rx.search(line):
                    continue
                lo, hi = (max(0, i - ctx), min(len(lines) - 1, i + ctx)) if ctx else (i, i)
                for j in range(lo, hi + 1):
                    sep = ":" if j == i else "-"
                    out.append(f"{shown}{sep}{f'{j + 1}{sep}' if show_no else ''}{lines[j]}\n")
                if ctx:
                    out.append("--\n")
                total += 1
        text = "".join(out) + f"\n---\nTotal matches: {total}\n"
        if capped:
            text += (f"[{GREP_MAX_RESULTS} matches limit reached. Narrow the "
                     "path/pattern/include to see more.]\n")
        return {"plain_text_response": text}


class ExecShellCommand(Tool):
    name, display_name = "exec_shell_command", "Execute shell command"
    write = stream = True

    def definition(self):
        return _fn(self.name, "Execute a shell command and return its output (stdout and "
                   "stderr combined).",
                   {"command": _p("string", "Shell command to execute"),
                    "timeout": _p("integer", f"Timeout in seconds (default 10, max "
                                  f"{EXEC_MAX_TIMEOUT})"),
                    "max_output_size": _p("integer", "Maximum output size in bytes (default "
                                          f"{EXEC_MAX_OUTPUT})")},
                   ["command"])

    def invoke(self, params, push=None):
        command = _req(params, "command")
        timeout = min(_val(params, "timeout", 10), EXEC_MAX_TIMEOUT)
        max_out = min(_val(params, "max_output_size", EXEC_MAX_OUTPUT), EXEC_MAX_OUTPUT)
        io = make_io(params)
        r = io.run(["sh", "-c", command], max(0, max_out), timeout, push)
        tail = f"\n[exit code: {r.exit_code}]" + (" [exit due to timed out]" if r.timed_out
                                                   else "")
        if push is not None:
            push(tail)
            return None
        return {"plain_text_response": r.output + tail}


class WriteFile(Tool):
    name, display_name = "write_file", "Write file"
    write = True

    def definition(self):
        return _fn(self.name, "Write content to a file, creating it (including parent "
                   "directories) if it does not exist. May use with edit_file for more complex "
                   "edits.",
                   {"path": _p("string", "Path of the file to write"),
                    "content": _p("string", "Content to write")}, ["path", "content"])

    def invoke(self, params, push=None):
        path = _req(params, "path")
        content = _req(params, "content").encode("utf-8", "surrogateescape")
        if not make_io(params).write_file(path, content):
            return {"error": f"failed to write file: {path}"}
        return {"result": "file written successfully", "path": path, "bytes": len(content)}


_FUZZY = [("\u2018", "'"), ("\u2019", "'"), ("\u201a", "'"), ("\u201b", "'"),
          ("\u201c", '"'), ("\u201d", '"'), ("\u201e", '"'), ("\u201f", '"'),
          *[(chr(c), "-") for c in range(0x2010, 0x2016)], ("\u2212", "-"), ("\u00a0", " "),
          *[(chr(c), " ") for c in range(0x2002, 0x200b)], ("\u202f", " "), ("\u205f", " "),
          ("\u3000", " ")]


def _fuzzy_line(line: str) -> str:
    line = line.rstrip(" \t\r")
    for a, b in _FUZZY:
        line = line.replace(a, b)
    return line


def _fuzzy(text: str) -> str:
    """Trailing blanks off every line, typographic quotes/dashes/spaces to ASCII; line count
    and positions kept."""
    return "\n".join(_fuzzy_line(x) for x in text.split("\n"))


def _count(hay: str, needle: str) -> int:
    n = pos = 0
    while needle:
        pos = hay.find(needle, pos)
        if pos < 0:
            break
        n, pos = n + 1, pos + len(needle)
    return n


def _apply(content: str, reps: list, offset: int = 0) -> str:
    for _i, at, length, new in reversed(reps):
        at -= offset
        content = content[:at] + new + content[at + length:]
    return content


def _keep_lines(text: str) -> list[str]:
    """Lines with their '\\n' kept (only '\\n' splits, as the C++ does)."""
    out, start = [], 0
    while start < len(text):
        nl = text.find("\n", start)
        if nl < 0:
            out.append(text[start:])
            break
        out.append(text[start:nl + 1])
        start = nl + 1
    return out


def _apply_keeping_lines(original: str, base: str, reps: list) -> str:
    """Fuzzy-matched edits: the lines they touch come from the normalized text, every other
    line verbatim from the original."""
    orig_lines = _keep_lines(original)
    spans, off = [], 0
    for ln in _keep_lines(base):
        spans.append((off, off + len(ln)))
        off += len(ln)
    groups = []  # [start_line, end_line (exclusive), reps]
    for rep in reps:
        s0, s1 = rep[1], rep[1] + rep[2]
        first = next((i for i, (a, b) in enumerate(spans) if a <= s0 < b), None)
        if first is None:
            first = last = 0
        else:
            last = first
            while last < len(spans) and spans[last][1] < s1:
                last += 1
            if last >= len(spans):
                last = 0
        end = last + 1
        if groups and first < groups[-1][1]:
            groups[-1][1] = max(groups[-1][1], end)
            groups[-1][2].append(rep)
        else:
            groups.append([first, end, [rep]])
    out, at = [], 0
    for first, end, grp in groups:
        out += orig_lines[at:first]
        g0, g1 = spans[first][0], spans[end - 1][1]
        out.append(_apply(base[g0:g1], grp, g0))
        at = end
    out += orig_lines[at:]
    return "".join(out)


class EditFile(Tool):
    name, display_name = "edit_file", "Edit file"
    write = True

    def definition(self):
        item = {"type": "object",
                "properties": {"old_text": _p("string", "Exact text to find; must be unique in "
                                              "the file and must not overlap with other edits"),
                               "new_text": _p("string", "Text to replace old_text with")},
                "required": ["old_text", "new_text"]}
        return _fn(self.name,
                   "Edit a file using exact text replacement. Each edits[].old_text must be "
                   "unique in the file and is matched against the original content, not "
                   "incrementally. Merge nearby changes into one edit instead of overlapping "
                   "edits. Use write_file to replace the whole file.",
                   {"path": _p("string", "Path to the file to edit"),
                    "edits": {"type": "array", "description": "One or more exact text "
                              "replacements to apply", "items": item}},
                   ["path", "edits"])

    def invoke(self, params, push=None):
        path = _req(params, "path")
        if "edits" not in params:
            raise BadArguments("[json.exception.out_of_range.403] key 'edits' not found")
        edits_in = params["edits"]
        if not isinstance(edits_in, list) or not edits_in:
            return {"error": "\"edits\" must be a non-empty array"}
        edits = []
        for e in edits_in:
            if not isinstance(e, dict):
                raise BadArguments("[json.exception.type_error.304] cannot use at() with "
                                  f"{type(e).__name__}")
            old, new = _req(e, "old_text"), _req(e, "new_text")
            if not old:
                return {"error": f"edits[{len(edits)}].old_text must not be empty"}
            edits.append((old, new))
        io = make_io(params)
        data = io.read_file(path)
        if data is None:
            return {"error": f"failed to open file: {path}"}
        original = data.decode("utf-8", "surrogateescape")
        fuzzy_orig = _fuzzy(original)
        any_fuzzy = False
        for i, (old, _new) in enumerate(edits):
            if old in original:
                continue
            if _fuzzy(old) not in fuzzy_orig:
                return {"error": f"could not find edits[{i}].old_text in {path}, it must match "
                        "the file's current content exactly"}
            any_fuzzy = True
        base = fuzzy_orig if any_fuzzy else original
        matched = []
        for i, (old, new) in enumerate(edits):
            needle = _fuzzy(old) if any_fuzzy else old
            # uniqueness on the normalized text: a whitespace-only duplicate still counts
            n = _count(fuzzy_orig, _fuzzy(old))
            if n > 1:
                return {"error": f"found {n} occurrences of edits[{i}].old_text in {path}, it "
                        "must be unique"}
            matched.append((i, base.find(needle), len(needle), new))
        matched.sort(key=lambda m: m[1])
        for a, b in zip(matched, matched[1:]):
            if a[1] + a[2] > b[1]:
                return {"error": f"edits[{a[0]}] and edits[{b[0]}] overlap in {path}; merge "
                        "them into one edit or target disjoint regions"}
        new_content = (_apply_keeping_lines(original, base, matched) if any_fuzzy
                       else _apply(base, matched))
        if new_content == original:
            return {"error": "no changes made: the replacement(s) produced identical content"}
        if not io.write_file(path, new_content.encode("utf-8", "surrogateescape")):
            return {"error": f"failed to write file: {path}"}
        return {"result": "file edited successfully", "path": path,
                "edits_applied": len(matched)}


class GetInfo(Tool):
    name, display_name = "get_info", "Get Runtime Info"

    def definition(self):
        return _fn(self.name, "Returns runtime info: the OS name/version and the current "
                   "working directory", {}, None)

    def invoke(self, params, push=None):
        io = make_io(params)
        r = io.run(["uname", "-a"], GET_INFO_MAX_OUTPUT, GET_INFO_TIMEOUT)
        os_info = r.output.strip() if r.exit_code == 0 and not r.timed_out else "unknown"
        cwd = _val(params, "cwd", "")
        if not cwd:
            if not _val(params, "runtime", ""):
                cwd = os.getcwd()
            else:
                p = io.run(["pwd"], GET_INFO_MAX_OUTPUT, GET_INFO_TIMEOUT)
                cwd = p.output.strip() if p.exit_code == 0 and not p.timed_out else "unknown"
        return {"os": os_info, "cwd": cwd}


BUILTIN_TOOLS = (ReadFile, FileGlobSearch, GrepSearch, ExecShellCommand, WriteFile, EditFile,
                 GetInfo)


# ---------------------------------------------------------------------------- --tools-runtime
class SpawnedContainer:
    """--tools-runtime '<engine>:<image>': one container (``<engine> run --rm -i IMAGE sh``,
    kept alive by its open stdin) for every call, respawned if it dies, removed at exit."""

    def __init__(self, engine: str, image: str):
        self.engine, self.image = engine, image
        self.lock = threading.Lock()
        self.proc = None
        self.cid = ""
        self._spawn()

    def _spawn(self) -> None:
        fd, cidfile = tempfile.mkstemp(prefix="jllama-tools-runtime-cid-", suffix=".tmp")
        os.close(fd)
        os.remove(cidfile)  # the engine refuses a cidfile that exists
        try:
            self.proc = subprocess.Popen([self.engine, "run", "--rm", "-i", "--cidfile", cidfile,
                                          self.image, "sh"], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as e:
            raise ToolFailure(f"failed to spawn {self.engine} container for tools runtime "
                              f"(image: {self.image}): {e.strerror or e}") from None
        cid = ""
        for _ in range(100):
            try:
                cid = open(cidfile).readline().strip()
            except OSError:
                cid = ""
            if cid or self.proc.poll() is not None:
                break
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            os.remove(cidfile)
        if not cid:
            _kill(self.proc)
            raise ToolFailure(f"timed out waiting for {self.engine} container to start "
                              f"(image: {self.image})")
        self.cid = cid

    def spec(self) -> str:
        with self.lock:
            if self.proc.poll() is not None:
                self._spawn()
            return f"{self.engine}-container:{self.cid}"

    def close(self) -> None:
        # closing stdin ends the container's shell (its pid 1); --rm then removes it
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                _kill(self.proc)


def make_runtime(spec: str):
    """--tools-runtime SPEC checked at start-up: None for the host ('' or 'none'), a
    SpawnedContainer, or the fixed spec string. Raises ToolFailure with one line."""
    if spec in ("", "none"):
        return None
    c = parse_container_spec(spec)
    if c is not None and not c[2]:
        engine, image = c[0], c[1]
        if not image:
            raise ToolFailure(f"--tools-runtime {engine}:<image> requires an image name")
        if shutil.which(engine) is None:
            raise ToolFailure(f"--tools-runtime {spec}: {engine} is not installed (not on PATH)")
        return SpawnedContainer(engine, image)
    make_io({"runtime": spec})  # nothing to own: only reject a bad spec now
    if c is not None and shutil.which(c[0]) is None:
        raise ToolFailure(f"--tools-runtime {spec}: {c[0]} is not installed (not on PATH)")
    if spec.startswith("ssh:") and shutil.which("ssh") is None:
        raise ToolFailure(f"--tools-runtime {spec}: ssh is not installed (not on PATH)")
    return spec


def select_tools(names: list[str]) -> list[Tool]:
    """--tools NAME,... ('all': every one) as tool objects; an unknown name raises
    ToolFailure."""
    for n in names:
        if n != "all" and n not in TOOL_NAMES:
            raise ToolFailure(f"unknown tool \"{n}\". available tools: {', '.join(TOOL_NAMES)}")
    return [cls() for cls in BUILTIN_TOOLS if "all" in names or cls.name in names]
