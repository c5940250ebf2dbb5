#!/usr/bin/env bash
# The test command of the README: sets up ./.venv on a fresh machine, then runs the tests on the CPU.
#   bash tests/run.sh                      the whole suite (what CI runs; the `gpu` tests are deselected)
#   bash tests/run.sh -m "not slow"        the quick loop: no test that starts ranks or launchers
#   bash tests/run.sh tests/test_config.py -x   arguments go to pytest as they are
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
# `gpu` tests need CUDA devices and run by their own command (README, "Multi-GPU / multi-node proof
# run"): deselected here, also inside a caller's -m expression; paths default to testpaths (tests/).
args=() expr=""
while [ $# -gt 0 ]; do
  case $1 in
    -m) expr=$2; shift 2 ;;
    -m*) expr=${1#-m}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
expr=${expr:+($expr) and }"not gpu"
exec .venv/bin/python -m pytest -q -p no:cacheprovider -m "$expr" ${args[@]+"${args[@]}"}
