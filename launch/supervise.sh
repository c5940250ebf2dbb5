#!/usr/bin/env bash
# Runs a launch command and restarts it when a rank dies; ds-train resumes from the latest complete
# checkpoint by itself (checkpoint.resume is on by default), so a restart continues the run.
#   bash launch/supervise.sh bash launch/single_node.sh RECIPE.yaml MACHINE.yaml [--a.b=c ...]
# Knobs: MAX_RESTARTS (default 3), RESTART_PAUSE (seconds before a restart, default 5), STOP_GRACE (seconds
# the rest of the job may run on after its first process ended or a signal was passed on, default 60;
# then the job is SIGKILLed).
#
# What gets a restart: a rank killed or lost (the deepspeed launcher exits with the dead rank's code,
# e.g. 247 for SIGKILL, or 2 when a surviving rank said "ds-train: rank N lost contact with the other
# ranks" first), a process group that could not form (a peer node not back yet), and any other failure
# that is not a refusal. What does not: exit 0 (done) and a refusal, i.e. exit 2 without one of those two
# lines (ds-train's "ds-train: ..." lines for a bad config, data or checkpoint; a launch script's one-line
# refusal; a usage error), or exit 126/127 (the command cannot be run): retrying cannot fix those.
# Those lines may carry pdsh's "host: " prefix (DeepSpeed's multi-node launcher).
# SIGTERM/SIGINT/SIGHUP to this script go to the whole job (ranks save a checkpoint and exit; SIGHUP is
# passed on as SIGTERM), then it stops. Every attempt ends only once all processes of the job have ended,
# so a restart never meets old ranks still saving or holding MASTER_PORT.
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh

[ $# -gt 0 ] || die "usage: supervise.sh COMMAND [ARGS...] (e.g. bash launch/single_node.sh RECIPE.yaml)"
MAX_RESTARTS=${MAX_RESTARTS:-3}
RESTART_PAUSE=${RESTART_PAUSE:-5}
STOP_GRACE=${STOP_GRACE:-60}
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'"
[[ "$RESTART_PAUSE" =~ ^[0-9]+$ ]] || die "RESTART_PAUSE must be a non-negative integer (seconds), got '$RESTART_PAUSE'"
[[ "$STOP_GRACE" =~ ^[0-9]+$ ]] || die "STOP_GRACE must be a non-negative integer (seconds), got '$STOP_GRACE'"

RETRYABLE='^([^ :]+: )?ds-train: (rank [0-9]+ lost contact with the other ranks|could not form the process group)'
errlog=$(mktemp)
child=""
stopping=0
stop_signal=""
signalled=0
trap 'rm -f "$errlog"' EXIT

# The job runs in a process group of its own, so that a signal reaches every process of it.
SETSID=$(command -v setsid || true)
signal_job() {  # signal: to the job's process group (or, until setsid has made it, its first process)
  if [ -n "$SETSID" ]; then kill "-$1" -- "-$child" 2>/dev/null || kill "-$1" "$child" 2>/dev/null
  else kill "-$1" "$child" 2>/dev/null; fi
}
job_alive() {  # any process of the job that has not ended
  [ -n "$SETSID" ] || { kill -0 "$child" 2>/dev/null; return; }
  kill -0 -- "-$child" 2>/dev/null || return 1
  [ -d /proc/self ] || return 0
  # A zombie counts as ended: an init that does not reap orphans (some containers) keeps them for good.
  local stat line fields
  for stat in /proc/[0-9]*/stat; do
    read -r line < "$stat" 2>/dev/null || continue
    fields=(${line##*) })  # after "PID (COMM) ": state, ppid, pgrp, ...
    [ "${fields[2]-}" = "$child" ] && [ "${fields[0]}" != Z ] && return 0
  done
  return 1
}
forward() {  # signal: pass it to the job, then stop restarting
  stopping=1 signalled=1 stop_signal=$1
  [ -n "$child" ] || return 0
  signal_job "$1"
}
trap 'forward TERM' TERM HUP  # a closed terminal or ssh session: stop as for TERM (ranks save and exit)
trap 'forward INT' INT

log() { echo "supervise.sh: $*" >&2; }

run_once() {  # runs "$@" in its own process group, its stderr copied to $errlog; returns its exit code
  local rc=1 tee_pid deadline
  exec {err_fd}> >(tee "$errlog" >&2)
  tee_pid=$!
  signalled=0
  # Without job control bash starts background commands with INT and QUIT ignored, and the job would
  # inherit that: restore them, or a forwarded SIGINT would not reach it.
  ( trap - INT QUIT; exec $SETSID "$@" 2>&"$err_fd" {err_fd}>&- ) &
  child=$!
  if [ "$stopping" -eq 1 ]; then  # a signal came while the job was being started: pass it on now
    signal_job "$stop_signal"; signalled=1
  else
    wait "$child" 2>/dev/null; rc=$?  # (2>/dev/null: no "Killed" notice from bash)
  fi
  # The rest of the job (ranks still saving a checkpoint) may outlive its first process, and a signal
  # cuts `wait` short: wait for every process of the job, at most STOP_GRACE s, then kill what is left.
  deadline=$((SECONDS + STOP_GRACE))
  while job_alive; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "the job still runs ${STOP_GRACE} s after it ended or was signalled (STOP_GRACE); killing it" \
        2>&"$err_fd"  # (the loop's own stderr is muted)
      signal_job KILL
      deadline=$((SECONDS + 5))  # (SIGKILL is not delayed; this only keeps the line from repeating)
    fi
    sleep 0.1
  done 2>/dev/null  # (no "Killed" notice from bash for the first process, reaped meanwhile)
  while [ "$signalled" -eq 1 ]; do  # `wait` was cut short: the job's own status
    signalled=0
    wait "$child" 2>/dev/null; local again=$?
    [ "$again" -eq 127 ] && break  # already collected: rc holds it
    rc=$again
  done
  child=""
  exec {err_fd}>&-
  for _ in $(seq 50); do kill -0 "$tee_pid" 2>/dev/null || break; sleep 0.1; done  # let tee drain
  kill "$tee_pid" 2>/dev/null  # a process that left the job's group may still hold the pipe
  return "$rc"
}

is_refusal() {  # exit code -> true when the job refused to run (retrying cannot help)
  [ "$1" -eq 2 ] && ! grep -Eq "$RETRYABLE" "$errlog"
}

restarts=0
rc=1  # (the exit code for a signal before the first attempt)
while :; do
  [ "$stopping" -eq 1 ] && { log "stopped by a signal; not restarting"; exit "$rc"; }
  run_once "$@"; rc=$?
  if [ "$rc" -eq 0 ]; then
    [ "$restarts" -gt 0 ] && log "finished after $restarts restart(s)"
    exit 0
  fi
  [ "$stopping" -eq 1 ] && { log "stopped by a signal (job exit code $rc); not restarting"; exit "$rc"; }
  if [ "$rc" -eq 126 ] || [ "$rc" -eq 127 ]; then  # the shell's "not executable" / "not found"
    log "the command could not be run (exit code $rc: not found or not executable, see above); not restarting"
    exit 2
  fi
  is_refusal "$rc" && { log "the job refused to run (exit code 2, see above); not restarting"; exit 2; }
  if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    log "gave up: the job failed (exit code $rc) after $restarts restart(s) (MAX_RESTARTS=$MAX_RESTARTS)"
    exit 2
  fi
  restarts=$((restarts + 1))
  log "the job failed (exit code $rc); restart $restarts of $MAX_RESTARTS in ${RESTART_PAUSE} s (resumes from the latest complete checkpoint)"
  sleep "$RESTART_PAUSE" & wait $!
  [ "$stopping" -eq 1 ] && kill $! 2>/dev/null  # cut short by a signal: the sleep would keep our output open
done
