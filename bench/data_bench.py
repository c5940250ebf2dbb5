"""Data pipeline throughput: packed tokens/s of one worker, on the fly and from pre-packed shards.

    .venv/bin/python bench/data_bench.py [--corpus FILE] [--tokenizer DIR] [--repeat 40] [--seq-len 1024]

The corpus (default: the test asset) is repeated ``--repeat`` times with fresh ``_id``s into a
temporary JSONL file, packed into shards by ``ds-data pack``'s code, and read back through
``build_dataloader`` with ``num_workers=0`` (the main process is the one worker). "Tokens" are
``B x T`` slots of the yielded batches; "real" excludes padding.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from ds_train.data.pack import pack_corpus
from ds_train.data.stream import build_dataloader

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(source: Path, repeat: int, out: Path) -> int:
    """``repeat`` copies of ``source`` with distinct ``_id``s; returns the number of pairs."""
    lines = source.read_text(encoding="utf-8").splitlines()
    count = 0
    with open(out, "w", encoding="utf-8") as f:
        for r in range(repeat):
            for line in lines:
                record = json.loads(line)
                record["_id"] = f"{record['_id']}#{r}"
                f.write(json.dumps(record) + "\n")
                count += 1
    return count


def measure(loader, batches: int) -> tuple[float, float]:
    """(slot tokens/s, real tokens/s) over ``batches`` batches after one warm-up batch."""
    stream = iter(loader)
    next(stream)
    slots = real = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
        slots += batch["input_ids"].numel()
        real += int((batch["doc_ids"] >= 0).sum())
    elapsed = time.perf_counter() - start
    return slots / elapsed, real / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "tests/assets/tiny_pairs.jsonl")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "tests/assets/tokenizer")
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--objective", default="code_clm")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        pairs = make_corpus(args.corpus, args.repeat, corpus)
        settings = {
            "objective": args.objective,
            "seq_len": args.seq_len,
            "micro_batch_size": args.micro_batch_size,
            "num_workers": 0,
        }
        fly = measure(build_dataloader(corpus, args.tokenizer, **settings), args.batches)
        start = time.perf_counter()
        meta = pack_corpus(
            corpus, args.tokenizer, Path(tmp) / "packed", seq_len=args.seq_len, num_shards=16, pack_buffer=8
        )
        pack_rate = meta["tokens"] / (time.perf_counter() - start)
        shards = measure(build_dataloader(Path(tmp) / "packed", args.tokenizer, **settings), args.batches)
    print(
        f"corpus: {pairs} pairs, {meta['tokens']} tokens, {meta['rows']} rows of {args.seq_len} "
        f"({meta['tokens'] / (meta['rows'] * args.seq_len):.1%} filled); objective {args.objective}, "
        f"batch {args.micro_batch_size} x {args.seq_len}"
    )
    print(f"raw pairs (packed first, then streamed), 1 worker: {fly[0]:>12,.0f} tokens/s ({fly[1]:,.0f} real)")
    print(
        f"pre-packed shards, 1 worker:                 {shards[0]:>12,.0f} tokens/s ({shards[1]:,.0f} real)"
    )
    print(f"ds-data pack (one process):                  {pack_rate:>12,.0f} tokens/s")


if __name__ == "__main__":
    main()
