#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see the device tool's README): the Pallas tests
# compiled for the GPU, the kernel micro-benchmark against the XLA path, and an end-to-end run
# on a SmolLM2-shaped random model, and the vision encoder with Pallas-layout weights against
# libmtmd's embeddings. The image brings JAX/Flax; `gguf` travels as a wheel in .whl.
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  2>&1 | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_pallas.py 2>&1 | tail -25 \
  | tee "$OUT/pytest_pallas.txt"
# ragged paged attention compiled for the GPU ("loop" variant) against the float64 reference
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_ragged_paged_attention.py 2>&1 \
  | tail -15 | tee "$OUT/pytest_ragged.txt"
# every Pallas type at decode (1, 16 rows) and one prefill size, on two Gemma-3 shapes (a
# 2.6 MB ffn matrix and the 335 MB-at-Q8_0 output matrix): %HBM per type and rows
timeout 240 python3 experiments/gpu/bench_pallas.py --reps 10 --rows 1,16,512 \
  --shapes gemma3.ffn_up,gemma3.output 2>&1 | tee "$OUT/bench_pallas.txt"
timeout 150 python3 experiments/gpu/e2e_gpu.py --types Q4_0,Q8_0 -r 2 2>&1 | tee "$OUT/e2e.txt"
timeout 120 python3 experiments/gpu/vision_gpu.py 2>&1 | tee "$OUT/vision.txt"
# partial offload (-ngl): speed and logits per split, and a model twice the allowed device memory
timeout 240 python3 experiments/gpu/offload_gpu.py -p 128 -n 32 -r 1 --mem-fraction 0.02 2>&1 \
  | tee "$OUT/offload.txt"
