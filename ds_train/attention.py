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
- the GPU path: a FlexAttention `BlockMask` over the same ids (block-sparse, never a dense float mask;
  its block tables worked out from each block's document-id range, `mask_mod` applied inside the
  blocks that hold a boundary), applied by a compiled `flex_attention`.

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
    """A FlexAttention block mask for the rule, its block tables worked out from the documents' extents.

    Evaluating `mask_mod` at every (query, key) position, as `create_block_mask` does, costs O(T^2): for
    a micro batch packed as one long stream that was 1.8 ms of GPU per 16,384 tokens on an H100, and it
    grows with the square of the length. Here each block of `block_size` tokens is summarised by the
    smallest and largest document id in it (padding, doc id < 0, apart), whether it holds prefix tokens
    and where it lies, and the tables follow from (T / block_size)^2 comparisons of those summaries:

    - a block pair is *skipped* when no document id can be shared (disjoint id ranges, no padding in
      both), when the key block lies wholly after the query block and one of them has no prefix
      token, or when every distance between them is >= window;
    - a block pair is *full* (`mask_mod` not evaluated) when both blocks lie in one and the same
      document, the key block wholly before the query block, and every distance is < window;
    - every other pair is *partial*: the kernel applies `mask_mod` there.

    Skipping is only ever done where no pair can be allowed and "full" only where every pair is, so
    the mask is the rule exactly for any doc ids (a document whose tokens are not contiguous only
    makes more pairs partial). Sequence lengths that are not a multiple of `block_size` fall back to
    `create_block_mask`.
    """
    B, T = doc_ids.shape
    mask_mod = make_mask_mod(doc_ids, prefix, window)
    if T % block_size:
        return create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device, BLOCK_SIZE=block_size,
                                 _compile=doc_ids.device.type == "cuda")
    n = T // block_size
    blocks = doc_ids.reshape(B, n, block_size)
    pad = blocks < 0
    has_pad = pad.any(-1)  # (B, n)
    big = torch.iinfo(blocks.dtype).max
    low = torch.where(pad, big, blocks).amin(-1)  # (B, n): smallest document id (big: padding only)
    high = torch.where(pad, -1, blocks).amax(-1)  # (B, n): largest document id (-1: padding only)
    q_low, q_high, k_low, k_high = low[:, :, None], high[:, :, None], low[:, None, :], high[:, None, :]
    shared = ((q_low <= k_high) & (k_low <= q_high)) | (has_pad[:, :, None] & has_pad[:, None, :])  # (B, n, n)
    block = torch.arange(n, device=doc_ids.device)
    gap = block[:, None] - block[None, :]  # (n, n): query block - key block
    reachable = gap >= 0
    if prefix is not None:
        in_prefix = prefix.reshape(B, n, block_size).any(-1)  # (B, n)
        reachable = reachable | (in_prefix[:, :, None] & in_prefix[:, None, :])
    some = shared & reachable
    one_doc = (low == high) & ~has_pad  # (B, n): every token of the block in one document
    every = (q_low == k_low) & one_doc[:, :, None] & one_doc[:, None, :] & (gap > 0)
    if window is not None:
        nearest = (gap.abs() - 1) * block_size + 1  # smallest |q - k| between the two blocks (off the diagonal)
        some = some & ((gap == 0) | (nearest < window))
        every = every & ((gap + 1) * block_size - 1 < window)  # largest q - k below the diagonal
    partial = some & ~every

    def ordered(dense: Tensor) -> tuple[Tensor, Tensor]:  # (B, n, n) bool -> counts (B, 1, n), indices (B, 1, n, n)
        counts = dense.sum(-1, dtype=torch.int32)
        indices = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[:, None], indices[:, None]

    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(every), BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(T, T)
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
