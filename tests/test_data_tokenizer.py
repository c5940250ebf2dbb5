"""Tokenizers: the committed asset through AutoTokenizer, training, adapting a byte-level BPE, separation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ds_train.data.encode import render_docstring
from ds_train.data.tokenizer import (
    SPECIAL_TOKENS,
    adapt_tokenizer,
    load_tokenizer,
    separated_ids,
    train_tokenizer,
)

ASSETS = Path(__file__).parent / "assets"
TOKENIZER = ASSETS / "tokenizer"
PAIRS = [json.loads(line) for line in (ASSETS / "tiny_pairs.jsonl").read_text().splitlines()]
PY_TOKENS = (Path(__file__).parents[1] / "ds_train" / "resources" / "python_tokens.txt").read_text().split()


def test_asset_round_trips_exactly_through_autotokenizer() -> None:
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    texts = [render_docstring(p["docstring"]) for p in PAIRS] + [p["code"] for p in PAIRS]
    texts += ["  leading spaces", "tabs\tand\nnewlines\n", "unicode: é ☃ 𝔘", "<bot>def<eot>"]
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    assert min(len(ids) for ids in encoded) > 0  # a broken wrapper encodes to nothing
    for text, ids in zip(texts, encoded):
        assert tok.decode(ids) == text


def test_asset_matches_its_sentencepiece_model() -> None:
    import sentencepiece as spm

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER / "sentencepiece.model"))
    texts = [render_docstring(p["docstring"]) for p in PAIRS[:80]] + [p["code"] for p in PAIRS[:80]]
    assert tok(texts, add_special_tokens=False)["input_ids"] == [sp.encode(t) for t in texts]


def test_special_tokens_are_single_ids_and_pad_is_set() -> None:
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tok.unk_token_id not in ids
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tok.encode(token, add_special_tokens=False) == [token_id]
    assert tok.pad_token == "<pad>" and tok.pad_token_id == ids[0]
    code = "def f ( ) : <NEW_LINE> <INDENT> return 1 <NEW_LINE> <DEDENT>"
    pieces = tok.convert_ids_to_tokens(tok.encode(code, add_special_tokens=False))
    assert [p for p in pieces if p.startswith("<") and p.endswith(">")] == [
        "<NEW_LINE>",
        "<INDENT>",
        "<NEW_LINE>",
        "<DEDENT>",
    ]
    assert "▁return" in pieces  # a word-initial Python token is one piece


def test_separation_sets_match_a_hand_derived_expectation() -> None:
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    vocab = tok.get_vocab()
    special = {vocab[t] for t in SPECIAL_TOKENS} | {vocab["<unk>"]}
    partial = set(separated_ids(TOKENIZER, "partial"))
    # Hand-picked members and non-members.
    for piece in ("▁return", "▁def", "▁self", "▁(", "▁,", "▁len", "▁isinstance", "▁None"):
        assert vocab[piece] in partial, piece
    for piece in ("▁wrap", "▁text", "<python>", "<NEW_LINE>", "<pad>", "▁the"):
        assert vocab.get(piece) not in partial, piece
    # The definition, written out: list entries and their ▁ forms that exist, never a special.
    expected = {vocab[form] for t in PY_TOKENS for form in (t, "▁" + t) if form in vocab} - special
    assert partial == expected
    assert separated_ids(TOKENIZER, "none") == []
    full = separated_ids(TOKENIZER, "full")
    assert full == sorted(set(range(len(tok))) - special) and len(full) == len(tok) - 10
    assert separated_ids(tok, "partial") == sorted(partial)  # from the object: read beside its files
    with pytest.raises(ValueError, match="unknown separation"):
        separated_ids(TOKENIZER, "half")


def test_train_tokenizer_writes_a_loadable_directory(tmp_path: Path) -> None:
    corpus = tmp_path / "pairs.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in PAIRS[:120]) + "{broken\n")
    tok = train_tokenizer(corpus, tmp_path / "tok", vocab_size=700)
    assert len(tok) == 700
    loaded = load_tokenizer(tmp_path / "tok")
    text = PAIRS[130]["code"]  # not in the training slice
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    sets = json.loads((tmp_path / "tok" / "separation.json").read_text())
    assert (
        sets["none"] == []
        and sets["partial"] == sorted(sets["partial"])
        and set(sets["partial"]) < set(sets["full"])
    )


def byte_level_bpe(tmp_path: Path) -> Path:
    """A small GPT-2 style byte-level BPE directory, like PyCodeGPT's, without the project's tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [p["code"].replace(" <NEW_LINE> ", "\n") for p in PAIRS[:100]] + [
        p["docstring"] for p in PAIRS[:100]
    ]
    tokenizer.train_from_iterator(texts, trainer)
    out = tmp_path / "gpt2ish"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def test_adapting_a_byte_level_bpe_adds_special_and_missing_python_tokens(tmp_path: Path) -> None:
    base_dir = byte_level_bpe(tmp_path)
    base_vocab = AutoTokenizer.from_pretrained(base_dir).get_vocab()
    tok = adapt_tokenizer(base_dir, tmp_path / "adapted")
    loaded = load_tokenizer(tmp_path / "adapted")
    vocab = loaded.get_vocab()
    for token in SPECIAL_TOKENS:
        assert loaded.encode(token, add_special_tokens=False) == [vocab[token]]
    missing = [t for t in dict.fromkeys(PY_TOKENS) if t not in base_vocab and "Ġ" + t not in base_vocab]
    assert missing and all(t in vocab for t in missing)
    text = "def f ( x ) : <NEW_LINE> <INDENT> return x . casefold ( ) <NEW_LINE> <DEDENT>"
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    partial = set(separated_ids(tmp_path / "adapted", "partial"))
    assert vocab["Ġreturn"] in partial and vocab["casefold"] in partial
    special = {vocab[t] for t in SPECIAL_TOKENS} | {vocab["<|endoftext|>"]}
    expected = {vocab[f] for t in PY_TOKENS for f in (t, "Ġ" + t) if f in vocab} - special
    assert partial == expected
    assert len(tok) == len(loaded)


def test_bad_tokenizer_directories_fail_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ValueError, match="special token"):
        load_tokenizer(byte_level_bpe(tmp_path))
