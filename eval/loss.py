"""`ds-eval loss`: the mean loss over target tokens of an exported model on a pair corpus.

    ds-eval loss --model EXPORT_DIR --data pairs.jsonl --objective code_clm [--batch-size B] [--seq-len N]
    python -m eval.loss --model EXPORT_DIR --data pairs.jsonl

The model is any `transformers` GPT-Neo directory with a tokenizer; with `modality_map.json` (a `ds-export`
directory) its table is [E; C] and the separation is the map's, without it the separation is none. It is
loaded into the project's model (`ds_train.hf.load_model`) and the loss is the
project's fused modality loss, on exactly the training encoding: the data `Encoder`'s layout, documents
packed into rows of `--seq-len` tokens (attention and positions never cross documents; documents longer
than a row are skipped and counted, as in training), batches made by `pack.make_batch`. Corrupt Code CLM
uses the corruption of epoch 0 with `--seed`.

The last line printed is JSON: {"loss": mean -log p over the target tokens, "targets": their number}.
Computation is fp32, on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ds_train import hf
from ds_train.data.batch import BatchSpec, batch_spec, make_batch
from ds_train.data.encode import Encoder, check_objective
from ds_train.data.pack import Doc, pack
from ds_train.data.sources import Pair, SkipCounter, read_pairs
from ds_train.data.tokenizer import load_tokenizer
from ds_train.errors import UsageError, first_line, refuse
from ds_train.model import GPTNeo

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ds-eval loss` (wired into `eval.cli` as a subcommand)."""
    parser.add_argument("--model", required=True, help="transformers GPT-Neo directory (e.g. a ds-export)")
    parser.add_argument(
        "--data", required=True, nargs="+", help="pair files (.jsonl/.json/.parquet/.arrow) or folders"
    )
    parser.add_argument(
        "--objective",
        default="code_clm",
        help="text_code_clm, code_clm (default), corrupt_code_clm or prefix_code_clm",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="packed rows per forward pass")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per packed row (default: 1024, or the model's positions if fewer)",
    )
    parser.add_argument("--seed", type=int, default=0, help="corruption seed (corrupt_code_clm)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    """Print the loss JSON; bad input gives one error line and exit code 2."""
    try:
        result = evaluate(
            Path(args.model),
            args.data,
            args.objective,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            seed=args.seed,
            device=args.device,
        )
    except UsageError as err:
        return refuse("ds-eval loss", err)
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m eval.loss`: the same as `ds-eval loss`."""
    parser = argparse.ArgumentParser(prog="ds-eval loss", description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))


# --------------------------------------------------------------------------------------------------------
# Model and data


def load_model(model_dir: Path, device: torch.device) -> tuple[GPTNeo, PreTrainedTokenizerBase]:
    """The project's GPTNeo (fp32, eval mode, on `device`) and the directory's tokenizer."""
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir} is not a transformers model directory (no config.json)")
    try:
        tokenizer = load_tokenizer(model_dir, check_separation=False)
        model = hf.load_model(model_dir)
    except (ValueError, KeyError, OSError) as err:
        raise UsageError(first_line(err)) from None
    return model.float().to(device).eval(), tokenizer


def batches(
    data: list[str],
    tokenizer: PreTrainedTokenizerBase,
    objective: str,
    vocab_size: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    skips: SkipCounter,
) -> Iterator[dict]:
    """Training's encoding of the pairs, packed and batched (documents never split, overlong ones skipped)."""

    encoder = Encoder(tokenizer, objective, seed=seed)
    spec = _base_vocab_only(batch_spec(encoder, objective, seq_len), vocab_size)
    docs = (Doc(*laid_out) for chunk in _chunks(data, skips) for laid_out in encoder.layout(chunk, skips))
    rows = []
    for row in pack(docs, seq_len, skips=skips):
        rows.append(row)
        if len(rows) == batch_size:
            yield make_batch(rows, spec)
            rows = []
    if rows:
        yield make_batch(rows, spec)


def _base_vocab_only(spec: BatchSpec, vocab_size: int) -> BatchSpec:
    """An export's tokenizer also holds the code tokens V + i: corruption must draw from the first V only."""
    corruption = spec.corruption
    if len(corruption.is_special) <= vocab_size:
        return spec
    corruption = dataclasses.replace(
        corruption,
        is_special=corruption.is_special[:vocab_size],
        text_ids=corruption.text_ids[corruption.text_ids < vocab_size],
    )
    return dataclasses.replace(spec, corruption=corruption)


def _chunks(data: list[str], skips: SkipCounter, size: int = 256) -> Iterator[list[Pair]]:
    """The pairs of `data` in lists of `size` (tokenized together)."""
    chunk = []
    for pair in read_pairs(data, skips):
        chunk.append(pair)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --------------------------------------------------------------------------------------------------------
# The loss


def evaluate(
    model_dir: Path,
    data: list[str] | str,
    objective: str = "code_clm",
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, float | int]:
    """{"loss": sum of -log p over target tokens / their number, "targets": that number}."""
    try:
        check_objective(objective)
    except ValueError as err:
        raise UsageError(first_line(err)) from None
    if batch_size < 1 or (seq_len is not None and seq_len < 8):
        raise UsageError(f"--batch-size must be >= 1 and --seq-len >= 8 (got {batch_size}, {seq_len})")
    model, tokenizer = load_model(model_dir, _device(device))
    seq_len = seq_len or min(1024, model.config.n_positions)
    if seq_len > model.config.n_positions:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's {model.config.n_positions} positions")
    data = [data] if isinstance(data, str) else list(data)
    skips = SkipCounter()
    try:
        rows = batches(data, tokenizer, objective, model.config.vocab_size, batch_size, seq_len, seed, skips)
        loss_sum, targets = summed_loss(model, rows)
    except ValueError as err:
        raise UsageError(first_line(err)) from None
    log.info("%s; %d target tokens", skips.report(), targets)
    if targets == 0:
        raise UsageError(f"no target tokens in {', '.join(map(str, data))} ({skips.report()})")
    return {"loss": loss_sum / targets, "targets": targets}


@torch.no_grad()
def summed_loss(model: GPTNeo, batches: Iterator[dict]) -> tuple[float, int]:
    """(sum of -log p over the target tokens, their number) with the project's fused modality loss."""
    device = next(model.parameters()).device
    loss_sum, targets = 0.0, 0
    for batch in batches:
        tensors = {k: v.to(device) for k, v in batch.items() if k != "ids"}
        _, stats = model(**tensors)  # [code_loss_sum, code_targets, text_loss_sum, text_targets]
        loss_sum += float(stats[0] + stats[2])
        targets += int(stats[1] + stats[3])
    return loss_sum, targets


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device here")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name}: {first_line(err)}") from None


if __name__ == "__main__":
    raise SystemExit(main())
