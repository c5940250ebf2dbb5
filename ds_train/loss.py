"""The fused, chunked, modality-masked tied-head loss (DESIGN.md §3 "Output", §4).

The token table W = [E; C] has V text rows and |S| code rows; row V + i is the code row of token
`separated_ids[i]`. Token t is predicted from the hidden state of position t - 1 with a V-way softmax
in the view of its own modality:

- text view: logits = h E^T;
- code view: the same, except that the column of each s in S is h . C[slot(s)].

This equals the original implementation (|S| duplicated vocabulary rows, forbidden columns set to
-inf), without materialising the (B*T, V + |S|) logits or masked copies of them: the rows whose next
token is a target are gathered first, then `ChunkedTiedCrossEntropy` walks over them `chunk_size` rows
at a time. Its forward keeps only each row's logsumexp; its backward recomputes a chunk's logits and
accumulates the gradients of h and of W (E part and C part). Peak extra memory is about
2 x chunk_size x V x 4 bytes plus an fp32 gradient of W. Logits are always fp32 (float64 for float64):
bf16/fp16 on CUDA multiply on tensor cores with fp32 accumulation and output; elsewhere the operands
are upcast first. In the backward of a bf16/fp16 CUDA run the logits' gradient is rounded to the
weight's dtype before its two matmuls (their products are still accumulated in fp32).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)


def operand_dtype(weight: Tensor) -> torch.dtype:
    """Dtype of the head's matmul operands; the products are always accumulated and returned in fp32+.

    bf16/fp16 on CUDA stay as they are (tensor cores, fp32 accumulation and fp32 output via
    `torch.mm(..., out_dtype=torch.float32)`); elsewhere operands are upcast to fp32 (float64 stays).
    """
    if weight.is_cuda and weight.dtype in LOW_PRECISION:
        return weight.dtype
    return torch.promote_types(weight.dtype, torch.float32)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 2-D operands of one dtype, with the result in fp32 when they are bf16/fp16."""
    if a.dtype in LOW_PRECISION:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a @ b


def view_logits(h: Tensor, table: Tensor, vocab_size: int, is_code: Tensor, separated_ids: Tensor) -> Tensor:
    """The V-way logits of rows h (n, d) with the table [E; C], each in the view of its row's modality.

    h and table share a dtype (see `operand_dtype`); is_code (n,) bool picks the code view, which puts
    h . C[slot(s)] in the column of each separated s. Returns (n, V) in fp32 (float64 for float64).
    """
    logits = _mm(h, table[:vocab_size].T)  # (n, V)
    if separated_ids.numel():
        code_logits = _mm(h, table[vocab_size:].T)  # (n, |S|)
        text_logits = logits[:, separated_ids]  # (n, |S|)
        logits[:, separated_ids] = torch.where(is_code[:, None], code_logits, text_logits)
    return logits


def _logsumexp_(logits: Tensor) -> Tensor:
    """Row-wise logsumexp of (n, V) logits that overwrites them (no second (n, V) buffer): (n,)."""
    row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    return (row_max + logits.sub_(row_max).exp_().sum(dim=-1, keepdim=True).log_()).squeeze(1)


def _softmax_grad_(logits: Tensor, lse: Tensor, g: Tensor, labels: Tensor, dtype: torch.dtype) -> Tensor:
    """d loss_i / d logit_ij = g_i (softmax_ij - [j == label_i]), in place over the fp32 logits, then cast."""
    logits.sub_(lse[:, None]).exp_().mul_(g[:, None])
    logits.scatter_add_(1, labels[:, None], -g[:, None])
    return logits.to(dtype)


def _fused_logsumexp(logits: Tensor) -> Tensor:
    """The same as `_logsumexp_` without touching its input, as one fused kernel when compiled."""
    return torch.logsumexp(logits, dim=-1)


def _fused_softmax_grad(logits: Tensor, lse: Tensor, g: Tensor, labels: Tensor, dtype: torch.dtype) -> Tensor:
    """The same as `_softmax_grad_` as one read of the fp32 logits and one write in `dtype` when compiled."""
    columns = torch.arange(logits.shape[1], device=logits.device)
    grad = torch.exp(logits - lse[:, None]) * g[:, None]
    return torch.where(columns[None, :] == labels[:, None], grad - g[:, None], grad).to(dtype)


@functools.cache
def _compiled(fn):
    """`fn` compiled once per process (row counts vary from batch to batch: dynamic shapes)."""
    return torch.compile(fn, dynamic=True)


def _row_ops(logits: Tensor, fused: bool):
    """(logsumexp, softmax_grad) for these logits: fused compiled kernels on CUDA (unless `fused` is
    False), in-place eager ops elsewhere (the CPU path keeps at most two (n, V) buffers alive; the
    fused one reads them once)."""
    if logits.is_cuda and fused:
        return _compiled(_fused_logsumexp), _compiled(_fused_softmax_grad)
    return _logsumexp_, _softmax_grad_


def chunks(n: int, size: int) -> list[slice]:
    """Row slices of at most `size` rows over n rows, except that a last chunk of one row joins the one
    before it (`size` + 1 rows): the compiled row kernels take their row count as a dynamic size, but
    torch.compile specialises a size of 1 and would compile them again, a second or so in the middle of a
    step, whenever a micro batch's target count is one more than a multiple of `size`."""
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(start, end) for start, end in zip(starts, [*starts[1:], n])]


class ChunkedTiedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy -log softmax(view(h W^T))[label], chunk by chunk, with a recomputing backward.

    Inputs: h (N, d) gathered hidden states; weight (V + |S|, d) the tied table [E; C]; labels (N,)
    token ids in [0, V); is_code (N,) bool, the modality of each label token; separated_ids (|S|,) int64
    sorted; vocab_size V; chunk_size rows per chunk; fused_rows: the compiled row kernels on CUDA.
    Output: (N,) losses in fp32 (float64 when the weight is float64). Only h and weight receive
    gradients; the weight's is accumulated in fp32+.
    """

    @staticmethod
    def forward(
        ctx,
        h: Tensor,
        weight: Tensor,
        labels: Tensor,
        is_code: Tensor,
        separated_ids: Tensor,
        vocab_size: int,
        chunk_size: int,
        fused_rows: bool = True,
    ) -> Tensor:
        operands = operand_dtype(weight)
        table = weight.to(operands)
        losses = torch.empty(h.shape[0], dtype=torch.promote_types(operands, torch.float32), device=h.device)
        lse = torch.empty_like(losses)
        for rows in chunks(h.shape[0], chunk_size):
            logits = view_logits(h[rows].to(operands), table, vocab_size, is_code[rows], separated_ids)
            label_logit = logits.gather(1, labels[rows, None]).squeeze(1)  # (n,)
            logsumexp, _ = _row_ops(logits, fused_rows)
            lse[rows] = logsumexp(logits)
            losses[rows] = lse[rows] - label_logit
            del logits  # free this chunk's (n, V) buffer before the next one is allocated
        ctx.save_for_backward(h, weight, labels, is_code, separated_ids, lse)
        ctx.vocab_size, ctx.chunk_size, ctx.fused_rows = vocab_size, chunk_size, fused_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, labels, is_code, separated_ids, lse = ctx.saved_tensors
        V = ctx.vocab_size
        operands = operand_dtype(weight)
        table = weight.to(operands)
        text_table, code_table = table[:V], table[V:]
        grad_h = torch.empty_like(h)
        grad_table = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
        grad_text, grad_code = grad_table[:V], grad_table[V:]
        grad_losses = grad_losses.to(lse.dtype)
        for rows in chunks(h.shape[0], ctx.chunk_size):
            h_c, code_c, g_c = h[rows].to(operands), is_code[rows], grad_losses[rows]
            # d loss_i / d logit_ij = g_i (softmax_ij - [j == label_i]), in the operands' dtype.
            logits = view_logits(h_c, table, V, code_c, separated_ids)  # (n, V)
            _, softmax_grad = _row_ops(logits, ctx.fused_rows)
            grad_logits = softmax_grad(logits, lse[rows], g_c, labels[rows], operands)  # (n, V)
            del logits
            grad_h_c = torch.zeros(h_c.shape, dtype=lse.dtype, device=h.device)  # (n, d)
            if separated_ids.numel():
                # Code rows saw C in the columns of S: route those entries to C and out of E.
                on_s = grad_logits[:, separated_ids]  # (n, |S|)
                grad_on_code = torch.where(code_c[:, None], on_s, 0.0)  # (n, |S|)
                grad_logits[:, separated_ids] = on_s - grad_on_code
                grad_code.add_(_mm(grad_on_code.T, h_c))  # (|S|, d)
                grad_h_c.add_(_mm(grad_on_code, code_table))
            grad_h_c.add_(_mm(grad_logits, text_table))
            grad_text.add_(_mm(grad_logits.T, h_c))  # (V, d)
            grad_h[rows] = grad_h_c.to(h.dtype)
            del grad_logits  # free this chunk's (n, V) buffer before the next one is allocated
        return grad_h, grad_table.to(weight.dtype), None, None, None, None, None, None


def target_positions(target: Tensor, doc_ids: Tensor | None = None) -> Tensor:
    """Flat positions p = b * T + t of the hidden states that predict a counted target (token t + 1).

    Token t + 1 counts iff target[t + 1] and (with doc_ids) it is in the same document as token t.
    Returns (N,) int64 on the inputs' device. Called on the CPU copy of a batch (the Trainer does),
    it costs the GPU no host sync; on a GPU tensor the boolean index waits for the device.
    """
    T = target.shape[1]
    counted = target[:, 1:].bool()  # (B, T-1): is token t+1 a target? (0/1 integer flags work too)
    if doc_ids is not None:
        counted = counted & (doc_ids[:, 1:] == doc_ids[:, :-1])
    rows, cols = counted.nonzero(as_tuple=True)
    return rows * T + cols


def modality_loss(
    hidden: Tensor,
    weight: Tensor,
    input_ids: Tensor,
    target: Tensor,
    modality: Tensor,
    separated_ids: Tensor,
    *,
    vocab_size: int,
    chunk_size: int,
    doc_ids: Tensor | None = None,
    positions: Tensor | None = None,
    fused_rows: bool = True,
) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over target tokens with the tied, modality-relative head.

    hidden: (B, T, d) final hidden states (after the last LayerNorm); weight: (V + |S|, d) = [E; C];
    input_ids, target, modality: (B, T) — token t counts iff target[t], predicted from hidden[t - 1] in
    the view of modality[t] (True = code). A target at row position 0, or whose previous token belongs
    to another document (when doc_ids is given), has no context and is not counted (the data layer
    never produces one: the first token of a document is never a target). `positions`, when given,
    are `target_positions(target, doc_ids)` computed beforehand (on the CPU: no host sync here).
    `fused_rows=False` keeps the eager row operations on CUDA too (benchmarks compare the two).

    Returns (loss, stats): loss = sum of -log p over targets / number of targets, in fp32 (float64 for
    float64 inputs); stats = detached float32 [code_loss_sum, code_targets, text_loss_sum, text_targets]
    by the modality of the target token. With zero targets the loss is 0 and still part of the graph,
    so backward runs and gives zero gradients.
    """
    B, T, d = hidden.shape
    if positions is None:
        positions = target_positions(target, doc_ids)
    positions = positions.to(hidden.device, non_blocking=True)
    h = hidden.reshape(B * T, d).index_select(0, positions)  # (N, d): the states that predict a target
    labels = input_ids.reshape(B * T).index_select(0, positions + 1)  # (N,)
    is_code = modality.reshape(B * T).index_select(0, positions + 1).bool()  # (N,)
    losses = ChunkedTiedCrossEntropy.apply(
        h, weight, labels, is_code, separated_ids, vocab_size, chunk_size, fused_rows
    )  # (N,)
    n_targets = labels.numel()
    loss = losses.sum() / max(n_targets, 1)
    with torch.no_grad():
        code_sum = (losses * is_code).sum().float()
        n_code = is_code.sum().float()
        stats = torch.stack([code_sum, n_code, losses.sum().float() - code_sum, n_targets - n_code])
    return loss, stats
