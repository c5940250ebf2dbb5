"""The launch scripts on the CPU: two "nodes" on one machine (deepspeed --no_ssh per node, and mpirun
with mpi4py discovery), each with one gloo rank, compared with a world-size-2 reference; and the clear,
bounded failures for a wrong hostfile, node rank, master address or world size."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ds_train.distributed import free_port
from tests.test_train import ROOT, losses, overrides, reference_losses

pytestmark = pytest.mark.slow  # every test here starts processes (launchers, ranks, supervisors)

SETTINGS = {"train__max_steps": 2, "checkpoint__every_steps": 2}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    env.update(extra)
    return env


def _hostfile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path


def _check_two_rank_run(run_dir: Path) -> None:
    meta = json.loads((run_dir / "checkpoints" / "step-2" / "ds_train.json").read_text())
    assert meta["world_size"] == 2
    got = losses(run_dir)
    ref = reference_losses(run_dir, world_size=2, steps=2, **SETTINGS)
    assert [got[1], got[2]] == pytest.approx(ref, rel=2e-5)


def test_two_nodes_per_node_launch(tmp_path):
    hosts = _hostfile(tmp_path, "node0 slots=1\nnode1 slots=1\n")
    run_dir = tmp_path / "run"
    port = str(free_port())
    # Each node's output goes to a file: with pipes read one after the other, a node that fills its pipe
    # would block while the other waits for it.
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    with contextlib.ExitStack() as files:
        procs = [
            subprocess.Popen(["bash", "launch/multi_node.sh", *overrides(run_dir, **SETTINGS)], cwd=ROOT,
                             env=_env(HOSTFILE=str(hosts), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                      NODE_RANK=str(rank)),
                             stdout=files.enter_context(log.open("w")), stderr=subprocess.STDOUT,
                             start_new_session=True)
            for rank, log in enumerate(logs)
        ]
        try:
            for p in procs:
                p.wait(timeout=600)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
    outs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    _check_two_rank_run(run_dir)


def test_mpirun_with_mpi4py_discovery(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(["bash", "launch/mpi.sh", *overrides(run_dir, **SETTINGS)], cwd=ROOT,
                          env=_env(NP="2"), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "mpi launch, rank 0/2" in proc.stdout + proc.stderr
    _check_two_rank_run(run_dir)


@pytest.mark.parametrize(("script", "env", "needle"), [
    ("multi_node.sh", {"MASTER_ADDR": "127.0.0.1"}, "set HOSTFILE"),
    ("multi_node.sh", {"HOSTFILE": "/nonexistent", "MASTER_ADDR": "127.0.0.1"}, "hostfile '/nonexistent' not found"),
    ("multi_node.sh", {"HOSTFILE": "@BAD", "MASTER_ADDR": "127.0.0.1"}, "bad line 'node0 gpus=4'"),
    ("multi_node.sh", {"HOSTFILE": "@GOOD", "MASTER_ADDR": "127.0.0.1", "NODE_RANK": "2"},
     "NODE_RANK=2 is not in 0..1"),
    ("multi_node.sh", {"HOSTFILE": "@GOOD", "MASTER_ADDR": "no-such-host.invalid"}, "does not resolve"),
    ("multi_node.sh", {"HOSTFILE": "@GOOD"}, "set MASTER_ADDR"),
    ("single_node.sh", {"NUM_GPUS": "0"}, "NUM_GPUS must be a positive integer"),
    ("mpi.sh", {}, "set NP"),
    ("mpi.sh", {"NP": "two"}, "NP must be a positive integer"),
])
def test_scripts_refuse_bad_settings(script, env, needle, tmp_path):
    good = _hostfile(tmp_path, "node0 slots=1\nnode1 slots=1\n")
    bad = tmp_path / "bad"
    bad.write_text("node0 gpus=4\n")
    env = {k: str({"@GOOD": good, "@BAD": bad}.get(v, v)) for k, v in env.items()}
    proc = subprocess.run(["bash", f"launch/{script}", "--train.max_steps=1"], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_unreachable_master_fails_within_the_timeout(tmp_path):
    """Node 1 of 2 alone: its master never answers; it must stop with one clear line, not hang."""
    hosts = _hostfile(tmp_path, "node0 slots=1\nnode1 slots=1\n")
    proc = subprocess.run(["bash", "launch/multi_node.sh", *overrides(tmp_path / "run", **SETTINGS)], cwd=ROOT,
                          env=_env(HOSTFILE=str(hosts), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                                   NODE_RANK="1", DS_TRAIN_DIST_TIMEOUT="10"),
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode != 0
    assert "ds-train: could not form the process group" in proc.stderr + proc.stdout


def test_world_size_that_cannot_split_the_batch(tmp_path):
    """global batch 3 cannot be split over 2 ranks: both ranks say so and exit 2."""
    from tests.test_train import _launch_two_ranks

    proc = _launch_two_ranks(tmp_path / "run", train__global_batch_size=3, train__max_steps=1)
    assert proc.returncode != 0
    assert "train.global_batch_size=3 is not a multiple of micro_batch_size x world size" in proc.stderr


@pytest.mark.parametrize("value,says", [("soon", " is not a number of seconds"),
                                         ("inf", ": the timeout must be a positive, finite number of seconds")])
def test_unreadable_collective_timeout_is_named(tmp_path, value, says):
    proc = subprocess.run([sys.executable, "-m", "ds_train.train", *overrides(tmp_path / "run", **SETTINGS)],
                          cwd=ROOT, env=_env(DS_TRAIN_DIST_TIMEOUT=value), capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ds-train:")]
    assert lines == [f"ds-train: DS_TRAIN_DIST_TIMEOUT={value!r}{says}"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
