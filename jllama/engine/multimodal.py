"""Images in a prompt, as libmtmd handles them (tools/mtmd/mtmd.cpp, mtmd-helper.cpp).

A prompt holds one media marker (``<__media__>``) per image. It is cut at the markers; each
text part is tokenized on its own (no BOS), each image becomes the projector's begin text
(Gemma 3: ``<start_of_image>``), the image's embeddings, then its end text
(``<end_of_image>``), and BOS goes first when the vocabulary adds one. A LLaVA-1.6 image is
several image chunks back to back (its tiles, then its overview), each decoded on its own. Evaluation follows
``mtmd_helper_eval_chunks``: text chunks as ordinary prompt batches, each image's embeddings
in one batch, non-causally for the projectors libmtmd decodes so (Gemma 3). SmolVLM /
Idefics3 images become several chunks (tiles and a global image between text markers).

A text model with M-RoPE (qwen2vl) places an image of nx x ny tokens as libmtmd does: token
i at (p0, p0 + i // nx, p0 + i % nx, 0) with p0 the next position, and the text after it
from p0 + max(nx, ny) on (``image_positions``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from jllama.engine.engine import Engine
from jllama.engine.sampling import SamplingParams
from jllama.errors import ContextError, ModelError
from jllama.models.clip import QWEN2VL, QWEN25VL, Vision

MEDIA_MARKER = "<__media__>"
# projector -> (begin text, end text, non-causal image batch)
_WRAP = {"gemma3": ("<start_of_image>", "<end_of_image>", True), "mlp": ("", "", False),
         "idefics3": ("", "", False),  # idefics3 wraps each tile itself: _idefics3_image
         QWEN2VL: ("<|vision_start|>", "<|vision_end|>", False),
         QWEN25VL: ("<|vision_start|>", "<|vision_end|>", False)}


@dataclass
class ImageChunk:
    embd: np.ndarray  # [n_tokens, n_embd]
    bidir: bool
    grid: tuple[int, int] = (0, 1)  # (nx, ny): tokens per row, rows (M-RoPE positions)


def image_positions(p0: int, nx: int, ny: int) -> tuple[np.ndarray, int]:
    """An image's M-RoPE positions [nx * ny, 4] from position p0 (libmtmd's
    ``mtmd_image_tokens_get_decoder_pos``, in the order ``set_position_mrope_2d`` writes:
    t, row, column, 0) and the positions it uses up, max(nx, ny)."""
    i = np.arange(nx * ny)
    pos = np.stack([np.full_like(i, p0), p0 + i // nx, p0 + i % nx, np.zeros_like(i)], -1)
    return pos.astype(np.int32), max(nx, ny)


def prefill_image(engine: Engine, chunk: ImageChunk, slot: int = 0, placeholder: int = -1):
    """Decode an image chunk's embeddings into a slot (``mtmd_helper_decode_image_chunk``);
    the logits after its last token. ``placeholder``: the (negative) id the slot's token list
    records for each of its cells."""
    if not engine.mrope:
        return engine.prefill_embeddings(chunk.embd, slot, bidir=chunk.bidir,
                                         placeholder=placeholder)
    nx, ny = chunk.grid
    if nx * ny != chunk.embd.shape[0]:
        raise ContextError(f"an image grid of {nx}x{ny} does not hold its "
                           f"{chunk.embd.shape[0]} embeddings")
    pos, n_pos = image_positions(engine.next_position(slot), nx, ny)
    return engine.prefill_embeddings(chunk.embd, slot, bidir=chunk.bidir, positions=pos,
                                     n_pos=n_pos, placeholder=placeholder)


def check_pair(vision: Vision, n_embd_text: int, arch: str) -> None:
    """libmtmd's check that the projector feeds this text model."""
    if vision.spec.n_embd_out != n_embd_text:
        raise ModelError(f"{vision.path}: the mmproj projects to {vision.spec.n_embd_out} "
                         f"dimensions but the text model's width is {n_embd_text}: "
                         "mismatched mmproj")
    if vision.spec.projector == "gemma3" and arch != "gemma3":
        raise ModelError(f"{vision.path}: a gemma3 mmproj needs a gemma3 text model, "
                         f"not '{arch}'")


def chunks(tokenizer, vision: Vision, prompt: str, images: list[np.ndarray],
           add_special: bool = True, parse_special: bool = True,
           marker: str = MEDIA_MARKER) -> list:
    """The prompt as a list of token lists and ImageChunks (images encoded here); ``marker``
    places the images (the server's is llama-server's per-process one)."""
    parts = prompt.split(marker)
    if len(parts) - 1 != len(images):
        raise ContextError(f"the prompt has {len(parts) - 1} media markers ({marker}) "
                           f"for {len(images)} images")
    beg, end, bidir = _WRAP[vision.spec.projector]
    out: list = [[]]

    def text(s: str, special: bool) -> None:
        if s:
            out[-1].extend(tokenizer.encode(s, add_special=False, parse_special=special))

    for i, part in enumerate(parts):
        text(part, parse_special)
        if i < len(images) and vision.spec.projector == "idefics3":
            _idefics3_image(tokenizer, vision, images[i], out, text)
        elif i < len(images):
            text(beg, True)
            for embd in vision.encode_chunks(images[i]):  # LLaVA-1.6: tiles, then overview
                nx, ny = vision.token_grid(*images[i].shape[:2])
                if nx * ny != embd.shape[0]:  # fixed-size projectors: libmtmd's (n_tokens, 1)
                    nx, ny = embd.shape[0], 1
                out.append(ImageChunk(embd, bidir, (nx, ny)))
                out.append([])
            text(end, True)
    v = tokenizer.vocab
    if add_special and v.add_bos and v.bos_id is not None:
        out[0].insert(0, v.bos_id)
    return [c for c in out if not (isinstance(c, list) and not c)]


def lookup_tokens(tokenizer, pieces: tuple[str, ...]) -> list[int]:
    """libmtmd's lookup_token for each piece: the first id whose piece (specials rendered) is
    it; one pass over the vocabulary."""
    want = {p.encode(): None for p in pieces}
    left = len(want)
    for i in range(len(tokenizer.vocab.tokens)):
        p = tokenizer.token_to_piece(i, special=True)
        if p in want and want[p] is None:
            want[p] = i
            left -= 1
            if not left:
                break
    for p, i in want.items():
        if i is None:
            raise ModelError(f"the text model's vocabulary has no token {p.decode()!r} that "
                             "the mmproj's image layout needs: mismatched mmproj")
    return [want[p.encode()] for p in pieces]


def _idefics3_image(tokenizer, vision: Vision, image: np.ndarray, out: list, text) -> None:
    r"""libmtmd's MTMD_SLICE_TMPL_IDEFICS3 layout (transformers' processing_idefics3): each tile
    as ``<fake_token_around_image><row_R_col_C>`` + its embeddings, a ``\n`` token after every
    row but the last, then ``\n\n <fake_token_around_image> <global-img>``, the global image,
    ``<fake_token_around_image>``; all decoded causally."""
    fake, glob, nl, nl2 = lookup_tokens(tokenizer, ("<fake_token_around_image>", "<global-img>",
                                                    "\n", "\n\n"))
    tiles, overview, gx, gy = vision.encode_idefics3(image)

    def embd(e: np.ndarray) -> None:
        out.append(ImageChunk(e, False))
        out.append([])

    for y in range(gy):
        for x in range(gx):
            text(f"<fake_token_around_image><row_{y + 1}_col_{x + 1}>", True)
            embd(tiles[y * gx + x])
        if y != gy - 1:
            out[-1].append(nl)
    out[-1].extend([nl2, fake, glob])
    embd(overview)
    out[-1].append(fake)


def n_tokens(chs: list) -> int:
    return sum(len(c) if isinstance(c, list) else c.embd.shape[0] for c in chs)


def generate(engine: Engine, chs: list, params: SamplingParams | None = None,
             max_tokens: int = 128, stop_ids: frozenset[int] | set[int] = frozenset(),
             slot: int = 0, dry_breakers: dict | None = None) -> Iterator[int]:
    """Evaluate the chunks into an empty slot, then generate as ``Engine.generate``."""
    if not chs or not isinstance(chs[-1], list):
        raise ContextError("a prompt must end with text after its last image")
    total = n_tokens(chs)
    if total >= engine.ctx_size:
        raise ContextError(f"the prompt with its images takes {total} tokens; the context "
                           f"size is {engine.ctx_size} (raise --ctx-size)")
    engine.reset(slot)
    t0 = time.perf_counter()
    for c in chs[:-1]:
        if isinstance(c, list):
            engine.prefill(c, slot)
        else:
            prefill_image(engine, c, slot)
    before = time.perf_counter() - t0
    first = True
    for tok in engine.generate(chs[-1], params, max_tokens, stop_ids, slot, append=True,
                               dry_breakers=dry_breakers):
        if first:  # the timings count the whole prompt, images included
            _whole_prompt(engine, total, before)
            first = False
        yield tok
    if first:
        _whole_prompt(engine, total, before)


def _whole_prompt(engine: Engine, total: int, before: float) -> None:
    tm = engine.timings
    tm.prompt_tokens = total
    tm.prompt_s += before
    tm.first_token_s += before
