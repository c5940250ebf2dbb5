"""Multi-GPU and multi-node checks on a CUDA host (the `gpu` tier; README, "Multi-GPU / multi-node proof run").

What the CPU suite proves with gloo ranks, here with NCCL ranks on real GPUs:
- the step benchmark (`bench/train_step.py run`) on 1 GPU (ZeRO-2) and on every GPU (ZeRO-2 and ZeRO-3);
  its JSON lines (tokens/s per GPU, peak memory) go to DS_TRAIN_GPU_OUT/scale.jsonl, read, not asserted;
- the whole pipeline under `launch/supervise.sh` + `launch/single_node.sh` on a mined corpus: rank 1 is
  SIGKILLed between two checkpoints, the supervisor restarts the job once, the run resumes by itself and
  reaches max_steps (metrics and TensorBoard), then `ds-export` fp16 and `ds-eval humaneval --limit`;
- two "nodes" on this host (`launch/multi_node.sh` per node, one GPU each) and `launch/mpi.sh` (when the
  host has an MPI) against a 2-rank `single_node.sh` run of the same config;
- the one-line, bounded refusals: a bad hostfile, an unreachable master, nodes that disagree on the world
  size, a global batch the world size cannot split;
- a checkpoint of N ranks resumed on N/2 (DeepSpeed's universal checkpoint), then exported.

Every process started here keeps NVLink multicast off (NCCL_NVLS_ENABLE=0 and friends).
Knobs: DS_TRAIN_GPUS (default: every device), DS_TRAIN_GPU_OUT (logs and measurements, default
runs/gpu_tests), DS_TRAIN_GPU_FLAVOR / DS_TRAIN_GPU_STEPS / DS_TRAIN_GPU_EVERY (the pipeline's model,
steps and checkpoint interval: pycodegpt-110m, 160, 40).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ds_train.distributed import free_port
from tests.test_faults import _finish, _rank_process, _resumed_step, _wait_for_step
from tests.test_train import ROOT, losses, overrides

pytestmark = pytest.mark.gpu

OUT = Path(os.environ.get("DS_TRAIN_GPU_OUT", ROOT / "runs" / "gpu_tests"))
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SMALL = {"train__max_steps": 4, "checkpoint__every_steps": 4, "train__precision": "fp32"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cuda", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1", **NO_MULTICAST)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def _start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A job in its own session, its output into `log` (kept under DS_TRAIN_GPU_OUT for reading)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """The job's exit, at most `timeout` seconds away (then its session is killed and the test fails)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"{log.name}: no exit within {timeout} s: {log.read_text()[-3000:]}") from None
    return log.read_text(errors="replace")


def _run(cmd: list[str], name: str, timeout: float = 300, **env: str) -> tuple[int, str]:
    log = OUT / "logs" / f"{name}.log"
    proc = _start(cmd, log, **env)
    out = _wait(proc, log, timeout)
    return proc.returncode, out


def _refusals(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("ds-train: ")]


def _need(gpus: int, n: int) -> None:
    if gpus < n:
        pytest.skip(f"needs {n} GPUs, this host has {gpus}")


def _fresh(name: str) -> Path:
    path = OUT / name
    shutil.rmtree(path, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------- scale


def test_step_benchmark_on_one_and_every_gpu(gpus):
    """bench/train_step.py through the deepspeed launcher: 1 GPU ZeRO-2 first (it warms the compile cache),
    then every GPU with ZeRO-2 and ZeRO-3. Each run must emit its measurement with a finite rate."""
    out = OUT / "scale.jsonl"
    out.unlink(missing_ok=True)
    for n, zero in [(1, 2), (gpus, 2), (gpus, 3)] if gpus > 1 else [(1, 2), (1, 3)]:
        code, text = _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--no_local_rank",
                           "--master_port", str(free_port()), "bench/train_step.py", "run", "--zero", str(zero),
                           "--steps", "20", "--warmup", "5", "--out", str(out)], f"scale_{n}gpu_zero{zero}", 600)
        assert code == 0, text[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("kind") == "step"]
    assert sorted((r["world_size"], r["zero"]) for r in rows) == sorted(
        [(1, 2), (gpus, 2), (gpus, 3)] if gpus > 1 else [(1, 2), (1, 3)])
    assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in rows)
    one = next(r for r in rows if r["world_size"] == 1 and r["zero"] == 2)
    for r in rows:  # the scaling, for the reader (timings are not asserted)
        print(f"{r['world_size']} GPU ZeRO-{r['zero']}: {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['tokens_per_s'] / (r['world_size'] * one['tokens_per_s']):.1%} of linear, "
              f"{r['peak_mem_gib_per_gpu']:.2f} GiB/GPU on {r.get('device', 'cuda')}")


# ---------------------------------------------------------------------------------------------- pipeline


def test_supervised_pipeline_survives_a_killed_rank_then_exports_and_evaluates(gpus):
    _need(gpus, 2)
    flavor = os.environ.get("DS_TRAIN_GPU_FLAVOR", "pycodegpt-110m")
    steps = int(os.environ.get("DS_TRAIN_GPU_STEPS", "160"))
    every = int(os.environ.get("DS_TRAIN_GPU_EVERY", "40"))
    kill_after = every + (every + 1) // 2  # between the first and the second checkpoint
    run = _fresh("pipeline") / "run"
    log_every = max(every // 4, 1)
    args = ["ds_configs/recipes/default.yaml", f"--run.dir={run}", f"--model.flavor={flavor}",
            f"--train.max_steps={steps}", f"--checkpoint.every_steps={every}", f"--train.log_every={log_every}",
            "--optim.lr=6e-4", "--optim.min_lr=1e-4", "--optim.warmup_ratio=0.05", "--data.trace_ids=true",
            "--export.enabled=false", "--data.mine_limit=6000"]
    log = OUT / "logs" / "pipeline_train.log"
    proc = subprocess.Popen(["bash", "launch/supervise.sh", "bash", "launch/single_node.sh", *args], cwd=ROOT,
                            env=_env(NUM_GPUS=str(gpus), MASTER_PORT=str(free_port()), RESTART_PAUSE="5",
                                     MAX_RESTARTS="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for_step(proc, run, rank=1, step=kill_after, seen_before=0)
    latest = (run / "checkpoints" / "latest").read_text()
    _rank_process(proc, 1).send_signal(signal.SIGKILL)
    out = _finish(proc, timeout=1800)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(out)
    assert proc.returncode == 0, out[-3000:]
    assert latest == f"step-{every}"
    restarts = [ln for ln in out.splitlines() if ln.startswith("supervise.sh: the job failed")]
    assert len(restarts) == 1, restarts
    assert every <= _resumed_step(out) <= kill_after
    assert sorted(losses(run)) == list(range(log_every, steps + 1, log_every))
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "perf/tokens_per_s", "perf/raw_tokens_per_s", "perf/mfu", "mem/peak_allocated_gib"} <= tags
    assert max(e.step for e in acc.Scalars("train/loss")) == steps
    (OUT / "pipeline" / "tb_scalars.json").write_text(json.dumps(
        {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in sorted(tags)}))

    export = run / "export_fp16"
    code, text = _run([sys.executable, "-m", "ds_train.export", str(run), str(export), "--dtype", "fp16", "--force"],
                      "pipeline_export", 600)
    assert code == 0, text[-3000:]
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
    code, text = _run([sys.executable, "-m", "eval.cli", "humaneval", "--model", str(export), "--out",
                       str(OUT / "pipeline" / "eval"), "--limit", "20", "--greedy", "--max-new-tokens", "256",
                       "--k", "1"], "pipeline_eval", 900, DS_TRAIN_ALLOW_CODE_EXECUTION="1")
    assert code == 0, text[-3000:]


# ---------------------------------------------------------------------------------------------- two nodes

PIN = '''import importlib.machinery, importlib.util, os, sys
if os.environ.get("DS_TEST_PIN_GPU") and os.environ.get("LOCAL_RANK") is not None:
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["DS_TEST_PIN_GPU"]
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
'''


def _node_env(node: int, pin: Path) -> dict[str, str]:
    """Both "nodes" share this host and DeepSpeed's per-node launcher gives each rank GPU 0 ("slots=1"): a
    sitecustomize moves node 1's rank (only the rank, by LOCAL_RANK) onto GPU 1."""
    if node == 0:
        return {"NODE_RANK": "0"}
    return {"NODE_RANK": str(node), "DS_TEST_PIN_GPU": str(node),
            "PYTHONPATH": os.pathsep.join(p for p in (str(pin), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}


@pytest.fixture(scope="module")
def hosts() -> dict[str, Path]:
    folder = _fresh("hosts")
    folder.mkdir(parents=True)
    files = {"two": "node0 slots=1\nnode1 slots=1\n", "three": "node0 slots=1\nnode1 slots=1\nnode2 slots=1\n",
             "bad": "node0 gpus=1\nnode1 gpus=1\n"}
    for name, text in files.items():
        (folder / name).write_text(text)
    (folder / "pin").mkdir()
    (folder / "pin" / "sitecustomize.py").write_text(PIN)
    return {name: folder / name for name in (*files, "pin")}


@pytest.fixture(scope="module")
def reference_two_ranks() -> Path:
    run = _fresh("two_ranks_reference") / "run"
    code, out = _run(["bash", "launch/single_node.sh", *overrides(run, **SMALL)], "two_ranks_reference",
                     NUM_GPUS="2", MASTER_PORT=str(free_port()))
    assert code == 0, out[-3000:]
    return run


def _same_run(run: Path, ref: Path) -> None:
    meta = json.loads((run / "checkpoints" / "step-4" / "ds_train.json").read_text())
    assert meta["world_size"] == 2
    got, want = losses(run), losses(ref)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert [got[s] for s in range(1, 5)] == pytest.approx([want[s] for s in range(1, 5)], rel=1e-3)  # NCCL, cuBLAS


def test_two_nodes_per_node_launch_matches_two_ranks(gpus, hosts, reference_two_ranks):
    _need(gpus, 2)
    run = _fresh("per_node") / "run"
    port = str(free_port())
    logs = [OUT / "logs" / f"per_node{n}.log" for n in (0, 1)]
    procs = [_start(["bash", "launch/multi_node.sh", *overrides(run, **SMALL)], logs[n],
                    HOSTFILE=str(hosts["two"]), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **_node_env(n, hosts["pin"]))
             for n in (0, 1)]
    outs = [_wait(p, log, 600) for p, log in zip(procs, logs)]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    _same_run(run, reference_two_ranks)


def test_mpirun_launch_matches_two_ranks(gpus, reference_two_ranks):
    _need(gpus, 2)
    if not (shutil.which("mpirun") or shutil.which("mpiexec")):
        pytest.skip("no mpirun/mpiexec on this host")
    run = _fresh("mpi") / "run"
    code, out = _run(["bash", "launch/mpi.sh", *overrides(run, **SMALL)], "mpi", 600, NP="2",
                     MPI_ARGS="-x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS"
                     if "open mpi" in subprocess.run(["mpirun", "--version"], capture_output=True, text=True,
                                                     check=False).stdout.lower() else "")
    assert code == 0, out[-3000:]
    assert "mpi launch, rank 0/2" in out
    _same_run(run, reference_two_ranks)


# ---------------------------------------------------------------------------------------------- refusals


def test_bad_hostfile_is_one_line(hosts):
    code, out = _run(["bash", "launch/multi_node.sh", *overrides(_fresh("bad_hostfile"), **SMALL)], "bad_hostfile", 60,
                     HOSTFILE=str(hosts["bad"]), MASTER_ADDR="127.0.0.1", NODE_RANK="0")
    assert code == 2 and len(out.strip().splitlines()) == 1 and "bad line" in out, out


def test_unreachable_master_fails_within_the_timeout(gpus, hosts):
    _need(gpus, 2)
    code, out = _run(["bash", "launch/multi_node.sh", *overrides(_fresh("unreachable") / "run", **SMALL)],
                     "unreachable", 240, HOSTFILE=str(hosts["two"]), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port()), DS_TRAIN_DIST_TIMEOUT="20", **_node_env(1, hosts["pin"]))
    assert code != 0 and any("could not form the process group" in ln for ln in _refusals(out)), out[-3000:]


def test_nodes_that_disagree_on_the_world_size_stop_with_a_line(gpus, hosts):
    _need(gpus, 2)
    run = _fresh("mismatch") / "run"
    port = str(free_port())
    logs = [OUT / "logs" / f"mismatch{n}.log" for n in (0, 1)]
    procs = [_start(["bash", "launch/multi_node.sh", *overrides(run, **SMALL)], logs[n],
                    HOSTFILE=str(hosts["two" if n == 0 else "three"]), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                    DS_TRAIN_DIST_TIMEOUT="20", **_node_env(n, hosts["pin"]))
             for n in (0, 1)]
    outs = [_wait(p, log, 300) for p, log in zip(procs, logs)]  # bounded: no hang until the wait's limit
    for p, out in zip(procs, outs):
        assert p.returncode != 0 and _refusals(out), out[-3000:]


def test_global_batch_the_world_size_cannot_split(gpus):
    _need(gpus, 2)
    code, out = _run(["bash", "launch/single_node.sh", *overrides(_fresh("batch_split") / "run", **SMALL),
                      "--train.global_batch_size=3"], "batch_split", 300, NUM_GPUS="2", MASTER_PORT=str(free_port()))
    assert code != 0 and any("is not a multiple of micro_batch_size x world size" in ln for ln in _refusals(out)), \
        out[-3000:]


# ---------------------------------------------------------------------------------------------- reshape


def test_checkpoint_of_every_gpu_resumed_on_half_then_exported(gpus):
    _need(gpus, 2)
    half, micro = gpus // 2, 2
    run = _fresh("reshape") / "run"
    args = overrides(run, train__max_steps=8, checkpoint__every_steps=4, data__trace_ids="true",
                     train__micro_batch_size=micro, train__global_batch_size=micro * gpus, train__precision="bf16")
    code, out = _run(["bash", "launch/single_node.sh", *args, "--train.stop_at_step=4"], "reshape_first", 600,
                     NUM_GPUS=str(gpus), MASTER_PORT=str(free_port()))
    assert code == 0, out[-3000:]
    code, out = _run(["bash", "launch/single_node.sh", *args], "reshape_resume", 600, NUM_GPUS=str(half),
                     MASTER_PORT=str(free_port()))
    assert code == 0, out[-3000:]
    assert f"resharding it from {gpus} to {half} ranks" in out and _resumed_step(out) == 4
    assert sorted(losses(run)) == list(range(1, 9))
    code, out = _run([sys.executable, "-m", "ds_train.export", str(run), str(run / "export_fp16"), "--dtype", "fp16",
                      "--force"], "reshape_export", 300)
    assert code == 0, out[-3000:]
