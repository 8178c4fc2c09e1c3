#!/usr/bin/env bash
# Run HERE (with network) before the device call: fills .whl/ (git-ignored; the device call
# carries it, 21 MiB of the 64 MiB allowed) with what a bare JAX+CUDA image may lack, because the
# device machine has no network:
#   .whl/*.whl                  jllama's pure-Python runtime deps and theirs, and pytest (jax,
#                               jaxlib, flax, numpy, ml_dtypes come with the image); MarkupSafe, PyYAML
#                               have compiled wheels only, so one per CPython 3.10-3.13
#   .whl/requirements.txt       the names run_device_checks.sh installs (pip picks the wheel
#                               matching the device's Python from .whl)
#   .whl/llama.cpp-0c1e570.tar.gz  llama.cpp at 0c1e570 (the oracle's source, from the
#                               llama-cpp-python 0.3.36 sdist) trimmed to what a CUDA build of
#                               llama-bench and llama-server needs (73 MiB -> ~5.5 MiB)
#   .whl/vocab/                 ggml-vocab-llama-bpe.gguf, ggml-vocab-starcoder.gguf: the
#                               vocabularies bench_models.py gives its synthetic models
# Usage: bash experiments/gpu/prepare.sh [SDIST]   (SDIST: a local llama_cpp_python-0.3.36.tar.gz;
# default: /tmp/sdist/... if there, else pip downloads it). Idempotent; prints .whl's size.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHL=.whl
PY=${PYTHON:-python3}
mkdir -p "$WHL/vocab"

# pure-Python wheels (py3-none-any); --python-version 3.10 keeps them valid on older images
pure=(gguf jinja2 tqdm starlette uvicorn h11 anyio sniffio idna click typing_extensions
      requests urllib3 certifi charset_normalizer
      pytest pluggy iniconfig packaging pygments exceptiongroup tomli)  # the device's tests
# compiled ones: no pure wheel exists (MarkupSafe has a C speedup, PyYAML libyaml bindings)
compiled=(markupsafe pyyaml)
# (--implementation py --abi none --platform any: only py3-none-any tags match, so
# charset_normalizer comes as its pure wheel, not a compiled cp310 one)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
  --implementation py --abi none --platform any -d "$WHL" "${pure[@]}"
for v in 3.10 3.11 3.12 3.13; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$WHL" "${compiled[@]}"
done
printf '%s\n' "${pure[@]}" "${compiled[@]}" >"$WHL/requirements.txt"

# llama.cpp 0c1e570, trimmed
tarball="$WHL/llama.cpp-0c1e570.tar.gz"
if [ ! -s "$tarball" ] || [ ! -s "$WHL/vocab/ggml-vocab-starcoder.gguf" ]; then
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  sdist=${1:-/tmp/sdist/llama_cpp_python-0.3.36.tar.gz}
  if [ ! -s "$sdist" ]; then
    "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$work" \
      llama-cpp-python==0.3.36
    sdist="$work/llama_cpp_python-0.3.36.tar.gz"
  fi
  tar xzf "$sdist" -C "$work" llama_cpp_python-0.3.36/vendor/llama.cpp
  src="$work/llama.cpp-0c1e570"
  mv "$work/llama_cpp_python-0.3.36/vendor/llama.cpp" "$src"
  cp "$src"/models/ggml-vocab-llama-bpe.gguf "$src"/models/ggml-vocab-starcoder.gguf "$WHL/vocab/"
  # Left out: docs, models, tests, examples (LLAMA_BUILD_TESTS/EXAMPLES=OFF), CI, Python
  # (gguf-py, conversion), the web UI's sources (LLAMA_BUILD_UI is OFF and, offline,
  # LLAMA_USE_PREBUILT_UI=OFF: llama-server then embeds no UI), and every ggml backend but
  # CPU, CUDA and RPC: ggml_add_backend() only enters a backend's folder when it is enabled.
  # Checked on a CPU machine (2026-12-07): this tree configures and builds llama-bench and
  # llama-server with GGML_CUDA=OFF (both run; llama-server serves /v1/completions), and with
  # GGML_CUDA=ON cmake finds nvcc 13.0 and the toolkit and stops only at CUDA::cublas, which
  # that machine's toolkit lacks: the CUDA build itself is first tried on the device.
  (cd "$src" && rm -rf docs models tests examples pocs benches media .github .devops gguf-py \
     conversion ci skills requirements grammars convert_*.py \
     tools/ui/src tools/ui/tests tools/ui/static tools/ui/package-lock.json)
  for b in blas cann et hexagon hip metal musa opencl openvino sycl virtgpu vulkan webgpu \
           zdnn zendnn; do
    rm -rf "$src/ggml/src/ggml-$b"
  done
  tar czf "$tarball" -C "$work" llama.cpp-0c1e570
fi
du -sh "$tarball" "$WHL/vocab"
echo "wheels: $(find "$WHL" -maxdepth 1 -name '*.whl' | wc -l)"
du -sh "$WHL"
