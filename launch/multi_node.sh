#!/usr/bin/env bash
# Several nodes through the deepspeed launcher and a hostfile ("hostname slots=N" per line).
#   HOSTFILE=hosts MASTER_ADDR=node0 bash launch/multi_node.sh RECIPE.yaml MACHINE.yaml [--a.b=c ...]
# Default form: run on the first node; the launcher reaches the others by passwordless ssh (pdsh).
# Per-node form (no ssh): run this on every node with NODE_RANK=0..N-1 set; each starts its own ranks.
# Knobs: HOSTFILE (required), MASTER_ADDR (required: address of node 0), MASTER_PORT (29500),
#        NODE_RANK (set = per-node --no_ssh form), LAUNCHER (pdsh|openmpi|mpich|slurm, ssh form only).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
PY=$(python_bin)
[ -n "${HOSTFILE:-}" ] || die "set HOSTFILE=path (lines 'hostname slots=N')"
[ -n "${MASTER_ADDR:-}" ] || die "set MASTER_ADDR to the address of the first node"
MASTER_PORT=${MASTER_PORT:-29500}
nodes=$(check_hostfile "$HOSTFILE")
check_master "$MASTER_ADDR" "$MASTER_PORT"
# A rank that cannot reach the master gives up after this many seconds instead of hanging.
export DS_TRAIN_DIST_TIMEOUT=${DS_TRAIN_DIST_TIMEOUT:-300}
args=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [ -n "${NODE_RANK:-}" ]; then
  [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$nodes" ] \
    || die "NODE_RANK=$NODE_RANK is not in 0..$((nodes - 1)) for the $nodes hosts of $HOSTFILE"
  args+=(--no_ssh --node_rank "$NODE_RANK")
else
  args+=(--launcher "${LAUNCHER:-pdsh}")
fi
exec "$PY" -m deepspeed.launcher.runner "${args[@]}" --module ds_train.train "$@"
