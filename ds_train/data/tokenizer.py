"""Tokenizers: training a sentencepiece BPE on a pair corpus, adapting a pre-trained one, separation sets.

Every tokenizer of the project is a directory that ``transformers.AutoTokenizer.from_pretrained``
loads, holding the special tokens of DESIGN.md §2 as single ids and ``separation.json``
(``{"none": [], "partial": [...], "full": [...]}``, sorted ids, never a special token).

Trained tokenizers are sentencepiece BPE models with byte fallback, identity normalization, no
whitespace collapsing and no dummy prefix, so that any text round-trips exactly. The word-initial
forms (``▁`` + token) of the Python token list are user-defined symbols, so partial separation finds
them as whole pieces wherever a code token starts a word (every token of linearized code does). The
bare forms are not made symbols: sentencepiece matches symbols inside words too, and ``in`` or
``is`` would then cut most English words apart; bare forms that BPE learns still count as separated.
The sentencepiece model is converted once by ``transformers`` and saved as ``tokenizer.json``, which
is what every later load reads: ``transformers``' ids are the project's ids.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from tokenizers import normalizers
from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ds_train.data.sources import SkipCounter, read_pairs

logger = logging.getLogger(__name__)

PAD = "<pad>"
MASK = "<mask>"
NEW_LINE, INDENT, DEDENT = "<NEW_LINE>", "<INDENT>", "<DEDENT>"
BOT, COMMENTS, PYTHON, EOT = "<bot>", "<comments>", "<python>", "<eot>"
SPECIAL_TOKENS = (PAD, MASK, NEW_LINE, INDENT, DEDENT, BOT, COMMENTS, PYTHON, EOT)
SEPARATION_MODES = ("none", "partial", "full")
SEPARATION_FILE = "separation.json"
SENTENCEPIECE_FILE = "sentencepiece.model"  # kept for reference; tokenizer.json is what loads
WORD_INITIAL = ("▁", "Ġ")  # sentencepiece, GPT-2 style byte-level BPE

DEFAULT_VOCAB_SIZE = 4000
"""Pieces asked of sentencepiece when the user names none (the one default of ds-train and ds-data)."""


def python_tokens() -> list[str]:
    """The Python-specific token list of the original work (``ds_train/resources``), de-duplicated."""
    text = resources.files("ds_train").joinpath("resources/python_tokens.txt").read_text(encoding="utf-8")
    return list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))


# ---------------------------------------------------------------------------------------------- training


def train_tokenizer(
    corpus: str | os.PathLike | list,
    out_dir: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    max_pairs: int = 200_000,
    skips: SkipCounter | None = None,
) -> PreTrainedTokenizerBase:
    """Train a sentencepiece BPE on the docstrings (rendered as in the layout) and code of ``corpus``.

    Args:
        corpus: pair files / folders / hub names, as ``sources.read_pairs`` takes them.
        out_dir: the tokenizer directory to write (created).
        vocab_size: the size asked of sentencepiece (a tiny corpus may give fewer pieces).
        max_pairs: train on at most this many pairs (the first ones, in corpus order).
        skips: collects the bad records met while reading the corpus.
    Returns:
        The tokenizer, as ``load_tokenizer(out_dir)`` gives it.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        _train_sentencepiece(spm, _training_texts(corpus, max_pairs, skips), model, vocab_size)
    except RuntimeError as err:  # sentencepiece reports bad settings (e.g. too small a vocabulary) so
        raise ValueError(f"sentencepiece training failed: {str(err).strip().splitlines()[-1]}") from None
    (out / SENTENCEPIECE_FILE).write_bytes(model.getvalue())
    _wrap_sentencepiece(out).save_pretrained(out)
    tokenizer = load_tokenizer(out, check_separation=False)
    write_separation(tokenizer, out)
    logger.info("trained a %d-token sentencepiece BPE into %s", len(tokenizer), out)
    return tokenizer


def _train_sentencepiece(spm, texts: Iterator[str], model: io.BytesIO, vocab_size: int) -> None:
    """sentencepiece BPE with the settings of the module docstring, written into ``model``."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=texts,
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=1 << 16,
        pad_id=0,
        pad_piece=PAD,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        user_defined_symbols=list(SPECIAL_TOKENS[1:]) + _word_initial_symbols(),
        num_threads=min(8, os.cpu_count() or 1),
        minloglevel=2,
    )


def _training_texts(corpus, max_pairs: int, skips: SkipCounter | None) -> Iterator[str]:
    """The rendered docstring and the linearized code of each of the first ``max_pairs`` pairs."""
    from ds_train.data.encode import render_docstring  # encode imports this module

    for count, pair in enumerate(read_pairs(corpus, skips)):
        if count >= max_pairs:
            return
        yield render_docstring(pair.docstring)
        yield pair.code


def _word_initial_symbols() -> list[str]:
    """``▁`` + each Python token, except those that would shadow a special token (``▁<`` in ``▁<bot>``)."""
    symbols = [f"▁{tok}" for tok in python_tokens()]
    return [s for s in symbols if not any(f"▁{special}".startswith(s) for special in SPECIAL_TOKENS)]


def _wrap_sentencepiece(out: Path) -> PreTrainedTokenizerFast:
    """A ``tokenizers`` pipeline that segments exactly as the sentencepiece model in ``out`` does.

    ``transformers``' converter gives the vocabulary and merges, but its merges never reach the
    user-defined symbols (``▁return`` came out as ``▁re t urn``). So spaces become ``▁`` in the
    normalizer (as in sentencepiece) and the symbols are added tokens matched on the normalized
    text, anywhere, as sentencepiece matches them. Saved with the generic ``TokenizersBackend``
    class, so that no model-specific class rebuilds the pipeline on load.
    """
    with tempfile.TemporaryDirectory() as tmp:
        # LlamaTokenizer(vocab_file=...) encodes to nothing in transformers 5; from_pretrained converts.
        shutil.copy(out / SENTENCEPIECE_FILE, Path(tmp) / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "legacy": False,
            "add_prefix_space": False,
            "bos_token": None,
            "eos_token": None,
            "unk_token": "<unk>",
            "pad_token": PAD,
        }
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        backend = AutoTokenizer.from_pretrained(tmp).backend_tokenizer
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = None
    backend.add_tokens([AddedToken(s, normalized=True, special=False) for s in _word_initial_symbols()])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token=PAD,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
    )


# ---------------------------------------------------------------------------------------------- adapting


def adapt_tokenizer(base_dir: str | os.PathLike, out_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A pre-trained tokenizer (e.g. PyCodeGPT's byte-level BPE) with the project's tokens added.

    The special tokens become added special tokens; Python tokens missing from the vocabulary (in
    both bare and word-initial form) are added as whole-word tokens, as the original work did.
    """
    tokenizer = _load_checked(base_dir)
    tokenizer.add_special_tokens(
        {"pad_token": PAD, "additional_special_tokens": list(SPECIAL_TOKENS[1:])},
        replace_extra_special_tokens=False,
    )
    vocab = tokenizer.get_vocab()
    missing = [t for t in python_tokens() if t not in vocab and not any(m + t in vocab for m in WORD_INITIAL)]
    tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=False) for t in missing])
    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    tokenizer = load_tokenizer(out, check_separation=False)
    write_separation(tokenizer, out)
    logger.info(
        "adapted %s: %d special and %d Python tokens added", base_dir, len(SPECIAL_TOKENS), len(missing)
    )
    return tokenizer


# ---------------------------------------------------------------------------------------------- loading


def _load_checked(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(path)`` with a one-line error for a missing / broken directory."""
    if not Path(path).is_dir():
        raise ValueError(f"tokenizer directory {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot load a tokenizer from {path}: {first}") from None


def load_tokenizer(path: str | os.PathLike, *, check_separation: bool = True) -> PreTrainedTokenizerBase:
    """A project tokenizer directory through ``AutoTokenizer``, checked to hold every special token.

    Raises:
        ValueError: the directory is missing, does not load, lacks a special token as a single id,
            or (with ``check_separation``) lacks ``separation.json``.
    """
    tokenizer = _load_checked(path)
    for token in SPECIAL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != token:
            raise ValueError(f"tokenizer {path} does not hold special token {token} as a single id")
    if tokenizer.pad_token != PAD:
        raise ValueError(f"tokenizer {path} has pad token {tokenizer.pad_token!r}, expected {PAD}")
    if check_separation and not (Path(path) / SEPARATION_FILE).is_file():
        raise ValueError(f"tokenizer {path} has no {SEPARATION_FILE} (made by `ds-data tokenizer`)")
    return tokenizer


def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The id of each special token of the layout, by its string."""
    return {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}


# ---------------------------------------------------------------------------------------------- separation


def compute_separation(tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """The separated id sets of DESIGN.md §3 for each mode.

    partial: the ids of the Python tokens and of their word-initial forms (``▁`` + token or
    ``Ġ`` + token) present in the vocabulary; full: every id that is not a special token.
    """
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids) | set(special_ids(tokenizer).values())
    forms = [form for tok in python_tokens() for form in (tok, *(m + tok for m in WORD_INITIAL))]
    partial = {vocab[f] for f in forms if f in vocab} - special
    full = set(range(len(tokenizer))) - special
    return {"none": [], "partial": sorted(partial), "full": sorted(full)}


def write_separation(tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> dict[str, list[int]]:
    """Compute the separation sets and write them to ``out_dir/separation.json``."""
    sets = compute_separation(tokenizer)
    (Path(out_dir) / SEPARATION_FILE).write_text(json.dumps(sets) + "\n", encoding="utf-8")
    return sets


def separated_ids(tokenizer_or_dir: PreTrainedTokenizerBase | str | os.PathLike, mode: str) -> list[int]:
    """The sorted separated ids of ``mode`` (``none``, ``partial`` or ``full``).

    A directory is read from its ``separation.json``; a tokenizer object from the one beside its
    files when there is one, else computed.
    """
    if mode not in SEPARATION_MODES:
        raise ValueError(f"unknown separation {mode!r}; expected one of {', '.join(SEPARATION_MODES)}")
    if isinstance(tokenizer_or_dir, PreTrainedTokenizerBase):
        path = Path(tokenizer_or_dir.name_or_path or "") / SEPARATION_FILE
        if not path.is_file():
            return compute_separation(tokenizer_or_dir)[mode]
    else:
        path = Path(tokenizer_or_dir) / SEPARATION_FILE
    try:
        sets = json.loads(path.read_text(encoding="utf-8"))
        return [int(i) for i in sets[mode]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read separation {mode!r} from {path}: {err}") from None
