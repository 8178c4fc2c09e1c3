#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up (with the test and llama.cpp oracle extras),
# lint, then pytest. Test data comes from JLLAMA_SHARED_DATA (../shared/data) where it exists, else
# from tests/data (vendored) and PyPI (llama.cpp's vocab files, cached): see tests/testdata.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,oracle
. .venv/bin/activate
export JLLAMA_SHARED_DATA="${JLLAMA_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
ruff check .
exec python -m pytest -q "$@"
