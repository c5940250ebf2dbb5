#!/usr/bin/env bash
# The test command of the README: sets up ./.venv on a fresh machine, then runs the suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/bootstrap.sh
# DeepSpeed's CPU shared-memory all-reduce buffers (66 MB each in /dev/shm, never unlinked) that runs of
# ds_train before it kept that op off left behind: those no process maps any more are removed.
mapped=$(cat /proc/[0-9]*/maps 2>/dev/null | grep -o '/dev/shm/deepspeed_allreduce_buffer_[^ ]*' | sort -u || true)
for f in /dev/shm/deepspeed_allreduce_buffer_"$(id -u)"_*; do
  [ -e "$f" ] && ! grep -qxF "$f" <<< "$mapped" && rm -f "$f"
done
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
