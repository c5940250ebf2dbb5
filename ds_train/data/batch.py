"""The batch of ARCHITECTURE.md ("A packed batch"), made from documents or from packed rows.

Documents carry segments rather than flags, so the objective is applied here: one packed dataset
serves every objective and separation. Two layouts, the same tensors and the same loss:

- ``make_stream_batch``: one micro batch as a single token stream ``(1, L)`` of whole documents back
  to back, padded only at its tail (the training stream, ``L = micro_batch_size * seq_len``);
- ``make_batch``: ``B`` packed rows of ``seq_len`` tokens, each padded at its end (``ds-data inspect``,
  ``ds-eval loss``).

Corrupt Code CLM corrupts each document with the generator of (seed, epoch, ``_id``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ds_train.data.encode import Corruption, Encoder, check_objective, flags
from ds_train.data.pack import Doc, Row


@dataclass(frozen=True)
class BatchSpec:
    """What turns documents into a batch: the objective and what its corruption needs."""

    objective: str
    seq_len: int
    pad_id: int
    corruption: Corruption


def batch_spec(encoder: Encoder, objective: str, seq_len: int) -> BatchSpec:
    """The ``BatchSpec`` of an ``encode.Encoder`` (its tokenizer, seed and corruption probability)."""
    return BatchSpec(check_objective(objective), seq_len, encoder.pad_id, encoder.corruption)


def make_stream_batch(docs: Sequence[Doc], epochs: Sequence[int], spec: BatchSpec, length: int) -> dict:
    """One micro batch: ``docs`` back to back in one ``(1, length)`` stream, padding only at the tail.

    ``epochs[i]`` is the epoch whose order ``docs[i]`` came from (its corruption draw). Besides the
    tensors: ``ids`` (one list: the documents' ``_id``s in order) and ``num_tokens`` (int: the
    non-padding tokens, ``(doc_ids >= 0).sum()``).
    """
    used = sum(len(d) for d in docs)
    if used > length:
        raise ValueError(f"{len(docs)} documents of {used} tokens do not fit a {length}-token micro batch")
    row = Row.of(list(docs)) if docs else Row([], np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int32))
    spec = BatchSpec(spec.objective, length, spec.pad_id, spec.corruption)
    batch = make_batch([row], spec, [list(epochs)])
    batch["num_tokens"] = used
    return batch


def make_batch(rows: list[Row], spec: BatchSpec, epochs: int | Sequence[int] | Sequence[Sequence[int]] = 0) -> dict:
    """``(B, T)`` tensors, one packed row each, plus ``ids`` (the ``_id``s of each row).

    Corrupt Code CLM corrupts each document of row ``b`` with the generator of (seed, epoch, ``_id``):
    ``epochs`` is one int for every document, one per row, or one list per row (one per document).
    """
    check_objective(spec.objective)
    B, T = len(rows), spec.seq_len
    per_row = [epochs] * B if isinstance(epochs, int) else list(epochs)
    input_ids = np.full((B, T), spec.pad_id, dtype=np.int64)
    segments = np.full((B, T), -1, dtype=np.int8)
    doc_ids = np.full((B, T), -1, dtype=np.int32)
    position_ids = np.zeros((B, T), dtype=np.int64)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        if spec.objective == "corrupt_code_clm":
            row_epochs = per_row[b] if isinstance(per_row[b], Sequence) else [per_row[b]] * len(row.ids)
            input_ids[b, :n] = _corrupted(row, spec, row_epochs)
        else:
            input_ids[b, :n] = row.input_ids
        segments[b, :n] = row.segments
        doc_ids[b, :n] = np.repeat(np.arange(len(row.doc_lengths), dtype=np.int32), row.doc_lengths)
        starts = np.repeat(np.cumsum(row.doc_lengths) - row.doc_lengths, row.doc_lengths)
        position_ids[b, :n] = np.arange(n) - starts
    modality, target, prefix = flags(segments, spec.objective)
    if spec.objective == "text_code_clm":
        target = position_ids > 0
    real = doc_ids >= 0
    return {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(position_ids),
        "doc_ids": torch.from_numpy(doc_ids),
        "modality": torch.from_numpy(modality & real),
        "target": torch.from_numpy(target & real),
        "prefix": torch.from_numpy(prefix & real),
        "ids": [list(row.ids) for row in rows],
    }


def _corrupted(row: Row, spec: BatchSpec, epochs: Sequence[int]) -> np.ndarray:
    """The row's ids with each document corrupted independently."""
    out = row.input_ids.copy()
    start = 0
    for pair_id, length, epoch in zip(row.ids, row.doc_lengths.tolist(), epochs, strict=True):
        end = start + length
        out[start:end] = spec.corruption(pair_id, row.input_ids[start:end], row.segments[start:end], epoch)
        start = end
    return out


def describe_row(batch: dict, b: int, tokenizer, limit: int | None = None) -> str:
    """Row ``b`` of a batch as text: one token per line with doc, position, modality, target, prefix."""
    lines = [f"row {b}: ids {batch['ids'][b]}", "  pos doc  mod tgt pre  token"]
    T = batch["input_ids"].shape[1] if limit is None else min(limit, batch["input_ids"].shape[1])
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][b, :T].tolist())
    for t in range(T):
        doc = int(batch["doc_ids"][b, t])
        if doc < 0:
            lines.append(f"  ... padding from {t}")
            break
        modality = "code" if batch["modality"][b, t] else "text"
        target = "*" if batch["target"][b, t] else " "
        prefix = "p" if batch["prefix"][b, t] else " "
        position = int(batch["position_ids"][b, t])
        lines.append(f"  {position:>3} {doc:>3}  {modality} {target:>3} {prefix:>3}  {tokens[t]!r}")
    return "\n".join(lines)
