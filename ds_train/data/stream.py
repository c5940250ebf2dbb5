"""The training stream: packed batches split over data-parallel ranks and dataloader workers, resumable.

Every (rank, worker) pair is one *consumer* ``c = rank * num_workers + worker`` of ``C = world_size *
num_workers``. The split and the shuffle are owned here rather than left to ``datasets``
(``split_dataset_by_node`` falls back to every rank reading everything when shards do not divide,
and its buffer shuffle loses the buffer on resume):

- **pre-packed shards** (a folder from ``ds-data pack``): each epoch orders the shards by a
  permutation drawn from (seed, epoch) and the rows of each shard by one drawn from (seed, epoch,
  shard); consumer ``c`` takes rows ``c, c + C, c + 2C, ...`` of that order. State: (epoch, rows taken).
- **raw pairs** (files, folders, hub names; packed on the fly): each epoch orders the reading units
  (files / hub datasets) by a permutation of (seed, epoch); consumer ``c`` keeps the records at
  positions ``p % C == c`` of each unit, in blocks of ``shuffle_block`` records shuffled by (seed,
  epoch, unit, block start), encodes and packs them. State: (epoch, unit, block start, records taken
  from the block, the packer's open rows, closed rows not yet batched, skip counts).

Together the consumers cover the stream once per epoch, disjointly; the stream is infinite (the
epoch counter is in the state), and ``state_dict`` / ``load_state_dict`` resume exactly: a resumed
loader yields the batches the uninterrupted one would have (with the same settings: the loader
refuses a single state saved with another world size, worker count, seed, ...). Corrupt Code CLM
draws each document's corruption from (seed, epoch in which its row is batched, ``_id``).

After a change of ranks or workers, ``reshape`` turns the states of every saved rank into states
for the new layout: the new consumers share the rest of the saved epoch (what no saved consumer had
taken), then split later epochs the ordinary way (ARCHITECTURE.md, "Resuming on another number of
ranks").

Skipped input is counted once: in the first epoch, by the consumer that owns the record (missing
or broken files by consumer 0). Hub datasets are read through ``datasets`` streaming, every
consumer streaming the whole dataset and keeping its share (a resume streams past the records
before it): for long runs on the hub corpus, ``ds-data pack`` it once and train on the shards.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ds_train.data.encode import Encoder, check_objective
from ds_train.data.pack import (
    BatchSpec,
    Doc,
    Packer,
    Row,
    Shard,
    batch_spec,
    is_packed_dir,
    make_batch,
    read_meta,
    shard_paths,
)
from ds_train.data.sources import FILE_REASONS, SkipCounter, is_hub_name, iter_unit, list_units
from ds_train.data.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

COUNT_CHECK_BYTES = 256 << 20  # count records up front (to fail early) below this much local input


@dataclass
class StreamConfig:
    """Everything a consumer needs to rebuild its share of the stream (picklable, no live objects)."""

    sources: list[str]
    tokenizer_dir: str
    objective: str
    seq_len: int
    micro_batch_size: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    seed: int = 0
    pack_buffer: int = 1
    drop_overlong: bool = True
    corrupt_prob: float = 0.15
    shuffle_block: int = 512
    packed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        check_objective(self.objective)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.micro_batch_size < 1 or self.num_workers < 0 or self.shuffle_block < 1:
            raise ValueError("micro_batch_size and shuffle_block must be >= 1 and num_workers >= 0")
        packed = [is_packed_dir(s) for s in self.sources]
        if any(packed) and not all(packed):
            raise ValueError("mix of packed folders and raw pair sources: pass one kind")
        self.packed = bool(packed) and all(packed)


def _seed_of(*parts: int) -> np.random.Generator:
    """A generator for a tuple of non-negative ints (seed, epoch, ...)."""
    return np.random.default_rng([int(p) for p in parts])


# ---------------------------------------------------------------------------------------------- pre-packed


class PackedRows:
    """One consumer's rows of pre-packed shards, epoch after epoch."""

    def __init__(self, cfg: StreamConfig, consumer: int, consumers: int) -> None:
        self.cfg, self.consumer, self.consumers = cfg, consumer, consumers
        self.shards = [Shard(p) for src in cfg.sources for p in shard_paths(src)]
        self.sizes = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.state = {"epoch": 0, "taken": 0}
        self._order: tuple[int, np.ndarray, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of this consumer's rows of ``epoch``, in order."""
        if self._order is None or self._order[0] != epoch:
            shard_order = _seed_of(self.cfg.seed, epoch).permutation(len(self.shards))
            shard_ix = np.concatenate([np.full(self.sizes[s], s, dtype=np.int32) for s in shard_order])
            row_ix = np.concatenate(
                [_seed_of(self.cfg.seed, epoch, s).permutation(self.sizes[s]) for s in shard_order]
            )
            plan = self.state.get("plan")
            if plan is not None and epoch <= _last_epoch(plan):
                mine = self._reshaped_share(plan, epoch, len(shard_ix))
            else:
                mine = slice(self.consumer, None, self.consumers)
            self._order = (epoch, shard_ix[mine], row_ix[mine])
        return self._order[1], self._order[2]

    def _reshaped_share(self, plan: dict, epoch: int, rows: int) -> np.ndarray:
        """Mask of the rows of ``epoch`` no saved consumer took and that fall to this consumer."""
        index = np.arange(rows)
        old = plan["consumers"]
        positions = np.array(plan["positions"], dtype=np.int64).reshape(old, 2)
        owner_epoch, owner_taken = positions[index % old, 0], positions[index % old, 1]
        taken = (epoch < owner_epoch) | ((epoch == owner_epoch) & (index // old < owner_taken))
        return ~taken & (_new_owner(index, old, self.consumers) == self.consumer)

    def __iter__(self) -> Iterator[tuple[Row, int]]:
        while True:
            epoch = self.state["epoch"]
            plan = self.state.get("plan")
            shard_ix, row_ix = self._epoch_order(epoch)
            if len(shard_ix) == 0 and plan is None:
                raise ValueError(f"consumer {self.consumer} of {self.consumers} has no packed rows")
            while self.state["taken"] < len(shard_ix):
                k = self.state["taken"]
                self.state["taken"] = k + 1
                yield self.shards[shard_ix[k]].row(int(row_ix[k])), epoch
            self.state = {"epoch": epoch + 1, "taken": 0}
            if plan is not None and epoch + 1 <= _last_epoch(plan):
                self.state["plan"] = plan


# ---------------------------------------------------------------------------------------------- raw pairs


class RawRows:
    """One consumer's pairs of raw sources, shuffled in blocks, encoded and packed, epoch after epoch."""

    def __init__(self, cfg: StreamConfig, consumer: int, consumers: int, encoder: Encoder) -> None:
        self.cfg, self.consumer, self.consumers, self.encoder = cfg, consumer, consumers, encoder
        self.skips = SkipCounter()  # bad input of the first epoch (later epochs read the same again)
        self._later_skips = SkipCounter(quiet=True)
        self.units = list_units(cfg.sources, self.skips)
        if not self.units:
            raise ValueError(f"no readable pair files in {', '.join(cfg.sources)} ({self.skips.report()})")
        self.packer = Packer(
            cfg.seq_len, buffer_rows=cfg.pack_buffer, drop_overlong=cfg.drop_overlong, skips=self.skips
        )
        self.epoch, self.unit, self.block_start, self.taken = 0, 0, 0, 0
        self.docs_this_epoch = 0
        self.queue: list[tuple[Row, int]] = []
        self._block: list[Doc] | None = None
        self._block_end: int | None = None  # position after the block's last record; None: unit ends
        self._reader: tuple[str, int, Iterator] | None = None  # (unit, next position, iterator)
        self.plan: dict | None = None  # after a reshape: the saved layout's positions (see `reshape`)
        self._partial: dict[tuple[int, int, int], tuple[int | None, set[int]]] = {}  # see _partial_block

    # -- state
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "unit": self.unit,
            "block_start": self.block_start,
            "taken": self.taken,
            "docs_this_epoch": self.docs_this_epoch,
            "packer": self.packer.state_dict(),
            "queue": [
                [r.ids, r.input_ids.tolist(), r.segments.tolist(), r.doc_lengths.tolist(), e]
                for r, e in self.queue
            ],
            "skips": self.skips.as_dict(),
            "units": list(self.units),
            **({"plan": self.plan} if self.plan is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self._keep_units(state.get("units"))
        self.epoch, self.unit = state["epoch"], state["unit"]
        self.block_start, self.taken = state["block_start"], state["taken"]
        self.docs_this_epoch = state["docs_this_epoch"]
        self.packer.load_state_dict(state["packer"])
        self.queue = [
            (
                Row(
                    ids, np.array(x, dtype=np.int64), np.array(s, dtype=np.int8), np.array(n, dtype=np.int32)
                ),
                e,
            )
            for ids, x, s, n, e in state["queue"]
        ]
        self.skips.counts.clear()
        self.skips.update(state["skips"])
        self.packer.skips = self._epoch_skips()
        self._block = None
        self.plan, self._partial = state.get("plan"), {}

    def _keep_units(self, saved: list[str] | None) -> None:
        """A resumed stream reads the files it started with: the positions in the state refer to them.
        A file gone since is skipped and counted when its turn comes; a new one waits for a new run."""
        if saved is None or saved == self.units:
            return
        gone, new = sorted(set(saved) - set(self.units)), sorted(set(self.units) - set(saved))
        logger.warning("consumer %d resumes with the %d input files of its checkpoint (now missing: %s; "
                       "new, not read by this run: %s)", self.consumer, len(saved),
                       ", ".join(gone) or "none", ", ".join(new) or "none")
        self.units = list(saved)

    # -- rows
    def __iter__(self) -> Iterator[tuple[Row, int]]:
        while True:
            while self.queue:
                yield self.queue.pop(0)
            self.queue.extend((row, self.epoch) for row in self.packer.add(self._next_doc()))

    def _next_doc(self) -> Doc:
        while True:
            if self._block is None:
                self._load_block()
            if self.taken < len(self._block):
                self.taken += 1
                doc = self._block[self.taken - 1]
                if len(doc) <= self.packer.seq_len or not self.packer.drop_overlong:
                    self.docs_this_epoch += 1  # a document that will reach a row
                return doc
            self._advance()

    def _advance(self) -> None:
        """Move past the finished block: next block, next unit, or next epoch."""
        self._block, self.taken = None, 0
        if self._block_end is not None:
            self.block_start = self._block_end
            return
        self.unit, self.block_start = self.unit + 1, 0
        if self.unit == len(self.units):
            if self.docs_this_epoch == 0 and not self._reshaping():
                raise ValueError(
                    f"consumer {self.consumer} of {self.consumers} (rank x worker) got no pair that fits in a "
                    f"whole epoch: the corpus is too small for this many ranks and workers, or every pair is "
                    f"longer than seq_len {self.packer.seq_len} ({self.skips.report()})"
                )
            self.epoch, self.unit, self.docs_this_epoch = self.epoch + 1, 0, 0
            self.packer.skips = self._epoch_skips()
            if self.plan is not None and not self._reshaping():
                self.plan, self._partial = None, {}  # the epochs of the saved layout are done

    def _epoch_skips(self) -> SkipCounter:
        """Where this epoch's skips are counted: each bad record counts once, in the first epoch."""
        return self.skips if self.epoch == 0 else self._later_skips

    def _load_block(self) -> None:
        """Read, encode and shuffle the block at (epoch, unit, block_start); skip ``taken`` on resume."""
        unit = self._unit_order()[self.unit]
        resuming = self.taken > 0
        skips = self._later_skips if resuming else self._epoch_skips()  # a resumed block was counted already
        pairs, end = [], None
        for position, pair in self._records(unit, skips):
            pairs.append(pair)
            if len(pairs) == self.cfg.shuffle_block:
                end = position + 1
                break
        self._block_end = end
        docs = [Doc(pid, ids, seg) for pid, ids, seg in self.encoder.layout(pairs, skips)]
        rng = _seed_of(self.cfg.seed, self.epoch, self._unit_order_index(), self.block_start)
        self._block = [docs[i] for i in rng.permutation(len(docs))]
        if resuming:
            self._reader = None  # its records would be counted in the scratch counter

    def _records(self, unit: str, skips: SkipCounter) -> Iterator[tuple[int, object]]:
        """This consumer's records of ``unit`` from ``block_start``, reusing the open reader if any."""
        reader = self._reader
        if reader is None or reader[0] != unit or reader[1] != self.block_start:
            keep = self._keep
            reader = (unit, self.block_start, iter_unit(unit, skips, self.block_start, keep))
        unit_name, _, iterator = reader
        self._reader = None
        for position, pair in iterator:
            self._reader = (unit_name, position + 1, iterator)  # before the yield: the caller may stop here
            yield position, pair

    def _keep(self, position: int) -> bool:
        if self._reshaping():
            return (_new_owner(position, self.plan["consumers"], self.consumers) == self.consumer
                    and not self._taken_before(position))
        return position % self.consumers == self.consumer

    # -- after a reshape: the rest of the saved layout's epochs
    def _reshaping(self) -> bool:
        return self.plan is not None and self.epoch <= _last_epoch(self.plan)

    def _taken_before(self, position: int) -> bool:
        """Whether the saved consumer that owned ``position`` (of the current unit) took it already."""
        old = self.plan["consumers"]
        epoch, unit, block_start, taken = self.plan["positions"][position % old]
        if self.epoch != epoch:
            return self.epoch < epoch
        if self.unit != unit:
            return self.unit < unit
        if position < block_start:
            return True
        if taken == 0:  # the saved consumer had not read its block yet
            return False
        end, untaken = self._partial_block(position % old)
        return (end is None or position < end) and position not in untaken

    def _partial_block(self, owner: int) -> tuple[int | None, set[int]]:
        """The end of the saved consumer ``owner``'s block (None: the unit's end) and the positions in it
        that it had not taken. Read again and re-shuffled as it did: it had taken the first ``taken``
        documents of the shuffled block; the records it found bad or the encoder skipped it had counted
        when it read the block, so they count as taken too (each bad record is counted once)."""
        key = (self.epoch, self.unit, owner)
        if key not in self._partial:
            old = self.plan["consumers"]
            _, _, block_start, taken = self.plan["positions"][owner]
            scratch = SkipCounter(quiet=True)  # counted when the saved consumer read the block
            unit = self._unit_order()[self.unit]
            records = []
            for position, pair in iter_unit(unit, scratch, block_start, lambda p: p % old == owner):
                records.append((position, pair))
                if len(records) == self.cfg.shuffle_block:
                    break
            laid_out = self.encoder.layout([pair for _, pair in records], scratch)
            kept, j = [], 0
            for position, pair in records:  # the encoder keeps the pairs' order, dropping some
                if j < len(laid_out) and laid_out[j][0] == pair.id:
                    kept.append(position)
                    j += 1
            rng = _seed_of(self.cfg.seed, self.epoch, self._unit_order_index(), block_start)
            order = rng.permutation(len(laid_out))
            end = records[-1][0] + 1 if len(records) == self.cfg.shuffle_block else None
            self._partial[key] = (end, {kept[i] for i in order[taken:]})
        return self._partial[key]

    def _unit_order(self) -> list[str]:
        order = _seed_of(self.cfg.seed, self.epoch).permutation(len(self.units))
        return [self.units[i] for i in order]

    def _unit_order_index(self) -> int:
        return int(_seed_of(self.cfg.seed, self.epoch).permutation(len(self.units))[self.unit])


# ---------------------------------------------------------------------------------------------- dataset


class PackedStream(IterableDataset):
    """The batches of one rank: each dataloader worker yields the batches of its consumer share.

    Yields dicts of ``(B, T)`` tensors (ARCHITECTURE.md) plus ``ids``, and the bookkeeping keys
    ``_consumer``, ``_epoch``, ``_skips`` that ``StreamLoader`` removes.
    """

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._rows: PackedRows | RawRows | None = None
        self._pending_state: dict | None = None
        self._reshaped: dict[int, dict] = {}  # consumer -> its first state after a reshape

    def _consumer(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.cfg.rank * workers + worker, self.cfg.world_size * workers

    def _build(self) -> tuple[PackedRows | RawRows, BatchSpec]:
        consumer, consumers = self._consumer()
        tokenizer = load_tokenizer(self.cfg.tokenizer_dir)
        encoder = Encoder(
            tokenizer, self.cfg.objective, seed=self.cfg.seed, corrupt_prob=self.cfg.corrupt_prob
        )
        if self.cfg.packed:
            rows: PackedRows | RawRows = PackedRows(self.cfg, consumer, consumers)
        else:
            rows = RawRows(self.cfg, consumer, consumers, encoder)
        spec = batch_spec(encoder, self.cfg.objective, self.cfg.seq_len)
        return rows, spec

    def __iter__(self) -> Iterator[dict]:
        rows, spec = self._build()
        consumer, _ = self._consumer()
        state = self._pending_state if self._pending_state is not None else self._reshaped.get(consumer)
        if state:
            _load_rows_state(rows, state)
        self._pending_state, self._reshaped = None, {}
        self._rows = rows
        batch_rows: list[Row] = []
        epochs: list[int] = []
        for row, epoch in rows:
            batch_rows.append(row)
            epochs.append(epoch)
            if len(batch_rows) == self.cfg.micro_batch_size:
                batch = make_batch(batch_rows, spec, epochs)
                batch.update(_consumer=consumer, _epoch=epoch, _skips=self._skip_counts(consumer))
                batch_rows, epochs = [], []
                yield batch

    def _skip_counts(self, consumer: int) -> dict[str, int]:
        """This consumer's skip counts; file-level reasons only from consumer 0 (every consumer sees them)."""
        if not isinstance(self._rows, RawRows):
            return {}
        counts = self._rows.skips.as_dict()
        return counts if consumer == 0 else {k: v for k, v in counts.items() if k not in FILE_REASONS}

    def state_dict(self) -> dict:
        if self._rows is None:
            return dict(self._pending_state or self._reshaped.get(self._consumer()[0]) or {})
        if isinstance(self._rows, PackedRows):
            return {"packed": dict(self._rows.state)}
        return {"raw": self._rows.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._pending_state = dict(state) if state else None
        self._rows = None

    def start_reshaped(self, states: dict[int, dict]) -> None:
        """Start each consumer (rank x worker) at its state from `reshape` (workers get it in the dataset)."""
        self._pending_state, self._rows, self._reshaped = None, None, dict(states)


def _load_rows_state(rows: PackedRows | RawRows, state: dict) -> None:
    if isinstance(rows, PackedRows):
        if "packed" not in state:
            raise ValueError("data state is from a raw-pair stream, but this run reads packed shards")
        rows.state = dict(state["packed"])
    else:
        if "raw" not in state:
            raise ValueError("data state is from a packed-shard stream, but this run reads raw pairs")
        rows.load_state_dict(state["raw"])


# ---------------------------------------------------------------------------------------------- loader


_EXIT_HOOK = False


def _identity(batch: dict) -> dict:
    return batch


def _ignore_stop_signals(_worker_id: int) -> None:
    """Dataloader workers ignore SIGTERM/SIGINT: a pre-emption signal sent to the whole process group
    must reach only the rank's main process, which saves a checkpoint and then shuts the workers down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """At interpreter exit ``multiprocessing`` stops daemonic children (the workers) with SIGTERM and
    waits for them; they ignore it, so stop any still running with SIGKILL first (a worker holds nothing
    to save; torch's SIGCHLD handler, which would call that a failure, is switched off)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


class StreamLoader:
    """An infinite, resumable loader over a rank's share of the stream (wraps ``StatefulDataLoader``).

    Iterating yields batch dicts (ARCHITECTURE.md); ``state_dict()`` / ``load_state_dict()`` capture
    the position after the last yielded batch; ``skip_counts()`` sums the skipped records seen by
    this rank's workers; ``epoch`` is the epoch of the last batch.
    """

    def __init__(self, cfg: StreamConfig) -> None:
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.cfg = cfg
        self.dataset = PackedStream(cfg)
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch function here
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self.loader = StatefulDataLoader(
                self.dataset,
                batch_size=None,
                num_workers=cfg.num_workers,
                collate_fn=_identity,
                prefetch_factor=4 if cfg.num_workers else None,
                persistent_workers=False,
                worker_init_fn=_ignore_stop_signals,
                pin_memory=torch.cuda.is_available(),  # page-locked batches: the copy to the GPU is asynchronous
            )
        self._skips: dict[int, dict[str, int]] = {}
        self.epoch = 0
        self.consumer = cfg.rank  # consumer (rank x worker) of the last batch
        global _EXIT_HOOK
        if cfg.num_workers and not _EXIT_HOOK:  # registered after multiprocessing's own: runs before it
            _EXIT_HOOK = bool(atexit.register(_kill_workers_at_exit))

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            consumer = self.consumer = batch.pop("_consumer")
            self._skips[consumer] = batch.pop("_skips")
            self.epoch = batch.pop("_epoch")
            yield batch

    def close(self) -> None:
        """Stop the workers now. Close the generators of ``iter(self)`` first: the last reference to the
        dataloader's iterator going away is what sends each worker its stop sentinel and joins it."""
        self.loader = None

    def skip_counts(self) -> dict[str, int]:
        """Skipped records by reason over this rank's workers so far."""
        total = SkipCounter()
        for counts in self._skips.values():
            total.update(counts)
        return total.as_dict()

    def state_dict(self) -> dict:
        return {
            "loader": self.loader.state_dict(),
            "skips": {str(k): v for k, v in self._skips.items()},
            "epoch": self.epoch,
            "config": _fingerprint(self.cfg),
        }

    def needs_reshape(self, state: dict) -> bool:
        """Whether this rank's saved state comes from the same ranks with another number of workers or
        another micro batch: the consumers changed, so it resumes from every rank's state (`reshape`)."""
        saved = state.get("config") or {}
        here = _fingerprint(self.cfg)
        return ("loader" in state and saved != here and _shared(saved) == _shared(here)
                and saved.get("world_size") == here["world_size"])

    def load_state_dict(self, state: dict) -> None:
        """Resume from this rank's saved state, or from ``{RESHAPE_FROM: [every saved rank's state]}``
        written by another number of ranks or workers (see `reshape`)."""
        if RESHAPE_FROM in state:
            state = reshape(state[RESHAPE_FROM], self.cfg.world_size, self.cfg.num_workers)[self.cfg.rank]
        if "reshaped" in state:
            _check_same_stream(state["config"], self.cfg)
            self.dataset.start_reshaped({int(c): s for c, s in state["reshaped"].items()})
            self._skips, self.epoch = {}, state["epoch"]
            return
        if state.get("config") != _fingerprint(self.cfg):
            raise ValueError(
                "data state was saved with another stream configuration "
                f"({state.get('config')} != {_fingerprint(self.cfg)}); it cannot resume this one"
            )
        self.loader.load_state_dict(state["loader"])
        self._skips = {int(k): v for k, v in state.get("skips", {}).items()}
        self.epoch = state.get("epoch", 0)


# ---------------------------------------------------------------------------------------------- reshape

RESHAPE_FROM = "reshape_from"
PER_RANK = ("rank", "world_size", "num_workers", "micro_batch_size")  # what a reshape may change


def reshape(saved: list[dict], world_size: int, num_workers: int) -> list[dict]:
    """Loader states for ``world_size`` ranks x ``num_workers`` workers that finish the epoch of ``saved``
    (the ``StreamLoader.state_dict()`` of every rank of a run with another layout, by rank).

    The saved consumers' positions say which rows (pre-packed) or records (raw pairs) each had taken in
    its epoch; the new consumers share the rest of that epoch (of every epoch up to the furthest saved
    consumer's) between them, record ``p`` going to consumer ``(p // C + p % C) % C'`` (``C`` saved and
    ``C'`` new consumers), then continue with epochs split the ordinary way. Rows a saved consumer had
    packed but not yet batched are batched first by consumer ``c % C'``, and its skip counts move with
    them. Nothing is read here: a new consumer reads again the one block a saved consumer was inside.
    A saved consumer that had not started (``{}``) counts as having taken nothing.

    Raises:
        ValueError: the states disagree, or one was saved while an earlier reshape's epoch was still
            running (resume that run with its own number of ranks until the epoch ends).
    """
    if not saved:
        raise ValueError("no saved data states to reshape")
    configs = [s.get("config", {}) for s in saved]
    for rank, config in enumerate(configs):
        if config.get("rank") != rank or config.get("world_size") != len(saved):
            raise ValueError(f"saved data state {rank} is rank {config.get('rank')} of "
                             f"{config.get('world_size')} ranks, not rank {rank} of {len(saved)}")
        if _shared(config) != _shared(configs[0]):
            raise ValueError(f"saved data states 0 and {rank} come from different stream settings")
    old = [c for state in saved for c in _consumer_states(state)]
    new_count = world_size * max(num_workers, 1)
    if configs[0].get("packed"):
        starts = _reshape_packed(old, new_count)
    else:
        starts = _reshape_raw(old, new_count)
    per_rank = max(num_workers, 1)
    out = []
    for rank in range(world_size):
        config = {**configs[0], "rank": rank, "world_size": world_size, "num_workers": num_workers}
        mine = {c: starts[c] for c in range(rank * per_rank, (rank + 1) * per_rank)}
        epoch = min(rows["epoch"] for state in mine.values() for rows in state.values())  # {kind: state}
        out.append({"reshaped": mine, "config": config, "epoch": epoch})
    return out


def _shared(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in PER_RANK}


def _check_same_stream(config: dict, cfg: StreamConfig) -> None:
    here = _fingerprint(cfg)
    if _shared(config) != _shared(here) or config["rank"] != cfg.rank:
        raise ValueError(f"data state was saved with another stream configuration ({_shared(config)} != "
                         f"{_shared(here)}); it cannot resume this one")


def _consumer_states(rank_state: dict) -> list[dict]:
    """The stream states of one saved rank's consumers, by worker (``{}``: had not started)."""
    loader = rank_state["loader"]
    workers = int(rank_state["config"]["num_workers"])
    if workers == 0:
        return [loader.get("dataset_state") or {}]
    snapshots = (loader.get("_snapshot") or {}).get("_worker_snapshots") or {}
    return [(snapshots.get(f"worker_{w}") or {}).get("dataset_state") or {} for w in range(workers)]


def _new_owner(position: int | np.ndarray, old: int, new: int) -> int | np.ndarray:
    """The new consumer of a position left over by ``old`` consumers: each saved consumer's rest of the
    epoch is dealt over every new consumer in turn."""
    return (position // old + position % old) % new


def _last_epoch(plan: dict) -> int:
    """The last epoch in which a saved consumer had taken something."""
    return max(p[0] for p in plan["positions"])


def _refuse_nested(state: dict, c: int) -> None:
    if "plan" in state:
        raise ValueError(
            f"saved consumer {c} was still finishing the epoch of an earlier change of ranks (epoch "
            f"{_last_epoch(state['plan'])}); resume with the saved number of ranks until that epoch ends")


def _reshape_packed(old: list[dict], new_count: int) -> list[dict]:
    states = [s.get("packed", {"epoch": 0, "taken": 0}) for s in old]
    for c, state in enumerate(states):
        _refuse_nested(state, c)
    plan = {"consumers": len(states), "positions": [[s["epoch"], s["taken"]] for s in states]}
    first = min(s["epoch"] for s in states)
    return [{"packed": {"epoch": first, "taken": 0, "plan": plan}} for _ in range(new_count)]


def _reshape_raw(old: list[dict], new_count: int) -> list[dict]:
    fresh = {"epoch": 0, "unit": 0, "block_start": 0, "taken": 0, "packer": {"open": []}, "queue": [],
             "skips": {}}
    states = [s.get("raw", fresh) for s in old]
    for c, state in enumerate(states):
        _refuse_nested(state, c)
    plan = {"consumers": len(states),
            "positions": [[s["epoch"], s["unit"], s["block_start"], s["taken"]] for s in states]}
    first = min(s["epoch"] for s in states)
    units = next((s["units"] for s in states if "units" in s), None)
    out = [{"epoch": first, "unit": min(s["unit"] for s in states if s["epoch"] == first), "block_start": 0,
            "taken": 0, "docs_this_epoch": 0, "packer": {"open": []}, "queue": [], "skips": {}, "plan": plan,
            **({"units": units} if units is not None else {})} for _ in range(new_count)]
    for c, state in enumerate(states):
        heir = out[c % new_count]
        heir["queue"] += state["queue"] + [_row_entry(d, state["epoch"]) for d in state["packer"]["open"]]
        total = SkipCounter(heir["skips"])  # every consumer counted the file-level skips: keep consumer 0's
        total.update({k: v for k, v in state["skips"].items() if c == 0 or k not in FILE_REASONS})
        heir["skips"] = total.as_dict()
    return [{"raw": s} for s in out]


def _row_entry(docs: list, epoch: int) -> list:
    """An open row of a saved packer, closed as it is, in the queue format of `RawRows.state_dict`."""
    row = Row.of([Doc(i, np.array(x, dtype=np.int64), np.array(s, dtype=np.int8)) for i, x, s in docs])
    return [row.ids, row.input_ids.tolist(), row.segments.tolist(), row.doc_lengths.tolist(), epoch]


def _fingerprint(cfg: StreamConfig) -> dict:
    """The settings a resumed stream must share with the saved one."""
    keys = (
        "objective",
        "seq_len",
        "micro_batch_size",
        "rank",
        "world_size",
        "num_workers",
        "seed",
        "pack_buffer",
        "drop_overlong",
        "shuffle_block",
        "packed",
    )
    values = asdict(cfg)
    return {k: values[k] for k in keys}


def build_dataloader(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    *,
    objective: str,
    seq_len: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    pack_buffer: int = 1,
    drop_overlong: bool = True,
    corrupt_prob: float = 0.15,
    shuffle_block: int = 512,
    separation: str | None = None,
) -> StreamLoader:
    """The training loader of one rank (see the module docstring).

    ``sources``: packed folders (``ds-data pack``) or raw pair files / folders / hub names.
    ``separation`` is accepted for symmetry and unused: the model routes by modality.

    Raises:
        ValueError: bad settings, unreadable sources, or a corpus too small for every rank and
            worker to get data.
    """
    del separation
    names = [str(sources)] if isinstance(sources, (str, os.PathLike)) else [str(s) for s in sources]
    cfg = StreamConfig(
        names,
        str(tokenizer_dir),
        objective,
        seq_len,
        micro_batch_size,
        rank,
        world_size,
        num_workers,
        seed,
        pack_buffer,
        drop_overlong,
        corrupt_prob,
        shuffle_block,
    )
    vocab_size = len(load_tokenizer(tokenizer_dir))  # fail here, in one line, rather than inside a worker
    consumers = world_size * max(num_workers, 1)
    records = _check_and_count(cfg, vocab_size)
    if records is not None and records < consumers:
        kind = "packed rows" if cfg.packed else "records"
        raise ValueError(
            f"{records} {kind} in {', '.join(names)} cannot feed {world_size} rank(s) x "
            f"{max(num_workers, 1)} worker(s): every rank would not get data"
        )
    return StreamLoader(cfg)


def _check_and_count(cfg: StreamConfig, vocab_size: int) -> int | None:
    """Check that the sources can be read; count packed rows, or records of small local raw inputs.

    Returns None where counting is not cheap (hub datasets, large local inputs).
    """
    if cfg.packed:
        for src in cfg.sources:
            meta = read_meta(src)
            if int(meta["seq_len"]) != cfg.seq_len:
                raise ValueError(f"{src} was packed with seq_len {meta['seq_len']}, not {cfg.seq_len}")
            if int(meta["vocab_size"]) != vocab_size:
                raise ValueError(
                    f"{src} was packed with a {meta['vocab_size']}-token tokenizer, not this "
                    f"{vocab_size}-token one"
                )
        return sum(int(read_meta(src)["rows"]) for src in cfg.sources)
    hub = [s for s in cfg.sources if is_hub_name(s)]
    for name in hub:  # fail here, in one line, when the hub cannot be reached
        next(iter_unit(name, SkipCounter(quiet=True)), None)
    if hub:
        return None
    units = list_units(cfg.sources, SkipCounter(quiet=True))
    if not units:
        raise ValueError(f"no readable pair files in {', '.join(cfg.sources)}")
    if sum(Path(u).stat().st_size for u in units) > COUNT_CHECK_BYTES:
        return None
    skips = SkipCounter(quiet=True)
    return sum(1 for u in units for _ in iter_unit(u, skips))
