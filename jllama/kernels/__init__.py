"""Kernels: the quantized matmul and attention implementations, per backend.

``dispatch`` is the entry point (``qmatmul``, ``dequantize``, ``take_rows``, ``prepare``): it picks
an implementation by ggml type, weight layout, backend and the current ``Numerics`` at trace time.
``xla_cpu`` + ``cpu_ffi`` (C++ behind XLA's FFI, sources in ``cpu/``), ``cpu_attention``,
``cpu_repack`` (the pure-XLA CPU layout), ``pallas_qmatmul`` / ``pallas_attention`` (GPU/TPU).
"""
