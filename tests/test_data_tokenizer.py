"""Tokenizers: the committed asset through AutoTokenizer, training, adapting a byte-level BPE, separation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ds_train.data.codec import delinearize, linearize, render_docstring
from ds_train.data.tokenizer import (
    SPECIAL_TOKENS,
    adapt_tokenizer,
    load_tokenizer,
    separated_ids,
    train_tokenizer,
)
from ds_train.errors import UsageError

ASSETS = Path(__file__).parent / "assets"
TOKENIZER = ASSETS / "tokenizer"
PAIRS = [json.loads(line) for line in (ASSETS / "tiny_pairs.jsonl").read_text().splitlines()]
PY_TOKENS = (Path(__file__).parents[1] / "ds_train" / "resources" / "python_tokens.txt").read_text().split()
ENTRIES = list(dict.fromkeys(PY_TOKENS))
MARKERS = ("<NEW_LINE>", "<INDENT>", "<DEDENT>")
WHOLE = "\ue000"  # the start of a whole-word piece, written out here on purpose
IDENTIFIERS = "x = settings . integers + inline ( format_string ) . settle ( intx , isx ) <NEW_LINE>"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def test_asset_round_trips_exactly_through_autotokenizer(tok) -> None:
    texts = [render_docstring(p["docstring"]) for p in PAIRS] + [p["code"] for p in PAIRS]
    texts += ["  leading spaces", "tabs\tand\nnewlines\n", "unicode: é ☃ 𝔘", "<bot>def<eot>", IDENTIFIERS]
    texts += ["<NEW_LINE> <INDENT> return 1 <NEW_LINE> <DEDENT> <DEDENT>", "<python><NEW_LINE> <INDENT> pass"]
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    assert min(len(ids) for ids in encoded) > 0  # a broken wrapper encodes to nothing
    for text, ids in zip(texts, encoded):
        assert tok.decode(ids) == text
    source = "def f(a):\n    if a:\n        return a.strip()\n    return None\n"
    generated = tok.decode(tok(linearize(source), add_special_tokens=False)["input_ids"])
    assert delinearize(generated) == source


def test_no_lone_space_piece_before_a_marker(tok) -> None:
    for pair in PAIRS:
        pieces = tok.convert_ids_to_tokens(tok(pair["code"], add_special_tokens=False)["input_ids"])
        before = [pieces[i - 1] for i, p in enumerate(pieces) if p in MARKERS and i > 0]
        assert before and not any(p.strip("▁") == "" for p in before), pair["_id"]
    # The plain sentencepiece model of the same corpus does spend one on every marker after a word.
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER / "sentencepiece.model"))
    assert sp.encode("x <NEW_LINE>", out_type=str) == ["x", "▁", "<NEW_LINE>"]


def test_sentencepiece_pieces_keep_their_ids(tok) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER / "sentencepiece.model"))
    vocab = tok.get_vocab()
    assert all(vocab[sp.id_to_piece(i)] == i for i in range(2, sp.get_piece_size()))


def test_special_tokens_are_single_ids_and_pad_is_set(tok) -> None:
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
    assert WHOLE + "▁return" in pieces  # a word-initial Python token is one piece


def independent_partial(tokenizer_dir: Path) -> set[int]:
    """The partial set from the sentencepiece model and the list alone: one whole-word piece per
    ``▁`` + entry, then one per entry whose bare form is a sentencepiece piece, ids after the model's."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "sentencepiece.model"))
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    forms = ["▁" + t for t in ENTRIES] + [t for t in ENTRIES if t in pieces]
    return set(range(sp.get_piece_size(), sp.get_piece_size() + len(forms)))


def test_separation_sets_equal_an_independent_computation(tok) -> None:
    vocab = tok.get_vocab()
    special = {vocab[t] for t in SPECIAL_TOKENS} | {vocab["<unk>"]}
    partial = set(separated_ids(TOKENIZER, "partial"))
    assert partial == independent_partial(TOKENIZER)
    for piece in ("▁return", "▁def", "▁self", "▁(", "▁,", "▁len", "▁isinstance", "▁None", "def", "▁casefold"):
        assert vocab[WHOLE + piece] in partial, piece
    for piece in ("▁wrap", "▁text", "<python>", "<NEW_LINE>", "<pad>", "▁the", "▁in", "▁set", "▁int"):
        assert vocab.get(piece) not in partial, piece
    assert separated_ids(TOKENIZER, "none") == []
    full = separated_ids(TOKENIZER, "full")
    assert full == sorted(set(range(len(tok))) - special) and len(full) == len(tok) - 10
    assert separated_ids(tok, "partial") == sorted(partial)  # from the object: read beside its files
    with pytest.raises(ValueError, match="unknown separation"):
        separated_ids(TOKENIZER, "half")


def test_identifiers_never_borrow_a_separated_piece(tok) -> None:
    partial = set(separated_ids(TOKENIZER, "partial"))
    for word in ("settings", "integers", "inline", "format_string", "settle", "intx", "isx"):
        for text in (f"x = {word} ( )", f"{word} . y", f"a . {word}", f"The {word} of it."):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            pieces = tok.convert_ids_to_tokens(ids)
            assert tok.decode(ids) == text
            word_ids = [i for i, p in zip(ids, pieces) if p.strip("▁" + WHOLE) and p.strip("▁" + WHOLE) in word]
            assert word_ids and not set(word_ids) & partial, (text, pieces)
    # ... while the Python tokens themselves, as whole words, are separated.
    ids = tok("x = set ( int ( y ) in z )", add_special_tokens=False)["input_ids"]
    pieces = dict(zip(tok.convert_ids_to_tokens(ids), ids))
    assert {pieces[f"{WHOLE}▁{w}"] for w in ("=", "set", "(", "int", "in", ")")} <= partial


def test_train_tokenizer_writes_a_loadable_directory(tmp_path: Path) -> None:
    corpus = tmp_path / "pairs.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in PAIRS[:120]) + "{broken\n")
    tok = train_tokenizer(corpus, tmp_path / "tok", vocab_size=700)
    assert 690 <= len(tok) <= 700  # whole-word pieces of bare forms known only after training
    loaded = load_tokenizer(tmp_path / "tok")
    text = PAIRS[130]["code"]  # not in the training slice
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    sets = json.loads((tmp_path / "tok" / "separation.json").read_text())
    assert sets["none"] == [] and set(sets["partial"]) == independent_partial(tmp_path / "tok")
    assert set(sets["partial"]) < set(sets["full"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "tok"]  # no staging left


def test_raw_python_is_linearized_and_bad_data_refused_before_training(tmp_path: Path, caplog) -> None:
    raw = tmp_path / "raw.jsonl"
    sources = [
        (p["_id"], p["docstring"], delinearize(p["code"])) for p in PAIRS[:120] if "\n" in delinearize(p["code"])
    ]
    raw.write_text("".join(json.dumps({"_id": i, "docstring": d, "code": c}) + "\n" for i, d, c in sources))
    tok = train_tokenizer(raw, tmp_path / "tok", vocab_size=700)
    assert tok.decode(tok.encode(PAIRS[0]["code"], add_special_tokens=False)) == PAIRS[0]["code"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"_id": str(i), "docstring": "d", "code": "x = 1"}) + "\n" for i in range(5)))
    before = sorted(p.name for p in (tmp_path / "tok").iterdir())
    with pytest.raises(UsageError, match=r"no usable .* \(5 read; 5 no_signature\)"):
        train_tokenizer(bad, tmp_path / "tok", vocab_size=700)
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == before  # the old one is intact
    with caplog.at_level(logging.WARNING, logger="ds_train.data.tokenizer"):
        small = train_tokenizer(raw, tmp_path / "big", vocab_size=8000, max_pairs=20)
    assert len(small) < 8000 and f"{len(small)} tokens, not the 8000 asked" in caplog.text


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


def original_separation(vocab: dict[str, int], special: set[str], lines: list[str]) -> tuple[list[str], set[int]]:
    """``lm_trainer.py`` of the original implementation, transcribed: each line and "Ġ" + line; the
    sorted set of them; a special token is passed over, a form in the vocabulary is separated as it is,
    a missing one is appended as a new token (and separated). Returns (added tokens, separated ids)."""
    extra = []
    for line in lines:
        extra.append(line)
        extra.append("Ġ" + line)
    added, separated, next_id = [], set(), len(vocab)
    for token in sorted(set(extra)):
        if token in special:
            continue
        if token in vocab:
            separated.add(vocab[token])
        else:
            added.append(token)
            separated.add(next_id)
            next_id += 1
    return added, separated


def test_adapting_a_byte_level_bpe_follows_the_original(tmp_path: Path) -> None:
    base_dir = byte_level_bpe(tmp_path)
    base = AutoTokenizer.from_pretrained(base_dir)
    tok = adapt_tokenizer(base_dir, tmp_path / "adapted")
    loaded = load_tokenizer(tmp_path / "adapted")
    vocab = loaded.get_vocab()
    for token in SPECIAL_TOKENS:
        assert loaded.encode(token, add_special_tokens=False) == [vocab[token]]
    # The vocabulary the original looked its forms up in: the base plus the special tokens.
    with_special = dict(base.get_vocab())
    for token in SPECIAL_TOKENS:
        with_special.setdefault(token, len(with_special))
    lines = (Path(__file__).parents[1] / "ds_train" / "resources" / "python_tokens.txt").read_text().splitlines()
    added, expected = original_separation(with_special, {*SPECIAL_TOKENS, "<|endoftext|>"}, lines)
    assert added and [loaded.convert_ids_to_tokens(i) for i in range(len(with_special), len(loaded))] == added
    assert set(separated_ids(tmp_path / "adapted", "partial")) == expected
    assert vocab["Ġreturn"] in expected and vocab["casefold"] in expected
    text = "def f ( x ) : <NEW_LINE> <INDENT> return x . casefold ( ) <NEW_LINE> <DEDENT>"
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    assert len(tok) == len(loaded)


def test_bad_tokenizer_directories_fail_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(UsageError, match="special token"):
        load_tokenizer(byte_level_bpe(tmp_path))


def test_too_small_a_vocabulary_says_what_to_ask_for(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"a vocabulary of 300 tokens is too small .* ask for well above \d+"):
        train_tokenizer(ASSETS / "tiny_pairs.jsonl", tmp_path / "tok", vocab_size=300)
    with pytest.raises(UsageError, match="leaves no room"):
        train_tokenizer(ASSETS / "tiny_pairs.jsonl", tmp_path / "tok", vocab_size=100)
    assert not (tmp_path / "tok").exists()
