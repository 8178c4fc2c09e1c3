#!/usr/bin/env bash
# Builds llama.cpp 0c1e570's llama-bench and llama-server with CUDA (sm_90, the H100) from the
# trimmed source prepare.sh put in .whl/, on the device machine (no network), into
# build-llamacpp-cuda/ (ignored; it survives between calls while the machine stays warm, so a
# second call finds the tools built). Flags follow /work/shared/tools/build-llamacpp.sh (no
# AMX: SIGILL in VMs; no curl/openssl: offline) plus: no web UI (LLAMA_USE_PREBUILT_UI would
# download it), CUDA only for sm_90.
# Meant to start in the background at the top of run_device_checks.sh:
#   bash experiments/gpu/build_llamacpp_cuda.sh >"$OUT/llamacpp_build.txt" 2>&1 &
# The compiler output goes to $OUT/llamacpp_build.log; the last line printed is either
#   "llama.cpp CUDA: built DIR/bin in Ns" or one line saying what is missing or what failed.
# Exits 0 when a tool is missing (nvcc, cmake, a C++ compiler, the tarball): the other checks go on.
# Env: JOBS (default: nproc - 4, leaving cores to the GPU tests' compiles), OUT, LLAMACPP_CUDA_ARCH
# (default 90), LLAMACPP_CMAKE_ARGS (extra flags). Also works with GGML_CUDA=OFF through
# LLAMACPP_CUDA=OFF (the CPU smoke test of this script); LLAMACPP_CONFIGURE_ONLY=1 stops after
# cmake's configure step.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
dest=$PWD/build-llamacpp-cuda
tarball=$PWD/.whl/llama.cpp-0c1e570.tar.gz
log=$OUT/llamacpp_build.log
t0=$SECONDS
if [ -x "$dest/bin/llama-bench" ] && [ -x "$dest/bin/llama-server" ]; then
  echo "llama.cpp CUDA: built $dest/bin (already there)"; exit 0
fi
[ -s "$tarball" ] || { echo "llama.cpp CUDA: skipped, no $tarball (run experiments/gpu/prepare.sh)"; exit 0; }
command -v cmake >/dev/null || { echo "llama.cpp CUDA: skipped, no cmake on this machine"; exit 0; }
cxx=${CXX:-$(command -v g++ || command -v c++ || command -v clang++ || true)}
[ -n "$cxx" ] || { echo "llama.cpp CUDA: skipped, no C++ compiler (g++/c++/clang++)"; exit 0; }

cuda_args=()
if [ "${LLAMACPP_CUDA:-ON}" = ON ]; then
  # A toolkit = nvcc with cuda_runtime.h and cublas_v2.h beside it: the one on PATH (through
  # wrapper scripts), /usr/local/cuda*, /opt/cuda; else one assembled from pip's nvidia-*-cu1x
  # wheels (what jax[cuda] installs: nvcc, headers and libraries in separate packages).
  has_headers() { [ -e "$1/include/cublas_v2.h" ] || [ -e "$1/targets/x86_64-linux/include/cublas_v2.h" ]; }
  cuda_root="" cands=()
  p=$(command -v nvcc || true)
  if [ -n "$p" ]; then
    cands+=("$(dirname "$(dirname "$(readlink -f "$p")")")")
    # a wrapper script (exec /usr/local/cuda-X/bin/nvcc "$@"): the toolkit it calls
    w=$(grep -aom1 '/[^ "]*/bin/nvcc' "$p" 2>/dev/null || true)
    [ -n "$w" ] && cands+=("$(dirname "$(dirname "$w")")")
  fi
  for c in /usr/local/cuda /usr/local/cuda-* /opt/cuda; do cands+=("$c"); done
  missing_cublas=""
  for c in "${cands[@]}"; do
    [ -x "$c/bin/nvcc" ] || continue
    if has_headers "$c"; then cuda_root=$c; break; fi
    missing_cublas=$c
  done
  extra_cuda=()
  if [ -z "$cuda_root" ]; then
    nvroot=$(python3 -c 'import importlib.util as u; s = u.find_spec("nvidia"); print(list(s.submodule_search_locations)[0] if s else "")' 2>/dev/null || true)
    if [ -n "$nvroot" ] && [ -x "$nvroot/cuda_nvcc/bin/nvcc" ] && [ -d "$nvroot/cublas" ]; then
      # nvcc finds its tools and headers relative to its own (real) path, so bin/ is copied;
      # the rest are links; cmake's find_library wants unversioned .so names
      cuda_root=$dest/cuda-pip
      rm -rf "$cuda_root"; mkdir -p "$cuda_root/include" "$cuda_root/lib64"
      cp -a "$nvroot/cuda_nvcc/bin" "$cuda_root/bin"
      ln -s "$nvroot/cuda_nvcc/nvvm" "$cuda_root/nvvm"
      for pkg in "$nvroot"/*/; do
        for f in "$pkg"include/*; do [ -e "$f" ] && ln -sfn "$f" "$cuda_root/include/"; done
        for f in "$pkg"lib/*.so*; do
          [ -e "$f" ] || continue
          ln -sfn "$f" "$cuda_root/lib64/"
          base=$(basename "$f"); ln -sfn "$f" "$cuda_root/lib64/${base%%.so*}.so"
        done
      done
      drv=$(ldconfig -p 2>/dev/null | grep -om1 '/[^ ]*/libcuda\.so\.1' || true)
      [ -n "$drv" ] && ln -sfn "$drv" "$cuda_root/lib64/libcuda.so"
      # the wheels carry no libcudart_static.a
      extra_cuda=(-DCMAKE_CUDA_RUNTIME_LIBRARY=Shared "-DCMAKE_LIBRARY_PATH=$cuda_root/lib64")
      echo "toolkit assembled from pip's nvidia wheels under $nvroot (not tested before the device run)"
    elif [ -n "$missing_cublas" ]; then
      echo "llama.cpp CUDA: skipped, nvcc in $missing_cublas but no cuBLAS headers (cublas_v2.h)"; exit 0
    else
      echo "llama.cpp CUDA: skipped, no nvcc (PATH, /usr/local/cuda*, /opt/cuda, pip nvidia-cuda-nvcc)"; exit 0
    fi
  fi
  nvcc=$cuda_root/bin/nvcc
  echo "nvcc: $nvcc ($("$nvcc" --version | tail -2 | head -1))"
  PATH="$cuda_root/bin:$PATH"; export PATH CUDACXX=$nvcc
  cuda_args=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${LLAMACPP_CUDA_ARCH:-90}"
             "-DCUDAToolkit_ROOT=$cuda_root" "${extra_cuda[@]}")
fi

jobs=${JOBS:-$(( $(nproc) > 6 ? $(nproc) - 4 : $(nproc) ))}
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
isa=""
grep -q avx512f /proc/cpuinfo && isa="-DGGML_AVX512=ON"
grep -q avx512_vnni /proc/cpuinfo && isa="$isa -DGGML_AVX512_VNNI=ON"
grep -q avx512_bf16 /proc/cpuinfo && isa="$isa -DGGML_AVX512_BF16=ON"
mkdir -p "$dest"
# a build cut short on a still-warm machine resumes where it stopped
if [ ! -d "$dest/src" ]; then
  if ! tar xzf "$tarball" -C "$dest" || ! mv "$dest/llama.cpp-0c1e570" "$dest/src"; then
    echo "llama.cpp CUDA: failed to unpack $tarball"; exit 1
  fi
fi
echo "configure: cxx=$cxx jobs=$jobs ${gen[*]} ${cuda_args[*]}"
# shellcheck disable=SC2086
nice -n 5 cmake -S "$dest/src" -B "$dest/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER="$cxx" -DGGML_NATIVE=OFF \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON $isa \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON \
  "${cuda_args[@]}" ${LLAMACPP_CMAKE_ARGS:-} >"$log" 2>&1 \
  || { tail -20 "$log"; echo "llama.cpp CUDA: cmake configure failed (see llamacpp_build.log)"; exit 1; }
echo "configured in $((SECONDS - t0))s"
[ -n "${LLAMACPP_CONFIGURE_ONLY:-}" ] && exit 0
nice -n 5 cmake --build "$dest/build" -j"$jobs" --target llama-bench llama-server >>"$log" 2>&1 \
  || { tail -20 "$log"; echo "llama.cpp CUDA: build failed after $((SECONDS - t0))s (see llamacpp_build.log)"; exit 1; }
ln -sfn build/bin "$dest/bin"
"$dest/bin/llama-bench" --help >/dev/null 2>&1 \
  || { echo "llama.cpp CUDA: built but llama-bench does not start"; exit 1; }
echo "llama.cpp CUDA: built $dest/bin in $((SECONDS - t0))s"
