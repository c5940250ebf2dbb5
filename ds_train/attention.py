"""Attention over packed documents: who may attend to whom, and the two kernels that apply it.

The rule (ARCHITECTURE.md, "A packed batch"): query token t may attend to key token s iff

    doc_ids[t] == doc_ids[s]  and  (s <= t  or  (prefix[t] and prefix[s]))

and, on local layers with window w, also |t - s| < w (for the causal part that is GPT-Neo's
0 <= t - s < w). Every token attends at least to itself, so no softmax row is empty (padding,
doc id -1, forms its own "document").

Two paths give the same numbers:

- the reference path (CPU, or whenever asked): a dense boolean (B, 1, T, T) mask built from the ids,
  applied by `scaled_dot_product_attention` with scale 1.0 and scores in fp32 or wider. A long
  stream of short documents (a micro batch packed as one token stream) would pay for T x T scores
  of which most are masked: there the documents are first regrouped into rows of about the longest
  document's length (`Regrouped`, a gather before and a scatter after attention), which gives the
  same numbers at the cost of rows;
- the GPU path: a FlexAttention `BlockMask` built from `mask_mod` over the same ids (block-sparse,
  never a dense float mask), applied by a compiled `flex_attention`.

`build_masks` picks the path from the device; `attend` applies whichever mask it is given.
GPT-Neo does not scale scores by 1/sqrt(head_dim), so both paths use scale 1.0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BACKENDS = ("auto", "sdpa", "flex")
"""Attention backends: `auto` = flex on CUDA, dense-mask SDPA elsewhere."""

@dataclass(frozen=True)
class Regrouped:
    """The reference path for a long stream: its documents regrouped into rows of length L.

    `index` (R, L): the flat position (b * T + t) of each slot, or -1 for an empty slot; `mask`
    (R, 1, L, L): the rule within each row (a document's tokens stay contiguous and in order, so the
    causal, prefix and window tests read the same inside a row as in the stream)."""

    index: Tensor
    mask: Tensor


Mask = Tensor | BlockMask | Regrouped
"""A dense boolean (B, 1, T, T) mask or its regrouped form (reference path), or a FlexAttention block
mask (GPU path)."""


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn `auto` into the concrete backend for `device`; reject unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return backend


def dense_mask(doc_ids: Tensor, prefix: Tensor | None, window: int | None) -> Tensor:
    """The reference boolean mask, True where query t may attend key s.

    doc_ids: (B, T) int; prefix: (B, T) bool or None; window: None for global layers.
    Returns (B, 1, T, T) bool, broadcast over heads.
    """
    T = doc_ids.shape[1]
    pos = torch.arange(T, device=doc_ids.device)
    q_pos, k_pos = pos[:, None], pos[None, :]  # (T, 1), (1, T)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    visible = k_pos <= q_pos  # (T, T)
    if prefix is not None:
        visible = visible | (prefix[:, :, None] & prefix[:, None, :])  # (B, T, T)
    allowed = same_doc & visible
    if window is not None:
        allowed = allowed & ((q_pos - k_pos).abs() < window)
    return allowed[:, None, :, :]  # (B, 1, T, T)


def regroup(doc_ids: Tensor, prefix: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """Rows for the reference path when they are much cheaper than the (B, T, T) scores: each run of
    equal doc ids (a document, or the padding) placed whole, in order, into rows of length L (the
    longest run, rounded up to 64), a new row when the next run does not fit.

    Returns (index (R, L), doc ids (R, L) with -2 in empty slots, prefix (R, L) or None), or None when
    regrouping would not at least halve the score count.
    """
    B, T = doc_ids.shape
    flat = doc_ids.reshape(-1).tolist()
    runs, start = [], 0
    for i in range(1, len(flat) + 1):  # runs never cross a row of the input
        if i == len(flat) or flat[i] != flat[start] or i % T == 0:
            runs.append((start, i))
            start = i
    L = -(-max(end - begin for begin, end in runs) // 64) * 64
    rows: list[list[int]] = [[]]
    for begin, end in runs:
        if len(rows[-1]) + end - begin > L:
            rows.append([])
        rows[-1].extend(range(begin, end))
    if 2 * len(rows) * L * L > B * T * T:
        return None
    index = torch.full((len(rows), L), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        index[r, : len(row)] = torch.tensor(row, dtype=torch.long)
    index = index.to(doc_ids.device)
    valid = index >= 0
    slot = index.clamp(min=0)
    docs = torch.where(valid, doc_ids.reshape(-1)[slot], torch.full_like(slot, -2))
    flags = None if prefix is None else prefix.reshape(-1)[slot] & valid
    return index, docs, flags


def make_mask_mod(doc_ids: Tensor, prefix: Tensor | None, window: int | None) -> Callable:
    """The same rule as `dense_mask`, as a FlexAttention `mask_mod(b, h, q_idx, kv_idx) -> bool`.

    The prefix flags are read as int32: loading a bool tensor inside the mask made the fused forward
    kernel about 10x slower on an H100 (torch 2.11).
    """
    in_prefix = None if prefix is None else prefix.to(torch.int32)  # (B, T)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = doc_ids[b, q_idx] == doc_ids[b, kv_idx]
        visible = kv_idx <= q_idx
        if in_prefix is not None:
            visible = visible | ((in_prefix[b, q_idx] & in_prefix[b, kv_idx]) == 1)
        allowed = allowed & visible
        if window is not None:
            allowed = allowed & ((q_idx - kv_idx).abs() < window)
        return allowed

    return mask_mod


def block_mask(
    doc_ids: Tensor, prefix: Tensor | None, window: int | None, *, block_size: int = 128
) -> BlockMask:
    """A FlexAttention block mask for the rule; compiled construction on CUDA (no dense B x T x T)."""
    B, T = doc_ids.shape
    return create_block_mask(
        make_mask_mod(doc_ids, prefix, window),
        B,
        None,
        T,
        T,
        device=doc_ids.device,
        BLOCK_SIZE=block_size,
        _compile=doc_ids.device.type == "cuda",
    )


def build_masks(
    doc_ids: Tensor, prefix: Tensor | None, windows: Iterable[int | None], backend: str = "auto"
) -> dict[int | None, Mask]:
    """One mask per distinct window (None = global), on the path that `backend` and the device pick."""
    path = resolve_backend(backend, doc_ids.device)
    prefix = None if prefix is None else prefix.bool()  # 0/1 integer flags work too
    if path == "flex":
        return {window: block_mask(doc_ids, prefix, window) for window in set(windows)}
    rows = regroup(doc_ids, prefix)
    if rows is None:
        return {window: dense_mask(doc_ids, prefix, window) for window in set(windows)}
    index, docs, flags = rows
    return {window: Regrouped(index, dense_mask(docs, flags, window)) for window in set(windows)}


@functools.cache
def _compiled_flex_attention() -> Callable:
    """`flex_attention` compiled once per process (the fused kernel; eager flex is a slow fallback)."""
    return torch.compile(flex_attention, dynamic=False)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor:
    """Unscaled attention of q, k, v (B, nh, T, hs) under `mask`; returns (B, nh, T, hs) in v's dtype.

    Scores are computed in fp32 (or float64 when the inputs are float64), like GPT-Neo in `transformers`.
    """
    if isinstance(mask, BlockMask):
        # Inside a compiled block Dynamo compiles flex_attention itself; eager CUDA calls take the compiled one.
        compiled = q.is_cuda and not torch.compiler.is_compiling()
        flex = _compiled_flex_attention() if compiled else flex_attention
        return flex(q, k, v, block_mask=mask, scale=1.0)
    if isinstance(mask, Regrouped):
        return _attend_regrouped(q, k, v, mask)
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    out = F.scaled_dot_product_attention(
        q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype), attn_mask=mask, scale=1.0
    )  # (B, nh, T, hs)
    return out.to(v.dtype)


def _attend_regrouped(q: Tensor, k: Tensor, v: Tensor, rows: Regrouped) -> Tensor:
    """`attend` on the regrouped rows: gather the slots, attend row by row, scatter back."""
    B, nh, T, hs = q.shape
    slot = rows.index.clamp(min=0).reshape(-1)  # (R * L,); empty slots read position 0, masked below

    def gather(x: Tensor) -> Tensor:  # (B, nh, T, hs) -> (R, nh, L, hs)
        flat = x.transpose(0, 1).reshape(nh, B * T, hs)[:, slot]  # (nh, R * L, hs)
        return flat.reshape(nh, *rows.index.shape, hs).transpose(0, 1)

    out = attend(gather(q), gather(k), gather(v), rows.mask)  # (R, nh, L, hs)
    valid = (rows.index >= 0).reshape(-1)
    flat = out.transpose(0, 1).reshape(nh, -1, hs)[:, valid]  # (nh, B * T, hs), every position once
    result = torch.empty(nh, B * T, hs, dtype=out.dtype, device=out.device)
    result[:, rows.index.reshape(-1)[valid]] = flat
    return result.reshape(nh, B, T, hs).transpose(0, 1)  # (B, nh, T, hs)
