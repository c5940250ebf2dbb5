"""Process-group setup for every way a run is started, and the few collectives the engine needs.

Launch forms: the `deepspeed` launcher / torchrun (RANK, WORLD_SIZE, ... set), `mpirun` (rank discovery
through mpi4py, done by DeepSpeed), SLURM `srun` (SLURM_* mapped here), or a plain `python` process
(a world of one on a free local port).
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import deepspeed
import deepspeed.ops
import torch
from deepspeed.accelerator import get_accelerator

from ds_train.errors import UsageError, first_line

log = logging.getLogger(__name__)

_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker crash")
_PEER_SILENT = ("Timed out waiting", "timed out after", "Timeout waiting")
_MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


class LaunchError(UsageError):
    """The process group could not be formed; the message says what to check."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env() -> str:
    """Fill in the env:// variables for the launch form in use; returns its name."""
    if all(v in os.environ for v in _REQUIRED):
        return "env"
    if any(v in os.environ for v in _MPI_MARKERS):
        return "mpi"  # DeepSpeed discovers ranks through mpi4py
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        if "MASTER_ADDR" not in os.environ:
            raise LaunchError("SLURM launch: MASTER_ADDR is not set (launch/slurm.sbatch sets it to the first node)")
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("MASTER_PORT", "29500")
        return "slurm"
    partial = [v for v in _REQUIRED if v in os.environ]
    if partial and os.environ.get("WORLD_SIZE", "1") != "1":
        missing = [v for v in _REQUIRED if v not in os.environ]
        raise LaunchError(f"launcher variables incomplete: {', '.join(missing)} not set")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return "single"


def init(timeout_s: float | None = None) -> DistInfo:
    """Form the process group (gloo on the CPU, nccl on GPUs) and pick this rank's device."""
    form = _launch_env()
    if torch.distributed.is_initialized():  # a second run in the same process (tests, notebooks)
        return _info()
    if timeout_s is None:
        timeout_s = seconds_from_env("DS_TRAIN_DIST_TIMEOUT", 900)
    timeout = timedelta(seconds=timeout_s)
    _no_shm_allreduce()
    try:
        deepspeed.init_distributed(timeout=timeout, verbose=False)
    except (RuntimeError, ValueError, OSError, TimeoutError) as err:
        first = first_line(err)
        # read here: under mpirun, DeepSpeed's discovery has only now set them
        master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise LaunchError(
            f"could not form the process group ({form} launch, master {master}, "
            f"world size {os.environ.get('WORLD_SIZE', '?')}): {first}"
        ) from err
    atexit.register(shutdown)
    _make_control_group()
    info = _info()
    log.info("process group: %s launch, rank %d/%d, local rank %d, %s", form, info.rank, info.world_size,
             info.local_rank, info.device)
    return info


def seconds_from_env(name: str, default: float) -> float:
    """A timeout in seconds from the environment variable ``name``; a bad value is a one-line LaunchError."""
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not a number of seconds") from None
    try:
        timedelta(seconds=value)  # raises for inf, nan, or more than a timedelta holds
        usable = value > 0
    except (OverflowError, ValueError):
        usable = False
    if not usable:
        raise LaunchError(f"{name}={raw!r}: the timeout must be a positive, finite number of seconds")
    return value


def _no_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU backend from building and mapping its shared-memory all-reduce.

    That op serves DeepSpeed's inference all-reduce only (training collectives go through gloo), yet on
    every launcher start it JIT-compiles a C++ extension and maps a 66 MB buffer per rank under /dev/shm
    that it never unlinks: killed or not, each launch leaked memory until the machine ran out.
    """
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _info() -> DistInfo:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"rank {rank} has LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, local_rank, world, device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


_CONTROL_GROUP: list = []


def _make_control_group() -> None:
    """A gloo group for small host-side agreements (stop flags), so they never wait on the GPU queue.

    Every rank calls this once, right after the process group forms (a collective call). With a gloo
    default group (CPU runs) the default group serves.
    """
    if torch.distributed.get_backend() == "gloo":
        _CONTROL_GROUP[:] = [None]
    else:
        _CONTROL_GROUP[:] = [torch.distributed.new_group(backend="gloo")]


def any_rank(flag: bool, wait_s: float | None = None) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks act at the same step).

    Agreed over CPU tensors (the control group): no GPU synchronisation. With ``wait_s``: for an
    agreement the other ranks wait for while one rank works long (rank 0 converting a checkpoint), over
    a gloo group of its own with that timeout, so they are not cut off by the process group's timeout
    (300 s in the multi-node scripts); forming that group is collective too.
    """
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if wait_s is not None:
            group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))
        else:
            if not _CONTROL_GROUP:
                _make_control_group()
            group = _CONTROL_GROUP[0]
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
        if wait_s is not None:
            torch.distributed.destroy_process_group(group)
    return bool(t.item() > 0)


def shutdown() -> None:
    """Tear the process groups down while the interpreter is whole (registered at exit by `init`).

    Engines keep groups and pending collective handles in reference cycles; collected here, their gloo
    work is released now rather than during interpreter finalization, where a gloo thread torn down late
    can abort the process.
    """
    if torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def is_lost_peer(err: BaseException) -> bool:
    """A collective failed because another rank died or was killed (gloo says so in a plain RuntimeError)."""
    return isinstance(err, torch.distributed.DistError) or (
        isinstance(err, RuntimeError) and any(s in str(err) for s in _PEER_GONE + _PEER_SILENT))


def lost_peer_message(err: BaseException) -> str:
    """One line for a collective that failed because another rank is gone."""
    # without gloo's source location and its advice
    first = re.sub(r"^\[[^\]]*\] ", "", first_line(err)).split(" This is typically")[0]
    if any(s in str(err) for s in _PEER_SILENT):  # nobody answered: a dead rank, or a rank that never came
        return (f"rank {os.environ.get('RANK', '?')} lost contact with the other ranks: a collective timed out "
                f"({first[:120]}); a rank died, or the nodes disagree on the world size (check that every node "
                "uses the same hostfile); a restart resumes from the last complete checkpoint")
    return (f"rank {os.environ.get('RANK', '?')} lost contact with the other ranks ({first[:160]}); "
            "stopping: a restart resumes from the last complete checkpoint")
