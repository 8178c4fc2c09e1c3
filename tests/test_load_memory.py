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


def _qtensors(llm) -> list:
    import jax

    from jllama.quant.qtensor import QTensor

    return [v for v in jax.tree_util.tree_leaves(llm.engine.state,
                                                 is_leaf=lambda x: isinstance(x, QTensor))
            if isinstance(v, QTensor) and not v.is_float]


def test_misaligned_data_section_read_in_place(tmp_path):
    """GGUF aligns tensors to 32 bytes; where the data section sits at 32 mod 64, XLA cannot
    adopt the mapping's views as they are (it needs 64). The quantized weights are then adopted
    from the 64-aligned address 32 bytes before each (an offset QTensor, quant/qtensor.py) and
    read in place like an aligned file's: no copy (it was 2x a model's bytes resident, then a
    copy at load), the file's pages resident as used, the aligned file's logits."""
    from tinymodels import dense_hparams, dense_tensors, mapped_ranges, write_gguf

    from jllama.api import Llama

    shp = dict(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, head_dim=64)
    tensors = dense_tensors(3, n_vocab=262144, **shp)  # big tensors: a copy would show
    files = {}
    for pad in range(0, 64, 4):  # header lengths until one file of each alignment
        import gguf

        p = write_gguf(tmp_path / f"m{pad}.gguf", "llama",
                       dense_hparams(**shp, pad_key="x" * pad), tensors,
                       qtype=gguf.GGMLQuantizationType.Q8_0)
        files.setdefault(read_gguf(p).data_offset % 64, p)
        if len(files) == 2:
            break
    assert set(files) == {0, 32}
    logits = {}
    for mod, p in files.items():
        llm = Llama(str(p), ctx_size=64, compile_cache=False)
        logits[mod] = np.asarray(llm.engine.logits([1, 2, 3, 4, 5]))
        qts = _qtensors(llm)
        assert qts and all(qt.offset == mod for qt in qts)
        ranges = mapped_ranges(str(p))
        for qt in qts:  # every quantized weight's buffer lies in a mapping of the file
            ptr = qt.data.unsafe_buffer_pointer()
            assert any(a <= ptr and ptr + qt.data.nbytes <= b for a, b in ranges)
        assert _mapped_rss_kib(str(p)) * 1024 > read_gguf(p).file_size // 2  # read there
        del llm
    np.testing.assert_array_equal(logits[0], logits[32])
