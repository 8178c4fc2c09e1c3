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
# One pytest worker per core, at most 4 (each holds a JAX runtime and the oracle: ~5 GB at
# peak); whole files per worker, so module fixtures (tiny models, servers) are built once.
# Files go out in collection order, where tests/conftest.py puts the longest first (LONG_FILES),
# not in xdist's default order (most tests first), which left a minutes-long file with few tests
# to run alone at the end. Arguments after ours win (e.g. `-n 0` for one process).
n=$(nproc 2>/dev/null || echo 1); [ "$n" -gt 4 ] && n=4
exec python -m pytest -q -n "$n" --dist loadfile --no-loadscope-reorder "$@"
