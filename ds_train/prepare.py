"""The stages before training: the corpus (mined when none is named) and the tokenizer.

Each stage reuses its output when it is already in the run directory, so a re-run starts training
at once. Only rank 0 runs them; the other ranks wait at a barrier (the run directory must be on a
file system every node sees).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from ds_train.config import Config

log = logging.getLogger(__name__)


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
        _ensure_mined(cfg, Path(sources[0]))
    if not cfg.data.tokenizer:
        _ensure_tokenizer(cfg, sources, tok_dir)
    return Prepared(sources, tok_dir)


def _ensure_mined(cfg: Config, out: Path) -> None:
    from ds_train.data.mine import mine

    if out.is_file() and out.stat().st_size > 0:
        log.info("corpus: reusing %s", out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in cfg.data.mine_paths] or None
    log.info("corpus: mining Python sources into %s", out)
    summary = mine(paths, out, limit=cfg.data.mine_limit or None)
    log.info("corpus: %s", summary)


def _ensure_tokenizer(cfg: Config, sources: list[str], tok_dir: Path) -> None:
    from ds_train.data.tokenizer import train_tokenizer

    if (tok_dir / "separation.json").is_file():
        log.info("tokenizer: reusing %s", tok_dir)
        return
    if len(sources) != 1 or not Path(sources[0]).is_file():
        raise SystemExit(
            "no tokenizer: set data.tokenizer=DIR (train one with `ds-data tokenizer --corpus FILE --out DIR`)"
        )
    log.info("tokenizer: training a %d-token sentencepiece model on %s", cfg.data.vocab_size, sources[0])
    train_tokenizer(Path(sources[0]), tok_dir, cfg.data.vocab_size)


def tokenizer_sha(tok_dir: Path) -> str:
    """A fingerprint of the tokenizer's files, so a checkpoint is never resumed with another one."""
    h = hashlib.sha256()
    for p in sorted(tok_dir.iterdir()):
        if p.is_file() and p.suffix in (".model", ".json", ".txt") and p.name != "separation.json":
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update((tok_dir / "separation.json").read_bytes() if (tok_dir / "separation.json").is_file() else b"")
    return h.hexdigest()[:16]
