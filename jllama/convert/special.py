"""Special tokens, ``add_*_token`` flags, merges and chat template of a checkpoint's tokenizer.

What gguf-py's ``SpecialVocab`` (llama.cpp 0c1e570) reads, in the order it writes it: the
released ``gguf`` package lags that version (it ignores a ``ByteLevel`` post-processor, so it
writes no ``add_eos_token`` for Llama 3, and it knows no normaliser flags), so the rules live
here, written from the reference's behaviour:

- ``tokenizer.json``: merges (``"a b"`` strings; pairs joined with a space, spaces inside a
  part moved to U+0120), normaliser lowercase / strip-accents flags, and the post-processor:
  ``ByteLevel`` -> add_bos/add_eos default False, ``RobertaProcessing`` -> bos/eos/sep added,
  ``TemplateProcessing`` -> add_bos when the single template starts with the BOS (or CLS)
  token, add_eos when it ends with the EOS token (another trailing token becomes the EOS and
  the old one EOT), add_sep from the pair template's middle;
- ``tokenizer_config.json``: ``add_*_token`` where the post-processor said nothing, the
  ``*_token`` strings resolved to ids through ``tokenizer.json``'s added tokens, the chat
  template (else ``chat_template.jinja`` with ``additional_chat_templates/*.jinja``, else
  ``chat_template.json``);
- ``config.json``: ``*_token_id`` (or under ``text_config``) for types still unset.

Ids at or past ``n_vocab`` are skipped; the first id found for a type wins.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from jllama.convert.common import ConvertError

log = logging.getLogger("jllama.convert")

TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


class SpecialVocab:
    def __init__(self, path: Path, load_merges: bool = False, n_vocab: int | None = None,
                 types: tuple[str, ...] = TYPES):
        self.ids: dict[str, int] = {}
        self.add: dict[str, bool] = {}
        self.merges: list[str] = []
        self.chat_template: str | list | None = None
        self.lowercase: bool | None = None
        self.strip_accents: bool | None = None
        self.n_vocab = n_vocab
        self.load_merges = load_merges
        self.types = tuple(types)
        self._from_tokenizer_files(path)
        self._from_config(path)
        if load_merges and not self.merges:
            self._from_merges_txt(path)

    # -- writing ---------------------------------------------------------------------------
    def add_to_gguf(self, kv: Any) -> None:
        """``kv``: gguf-py's GGUFWriter used as the key recorder."""
        if self.merges:
            kv.add_token_merges(self.merges)
        for typ, tid in self.ids.items():
            fn = getattr(kv, f"add_{typ}_token_id", None)
            if fn is not None:
                fn(tid)
        for typ, value in self.add.items():
            fn = getattr(kv, f"add_add_{typ}_token", None)
            if fn is not None:
                fn(value)
        if self.chat_template is not None:
            kv.add_chat_template(self.chat_template)
        if self.lowercase is not None:
            kv.add_bool("tokenizer.ggml.normalizer.lowercase", self.lowercase)
        if self.strip_accents is not None:
            kv.add_bool("tokenizer.ggml.normalizer.strip_accents", self.strip_accents)

    # -- reading ---------------------------------------------------------------------------
    def set_special(self, typ: str, tid: Any) -> None:
        """Set a type's id unless one is set already (or it is past the vocabulary)."""
        if not isinstance(tid, int):
            return
        if tid < 0:
            raise ConvertError(f"invalid id for the {typ} token: {tid}")
        if self.n_vocab is None or tid < self.n_vocab:
            self.ids.setdefault(typ, tid)
        else:
            log.warning("special token %s id %d is past the vocabulary (%d): skipped", typ, tid,
                        self.n_vocab)

    def _from_merges_txt(self, path: Path) -> None:
        f = path / "merges.txt"
        if not f.is_file():
            return
        lines = f.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].strip().startswith("#"):
            lines = lines[1:]
        merges = []
        for line in lines:
            parts = line.strip().split(None, 3)
            if len(parts) == 2:
                merges.append(f"{parts[0]} {parts[1]}")
        self.merges = merges

    def _normalizer(self, n: dict) -> None:
        t = n.get("type")
        if t == "Lowercase":
            self.lowercase = True
        elif t == "StripAccents":
            self.strip_accents = True
        elif t == "BertNormalizer":
            if "lowercase" in n:
                self.lowercase = n["lowercase"]
            if "strip_accents" in n:
                self.strip_accents = n["strip_accents"]
        elif t == "Sequence":
            for m in n.get("normalizers", []):
                self._normalizer(m)

    def _from_tokenizer_files(self, path: Path) -> None:
        tokenizer = None
        added: list[dict] = []
        tf = path / "tokenizer.json"
        if tf.is_file():
            tokenizer = json.loads(tf.read_text(encoding="utf-8"))
            if self.load_merges:
                merges = tokenizer.get("model", {}).get("merges")
                if isinstance(merges, list) and merges:
                    if isinstance(merges[0], str):
                        self.merges = merges
                    elif isinstance(merges[0], list) and len(merges[0]) == 2:
                        self.merges = [" ".join("".join("\u0120" if c == " " else c for c in part)
                                                for part in pair) for pair in merges]
                    else:
                        raise ConvertError("tokenizer.json: unknown merges format")
            if normalizer := tokenizer.get("normalizer"):
                self._normalizer(normalizer)
            added = tokenizer.get("added_tokens", [])
        cfg = None
        cf = path / "tokenizer_config.json"
        if cf.is_file():
            cfg = json.loads(cf.read_text(encoding="utf-8"))
        if tokenizer:
            self._post_processor(tokenizer, cfg)
        if not cfg:
            return
        alt = None
        jinja, tjson = path / "chat_template.jinja", path / "chat_template.json"
        if jinja.is_file():
            alt = jinja.read_text(encoding="utf-8")
            if more := list((path / "additional_chat_templates").glob("*.jinja")):
                alt = [{"name": "default", "template": alt}] + [
                    {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in more]
        elif tjson.is_file():
            alt = json.loads(tjson.read_text(encoding="utf-8")).get("chat_template")
        ct = cfg.get("chat_template", alt)
        if ct is None or isinstance(ct, (str, list)):
            self.chat_template = ct
        for typ in self.types:
            flag = cfg.get(f"add_{typ}_token")
            if isinstance(flag, bool) and typ not in self.add:
                self.add[typ] = flag
            entry = cfg.get(f"{typ}_token")
            if isinstance(entry, dict):
                entry = entry.get("content")
            if not isinstance(entry, str):
                continue
            tid = next((a.get("id") for a in added if a.get("content") == entry), None)
            self.set_special(typ, tid)

    def _post_processor(self, tokenizer: dict, cfg: dict | None) -> None:
        c = cfg or {}
        bos, cls, eos, sep = (c.get(f"{t}_token") for t in ("bos", "cls", "eos", "sep"))
        if not bos and cls and cfg:
            cfg["bos_token"] = bos = cls
        if not eos and sep and cfg:
            cfg["eos_token"] = eos = sep
        pp = tokenizer.get("post_processor")
        if not pp:
            return
        for proc in pp.get("processors", [pp]):
            kind = proc.get("type")
            if kind == "ByteLevel":
                self.add.setdefault("bos", False)
                self.add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                self.add["bos"] = self.add["eos"] = self.add["sep"] = True
                if not cls and cfg:
                    cls = cfg["cls_token"] = proc.get("cls", [bos])[0]
                if not sep and cfg:
                    sep = cfg["sep_token"] = proc.get("sep", [eos])[0]
            elif kind == "TemplateProcessing":
                single, pair = proc.get("single", []), proc.get("pair", [])
                first = last = None
                if len(single) > 1:
                    if first := single[0].get("SpecialToken", {}).get("id"):
                        if not cfg:
                            bos = first
                        elif first not in (bos, cls):
                            if not bos:
                                cfg["bos_token"] = bos = first
                            if not cls:
                                cfg["cls_token"] = cls = first
                        self.add["bos"] = first in (bos, cls)
                    if last := single[-1].get("SpecialToken", {}).get("id"):
                        if not cfg:
                            eos = last
                        elif last != eos:
                            if "eot" not in self.types:
                                self.types += ("eot",)
                                cfg["eot_token"] = eos
                            elif "eom" not in self.types:
                                self.types += ("eom",)
                                cfg["eom_token"] = eos
                            cfg["eos_token"] = eos = last
                        self.add["eos"] = last == eos
                if pair:
                    start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first \
                        else 0
                    stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last \
                        else None
                    if pair := pair[slice(start, stop)]:
                        a = pair[0].get("Sequence", {}).get("id")
                        b = pair[-1].get("Sequence", {}).get("id")
                        if a == "A" and b == "B" and (pair := pair[1:-1]):
                            add_sep = False
                            if (e := pair[0].get("SpecialToken", {}).get("id")) and \
                                    e in (sep, eos) and not last:
                                add_sep = True
                            if len(pair) == 2 and \
                                    (e := pair[1].get("SpecialToken", {}).get("id")) and \
                                    e in (sep, eos):
                                add_sep = True
                            self.add["sep"] = add_sep
                            if add_sep and not sep and cfg:
                                cfg["sep_token"] = eos

    def _from_config(self, path: Path) -> None:
        f = path / "config.json"
        if not f.is_file():
            return
        config = json.loads(f.read_text(encoding="utf-8"))
        for typ in self.types:
            tid = config.get(f"{typ}_token_id")
            if tid is None and "text_config" in config:
                tid = config["text_config"].get(f"{typ}_token_id")
            self.set_special(typ, tid)
