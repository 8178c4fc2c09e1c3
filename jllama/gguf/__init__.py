"""GGUF files: reading (validated, memory-mapped) and writing."""

from jllama.gguf.constants import QType, qtype_info
from jllama.gguf.reader import GGUFFile, TensorInfo, read_gguf

__all__ = ["GGUFFile", "QType", "TensorInfo", "qtype_info", "read_gguf"]
