"""Checkpoint -> `transformers` directory: consolidated fp16 (or bf16/fp32) weights from any ZeRO stage.

`ds-export RUN_OR_CHECKPOINT_DIR OUT_DIR [--dtype fp16|bf16|fp32] [--tag step-N] [--force]`

The DeepSpeed files are read directly (no DeepSpeed engine, no GPU, no `zero_to_fp32`), with
`torch.load(weights_only=True, mmap=True)`, allowing only the four DeepSpeed types that its optimizer files
pickle. Consolidation streams rank file by rank file and tensor by tensor into output tensors allocated
once in the output dtype (each value is rounded once, from fp32): no rank's optimizer moments are ever read,
no fp32 copy of the model is built, and the weights are written to safetensors tensor by tensor. Where fp32
master weights exist (the optimizer partitions of ZeRO 1/2/3, the fp32 groups of a bf16/fp16 stage-0 run)
they are used rather than the rounded 16-bit module weights. `bench/export_bench.py` measures time and
peak RSS on a pycodegpt-110m checkpoint.

File layouts (DeepSpeed 0.19), per tag directory:
- stage 0: `mp_rank_00_model_states.pt` holds the whole module state (`module`); a bf16/fp16 run also keeps
  its fp32 masters there under `optimizer` (`fp32_groups` or `fp32_groups_flat`, by optimizer param order).
- stages 1/2: `mp_rank_00_model_states.pt` holds `param_shapes` (per param group, in flat order), buffers
  and `shared_params`; `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt` holds rank R's slice
  `single_partition_of_fp32_groups[g]` of each group's flat fp32 vector (rank slices concatenated in rank
  order, params laid end to end with `param_alignment_paddings`).
- stage 3: `zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt` per rank; `fp32_flat_groups` of rank R holds,
  for every param in order, its R-th slice of ceil(numel / world) elements (the last one padded).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MARKER = "ds_train.json"
MODALITY_MAP = "modality_map.json"


class ExportError(ValueError):
    """A checkpoint or output that cannot be exported; the message is one plain line."""


# --------------------------------------------------------------------------------------------------------
# Finding the checkpoint


def resolve_tag_dir(path: str | Path, tag: str | None = None) -> Path:
    """A run dir (uses `checkpoints/latest`), a checkpoints dir (with `latest`) or a tag dir -> tag dir."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: no such directory")
    if _is_tag_dir(path):
        if tag is not None and path.name != tag:
            raise ExportError(f"{path} is the checkpoint {path.name}, not --tag {tag}")
        return path
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if tag is None:
        latest = ckpts / "latest"
        if not latest.is_file():
            raise ExportError(
                f"{path} is not a checkpoint: no DeepSpeed model states and no checkpoints/latest"
            )
        tag = latest.read_text().strip()
    tag_dir = ckpts / tag
    if not tag_dir.is_dir():
        raise ExportError(f"{ckpts}: no checkpoint named {tag!r}")
    if not _is_tag_dir(tag_dir):
        raise ExportError(f"{tag_dir} is not a checkpoint: no DeepSpeed model states file")
    return tag_dir


def _is_tag_dir(path: Path) -> bool:
    return any(path.glob("*model_states.pt")) or (path / MARKER).is_file()


def read_marker(tag_dir: Path) -> dict[str, Any]:
    """The `ds_train.json` marker that rank 0 writes last: its absence means an unfinished save."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        raise ExportError(f"{tag_dir}: unfinished save (no {MARKER} marker)")
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{marker}: unreadable marker ({err})") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{marker}: the marker is not a JSON object")
    return meta


# --------------------------------------------------------------------------------------------------------
# Reading DeepSpeed files safely


def _deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes pickled inside ZeRO optimizer files (nothing else is allowed)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # importing DeepSpeed must not look for a GPU
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_state(path: Path, with_deepspeed_types: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True and mmap (tensors are paged in only when read)."""
    if not path.is_file():
        raise ExportError(f"{path}: missing checkpoint file")
    allowed = _deepspeed_safe_globals() if with_deepspeed_types else []
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ExportError(
            f"{path.name}: holds pickled objects that weights_only=True refuses ({_first_line(err)})"
        ) from None
    except (RuntimeError, OSError, EOFError) as err:
        raise ExportError(f"{path}: unreadable checkpoint file ({_first_line(err)})") from None
    if not isinstance(state, dict):
        raise ExportError(f"{path}: not a DeepSpeed checkpoint file")
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


# --------------------------------------------------------------------------------------------------------
# The layout of a checkpoint


@dataclass
class Layout:
    """What the consolidation needs to know before it reads any weights."""

    stage: int
    world_size: int
    model_file: Path
    optim_files: list[Path]
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


def _rank_count(tag_dir: Path, stage: int) -> int:
    """World size from the file names (cross-checked against the marker and the optimizer files)."""
    pattern = "*zero_pp_rank_*_mp_rank_00_optim_states.pt" if stage > 0 else "mp_rank_*_model_states.pt"
    ranks = [int(p.name.split("_pp_rank_")[1].split("_")[0]) for p in tag_dir.glob(pattern)] if stage else [0]
    return max(ranks) + 1 if ranks else 0


def optimizer_state(path: Path) -> dict[str, Any]:
    """The `optimizer_state_dict` of a ZeRO rank file (tensors mapped, not read)."""
    optim = load_state(path, with_deepspeed_types=True).get("optimizer_state_dict")
    if not isinstance(optim, dict):
        raise ExportError(f"{path.name}: not a ZeRO optimizer file (no optimizer_state_dict)")
    return optim


def _fp32_partitions(path: Path, key: str) -> list[torch.Tensor]:
    parts = optimizer_state(path).get(key)
    if not isinstance(parts, list | tuple) or not all(isinstance(t, torch.Tensor) for t in parts):
        raise ExportError(f"{path.name}: no fp32 partitions ({key})")
    return list(parts)


def _partition_count(optim_file: Path) -> int:
    """The number of ranks DeepSpeed partitioned the optimizer over, as recorded in a rank's file."""
    count = optimizer_state(optim_file).get("partition_count", 1)
    return max(count) if isinstance(count, list) else int(count)


def detect_stage(tag_dir: Path) -> int:
    """0, 1, 2 or 3 from the files present (stage 1 vs 2 read from the optimizer file)."""
    if (tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():
        return 3
    if not (tag_dir / "mp_rank_00_model_states.pt").is_file():
        raise ExportError(f"{tag_dir} is not a DeepSpeed checkpoint: no mp_rank_00_model_states.pt")
    if not any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        return 0
    optim = optimizer_state(_optim_name(tag_dir, 0))
    return int(optim.get("zero_stage", 1))


def read_layout(tag_dir: Path, meta: dict[str, Any]) -> tuple[Layout, dict[str, Any]]:
    """Inspect the files; refuse missing rank files. Returns the layout and the rank-0 model state."""
    stage = detect_stage(tag_dir)
    model_file = tag_dir / (
        "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    )
    model_state = load_state(model_file)
    world = int(meta.get("world_size") or max(1, _rank_count(tag_dir, stage)))
    optim_files: list[Path] = []
    if stage > 0:
        optim_files = [_optim_name(tag_dir, r) for r in range(world)]
        missing = [p.name for p in optim_files if not p.is_file()]
        if stage == 3:
            missing += [
                f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
                for r in range(world)
                if not (tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").is_file()
            ]
        if missing:
            raise ExportError(
                f"{tag_dir}: missing rank files for world size {world}: {', '.join(sorted(missing))}"
            )
        on_disk, saved_by = _rank_count(tag_dir, stage), _partition_count(optim_files[0])
        if not on_disk == saved_by == world:
            raise ExportError(
                f"{tag_dir}: {on_disk} ranks' optimizer files, DeepSpeed partitioned over {saved_by} "
                f"ranks, the marker says world size {world}"
            )
    module = model_state.get("module")
    if not isinstance(module, dict):
        raise ExportError(f"{model_file}: no module state")
    shapes = {k: torch.Size(v.shape) for k, v in module.items()}
    for group in model_state.get("param_shapes") or []:
        shapes.update({k: torch.Size(v) for k, v in group.items()})
    for k, v in (model_state.get("frozen_param_shapes") or {}).items():
        shapes[k] = torch.Size(v)
    layout = Layout(stage, world, model_file, optim_files, list(module.keys()), shapes)
    return layout, model_state


# --------------------------------------------------------------------------------------------------------
# Consolidation


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
            raise ExportError(f"{where}: the rank files do not cover parameters {', '.join(short[:5])}")


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
    return tqdm(total=total, desc=desc, unit="param", disable=not enabled, leave=False)


def _param_groups(model_state: dict[str, Any], where: Path) -> list[dict[str, torch.Size]]:
    groups = model_state.get("param_shapes")
    if not groups:
        raise ExportError(f"{where}: a ZeRO checkpoint without param_shapes")
    return [{k: torch.Size(v) for k, v in g.items()} for g in groups]


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
            raise ExportError(
                f"{layout.model_file.parent}: group {g} holds {rank_start[g]} elements, "
                f"its params need {used}: the files do not belong together"
            )


def _copy_zero12_rank(
    path: Path, placed: list[list[tuple[str, int, int]]], rank_start: list[int], out: _Filler
) -> list[int]:
    """Copy one rank's slices; returns where the next rank starts in each group. The rank file is mapped
    only while this function runs."""
    parts = _fp32_partitions(path, "single_partition_of_fp32_groups")
    if len(parts) != len(placed):
        raise ExportError(f"{path.name}: {len(parts)} param groups, the model states list {len(placed)}")
    next_start = []
    for g, part in enumerate(parts):
        lo, hi = rank_start[g], rank_start[g] + part.numel()
        for name, start, numel in placed[g]:
            a, b = max(lo, start), min(hi, start + numel)
            if a < b:
                out.write(name, a - start, part.view(-1)[a - lo : b - lo])
        next_start.append(hi)
    return next_start


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
        raise ExportError(f"{path.name}: holds {flat.numel} elements, the param shapes need {offset}")


def _stage3_frozen(layout: Layout, tag_dir: Path, out: _Filler) -> None:
    """Stage 3 frozen params: each rank's model states file holds its slice of each."""
    for rank in range(layout.world_size):
        state = load_state(tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        for name, shape in (state.get("frozen_param_shapes") or {}).items():
            numel = torch.Size(shape).numel()
            part = math.ceil(numel / layout.world_size)
            keep = max(0, min(part, numel - rank * part))
            out.write(name, rank * part, state["frozen_param_fragments"][name].view(-1)[:keep])


def _stage0_masters(model_state: dict[str, Any], params: list[str]) -> dict[str, torch.Tensor]:
    """Name the fp32 master weights of a bf16/fp16 stage-0 run ({} when there are none).

    Masters come in optimizer order without names. They are matched to the params in module order (then in
    the decay-first order of `ds_train.optim.param_groups`), skipping params the optimizer does not hold:
    a master is taken for a param only if it has the param's size and rounds exactly to its saved 16-bit
    weight, and an order is accepted only if it places every master."""
    optim = model_state.get("optimizer")
    if not isinstance(optim, dict) or not ({"fp32_groups", "fp32_groups_flat"} & set(optim)):
        return {}
    if "fp32_groups" in optim:
        masters = [t.reshape(-1) for group in optim["fp32_groups"] for t in group]
    else:
        masters = [t.reshape(-1) for t in optim["fp32_groups_flat"]]
    module = model_state["module"]
    decay = [n for n in params if module[n].ndim >= 2 and "wte" not in n and "wpe" not in n]
    for order in (params, decay + [n for n in params if n not in decay]):
        named = _match_masters(masters, order, module, flat="fp32_groups" not in optim)
        if named is not None:
            return named
    log.warning("stage-0 fp32 master weights do not match the parameters; exporting the saved module weights")
    return {}


def _match_masters(
    masters: list[torch.Tensor], order: list[str], module: dict[str, torch.Tensor], flat: bool
) -> dict[str, torch.Tensor] | None:
    """Greedy in-order matching; with `flat`, each master vector holds several params end to end."""
    named, group, at = {}, 0, 0
    for name in order:
        if group == len(masters):
            break
        saved = module[name]
        size = saved.numel() if flat else masters[group].numel()
        piece = masters[group][at : at + size]
        if piece.numel() == saved.numel() and torch.equal(piece.to(saved.dtype), saved.reshape(-1)):
            named[name] = piece
            at += size
            if at == masters[group].numel():
                group, at = group + 1, 0
    return named if group == len(masters) else None


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
    tag_dir: Path,
    dtype: torch.dtype = torch.float32,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The full module state dict of a checkpoint tag directory, floats in `dtype` (from fp32 masters
    where the checkpoint has them). Tied params share one tensor, as in the module."""
    tag_dir = Path(tag_dir)
    layout, model_state = read_layout(tag_dir, meta if meta is not None else {})
    module = model_state["module"]
    buffers = set(model_state.get("buffer_names") or [])
    aliases = _tied_aliases(module, model_state)
    params = [k for k in layout.module_keys if k not in buffers and k not in aliases]
    out = _Filler({k: layout.shapes[k] for k in params}, dtype)
    if layout.stage == 0:
        masters = _stage0_masters(model_state, params)
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
    return result


def _fill_zero(
    layout: Layout,
    model_state: dict[str, Any],
    params: list[str],
    out: _Filler,
    tag_dir: Path,
    progress: bool,
) -> None:
    """ZeRO 1-3: trainable params from the optimizer partitions, frozen ones from their fragments, and
    (stages 1/2 only) any other param from the module weights, which those stages save whole."""
    module = model_state.pop("module")
    frozen = model_state.get("frozen_param_shapes") or {}
    trained = {k for g in _param_groups(model_state, layout.model_file) for k in g}
    rest = [k for k in params if k not in trained and k not in frozen]
    if rest and layout.stage == 3:
        raise ExportError(f"{layout.model_file.name}: params {rest[:5]} are in no optimizer partition")
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


# --------------------------------------------------------------------------------------------------------
# The transformers directory


@dataclass
class ExportResult:
    """What `export` wrote and what it cost."""

    out_dir: Path
    tag_dir: Path
    stage: int
    world_size: int
    dtype: str
    num_params: int
    seconds: float
    peak_rss_mib: float


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} is not empty (pass --force to replace it)")


def _tokenizer_dir(tag_dir: Path) -> Path:
    for candidate in (tag_dir / "tokenizer", tag_dir.parent.parent / "tokenizer"):
        if (candidate / "separation.json").is_file():
            return candidate
    raise ExportError(f"{tag_dir}: no tokenizer/ copy with separation.json beside the checkpoint")


def _model_config(meta: dict[str, Any], tag_dir: Path):
    from ds_train.model import GPTNeoConfig

    fields = meta.get("model")
    if not isinstance(fields, dict):
        raise ExportError(f"{tag_dir / MARKER}: no model config in the marker")
    try:
        return (
            GPTNeoConfig.from_dict(fields) if hasattr(GPTNeoConfig, "from_dict") else GPTNeoConfig(**fields)
        )
    except (TypeError, ValueError) as err:
        raise ExportError(f"{tag_dir / MARKER}: bad model config ({_first_line(err)})") from None


def write_tokenizer(tokenizer_dir: Path, separated: list[int], out_dir: Path) -> tuple[int, int, int]:
    """Save the tokenizer with one added token `<code:PIECE>` per separated id (ids V .. V+|S|-1, in
    order), so every id of the exported table decodes. Returns (V, eot id, pad id)."""
    from transformers import AddedToken

    from ds_train.data.tokenizer import EOT, PAD, load_tokenizer

    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except ValueError as err:
        raise ExportError(_first_line(err)) from None
    vocab_size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(separated)
    tokenizer.add_tokens([AddedToken(f"<code:{p}>", special=False, normalized=False) for p in pieces])
    got = tokenizer.convert_tokens_to_ids([f"<code:{p}>" for p in pieces])
    if got != list(range(vocab_size, vocab_size + len(separated))):
        raise ExportError(f"{tokenizer_dir}: the code tokens did not get ids {vocab_size}..: a name is taken")
    tokenizer.save_pretrained(out_dir)
    return vocab_size, tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(PAD)


def _hf_weights(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """transformers keys, without the tied head (GPTNeoForCausalLM ties it to the token table on load)."""
    from ds_train.model import to_hf_state_dict

    try:
        hf = to_hf_state_dict(state, config)
    except ValueError as err:
        raise ExportError(_first_line(err)) from None
    head, table = hf.get("lm_head.weight"), hf.get("transformer.wte.weight")
    if head is not None and (head is table or torch.equal(head, table)):
        del hf["lm_head.weight"]
    return {k: v.contiguous() for k, v in hf.items()}


_SAFETENSORS_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a .safetensors file tensor by tensor (`safetensors.torch.save_file` first copies every tensor
    into one bytes buffer: a second copy of the model). Format: u64 little-endian header length, the JSON
    header {name: {dtype, shape, data_offsets}} padded to 8 bytes, then the raw little-endian data."""
    if sys.byteorder != "little":
        raise ExportError("writing safetensors needs a little-endian machine")
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_export(tag_dir: Path, meta: dict[str, Any], state: dict[str, torch.Tensor], out_dir: Path) -> int:
    """Write config, weights, generation config, tokenizer and modality map into `out_dir` (empty).
    Returns the number of exported parameters."""
    from transformers import GenerationConfig

    from ds_train.model import hf_config_dict

    config = _model_config(meta, tag_dir)
    separated = list(config.separated_ids)
    vocab_size, eot, pad = write_tokenizer(_tokenizer_dir(tag_dir), separated, out_dir)
    if vocab_size != config.vocab_size:
        raise ExportError(
            f"{tag_dir}: the tokenizer has {vocab_size} tokens, the model V = {config.vocab_size}"
        )
    weights = _hf_weights(state, config)
    save_safetensors(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    hf_config = {**hf_config_dict(config), "eos_token_id": eot, "pad_token_id": pad}
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    GenerationConfig(eos_token_id=eot, pad_token_id=pad).save_pretrained(out_dir)
    modality = {
        "separation": str(meta.get("separation", "none" if not separated else "custom")),
        "base_vocab_size": vocab_size,
        "separated_ids": separated,
    }
    (out_dir / MODALITY_MAP).write_text(json.dumps(modality) + "\n")
    return sum(t.numel() for t in weights.values())


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "fp16",
    tag: str | None = None,
    force: bool = False,
    progress: bool = False,
) -> ExportResult:
    """Consolidate the checkpoint (run dir, checkpoints dir or tag dir) into a transformers directory."""
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    tag_dir = resolve_tag_dir(checkpoint, tag)
    meta = read_marker(tag_dir)
    layout, _ = read_layout(tag_dir, meta)  # refuses missing rank files before any weight is read
    state = consolidate(tag_dir, DTYPES[dtype], meta, progress)
    check_finite(state, dtype)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        num_params = write_export(tag_dir, meta, state, staging)
        del state
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(
        out_dir,
        tag_dir,
        layout.stage,
        layout.world_size,
        dtype,
        num_params,
        time.perf_counter() - start,
        peak_rss_mib(),
    )


def check_finite(state: dict[str, torch.Tensor], dtype: str) -> None:
    """Refuse weights that are inf/nan in the output dtype (diverged training, or beyond fp16's range)."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        hint = " (beyond fp16's range? try --dtype bf16)" if dtype == "fp16" else ""
        raise ExportError(f"non-finite weights in {dtype} in {', '.join(bad[:5])}{hint}")


export_checkpoint = export
"""The name the trainer calls after its final checkpoint."""


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished export into place; a previous export there goes only after the new one is in."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


# --------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ds-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one step-N tag dir")
    parser.add_argument("out_dir", help="the transformers directory to write")
    parser.add_argument("--dtype", default="fp16", help="fp16 (default), bf16 or fp32")
    parser.add_argument("--tag", default=None, help="export this tag (step-N) instead of `latest`")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`ds-export`: prints one summary line; bad input gives one error line and exit code 2."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = export(
            args.checkpoint,
            args.out_dir,
            args.dtype,
            args.tag,
            args.force,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except ExportError as err:
        print(f"ds-export: error: {err}", file=sys.stderr)
        return 2
    print(
        f"exported {res.tag_dir} (ZeRO-{res.stage}, {res.world_size} ranks) -> {res.out_dir}: "
        f"{res.num_params:,} params in {res.dtype}, {res.seconds:.1f} s, peak RSS {res.peak_rss_mib:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
