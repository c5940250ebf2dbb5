r'''Pairs -> the sequence layout of DESIGN.md §2, with per-token modality, target and prefix flags.

One pair becomes::

    <bot> SIGNATURE <comments> DOCSTRING <python> BODY <eot>

Rendering, exactly:

- SIGNATURE: the linearized header from ``codec.split_signature`` (decorators included), stripped;
  code given as Python source (no layout marker) is linearized first.
- DOCSTRING: ``codec.render_docstring``: the stripped docstring, ``"""`` inside it escaped as
  ``\"\"\"``, wrapped in triple quotes and indented by four spaces as it stands under its
  ``def`` line; a multi-line docstring indents every non-empty line and closes on its own line::

      '    """Summary."""'            '    """Summary.\n\n    Details.\n    """'

- BODY: the rest of the linearized code after the header, stripped.

Each segment is tokenized on its own (no special tokens added), so modality boundaries fall
between tokens. Every token also carries its *segment* (``Segment``), from which modality, target
and prefix follow for each objective (``flags``); packed shards store segments, so one packed
dataset serves every objective and separation.

Corrupt Code CLM draws its corruption from a generator seeded by (seed, epoch, ``_id``)
(``corruption_rng``): a resumed run draws the same. Exactly ``round(prob * n)`` of the ``n``
non-special DOCSTRING tokens are picked; each becomes ``<mask>`` with probability 0.8, else a
uniformly drawn *text token* (any non-special id; it may equal the original).
'''

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from transformers import PreTrainedTokenizerBase

from ds_train.data.codec import (
    BOT,
    COMMENTS,
    EOT,
    MASK,
    PYTHON,
    ensure_linearized,
    render_docstring,
    split_signature,
)
from ds_train.data.sources import Pair, SkipCounter
from ds_train.data.tokenizer import special_ids
from ds_train.errors import UsageError, first_line

OBJECTIVES = ("text_code_clm", "code_clm", "corrupt_code_clm", "prefix_code_clm")
MASK_SHARE = 0.8


class Segment(IntEnum):
    """Which part of the layout a token belongs to (stored per token in packed shards)."""

    BOT = 0
    SIGNATURE = 1
    COMMENTS = 2
    DOCSTRING = 3
    PYTHON = 4
    BODY = 5
    EOT = 6


CODE_SEGMENTS = (Segment.SIGNATURE, Segment.BODY, Segment.EOT)
TARGET_SEGMENTS = (Segment.BODY, Segment.EOT)


@dataclass
class Encoded:
    """One encoded pair; all lists have the same length n (see ARCHITECTURE.md)."""

    id: str
    input_ids: list[int]
    modality: list[int]
    target: list[int]
    prefix: list[int]
    segments: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def check_objective(objective: str) -> str:
    """``objective`` itself, or a one-line ``UsageError`` naming the valid ones."""
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    return objective


# ---------------------------------------------------------------------------------------------- flags


def flags(segments: np.ndarray, objective: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(modality, target, prefix) bool arrays of one document's segments under ``objective``.

    Works on any shape; for text_code_clm the first token of the last axis is not a target (packed
    rows set that flag from positions instead).
    """
    modality = np.isin(segments, CODE_SEGMENTS)
    if objective == "text_code_clm":
        target = np.ones(segments.shape, dtype=bool)
        target[..., :1] = False
    else:
        target = np.isin(segments, TARGET_SEGMENTS)
    if objective == "prefix_code_clm":
        prefix = segments <= Segment.PYTHON
    else:
        prefix = np.zeros(segments.shape, dtype=bool)
    return modality, target, prefix


def corruption_rng(seed: int, epoch: int, pair_id: str) -> np.random.Generator:
    """The generator of one pair's corruption, a pure function of (seed, epoch, ``_id``)."""
    digest = hashlib.sha256(f"{seed}\x00{epoch}\x00{pair_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@dataclass(frozen=True)
class Corruption:
    """Corrupt Code CLM's input change for one tokenizer (see the module docstring)."""

    prob: float
    seed: int
    mask_id: int
    is_special: np.ndarray  # (V,) bool
    text_ids: np.ndarray  # the non-special ids, the pool of random replacements

    @classmethod
    def for_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, prob: float = 0.15, seed: int = 0
    ) -> Corruption:
        """The corruption of ``tokenizer``'s vocabulary (special = layout tokens and the tokenizer's own)."""
        is_special = np.zeros(len(tokenizer), dtype=bool)
        is_special[list(set(special_ids(tokenizer).values()) | set(tokenizer.all_special_ids))] = True
        return cls(prob, seed, special_ids(tokenizer)[MASK], is_special, np.flatnonzero(~is_special))

    def __call__(self, pair_id: str, input_ids: np.ndarray, segments: np.ndarray, epoch: int) -> np.ndarray:
        """A copy of one document's ids with ``round(prob * n)`` non-special DOCSTRING tokens corrupted."""
        ids = np.array(input_ids, dtype=np.int64, copy=True)
        candidates = np.flatnonzero((segments == Segment.DOCSTRING) & ~self.is_special[ids])
        count = round(self.prob * len(candidates))
        if count == 0:
            return ids
        rng = corruption_rng(self.seed, epoch, pair_id)
        picked = np.sort(rng.choice(candidates, size=count, replace=False))
        masked = rng.random(count) < MASK_SHARE
        ids[picked[masked]] = self.mask_id
        ids[picked[~masked]] = self.text_ids[rng.integers(0, len(self.text_ids), size=int((~masked).sum()))]
        return ids


# ---------------------------------------------------------------------------------------------- encoder


class Encoder:
    """Encodes pairs with one tokenizer into the layout (segments and ids), then into flags."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        objective: str = "code_clm",
        *,
        seed: int = 0,
        corrupt_prob: float = 0.15,
    ) -> None:
        self.tokenizer = tokenizer
        self.objective = check_objective(objective)
        ids = special_ids(tokenizer)
        self.bot, self.comments, self.python, self.eot = (ids[t] for t in (BOT, COMMENTS, PYTHON, EOT))
        self.pad_id = tokenizer.pad_token_id
        self.corruption = Corruption.for_tokenizer(tokenizer, corrupt_prob, seed)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, tokenized independently, no special tokens added.

        The same ids as ``tokenizer(texts, add_special_tokens=False)``; through the ``tokenizers``
        backend's offset-free batch call where there is one (about twice as fast).
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def layout(
        self, pairs: list[Pair], skips: SkipCounter | None = None
    ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """``(_id, ids, segments)`` of each pair (uncorrupted); pairs without a header are skipped.

        Code given as Python source (no layout marker) is linearized first (``codec.ensure_linearized``);
        source that does not tokenize is skipped as ``untokenizable_code``.
        """
        parts, kept = [], []
        for pair in pairs:
            try:
                signature, body = split_signature(ensure_linearized(pair.code))
            except ValueError as err:
                if skips is not None:
                    reason = "untokenizable_code" if "tokenize" in str(err) else "no_signature"
                    skips.skip(reason, pair.id, first_line(err))
                continue
            parts += [signature.strip(), render_docstring(pair.docstring), body.strip()]
            kept.append(pair.id)
        tokens = self.tokenize(parts) if parts else []
        return [self._assemble(pid, *tokens[3 * i : 3 * i + 3]) for i, pid in enumerate(kept)]

    def _assemble(
        self, pair_id: str, sig: list[int], doc: list[int], body: list[int]
    ) -> tuple[str, np.ndarray, np.ndarray]:
        """Join the segments with the layout's special tokens."""
        ids = [self.bot, *sig, self.comments, *doc, self.python, *body, self.eot]
        lengths = [1, len(sig), 1, len(doc), 1, len(body), 1]
        segments = np.repeat(np.arange(len(Segment), dtype=np.int8), lengths)
        return pair_id, np.array(ids, dtype=np.int64), segments

    def finish(self, pair_id: str, ids: np.ndarray, segments: np.ndarray, epoch: int = 0) -> Encoded:
        """The ``Encoded`` of a laid-out pair under this encoder's objective (corruption drawn here)."""
        if self.objective == "corrupt_code_clm":
            ids = self.corruption(pair_id, ids, segments, epoch)
        modality, target, prefix = flags(segments, self.objective)
        return Encoded(
            pair_id,
            ids.tolist(),
            modality.astype(int).tolist(),
            target.astype(int).tolist(),
            prefix.astype(int).tolist(),
            segments.astype(int).tolist(),
        )

    def encode(self, pairs: list[Pair], epoch: int = 0, skips: SkipCounter | None = None) -> list[Encoded]:
        """Encode pairs; those whose code has no def/class header are skipped (and counted)."""
        return [self.finish(pid, ids, seg, epoch) for pid, ids, seg in self.layout(pairs, skips)]


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    pair: Pair,
    objective: str = "code_clm",
    *,
    seed: int = 0,
    epoch: int = 0,
    corrupt_prob: float = 0.15,
) -> Encoded:
    """One pair in the layout (a convenience over ``Encoder``); a ``UsageError`` if it has no header."""
    encoder = Encoder(tokenizer, objective, seed=seed, corrupt_prob=corrupt_prob)
    skips = SkipCounter()
    encoded = encoder.encode([pair], epoch, skips)
    if not encoded:
        raise UsageError(f"pair {pair.id}: code does not start with a def/class header")
    return encoded[0]


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, signature: str, docstring: str
) -> tuple[list[int], list[int]]:
    """(ids, modality) of ``<bot> SIGNATURE <comments> DOCSTRING <python>``: the prompt for generation.

    ``signature`` is the linearized header (as ``codec.split_signature`` gives it); the docstring is
    rendered as in training. Modality is 1 on the signature tokens, 0 elsewhere.
    """
    ids = special_ids(tokenizer)
    sig, doc = tokenizer([signature.strip(), render_docstring(docstring)], add_special_tokens=False)[
        "input_ids"
    ]
    input_ids = [ids[BOT], *sig, ids[COMMENTS], *doc, ids[PYTHON]]
    modality = [0] + [1] * len(sig) + [0] * (len(doc) + 2)
    return input_ids, modality
