#!/usr/bin/env bash
# Runs a launch command and restarts it when a rank dies; ds-train resumes from the latest complete
# checkpoint by itself (checkpoint.resume is on by default), so a restart continues the run.
#   bash launch/supervise.sh bash launch/single_node.sh RECIPE.yaml MACHINE.yaml [--a.b=c ...]
# Knobs: MAX_RESTARTS (default 3), RESTART_PAUSE (seconds before a restart, default 5).
#
# What gets a restart: a rank killed or lost (the deepspeed launcher exits with the dead rank's code,
# e.g. 247 for SIGKILL, or 2 when a surviving rank said "ds-train: rank N lost contact with the other
# ranks" first), a process group that could not form (a peer node not back yet), and any other failure
# that is not a refusal. What does not: exit 0 (done) and a refusal, i.e. exit 2 without one of those two
# lines (ds-train's "ds-train: ..." lines for a bad config, data or checkpoint; a launch script's one-line
# refusal; a usage error): retrying cannot fix those.
# SIGTERM/SIGINT to this script go to the whole job (ranks save a checkpoint and exit), then it stops.
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh

[ $# -gt 0 ] || die "usage: supervise.sh COMMAND [ARGS...] (e.g. bash launch/single_node.sh RECIPE.yaml)"
MAX_RESTARTS=${MAX_RESTARTS:-3}
RESTART_PAUSE=${RESTART_PAUSE:-5}
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'"
[[ "$RESTART_PAUSE" =~ ^[0-9]+$ ]] || die "RESTART_PAUSE must be a non-negative integer (seconds), got '$RESTART_PAUSE'"

RETRYABLE='^ds-train: (rank [0-9]+ lost contact with the other ranks|could not form the process group)'
errlog=$(mktemp)
child=""
stopping=0
signalled=0
trap 'rm -f "$errlog"' EXIT

# The job runs in a process group of its own, so that a signal reaches every process of it.
SETSID=$(command -v setsid || true)
forward() {  # signal: pass it to the job, then stop restarting
  stopping=1 signalled=1
  [ -n "$child" ] || return 0
  if [ -n "$SETSID" ]; then kill "-$1" -- "-$child" 2>/dev/null; else kill "-$1" "$child" 2>/dev/null; fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT

log() { echo "supervise.sh: $*" >&2; }

run_once() {  # runs "$@" in its own process group, its stderr copied to $errlog; returns its exit code
  local rc tee_pid
  exec {err_fd}> >(tee "$errlog" >&2)
  tee_pid=$!
  signalled=0
  $SETSID "$@" 2>&"$err_fd" {err_fd}>&- &
  child=$!
  wait "$child" 2>/dev/null; rc=$?  # (2>/dev/null: no "Killed" notice from bash)
  while [ "$signalled" -eq 1 ]; do  # a trapped signal cuts `wait` short: wait for the job's own status
    signalled=0
    wait "$child" 2>/dev/null; local again=$?
    [ "$again" -eq 127 ] && break  # already collected: rc holds it
    rc=$again
  done
  child=""
  exec {err_fd}>&-
  for _ in $(seq 50); do kill -0 "$tee_pid" 2>/dev/null || break; sleep 0.1; done  # let tee drain
  kill "$tee_pid" 2>/dev/null  # a stray process of the job may still hold the pipe
  return "$rc"
}

is_refusal() {  # exit code -> true when the job refused to run (retrying cannot help)
  [ "$1" -eq 2 ] && ! grep -Eq "$RETRYABLE" "$errlog"
}

restarts=0
while :; do
  run_once "$@"; rc=$?
  if [ "$rc" -eq 0 ]; then
    [ "$restarts" -gt 0 ] && log "finished after $restarts restart(s)"
    exit 0
  fi
  [ "$stopping" -eq 1 ] && { log "stopped by a signal (job exit code $rc); not restarting"; exit "$rc"; }
  is_refusal "$rc" && { log "the job refused to run (exit code 2, see above); not restarting"; exit 2; }
  if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    log "gave up: the job failed (exit code $rc) after $restarts restart(s) (MAX_RESTARTS=$MAX_RESTARTS)"
    exit 2
  fi
  restarts=$((restarts + 1))
  log "the job failed (exit code $rc); restart $restarts of $MAX_RESTARTS in ${RESTART_PAUSE} s (resumes from the latest complete checkpoint)"
  sleep "$RESTART_PAUSE" & wait $!
  [ "$stopping" -eq 1 ] && { log "stopped by a signal; not restarting"; exit "$rc"; }
done
