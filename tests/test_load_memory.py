"""Memory after load: the GGUF file's mapped pages leave the process once the weights are in
device buffers (issue #5), and the tensor views still read the file's bytes."""

from __future__ import annotations

import os

import numpy as np

from jllama.gguf.reader import read_gguf


def _mapped_rss_kib(path: str) -> int:
    """Resident KiB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    path = os.path.realpath(path)
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # mapping header
                inside = len(head) >= 6 and head[5] == path
            elif inside and head and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_release_pages_keeps_views_valid(smollm2_path):
    g = read_gguf(smollm2_path)
    path = str(smollm2_path)
    for ti in g.tensors.values():  # fault every page in
        int(np.asarray(ti.data)[:: 4096].sum())
    assert _mapped_rss_kib(path) * 1024 > g.file_size // 2
    g.release_pages()
    assert _mapped_rss_kib(path) < 1024
    # the views read what the file holds (plain reads as the reference)
    with open(path, "rb") as f:
        for name in ("token_embd.weight", "blk.7.ffn_down.weight", "output_norm.weight"):
            ti = g.tensors[name]
            f.seek(ti.offset)
            assert np.asarray(ti.data).tobytes() == f.read(ti.nbytes)


def test_llama_load_leaves_file_unmapped(smollm2_path):
    from jllama.api import Llama

    llm = Llama(str(smollm2_path), ctx_size=64, compile_cache=False)
    assert _mapped_rss_kib(str(smollm2_path)) < 4096
    assert llm.tokenize("Hello")  # the tokenizer was built from the parsed header
