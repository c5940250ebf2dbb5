"""The stages before training: the corpus (mined when none is named) and the tokenizer.

Each stage reuses its output when it is already in the run directory, so a re-run starts training
at once. Only rank 0 runs them; the other ranks wait at a barrier (the run directory must be on a
file system every node sees).

The mined corpus keeps what the rows hold: the miner's filters count linearized items, the rows
count tokens, so a pool a quarter larger than ``data.mine_limit`` is mined
(``RUN_DIR/data/mined.jsonl``), the tokenizer is trained on it, and ``RUN_DIR/data/pairs.jsonl``
takes the first ``data.mine_limit`` pairs of the pool that fit a row of ``data.seq_len`` tokens.
The summary line says how many were left out for their length.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from ds_train.config import Config
from ds_train.data.encode import Encoder
from ds_train.data.mine import MinedPair, mine
from ds_train.data.sources import SkipCounter, read_pairs
from ds_train.data.tokenizer import SEPARATION_FILE, load_tokenizer, train_tokenizer
from ds_train.fileio import replacing_file

log = logging.getLogger(__name__)

POOL_SHARE = 1.25
"""Pairs mined per pair kept: room for the pairs longer than a row in tokens (about 11% with the
default 512-token rows)."""
BATCH = 512  # pairs tokenized at a time by the length filter


@dataclass(frozen=True)
class Prepared:
    sources: list[str]
    tokenizer_dir: Path


def corpus_sources(cfg: Config, run_dir: Path) -> list[str]:
    if cfg.data.source == "mined":
        return [str(run_dir / "data" / "pairs.jsonl")]
    return [s.strip() for s in cfg.data.source.split(",") if s.strip()]


def prepare(cfg: Config, run_dir: Path, is_main: bool) -> Prepared:
    sources = corpus_sources(cfg, run_dir)
    tok_dir = Path(cfg.data.tokenizer) if cfg.data.tokenizer else run_dir / "tokenizer"
    if not is_main:
        return Prepared(sources, tok_dir)
    if cfg.data.source == "mined":
        _ensure_mined(cfg, Path(sources[0]), tok_dir)
    elif not cfg.data.tokenizer:
        _ensure_tokenizer(cfg, sources, tok_dir)
    return Prepared(sources, tok_dir)


def _ensure_mined(cfg: Config, out: Path, tok_dir: Path) -> None:
    """Mine the pool, train the tokenizer on it (unless one is given), keep the pairs that fit."""
    pool = out.with_name("mined.jsonl")
    if out.is_file() and out.stat().st_size > 0:
        log.info("corpus: reusing %s", out)
        if not cfg.data.tokenizer:
            _ensure_tokenizer(cfg, [str(pool if pool.is_file() else out)], tok_dir)
        return
    if pool.is_file() and pool.stat().st_size > 0:
        log.info("corpus: reusing the mined pool %s", pool)
    else:
        paths = [Path(p) for p in cfg.data.mine_paths] or None
        limit = math.ceil(cfg.data.mine_limit * POOL_SHARE) if cfg.data.mine_limit else None
        log.info("corpus: mining Python sources into %s", pool)
        mine(paths, pool, limit=limit)  # logs its summary line
    if not cfg.data.tokenizer:
        _ensure_tokenizer(cfg, [str(pool)], tok_dir)
    kept, too_long = keep_fitting(pool, out, tok_dir, cfg.data.seq_len, cfg.data.mine_limit or None)
    log.info("corpus: kept %d pairs of %s; %d left out (longer than %d tokens)", kept, pool, too_long,
             cfg.data.seq_len)


def keep_fitting(pool: Path, out: Path, tok_dir: Path, seq_len: int, limit: int | None) -> tuple[int, int]:
    """Copy the pairs of ``pool`` whose layout fits ``seq_len`` tokens into ``out`` (atomically),
    in order, until ``limit`` are kept. Returns (kept, left out for their length)."""
    encoder = Encoder(load_tokenizer(tok_dir))
    kept = too_long = 0
    with replacing_file(out) as sink:
        batch = []
        for pair in read_pairs([str(pool)], SkipCounter()):
            batch.append(pair)
            if len(batch) == BATCH:
                kept, too_long = _write_fitting(batch, encoder, sink, seq_len, limit, kept, too_long)
                batch = []
                if limit is not None and kept >= limit:
                    break
        if batch and (limit is None or kept < limit):
            kept, too_long = _write_fitting(batch, encoder, sink, seq_len, limit, kept, too_long)
    return kept, too_long


def _write_fitting(batch, encoder: Encoder, sink, seq_len: int, limit, kept: int, too_long: int):
    by_id = {pair.id: pair for pair in batch}
    for pair_id, ids, _ in encoder.layout(batch, SkipCounter(quiet=True)):
        if limit is not None and kept >= limit:
            break
        if len(ids) > seq_len:
            too_long += 1
            continue
        pair = by_id[pair_id]
        sink.write(MinedPair(pair.id, pair.docstring, pair.code).to_json() + "\n")
        kept += 1
    return kept, too_long


def _ensure_tokenizer(cfg: Config, sources: list[str], tok_dir: Path) -> None:
    """Train the run's tokenizer on the corpus (any sources), unless it is already there."""
    if (tok_dir / SEPARATION_FILE).is_file():
        log.info("tokenizer: reusing %s", tok_dir)
        return
    log.info("tokenizer: training a %d-token sentencepiece BPE on %s", cfg.data.vocab_size, ", ".join(sources))
    train_tokenizer(sources, tok_dir, cfg.data.vocab_size)


def tokenizer_sha(tok_dir: Path) -> str:
    """A fingerprint of the tokenizer's files, so a checkpoint is never resumed with another one."""
    h = hashlib.sha256()
    for p in sorted(tok_dir.iterdir()):
        if p.is_file() and p.suffix in (".model", ".json", ".txt") and p.name != SEPARATION_FILE:
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update((tok_dir / SEPARATION_FILE).read_bytes() if (tok_dir / SEPARATION_FILE).is_file() else b"")
    return h.hexdigest()[:16]
