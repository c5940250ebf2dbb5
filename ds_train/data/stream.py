"""The training stream: documents of packed shards, in micro batches whose place follows from the step.

The input is always packed folders (``ds-data pack``; ``ds-train`` packs raw pairs into the run
directory first, ``ds_train.data.prepack``). Their documents form, per epoch, one global order: a
permutation drawn from (seed, epoch) of the documents sorted by a hash of their ``_id`` (so the order
does not depend on how the corpus was packed into shards). The epochs follow each other into one
endless sequence, cut greedily into micro batches of at most ``micro_batch_size * seq_len`` tokens of
whole documents (``batch.make_stream_batch``: one stream, padding only at its tail).

Micro batch ``m`` (counted from where the run started) goes to rank ``m % R``; on that rank, local micro
batch ``i = m // R`` comes from dataloader worker ``i % W``, which is the order in which torch's loader
hands out its workers' batches. Every consumer (rank x worker) walks the same cut and keeps its own:
nothing is split by file or by record, so nothing depends on R or W. After every rank has taken ``k``
micro batches (the Trainer's ranks take the same number per step), the stream has consumed exactly the
first ``k * R`` micro batches: the position is (epoch, documents of that epoch's order consumed). That
pair is the whole data state; a resume with any number of ranks, workers or another micro batch size
starts the cut again at it. So a resume yields the batches an uninterrupted run would (same settings),
and per epoch each document is trained once, whatever the changes in between.

A held-out share (``val_share``: the documents whose ``_id`` hash falls below it) or the documents of a
named validation folder never enter the training order (``Corpus``, ``validation_batches``). Skipped
input was counted when the corpus was packed (its ``meta.json``); the stream reports those counts.
"""

from __future__ import annotations

import atexit
import hashlib
import multiprocessing
import os
import signal
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ds_train.data.batch import BatchSpec, batch_spec, make_stream_batch
from ds_train.data.encode import Encoder, check_objective
from ds_train.data.pack import Doc, Shard, is_packed_dir, read_meta, shard_paths
from ds_train.data.prepack import ensure_packed
from ds_train.data.sources import SkipCounter
from ds_train.data.tokenizer import load_tokenizer
from ds_train.errors import UsageError

STATE_FORMAT = "ds_train.stream/2"


def _seed_of(*parts: int) -> np.random.Generator:
    """A generator for a tuple of non-negative ints (seed, epoch, ...)."""
    return np.random.default_rng([int(p) for p in parts])


def id_hash(ids: Sequence[str]) -> np.ndarray:
    """A uint64 hash of each ``_id`` (blake2b): the corpus order and the held-out split."""
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little")
                     for i in ids], dtype=np.uint64)


def held_out(ids: Sequence[str], share: float) -> np.ndarray:
    """Which ``_id``s belong to the held-out share (the same answer in every run, rank and resume)."""
    return id_hash(ids) < np.uint64(min(int(share * 2.0**64), 2**64 - 1))


# ---------------------------------------------------------------------------------------------- corpus


class Corpus:
    """The documents of packed folders, sorted by ``_id`` hash; ``keep`` selects some of them."""

    def __init__(self, sources: Sequence[str], keep: str = "all", share: float = 0.0,
                 exclude: set[str] | frozenset[str] = frozenset()) -> None:
        self.sources = [str(s) for s in sources]
        for src in self.sources:
            if not is_packed_dir(src):
                raise UsageError(f"{src} is not a packed folder (ds-data pack)")
        self.shards = [Shard(p) for src in self.sources for p in shard_paths(src)]
        parts = [(np.full(len(d[0]), s, np.int32), *d) for s, d in
                 enumerate(shard.documents() for shard in self.shards)]
        shard, batch, start, length, ids = (np.concatenate([p[k] for p in parts]) for k in range(5))
        hashes = id_hash(ids)
        order = np.argsort(hashes, kind="stable")
        mask = np.ones(len(order), dtype=bool)
        if share > 0:
            val = held_out(ids[order], share)
            mask = val if keep == "held_out" else ~val
        if exclude:
            mask &= ~np.isin(ids[order], np.array(sorted(exclude), dtype=object))
        order = order[mask]
        self.shard, self.batch, self.start = shard[order], batch[order], start[order]
        self.length, self.ids = length[order], ids[order]
        self.fingerprint = hashlib.sha256(hashes[order].tobytes()).hexdigest()[:16]
        skips = SkipCounter()
        for src in self.sources:
            skips.update(read_meta(src).get("skipped", {}))
        self.skipped = skips.as_dict()

    def __len__(self) -> int:
        return len(self.ids)

    def doc(self, k: int) -> Doc:
        shard = self.shards[int(self.shard[k])]
        return shard.doc(int(self.batch[k]), int(self.start[k]), int(self.length[k]), str(self.ids[k]))


def check_packed(sources: Sequence[str], seq_len: int, vocab_size: int) -> None:
    """One-line errors for packed folders made for another sequence length or tokenizer."""
    for src in sources:
        meta = read_meta(src)
        if int(meta["seq_len"]) != seq_len:
            raise UsageError(f"{src} was packed with seq_len {meta['seq_len']}, not {seq_len}")
        if int(meta["vocab_size"]) != vocab_size:
            raise UsageError(f"{src} was packed with a {meta['vocab_size']}-token tokenizer, not this "
                             f"{vocab_size}-token one")


# ---------------------------------------------------------------------------------------------- the cut


@dataclass(frozen=True)
class Position:
    """Where the endless document sequence stands: epoch, and documents of its order consumed."""

    epoch: int
    index: int


class Cut:
    """The endless sequence of epochs' orders, cut greedily into micro batches of ``budget`` tokens."""

    def __init__(self, lengths: np.ndarray, seed: int, budget: int) -> None:
        if len(lengths) == 0:
            raise UsageError("no training documents: the corpus is empty or held out entirely")
        self.lengths, self.seed, self.budget = lengths, seed, budget
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document indices in the order of ``epoch``, cumulative token counts with a leading 0)."""
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            perm = _seed_of(self.seed, epoch).permutation(len(self.lengths))
            self._epochs[epoch] = (perm, np.concatenate([[0], np.cumsum(self.lengths[perm])]))
        return self._epochs[epoch]

    def next(self, at: Position) -> tuple[list[tuple[int, int]], Position]:
        """The micro batch starting at ``at``: [(epoch, document index)], and the position after it."""
        room, out = self.budget, []
        epoch, index = at.epoch, at.index
        while True:
            perm, cum = self.order(epoch)
            end = int(np.searchsorted(cum, cum[index] + room, side="right")) - 1
            out += [(epoch, int(k)) for k in perm[index:end]]
            room -= int(cum[end] - cum[index])
            if end < len(perm):
                return out, Position(epoch, end)
            epoch, index = epoch + 1, 0

    def skip(self, at: Position, count: int) -> Position:
        """The position after ``count`` micro batches from ``at``."""
        for _ in range(count):
            at = self.next(at)[1]
        return at


# ---------------------------------------------------------------------------------------------- dataset


@dataclass
class StreamConfig:
    """The settings of one rank's stream (picklable)."""

    sources: list[str]
    tokenizer_dir: str
    objective: str
    seq_len: int
    micro_batch_size: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    seed: int = 0
    corrupt_prob: float = 0.15
    val_share: float = 0.0
    exclude_from: list[str] | None = None  # packed validation folders whose _ids never train

    def __post_init__(self) -> None:
        check_objective(self.objective)
        if not 0 <= self.rank < self.world_size:
            raise UsageError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.micro_batch_size < 1 or self.num_workers < 0:
            raise UsageError("micro_batch_size must be >= 1 and num_workers >= 0")
        if not 0 <= self.val_share < 1:
            raise UsageError(f"val_share {self.val_share} must lie in [0, 1)")

    @property
    def budget(self) -> int:
        return self.micro_batch_size * self.seq_len


class StreamDataset(IterableDataset):
    """The micro batches of one rank from ``start``; each dataloader worker yields its own share."""

    def __init__(self, cfg: StreamConfig, corpus: Corpus, cut: Cut, spec: BatchSpec) -> None:
        super().__init__()
        self.cfg, self.corpus, self.cut, self.spec = cfg, corpus, cut, spec
        self.start = Position(0, 0)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        R, r = self.cfg.world_size, self.cfg.rank
        at, m = self.start, 0
        while True:
            docs, after = self.cut.next(at)
            if m % R == r and (m // R) % workers == worker:
                batch = make_stream_batch([self.corpus.doc(k) for _, k in docs], [e for e, _ in docs],
                                          self.spec, self.cfg.budget)
                yield batch if info is None else _as_arrays(batch)
            at, m = after, m + 1


def _as_arrays(batch: dict) -> dict:
    """A worker hands its batch over as numpy arrays, pickled through the worker's pipe: tensors would
    go as shared-memory file descriptors through multiprocessing's resource sharer, whose thread prints
    a traceback when the rank's main process is killed in the middle of a hand-over."""
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _as_tensors(batch: dict, pin: bool) -> dict:
    """The batch's arrays as tensors again, in page-locked memory on a GPU machine (asynchronous copies)."""
    tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    return {k: v.pin_memory() if pin and isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def _unchanged(batch: dict) -> dict:
    """The dataloader's collate function: the batch as the dataset made it (no conversion in the worker)."""
    return batch


_EXIT_HOOK = False


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
    """An endless, resumable loader of one rank's micro batches.

    Iterating yields batch dicts (ARCHITECTURE.md, "A packed batch"); ``state_dict()`` is the stream's
    position after the micro batches every rank has taken so far (the same on every rank);
    ``load_state_dict()`` resumes there with this loader's ranks, workers and micro batch size;
    ``epoch`` is the epoch the stream stands in; ``skip_counts()`` the corpus's skipped records.
    """

    def __init__(self, cfg: StreamConfig, corpus: Corpus, spec: BatchSpec) -> None:
        self.cfg, self.corpus = cfg, corpus
        self.cut = Cut(corpus.length, cfg.seed, cfg.budget)
        self.dataset = StreamDataset(cfg, corpus, self.cut, spec)
        self.taken = 0  # micro batches this rank took since ``dataset.start``
        self._walked = (0, self.dataset.start)  # (global micro batches, position): state_dict's cache
        self.loader = None
        self.scratch: tempfile.TemporaryDirectory | None = None

    @property
    def epoch(self) -> int:
        return self.position().epoch

    def _loader(self) -> DataLoader:
        workers = self.cfg.num_workers
        global _EXIT_HOOK
        if workers and not _EXIT_HOOK:  # registered after multiprocessing's own: runs before it
            _EXIT_HOOK = bool(atexit.register(_kill_workers_at_exit))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            return DataLoader(self.dataset, batch_size=None, num_workers=workers, collate_fn=_unchanged,
                              prefetch_factor=4 if workers else None, worker_init_fn=_ignore_stop_signals)

    def __iter__(self) -> Iterator[dict]:
        self.dataset.start, self.taken = self.position(), 0
        self._walked = (0, self.dataset.start)
        self.loader = self._loader()
        pin = torch.cuda.is_available()
        for batch in self.loader:
            self.taken += 1
            yield _as_tensors(batch, pin)

    def close(self) -> None:
        """Stop the workers now. Close the generators of ``iter(self)`` first: the last reference to the
        dataloader's iterator going away is what sends each worker its stop sentinel and joins it."""
        self.loader = None

    def position(self) -> Position:
        """The position after every rank's first ``taken`` micro batches since the start."""
        walked, at = self._walked
        target = self.taken * self.cfg.world_size
        if walked > target:
            walked, at = 0, self.dataset.start
        at = self.cut.skip(at, target - walked)
        self._walked = (target, at)
        return at

    def skip_counts(self) -> dict[str, int]:
        """Skipped records by reason, counted once when the corpus was packed."""
        return dict(self.corpus.skipped)

    def _config(self) -> dict:
        return {"objective": self.cfg.objective, "seq_len": self.cfg.seq_len, "seed": self.cfg.seed,
                "corpus": self.corpus.fingerprint}

    def state_dict(self) -> dict:
        at = self.position()
        return {"format": STATE_FORMAT, "epoch": at.epoch, "index": at.index, "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise UsageError("the checkpoint's data state was written by an older ds_train stream; resume it "
                             "with that version, or start a new run (model.init_from an export of it)")
        if state["config"] != self._config():
            raise UsageError(f"data state was saved with another stream configuration ({state['config']} != "
                             f"{self._config()}); it cannot resume this one")
        self.dataset.start, self.taken = Position(int(state["epoch"]), int(state["index"])), 0
        self._walked = (0, self.dataset.start)


def _names(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    return [str(sources)] if isinstance(sources, (str, os.PathLike)) else [str(s) for s in sources]


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
    corrupt_prob: float = 0.15,
    val_share: float = 0.0,
    val_sources: Sequence[str | os.PathLike] = (),
    drop_overlong: bool = True,
) -> StreamLoader:
    """The training loader of one rank over packed folders (see the module docstring).

    Raw pair sources are packed first into a temporary folder that lives as long as the loader
    (``ds-train`` packs them into the run directory instead, once: ``prepack.ensure_packed``).

    ``val_share``: the held-out share of ``_id``s that never train; ``val_sources``: packed validation
    folders whose ``_id``s never train.

    Raises:
        UsageError: bad settings, folders that are not packed or were packed for another sequence
            length or tokenizer, or no training document.
    """
    names, scratch = _names(sources), None
    if not all(is_packed_dir(n) for n in names):
        scratch = tempfile.TemporaryDirectory(prefix="ds_train-packed-")
        names = ensure_packed(names, tokenizer_dir, Path(scratch.name) / "packed", seq_len=seq_len,
                              drop_overlong=drop_overlong, workers=1)
    cfg = StreamConfig(names, str(tokenizer_dir), objective, seq_len, micro_batch_size, rank, world_size,
                       num_workers, seed, corrupt_prob, val_share, [str(v) for v in val_sources])
    tokenizer = load_tokenizer(tokenizer_dir)
    corpus = Corpus(names, "train", val_share, _ids_of(val_sources))
    if len(corpus) == 0:
        skipped = ", ".join(f"{k}={v}" for k, v in corpus.skipped.items()) or "none"
        raise UsageError(f"no training documents in {', '.join(names)}: every pair is longer than seq_len "
                         f"{seq_len}, or the rest is held out for validation (skipped: {skipped})")
    check_packed(names, seq_len, len(tokenizer))
    encoder = Encoder(tokenizer, objective, seed=seed, corrupt_prob=corrupt_prob)
    loader = StreamLoader(cfg, corpus, batch_spec(encoder, objective, seq_len))
    loader.scratch = scratch  # removed with the loader
    return loader


def _ids_of(sources: Sequence[str | os.PathLike]) -> set[str]:
    return {str(i) for i in Corpus([str(s) for s in sources]).ids} if sources else set()


def validation_batches(
    sources: Sequence[str | os.PathLike], tokenizer_dir: str | os.PathLike, *, objective: str, seq_len: int,
    micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, corrupt_prob: float = 0.15,
    val_share: float = 0.0,
) -> Iterator[tuple[dict, bool]]:
    """This rank's validation micro batches, as (batch, counts): with ``val_share`` the held-out share of
    ``sources``, else every document of ``sources`` (a validation folder). Documents in their hash order,
    cut like the training stream, micro batch ``m`` to rank ``m % world_size``; every rank gets the same
    number of batches (a rank short of one repeats a batch with ``counts`` False: ZeRO-3's forward is
    collective). Corrupt Code CLM draws from epoch 0."""
    corpus = Corpus(_names(sources), "held_out" if val_share else "all", val_share)
    tokenizer = load_tokenizer(tokenizer_dir)
    spec = batch_spec(Encoder(tokenizer, objective, seed=seed, corrupt_prob=corrupt_prob), objective, seq_len)
    budget = micro_batch_size * seq_len
    cuts, start, room = [], 0, budget
    for k, length in enumerate(corpus.length.tolist()):
        if length > room:
            cuts.append((start, k))
            start, room = k, budget
        room -= length
    if start < len(corpus):
        cuts.append((start, len(corpus)))
    if not cuts:
        return
    mine = cuts[rank::world_size]
    rounds = -(-len(cuts) // world_size)
    for m in range(rounds):
        begin, end = mine[m] if m < len(mine) else cuts[0]
        docs = [corpus.doc(k) for k in range(begin, end)]
        yield make_stream_batch(docs, [0] * len(docs), spec, budget), m < len(mine)


def val_scalars(stats: Sequence[float]) -> dict[str, float]:
    """``val/loss`` (and ``val/code_loss``, ``val/text_loss`` where counted) from the summed
    ``[code_loss_sum, code_targets, text_loss_sum, text_targets]``."""
    code_sum, code_n, text_sum, text_n = (float(x) for x in stats)
    out = {"val/loss": (code_sum + text_sum) / max(code_n + text_n, 1.0)}
    if code_n:
        out["val/code_loss"] = code_sum / code_n
    if text_n:
        out["val/text_loss"] = text_sum / text_n
    return out
