"""Checkpoints that resume: DeepSpeed's files plus our marker, per-rank data and RNG state, keep-last-k.

Layout (ARCHITECTURE.md): RUN_DIR/checkpoints/step-N/ holds DeepSpeed's files for tag step-N,
`data_rank{r}.pt` and `rng_rank{r}.pt` for every rank, a `tokenizer/` copy, and `ds_train.json`,
written by rank 0 only after every rank finished and synced its files: its presence marks a complete
save. The marker lists every file of the tag with its size, so a truncated or missing file is caught at
start-up (`is_complete`) and the previous complete checkpoint is used instead. `checkpoints/latest` names
the newest complete tag and is replaced atomically after the marker.

A save that cannot write (full disk, quota, I/O error) raises `CheckpointError` naming the file system
error and the previous complete checkpoint, which is left as it was.

A checkpoint written by another number of ranks is loaded through DeepSpeed's universal checkpoint:
rank 0 converts it once into `step-N/universal/` (reused by later resumes), every rank loads that, and
the data stream resumes at the saved position, which every rank saved alike (`ds_train.data.stream`).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ds_train import distributed

log = logging.getLogger(__name__)

MARKER = "ds_train.json"
UNIVERSAL = "universal"  # step-N/universal/: DeepSpeed's universal checkpoint of step-N
UNIVERSAL_DONE = "converted.json"  # written last into universal/: the conversion finished
TAG_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the reason."""


@dataclass(frozen=True)
class Found:
    tag: str
    step: int
    path: Path
    meta: dict[str, Any]


def tag_for(step: int) -> str:
    return f"step-{step}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, meta: dict[str, Any], data_state: Any,
         tokenizer_dir: Path | None, keep_last: int, rank: int, world_size: int) -> Path:
    """Collective: every rank calls it at the same step.

    Raises:
        CheckpointError: this rank could not write its part (the older checkpoints are untouched).
    """
    tag = tag_for(step)
    path = ckpt_dir / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # re-saving a step (after a resume): no stale marker or files of the old save
    distributed.barrier()
    with _write_errors_reported(ckpt_dir, path, rank):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
        torch.save(data_state, path / f"data_rank{rank}.pt")
        torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    distributed.barrier()
    if rank == 0:
        with _write_errors_reported(ckpt_dir, path, rank):
            _fsync_tree(path)  # every rank's files reach the disk before the marker says they did
            if tokenizer_dir is not None:
                shutil.copytree(tokenizer_dir, path / "tokenizer", dirs_exist_ok=True)
            marker = {**meta, "step": step, "world_size": world_size, "files": _file_sizes(path)}
            _atomic_write(path / MARKER, json.dumps(marker, indent=1))
            _atomic_write(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep_last)
        log.info("checkpoint %s saved", path)
    distributed.barrier()
    return path


@contextmanager
def _write_errors_reported(ckpt_dir: Path, path: Path, rank: int) -> Iterator[None]:
    """Turn a failed write (torch.save says RuntimeError, the rest OSError) into one CheckpointError line;
    a collective that failed because another rank is gone passes through (the caller reports it)."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if distributed.is_lost_peer(err):
            raise
        raise CheckpointError(_write_failure(ckpt_dir, path, rank, err)) from None


def _write_failure(ckpt_dir: Path, path: Path, rank: int, err: BaseException) -> str:
    """One line: what failed, why, and which checkpoint a restart will use."""
    reason = distributed.first_line(err)
    try:
        reason += f"; {shutil.disk_usage(ckpt_dir).free / 2**30:.2f} GiB free there"
    except OSError:
        pass
    previous = find_latest(ckpt_dir, quiet=True)
    fallback = f"{previous.path} is intact and a restart resumes from it" if previous else "no earlier checkpoint"
    return f"rank {rank} could not write checkpoint {path} ({reason}); free space or fix the file system: {fallback}"


def _file_sizes(path: Path) -> dict[str, int]:
    """Every file of a tag directory (the marker aside) with its size, for `is_complete`."""
    return {str(p.relative_to(path)): p.stat().st_size
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != MARKER}


def is_complete(path: Path) -> tuple[bool, str]:
    """A tag directory is complete when its marker exists and every file it lists has its recorded size
    (markers written before sizes were recorded: every rank's files are there and none is empty)."""
    marker = path / MARKER
    if not marker.is_file():
        return False, "no ds_train.json marker (the save did not finish)"
    try:
        meta = json.loads(marker.read_text())
    except (json.JSONDecodeError, OSError) as err:
        return False, f"unreadable marker ({err})"
    if isinstance(meta.get("files"), dict):
        return _sizes_match(path, meta["files"])
    world = int(meta.get("world_size", 0))
    for r in range(world):
        for name in (f"data_rank{r}.pt", f"rng_rank{r}.pt"):
            if not (path / name).is_file() or (path / name).stat().st_size == 0:
                return False, f"missing or empty {name}"
    if not any(path.glob("*model_states.pt")):
        return False, "no DeepSpeed model states file"
    for f in path.glob("*.pt"):
        if f.stat().st_size == 0:
            return False, f"empty file {f.name}"
    return True, ""


def _sizes_match(path: Path, sizes: dict[str, int]) -> tuple[bool, str]:
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            return False, f"{name} is missing"
        if f.stat().st_size != size:
            return False, f"{name} has {f.stat().st_size} bytes, the save wrote {size} (truncated or changed)"
    return True, ""


def list_tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(out, reverse=True)


def find_latest(ckpt_dir: Path, quiet: bool = False) -> Found | None:
    """The newest complete checkpoint; torn ones are reported (one warning line each) and passed over."""
    for step, path in list_tags(ckpt_dir):
        ok, why = is_complete(path)
        if ok:
            meta = json.loads((path / MARKER).read_text())
            return Found(path.name, step, path, meta)
        if not quiet:
            log.warning("checkpoint %s is incomplete and is skipped: %s", path, why)
    return None


def prune(ckpt_dir: Path, keep_last: int) -> None:
    complete = [(s, p) for s, p in list_tags(ckpt_dir) if is_complete(p)[0]]
    for _, path in complete[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)


def check_compatible(meta: dict[str, Any], current: dict[str, Any], where: str = "the checkpoint") -> None:
    """Refuse a checkpoint whose model shape, separation, objective or tokenizer differs from the run's:
    the error has a first line naming the checkpoint, then one line per difference."""
    diffs = []
    for key in ("model", "separation", "objective", "tokenizer_sha"):
        a, b = meta.get(key), current.get(key)
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if k in ("activation_checkpointing", "loss_chunk_size", "compile"):
                    continue
                if a.get(k) != b.get(k):
                    diffs.append(f"model.{k}: checkpoint {_short(a.get(k))} vs run {_short(b.get(k))}")
        elif a != b:
            diffs.append(f"{key}: checkpoint {_short(a)} vs run {_short(b)}")
    if diffs:
        head = f"{where} does not match this run (use another run.dir, or checkpoint.resume=false):"
        raise CheckpointError("\n".join([head, *diffs]))


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def load(engine, found: Found, rank: int, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Load engine state, then this rank's data and RNG state. Returns (data_state, meta).

    A checkpoint of another world size is resharded (`load_resharded`). The data state is the stream's
    position, the same in every rank's file: any number of ranks resumes from it.
    """
    stage, ours = found.meta.get("zero_stage"), engine.zero_optimization_stage()
    if stage is not None and stage != ours:  # DeepSpeed 0.19 loads neither the files nor their universal form
        raise CheckpointError(
            f"{found.path} was written with ZeRO stage {stage}, this run uses stage {ours}: resume with stage "
            f"{stage}, or start a new run from its export (ds-export, then model.init_from)")
    world = int(found.meta.get("world_size", 1))
    if world != torch.distributed.get_world_size():
        return load_resharded(engine, found, rank, seed)
    load_path, _ = engine.load_checkpoint(str(found.path.parent), tag=found.tag)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {found.path}")
    data_state = torch.load(found.path / f"data_rank{rank}.pt", weights_only=True)
    set_rng_state(torch.load(found.path / f"rng_rank{rank}.pt", weights_only=True))
    return data_state, found.meta


def load_resharded(engine, found: Found, rank: int, seed: int) -> tuple[Any, dict[str, Any]]:
    """Collective: load a checkpoint written by another number of ranks.

    Partitioned optimizer state (ZeRO 1-3, or bf16's) goes through DeepSpeed's universal checkpoint,
    converted by rank 0 while the others wait; unpartitioned state (ZeRO 0 in fp32) loads as it is.
    """
    saved, world = int(found.meta["world_size"]), torch.distributed.get_world_size()
    log.info("checkpoint %s was written by %d ranks, this run has %d: resharding it from %d to %d ranks",
             found.path, saved, world, saved, world)
    if _has_partitioned_optimizer(found.path):
        _load_universal(engine, found, rank)
    else:
        load_path, _ = engine.load_checkpoint(str(found.path.parent), tag=found.tag)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {found.path}")
    data_state = torch.load(found.path / "data_rank0.pt", weights_only=True)  # the same on every rank
    rng_file = found.path / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        derived = seed_rng(seed, found.step, rank)
        log.info("rank %d has no saved RNG state in %s (written by %d ranks): RNG seeded with %d, "
                 "derived from run.seed %d, step %d and the rank", rank, found.path, saved, derived, seed,
                 found.step)
    return data_state, found.meta


def seed_rng(seed: int, step: int, rank: int) -> int:
    """Seed python, numpy and torch from (seed, step, rank); returns the seed used."""
    derived = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    return derived


def _has_partitioned_optimizer(path: Path) -> bool:
    return any(path.glob("*optim_states.pt"))


def _load_universal(engine, found: Found, rank: int) -> None:
    """Rank 0 converts (or reuses) step-N/universal/, then every rank loads it with `load_universal` on.

    The others wait up to `DS_TRAIN_CONVERT_TIMEOUT` seconds (default 7200): converting a large model's
    checkpoint on a network file system can outlast the process group's timeout."""
    failure = ""
    wait_s = distributed.seconds_from_env("DS_TRAIN_CONVERT_TIMEOUT", 7200)
    if rank == 0:
        try:
            convert_to_universal(found.path)
        except CheckpointError as err:
            failure = str(err)
    if distributed.any_rank(bool(failure), wait_s):  # every rank learns that rank 0 failed
        raise CheckpointError(failure or f"rank 0 could not convert {found.path} to a universal checkpoint")
    engine._config.load_universal_checkpoint = True  # read by every load_checkpoint step, not only at init
    try:
        load_path, _ = engine.load_checkpoint(str(found.path), tag=UNIVERSAL)
    except (AssertionError, KeyError, OSError, RuntimeError, ValueError) as err:
        if distributed.is_lost_peer(err):
            raise
        reason = distributed.first_line(err)
        raise CheckpointError(f"DeepSpeed could not load the universal checkpoint {found.path / UNIVERSAL} "
                              f"({reason}); resume with the number of ranks that wrote it") from None
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the universal checkpoint {found.path / UNIVERSAL}")
    _repair_optimizer_after_universal_load(engine, found.path / UNIVERSAL)


# A group's own parameters and how this process's optimizer runs, not what was trained: kept when the
# saved hyperparameters come back.
_KEPT_GROUP_KEYS = ("params", "fused", "foreach", "capturable", "differentiable")


def _repair_optimizer_after_universal_load(engine, universal: Path) -> None:
    """Undo three slips of DeepSpeed 0.19's universal load.

    ZeRO-3: it gives every parameter group the same `step` tensor, which Adam then advances once per
    group per step (the second group's bias correction runs a step ahead), and it copies the first
    group's hyperparameters (weight decay included) onto every group; each group gets its own step
    tensor and its saved hyperparameters back. Every stage: the `step` tensors come from files read
    onto the CPU, where a fused (or capturable) Adam on a GPU refuses them; they move to their
    parameter's device, as `torch.optim.Optimizer.load_state_dict` would place them.
    """
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if engine.zero_optimization_stage() == 3:
        saved = torch.load(universal / "zero" / "optimizer_state.pt", weights_only=False, mmap=True)
        saved_groups = saved["optimizer_state_dict"]["param_groups"]
        for group, saved_group in zip(base.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved_group.items() if k not in _KEPT_GROUP_KEYS})
    on_device = any(group.get("fused") or group.get("capturable") for group in base.param_groups)
    for param, state in base.state.items():  # keyed by tensors that need not be the groups' own objects
        if torch.is_tensor(state.get("step")):
            step = state["step"].clone()
            state["step"] = step.to(device=param.device, dtype=torch.float32) if on_device else step


def convert_to_universal(path: Path) -> Path:
    """DeepSpeed's universal checkpoint of the tag directory ``path``, in ``path/universal/``.

    Converted into a scratch folder and renamed when complete, so an interrupted conversion is redone
    and a complete one is reused. DeepSpeed's converter output goes to the debug log.
    """
    out = path / UNIVERSAL
    if (out / UNIVERSAL_DONE).is_file():
        log.info("reusing the universal checkpoint %s", out)
        return out
    from deepspeed.checkpoint import ds_to_universal

    scratch = path / f".{UNIVERSAL}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(scratch), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    chatter = io.StringIO()
    try:
        with redirect_stdout(chatter), redirect_stderr(chatter):
            ds_to_universal.main(args)
        (path / "latest_universal").unlink(missing_ok=True)  # the converter names the scratch folder there
        _fsync_tree(scratch)  # the marker must never stand beside torn files
        _atomic_write(scratch / UNIVERSAL_DONE, json.dumps({"from": path.name}))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(scratch, out)
    except Exception as err:  # noqa: BLE001 - the converter raises anything, unpickling errors included
        log.debug("ds_to_universal output:\n%s", chatter.getvalue())
        shutil.rmtree(scratch, ignore_errors=True)
        reason = distributed.first_line(err)
        raise CheckpointError(f"DeepSpeed could not convert {path} to a universal checkpoint ({reason}); "
                              "resume with the number of ranks that wrote it") from None
    log.debug("ds_to_universal output:\n%s", chatter.getvalue())
    log.info("converted %s to DeepSpeed's universal checkpoint %s", path, out)
    return out
