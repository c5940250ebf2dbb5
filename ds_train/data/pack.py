"""Packing laid-out pairs into fixed-length rows, and the Arrow shards that hold them.

A *document* is one laid-out pair: ``(_id, ids, segments)`` from ``encode.Encoder.layout``. The
``Packer`` places documents into rows of ``seq_len`` tokens without splitting them, deterministically
and resumably (its open rows are its whole state):

- ``buffer_rows=1``: greedy in stream order: a document that does not fit closes the row;
- ``buffer_rows=k``: best fit over ``k`` open rows: a document goes to the open row with the least
  room that still holds it; when none holds it and ``k`` rows are open, the fullest open row
  (the oldest among equals) is closed first.

Documents longer than ``seq_len`` are dropped and counted (``too_long``), or with
``drop_overlong=False`` cut to ``seq_len`` and counted (``truncated``).

Rows hold segments rather than flags, so the objective is applied when a batch is made
(``ds_train.data.batch``): one packed dataset serves every objective and separation. Packed shards
(``ds-data pack``) are Arrow IPC files with columns ``input_ids`` (list<int32>), ``segments``
(list<int8>), ``doc_lengths`` (list<int32>) and ``ids`` (list<string>), unpadded, plus ``meta.json``.
The training stream reads them document by document (``Shard.documents``, ``Shard.doc``): rows are
the storage, not the batch. ``pack_corpus`` writes into a temporary folder beside its target and
renames it into place only when every shard and ``meta.json`` are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ds_train.data.encode import Encoder
from ds_train.data.sources import FILE_REASONS, Keep, Pair, SkipCounter, keep_all, read_pairs
from ds_train.data.tokenizer import load_tokenizer
from ds_train.errors import UsageError
from ds_train.fileio import replacing_dir

logger = logging.getLogger(__name__)

PACKED_FORMAT = "ds_train.packed/1"
META_FILE = "meta.json"
SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("segments", pa.list_(pa.int8())),
        ("doc_lengths", pa.list_(pa.int32())),
        ("ids", pa.list_(pa.string())),
    ]
)


@dataclass
class Doc:
    """One laid-out pair: its ``_id``, token ids and per-token segments (``encode.Segment``)."""

    id: str
    ids: np.ndarray
    segments: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Row:
    """One packed row before padding: the documents' tokens back to back."""

    ids: list[str]
    input_ids: np.ndarray
    segments: np.ndarray
    doc_lengths: np.ndarray

    @classmethod
    def of(cls, docs: list[Doc]) -> Row:
        """The row holding ``docs`` in order."""
        return cls(
            [d.id for d in docs],
            np.concatenate([d.ids for d in docs]).astype(np.int64),
            np.concatenate([d.segments for d in docs]).astype(np.int8),
            np.array([len(d) for d in docs], dtype=np.int32),
        )


# ---------------------------------------------------------------------------------------------- packer


class Packer:
    """Deterministic, resumable packing of documents into rows of ``seq_len`` tokens."""

    def __init__(
        self,
        seq_len: int,
        *,
        buffer_rows: int = 1,
        drop_overlong: bool = True,
        skips: SkipCounter | None = None,
    ) -> None:
        if seq_len < 8 or buffer_rows < 1:
            raise UsageError(
                f"packing needs seq_len >= 8 and buffer_rows >= 1 (got {seq_len}, {buffer_rows})"
            )
        self.seq_len = seq_len
        self.buffer_rows = buffer_rows
        self.drop_overlong = drop_overlong
        self.skips = skips if skips is not None else SkipCounter()
        self.open: list[list[Doc]] = []
        self.used: list[int] = []

    def add(self, doc: Doc) -> list[Row]:
        """Place one document; returns the rows this closed (zero or one)."""
        if len(doc) > self.seq_len:
            if self.drop_overlong:
                self.skips.skip("too_long", doc.id, f"{len(doc)} tokens > seq_len {self.seq_len}")
                return []
            self.skips.skip("truncated", doc.id, f"{len(doc)} tokens cut to {self.seq_len}")
            doc = Doc(doc.id, doc.ids[: self.seq_len], doc.segments[: self.seq_len])
        slot = self._best_fit(len(doc))
        closed: list[Row] = []
        if slot is None:
            if len(self.open) == self.buffer_rows:
                closed.append(self._close(self._fullest()))
            self.open.append([])
            self.used.append(0)
            slot = len(self.open) - 1
        self.open[slot].append(doc)
        self.used[slot] += len(doc)
        if self.used[slot] == self.seq_len:
            closed.append(self._close(slot))
        return closed

    def flush(self) -> list[Row]:
        """Close every open row (in the order they were opened)."""
        rows = [Row.of(docs) for docs in self.open]
        self.open, self.used = [], []
        return rows

    def _best_fit(self, length: int) -> int | None:
        """The open row with the least room that still holds ``length`` tokens (first among equals)."""
        best, best_room = None, self.seq_len + 1
        for i, used in enumerate(self.used):
            room = self.seq_len - used
            if length <= room < best_room:
                best, best_room = i, room
        return best

    def _fullest(self) -> int:
        """The open row with the most tokens (the oldest among equals)."""
        return max(range(len(self.used)), key=lambda i: (self.used[i], -i))

    def _close(self, slot: int) -> Row:
        docs = self.open.pop(slot)
        self.used.pop(slot)
        return Row.of(docs)

    def state_dict(self) -> dict:
        """The open rows, as plain lists (picklable, JSON-friendly)."""
        return {"open": [[[d.id, d.ids.tolist(), d.segments.tolist()] for d in docs] for docs in self.open]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the open rows of ``state_dict()``."""
        self.open = [
            [Doc(i, np.array(ids, dtype=np.int64), np.array(seg, dtype=np.int8)) for i, ids, seg in docs]
            for docs in state["open"]
        ]
        self.used = [sum(len(d) for d in docs) for docs in self.open]


def pack(
    docs: Iterable[Doc],
    seq_len: int,
    *,
    buffer_rows: int = 1,
    drop_overlong: bool = True,
    skips: SkipCounter | None = None,
) -> Iterator[Row]:
    """Every row of ``docs`` packed by a ``Packer`` (the open rows flushed at the end)."""
    packer = Packer(seq_len, buffer_rows=buffer_rows, drop_overlong=drop_overlong, skips=skips)
    for doc in docs:
        yield from packer.add(doc)
    yield from packer.flush()


# ---------------------------------------------------------------------------------------------- shards


def shard_name(index: int, count: int) -> str:
    """File name of shard ``index`` of ``count``."""
    return f"shard-{index:05d}-of-{count:05d}.arrow"


def write_shards(
    rows: Iterable[Row], out_dir: str | os.PathLike, shards: Sequence[int], num_shards: int
) -> tuple[dict[int, int], int]:
    """Write rows round-robin into the Arrow IPC files ``shards`` (of ``num_shards``).

    Returns (rows per shard index, tokens written).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers = [pa.ipc.new_file(str(out / shard_name(i, num_shards)), SCHEMA) for i in shards]
    buffers: list[list[Row]] = [[] for _ in shards]
    counts = [0] * len(shards)
    tokens = 0
    for i, row in enumerate(rows):
        k = i % len(shards)
        buffers[k].append(row)
        counts[k] += 1
        tokens += len(row.input_ids)
        if len(buffers[k]) >= 256:
            writers[k].write_batch(_record_batch(buffers[k]))
            buffers[k] = []
    for writer, buffer in zip(writers, buffers):
        if buffer:
            writer.write_batch(_record_batch(buffer))
        writer.close()
    return dict(zip(shards, counts)), tokens


def _record_batch(rows: list[Row]) -> pa.RecordBatch:
    return pa.record_batch(
        [
            pa.array([r.input_ids.astype(np.int32) for r in rows], type=pa.list_(pa.int32())),
            pa.array([r.segments for r in rows], type=pa.list_(pa.int8())),
            pa.array([r.doc_lengths for r in rows], type=pa.list_(pa.int32())),
            pa.array([r.ids for r in rows], type=pa.list_(pa.string())),
        ],
        schema=SCHEMA,
    )


def is_packed_dir(path: str | os.PathLike) -> bool:
    """True for a folder written by ``write_shards``."""
    return (Path(path) / META_FILE).is_file()


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta.json`` of a packed folder, checked."""
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {meta_path}: {err}") from None
    if meta.get("format") != PACKED_FORMAT:
        raise UsageError(f"{meta_path}: not a ds_train packed folder (format {meta.get('format')!r})")
    return meta


class Shard:
    """Random access to the rows of one packed shard.

    The file is memory-mapped and its record batches are viewed in place (numpy views of the
    list offsets and values): opening a shard reads no token, a row reads only its own.
    """

    COLUMNS = ("input_ids", "segments", "doc_lengths")

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            self._views = [[self._view(b.column(name)) for name in self.COLUMNS] for b in batches]
            self._pair_ids = [b.column("ids") for b in batches]
        except (pa.ArrowException, KeyError, OSError) as err:
            raise UsageError(f"corrupt packed shard {path}: {str(err).splitlines()[0]}") from None
        self._starts = np.cumsum([0] + [b.num_rows for b in batches])

    @staticmethod
    def _view(column: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, values) of a list column, zero-copy."""
        return column.offsets.to_numpy(), column.values.to_numpy()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def documents(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every document of the shard in storage order: (record batch, first token inside that batch's
        tokens, length, ``_id``); rows are stored back to back, so a document's tokens are contiguous."""
        batches, starts, lengths, ids = [], [], [], []
        for k, ((tokens, _), _, (offsets, values)) in enumerate(self._views):
            doc_lengths = values[offsets[0] : offsets[-1]].astype(np.int64)
            batches.append(np.full(len(doc_lengths), k, dtype=np.int32))
            starts.append(int(tokens[0]) + np.cumsum(doc_lengths) - doc_lengths)
            lengths.append(doc_lengths)
            column = self._pair_ids[k]
            ids.append(column.values.slice(column.offsets[0].as_py(), len(doc_lengths)).to_numpy(zero_copy_only=False))
        if not batches:
            return (np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, object))
        return tuple(np.concatenate(parts) for parts in (batches, starts, lengths, ids))

    def doc(self, batch: int, start: int, length: int, pair_id: str) -> Doc:
        """The document at ``start`` of record batch ``batch`` (see ``documents``)."""
        (_, tokens), (_, segments), _ = self._views[batch]
        return Doc(pair_id, tokens[start : start + length].astype(np.int64), segments[start : start + length])

    def row(self, index: int) -> Row:
        """Row ``index`` of the shard."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a {len(self)}-row shard")
        batch = int(np.searchsorted(self._starts, index, side="right")) - 1
        local = index - int(self._starts[batch])
        ids, segments, lengths = (
            values[offsets[local] : offsets[local + 1]] for offsets, values in self._views[batch]
        )
        pair_ids = self._pair_ids[batch][local].as_py()
        return Row(pair_ids, ids.astype(np.int64), segments, lengths)


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """The shard files named by a packed folder's ``meta.json``."""
    meta = read_meta(path)
    count = int(meta["num_shards"])
    paths = [Path(path) / shard_name(i, count) for i in range(count)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"packed folder {path} lacks {len(missing)} shard(s), e.g. {missing[0]}")
    return paths


# ---------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class PackJob:
    """One process's part of ``pack_corpus``: the records at positions ``p % parts == part``."""

    sources: list[str]
    tokenizer_dir: str
    out_dir: str
    seq_len: int
    num_shards: int
    pack_buffer: int
    drop_overlong: bool
    part: int = 0
    parts: int = 1

    def keep(self, position: int) -> bool:
        return position % self.parts == self.part


def pack_corpus(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seq_len: int = 1024,
    num_shards: int = 16,
    pack_buffer: int = 8,
    drop_overlong: bool = True,
    workers: int = 1,
) -> dict:
    """Read, lay out and pack a whole corpus into Arrow shards plus ``meta.json``; returns the meta.

    With ``workers`` processes, process ``p`` packs the records at positions ``p % workers`` of
    every file (in corpus order) into shards ``p, p + workers, ...``. The shards hold no objective:
    segments are stored, flags are derived when batches are made.
    """
    if num_shards < 1 or workers < 1 or num_shards % workers:
        raise UsageError(f"num_shards ({num_shards}) must be a positive multiple of workers ({workers})")
    names = [str(sources)] if isinstance(sources, (str, os.PathLike)) else [str(s) for s in sources]
    target = Path(out_dir)
    if target.exists() and not is_packed_dir(target) and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"{target} exists and is not a packed folder: name a new or packed folder")
    tokenizer = load_tokenizer(tokenizer_dir)
    with replacing_dir(target) as scratch:
        meta = _pack_into(names, tokenizer_dir, scratch, seq_len, num_shards, pack_buffer, drop_overlong, workers)
        meta["vocab_size"] = len(tokenizer)
        (scratch / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    logger.info("packed %d pairs into %d rows in %s; skipped %s", meta["pairs"], meta["rows"], target,
                meta["skipped"])
    return meta


def _pack_into(names: list[str], tokenizer_dir: str | os.PathLike, out: Path, seq_len: int, num_shards: int,
               pack_buffer: int, drop_overlong: bool, workers: int) -> dict:
    """Pack every part into the folder ``out``; returns the meta (without the vocabulary size)."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = [PackJob(names, str(tokenizer_dir), str(out), seq_len, num_shards, pack_buffer, drop_overlong, p,
                    workers) for p in range(workers)]
    if workers == 1:
        parts = [_pack_part(jobs[0])]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_pack_part, jobs)
    meta = _merge_parts(parts, num_shards)
    if meta["pairs"] == 0:
        raise UsageError(f"no valid pairs in {', '.join(names)} (skipped {meta['skipped']})")
    return {
        "format": PACKED_FORMAT,
        "seq_len": seq_len,
        "pack_buffer": pack_buffer,
        "drop_overlong": drop_overlong,
        "tokenizer_sha": tokenizer_fingerprint(Path(tokenizer_dir)),
        "sources": names,
        "workers": workers,
        **meta,
    }


def _pack_part(job: PackJob) -> dict:
    """Pack one part of the corpus into its shards; returns its counts."""
    encoder = Encoder(load_tokenizer(job.tokenizer_dir))
    skips = SkipCounter(quiet=job.part > 0)
    counts = {"pairs": 0, "docs": 0}
    docs = corpus_docs(job.sources, encoder, skips, counts, keep=job.keep, require_any=False)
    rows = pack(docs, job.seq_len, buffer_rows=job.pack_buffer, drop_overlong=job.drop_overlong, skips=skips)
    shards = range(job.part, job.num_shards, job.parts)
    per_shard, tokens = write_shards(rows, job.out_dir, list(shards), job.num_shards)
    skipped = skips.as_dict()
    if job.part > 0:  # every part sees the same missing or broken files: part 0 counts them
        skipped = {k: v for k, v in skipped.items() if k not in FILE_REASONS}
    return {"rows_per_shard": per_shard, "tokens": tokens, "skipped": skipped, **counts}


def _merge_parts(parts: list[dict], num_shards: int) -> dict:
    """The counts of every part, summed."""
    per_shard = [0] * num_shards
    skipped = SkipCounter()
    for part in parts:
        for shard, rows in part["rows_per_shard"].items():
            per_shard[shard] = rows
        skipped.update(part["skipped"])
    return {
        "num_shards": num_shards,
        "rows_per_shard": per_shard,
        "rows": sum(per_shard),
        "tokens": sum(p["tokens"] for p in parts),
        "pairs": sum(p["pairs"] for p in parts),
        "docs": sum(p["docs"] for p in parts),
        "skipped": skipped.as_dict(),
    }


def corpus_docs(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    encoder: Encoder,
    skips: SkipCounter,
    counts: dict[str, int],
    chunk_pairs: int = 2048,
    keep: Keep = keep_all,
    require_any: bool = True,
) -> Iterator[Doc]:
    """The laid-out documents of a corpus in order, tokenized ``chunk_pairs`` at a time.

    ``counts["pairs"]`` and ``counts["docs"]`` count what was read and what was laid out;
    ``keep`` selects records by position inside their file (a part of the corpus); with
    ``require_any``, a corpus without a single valid pair is a ``ValueError``.
    """
    chunk: list[Pair] = []
    for pair in _with_end(read_pairs(sources, skips, keep=keep, require_any=require_any)):
        if pair is not None:
            chunk.append(pair)
        if chunk and (pair is None or len(chunk) == chunk_pairs):
            counts["pairs"] += len(chunk)
            for pair_id, ids, segments in encoder.layout(chunk, skips):
                counts["docs"] += 1
                yield Doc(pair_id, ids, segments)
            chunk = []


def _with_end(items: Iterable[Pair]) -> Iterator[Pair | None]:
    """``items`` followed by one ``None`` (the end marker that flushes the last chunk)."""
    yield from items
    yield None


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """A short sha256 of a tokenizer's ``tokenizer.json`` ('' where it has none)."""
    path = tokenizer_dir / "tokenizer.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else ""
