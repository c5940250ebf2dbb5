"""`ds-export`: a checkpoint of any ZeRO stage -> a `transformers` directory (fp16, bf16 or fp32).

    ds-export RUN_OR_CHECKPOINT_DIR OUT_DIR [--dtype fp16|bf16|fp32] [--tag step-N] [--force]
    ds-export --from-original SRC_DIR OUT_DIR [--objective NAME] [--tokens-map FILE] [--force]

Three owners do the work: `ds_train.checkpoint` finds the checkpoint and verifies it (complete, every file
matching its recorded checksum), `ds_train.consolidate` reads the full weights from DeepSpeed's files (no
engine, no GPU, about one copy of the model in the output dtype), and `ds_train.hf` writes the directory.
This module refuses non-finite weights and writes into a temporary directory beside OUT_DIR, renamed into
place only when complete: a failed export leaves an existing OUT_DIR as it was. `--from-original` converts
a model directory in the original work's format with `ds_train.hf.convert_original`, the same way.
`bench/export_bench.py` measures time and peak RSS on a pycodegpt-110m checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ds_train import checkpoint, hf
from ds_train.consolidate import consolidate
from ds_train.errors import UsageError, first_line, refuse
from ds_train.fileio import replacing_dir
from ds_train.model import GPTNeoConfig

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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
        raise UsageError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"{out_dir} is not empty (pass --force to replace it)")


def check_finite(state: dict[str, torch.Tensor], dtype: str) -> None:
    """Refuse weights that are inf/nan in the output dtype (diverged training, or beyond fp16's range)."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        hint = " (beyond fp16's range? try --dtype bf16)" if dtype == "fp16" else ""
        raise UsageError(f"non-finite weights in {dtype} in {', '.join(bad[:5])}{hint}")


def export(
    source: str | Path,
    out_dir: str | Path,
    dtype: str = "fp16",
    tag: str | None = None,
    force: bool = False,
    progress: bool = False,
) -> ExportResult:
    """Consolidate the checkpoint (run dir, checkpoints dir or tag dir) into a transformers directory."""
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    found = checkpoint.locate(source, tag)
    try:
        config = GPTNeoConfig.from_dict(found.meta["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{found.path / checkpoint.MARKER}: no usable model config ({err!s:.200})") from None
    tokenizer_dir = found.path / "tokenizer"
    if not (tokenizer_dir / "separation.json").is_file():
        raise UsageError(f"{found.path}: no tokenizer/ copy with separation.json in the checkpoint")
    state, layout = consolidate(found.path, found.meta, DTYPES[dtype], progress)
    check_finite(state, dtype)
    num_params = write_beside(out_dir, lambda staging: hf.write_hf_dir(
        staging, config, state, tokenizer_dir, separation=str(found.meta.get("separation", "none")),
        objective=str(found.meta.get("objective", "code_clm"))))
    return ExportResult(out_dir, found.path, layout.stage, layout.world_size, dtype, num_params,
                        time.perf_counter() - start, peak_rss_mib())


export_checkpoint = export
"""The name the trainer calls after its final checkpoint."""


def write_beside(out_dir: Path, write: Callable[[Path], Any]) -> Any:
    """Run `write` on an empty temporary directory beside `out_dir`, then move it into place
    (`fileio.replacing_dir`): a failed write (a full disk, a refusal) leaves `out_dir` as it was."""
    try:
        with replacing_dir(out_dir) as staging:
            return write(staging)
    except UsageError:
        raise
    except Exception as err:  # tokenizers and safetensors report a failed write as their own types
        log.debug("writing %s failed", out_dir, exc_info=err)
        raise UsageError(f"could not write {out_dir} ({first_line(err)}); it is left as it was") from None


def from_original(source: str | Path, out_dir: str | Path, force: bool = False, objective: str = "code_clm",
                  tokens_map: str | Path | None = None) -> Path:
    """A model directory in the original work's format (trained with `objective`; its replicated-tokens
    map in it unless `tokens_map` names it) -> ours (`ds_train.hf.convert_original`)."""
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_dir():
        raise UsageError(f"{source}: no such directory")
    check_out_dir(out_dir, force)
    write_beside(out_dir, lambda staging: hf.convert_original(source, staging, tokens_map=tokens_map,
                                                              objective=objective))
    return out_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ds-export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run dir, its checkpoints/ dir, or one step-N tag dir "
                                       "(with --from-original: the original work's model directory)")
    parser.add_argument("out_dir", help="the transformers directory to write")
    parser.add_argument("--dtype", default="fp16", help="fp16 (default), bf16 or fp32")
    parser.add_argument("--tag", default=None, help="export this tag (step-N), not the newest complete one")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--from-original", action="store_true",
                        help="SOURCE is a model directory in the original work's format: convert it")
    parser.add_argument("--objective", default=None,
                        help="with --from-original: the objective it was trained with (default code_clm)")
    parser.add_argument("--tokens-map", default=None,
                        help="with --from-original: its replicated-tokens map, when not in SOURCE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`ds-export`: prints one summary line; bad input gives one line on stderr and exit code 2."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.from_original:
            if args.tag is not None or args.dtype != "fp16":
                raise UsageError("--tag and --dtype apply to checkpoints, not to --from-original")
            out = from_original(args.source, args.out_dir, args.force, args.objective or "code_clm",
                                args.tokens_map)
            print(f"converted {args.source} (the original work's format) -> {out}")
            return 0
        if args.objective is not None or args.tokens_map is not None:
            raise UsageError("--objective and --tokens-map apply to --from-original only")
        res = export(args.source, args.out_dir, args.dtype, args.tag, args.force,
                     progress=not args.no_progress and sys.stderr.isatty())
    except UsageError as err:
        return refuse("ds-export", err)
    print(f"exported {res.tag_dir} (ZeRO-{res.stage}, {res.world_size} ranks) -> {res.out_dir}: "
          f"{res.num_params:,} params in {res.dtype}, {res.seconds:.1f} s, "
          f"peak RSS {res.peak_rss_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
