"""Raw pairs into packed shards in the run directory, once, before training (the stream reads shards).

``ds-train`` calls ``ensure_packed`` on rank 0 while the others wait: raw sources (files, folders, hub
names, the mined corpus) are packed by ``pack.pack_corpus`` into ``RUN_DIR/packed`` (or
``RUN_DIR/packed_val`` for a validation file), in parallel processes. The folder is reused as long as
its ``meta.json`` names the same sources, sequence length, overlong policy and tokenizer (a resume
finds it); otherwise it is packed again, replacing the old folder only when the new one is complete.
Packed folders given as the source are used as they are.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ds_train.data.pack import is_packed_dir, pack_corpus, read_meta, tokenizer_fingerprint
from ds_train.data.sources import SkipCounter, is_hub_name, list_units
from ds_train.errors import UsageError

log = logging.getLogger(__name__)

MAX_PACK_WORKERS = 8
SMALL_INPUT_BYTES = 64 << 20  # local input below this is packed in one process (its log lines stay in it)


def ensure_packed(sources: Sequence[str], tokenizer_dir: str | os.PathLike, out: Path, *, seq_len: int,
                  drop_overlong: bool = True, workers: int | None = None) -> list[str]:
    """The packed folders to train on: ``sources`` themselves when they are packed, else ``[out]``,
    packed from them unless ``out`` already holds them with these settings."""
    names = [str(s) for s in sources]
    packed = [is_packed_dir(s) for s in names]
    if all(packed):
        return names
    if any(packed):
        raise UsageError("mix of packed folders and raw pair sources: pass one kind")
    wanted = {"sources": names, "seq_len": seq_len, "drop_overlong": drop_overlong,
              "tokenizer_sha": tokenizer_fingerprint(Path(tokenizer_dir))}
    if is_packed_dir(out):
        meta = read_meta(out)
        if all(meta.get(k) == v for k, v in wanted.items()):
            log.info("data: reusing the packed corpus %s (%d documents in %d rows)", out, meta["docs"],
                     meta["rows"])
            return [str(out)]
        log.info("data: %s was packed with other sources or settings; packing again", out)
    workers = workers or _pack_workers(names)
    log.info("data: packing %s into %s (%d processes)", ", ".join(names), out, workers)
    pack_corpus(names, tokenizer_dir, out, seq_len=seq_len, num_shards=workers, pack_buffer=1,
                drop_overlong=drop_overlong, workers=workers)
    return [str(out)]


def packed_paths(sources: Sequence[str], out: Path) -> list[str]:
    """The folders ``ensure_packed`` returns, without packing (for the ranks that wait for rank 0)."""
    names = [str(s) for s in sources]
    return names if names and all(is_packed_dir(s) for s in names) else [str(out)]


def run_inputs(sources: Sequence[str], val_source: str, tokenizer_dir: str | os.PathLike, run_dir: Path, *,
               seq_len: int, drop_overlong: bool, pack: bool) -> tuple[list[str], list[str]]:
    """A run's packed training and validation folders (``RUN_DIR/packed``, ``RUN_DIR/packed_val`` for raw
    pairs); with ``pack`` (rank 0) they are packed when missing, else only named."""
    val = [s.strip() for s in val_source.split(",") if s.strip()]
    jobs = [(list(sources), run_dir / "packed"), (val, run_dir / "packed_val")]
    out = [(ensure_packed(names, tokenizer_dir, folder, seq_len=seq_len, drop_overlong=drop_overlong)
            if pack else packed_paths(names, folder)) if names else [] for names, folder in jobs]
    return out[0], out[1]


def _pack_workers(names: list[str]) -> int:
    """Processes for packing: one for small local input, else one per core up to MAX_PACK_WORKERS."""
    units = list_units(names, SkipCounter(quiet=True))
    local = [Path(u) for u in units if not is_hub_name(u)]
    if len(local) == len(units) and sum(p.stat().st_size for p in local if p.is_file()) < SMALL_INPUT_BYTES:
        return 1
    return max(1, min(os.cpu_count() or 1, MAX_PACK_WORKERS))
