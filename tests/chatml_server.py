"""Fixtures shared by the tests of the APIs llama-server answers from its chat path
(/v1/messages, /v1/responses): one tiny generated llama with a ChatML template per test module,
and llama-cpp-python's greedy completion on it as the oracle. Import the fixtures by name."""

from __future__ import annotations

import pytest
from llamacpp_oracle import greedy_completion

SEED = 8  # a tiny model whose greedy text is not only newlines
N = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tinymodels import write_server_model

    return write_server_model(tmp_path_factory.mktemp("chatml") / "tiny.gguf", seed=SEED)


@pytest.fixture(scope="module")
def ref(model):
    from llamacpp_oracle import llama_cpp_module

    llm = llama_cpp_module().Llama(str(model), n_ctx=256, verbose=False, n_threads=1)
    yield llm
    llm.close()


def greedy(ref, text: str, n: int = N) -> tuple[list[int], dict]:
    return greedy_completion(ref, text, n)
