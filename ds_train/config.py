"""The run configuration: typed nested dataclasses, YAML recipes, `--section.key=value` overrides.

Precedence: dataclass defaults < YAML files (in the order given) < command-line overrides.
The defaults are the embedded default job: a tiny GPT-Neo trained from scratch on a corpus mined
from this machine's Python sources, Code CLM + partial separation, DeepSpeed ZeRO-2.

`validate()` reports every problem at once; `batch_arithmetic()` is the one owner of
global batch = micro batch x accumulation x data-parallel size. `to_yaml()` is what
`ds-train --print-config` prints and what RUN_DIR/config.yaml holds; `ds_train.config_cli` makes the
command line (`--help` from the field docstrings).

The loader is our own rather than a library's: jsonargparse 4.53 and tyro 1.0 (the candidates that read
field docstrings) both stop at the first bad value or unknown key, so a user with three typos would
fix them in three runs; they also take neither `a,b` for a list nor YAML files as positional arguments,
which every recipe, launch script and README example uses.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ds_train.data.encode import OBJECTIVES
from ds_train.data.tokenizer import DEFAULT_VOCAB_SIZE, SEPARATION_MODES
from ds_train.errors import UsageError
from ds_train.fileio import write_text
from ds_train.model import FLAVORS, LOCAL_ATTENTION

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EXPORT_DTYPES = ("fp16", "bf16", "fp32")
DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


class ConfigError(UsageError):
    """A configuration problem, worded for the user; several problems are joined by newlines."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config, tokenizer, checkpoints, TensorBoard logs and the export go here."""
    seed: int = 1234
    """Seed for model init, data order and corruption draws."""


@dataclass
class DataConfig:
    source: str = "mined"
    """`mined` (mine Python sources on this machine), local files/folders (comma separated),
    or a hub dataset name such as `huawei-noah/python_text2code`."""
    mine_paths: list[str] = field(default_factory=list)
    """Source trees to mine when `source` is `mined`; empty = this interpreter's stdlib and site-packages."""
    mine_limit: int = 6000
    """At most this many mined pairs (0 = no limit)."""
    tokenizer: str = ""
    """An existing tokenizer directory; empty = train a sentencepiece tokenizer into the run directory."""
    vocab_size: int = DEFAULT_VOCAB_SIZE
    """Vocabulary size when a tokenizer is trained."""
    seq_len: int = 512
    """Packed sequence length."""
    num_workers: int = 0
    """Dataloader worker processes per rank."""
    drop_overlong: bool = True
    """Drop pairs longer than `seq_len` (counted); False truncates them."""
    trace_ids: bool = False
    """Append the `_id`s each rank trained on, one JSON line per step, to RUN_DIR/trace/rank{r}.jsonl
    (an audit of "every example once per epoch" across kills and resumes; a resumed run re-writes the
    steps after its checkpoint, so the last line of a step counts)."""
    val_share: float = 0.0
    """Held-out share of the corpus for the validation loss, chosen by a hash of each pair's `_id` (the
    same pairs in every run, rank count and resume; they never train). 0 = none."""
    val_source: str = ""
    """A validation corpus (pair files or a packed folder) instead of `val_share`; its `_id`s never train."""


@dataclass
class ModelConfig:
    flavor: str = "tiny"
    """Named model shape (see `ds_train.model.FLAVORS`)."""
    init_from: str = ""
    """A local `transformers` GPT-Neo directory to start from; empty = random init."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass."""
    compile: bool = True
    """torch.compile the block stack on a GPU (the fast path; ignored on the CPU)."""
    loss_chunk_size: int = 4096
    """Target rows per chunk of the fused loss."""
    local_attention: str = "always"
    """GPT-Neo's local layers: "always" keep their window (GPT-Neo), "generation_only" train every layer
    as global and window only when the export generates (the original work's training)."""


@dataclass
class ObjectiveConfig:
    name: str = "code_clm"
    """One of text_code_clm, code_clm, corrupt_code_clm, prefix_code_clm."""
    separation: str = "partial"
    """Embedding separation: none, partial or full."""
    corrupt_prob: float = 0.15
    """Corrupt Code CLM: share of docstring tokens corrupted."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (the original work used 1e-5 when continuing a pre-trained model)."""
    min_lr: float = 1e-4
    """Floor of the cosine decay (original: 1e-6)."""
    warmup_ratio: float = 0.01
    """Share of `train.max_steps` spent in linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases, norms and embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 = off)."""


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Optimizer steps to train for (the learning-rate schedule spans them)."""
    stop_at_step: int = 0
    """Stop this invocation after this step with a checkpoint (0 = run to max_steps); for jobs on
    time-limited allocations: the next start resumes and the schedule still spans max_steps."""
    micro_batch_size: int = 8
    """Packed sequences per rank per forward pass."""
    grad_accum: int = 0
    """Micro batches per optimizer step; 0 = derive it from `global_batch_size` (or 1)."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all ranks; 0 = micro x accumulation x data-parallel size."""
    precision: str = "auto"
    """auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16 (GPU only)."""
    deepspeed: list[str] = field(default_factory=lambda: ["zero2.json"])
    """DeepSpeed JSON files (ZeRO, offload) merged in order; names are looked up in ds_configs/."""
    log_every: int = 10
    """Steps between metric reports."""
    nonfinite: str = "stop"
    """What a NaN/inf loss (bf16/fp32) does: `stop` the run, or `skip` the step (counted)."""
    nonfinite_limit: int = 20
    """With `nonfinite=skip`: stop the run after this many non-finite batches in a row (the weights
    themselves are then likely broken, and skipping would only burn through the data)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    """Steps between checkpoints (a final one is always written)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted."""
    resume: bool = True
    """Resume from the latest complete checkpoint in the run directory if there is one."""


@dataclass
class ExportConfig:
    enabled: bool = True
    """Export the final checkpoint as a `transformers` directory (RUN_DIR/export)."""
    dtype: str = "fp16"
    """fp16, bf16 or fp32."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Steps between validation losses (`val/loss`) when `data.val_share` or `data.val_source` is set;
    0 = after the last step only."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int = 1, has_gpu: bool = False) -> None:
        """Raise ConfigError listing every problem found (values, batch arithmetic, files)."""
        problems = _value_problems(self, has_gpu)
        try:
            batch_arithmetic(self.train, world_size)
        except ConfigError as err:
            problems.append(str(err))
        if problems:
            raise ConfigError("\n".join(problems))


@dataclass(frozen=True)
class Batch:
    """Derived batch sizes: global = micro x accumulation x data-parallel size."""

    micro: int
    accum: int
    global_: int
    world_size: int


def batch_arithmetic(train: TrainConfig, world_size: int) -> Batch:
    """The one place that derives and checks the batch sizes."""
    micro, accum, glob = train.micro_batch_size, train.grad_accum, train.global_batch_size
    if micro <= 0 or world_size <= 0:
        raise ConfigError(f"train.micro_batch_size ({micro}) and the world size ({world_size}) must be positive")
    if accum < 0 or glob < 0:
        raise ConfigError("train.grad_accum and train.global_batch_size must not be negative")
    if glob == 0:
        accum = accum or 1
        return Batch(micro, accum, micro * accum * world_size, world_size)
    per_step = micro * world_size
    if accum == 0:
        if glob % per_step:
            raise ConfigError(
                f"train.global_batch_size={glob} is not a multiple of micro_batch_size x world size "
                f"= {micro} x {world_size} = {per_step}"
            )
        return Batch(micro, glob // per_step, glob, world_size)
    if micro * accum * world_size != glob:
        raise ConfigError(
            f"train.global_batch_size={glob} != micro_batch_size x grad_accum x world size "
            f"= {micro} x {accum} x {world_size} = {micro * accum * world_size}"
        )
    return Batch(micro, accum, glob, world_size)


def _value_problems(cfg: Config, has_gpu: bool) -> list[str]:
    p: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            p.append(msg)

    need(cfg.objective.name in OBJECTIVES,
         f"objective.name={cfg.objective.name!r}: expected one of {', '.join(OBJECTIVES)}")
    need(cfg.objective.separation in SEPARATION_MODES,
         f"objective.separation={cfg.objective.separation!r}: expected one of {', '.join(SEPARATION_MODES)}")
    need(0.0 <= cfg.objective.corrupt_prob <= 1.0,
         f"objective.corrupt_prob={cfg.objective.corrupt_prob}: expected 0..1")
    need(cfg.model.flavor in FLAVORS, f"model.flavor={cfg.model.flavor!r}: expected one of {', '.join(FLAVORS)}")
    if cfg.model.flavor in FLAVORS:
        n_pos = FLAVORS[cfg.model.flavor].get("n_positions", 0)
        need(cfg.data.seq_len <= n_pos,
             f"data.seq_len={cfg.data.seq_len} exceeds the {n_pos} positions of model.flavor={cfg.model.flavor}")
    need(cfg.model.loss_chunk_size > 0, "model.loss_chunk_size must be positive")
    need(cfg.model.local_attention in LOCAL_ATTENTION,
         f"model.local_attention={cfg.model.local_attention!r}: expected one of {', '.join(LOCAL_ATTENTION)}")
    need(not cfg.model.init_from or Path(cfg.model.init_from).is_dir(),
         f"model.init_from={cfg.model.init_from!r}: no such directory")
    need(not cfg.data.tokenizer or Path(cfg.data.tokenizer).is_dir(),
         f"data.tokenizer={cfg.data.tokenizer!r}: no such directory")
    need(cfg.data.seq_len >= 16, f"data.seq_len={cfg.data.seq_len}: must be at least 16")
    need(cfg.data.vocab_size >= 300, f"data.vocab_size={cfg.data.vocab_size}: must be at least 300")
    need(cfg.data.num_workers >= 0, "data.num_workers must not be negative")
    need(cfg.data.mine_limit >= 0, "data.mine_limit must not be negative")
    need(0 <= cfg.data.val_share < 1, f"data.val_share={cfg.data.val_share}: expected 0 <= share < 1")
    need(not (cfg.data.val_share and cfg.data.val_source), "data.val_share and data.val_source: set one of them")
    need(cfg.eval.every_steps >= 0, "eval.every_steps must not be negative")
    need(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr}: must be positive")
    need(0 <= cfg.optim.min_lr <= cfg.optim.lr, f"optim.min_lr={cfg.optim.min_lr}: must be within 0..optim.lr")
    need(0 <= cfg.optim.warmup_ratio < 1, f"optim.warmup_ratio={cfg.optim.warmup_ratio}: expected 0..1")
    need(cfg.optim.grad_clip >= 0, "optim.grad_clip must not be negative")
    need(cfg.train.max_steps > 0, f"train.max_steps={cfg.train.max_steps}: must be positive")
    need(cfg.train.log_every > 0, "train.log_every must be positive")
    need(cfg.train.stop_at_step >= 0, "train.stop_at_step must not be negative")
    need(cfg.train.precision in PRECISIONS,
         f"train.precision={cfg.train.precision!r}: expected one of {', '.join(PRECISIONS)}")
    need(cfg.train.nonfinite in ("stop", "skip"), f"train.nonfinite={cfg.train.nonfinite!r}: expected stop or skip")
    need(cfg.train.nonfinite_limit >= 1, f"train.nonfinite_limit={cfg.train.nonfinite_limit}: must be at least 1")
    need(bool(cfg.train.deepspeed), "train.deepspeed: name at least one DeepSpeed JSON file")
    before = len(p)
    for name in cfg.train.deepspeed:
        path = resolve_ds_file(name)
        if not path.is_file():
            p.append(f"train.deepspeed: {name!r} not found (looked in ds_configs/ and the working directory)")
            continue
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            p.append(f"train.deepspeed: {path} is not valid JSON ({err})")
    ds_files_ok = len(p) == before
    if cfg.train.precision in PRECISIONS and ds_files_ok:  # precision `auto` reads the listed files
        wanted = resolve_precision(cfg.train, has_gpu, bf16_ok=has_gpu)
        need(wanted != "fp16" or has_gpu,
             "fp16 needs a GPU (DeepSpeed refuses fp16 on the CPU): use train.precision=bf16 or fp32")
    need(cfg.checkpoint.every_steps > 0, f"checkpoint.every_steps={cfg.checkpoint.every_steps}: must be positive")
    need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last={cfg.checkpoint.keep_last}: must be at least 1")
    need(cfg.export.dtype in EXPORT_DTYPES,
         f"export.dtype={cfg.export.dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    need(bool(cfg.run.dir), "run.dir must not be empty")
    return p


def resolve_ds_file(name: str) -> Path:
    """A DeepSpeed JSON named in the config: a path, or a file name inside ds_configs/."""
    path = Path(name)
    if path.is_file() or path.is_absolute():
        return path
    return DS_CONFIG_DIR / name


# ----------------------------------------------------------------------------- loading


def load_config(files: list[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML files (in order) < `--section.key=value` overrides; unknown keys all reported."""
    data: dict[str, Any] = {}
    problems: list[str] = []
    for name in files or []:
        path = Path(name)
        if not path.is_file():
            problems.append(f"config file {name!r} not found")
            continue
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            problems.append(f"config file {name}: not valid YAML ({str(err).splitlines()[0]})")
            continue
        if not isinstance(loaded, dict):
            problems.append(f"config file {name}: expected a mapping of sections, got {type(loaded).__name__}")
            continue
        _deep_update(data, loaded)
    for item in overrides or []:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep or "." not in key:
            problems.append(f"override {item!r}: expected --section.key=value")
            continue
        section, _, name = key.partition(".")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        data.setdefault(section, {})
        if isinstance(data[section], dict):
            data[section][name] = parsed
    cfg = Config()
    problems += _apply(cfg, data, "")
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def _deep_update(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value


def _apply(obj: Any, data: dict, prefix: str) -> list[str]:
    """Set dataclass fields from a nested dict, type-checking each; returns the problems."""
    problems = []
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            near = ", ".join(sorted(fields))
            problems.append(f"unknown config key {where!r} (known here: {near})")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a section (mapping), got {value!r}")
            else:
                problems += _apply(current, value, where + ".")
            continue
        ok, converted = _coerce(value, hints[key])
        if not ok:
            problems.append(f"{where}={value!r}: expected {_type_name(hints[key])}")
        else:
            setattr(obj, key, converted)
    return problems


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            return False, None
        out = [_coerce(v, item) for v in value]
        return all(ok for ok, _ in out), [v for _, v in out]
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number, float(value) if number else None
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return isinstance(value, str), value
    return False, None


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if isinstance(hint, types.GenericAlias):
        return str(hint)
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def resolved(cfg: Config, batch: Batch) -> Config:
    """The config with the derived batch sizes written in (what config.yaml and --print-config show)."""
    train = dataclasses.replace(cfg.train, grad_accum=batch.accum, global_batch_size=batch.global_)
    return dataclasses.replace(cfg, train=train)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    """Write the YAML beside the target and rename it into place (a failed write leaves the old file)."""
    write_text(path, to_yaml(cfg))


# ----------------------------------------------------------------------------- DeepSpeed


def resolve_precision(train: TrainConfig, has_gpu: bool, bf16_ok: bool) -> str:
    """An explicit train.precision wins; `auto` takes fp16/bf16 from the listed DeepSpeed files
    (e.g. `fp16.json`), else bf16 on a GPU that has it, else fp32."""
    if train.precision != "auto":
        return train.precision
    for name in train.deepspeed:
        listed = json.loads(resolve_ds_file(name).read_text())
        for key in ("bf16", "fp16"):
            if listed.get(key, {}).get("enabled"):
                return key
    return "bf16" if has_gpu and bf16_ok else "fp32"


def deepspeed_config(cfg: Config, batch: Batch, precision: str) -> dict[str, Any]:
    """Merge the ds_configs/ JSON files (ZeRO, offload) and write in what the run decides:
    batch sizes, clipping, precision. The result is saved as RUN_DIR/ds_config.json."""
    merged: dict[str, Any] = {}
    for name in cfg.train.deepspeed:
        _deep_update(merged, json.loads(resolve_ds_file(name).read_text()))
    for key in ("fp16", "bf16"):
        listed = merged.pop(key, None) or {}
        if key == precision:  # defaults from ds_configs/<key>.json, then what the listed files set
            default = json.loads((DS_CONFIG_DIR / f"{key}.json").read_text())[key]
            merged[key] = {**default, **listed, "enabled": True}
    merged.update(
        train_micro_batch_size_per_gpu=batch.micro,
        gradient_accumulation_steps=batch.accum,
        train_batch_size=batch.global_,
        gradient_clipping=cfg.optim.grad_clip,
        steps_per_print=10**9,
        wall_clock_breakdown=False,
    )
    # DeepSpeed's throughput timer synchronises the device at every forward and every step() by default:
    # the host could then never run ahead of the GPU (our own metrics time the run without a sync).
    merged.setdefault("timers", {"throughput": {"enabled": False, "synchronized": False}})
    zero = merged.setdefault("zero_optimization", {"stage": 0})
    if batch.world_size == 1 and zero.get("stage", 0) in (1, 2) and zero.get("overlap_comm"):
        # Nothing to overlap on one rank, and DeepSpeed synchronises the device around each
        # reduction when it is on (BENCHMARKS.md: 76 vs 97 ms per step on an H100).
        zero["overlap_comm"] = False
    return merged


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    zero = ds_config.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
