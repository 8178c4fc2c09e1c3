"""jllama: llama.cpp's job on JAX/XLA."""

__version__ = "0.1.0"
