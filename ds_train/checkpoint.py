"""Checkpoints that resume: DeepSpeed's files plus our marker, per-rank data and RNG state, keep-last-k.

The one place that finds and verifies a checkpoint (resume and `ds-export`). RUN_DIR/checkpoints/step-N/
(ARCHITECTURE.md) holds DeepSpeed's files, `data_rank{r}.pt`, `rng_rank{r}.pt`, a `tokenizer/` copy and
the marker `ds_train.json`, written by rank 0 after every rank wrote, synced and checksummed its files.
It lists every file with its size and CRC-32 and each optimizer group's parameter names in the order the
optimizer holds them (`ds_train.consolidate` reads the masters by them). A checkpoint with a missing,
truncated or corrupted file, or a marker that is not a readable JSON object, is passed over with one
warning line. `checkpoints/latest` names the newest complete tag and is replaced atomically after it.
A save that cannot write (full disk, quota, I/O error) raises `CheckpointError` naming the error and the
previous complete checkpoint, left as it was. A checkpoint written by another number of ranks is loaded
through DeepSpeed's universal checkpoint: rank 0 converts it once into `step-N/universal/`, every rank
loads that, and the data stream resumes at the saved position, which every rank saved alike
(`ds_train.data.stream`).
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
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ds_train import distributed
from ds_train.errors import UsageError, first_line
from ds_train.fileio import write_text

log = logging.getLogger(__name__)

MARKER = "ds_train.json"
UNIVERSAL = "universal"  # step-N/universal/: DeepSpeed's universal checkpoint of step-N
UNIVERSAL_DONE = "converted.json"  # written last into universal/: the conversion finished
TAG_RE = re.compile(r"^step-(\d+)$")
OWNER_RE = re.compile(r"(?:pp_rank_|data_rank|rng_rank)(\d+)")  # the rank a file of a tag belongs to
CHUNK = 16 << 20  # bytes read at a time for a checksum


class CheckpointError(UsageError):
    """A checkpoint that cannot be used or written; the message names the reason (callers that convert or
    load tell it apart from other refusals)."""


@dataclass(frozen=True)
class Found:
    tag: str
    step: int
    path: Path
    meta: dict[str, Any]


def tag_for(step: int) -> str:
    return f"step-{step}"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
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
    """Collective: every rank calls it at the same step. Each rank syncs and checksums the files it owns
    (`owner`) while they are in the page cache; rank 0 gathers the records, writes the marker, then `latest`.
    Raises CheckpointError when this rank could not write its part (older checkpoints are untouched)."""
    tag = tag_for(step)
    path = ckpt_dir / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # re-saving a step (after a resume): no stale marker or files of the old save
    distributed.barrier()
    with _write_errors_reported(ckpt_dir, path, rank):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
        torch.save(data_state, path / f"data_rank{rank}.pt")
        torch.save(rng_state(), path / f"rng_rank{rank}.pt")
        if rank == 0 and tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, path / "tokenizer", dirs_exist_ok=True)
    distributed.barrier()
    with _write_errors_reported(ckpt_dir, path, rank):
        names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MARKER)
        mine = {name: _checksum(path / name, sync=True) for name in names if owner(name, world_size) == rank}
    files = {name: record for share in _gather(mine) for name, record in share.items()}
    if rank == 0:
        with _write_errors_reported(ckpt_dir, path, rank):
            marker = {**meta, "step": step, "world_size": world_size,
                      "zero_stage": engine.zero_optimization_stage(),
                      "param_groups": optimizer_param_names(engine), "files": dict(sorted(files.items()))}
            write_text(path / MARKER, json.dumps(marker, indent=1), fsync=True)
            write_text(ckpt_dir / "latest", tag, fsync=True)
        prune(ckpt_dir, keep_last)
        log.info("checkpoint %s saved", path)
    distributed.barrier()
    return path


def optimizer_param_names(engine) -> list[list[str]]:
    """Each optimizer group's parameter names in the order its fp32 masters and partitions follow, found
    as DeepSpeed's `_get_zero_param_shapes` finds them (its wrappers' 16-bit groups, else the groups)."""
    optimizer = engine.optimizer
    attrs = ("round_robin_bit16_groups", "bf16_groups", "fp16_groups", "bit16_groups")
    groups = next((getattr(optimizer, a) for a in attrs if getattr(optimizer, a, None)), None)
    if groups is None:
        groups = [group["params"] for group in optimizer.param_groups] if optimizer is not None else []
    names = {id(p): name for name, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group] for group in groups]


def owner(name: str, world_size: int) -> int:
    """The rank that checksums a file of a tag at save time: the rank in its name, rank 0 for the rest."""
    match = OWNER_RE.search(name)
    rank = int(match.group(1)) if match else 0
    return rank if rank < world_size else 0


def _gather(mine: Any) -> list[Any]:
    """Every rank's `mine`, by rank (collective when a process group of several ranks is up)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [mine]
    shares: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, mine)
    return shares


def _checksum(path: Path, sync: bool = False) -> dict[str, Any]:
    """{"size", "crc32"} of a file (CRC-32 as 8 hex digits), read in chunks; fsynced first with `sync`."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


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
    reason = first_line(err)
    try:
        reason += f"; {shutil.disk_usage(ckpt_dir).free / 2**30:.2f} GiB free there"
    except OSError:
        pass
    previous = find_latest(ckpt_dir, quiet=True)
    fallback = f"{previous.path} is intact and a restart resumes from it" if previous else "no earlier checkpoint"
    return f"rank {rank} could not write checkpoint {path} ({reason}); free space or fix the file system: {fallback}"


def read_marker(path: Path) -> dict[str, Any]:
    """The marker of tag directory `path`, a JSON object with a `files` map (else CheckpointError)."""
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"no {MARKER} marker (the save did not finish)")
    try:
        meta = json.loads(marker.read_bytes())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise CheckpointError(f"unreadable marker ({first_line(err)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"unreadable marker (not a JSON object with a files map: {_short(meta)})")
    if not all(isinstance(r, dict) and {"size", "crc32"} <= set(r) for r in meta["files"].values()):
        raise CheckpointError("unreadable marker (files without sizes and checksums: an older format)")
    return meta


def is_complete(path: Path) -> tuple[bool, str]:
    """A tag directory is complete when its marker is a readable JSON object and every file it lists is
    there with its recorded size (cheap: no file is read). Returns (complete, why not)."""
    try:
        meta = read_marker(path)
    except CheckpointError as err:
        return False, str(err)
    for name, record in meta["files"].items():
        f = path / name
        if not f.is_file():
            return False, f"{name} is missing"
        if f.stat().st_size != (size := record["size"]):
            return False, f"{name} has {f.stat().st_size} bytes, the save wrote {size} (truncated or changed)"
    return True, ""


def verify(path: Path, files: dict[str, Any], rank: int = 0, world_size: int = 1) -> str:
    """Compare this rank's share of the files (by size, largest first, dealt round-robin over the ranks)
    with their recorded checksums; returns why the first that differs is corrupt, "" when all match."""
    by_size = sorted(files, key=lambda name: (-int(files[name].get("size", 0)), name))
    for name in by_size[rank::world_size]:
        try:
            got = _checksum(path / name)["crc32"]
        except OSError as err:
            return f"{name} cannot be read ({first_line(err)})"
        if got != files[name].get("crc32"):
            return f"{name} does not match its checksum (crc32 {got}, saved {files[name].get('crc32')})"
    return ""


def list_tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(out, reverse=True)


def find_latest(ckpt_dir: Path, quiet: bool = False, checksums: bool = False) -> Found | None:
    """The newest complete checkpoint; torn ones (with `checksums`, corrupted ones too: then every rank of
    the process group calls it, checks a share of the files, and they agree) are warned of and passed over."""
    up = torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if up else (0, 1)
    for step, path in list_tags(ckpt_dir):
        ok, why = is_complete(path)
        if checksums:  # one verdict for all ranks, even where they saw different things
            why = why or verify(path, read_marker(path)["files"], rank, world)
            why = next((v for v in _gather(why) if v), "")
            ok = not why
        if ok:
            return Found(path.name, step, path, read_marker(path))
        if not quiet:
            log.warning("checkpoint %s is incomplete and is skipped: %s", path, why)
    return None


def find_for_resume(ckpt_dir: Path) -> Found | None:
    """Collective: the newest complete checkpoint whose files match their checksums; None without any
    checkpoint. Checkpoints none of which can be used are refused (starting at step 0 would prune them)."""
    found = find_latest(ckpt_dir, checksums=True)
    if found is None and list_tags(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} holds checkpoints and none is complete and intact (see the "
                              "warnings above): move them away to start afresh, or use another run.dir")
    return found


def locate(path: str | Path, tag: str | None = None) -> Found:
    """For `ds-export`: a run dir, its checkpoints/ dir or a tag dir (and an optional tag) -> the checkpoint
    (without a tag the newest complete one), complete and matching its checksums, else CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if (path / MARKER).exists() or any(path.glob("*model_states.pt")):  # a tag dir
        if tag is not None and path.name != tag:
            raise CheckpointError(f"{path} is the checkpoint {path.name}, not --tag {tag}")
        tag_dir = path
    elif tag is not None:
        tag_dir = ckpts / tag
        if not tag_dir.is_dir():
            raise CheckpointError(f"{ckpts}: no checkpoint named {tag!r}")
    elif (found := find_latest(ckpts)) is not None:
        tag_dir = found.path
    elif list_tags(ckpts):
        tag_dir = list_tags(ckpts)[0][1]  # none is complete: the newest one's reason is named below
    else:
        raise CheckpointError(f"{path} is not a checkpoint: no step-N checkpoints there")
    ok, why = is_complete(tag_dir)
    meta = read_marker(tag_dir) if ok else {}
    why = why or verify(tag_dir, meta["files"])
    if why:
        raise CheckpointError(f"{tag_dir}: {why}")
    match = TAG_RE.match(tag_dir.name)
    return Found(tag_dir.name, int(match.group(1)) if match else int(meta.get("step", 0)), tag_dir, meta)


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
        reason = first_line(err)
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
    from deepspeed.checkpoint import ds_to_universal  # slow to import; needed only to reshard

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
        write_text(scratch / UNIVERSAL_DONE, json.dumps({"from": path.name}), fsync=True)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(scratch, out)
    except Exception as err:  # noqa: BLE001 - the converter raises anything, unpickling errors included
        log.debug("ds_to_universal output:\n%s", chatter.getvalue())
        shutil.rmtree(scratch, ignore_errors=True)
        reason = first_line(err)
        raise CheckpointError(f"DeepSpeed could not convert {path} to a universal checkpoint ({reason}); "
                              "resume with the number of ranks that wrote it") from None
    log.debug("ds_to_universal output:\n%s", chatter.getvalue())
    log.info("converted %s to DeepSpeed's universal checkpoint %s", path, out)
    return out
