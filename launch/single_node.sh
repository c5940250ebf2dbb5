#!/usr/bin/env bash
# One node, N processes through the deepspeed launcher.
#   NUM_GPUS=8 bash launch/single_node.sh ds_configs/recipes/X.yaml ds_configs/machines/Y.yaml [--a.b=c ...]
# Knobs: NUM_GPUS (processes; on a CPU-only machine, CPU ranks over gloo; default: all GPUs, or 1),
#        MASTER_PORT (default 29500).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
PY=$(python_bin)
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
check_positive_int NUM_GPUS "$NUM_GPUS"
MASTER_PORT=${MASTER_PORT:-29500}
check_positive_int MASTER_PORT "$MASTER_PORT"
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" \
  --module ds_train.train "$@"
