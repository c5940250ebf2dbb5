#!/usr/bin/env bash
# Under MPI: mpirun starts the ranks; ds_train discovers rank, world size and master through mpi4py.
#   NP=16 HOSTFILE=hosts bash launch/mpi.sh RECIPE.yaml MACHINE.yaml [--a.b=c ...]
# Knobs: NP (total ranks, required), HOSTFILE (optional, MPI's own format), MPIRUN (default: mpirun on
#        PATH, else the one pip's mpich put into the venv), MPI_ARGS (extra mpirun arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
PY=$(python_bin)
[ -n "${NP:-}" ] || die "set NP to the total number of ranks"
check_positive_int NP "$NP"
MPIRUN=${MPIRUN:-$(command -v mpirun || command -v mpiexec || echo "$(dirname "$PY")/mpiexec")}
[ -x "$MPIRUN" ] || command -v "$MPIRUN" >/dev/null || die "no mpirun found (install an MPI or 'pip install mpich')"
"$PY" -c 'from mpi4py import MPI' 2>/dev/null || die "mpi4py cannot load an MPI library (pip install mpich mpi4py)"
args=(-np "$NP")
[ -n "${HOSTFILE:-}" ] && { [ -f "$HOSTFILE" ] || die "hostfile '$HOSTFILE' not found"; args+=(-hostfile "$HOSTFILE"); }
export DS_TRAIN_DIST_TIMEOUT=${DS_TRAIN_DIST_TIMEOUT:-300} DS_TRAIN_CONVERT_TIMEOUT=${DS_TRAIN_CONVERT_TIMEOUT:-7200}
if "$MPIRUN" --version 2>&1 | grep -qi "open mpi"; then  # Open MPI passes on only the variables named
  args+=(--allow-run-as-root -x PATH -x PYTHONPATH -x DS_ACCELERATOR -x DS_TRAIN_DIST_TIMEOUT
             -x DS_TRAIN_CONVERT_TIMEOUT)
fi
# shellcheck disable=SC2086
exec "$MPIRUN" "${args[@]}" ${MPI_ARGS:-} "$PY" -m ds_train.train "$@"
