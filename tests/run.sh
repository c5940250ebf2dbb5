#!/usr/bin/env bash
# The test command of the README: sets up ./.venv on a fresh machine, then runs the suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/bootstrap.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
