"""ZeRO consolidation: a checkpoint's full module state dict, read from DeepSpeed's files without an engine.

One reader per layout (DeepSpeed 0.19), each filling output tensors allocated once in the export dtype
(each value rounded once, from fp32), so memory stays at about one copy of the model in that dtype: the
rank files are mapped (`torch.load(weights_only=True, mmap=True)`, with only the four DeepSpeed types
its optimizer files pickle allowed), read tensor by tensor, and no rank's optimizer moments are read.
Where fp32 master weights exist they are used rather than the rounded 16-bit module weights. The
parameters of each optimizer group are named by the checkpoint marker's `param_groups`, recorded at save
time in the order the optimizer holds them (`ds_train.checkpoint.optimizer_param_names`); for ZeRO 1-3
they must equal DeepSpeed's own `param_shapes`, or the files are refused as not belonging together.

Layouts, per tag directory:
- stage 0: `mp_rank_00_model_states.pt` holds the whole module state (`module`); a bf16/fp16 run also keeps
  its fp32 masters there under `optimizer`: `fp32_groups` (one tensor per param) or `fp32_groups_flat`
  (one vector per group, params end to end), both in `param_groups` order.
- stages 1/2: `mp_rank_00_model_states.pt` holds `param_shapes` (per group, in flat order), buffers and
  `shared_params`; `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt` holds rank R's slice
  `single_partition_of_fp32_groups[g]` of each group's flat fp32 vector (rank slices concatenated in rank
  order, params laid end to end with `param_alignment_paddings`).
- stage 3: `zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt` per rank; `fp32_flat_groups` of rank R holds,
  for every param in order, its R-th slice of ceil(numel / world) elements (the last one padded).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ds_train.errors import UsageError, first_line

log = logging.getLogger(__name__)


def _deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes pickled inside ZeRO optimizer files (nothing else is allowed)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # importing DeepSpeed must not look for a GPU
    # DeepSpeed is imported here only: it takes seconds and is needed for ZeRO 1-3 files alone
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_state(path: Path, with_deepspeed_types: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True and mmap (tensors are paged in only when read)."""
    if not path.is_file():
        raise UsageError(f"{path}: missing checkpoint file")
    allowed = _deepspeed_safe_globals() if with_deepspeed_types else []
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise UsageError(
            f"{path.name}: holds pickled objects that weights_only=True refuses ({first_line(err, 200)})"
        ) from None
    except (RuntimeError, OSError, EOFError) as err:
        raise UsageError(f"{path}: unreadable checkpoint file ({first_line(err, 200)})") from None
    if not isinstance(state, dict):
        raise UsageError(f"{path}: not a DeepSpeed checkpoint file")
    return state


def optimizer_state(path: Path) -> dict[str, Any]:
    """The `optimizer_state_dict` of a ZeRO rank file (tensors mapped, not read)."""
    optim = load_state(path, with_deepspeed_types=True).get("optimizer_state_dict")
    if not isinstance(optim, dict):
        raise UsageError(f"{path.name}: not a ZeRO optimizer file (no optimizer_state_dict)")
    return optim


def _fp32_partitions(path: Path, key: str) -> list[torch.Tensor]:
    parts = optimizer_state(path).get(key)
    if not isinstance(parts, list | tuple) or not all(isinstance(t, torch.Tensor) for t in parts):
        raise UsageError(f"{path.name}: no fp32 partitions ({key})")
    return list(parts)


@dataclass
class Layout:
    """What the consolidation needs to know before it reads any weights."""

    stage: int
    world_size: int
    model_file: Path
    optim_files: list[Path]
    groups: list[list[str]]
    """The marker's `param_groups`: each optimizer group's parameter names, in the optimizer's order."""
    module_keys: list[str]
    """Every key of the module state dict, in order (params, tied aliases, buffers)."""
    shapes: dict[str, torch.Size]
    """Shape of every key."""


def _optim_name(tag_dir: Path, rank: int) -> Path:
    for prefix in ("zero", "bf16_zero"):
        path = tag_dir / f"{prefix}_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        if path.is_file():
            return path
    return tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def read_layout(tag_dir: Path, meta: dict[str, Any]) -> tuple[Layout, dict[str, Any]]:
    """The layout the marker describes, checked against the files. Returns it and the rank-0 model state."""
    stage, world, groups = meta.get("zero_stage"), meta.get("world_size"), meta.get("param_groups")
    if stage not in (0, 1, 2, 3) or not isinstance(world, int) or world < 1 or not isinstance(groups, list):
        raise UsageError(f"{tag_dir}: the marker lacks zero_stage, world_size or param_groups "
                         "(written by an older ds_train: resume and save it again)")
    model_name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    model_file = tag_dir / model_name
    model_state = load_state(model_file)
    optim_files = [_optim_name(tag_dir, r) for r in range(world)] if stage > 0 else []
    missing = [p.name for p in optim_files if not p.is_file()]
    if missing:
        raise UsageError(f"{tag_dir}: missing rank files for world size {world}: {', '.join(missing)}")
    if optim_files:
        count = optimizer_state(optim_files[0]).get("partition_count", 1)
        saved_by = max(count) if isinstance(count, list) else int(count)
        if saved_by != world:
            raise UsageError(f"{tag_dir}: DeepSpeed partitioned over {saved_by} ranks, the marker: {world}")
    module = model_state.get("module")
    if not isinstance(module, dict):
        raise UsageError(f"{model_file}: no module state")
    shapes = {k: torch.Size(v.shape) for k, v in module.items()}
    if stage > 0:
        param_shapes = _param_groups(model_state, model_file)
        if [list(g) for g in param_shapes] != groups:
            raise UsageError(f"{tag_dir}: DeepSpeed's param_shapes do not name the parameters the marker's "
                             "param_groups do: the files do not belong to this marker")
        for group in param_shapes:
            shapes.update(group)
    for k, v in (model_state.get("frozen_param_shapes") or {}).items():
        shapes[k] = torch.Size(v)
    layout = Layout(stage, world, model_file, optim_files, groups, list(module.keys()), shapes)
    return layout, model_state


class _Filler:
    """Output tensors in the export dtype, filled slice by slice, with a count of elements written."""

    def __init__(self, shapes: dict[str, torch.Size], dtype: torch.dtype) -> None:
        self.tensors = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}
        self.filled = dict.fromkeys(shapes, 0)

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        """Copy `values` (flat, any float dtype) into elements [start, start + len) of `name`."""
        self.tensors[name].view(-1)[start : start + values.numel()].copy_(values)
        self.filled[name] += values.numel()

    def check_complete(self, where: Path) -> None:
        short = [n for n, t in self.tensors.items() if self.filled[n] != t.numel()]
        if short:
            raise UsageError(f"{where}: the rank files do not cover parameters {', '.join(short[:5])}")


class _FlatView:
    """Read slices of the concatenation of a rank's flat group tensors without concatenating them."""

    def __init__(self, groups: list[torch.Tensor]) -> None:
        self.groups = groups
        self.starts = [0]
        for g in groups:
            self.starts.append(self.starts[-1] + g.numel())

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def pieces(self, lo: int, hi: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset from lo, flat piece) covering [lo, hi) of the concatenation."""
        for g, tensor in enumerate(self.groups):
            a, b = max(lo, self.starts[g]), min(hi, self.starts[g + 1])
            if a < b:
                yield a - lo, tensor.view(-1)[a - self.starts[g] : b - self.starts[g]]


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    # disable=None: no bar off a terminal (a log file would get every update)
    return tqdm(total=total, desc=desc, unit="param", disable=None if enabled else True, leave=False)


def _param_groups(model_state: dict[str, Any], where: Path) -> list[dict[str, torch.Size]]:
    groups = model_state.get("param_shapes")
    if not groups:
        raise UsageError(f"{where}: a ZeRO checkpoint without param_shapes")
    return [{k: torch.Size(v) for k, v in g.items()} for g in groups]


# ------------------------------------------------------------------------------------------------ stage 0


def _stage0_masters(layout: Layout, model_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a bf16/fp16 stage-0 run by name ({} when there are none: an fp32 run).

    Masters come in the optimizer's order without names; the marker's `param_groups` name them."""
    optim = model_state.get("optimizer")
    if not isinstance(optim, dict) or not ({"fp32_groups", "fp32_groups_flat"} & set(optim)):
        return {}
    module, where = model_state["module"], layout.model_file
    if "fp32_groups" in optim:  # one tensor per param
        flat = [t.reshape(-1) for group in optim["fp32_groups"] for t in group]
        names = [n for group in layout.groups for n in group]
        if [t.numel() for t in flat] != [module[n].numel() for n in names]:
            raise UsageError(f"{where}: the fp32 masters do not have the sizes of the marker's param_groups")
        return dict(zip(names, flat, strict=True))
    vectors = [t.reshape(-1) for t in optim["fp32_groups_flat"]]  # one vector per group, params end to end
    if len(vectors) != len(layout.groups):
        raise UsageError(f"{where}: {len(vectors)} fp32 master groups, the marker names {len(layout.groups)}")
    masters = {}
    for g, (vector, names) in enumerate(zip(vectors, layout.groups, strict=True)):
        sizes = [module[n].numel() for n in names]
        if sum(sizes) != vector.numel():
            raise UsageError(f"{where}: fp32 master group {g} holds {vector.numel()} elements, "
                             f"the marker's params need {sum(sizes)}")
        masters.update(zip(names, vector.split(sizes), strict=True))
    return masters


# --------------------------------------------------------------------------------------------- stages 1/2


def _consolidate_zero12(layout: Layout, model_state: dict[str, Any], out: _Filler, progress: bool) -> None:
    """Stages 1/2: rank R holds one contiguous slice of each group's flat fp32 vector."""
    groups = _param_groups(model_state, layout.model_file)
    first = optimizer_state(layout.optim_files[0])
    paddings = first.get("param_alignment_paddings") or [[0] * len(g) for g in groups]
    del first
    placed = []  # per group: (name, start, numel) in the group's flat vector
    for shapes, pads in zip(groups, paddings, strict=True):
        offset, entries = 0, []
        for (name, shape), pad in zip(shapes.items(), pads, strict=True):
            entries.append((name, offset, shape.numel()))
            offset += shape.numel() + pad
        placed.append(entries)
    rank_start = [0] * len(groups)
    bar = _progress(layout.world_size, "ranks", progress)
    for path in layout.optim_files:
        rank_start = _copy_zero12_rank(path, placed, rank_start, out)
        bar.update(1)
    bar.close()
    align = 2 * layout.world_size  # DeepSpeed pads each group's flat vector to a multiple of this
    for g, entries in enumerate(placed):
        used = entries[-1][1] + entries[-1][2] + paddings[g][-1] if entries else 0
        if math.ceil(used / align) != math.ceil(rank_start[g] / align):
            raise UsageError(f"{layout.model_file.parent}: group {g} holds {rank_start[g]} elements, "
                             f"its params need {used}: the files do not belong together")


def _copy_zero12_rank(
    path: Path, placed: list[list[tuple[str, int, int]]], rank_start: list[int], out: _Filler
) -> list[int]:
    """Copy one rank's slices; returns where the next rank starts in each group. The rank file is mapped
    only while this function runs."""
    parts = _fp32_partitions(path, "single_partition_of_fp32_groups")
    if len(parts) != len(placed):
        raise UsageError(f"{path.name}: {len(parts)} param groups, the model states list {len(placed)}")
    next_start = []
    for g, part in enumerate(parts):
        lo, hi = rank_start[g], rank_start[g] + part.numel()
        for name, start, numel in placed[g]:
            a, b = max(lo, start), min(hi, start + numel)
            if a < b:
                out.write(name, a - start, part.view(-1)[a - lo : b - lo])
        next_start.append(hi)
    return next_start


# ------------------------------------------------------------------------------------------------ stage 3


def _consolidate_zero3(layout: Layout, model_state: dict[str, Any], out: _Filler, progress: bool) -> None:
    """Stage 3: rank R holds the R-th ceil(numel / world) slice of every param, params end to end."""
    shapes = {k: v for g in _param_groups(model_state, layout.model_file) for k, v in g.items()}
    bar = _progress(layout.world_size * len(shapes), "params", progress)
    for rank, path in enumerate(layout.optim_files):
        _copy_zero3_rank(path, rank, layout.world_size, shapes, out, bar)
    bar.close()


def _copy_zero3_rank(
    path: Path, rank: int, world: int, shapes: dict[str, torch.Size], out: _Filler, bar: tqdm
) -> None:
    """Copy one rank's slice of every param (the rank file is mapped only while this runs)."""
    flat = _FlatView(_fp32_partitions(path, "fp32_flat_groups"))
    offset = 0
    for name, shape in shapes.items():
        numel = shape.numel()
        part = math.ceil(numel / world)
        keep = max(0, min(part, numel - rank * part))  # the last ranks' slices hold padding
        for at, piece in flat.pieces(offset, offset + keep):
            out.write(name, rank * part + at, piece)
        offset += part
        bar.update(1)
    if offset != flat.numel:
        raise UsageError(f"{path.name}: holds {flat.numel} elements, the param shapes need {offset}")


def _stage3_frozen(layout: Layout, tag_dir: Path, out: _Filler) -> None:
    """Stage 3 frozen params: each rank's model states file holds its slice of each."""
    for rank in range(layout.world_size):
        state = load_state(tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        for name, shape in (state.get("frozen_param_shapes") or {}).items():
            numel = torch.Size(shape).numel()
            part = math.ceil(numel / layout.world_size)
            keep = max(0, min(part, numel - rank * part))
            out.write(name, rank * part, state["frozen_param_fragments"][name].view(-1)[:keep])


# --------------------------------------------------------------------------------------------- the module


def _tied_aliases(module: dict[str, torch.Tensor], model_state: dict[str, Any]) -> dict[str, str]:
    """alias -> source for tied params: DeepSpeed's `shared_params`, else tensors sharing storage."""
    shared = model_state.get("shared_params")
    if shared:
        return dict(shared)
    aliases, seen = {}, {}
    for name, t in module.items():
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def consolidate(
    tag_dir: Path, meta: dict[str, Any], dtype: torch.dtype = torch.float32, progress: bool = False
) -> tuple[dict[str, torch.Tensor], Layout]:
    """The full module state dict of a checkpoint tag directory whose marker is `meta` (found and verified
    by `ds_train.checkpoint`), floats in `dtype` (from fp32 masters where the checkpoint has them), and the
    layout read. Tied params share one tensor, as in the module."""
    tag_dir = Path(tag_dir)
    layout, model_state = read_layout(tag_dir, meta)
    module = model_state["module"]
    buffers = set(model_state.get("buffer_names") or [])
    aliases = _tied_aliases(module, model_state)
    params = [k for k in layout.module_keys if k not in buffers and k not in aliases]
    out = _Filler({k: layout.shapes[k] for k in params}, dtype)
    if layout.stage == 0:
        masters = _stage0_masters(layout, model_state)
        for name in params:
            out.write(name, 0, masters.get(name, module[name]).reshape(-1))
    else:
        _fill_zero(layout, model_state, params, out, tag_dir, progress)
    out.check_complete(tag_dir)
    result = {}
    for key in layout.module_keys:
        if key in aliases:
            result[key] = out.tensors[aliases[key]]
        elif key in buffers:
            b = module[key]
            result[key] = (b.to(dtype) if b.is_floating_point() else b).clone()
        else:
            result[key] = out.tensors[key]
    return result, layout


def _fill_zero(
    layout: Layout, model_state: dict[str, Any], params: list[str], out: _Filler, tag_dir: Path,
    progress: bool,
) -> None:
    """ZeRO 1-3: trainable params from the optimizer partitions, frozen ones from their fragments, and
    (stages 1/2 only) any other param from the module weights, which those stages save whole."""
    module = model_state.pop("module")
    frozen = model_state.get("frozen_param_shapes") or {}
    trained = {k for g in layout.groups for k in g}
    rest = [k for k in params if k not in trained and k not in frozen]
    if rest and layout.stage == 3:
        raise UsageError(f"{layout.model_file.name}: params {rest[:5]} are in no optimizer partition")
    for name in rest:
        log.info("%s is not trained by the optimizer; exporting its saved module weight", name)
        out.write(name, 0, module[name].reshape(-1))
    if layout.stage == 3:
        _stage3_frozen(layout, tag_dir, out)
        _consolidate_zero3(layout, model_state, out, progress)
    else:
        for name, fragment in (model_state.get("frozen_param_fragments") or {}).items():
            out.write(name, 0, fragment.reshape(-1))
        _consolidate_zero12(layout, model_state, out, progress)
