#!/usr/bin/env bash
# One prepared run on a lent GPU machine (one H100, 16 cores, no network; see README.md here):
# everything in one call of at most BUDGET_S seconds (default 450: the call's timeout is 540,
# leaving the rest for pip, teardown and the copy back). Phases run in order of value, each
# under `timeout` and only if the time left allows its minimum; every result goes to $OUT, and
# $OUT/phases.md says what ran, for how long and with which exit status.
# Phase (max s, min s to start), in order; the planned total is ~420 s of the 450:
#   setup       llama.cpp 0c1e570's CUDA build starts in the background (12 cores, niced:
#               build_llamacpp_cuda.sh); offline wheels; nvidia-smi and versions     ~15
#   pallas      tests/test_pallas.py compiled for the GPU, matmul vs gguf-py first  (100, 30)
#   ragged      tests/test_ragged_paged_attention.py, the GPU ("loop") variant       (30, 15)
#   kbench      bench_pallas.py: 5 types at 1/16/512 rows on two Gemma-3 matrices    (35, 20)
#   models      bench_models.py: pp512/tg128, SmolLM2, Gemma 3, 1B/8B synthetic     (110, 40)
#   serve       serve_streams.py: jllama serve, SmolLM2-shaped file, 1/8/64 streams  (80, 30)
#   (waits for the build while more than 60 s are left)
#   lbench      llama-bench (CUDA) -p 512 -n 128 on the same files, if built         (60, 25)
#   serve_llama llama-server at 1/8/64 streams on the same file, if built            (40, 20)
#   serve1b     serve_streams.py on the 1B file (+ llama-server if built)            (75, 30)
#   e2e (60, 25), vision (40, 20), offload (60, 25): the earlier checks, if time is left
# Dry run on a CPU (no GPU phases' numbers mean anything, it checks the plumbing):
#   OUT=/tmp/out BUDGET_S=400 PHASE_CAP_S=30 DRY=1 bash experiments/gpu/run_device_checks.sh
# (DRY: no llama.cpp build unless DRY_BUILD=1; PHASE_CAP_S: at most that many seconds a phase;
# SKIP="pallas ragged ...": phases left out, e.g. for a second call on a still-warm machine;
# SERVE_N, STREAMS: serve_streams' tokens per request and levels; BENCH_MODELS: its script)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-450}
LAST_RC=""
# jllama's commands run on the CPU unless told (--platform or JAX_PLATFORMS): the model and
# server phases get the GPU first with the CPU beside it; the tests and scripts choose for
# themselves (some need the CPU backend too)
GPUENV=(env "JAX_PLATFORMS=cuda,cpu")
[ -n "${DRY:-}" ] && GPUENV=(env)
T0=$SECONDS
RESERVE=8  # seconds kept for the summary and stopping the build
MODELS=${MODELS_DIR:-/tmp/models}
LLAMA_BIN=$PWD/build-llamacpp-cuda/bin
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

left() { echo $(( BUDGET_S - (SECONDS - T0) - RESERVE )); }
printf '| phase | allowed s | used s | rc |\n|---|---:|---:|---:|\n' >"$OUT/phases.md"
# phase NAME MAX_S MIN_S LOG CMD...: runs CMD under `timeout` for min(MAX_S, time left), output
# to LOG, or skips it when less than MIN_S is left. SIGINT first: pytest then still prints its
# summary of what ran.
phase() {
  local name=$1 max=$2 min=$3 log=$4; shift 4
  case " ${SKIP:-} " in *" $name "*)
    LAST_RC=skipped; echo "== $name: skipped (SKIP)"
    echo "| $name | SKIP | 0 | - |" >>"$OUT/phases.md"; return 0;; esac
  local t; t=$(left); [ "$t" -gt "$max" ] && t=$max
  if [ -n "${PHASE_CAP_S:-}" ]; then  # dry runs: at most the cap, but at least the minimum
    local cap=$PHASE_CAP_S; [ "$cap" -lt "$min" ] && cap=$min
    [ "$t" -gt "$cap" ] && t=$cap
  fi
  if [ "$t" -lt "$min" ]; then
    LAST_RC=skipped; echo "== $name: skipped ($(left)s left, needs $min)"
    echo "| $name | skipped | 0 | - |" >>"$OUT/phases.md"; return 0
  fi
  echo "== $name (up to ${t}s, $(( SECONDS - T0 ))s in)"
  local s=$SECONDS
  timeout -s INT -k 10 "$t" "$@" >"$log" 2>&1
  local rc=$?
  LAST_RC=$rc
  echo "| $name | $t | $(( SECONDS - s )) | $rc |" >>"$OUT/phases.md"
  return 0
}
llama_built() { [ -x "$LLAMA_BIN/llama-bench" ] && [ -x "$LLAMA_BIN/llama-server" ]; }

# --- setup: the llama.cpp build in the background first (own process group: stopped at the
# end if unfinished), then the offline wheels (pip picks the ones for this Python)
BUILD_PID=""
if [ -z "${DRY:-}" ] || [ -n "${DRY_BUILD:-}" ]; then
  set -m
  bash experiments/gpu/build_llamacpp_cuda.sh >"$OUT/llamacpp_build.txt" 2>&1 &
  BUILD_PID=$!
  set +m
fi
if [ -s .whl/requirements.txt ]; then
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --find-links .whl \
       --target /tmp/site -r .whl/requirements.txt >"$OUT/pip.txt" 2>&1; then
    # no pip: unzip them all (MarkupSafe and PyYAML fall back to pure Python when their
    # compiled module is for another Python)
    "$PY" -c 'import glob, zipfile
for w in sorted(glob.glob(".whl/*.whl")): zipfile.ZipFile(w).extractall("/tmp/site")' \
      >>"$OUT/pip.txt" 2>&1
  fi
fi
export PYTHONPATH=/tmp/site:$PWD
stop_build() {
  if [ -n "$BUILD_PID" ] && kill -0 "$BUILD_PID" 2>/dev/null; then
    kill -- -"$BUILD_PID" 2>/dev/null
    echo "llama.cpp CUDA: stopped unfinished at $(( SECONDS - T0 ))s" >>"$OUT/llamacpp_build.txt"
  fi
}
trap stop_build EXIT
trap 'exit 143' TERM INT
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nproc; free -g | head -2; "$PY" --version; command -v nvcc cmake g++ ninja
  "$PY" -c "import jax, jaxlib, flax; print('jax', jax.__version__, 'jaxlib', \
jaxlib.__version__, 'flax', flax.__version__, jax.devices())"
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
case "$(cat "$OUT/gpu.txt")" in *CudaDevice*|*GpuDevice*) ;; *)
  [ -z "${DRY:-}" ] && echo "WARNING: JAX sees no GPU: the checks below run on the CPU";; esac

# --- 1-3: kernels
PYTEST=("$PY" -m pytest -p no:cacheprovider -v -rfE)
# 133 of its 185 tests: not the CPU-host lowering ones (checked here on every CI run) and the TPU
# attention variant (interpret mode on a GPU); pytest runs them in the order named, so the
# matmul against gguf-py and the attention come first if the time runs out
P=tests/test_pallas.py
phase pallas 100 30 "$OUT/pytest_pallas.txt" "${PYTEST[@]}" -k "not lowers and not pipelined" \
  "$P::test_qmatmul_matches_gguf_reference" "$P::test_decode_attention_matches_softmax" \
  "$P::test_qmatmul_quantized_weights_odd_n_in" "$P::test_qmatmul_real_model_weights" \
  "$P::test_qmatmul_multiply_reduce_up_to_16_rows" \
  "$P::test_decode_attention_empty_sequence_is_zero" "$P::test_take_rows_planes_matches_gguf_rows" \
  "$P::test_planes_roundtrip_gguf_dequantize" "$P::test_supported" \
  "$P::test_qmatmul_refuses_unsupported"
tail -4 "$OUT/pytest_pallas.txt" 2>/dev/null
phase ragged 30 15 "$OUT/pytest_ragged.txt" "${PYTEST[@]}" \
  tests/test_ragged_paged_attention.py -k "not lowers and not pipelined"
tail -3 "$OUT/pytest_ragged.txt" 2>/dev/null
# the types that matter most at decode (1, 16 rows) and one prefill size, on a 2.6 MB ffn
# matrix and the 335 MB-at-Q8_0 output matrix: %HBM per type and rows
phase kbench 35 20 "$OUT/bench_pallas.txt" "$PY" experiments/gpu/bench_pallas.py --reps 5 \
  --rows 1,16,512 --types Q4_0,Q4_K,Q6_K,Q8_0,IQ4_XS --shapes gemma3.ffn_up,gemma3.output
tail -3 "$OUT/bench_pallas.txt" 2>/dev/null

# --- 4-7: models, server, llama.cpp on the same files
mkdir -p "$MODELS"
lb=(); llama_built && lb=(--llama-bench "$LLAMA_BIN/llama-bench")
lb_done=""
BENCH_MODELS=${BENCH_MODELS:-experiments/gpu/bench_models.py}
if [ -f "$BENCH_MODELS" ]; then
  t=$(( $(left) - 10 )); [ "$t" -gt 95 ] && t=95
  phase models $((t + 15)) 40 "$OUT/models.txt" "${GPUENV[@]}" "$PY" "$BENCH_MODELS" \
    --vocab-dir .whl/vocab --workdir "$MODELS" --out "$OUT/models.md" --time-budget "$t" \
    "${lb[@]}"
  [ ${#lb[@]} -gt 0 ] && [ "$LAST_RC" = 0 ] && lb_done=1
  tail -20 "$OUT/models.txt" 2>/dev/null
else
  echo "== models: skipped, no $BENCH_MODELS in this tree"
fi
# the files serve_streams uses: bench_models' SmolLM2-shaped and 1B ones, else a 4-block
# 1B-shaped F16 file written here (seconds)
pick() { find "$MODELS" -maxdepth 1 -name "$1" 2>/dev/null | sort | head -1; }
small=$(pick 'smollm2*q4*.gguf'); [ -n "$small" ] || small=$(pick 'smollm2*.gguf')
big=$(pick 'llama-3.2-1b*q4*.gguf'); [ -n "$big" ] || big=$(pick 'llama-3.2-1b*.gguf')
if [ -z "$small" ]; then
  small=$MODELS/fallback-1b-4blocks.gguf
  timeout 90 "${GPUENV[@]}" "$PY" -m jllama synth llama-3.2-1b "$small" --layers 4 \
    --vocab .whl/vocab \
    >"$OUT/synth_fallback.txt" 2>&1 || small=""
fi
ls -la "$MODELS" >"$OUT/models_files.txt" 2>&1
SERVE_N=${SERVE_N:-128} STREAMS=${STREAMS:-1,8,64}
if [ -n "$small" ]; then
  phase serve 80 30 "$OUT/serve_small.txt" "${GPUENV[@]}" "$PY" experiments/gpu/serve_streams.py \
    "$small" \
    --streams "$STREAMS" -n "$SERVE_N" --time-budget 70 --out "$OUT/serve_small.md"
  tail -6 "$OUT/serve_small.txt" 2>/dev/null
fi
# llama-bench on the same files (unless bench_models already ran it), then llama-server at the
# same streams: waits for the build while more than 60 s are left
if [ -n "$BUILD_PID" ]; then
  while ! llama_built && kill -0 "$BUILD_PID" 2>/dev/null && [ "$(left)" -gt 60 ]; do sleep 5; done
fi
if llama_built; then
  if [ -z "$lb_done" ]; then
    mapfile -t files < <(find "$MODELS" -maxdepth 1 -name '*.gguf' | sort)
    margs=(); for f in "${files[@]}"; do margs+=(-m "$f"); done
    [ ${#margs[@]} -gt 0 ] && phase lbench 60 25 "$OUT/llama_bench.txt" "$LLAMA_BIN/llama-bench" \
      "${margs[@]}" -p 512 -n 128 -ngl 99 -r 2 -o md
    grep '^|' "$OUT/llama_bench.txt" 2>/dev/null
  fi
  [ -n "$small" ] && phase serve_llama 40 20 "$OUT/serve_small_llama.txt" "$PY" \
    experiments/gpu/serve_streams.py "$small" --streams "$STREAMS" -n "$SERVE_N" --no-jllama \
    --time-budget 35 --llama-server "$LLAMA_BIN/llama-server" --out "$OUT/serve_small_llama.md"
else
  echo "== lbench: skipped, llama.cpp not built: $(tail -1 "$OUT/llamacpp_build.txt" 2>/dev/null)"
fi
stop_build
if [ -n "$big" ]; then
  ls_arg=(); llama_built && ls_arg=(--llama-server "$LLAMA_BIN/llama-server")
  phase serve1b 75 30 "$OUT/serve_1b.txt" "${GPUENV[@]}" "$PY" experiments/gpu/serve_streams.py \
    "$big" \
    --streams "$STREAMS" -n "$SERVE_N" --time-budget 65 "${ls_arg[@]}" --out "$OUT/serve_1b.md"
  tail -6 "$OUT/serve_1b.txt" 2>/dev/null
fi

# --- 8-10: earlier checks, with what is left
phase e2e 60 25 "$OUT/e2e.txt" "$PY" experiments/gpu/e2e_gpu.py --types Q4_0,Q8_0 -r 2
phase vision 40 20 "$OUT/vision.txt" "$PY" experiments/gpu/vision_gpu.py
# partial offload (-ngl): speed and logits per split, and a model twice the allowed device memory
phase offload 60 25 "$OUT/offload.txt" "$PY" experiments/gpu/offload_gpu.py -p 128 -n 32 -r 1 \
  --mem-fraction 0.02
echo "== done in $(( SECONDS - T0 ))s"
cat "$OUT/phases.md"
tail -2 "$OUT/llamacpp_build.txt" 2>/dev/null
