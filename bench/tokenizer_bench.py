"""Sequence lengths of the project's tokenizer against plain sentencepiece BPEs of the same size.

    .venv/bin/python bench/tokenizer_bench.py [--corpus FILE ...] [--mine-limit 6000] [--vocab-size 4000]

Without ``--corpus`` the default job's corpus is mined first (this interpreter's standard library
and site-packages, ``--mine-limit`` pairs). Three tokenizers are trained on the same pairs:

- ``plain``: sentencepiece BPE with only the markers and special tokens as user symbols, the
  project's other trainer settings, and as many pieces as the project's tokenizer has in all;
- ``before``: the earlier default, the same with ``▁`` + each Python token forced as a symbol
  (segments as sentencepiece does, which is what its ``tokenizer.json`` did);
- ``after``: ``ds_train.data.tokenizer.train_tokenizer`` (``--vocab-size``).

Each pair is laid out as training sees it (``<bot> SIGNATURE <comments> DOCSTRING <python> BODY
<eot>``, segments tokenized separately). Printed: tokens per pair (mean), characters of code per
code token (signature and body), the share of lone ``▁`` pieces right before a marker, the share of
pairs longer than ``--seq-len``, and the reduction of tokens per pair against ``plain``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
from itertools import pairwise
from pathlib import Path

import sentencepiece as spm

from ds_train.data.codec import MARKERS, SPECIAL_TOKENS, ensure_linearized, render_docstring, split_signature
from ds_train.data.encode import Encoder
from ds_train.data.mine import mine
from ds_train.data.sources import read_pairs
from ds_train.data.tokenizer import python_tokens, sentencepiece_settings, train_tokenizer

LAYOUT_SPECIALS = 4  # <bot> <comments> <python> <eot>


def segments(corpus: list[Path]) -> list[tuple[str, str, str]]:
    """(signature, rendered docstring, body) of every usable pair."""
    out = []
    for pair in read_pairs(corpus):
        try:
            signature, body = split_signature(ensure_linearized(pair.code))
        except ValueError:
            continue
        out.append((signature.strip(), render_docstring(pair.docstring), body.strip()))
    return out


def sentencepiece_model(texts: list[str], size: int, forced: list[str]) -> spm.SentencePieceProcessor:
    settings = sentencepiece_settings(size)
    settings["user_defined_symbols"] = settings["user_defined_symbols"] + forced
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(**settings, sentence_iterator=iter(texts), model_writer=model)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def stats(lengths: list[tuple[int, int, int]], lone: int, segs, seq_len: int) -> dict:
    """Means and shares over pairs; ``lengths`` holds (signature, docstring, body) token counts."""
    per_pair = [LAYOUT_SPECIALS + s + d + b for s, d, b in lengths]
    code_chars = sum(len(sig) + len(body) for sig, _, body in segs)
    code_tokens = sum(s + b for s, _, b in lengths)
    return {
        "tokens_per_pair": sum(per_pair) / len(per_pair),
        "code_chars_per_token": code_chars / code_tokens,
        "lone_space_before_marker": lone / sum(per_pair),
        "over_seq_len": sum(n > seq_len for n in per_pair) / len(per_pair),
    }


def sp_lengths(sp: spm.SentencePieceProcessor, segs) -> tuple[list[tuple[int, int, int]], int]:
    lengths, lone = [], 0
    for parts in segs:
        pieces = [sp.encode(text, out_type=str) for text in parts]
        lengths.append(tuple(len(p) for p in pieces))
        lone += sum(1 for p in pieces for a, b in pairwise(p) if a == "▁" and b in MARKERS)
    return lengths, lone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, nargs="*")
    parser.add_argument("--mine-limit", type=int, default=6000)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus
        if not corpus:
            corpus = [Path(tmp) / "pairs.jsonl"]
            mine(None, corpus[0], limit=args.mine_limit, progress=False)
        segs = segments(corpus)
        ours = train_tokenizer(corpus, Path(tmp) / "tok", args.vocab_size)
        texts = [text for sig, doc, body in segs for text in (doc, f"{sig} {body}")]
        plain = sentencepiece_model(texts, len(ours), [])
        forced = [f"▁{t}" for t in python_tokens()]
        forced = [s for s in forced if not any(f"▁{special}".startswith(s) for special in SPECIAL_TOKENS)]
        before = sentencepiece_model(texts, args.vocab_size, forced)
        encoder = Encoder(ours)
        flat = [text for parts in segs for text in parts]
        ids = encoder.tokenize(flat)
        after_lengths = [tuple(len(x) for x in ids[3 * i : 3 * i + 3]) for i in range(len(segs))]
        results = {
            "plain": stats(*sp_lengths(plain, segs), segs, args.seq_len),
            "before": stats(*sp_lengths(before, segs), segs, args.seq_len),
            "after": stats(after_lengths, 0, segs, args.seq_len),
        }
        sizes = {"plain": plain.get_piece_size(), "before": before.get_piece_size(), "after": len(ours)}
    base = results["plain"]["tokens_per_pair"]
    print(f"{len(segs)} pairs, {args.seq_len}-token rows")
    print(
        f"{'tokenizer':<9} {'vocab':>6} {'tok/pair':>9} {'code chr/tok':>13} {'lone ▁':>7} {'>seq_len':>9}"
        f" {'vs plain':>9}"
    )
    for name, r in results.items():
        print(
            f"{name:<9} {sizes[name]:>6} {r['tokens_per_pair']:>9.1f} {r['code_chars_per_token']:>13.2f} "
            f"{r['lone_space_before_marker']:>7.1%} {r['over_seq_len']:>9.1%} "
            f"{r['tokens_per_pair'] / base - 1:>+9.1%}"
        )
    print(json.dumps({"pairs": len(segs), "sizes": sizes, **results}))


if __name__ == "__main__":
    main()
