"""GPT-Neo with modality-relative embeddings (DESIGN.md §3, §5): config, blocks, model.

The token table `wte.weight` is [E; C]: V text rows, then one code row per separated token
(row V + i belongs to `separated_ids[i]`). Code tokens in S are routed to their code row by one
lookup through the `route` buffer; the tied head and the loss live in `ds_train.loss`.

GPT-Neo math, as in `transformers`' GPTNeoForCausalLM: learned absolute positions, pre-LayerNorm
blocks, q/k/v without bias and out_proj with bias, attention scores not scaled by 1/sqrt(head_dim),
global and local (sliding window) layers, GELU (tanh) MLP of 4d, final LayerNorm, tied head.
This file never imports DeepSpeed or `transformers`; `ds_train.hf` maps the model to and from
`transformers`' layout.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ds_train.attention import BACKENDS, Mask, attend, build_masks
from ds_train.loss import modality_loss, operand_dtype, view_logits

log = logging.getLogger(__name__)

ATTENTION_TYPES = ("global", "local")
LOCAL_ATTENTION = ("always", "generation_only")
"""When local layers apply their window: always (GPT-Neo), or only at generation (the original's training)."""


# ----------------------------------------------------------------------------------------------------
# Config and flavors
# ----------------------------------------------------------------------------------------------------


@dataclass
class GPTNeoConfig:
    """Shape and behaviour of the backbone. `to_dict()` / `from_dict()` give its JSON/YAML form."""

    vocab_size: int
    """V: the tokenizer's vocabulary size, special tokens included. The token table has V + |S| rows."""
    n_positions: int = 2048
    """Rows of the learned position table: the longest document (positions restart per document)."""
    d_model: int = 768
    """Width d of the residual stream."""
    n_layer: int = 12
    """Number of transformer blocks L."""
    n_head: int = 12
    """Attention heads per block; d_model must be a multiple of it."""
    window_size: int = 256
    """Local layers attend to keys with |t - s| < window_size."""
    attention_types: tuple[str, ...] = ()
    """Per layer, "global" or "local"; empty means alternate global, local, global, ..."""
    local_attention: str = "always"
    """"always": local layers keep their window in this model, as GPT-Neo does (the default).
    "generation_only": this model (training, `ds-eval loss`) treats every layer as global, and the
    window applies only where the export is generated from, as in the original work, whose training
    passed a 3-D packed mask that bypassed GPT-Neo's local window."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weights and embeddings (biases start at 0)."""
    separated_ids: tuple[int, ...] = ()
    """S: sorted token ids (< V, never special) that get a code row; empty = no separation."""
    pad_token_id: int | None = None
    """The pad token; its text row starts at zero."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass (torch.utils.checkpoint, non-reentrant)."""
    loss_chunk_size: int = 1024
    """Target rows per chunk of the fused loss; its extra memory is about 2 x chunk x V x 4 bytes."""
    attention_backend: str = "auto"
    """Attention kernel: "auto" (FlexAttention block masks on CUDA, dense-mask SDPA elsewhere), "flex", "sdpa"."""

    def __post_init__(self) -> None:
        self.attention_types = tuple(self.attention_types) or tuple(
            ATTENTION_TYPES[i % 2] for i in range(self.n_layer)
        )
        self.separated_ids = tuple(int(i) for i in self.separated_ids)

    def validate(self) -> None:
        """Raise one ValueError that lists every problem of the config."""
        problems = []
        for name in (
            "vocab_size",
            "n_positions",
            "d_model",
            "n_layer",
            "n_head",
            "window_size",
            "loss_chunk_size",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.n_head >= 1 and self.d_model % self.n_head:
            problems.append(f"d_model {self.d_model} is not a multiple of n_head {self.n_head}")
        if len(self.attention_types) != self.n_layer:
            problems.append(
                f"attention_types has {len(self.attention_types)} entries for {self.n_layer} layers"
            )
        if self.local_attention not in LOCAL_ATTENTION:
            problems.append(f"local_attention must be one of {LOCAL_ATTENTION} (got {self.local_attention!r})")
        if unknown := sorted(set(self.attention_types) - set(ATTENTION_TYPES)):
            problems.append(f"unknown attention types {unknown}; expected 'global' or 'local'")
        ids = self.separated_ids
        if list(ids) != sorted(set(ids)):
            problems.append("separated_ids must be sorted and without duplicates")
        if ids and (ids[0] < 0 or ids[-1] >= self.vocab_size):
            problems.append(f"separated_ids must lie in [0, {self.vocab_size})")
        if self.pad_token_id is not None:
            if not 0 <= self.pad_token_id < self.vocab_size:
                problems.append(f"pad_token_id {self.pad_token_id} is outside [0, {self.vocab_size})")
            if self.pad_token_id in set(ids):
                problems.append(f"pad_token_id {self.pad_token_id} must not be a separated id")
        if self.attention_backend not in BACKENDS:
            problems.append(f"attention_backend must be one of {BACKENDS} (got {self.attention_backend!r})")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head

    @property
    def n_separated(self) -> int:
        """|S|, the number of code rows."""
        return len(self.separated_ids)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTNeoConfig:
        """Inverse of `to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_flavor(
        cls,
        name: str,
        *,
        vocab_size: int,
        separated_ids: tuple[int, ...] | list[int] = (),
        pad_token_id: int | None = None,
        **overrides: Any,
    ) -> GPTNeoConfig:
        """A named shape from `FLAVORS`, with the tokenizer's numbers and any field overridden."""
        if name not in FLAVORS:
            raise ValueError(f"unknown model flavor {name!r}; known: {', '.join(FLAVORS)}")
        fields = {**FLAVORS[name], **overrides}
        return cls.from_dict(
            {
                "vocab_size": vocab_size,
                "separated_ids": tuple(separated_ids),
                "pad_token_id": pad_token_id,
                **fields,
            }
        )


FLAVORS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "d_model": 64, "n_head": 4, "n_positions": 512, "window_size": 32},
    "debug": {"n_layer": 4, "d_model": 256, "n_head": 4, "n_positions": 1024, "window_size": 256},
    "pycodegpt-110m": {"n_layer": 12, "d_model": 768, "n_head": 12, "n_positions": 2048, "window_size": 256},
    "gpt-neo-350m": {"n_layer": 24, "d_model": 1024, "n_head": 16, "n_positions": 2048, "window_size": 256},
    "gpt-neo-760m": {"n_layer": 24, "d_model": 1536, "n_head": 16, "n_positions": 2048, "window_size": 256},
    "gpt-neo-1.3b": {"n_layer": 24, "d_model": 2048, "n_head": 16, "n_positions": 2048, "window_size": 256},
}
"""Named model shapes; layers alternate global / local attention in all of them."""


# ----------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------


def check_batch_ranges(input_ids: Tensor, position_ids: Tensor, vocab_size: int, n_positions: int) -> None:
    """One-line ValueError for token ids outside [0, vocab_size) or positions outside [0, n_positions)."""
    if input_ids.numel() == 0:
        return
    bounds = torch.stack([input_ids.min(), input_ids.max(), position_ids.min(), position_ids.max()])
    low_id, high_id, low_pos, high_pos = bounds.tolist()  # one device sync for all four on a GPU
    if low_id < 0 or high_id >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}) (got values from {low_id} to {high_id})")
    if low_pos < 0 or high_pos >= n_positions:
        raise ValueError(f"position_ids must lie in [0, {n_positions}) (got values from {low_pos} to {high_pos})")


class SelfAttention(nn.Module):
    """Multi-head self-attention, GPT-Neo style: no bias on q/k/v, bias on out_proj, unscaled scores."""

    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=True)

    def forward(self, x: Tensor, mask: Mask) -> Tensor:
        B, T, d = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        y = attend(q, k, v, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.out_proj(y)


class MLP(nn.Module):
    """d -> 4d -> d with GELU (tanh approximation, `gelu_new` in `transformers`)."""

    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; `window` is None on global layers (and on all layers with
    `local_attention="generation_only"`)."""

    def __init__(self, config: GPTNeoConfig, layer: int) -> None:
        super().__init__()
        windowed = config.attention_types[layer] == "local" and config.local_attention == "always"
        self.window = config.window_size if windowed else None
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, mask: Mask) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------


class GPTNeo(nn.Module):
    """GPT-Neo over the routed table [E; C], returning hidden states, logits, or (loss, stats)."""

    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        V, n_sep, d = config.vocab_size, config.n_separated, config.d_model
        self.wte = nn.Embedding(V + n_sep, d)
        self.wpe = nn.Embedding(config.n_positions, d)
        self.h = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = nn.LayerNorm(d, eps=config.layer_norm_eps)
        separated = torch.tensor(config.separated_ids, dtype=torch.long)
        route = torch.arange(V)
        route[separated] = V + torch.arange(n_sep)
        self.register_buffer("separated", separated, persistent=False)  # (|S|,): slot -> token id
        self.register_buffer("route", route, persistent=False)  # (V,): token id -> row of a code token
        self._run_blocks = self._blocks
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise like `transformers` (normal(0, init_std), zero biases, unit LayerNorms); C = E[S]; pad row 0."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        table, V = self.wte.weight, self.config.vocab_size
        table[V:] = table[self.separated]
        if self.config.pad_token_id is not None:
            table[self.config.pad_token_id] = 0.0

    def route_ids(self, input_ids: Tensor, modality: Tensor | None) -> Tensor:
        """Rows of [E; C] to look up: V + slot(x) for code tokens x in S, else x. (B, T) -> (B, T)."""
        if modality is None:
            return input_ids
        return torch.where(modality.bool(), self.route[input_ids], input_ids)

    def _check_ranges(self, input_ids: Tensor, position_ids: Tensor) -> None:
        """One-line ValueError for token ids outside [0, V) or positions outside [0, n_positions).

        On a GPU the check is an asynchronous device assert (no host sync in the training step); the
        Trainer checks each batch on the CPU before it is copied (`check_batch_ranges`), so there it
        only guards direct callers.
        """
        V, P = self.config.vocab_size, self.config.n_positions
        if input_ids.is_cuda:
            torch._assert_async(((input_ids >= 0) & (input_ids < V)).all(), "input_ids outside [0, vocab_size)")
            torch._assert_async(
                ((position_ids >= 0) & (position_ids < P)).all(), "position_ids outside [0, n_positions)"
            )
            return
        check_batch_ranges(input_ids, position_ids, V, P)

    def hidden_states(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        doc_ids: Tensor | None = None,
        modality: Tensor | None = None,
        prefix: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states (after ln_f), (B, T, d). Defaults: positions arange(T), one document, all text."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
        self._check_ranges(input_ids, position_ids)
        if doc_ids is None:
            doc_ids = torch.zeros_like(input_ids)
        x = self.wte(self.route_ids(input_ids, modality)) + self.wpe(position_ids)  # (B, T, d)
        windows = {block.window for block in self.h}
        masks = build_masks(doc_ids, prefix, windows, self.config.attention_backend)
        return self.ln_f(self._run_blocks(x, masks))

    def _blocks(self, x: Tensor, masks: dict[int | None, Mask]) -> Tensor:
        """The transformer blocks in order (one compiled graph after `compile_blocks(whole=True)`)."""
        recompute = self.config.activation_checkpointing and torch.is_grad_enabled()
        for block in self.h:
            if recompute:
                x = checkpoint(block, x, masks[block.window], use_reentrant=False)
            else:
                x = block(x, masks[block.window])
        return x

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        doc_ids: Tensor | None = None,
        modality: Tensor | None = None,
        target: Tensor | None = None,
        prefix: Tensor | None = None,
        target_positions: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """With `target`: (loss, stats) of `ds_train.loss.modality_loss`; without: hidden states (B, T, d).

        All arguments are (B, T): input_ids int64, position_ids int64, doc_ids int (padding -1),
        modality bool (True = code), target bool, prefix bool; `target_positions` (N,) int64, optional:
        `ds_train.loss.target_positions(target, doc_ids)` computed on the CPU copy of the batch, which
        spares the GPU a host sync.
        """
        hidden = self.hidden_states(input_ids, position_ids, doc_ids, modality, prefix)
        if target is None:
            return hidden
        if modality is None:
            modality = torch.zeros_like(input_ids, dtype=torch.bool)
        return modality_loss(
            hidden,
            self.wte.weight,
            input_ids,
            target,
            modality,
            self.separated,
            vocab_size=self.config.vocab_size,
            chunk_size=self.config.loss_chunk_size,
            doc_ids=doc_ids,
            positions=target_positions,
        )

    def logits(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        doc_ids: Tensor | None = None,
        modality: Tensor | None = None,
        prefix: Tensor | None = None,
        code_view: bool | Tensor = False,
    ) -> Tensor:
        """V-way next-token logits at every position, (B, T, V), fp32 (float64 for a float64 model).

        `code_view` (bool, or (B, T) bool per position) picks the view of the *predicted* token: the
        code view puts h . C[slot(s)] in the column of each separated s. For evaluation and generation
        on small inputs: it materialises B x T x V.
        """
        hidden = self.hidden_states(input_ids, position_ids, doc_ids, modality, prefix)
        B, T, d = hidden.shape
        operands = operand_dtype(self.wte.weight)
        is_code = torch.as_tensor(code_view, device=hidden.device).bool().expand(B, T)
        logits = view_logits(
            hidden.reshape(B * T, d).to(operands),  # (B*T, d)
            self.wte.weight.to(operands),
            self.config.vocab_size,
            is_code.reshape(B * T),
            self.separated,
        )  # (B*T, V)
        return logits.view(B, T, -1)  # (B, T, V)

    def num_params(self) -> int:
        """N: every parameter, the tied token table ([E; C]) and the position table included."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (DESIGN.md §8): 6 N + 12 L d T."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.d_model * seq_len

    def compile_blocks(self, whole: bool = True, cuda_graphs: bool = False) -> None:
        """The GPU fast path: torch.compile the blocks (parameter names do not change).

        `whole`: the block stack as one graph (one launch of compiled code per pass, which matters at
        this size: the step is bound by host work); else each block on its own. `cuda_graphs`: the
        stack's forward and backward replayed as CUDA graphs (torch.compile's "reduce-overhead" mode:
        one launch for all of a pass's kernels; its inputs are copied into static buffers first). Off in
        training: under DeepSpeed's engine it made the step slower (BENCHMARKS.md); kept for measuring.
        """
        mode = "reduce-overhead" if cuda_graphs else None
        if whole:
            self._run_blocks = torch.compile(self._blocks, dynamic=False, mode=mode)
        else:
            for block in self.h:
                block.compile(dynamic=False, mode=mode)
