"""Remote code of an export: `AutoModelForCausalLM` / `AutoTokenizer` with `trust_remote_code=True`.

`ds_train.hf.write_hf_dir` copies this file into every export as `modeling_mrpt.py` (with
`ds_train/data/codec.py` beside it as `mrpt_codec.py`) and registers its classes in `auto_map`, so
the directory generates code as it was trained without ds_train installed:

- `MRPTTokenizer` turns a Python prompt (a signature with its docstring) into the training layout
  `<bot> SIGNATURE <comments> DOCSTRING <python>` (the signature linearized, both parts tokenized
  apart, as `ds_train.data.encode.encode_prompt` does), knows `<eot>` as its end token, and decodes
  to Python source (`delinearize`);
- `MRPTForCausalLM` (a GPTNeoForCausalLM) reads the modality of each token from the layout (the
  signature and everything after `<python>` up to `<eot>` are code), feeds separated code tokens
  through their code rows V + i, returns V columns with the code view where the next token is
  code, and, for a Prefix Code CLM model, lets the prompt `<bot>` ... `<python>` attend
  bidirectionally when it is first read (its cached keys and values are then those of training).

Everything it needs lives in config.json's `mrpt` entry (the fields of modality_map.json and the
special token ids). This file imports nothing from ds_train.
"""

from __future__ import annotations

import ast
import contextlib

import torch
import torch.nn.functional as F
from transformers import BatchEncoding, GPTNeoForCausalLM

try:  # the export's copy of the codec; inside ds_train, the codec itself
    from .mrpt_codec import (
        BOT,
        COMMENTS,
        DOC_INDENT,
        EOT,
        PAD,
        PYTHON,
        delinearize,
        linearize,
        render_docstring,
        split_signature,
    )
except ImportError:
    from ds_train.data.codec import (
        BOT,
        COMMENTS,
        DOC_INDENT,
        EOT,
        PAD,
        PYTHON,
        delinearize,
        linearize,
        render_docstring,
        split_signature,
    )

try:
    from transformers import TokenizersBackend as _FastTokenizer
except ImportError:  # transformers < 5
    from transformers import PreTrainedTokenizerFast as _FastTokenizer

_PROBE = "__mrpt_probe__"


# ----------------------------------------------------------------------------------------------------
# The modality of each token, read from the layout
# ----------------------------------------------------------------------------------------------------


def layout_flags(input_ids: torch.Tensor, special: dict[str, int]) -> tuple[torch.Tensor, ...]:
    """(modality, code_next, prefix), each (B, T) bool, for token rows in the training layout.

    modality: the token is code (signature, body, `<eot>`); code_next: the token after it is code
    (the view its logits take); prefix: the token lies in `<bot>` ... the first `<python>`.
    """
    B, T = input_ids.shape
    device = input_ids.device
    opens = (input_ids == special[BOT]) | (input_ids == special[PYTHON])
    closes = (input_ids == special[COMMENTS]) | (input_ids == special[EOT])
    pos = torch.arange(T, device=device).expand(B, T)
    last_marker = torch.where(opens | closes, pos, -1).cummax(dim=1).values  # (B, T)
    code_after = torch.gather(opens, 1, last_marker.clamp(min=0)) & (last_marker >= 0)  # state after t
    code_before = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=device), code_after[:, :-1]], 1)
    modality = (code_before & ~opens & ~closes) | (input_ids == special[EOT])
    seen_bot = (input_ids == special[BOT]).cumsum(1) > 0
    python_before = (input_ids == special[PYTHON]).cumsum(1) - (input_ids == special[PYTHON]).long()
    prefix = seen_bot & (python_before == 0)
    return modality, code_after, prefix


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


class MRPTForCausalLM(GPTNeoForCausalLM):
    """GPT-Neo over [E; C] with routing, the code view and (Prefix Code CLM) the bidirectional prompt."""

    def __init__(self, config):
        super().__init__(config)
        mrpt = config.mrpt
        self.base_vocab_size = int(mrpt["base_vocab_size"])
        self.separated_ids = [int(i) for i in mrpt["separated_ids"]]
        self.prefix_lm = bool(mrpt["prefix_lm"])
        self.special = {k: int(v) for k, v in mrpt["special_ids"].items()}

    def route(self, input_ids: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """Rows of [E; C]: V + i for a code token separated_ids[i], else the id itself."""
        if not self.separated_ids:
            return input_ids
        table = torch.arange(self.base_vocab_size, device=input_ids.device)
        sep = torch.tensor(self.separated_ids, device=input_ids.device)
        table[sep] = self.base_vocab_size + torch.arange(len(sep), device=input_ids.device)
        return torch.where(modality, table[input_ids.clamp(max=self.base_vocab_size - 1)], input_ids)

    def code_view(self, logits: torch.Tensor, code_next: torch.Tensor) -> torch.Tensor:
        """(B, T, V + |S|) -> (B, T, V): where the next token is code, separated columns read C."""
        V = self.base_vocab_size
        out = logits[..., :V].clone()
        if self.separated_ids:
            sep = torch.tensor(self.separated_ids, device=logits.device)
            code = code_next[..., None].expand(*code_next.shape, len(sep))
            out[..., sep] = torch.where(code, logits[..., V:], out[..., sep])
        return out

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        modality, code_next, prefix = layout_flags(input_ids, self.special)
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if inputs.get("input_ids") is None:
            return inputs
        n = inputs["input_ids"].shape[1]
        inputs["input_ids"] = self.route(inputs["input_ids"], modality[:, -n:])
        inputs["code_next"] = code_next[:, -n:]
        inputs["prefix"] = prefix[:, -n:] if n == input_ids.shape[1] else None  # only the first read
        inputs["routed"] = True
        return inputs

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        code_next=None,
        prefix=None,
        routed=False,
        **kwargs,
    ):
        """Base tokenizer ids in the training layout (a whole sequence), or, from `generate`, routed
        ids with their flags (`position_ids` is named so that `generate` counts positions from the
        first real token of a left-padded row). Logits have V columns; `labels` (base ids, -100
        ignored) give the loss."""
        if input_ids is not None and not routed:
            modality, code_next, prefix = layout_flags(input_ids, self.special)
            input_ids = self.route(input_ids, modality)
        bidirectional = self.prefix_lm and prefix is not None and bool(prefix.any())
        if bidirectional:
            mask = padding_mask(input_ids, attention_mask, self.dtype)
            with prefix_attention(self, prefix, attention_mask):
                out = super().forward(
                    input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs
                )
        else:
            out = super().forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
            )
        if code_next is not None:
            out.logits = self.code_view(out.logits, code_next[:, -out.logits.shape[1] :])
        else:
            out.logits = out.logits[..., : self.base_vocab_size]
        if labels is not None:
            shifted = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
            out.loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
        return out


def padding_mask(input_ids: torch.Tensor, attention_mask, dtype: torch.dtype) -> torch.Tensor:
    """An additive (B, 1, T, T) mask that only hides padding keys (each token still sees itself)."""
    B, T = input_ids.shape
    keep = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
    if attention_mask is not None:
        keep = attention_mask.bool()
    allowed = keep[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=input_ids.device)
    return torch.zeros(B, 1, T, T, device=input_ids.device, dtype=dtype).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


@contextlib.contextmanager
def prefix_attention(model: GPTNeoForCausalLM, prefix: torch.Tensor, attention_mask):
    """While a prompt is first read: token t sees s if s <= t, or both lie in the prefix; local
    layers keep their window. GPT-Neo applies its causal pattern from each attention's `bias`
    buffer, so the buffers are swapped for these per-row patterns and restored after."""
    T = prefix.shape[1]
    pos = torch.arange(T, device=prefix.device)
    pre = prefix.bool()
    if attention_mask is not None:
        pre = pre & attention_mask.bool()
    visible = (pos[None, :, None] >= pos[None, None, :]) | (pre[:, :, None] & pre[:, None, :])  # (B, T, T)
    near = (pos[:, None] - pos[None, :]).abs() < model.config.window_size
    saved = []
    try:
        for block in model.transformer.h:
            attn = block.attn.attention
            saved.append((attn, attn.bias))
            attn.bias = (visible & near if attn.attention_type == "local" else visible)[:, None]
        yield
    finally:
        for attn, bias in saved:
            attn.bias = bias


# ----------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------


def split_prompt(source: str) -> tuple[str, str]:
    """(linearized preamble + signature, docstring) of a Python prompt ending in a function header
    with its docstring (the last top-level function is the one to complete)."""
    text = source if source.endswith("\n") else source + "\n"
    try:
        tree = ast.parse(text)
    except SyntaxError:
        text += f"{DOC_INDENT}pass\n"
        tree = ast.parse(text)
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not functions:
        raise ValueError("the prompt defines no top-level function")
    node = functions[-1]
    lines = text.splitlines(keepends=True)
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    first = node.body[0]
    has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
    has_doc = has_doc and isinstance(first.value.value, str)
    header_end = first.lineno - 1 if has_doc else len(lines)
    preamble, header = "".join(lines[:start]), "".join(lines[start:header_end])
    docstring = (ast.get_docstring(node) or "") if has_doc else ""
    header_lin, _ = split_signature(linearize(header.rstrip() + f"\n{DOC_INDENT}pass\n"))
    preamble_lin = linearize(preamble) if preamble.strip() else ""
    return f"{preamble_lin} {header_lin}".strip(), docstring


def _header_lines(signature_lin: str) -> int:
    probe = delinearize(f"{signature_lin} <NEW_LINE> <INDENT> {_PROBE} <NEW_LINE>").splitlines()
    return next(i for i, line in enumerate(probe) if _PROBE in line)


class MRPTTokenizer(_FastTokenizer):
    """The export's tokenizer: Python prompts in, Python source out (see the module docstring)."""

    # no __init__ of its own: `transformers` then loads tokenizer.json as it is

    @property
    def mrpt_base_vocab_size(self) -> int | None:
        """V, from tokenizer_config.json (ids from V on are code rows)."""
        return self.init_kwargs.get("mrpt_base_vocab_size")

    @property
    def mrpt_separated_ids(self) -> list[int]:
        return list(self.init_kwargs.get("mrpt_separated_ids") or ())

    def prompt_ids(self, source: str) -> list[int]:
        """`<bot> SIGNATURE <comments> DOCSTRING <python>` of a Python prompt; a prompt already in the
        layout (it holds `<bot>`) is tokenized as it is."""
        if BOT in source:
            return super().__call__(source, add_special_tokens=False)["input_ids"]
        signature, docstring = split_prompt(source)
        sig, doc = super().__call__([signature, render_docstring(docstring)], add_special_tokens=False)[
            "input_ids"
        ]
        ids = self.convert_tokens_to_ids([BOT, COMMENTS, PYTHON])
        return [ids[0], *sig, ids[1], *doc, ids[2]]

    def __call__(self, text=None, *args, return_tensors=None, **kwargs):
        if text is None or args or kwargs.get("text_pair") is not None:
            return super().__call__(text, *args, return_tensors=return_tensors, **kwargs)
        rows = [self.prompt_ids(t) for t in ([text] if isinstance(text, str) else text)]
        width = max(len(r) for r in rows)
        pad = self.convert_tokens_to_ids(PAD)
        left = self.padding_side == "left"
        fill = [[pad] * (width - len(r)) for r in rows]
        ones = [[0] * (width - len(r)) for r in rows]
        ids = [f + r if left else r + f for f, r in zip(fill, rows)]
        mask = [z + [1] * len(r) if left else [1] * len(r) + z for z, r in zip(ones, rows)]
        if isinstance(text, str) and return_tensors is None:
            ids, mask = ids[0], mask[0]
        return BatchEncoding({"input_ids": ids, "attention_mask": mask}, tensor_type=return_tensors)

    def encode(self, text, *args, **kwargs):
        return self(text)["input_ids"]

    def decode(self, token_ids, skip_special_tokens=False, **kwargs):
        """Python source: the prompt's function header and docstring (when the ids hold them) and
        the generated code up to `<eot>`, delinearized."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        V = self.mrpt_base_vocab_size
        if V is not None:
            token_ids = [self.mrpt_separated_ids[i - V] if i >= V else i for i in token_ids]
        text = super().decode(token_ids, skip_special_tokens=False)
        text = text.split(EOT)[0].replace(PAD, " ")
        head = ""
        if PYTHON in text:
            prompt, text = text.split(PYTHON, 1)
            head = self._prompt_source(prompt)
            signature = prompt.split(BOT)[-1].split(COMMENTS)[0]
        else:
            signature = "def _ ( ) :"
        if not text.split():
            return head
        if text.split()[0] != "<NEW_LINE>":
            return head + delinearize(text)
        lines = delinearize(f"{signature} {text}").splitlines(keepends=True)
        return head + "".join(lines[_header_lines(signature) :])

    def _prompt_source(self, prompt: str) -> str:
        signature, _, doc = prompt.split(BOT)[-1].partition(COMMENTS)
        lines = delinearize(f"{signature} <NEW_LINE> <INDENT> {_PROBE} <NEW_LINE>").splitlines(keepends=True)
        header = "".join(line for line in lines if _PROBE not in line)
        doc = doc.strip("\n")
        return header + (doc.rstrip() + "\n" if doc.strip() else "")
