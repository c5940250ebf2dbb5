"""``ds-data``: mine a corpus, train a tokenizer, encode pairs, pack shards, inspect packed rows.

Every subcommand prints its result on stdout; bad input ends with one ``ds-data COMMAND: error: ...``
line on stderr and exit code 2. Files and directories named by ``--out`` are written under a
temporary name beside the target and renamed into place only on success.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ds_train.data import mine
from ds_train.data.batch import batch_spec, describe_row, make_batch
from ds_train.data.encode import OBJECTIVES, Encoder
from ds_train.data.pack import Doc, Shard, corpus_docs, is_packed_dir, pack, pack_corpus, read_meta, shard_paths
from ds_train.data.sources import SkipCounter, read_pairs
from ds_train.data.tokenizer import DEFAULT_VOCAB_SIZE, adapt_tokenizer, load_tokenizer, train_tokenizer
from ds_train.errors import UsageError, first_line, refuse
from ds_train.fileio import replacing_file


def build_parser() -> argparse.ArgumentParser:
    """The ``ds-data`` parser with its five subcommands."""
    parser = argparse.ArgumentParser(
        prog="ds-data", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every skipped record")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    mine.add_arguments(command("mine", "mine (docstring, code) pairs from Python sources"))
    _tokenizer_arguments(command("tokenizer", "train (or adapt) a tokenizer directory"))
    _encode_arguments(command("encode", "encode pairs into the layout, one JSON line each"))
    _pack_arguments(command("pack", "pre-tokenize and pack a corpus into Arrow shards"))
    _inspect_arguments(command("inspect", "show a packed row with modality and targets"))
    return parser


def _tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus", nargs="+", help="pair files / folders / hub names to train on (code as source or linearized)"
    )
    p.add_argument(
        "--from-pretrained", type=Path, help="adapt this local tokenizer directory instead of training"
    )
    p.add_argument("--out", type=Path, required=True, help="the tokenizer directory to write")
    p.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="tokens, whole-word pieces included"
    )
    p.add_argument("--max-pairs", type=int, default=200_000, help="train on at most this many pairs")


def _encode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer directory")
    p.add_argument("--in", dest="inputs", nargs="+", required=True, help="pair files / folders / hub names")
    p.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    p.add_argument("--objective", choices=OBJECTIVES, default="code_clm", help="which flags to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption (corrupt_code_clm)")
    p.add_argument(
        "--epoch", type=int, default=0, help="the epoch whose corruption to draw (corrupt_code_clm)"
    )
    p.add_argument("--corrupt-prob", type=float, default=0.15, help="share of docstring tokens corrupted")


def _pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--in", dest="inputs", nargs="+", required=True, help="pair files / folders / hub names")
    p.add_argument("--out", type=Path, required=True, help="the folder of shards to write")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--num-shards", type=int, default=16, help="a multiple of ranks x workers reads evenly")
    p.add_argument("--pack-buffer", type=int, default=8, help="open rows for best-fit packing (1 = greedy)")
    p.add_argument(
        "--truncate", action="store_true", help="cut pairs longer than --seq-len instead of dropping"
    )
    p.add_argument("--workers", type=int, default=1, help="processes; --num-shards must be a multiple of it")


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a packed folder (or raw pair files, packed on the fly)")
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--objective", choices=OBJECTIVES, default="code_clm")
    p.add_argument("--row", type=int, default=0, help="which row (of shard 0, or of the packed stream)")
    p.add_argument("--seq-len", type=int, default=1024, help="row length when packing raw pairs")
    p.add_argument("--limit", type=int, default=None, help="show at most this many tokens")


# ---------------------------------------------------------------------------------------------- commands


def run_tokenizer(args: argparse.Namespace) -> int:
    if bool(args.corpus) == bool(args.from_pretrained):
        raise UsageError("give exactly one of --corpus (train) or --from-pretrained (adapt)")
    if args.from_pretrained:
        tokenizer = adapt_tokenizer(args.from_pretrained, args.out)
    else:
        tokenizer = train_tokenizer(args.corpus, args.out, args.vocab_size, max_pairs=args.max_pairs)
    print(f"wrote {args.out}: {len(tokenizer)} tokens")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.tokenizer)
    encoder = Encoder(tokenizer, args.objective, seed=args.seed, corrupt_prob=args.corrupt_prob)
    skips, counts = SkipCounter(), {"pairs": 0, "docs": 0}
    if args.out.is_dir():
        raise UsageError(f"--out {args.out} is a directory")
    with replacing_file(args.out) as out:
        for doc in corpus_docs(args.inputs, encoder, skips, counts):
            encoded = encoder.finish(doc.id, doc.ids, doc.segments, args.epoch)
            out.write(json.dumps(_encoded_record(encoded, args.objective)) + "\n")
        if counts["docs"] == 0:
            raise UsageError(f"nothing to write: no pair of {', '.join(args.inputs)} encodes ({skips.report()})")
    print(f"wrote {counts['docs']} encoded pairs to {args.out}; {skips.report()}")
    return 0


def _encoded_record(enc, objective: str) -> dict:
    record = {"_id": enc.id, "input_ids": enc.input_ids, "modality": enc.modality, "target": enc.target}
    if objective == "prefix_code_clm":
        record["prefix"] = enc.prefix
    return record


def run_pack(args: argparse.Namespace) -> int:
    meta = pack_corpus(
        args.inputs,
        args.tokenizer,
        args.out,
        seq_len=args.seq_len,
        num_shards=args.num_shards,
        pack_buffer=args.pack_buffer,
        drop_overlong=not args.truncate,
        workers=args.workers,
    )
    fill = meta["tokens"] / max(1, meta["rows"] * meta["seq_len"])
    skipped = sum(meta["skipped"].values())
    print(
        f"packed {meta['docs']} pairs into {meta['rows']} rows x {meta['seq_len']} ({fill:.1%} filled) in "
        f"{meta['num_shards']} shards at {args.out}; skipped {skipped}: {meta['skipped']}"
    )
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.tokenizer)
    encoder = Encoder(tokenizer, args.objective)
    if is_packed_dir(args.source):
        seq_len = int(read_meta(args.source)["seq_len"])
        shard = Shard(shard_paths(args.source)[0])
        if not 0 <= args.row < len(shard):
            raise ValueError(f"--row {args.row} is outside shard 0 ({len(shard)} rows)")
        row = shard.row(args.row)
    else:
        seq_len, skips = args.seq_len, SkipCounter()
        docs = (
            Doc(*laid) for pair in read_pairs([args.source], skips) for laid in encoder.layout([pair], skips)
        )
        row = next((r for i, r in enumerate(pack(docs, seq_len, skips=skips)) if i == args.row), None)
        if row is None:
            raise ValueError(f"--row {args.row}: the packed stream of {args.source} is shorter")
    batch = make_batch([row], batch_spec(encoder, args.objective, seq_len))
    print(describe_row(batch, 0, tokenizer, args.limit))
    return 0


COMMANDS = {"tokenizer": run_tokenizer, "encode": run_encode, "pack": run_pack, "inspect": run_inspect}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ds-data``; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    if args.command == "mine":
        return mine.run(args)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as err:  # UsageError is a ValueError; readers raise ValueError too
        return refuse(f"ds-data {args.command}: error", first_line(err))


if __name__ == "__main__":
    sys.exit(main())
