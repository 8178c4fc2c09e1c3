"""Shared test fixtures.

Data outside the repo (``../shared/data``) is found through ONE setting, ``JLLAMA_SHARED_DATA``.
In CI (env ``CI`` set) missing data is a failure; elsewhere the tests that need it are skipped
with a message saying where the data comes from.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config) -> None:
    """Every test that loads the llama.cpp oracle gets its stock CPU kernels (see
    llamacpp_oracle.py: the AMX extra buffer crashes on Intel Xeons)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from llamacpp_oracle import llama_cpp_module

    llama_cpp_module()

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("JLLAMA_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        msg = (
            f"shared test data not found at {d}: set JLLAMA_SHARED_DATA to the 'shared/data' "
            "folder (WikiText-2, llama.cpp vocab test files, OpenAI spec)"
        )
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from jllama.registry import fetch

    return fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from jllama.registry import fetch

    return fetch("gemma3-270m")
