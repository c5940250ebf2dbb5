"""Tokenizers: training a sentencepiece BPE on a pair corpus, adapting a pre-trained one, separation sets.

Every tokenizer of the project is a directory that ``transformers.AutoTokenizer.from_pretrained``
loads, holding the special tokens of the layout (``codec.SPECIAL_TOKENS``) as single ids and
``separation.json`` (``{"none": [], "partial": [...], "full": [...]}``, sorted ids, never a
special token).

Trained tokenizers are sentencepiece BPE models with byte fallback, identity normalization, no
whitespace collapsing and no dummy prefix; only the special tokens are user-defined symbols, so
no identifier is cut around a Python keyword (``settings`` is never ``▁set tings`` by force). The
sentencepiece model is converted once by ``transformers`` and saved as ``tokenizer.json``, which is
what every later load reads, with three changes to the pipeline:

- The layout markers (``<NEW_LINE>``, ``<INDENT>``, ``<DEDENT>``) take the whitespace before them
  (``lstrip``): they delimit themselves, so the lone ``▁`` piece that would precede each of them
  is never produced (sentencepiece is trained on the text without that space, see
  ``strip_before_markers``, and split at the whole words below, as the BPE model sees it). Decoding
  puts one space back before every marker except at the start of the text and right after another
  special token (``<python><NEW_LINE>``), so linearized code and the layout round-trip exactly;
  whitespace other than one space before a marker is not kept.
- Every Python token of the list (``resources/python_tokens.txt``) gets a whole-word piece,
  ``WHOLE_WORD`` (U+E000) + ``▁`` + token (and + the bare token where sentencepiece learned it, for
  a word that starts a text, like ``def``), appended after the sentencepiece ids. The normalizer
  puts ``WHOLE_WORD`` before an occurrence that no identifier character (for an operator: no other
  operator character) follows, a pre-tokenizer isolates it, and the BPE model takes an isolated
  word found in its vocabulary as one piece (``ignore_merges``); decoding drops a piece's leading
  ``WHOLE_WORD``.
  Inside a longer word the usual merges apply and give sentencepiece's own pieces, so an
  identifier never borrows the piece of a Python token (``settings`` is not ``set`` + ...).
- Spaces become ``▁`` in the normalizer, as in sentencepiece.

The partial separation set of a trained tokenizer is its whole-word pieces; of an adapted one, the
ids of the list's entries present bare or word-initial (``Ġ`` for GPT-2-style byte-level
vocabularies, ``▁`` for sentencepiece ones). Text holding U+E000 itself may not round-trip.
A pre-trained tokenizer is adapted as ``lm_trainer.py`` of the original implementation does
(``adapt_tokenizer``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from importlib import resources
from pathlib import Path

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ds_train.data.codec import (  # the layout's tokens live in codec; EOT is re-exported for callers
    EOT,  # noqa: F401
    MARKERS,
    PAD,
    SPECIAL_TOKENS,
    ensure_linearized,
    render_docstring,
    split_signature,
)
from ds_train.data.sources import SkipCounter, read_pairs
from ds_train.errors import UsageError, first_line
from ds_train.fileio import replacing_dir

logger = logging.getLogger(__name__)

SEPARATION_MODES = ("none", "partial", "full")
SEPARATION_FILE = "separation.json"
SENTENCEPIECE_FILE = "sentencepiece.model"  # kept for reference; tokenizer.json is what loads
SPACE = "▁"  # sentencepiece's word-initial mark
WHOLE_WORD = "\ue000"  # starts the whole-word piece of a Python token (removed when decoding)
WORD_INITIAL = (SPACE, "Ġ")  # sentencepiece, GPT-2 style byte-level BPE

DEFAULT_VOCAB_SIZE = 4000
"""Pieces asked of sentencepiece when the user names none (the one default of ds-train and ds-data)."""

_BEFORE_MARKER = re.compile(r"\s+(?=" + "|".join(map(re.escape, MARKERS)) + ")")
# Decoding: one space before each marker, except at the start and right after another special token.
_SPACE_BEFORE_MARKER = Regex(
    "(?<!\\A|"
    + "|".join(t for t in SPECIAL_TOKENS if t not in MARKERS)
    + ")(?="
    + "|".join(MARKERS)
    + ")"
)


def python_tokens() -> list[str]:
    """The Python-specific token list of the original work (``ds_train/resources``), de-duplicated."""
    text = resources.files("ds_train").joinpath("resources/python_tokens.txt").read_text(encoding="utf-8")
    return list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))


def strip_before_markers(text: str) -> str:
    """``text`` without the whitespace before each layout marker (what the trained tokenizer drops)."""
    return _BEFORE_MARKER.sub("", text)


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

    The corpus is read and checked first (``corpus_texts``): a corpus with no usable pair is
    refused before anything is trained. The directory is written beside ``out_dir`` under a
    temporary name and renamed into place at the end, so a failure leaves an existing one intact.

    Args:
        corpus: pair files / folders / hub names, as ``sources.read_pairs`` takes them.
        out_dir: the tokenizer directory to write.
        vocab_size: the most tokens of the vocabulary, whole-word pieces included (their number is
            known only after training, so a few fewer may come); a small corpus may give much fewer
            (a warning says so and why).
        max_pairs: train on at most this many pairs (the first ones, in corpus order).
        skips: collects the bad records met while reading the corpus.
    Returns:
        The tokenizer, as ``load_tokenizer(out_dir)`` gives it.
    Raises:
        UsageError: no usable pair, or sentencepiece refused the settings.
    """
    if vocab_size < 1:
        raise UsageError(f"vocab_size must be >= 1 (got {vocab_size})")
    texts = corpus_texts(corpus, max_pairs, skips)
    # The whole-word pieces count in vocab_size: ``▁`` + every entry, and the bare entries
    # sentencepiece learns (known only after training: a few retrainings make room for them; the
    # largest vocabulary within vocab_size is kept).
    splitter = _whole_words_regex()
    sentences = [part for text in texts for part in splitter.split(text) if part]
    size, best, tried = vocab_size - len(python_tokens()), None, set()
    while len(tried) < 4 and size not in tried:
        tried.add(size)
        model = _train_sentencepiece(sentences, size)
        pieces = _pieces(model)
        total = len(pieces) + len(whole_word_forms(pieces))
        if total <= vocab_size and (best is None or total > best[0]):
            best = (total, model, len(pieces) < size)
        if total == vocab_size or len(pieces) < size:
            break
        size -= max(1, total - vocab_size) if total > vocab_size else -1
    if best is None:
        raise UsageError(f"no vocabulary of at most {vocab_size} tokens holds the whole-word pieces; ask for more")
    total, model, short = best
    if short:
        logger.warning(
            "tokenizer: %d tokens, not the %d asked: the corpus (%d texts, %d characters) gave "
            "sentencepiece only %d distinct pieces worth merging; give more data or a smaller vocabulary size",
            total, vocab_size, len(texts), sum(map(len, texts)), len(_pieces(model)),
        )
    out = Path(out_dir)
    with replacing_dir(out) as tmp:
        (tmp / SENTENCEPIECE_FILE).write_bytes(model)
        wrapped, added = _wrap_sentencepiece(tmp)
        wrapped.save_pretrained(tmp)
        write_separation(load_tokenizer(tmp, check_separation=False), tmp)
    tokenizer = load_tokenizer(out)
    logger.info(
        "trained a %d-token sentencepiece BPE into %s (%d of them whole-word Python tokens)",
        len(tokenizer), out, len(added),
    )
    return tokenizer


def _whole_words_regex() -> re.Pattern[str]:
    """Space-initial whole-word occurrences of the list's entries in raw text (as the normalizer
    finds them): sentencepiece is trained on the text between them, as the BPE model sees it."""
    entries = sorted(python_tokens(), key=len, reverse=True)
    words = "|".join(re.escape(t) for t in entries if re.match(r"\w", t[-1]))
    ops = "|".join(re.escape(t) for t in entries if not re.match(r"\w", t[-1]))
    return re.compile(rf" (?:(?:{words})(?!\w)|(?:{ops})(?![^\w\s{SPACE}]))")


def corpus_texts(corpus, max_pairs: int = 200_000, skips: SkipCounter | None = None) -> list[str]:
    """The training texts of the first ``max_pairs`` pairs, checked before any training.

    Each pair gives its rendered docstring and its linearized code (raw Python is linearized, see
    ``codec.ensure_linearized``), without the whitespace before markers. Pairs whose code does not
    linearize or has no def/class header are counted (in ``skips`` too) and left out; when no pair
    is usable, a ``UsageError`` names what was wrong instead of training on it.
    """
    skips = skips if skips is not None else SkipCounter()
    texts: list[str] = []
    bad: Counter[str] = Counter()
    pairs = 0
    names = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    for pair in read_pairs(corpus, skips):
        if pairs >= max_pairs:
            break
        pairs += 1
        try:
            code = ensure_linearized(pair.code)
            split_signature(code)
        except ValueError as err:
            reason = "no_signature" if "header" in str(err) else "untokenizable_code"
            bad[reason] += 1
            skips.skip(reason, pair.id, str(err))
            continue
        texts += [render_docstring(pair.docstring), strip_before_markers(code)]
    if not texts:
        found = ", ".join(f"{n} {reason}" for reason, n in skips.as_dict().items())
        raise UsageError(
            f"no usable (docstring, code) pair in {', '.join(map(str, names))} ({pairs} read; {found}): "
            "`code` must be a Python def/class, as source or linearized (`ds-data mine` writes such pairs)"
        )
    if bad:
        logger.warning("tokenizer: %d of %d pairs left out: %s", sum(bad.values()), pairs, dict(bad))
    return texts


def _train_sentencepiece(texts: list[str], vocab_size: int) -> bytes:
    """The serialized sentencepiece BPE trained with ``sentencepiece_settings``."""
    if vocab_size < 1:
        raise UsageError(f"a vocabulary size of {vocab_size + len(python_tokens())} leaves no room for learned pieces")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            **sentencepiece_settings(vocab_size), sentence_iterator=iter(texts), model_writer=model
        )
    except RuntimeError as err:  # sentencepiece reports bad settings (e.g. too small a vocabulary) so
        line = str(err).strip().splitlines()[-1]
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", line)
        if needed:
            least = int(needed.group(1)) + len(python_tokens())
            raise UsageError(
                f"a vocabulary of {vocab_size + len(python_tokens())} tokens is too small for this corpus: "
                f"its characters take {needed.group(1)} pieces and the Python tokens' whole-word pieces "
                f"{len(python_tokens())} or more; ask for well above {least}"
            ) from None
        raise UsageError(f"sentencepiece training failed: {line}") from None
    return model.getvalue()


def _pieces(model: bytes) -> dict[str, int]:
    """The vocabulary (piece -> id) of a serialized sentencepiece model."""
    processor = spm.SentencePieceProcessor(model_proto=model)
    return {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}


def sentencepiece_settings(vocab_size: int) -> dict:
    """The trainer's settings: only the special tokens are symbols (a benchmark trains its baseline
    with the same settings)."""
    return {
        "model_type": "bpe",
        "vocab_size": vocab_size,
        "hard_vocab_limit": False,
        "character_coverage": 1.0,
        "byte_fallback": True,
        "normalization_rule_name": "identity", "remove_extra_whitespaces": False, "add_dummy_prefix": False,
        "allow_whitespace_only_pieces": True,
        "split_digits": True,
        "max_sentence_length": 1 << 16,
        "pad_id": 0, "pad_piece": PAD, "unk_id": 1, "bos_id": -1, "eos_id": -1,
        "user_defined_symbols": list(SPECIAL_TOKENS[1:]),
        "num_threads": min(8, os.cpu_count() or 1),
        "minloglevel": 2,
    }


def whole_word_forms(vocab: dict[str, int]) -> list[str]:
    """The forms that get a whole-word piece: ``▁`` + each list entry, and each entry whose bare form
    sentencepiece learned (a word at the start of a text, like ``def``), in list order."""
    entries = python_tokens()
    return [SPACE + t for t in entries] + [t for t in entries if t in vocab]


def _whole_word_normalizers(forms: list[str]) -> list[normalizers.Normalizer]:
    """Replacements that put ``WHOLE_WORD`` before each whole-word occurrence of ``forms``.

    A ``▁`` form counts when no identifier character (for a word) or no other operator character
    (for an operator) follows; a bare form only at the start of the text. The patterns start with a
    literal ``▁`` or ``\\A``, which keeps the scan fast.
    """
    steps = []
    for prefix, found, replacement in (
        (SPACE, [f[1:] for f in forms if f.startswith(SPACE)], WHOLE_WORD + SPACE),
        ("\\A", [f for f in forms if not f.startswith(SPACE)], WHOLE_WORD),
    ):
        branches = []
        for wordy in (True, False):
            group = sorted((f for f in found if bool(re.match(r"\w", f[-1])) == wordy), key=len, reverse=True)
            if group:
                ahead = r"(?!\w)" if wordy else rf"(?![^\w\s{SPACE}])"
                branches.append(f"{prefix}(?=(?:{'|'.join(map(re.escape, group))}){ahead})")
        if branches:
            steps.append(normalizers.Replace(Regex("|".join(branches)), replacement))
    return steps


def _wrap_sentencepiece(out: Path) -> tuple[PreTrainedTokenizerFast, list[str]]:
    """The ``tokenizers`` pipeline of the module docstring for the sentencepiece model in ``out``.

    Returns the tokenizer and the whole-word forms it adds. Saved with the generic
    ``TokenizersBackend`` class, so that no model-specific class rebuilds the pipeline on load.
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
        converted = AutoTokenizer.from_pretrained(tmp).backend_tokenizer
    spec = json.loads(converted.to_str())
    spec["pre_tokenizer"] = None
    for token in spec["added_tokens"]:
        token["lstrip"] = token["content"] in MARKERS
    vocab = spec["model"]["vocab"]
    forms = whole_word_forms(vocab)
    for form in forms:  # appended after every sentencepiece id
        vocab[WHOLE_WORD + form] = max(vocab.values()) + 1
    spec["model"]["ignore_merges"] = True
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.normalizer = normalizers.Sequence([normalizers.Replace(" ", SPACE), *_whole_word_normalizers(forms)])
    # A marked word is a run of identifier characters or of operator characters: exactly the form.
    word = rf"{WHOLE_WORD}{SPACE}?(?:\w+|[^\w\s{SPACE}{WHOLE_WORD}]+)"
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(word), "isolated")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace(Regex(rf"\A{WHOLE_WORD}"), ""),  # per piece, so "<code:PIECE>" names stay apart
            backend.decoder,
            decoders.Replace(_SPACE_BEFORE_MARKER, " "),
        ]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token=PAD,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    return wrapped, forms


# ---------------------------------------------------------------------------------------------- adapting


def adapt_tokenizer(base_dir: str | os.PathLike, out_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A pre-trained tokenizer (e.g. PyCodeGPT's byte-level BPE) with the project's tokens added.

    As ``lm_trainer.py`` of the original implementation does: the special tokens are added first;
    then every entry of the Python list in two forms, bare and word-initial (``Ġ`` + entry for a
    byte-level vocabulary, ``▁`` + entry for a sentencepiece one), is looked up in sorted order of
    the set of forms; a form already in the vocabulary is separated as it is, a form missing from
    it is added as a new token (in that order, after the special tokens) and separated. The added
    tokens match whole words only (the original matched them inside words too).
    """
    tokenizer = _load_checked(base_dir)
    tokenizer.add_special_tokens(
        {"pad_token": PAD, "additional_special_tokens": list(SPECIAL_TOKENS[1:])},
        replace_extra_special_tokens=False,
    )
    added = adapted_additions(tokenizer)
    tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=False) for t in added])
    out = Path(out_dir)
    with replacing_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        write_separation(load_tokenizer(tmp, check_separation=False), tmp)
    tokenizer = load_tokenizer(out)
    logger.info("adapted %s: %d special and %d Python tokens added", base_dir, len(SPECIAL_TOKENS), len(added))
    return tokenizer


def adapted_additions(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The forms of the Python list that ``adapt_tokenizer`` adds to ``tokenizer``, in order."""
    marker = word_marker(tokenizer)
    vocab, special = tokenizer.get_vocab(), set(tokenizer.all_special_tokens)
    forms = sorted({form for t in python_tokens() for form in (t, marker + t)})
    return [form for form in forms if form not in special and form not in vocab]


def word_marker(tokenizer: PreTrainedTokenizerBase) -> str:
    """The character that marks a word-initial piece: ``Ġ`` (byte-level BPE) or ``▁`` (sentencepiece)."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(" x", add_special_tokens=False))
    return "Ġ" if pieces and pieces[0].startswith("Ġ") else SPACE


# ---------------------------------------------------------------------------------------------- loading


def _load_checked(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(path)`` with a one-line error for a missing / broken directory."""
    if not Path(path).is_dir():
        raise UsageError(f"tokenizer directory {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot load a tokenizer from {path}: {first_line(err)}") from None


def load_tokenizer(path: str | os.PathLike, *, check_separation: bool = True) -> PreTrainedTokenizerBase:
    """A project tokenizer directory through ``AutoTokenizer``, checked to hold every special token.

    Raises:
        UsageError: the directory is missing, does not load, lacks a special token as a single id,
            or (with ``check_separation``) lacks ``separation.json``.
    """
    tokenizer = _load_checked(path)
    for token in SPECIAL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != token:
            raise UsageError(f"tokenizer {path} does not hold special token {token} as a single id")
    if tokenizer.pad_token != PAD:
        raise UsageError(f"tokenizer {path} has pad token {tokenizer.pad_token!r}, expected {PAD}")
    if check_separation and not (Path(path) / SEPARATION_FILE).is_file():
        raise UsageError(f"tokenizer {path} has no {SEPARATION_FILE} (made by `ds-data tokenizer`)")
    return tokenizer


def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The id of each special token of the layout, by its string."""
    return {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}


# ---------------------------------------------------------------------------------------------- separation


def compute_separation(tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """The separated id sets of each mode (ARCHITECTURE.md, "Tokens").

    partial: for a trained tokenizer, the ids of the whole-word pieces of the Python list's entries
    (``WHOLE_WORD`` + ``▁`` + entry, or + a bare entry that starts a text); for an
    adapted one, the ids of the entries present bare or word-initial (``word_marker`` + entry),
    added ones included. full: every id that is not a special token.
    """
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids) | set(special_ids(tokenizer).values())
    entries = python_tokens()
    partial = {vocab[WHOLE_WORD + f] for t in entries for f in (t, SPACE + t) if WHOLE_WORD + f in vocab}
    if not partial:
        marker = word_marker(tokenizer)
        partial = {vocab[f] for t in entries for f in (t, marker + t) if f in vocab}
    partial -= special
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
        raise UsageError(f"unknown separation {mode!r}; expected one of {', '.join(SEPARATION_MODES)}")
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
        raise UsageError(f"cannot read separation {mode!r} from {path}: {first_line(err)}") from None
