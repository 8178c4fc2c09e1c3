"""Hugging Face checkpoints -> GGUF (`jllama convert-hf`), as llama.cpp's convert_hf_to_gguf.py."""

from jllama.convert.common import ConvertError
from jllama.convert.hf import ARCHS, OUTTYPES, convert_hf

__all__ = ["ARCHS", "OUTTYPES", "ConvertError", "convert_hf"]
