#!/usr/bin/env bash
# Create .venv (if needed) and install jllama with the given extras, e.g. `scripts/setup.sh test,oracle`.
# Idempotent: a second run only checks. pip caches the llama-cpp-python wheel (the oracle, built
# from source on first install: ~7-10 min on 2 cores), so later set-ups take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
stamp=".venv/.jllama-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  note=""
  case ",$extras," in *,oracle,*) note=" (first time: the llama.cpp oracle compiles, ~10 min)";; esac
  echo "jllama: installing $spec into .venv$note" >&2
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" python -m pip install -q -e "$spec"
  touch "$stamp"
fi
