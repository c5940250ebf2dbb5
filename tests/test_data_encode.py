"""Encoding: the layout token by token, the flags of each objective, corruption, prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from ds_train.data.encode import Encoder, encode_pair, encode_prompt, render_docstring
from ds_train.data.sources import Pair, SkipCounter

TOKENIZER = Path(__file__).parent / "assets" / "tokenizer"
HAND = [
    Pair(
        "add", "Add two numbers.", "def add ( a , b ) : <NEW_LINE> <INDENT> return a + b <NEW_LINE> <DEDENT>"
    ),
    Pair(
        "deco",
        "Cached square.\n\nUses a cache.",
        "@ cache <NEW_LINE> def sq ( x ) : <NEW_LINE> <INDENT> return x * x <NEW_LINE> <DEDENT>",
    ),
    Pair(
        "cls",
        'Holds """quoted""" text.',
        "class Box : <NEW_LINE> <INDENT> def get ( self ) : <NEW_LINE> <INDENT> return self . v <NEW_LINE> "
        "<DEDENT> <DEDENT>",
    ),
]
HEADERS = ["def add ( a , b ) :", "@ cache <NEW_LINE> def sq ( x ) :", "class Box :"]
DOCS = [
    '    """Add two numbers."""',
    '    """Cached square.\n\n    Uses a cache.\n    """',
    '    """Holds \\"\\"\\"quoted\\"\\"\\" text."""',
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_render_docstring_is_the_source_form() -> None:
    assert [render_docstring(p.docstring) for p in HAND] == DOCS


@pytest.mark.parametrize("objective", ["text_code_clm", "code_clm", "prefix_code_clm"])
def test_layout_token_by_token(tok, objective: str) -> None:
    special = {t: tok.convert_tokens_to_ids(t) for t in ("<bot>", "<comments>", "<python>", "<eot>")}
    for pair, header, doc in zip(HAND, HEADERS, DOCS):
        body = pair.code[len(header) :].strip()
        sig_ids, doc_ids, body_ids = ids_of(tok, header), ids_of(tok, doc), ids_of(tok, body)
        enc = encode_pair(tok, pair, objective)
        expected = (
            [special["<bot>"]]
            + sig_ids
            + [special["<comments>"]]
            + doc_ids
            + [special["<python>"]]
            + body_ids
            + [special["<eot>"]]
        )
        assert enc.input_ids == expected
        n_prefix = 3 + len(sig_ids) + len(doc_ids)
        assert enc.modality == [0] + [1] * len(sig_ids) + [0] * (len(doc_ids) + 2) + [1] * (len(body_ids) + 1)
        if objective == "text_code_clm":
            assert enc.target == [0] + [1] * (len(expected) - 1)
        else:
            assert enc.target == [0] * n_prefix + [1] * (len(body_ids) + 1)
        assert enc.prefix == (
            [1] * n_prefix + [0] * (len(body_ids) + 1)
            if objective == "prefix_code_clm"
            else [0] * len(expected)
        )
        assert tok.decode(enc.input_ids) == f"<bot>{header}<comments>{doc}<python>{body}<eot>"


def test_prompt_is_the_layout_up_to_python(tok) -> None:
    for pair, header in zip(HAND, HEADERS):
        ids, modality = encode_prompt(tok, header, pair.docstring)
        enc = encode_pair(tok, pair, "code_clm")
        assert ids == enc.input_ids[: len(ids)] and modality == enc.modality[: len(ids)]
        assert ids[-1] == tok.convert_tokens_to_ids("<python>")


def long_pair(i: int) -> Pair:
    words = " ".join(f"word{j % 17} and more text" for j in range(60))
    return Pair(
        f"long{i}",
        f"Docstring {i}: {words}.",
        "def f ( x ) : <NEW_LINE> <INDENT> return x <NEW_LINE> <DEDENT>",
    )


def test_corruption_rate_tokens_and_determinism(tok) -> None:
    mask = tok.convert_tokens_to_ids("<mask>")
    special = set(tok.all_special_ids)
    clean = Encoder(tok, "code_clm").encode([long_pair(i) for i in range(40)])
    enc = Encoder(tok, "corrupt_code_clm", seed=3)
    corrupted = enc.encode([long_pair(i) for i in range(40)], epoch=0)
    masked = replaced = candidates = 0
    for c, x in zip(clean, corrupted):
        a, b, seg = np.array(c.input_ids), np.array(x.input_ids), np.array(c.segments)
        docstring = (seg == 3) & ~np.isin(a, list(special))
        changed = a != b
        assert not (changed & ~docstring).any()  # only non-special docstring tokens change
        n = int(docstring.sum())
        candidates += n
        # round(0.15 n) picked; a random replacement may redraw the same id, so <= and close to it.
        assert round(0.15 * n) - 2 <= changed.sum() <= round(0.15 * n)
        masked += int((b[changed] == mask).sum())
        replaced += int((b[changed] != mask).sum())
        assert not np.isin(b[changed & (b != mask)], list(special)).any()  # replacements are text tokens
        assert x.target == c.target and x.modality == c.modality
    assert 0.7 < masked / (masked + replaced) < 0.9
    again = Encoder(tok, "corrupt_code_clm", seed=3).encode([long_pair(i) for i in range(40)], epoch=0)
    assert [x.input_ids for x in again] == [x.input_ids for x in corrupted]
    other_epoch = enc.encode([long_pair(i) for i in range(40)], epoch=1)
    assert [x.input_ids for x in other_epoch] != [x.input_ids for x in corrupted]
    alone = enc.encode([long_pair(5)], epoch=0)[0]  # depends on the _id, not on the batch around it
    assert alone.input_ids == corrupted[5].input_ids


def test_code_without_a_header_is_skipped_and_counted(tok) -> None:
    skips = SkipCounter()
    out = Encoder(tok).encode([Pair("x", "Doc.", "x = 1 <NEW_LINE>"), HAND[0]], skips=skips)
    assert [e.id for e in out] == ["add"] and skips.as_dict() == {"no_signature": 1}
    with pytest.raises(ValueError, match="header"):
        encode_pair(tok, Pair("x", "Doc.", "x = 1 <NEW_LINE>"))
    with pytest.raises(ValueError, match="unknown objective"):
        Encoder(tok, "mlm")
