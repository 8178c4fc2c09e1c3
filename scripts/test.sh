#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up (with the llama.cpp oracle and server extras),
# lint, then pytest. Tests that need ../shared/data find it via JLLAMA_SHARED_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,oracle
. .venv/bin/activate
export JLLAMA_SHARED_DATA="${JLLAMA_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
ruff check .
exec python -m pytest -q "$@"
