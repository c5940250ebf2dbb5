"""Attention over packed documents: who may attend to whom, and the two kernels that apply it.

The rule (ARCHITECTURE.md, "A packed batch"): query token t may attend to key token s iff

    doc_ids[t] == doc_ids[s]  and  (s <= t  or  (prefix[t] and prefix[s]))

and, on local layers with window w, also |t - s| < w (for the causal part that is GPT-Neo's
0 <= t - s < w). Every token attends at least to itself, so no softmax row is empty (padding,
doc id -1, forms its own "document").

Two paths give the same numbers:

- the reference path (CPU, or whenever asked): a dense boolean (B, 1, T, T) mask built from the ids,
  applied by `scaled_dot_product_attention` with scale 1.0 and scores in fp32 or wider;
- the GPU path: a FlexAttention `BlockMask` built from `mask_mod` over the same ids (block-sparse,
  never a dense float mask), applied by a compiled `flex_attention`.

`build_masks` picks the path from the device; `attend` applies whichever mask it is given.
GPT-Neo does not scale scores by 1/sqrt(head_dim), so both paths use scale 1.0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BACKENDS = ("auto", "sdpa", "flex")
"""Attention backends: `auto` = flex on CUDA, dense-mask SDPA elsewhere."""

Mask = Tensor | BlockMask
"""A dense boolean (B, 1, T, T) mask (reference path) or a FlexAttention block mask (GPU path)."""


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
    build = block_mask if path == "flex" else dense_mask
    prefix = None if prefix is None else prefix.bool()  # 0/1 integer flags work too
    return {window: build(doc_ids, prefix, window) for window in set(windows)}


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
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    out = F.scaled_dot_product_attention(
        q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype), attn_mask=mask, scale=1.0
    )  # (B, nh, T, hs)
    return out.to(v.dtype)
