"""launch/supervise.sh on the CPU: a rank SIGKILLed mid-run through `launch/single_node.sh` (two gloo
ranks) is restarted by the supervisor, the run resumes from its checkpoint by itself, ends at max_steps,
and its losses equal an uninterrupted world-size-2 run's (plain PyTorch, tests/test_train.py); a
configuration refusal, or a command that cannot be run, is never restarted; the restarts are bounded;
a signal (SIGTERM or SIGINT) stops the job, not just the supervisor; an attempt ends only once every
process of the job has ended (a stubborn one is killed after STOP_GRACE).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ds_train.distributed import free_port
from tests.test_faults import _finish, _rank_process, _resumed_step, _wait_for_step
from tests.test_launch import _env
from tests.test_train import ROOT, losses, overrides, reference_losses

pytestmark = pytest.mark.slow  # every test here starts processes (launchers, ranks, supervisors)

SETTINGS = {"train__max_steps": 8, "checkpoint__every_steps": 2, "data__trace_ids": "true"}
SUPERVISE = ["bash", "launch/supervise.sh"]


def _supervised(cmd: list[str], **env: str) -> subprocess.Popen:
    """`supervise.sh CMD` in its own session (as tests/test_faults.py starts a job), output merged."""
    return subprocess.Popen([*SUPERVISE, *cmd], cwd=ROOT, env=_env(**{"RESTART_PAUSE": "1", **env}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _supervisor_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("supervise.sh:")]


def test_killed_rank_is_restarted_and_the_run_matches_an_uninterrupted_one(tmp_path):
    """Rank 1 SIGKILLed after its step 3 (test_faults' mechanism: poll the `_id` trace, kill the rank's
    process): the supervisor restarts the launch, the run resumes and its losses are the reference's."""
    run_dir = tmp_path / "run"
    proc = _supervised(["bash", "launch/single_node.sh", *overrides(run_dir, **SETTINGS)],
                       NUM_GPUS="2", MASTER_PORT=str(free_port()))
    _wait_for_step(proc, run_dir, rank=1, step=3, seen_before=0)  # step-2 is saved before step 3 starts
    _rank_process(proc, 1).send_signal(signal.SIGKILL)
    out = _finish(proc, timeout=300)

    assert proc.returncode == 0, out[-3000:]
    lines = _supervisor_lines(out)
    assert len(lines) == 2, lines
    assert lines[0].startswith("supervise.sh: the job failed (exit code ")
    assert "restart 1 of 3" in lines[0]
    assert lines[1] == "supervise.sh: finished after 1 restart(s)"
    assert 2 <= _resumed_step(out) < SETTINGS["train__max_steps"]
    assert "Traceback" not in out

    got = losses(run_dir)  # the last line of each step: the resumed run's where it re-trained one
    assert sorted(got) == list(range(1, 9))
    ref = reference_losses(run_dir, world_size=2, steps=8, **SETTINGS)
    assert [got[s] for s in range(1, 9)] == pytest.approx(ref, rel=2e-5)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-8"


def test_configuration_refusal_is_not_restarted(tmp_path):
    """ds-train refuses an unknown key with its `ds-train:` line and exit 2: one attempt, exit 2.
    (Through the deepspeed launcher the code is the same: it exits with the failing rank's code.)"""
    proc = _supervised([sys.executable, "-m", "ds_train.train", *overrides(tmp_path / "run"), "--train.max_step=3"])
    out = _finish(proc, timeout=120)
    assert proc.returncode == 2
    assert [ln for ln in out.splitlines() if ln.startswith("ds-train:")] == [
        ("ds-train: unknown config key 'train.max_step' (known here: deepspeed, global_batch_size, grad_accum, "
         "log_every, max_steps, micro_batch_size, nonfinite, nonfinite_limit, precision, stop_at_step)")]
    assert _supervisor_lines(out) == [
        "supervise.sh: the job refused to run (exit code 2, see above); not restarting"]
    assert not (tmp_path / "run").exists()


def test_launch_script_refusal_is_not_restarted():
    proc = _supervised(["bash", "launch/single_node.sh"], NUM_GPUS="0")
    out = _finish(proc, timeout=60)
    assert proc.returncode == 2
    assert out.splitlines() == [
        "single_node.sh: NUM_GPUS must be a positive integer, got '0'",
        "supervise.sh: the job refused to run (exit code 2, see above); not restarting",
    ]


@pytest.mark.parametrize("prefix", ["", "node-2: "])
def test_exit_2_from_a_lost_peer_is_restarted(tmp_path, monkeypatch, prefix):
    """The launcher may report the surviving rank's exit 2 instead of the dead rank's code: ds-train's own
    lost-peer line (made by `ds_train.distributed`, as a rank prints it) marks it as a failure to retry;
    under pdsh (DeepSpeed's multi-node launcher) the line carries its "host: " prefix."""
    from ds_train.distributed import lost_peer_message

    monkeypatch.setenv("RANK", "1")  # as in a rank started by the launcher
    line = prefix + "ds-train: " + lost_peer_message(RuntimeError("Connection closed by peer [127.0.0.1]:1234"))
    tries = tmp_path / "tries"
    job = f"echo x >> {tries}; echo {shlex.quote(line)} >&2; [ $(wc -l < {tries}) -ge 2 ] || exit 2"
    proc = _supervised(["bash", "-c", job], RESTART_PAUSE="0")
    out = _finish(proc, timeout=60)
    assert proc.returncode == 0, out
    assert len(tries.read_text().splitlines()) == 2
    assert _supervisor_lines(out) == [
        ("supervise.sh: the job failed (exit code 2); restart 1 of 3 in 0 s (resumes from the latest complete "
         "checkpoint)"),
        "supervise.sh: finished after 1 restart(s)"]


@pytest.mark.parametrize("what", ["missing", "not executable"])
def test_a_command_that_cannot_run_is_not_restarted(tmp_path, what):
    """Exit 127 (not found) or 126 (not executable): one attempt, one line, exit 2."""
    command = tmp_path / "train.sh"
    if what == "not executable":
        command.write_text("exit 0\n")
    proc = _supervised([str(command)])
    out = _finish(proc, timeout=20)
    assert proc.returncode == 2, out
    code = 127 if what == "missing" else 126
    assert _supervisor_lines(out) == [
        (f"supervise.sh: the command could not be run (exit code {code}: not found or not executable, see above); "
         "not restarting")]
    assert len([ln for ln in out.splitlines() if str(command) in ln]) == 1, out  # the one attempt's complaint


def test_restarts_are_bounded(tmp_path):
    """A job that dies by SIGKILL every time: 1 + MAX_RESTARTS attempts, then one line and exit 2."""
    tries = tmp_path / "tries"
    job = f"echo x >> {tries}; kill -KILL $$"
    proc = _supervised(["bash", "-c", job], MAX_RESTARTS="2", RESTART_PAUSE="0")
    out = _finish(proc, timeout=60)
    assert proc.returncode == 2
    assert len(tries.read_text().splitlines()) == 3
    lines = _supervisor_lines(out)
    assert lines[-1] == "supervise.sh: gave up: the job failed (exit code 137) after 2 restart(s) (MAX_RESTARTS=2)"
    assert len(lines) == 3


def test_sigterm_reaches_the_job_and_stops_the_supervisor(tmp_path):
    """SIGTERM to the supervisor goes to the job's whole process group (a grandchild too); no restart."""
    marker = tmp_path / "term"
    job = f"trap 'echo term > {marker}; exit 1' TERM; {sys.executable} -c 'import time; time.sleep(60)' & wait"
    proc = _supervised(["bash", "-c", job])
    deadline = time.monotonic() + 30
    while not (sleepers := [c for c in psutil.Process(proc.pid).children(recursive=True)
                            if _cmdline(c).startswith(f"{sys.executable} -c")]):  # not the bash that starts it
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    out = _finish(proc, timeout=30)
    assert marker.read_text() == "term\n"
    assert proc.returncode == 1
    assert _supervisor_lines(out) == ["supervise.sh: stopped by a signal (job exit code 1); not restarting"]
    _, alive = psutil.wait_procs(sleepers, timeout=5)
    assert not alive, "the job's grandchild outlived the supervisor"


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # ended (or a zombie) while we looked
        return ""


def _wait_for(path, proc: subprocess.Popen) -> None:  # the stand-in job's file that says it is ready
    deadline = time.monotonic() + 15
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"not ready: {_finish(proc, timeout=5)}"
        time.sleep(0.05)


def _gone(pid: int) -> bool:  # ended (a zombie has: this machine's init may never reap it)
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sigint_reaches_the_job_and_stops_the_supervisor(tmp_path):
    """SIGINT (Ctrl-C) is passed on: the job gets its KeyboardInterrupt, exits; no restart. (A background
    command of a shell without job control starts with SIGINT ignored; the job must not inherit that.)"""
    ready, marker = tmp_path / "ready", tmp_path / "int"
    job = tmp_path / "job.py"
    job.write_text(f"""import pathlib, sys, time
pathlib.Path({str(ready)!r}).touch()
try:
    time.sleep(60)
except KeyboardInterrupt:
    pathlib.Path({str(marker)!r}).write_text("int\\n")
    sys.exit(1)
""")
    proc = _supervised([sys.executable, str(job)])
    _wait_for(ready, proc)
    os.kill(proc.pid, signal.SIGINT)
    out = _finish(proc, timeout=20)
    assert marker.read_text() == "int\n", out
    assert proc.returncode == 1
    assert _supervisor_lines(out) == ["supervise.sh: stopped by a signal (job exit code 1); not restarting"]


def test_a_stop_waits_for_the_rest_of_the_job(tmp_path):
    """After SIGTERM the job's first process ends at once while another process of it (a rank still
    saving its checkpoint) needs 7 s more: the supervisor exits only after that one, its late stderr line
    still copied through."""
    ready, saved = tmp_path / "ready", tmp_path / "saved"
    job = f"""trap 'exit 1' TERM
saver() {{
  trap 'sleep 7; echo saved > {saved}; echo "saver: saved" >&2; exit 0' TERM
  echo $BASHPID > {ready}.tmp; mv {ready}.tmp {ready}
  while :; do sleep 0.1; done
}}
saver >/dev/null &
wait"""
    proc = _supervised(["bash", "-c", job])
    _wait_for(ready, proc)
    saver = int(ready.read_text())
    os.kill(proc.pid, signal.SIGTERM)
    out = _finish(proc, timeout=20)
    assert saved.read_text() == "saved\n", out  # it had ended before the supervisor did
    assert _gone(saver)
    assert "saver: saved" in out.splitlines()
    assert proc.returncode == 1
    assert _supervisor_lines(out) == ["supervise.sh: stopped by a signal (job exit code 1); not restarting"]


def test_a_process_of_the_job_that_ignores_the_stop_is_killed(tmp_path):
    """A process of the job that ignores SIGTERM is SIGKILLed STOP_GRACE s later; the supervisor then stops."""
    ready = tmp_path / "ready"
    job = f"""trap 'exit 1' TERM
( trap '' TERM; echo $BASHPID > {ready}.tmp; mv {ready}.tmp {ready}; while :; do sleep 0.1; done ) >/dev/null &
wait"""
    proc = _supervised(["bash", "-c", job], STOP_GRACE="2")
    _wait_for(ready, proc)
    stubborn = int(ready.read_text())
    os.kill(proc.pid, signal.SIGTERM)
    out = _finish(proc, timeout=20)
    left = not _gone(stubborn)
    if left:
        os.kill(stubborn, signal.SIGKILL)
    assert not left, "a process of the job outlived the supervisor"
    assert proc.returncode == 1
    assert _supervisor_lines(out) == [
        "supervise.sh: the job still runs 2 s after it ended or was signalled (STOP_GRACE); killing it",
        "supervise.sh: stopped by a signal (job exit code 1); not restarting"]
