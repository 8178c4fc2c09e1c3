"""The one place that decides where each test data file comes from.

1. ``$JLLAMA_SHARED_DATA`` (default ``../shared/data`` beside the checkout), when the file is
   there: what CI and developers with the shared folder use.
2. Otherwise a copy that travels with the repository or is fetched like the named models:

   - WikiText-2's test split and OpenAI's OpenAPI spec are vendored gzipped under
     ``tests/data`` (sources and licences in ``tests/data/README.md``) and unpacked on first
     use into ``$JLLAMA_CACHE/testdata`` (default ``~/.cache/jllama/testdata``);
   - llama.cpp's tokenizer test vocabularies (``ggml-vocab-*.gguf`` with their ``.inp``/``.out``
     cases) are read out of the oracle's source package on PyPI (``llama-cpp-python==0.3.36``,
     which vendors llama.cpp 0c1e570: ``vendor/llama.cpp/models``) with ``pip download``, and
     cached in ``$JLLAMA_CACHE/testdata/vocab``.

Every file is sha256-checked whichever way it came; a missing or wrong file, or a failed fetch,
fails the tests that need it with one message (never a skip).
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
from pathlib import Path

from jllama import registry

REPO = Path(__file__).resolve().parents[1]
VENDORED = Path(__file__).resolve().parent / "data"

WIKI_TEST = "wikitext-2-raw/wiki.test.raw"
OPENAI_SPEC = "openai/openapi.yaml"
SHA256 = {
    WIKI_TEST: "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    OPENAI_SPEC: "db5d7478feae10b4d331834c60d9765a8aa042e38419f9b1694288c11aa8ebc8",
}

VOCAB_PACKAGE = "llama-cpp-python==0.3.36"  # the oracle: its sdist vendors llama.cpp 0c1e570
VOCAB_IN_PACKAGE = "vendor/llama.cpp/models"
VOCABS = ["deepseek-llm", "falcon", "gpt-2", "llama-bpe", "llama-spm", "phi-3", "qwen2",
          "starcoder"]
VOCAB_SHA256 = {
    "ggml-vocab-deepseek-llm.gguf": "867f77537b54565f0d81d508c04edc41aa1d4ffc1a92745f225b4c1b02755f76",
    "ggml-vocab-deepseek-llm.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-deepseek-llm.gguf.out": "87cfc1a8a9a7ef25d04d28c26a67b6a620af7be938c9bd0feeb4d319b9302832",
    "ggml-vocab-falcon.gguf": "9f0bf8b0733680398b72e652e90f260f43782f326e75545fc0e49611a5ba35ad",
    "ggml-vocab-falcon.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-falcon.gguf.out": "f8c80a0483582ef195c2129b69bb2e4e421b0f31ed7b35d84b63511d7ebae7cd",
    "ggml-vocab-gpt-2.gguf": "cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac",
    "ggml-vocab-gpt-2.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-gpt-2.gguf.out": "48e8c4cb3ad5c37915b225f872222567c1c4dd4d66951aa53460c8d152ff6d60",
    "ggml-vocab-llama-bpe.gguf": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
    "ggml-vocab-llama-bpe.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-llama-bpe.gguf.out": "118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b",
    "ggml-vocab-llama-spm.gguf": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
    "ggml-vocab-llama-spm.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-llama-spm.gguf.out": "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29",
    "ggml-vocab-phi-3.gguf": "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326",
    "ggml-vocab-phi-3.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-phi-3.gguf.out": "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29",
    "ggml-vocab-qwen2.gguf": "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c",
    "ggml-vocab-qwen2.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-qwen2.gguf.out": "de785bb305cc6fa9d43908ed5da337f853c0b79e971348fcfb9f0915a39c5363",
    "ggml-vocab-starcoder.gguf": "fedb892b4e1bd3c1f2fcdae356440b14fb458f4264d586e5c987ed93df4e174d",
    "ggml-vocab-starcoder.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-starcoder.gguf.out": "3ef12183c57ad076f9defd8e5eb454f509f5f0865cad35646abb4c4b2d2c5764",
}  # fmt: skip
# More of llama.cpp's test vocabularies (same package folder; not in the shared folder): the
# tokenizer kinds and pre-types the eight above lack (WPM, UGM, gemma4, qwen35, ...)
EXTRA_VOCABS = ["bert-bge", "gemma-4", "qwen35", "deepseek-coder", "mpt", "refact"]
EXTRA_VOCAB_SHA256 = {
    "ggml-vocab-bert-bge.gguf": "fbcbe22278fb302694d5f4a41bfe48c5f90e8e3554eab1c0435387dff654a854",
    "ggml-vocab-bert-bge.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-bert-bge.gguf.out": "8f95b1d4e5680634af06ac5a1b19f15ddeb743d3a6240056625e4345a4b06917",
    "ggml-vocab-gemma-4.gguf": "58b1ba0b57f3b4d7c468ba4ffd91ad85190346a3d7ad7e71d1cabaae8a14bb65",
    "ggml-vocab-gemma-4.gguf.inp": "0528aa007b06965f980181d252b5dff7bb170a77af6157bd48bba56885374448",
    "ggml-vocab-gemma-4.gguf.out": "ba8c596bcd05e97e62566fa994b42eeaeffd6a4e4b4a4abe7b5b689aa6b43bf3",
    "ggml-vocab-qwen35.gguf": "63ed952ff338996cf0bdf24a7b10015124273f75c6dc9bb427356aa3f67ec62c",
    "ggml-vocab-qwen35.gguf.inp": "0fc6547e7876cd5b2ef64a9d319c6e39040eb53986660bd4227ed7ddef017a94",
    "ggml-vocab-qwen35.gguf.out": "5efe225820325303857d0a087a8d59216f0d1e9a9e31133e7a5b44c3c4e1e9ca",
    "ggml-vocab-deepseek-coder.gguf": "91cb1379f2e33af1c4866b194622b7a0e12e8f0c9dba7ba2f10d55978730bec1",
    "ggml-vocab-deepseek-coder.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-deepseek-coder.gguf.out": "c2cea4584b0487e67fbd81f491bb44f89238722062126120d2c412edb3dbd853",
    "ggml-vocab-mpt.gguf": "59dc382612866d1fc6c11ea531318d327598f3412d9c8f8600607cdf3030898f",
    "ggml-vocab-mpt.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-mpt.gguf.out": "9d0982a7e7950b81bc2e325fb61bb7e295d2238934ab889737494de2dc4d906b",
    "ggml-vocab-refact.gguf": "ac3ceda902fed91ccf74312b305d9b86c37e4f8e35fa9cc6ef3ce34fca7d4678",
    "ggml-vocab-refact.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-refact.gguf.out": "c7e5c1c5dc1dfd3e0d56576bf699d2aca0b760b80779523ea9d323aad6cd1b88",
    "ggml-vocab-nomic-bert-moe.gguf": "90a6746926454784a98389ad36a36d89bc9cfc81db9cb0f33c941bcc959fe5f9",
}  # fmt: skip


class DataError(Exception):
    """A test data file could not be found, fetched or verified."""


def shared_dir() -> Path:
    return Path(os.environ.get("JLLAMA_SHARED_DATA", REPO.parent / "shared" / "data"))


def cache_dir() -> Path:
    from jllama.registry import cache_dir as jllama_cache

    return jllama_cache() / "testdata"


def _verified(path: Path, sha256: str, where: str) -> Path:
    digest = registry.sha256_of(path)
    if digest != sha256:
        raise DataError(f"test data {path} ({where}) has sha256 {digest}, expected {sha256}: "
                        "a different version of the file; remove it (cache) or fix the folder")
    return path


def _vendored(rel: str) -> Path:
    """The shared copy of a vendored item, else the gzipped copy in tests/data, unpacked into
    the cache once."""
    shared = shared_dir() / rel
    if shared.is_file():
        return _verified(shared, SHA256[rel], "JLLAMA_SHARED_DATA")
    dest = cache_dir() / rel
    if dest.is_file() and registry.sha256_of(dest) == SHA256[rel]:
        return dest
    src = VENDORED / (rel + ".gz")
    if not src.is_file():
        raise DataError(f"test data {rel}: neither {shared} nor the vendored {src} exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    with gzip.open(src, "rb") as fi, open(tmp, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 22)
    try:
        _verified(tmp, SHA256[rel], f"unpacked from {src}")
    except DataError:
        tmp.unlink()
        raise
    os.replace(tmp, dest)
    return dest


@functools.cache
def wiki_test() -> Path:
    """WikiText-2 raw, test split (``wiki.test.raw``, 1,290,590 bytes)."""
    return _vendored(WIKI_TEST)


@functools.cache
def openai_spec() -> Path:
    """OpenAI's OpenAPI 3.1 spec (``openapi.yaml``, version 2.3.0)."""
    return _vendored(OPENAI_SPEC)


@functools.cache
def vocab_dir() -> Path:
    """A folder holding all of ``VOCAB_SHA256`` (``ggml-vocab-NAME.gguf`` + ``.inp``/``.out``)."""
    shared = shared_dir() / "vocab"
    if all((shared / f).is_file() for f in VOCAB_SHA256):
        for f, h in VOCAB_SHA256.items():
            _verified(shared / f, h, "JLLAMA_SHARED_DATA")
        return shared
    from jllama.errors import JllamaError
    from jllama.registry import fetch_files

    dest = cache_dir() / "vocab"
    try:
        fetch_files(VOCAB_PACKAGE, {f"{VOCAB_IN_PACKAGE}/{f}": h for f, h in VOCAB_SHA256.items()},
                    dest, sdist=True)
    except JllamaError as e:
        raise DataError(
            f"llama.cpp's tokenizer test files: not in {shared}, and fetching them from the "
            f"source package {VOCAB_PACKAGE} on PyPI failed: {e}") from e
    return dest


@functools.cache
def extra_vocab_dir() -> Path:
    """A folder holding all of ``EXTRA_VOCAB_SHA256`` (shared folder first, else the package)."""
    shared = shared_dir() / "vocab"
    if all((shared / f).is_file() for f in EXTRA_VOCAB_SHA256):
        for f, h in EXTRA_VOCAB_SHA256.items():
            _verified(shared / f, h, "JLLAMA_SHARED_DATA")
        return shared
    from jllama.errors import JllamaError
    from jllama.registry import fetch_files

    dest = cache_dir() / "vocab-extra"
    try:
        fetch_files(VOCAB_PACKAGE,
                    {f"{VOCAB_IN_PACKAGE}/{f}": h for f, h in EXTRA_VOCAB_SHA256.items()},
                    dest, sdist=True)
    except JllamaError as e:
        raise DataError(
            f"llama.cpp's extra tokenizer test files: not in {shared}, and fetching them from "
            f"the source package {VOCAB_PACKAGE} on PyPI failed: {e}") from e
    return dest


# llama.cpp's chat templates (models/templates in the same source package) that
# tests/test_server_chat_formats.py replays llama.cpp's chat-format results for
CHAT_TEMPLATES_IN_PACKAGE = "vendor/llama.cpp/models/templates"
CHAT_TEMPLATE_SHA256 = {
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": "cc60b553279347d83df761f5dc55b4b2fb66bc1fa9a33e219911c13c11552fac",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "7ce09d55d3690e06c70b5c07228cc7e8c99c43a23cdc027762be4011efcdea6c",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "7ce09d55d3690e06c70b5c07228cc7e8c99c43a23cdc027762be4011efcdea6c",
    "Qwen-QwQ-32B": "5ed15374ce53e19a7798710736a2c9fe41c79f7385e8421a2080d6575a80ef1b",
    "Qwen-Qwen2.5-7B-Instruct": "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
    "Qwen-Qwen3-0.6B": "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": "dd2675619a64a449cdcdd2b93e605a0a50764cee41e344f244752bc93643936c",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": "bbe594884b44d740667ee65a70bc8d333a565eab3d63ea59f291ea73ada84ba6",
    "fireworks-ai-llama-3-firefunction-v2": "fcb749f5c5d6bbc4240db4e86af5dfcefe9c7e85355235d0f304ab4319ba6b51",
    "llama-cpp-deepseek-r1": "0d11fd8d7cf3f212733d73dfe09ead89a14a18816661dc30ea1fb3147428fba1",
    "meetkai-functionary-medium-v3.1": "2fc9dbfaea552f864b4b8cdf9d17401e9a49cbda199498531f137eb0ec5ae1d8",
    "meetkai-functionary-medium-v3.2": "5c7c96c27cfecf3418411d1ebd0d11d691ab6bd2155bb38dacc62250fe47c3c8",
    "meta-llama-Llama-3.1-8B-Instruct": "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
    "meta-llama-Llama-3.2-3B-Instruct": "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4",
    "meta-llama-Llama-3.3-70B-Instruct": "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
    "mistralai-Mistral-Nemo-Instruct-2407": "e4676cb56dffea7782fd3e2b577cfaf1e123537e6ef49b3ec7caa6c095c62272",
}  # fmt: skip


@functools.cache
def chat_templates_dir() -> Path:
    """A folder holding ``NAME.jinja`` for each of ``CHAT_TEMPLATE_SHA256`` (shared folder
    ``chat-templates/`` first, else the source package)."""
    files = {f"{n}.jinja": h for n, h in CHAT_TEMPLATE_SHA256.items()}
    shared = shared_dir() / "chat-templates"
    if all((shared / f).is_file() for f in files):
        for f, h in files.items():
            _verified(shared / f, h, "JLLAMA_SHARED_DATA")
        return shared
    from jllama.errors import JllamaError
    from jllama.registry import fetch_files

    dest = cache_dir() / "chat-templates"
    try:
        fetch_files(VOCAB_PACKAGE, {f"{CHAT_TEMPLATES_IN_PACKAGE}/{f}": h
                                    for f, h in files.items()}, dest, sdist=True)
    except JllamaError as e:
        raise DataError(f"llama.cpp's chat templates: not in {shared}, and fetching them from "
                        f"the source package {VOCAB_PACKAGE} on PyPI failed: {e}") from e
    return dest


def vocab(name: str) -> Path:
    """``ggml-vocab-NAME.gguf``; its ``.inp``/``.out`` cases lie beside it."""
    return vocab_dir() / f"ggml-vocab-{name}.gguf"


# llama.cpp's convert_hf_to_gguf.py with its conversion/ package and gguf-py, out of the same
# source package as the vocabularies; the archive's sha256 vouches for every file in it.
CONVERTER_SDIST = "llama_cpp_python-0.3.36.tar.gz"
CONVERTER_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")


@functools.cache
def reference_converter() -> Path:
    """A folder with llama.cpp 0c1e570's ``convert_hf_to_gguf.py``, ``conversion/`` and
    ``gguf-py/`` (run it with ``gguf-py`` first on PYTHONPATH), in
    ``$JLLAMA_CACHE/testdata/llama.cpp-0c1e570-convert``."""
    import tarfile
    import tempfile

    dest = cache_dir() / "llama.cpp-0c1e570-convert"
    if (dest / ".complete").is_file():
        return dest
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tmpd = Path(tmp)
        try:
            registry._pip_download([VOCAB_PACKAGE], tmpd / "dl", VOCAB_PACKAGE, sdist=True)
        except Exception as e:
            raise DataError(f"llama.cpp's convert_hf_to_gguf.py: fetching the source package "
                            f"{VOCAB_PACKAGE} on PyPI failed: {e}") from e
        archive = tmpd / "dl" / CONVERTER_SDIST
        if not archive.is_file():
            raise DataError(f"pip downloaded {sorted(p.name for p in (tmpd / 'dl').iterdir())}, "
                            f"not {CONVERTER_SDIST}")
        _verified(archive, CONVERTER_SDIST_SHA256, "the oracle's source package")
        out = tmpd / "out"
        prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
        with tarfile.open(archive) as t:
            for m in t:
                rel = m.name.removeprefix(prefix)
                if m.isfile() and m.name.startswith(prefix) and rel.startswith(_CONVERTER_PARTS):
                    target = out / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with t.extractfile(m) as fi, open(target, "wb") as fo:
                        shutil.copyfileobj(fi, fo)
        (out / ".complete").write_text(CONVERTER_SDIST_SHA256 + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(out, dest)
    return dest
