"""The project's model + fused loss against the original MRPT method, written plainly here in float64.

The reference is the method as first implemented: the vocabulary extended with |S| duplicated rows,
code tokens of S remapped to their duplicate ids, full logits over V + |S| columns with the forbidden
columns set to -inf per modality, per-token cross-entropy, mean over targets; each document run alone
(unpacked) through a plain GPT-Neo forward with a dense mask. The project runs the same documents
packed into rows. Loss and every parameter's gradient must agree to 1e-10 relative, for all twelve
objective x separation configurations (DESIGN.md §4).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from ds_train.model import GPTNeo, GPTNeoConfig

V = 40
PAD, MASK, NEW_LINE, INDENT, DEDENT, BOT, COMMENTS, PYTHON, EOT = range(9)
REGULAR = list(range(9, V))  # every non-special token
OBJECTIVES = ("text_code_clm", "code_clm", "corrupt_code_clm", "prefix_code_clm")
SEPARATIONS = ("none", "partial", "full")
ROW_LEN = 40
WINDOW = 4


@dataclass
class Doc:
    """One encoded (docstring, code) pair: parallel lists, as the data layer produces them."""

    ids: list[int]
    modality: list[bool]
    target: list[bool]
    prefix: list[bool]


def make_doc(rng: random.Random, objective: str) -> Doc:
    """<bot> SIGNATURE <comments> DOCSTRING <python> BODY <eot>, random lengths, flags per DESIGN.md §4."""
    signature = [rng.choice(REGULAR) for _ in range(rng.randint(1, 4))]
    docstring = [rng.choice(REGULAR) for _ in range(rng.randint(2, 8))]
    body = [rng.choice(REGULAR + [NEW_LINE, INDENT, DEDENT]) for _ in range(rng.randint(2, 10))]
    if objective == "corrupt_code_clm":
        n_corrupt = max(1, round(0.15 * len(docstring)))
        for i in rng.sample(range(len(docstring)), n_corrupt):
            docstring[i] = MASK if rng.random() < 0.8 else rng.choice(REGULAR)
    parts = [  # (tokens, modality, is body-or-eot, in prefix)
        ([BOT], False, False, True),
        (signature, True, False, True),
        ([COMMENTS], False, False, True),
        (docstring, False, False, True),
        ([PYTHON], False, False, True),
        (body, True, True, False),
        ([EOT], True, True, False),
    ]
    doc = Doc([], [], [], [])
    for tokens, code, body_part, in_prefix in parts:
        doc.ids += tokens
        doc.modality += [code] * len(tokens)
        doc.target += [body_part or objective == "text_code_clm"] * len(tokens)
        doc.prefix += [in_prefix and objective == "prefix_code_clm"] * len(tokens)
    doc.target[0] = False
    return doc


def separated_set(rng: random.Random, separation: str) -> tuple[int, ...]:
    """S for a separation mode: empty, a random subset of the non-special tokens, or all of them."""
    if separation == "none":
        return ()
    if separation == "partial":
        return tuple(sorted(rng.sample(REGULAR, len(REGULAR) // 3)))
    return tuple(REGULAR)


def pack(docs: list[Doc]) -> dict[str, torch.Tensor]:
    """Greedy packing into rows of ROW_LEN (ARCHITECTURE.md "A packed batch"); padding: pad id, doc -1."""
    rows: list[list[Doc]] = [[]]
    for doc in docs:
        if sum(len(d.ids) for d in rows[-1]) + len(doc.ids) > ROW_LEN:
            rows.append([])
        rows[-1].append(doc)
    B = len(rows)
    batch = {
        "input_ids": torch.full((B, ROW_LEN), PAD),
        "position_ids": torch.zeros(B, ROW_LEN, dtype=torch.long),
        "doc_ids": torch.full((B, ROW_LEN), -1, dtype=torch.int32),
        "modality": torch.zeros(B, ROW_LEN, dtype=torch.bool),
        "target": torch.zeros(B, ROW_LEN, dtype=torch.bool),
        "prefix": torch.zeros(B, ROW_LEN, dtype=torch.bool),
    }
    for b, row in enumerate(rows):
        start = 0
        for doc_index, doc in enumerate(row):
            span = slice(start, start + len(doc.ids))
            batch["input_ids"][b, span] = torch.tensor(doc.ids)
            batch["position_ids"][b, span] = torch.arange(len(doc.ids))
            batch["doc_ids"][b, span] = doc_index
            batch["modality"][b, span] = torch.tensor(doc.modality)
            batch["target"][b, span] = torch.tensor(doc.target)
            batch["prefix"][b, span] = torch.tensor(doc.prefix)
            start += len(doc.ids)
    return batch


# ---------------------------------------------------------------------------------------------------
# The reference: a plain float64 GPT-Neo and the original extended-vocabulary loss
# ---------------------------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def reference_hidden(
    params: dict, config: GPTNeoConfig, ids: torch.Tensor, prefix: torch.Tensor
) -> torch.Tensor:
    """One document alone: (n,) extended ids -> (n, d) final hidden states, dense masks, no packing."""
    n, nh, hs = len(ids), config.n_head, config.head_dim
    t = torch.arange(n)[:, None]
    s = torch.arange(n)[None, :]
    causal_or_prefix = (s <= t) | (prefix[:, None] & prefix[None, :])
    x = params["wte.weight"][ids] + params["wpe.weight"][:n]
    for i, kind in enumerate(config.attention_types):
        p = {k.removeprefix(f"h.{i}."): v for k, v in params.items() if k.startswith(f"h.{i}.")}
        allowed = (
            causal_or_prefix & ((t - s).abs() < config.window_size) if kind == "local" else causal_or_prefix
        )
        a = layer_norm(x, p["ln_1.weight"], p["ln_1.bias"], config.layer_norm_eps)
        q = (a @ p["attn.q_proj.weight"].T).view(n, nh, hs).transpose(0, 1)
        k = (a @ p["attn.k_proj.weight"].T).view(n, nh, hs).transpose(0, 1)
        v = (a @ p["attn.v_proj.weight"].T).view(n, nh, hs).transpose(0, 1)
        scores = (q @ k.transpose(1, 2)).masked_fill(~allowed, float("-inf"))  # no 1/sqrt(hs)
        y = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(n, nh * hs)
        x = x + y @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
        m = layer_norm(x, p["ln_2.weight"], p["ln_2.bias"], config.layer_norm_eps)
        m = gelu_tanh(m @ p["mlp.c_fc.weight"].T + p["mlp.c_fc.bias"])
        x = x + m @ p["mlp.c_proj.weight"].T + p["mlp.c_proj.bias"]
    return layer_norm(x, params["ln_f.weight"], params["ln_f.bias"], config.layer_norm_eps)


def reference_token_losses(params: dict, config: GPTNeoConfig, doc: Doc) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target -log p of one document by the original method; returns (losses, is_code) over targets."""
    S = list(config.separated_ids)
    extended = [V + S.index(x) if code and x in S else x for x, code in zip(doc.ids, doc.modality)]
    ids = torch.tensor(extended)
    h = reference_hidden(params, config, ids, torch.tensor(doc.prefix))
    logits = h @ params["wte.weight"].T  # (n, V + |S|): both copies, as the original did
    forbid_in_code = torch.zeros(V + len(S), dtype=torch.bool)
    forbid_in_code[S] = True
    forbid_in_text = torch.zeros(V + len(S), dtype=torch.bool)
    forbid_in_text[V:] = True
    losses, is_code = [], []
    for t in range(1, len(ids)):
        if not doc.target[t]:
            continue
        forbidden = forbid_in_code if doc.modality[t] else forbid_in_text
        row = logits[t - 1].masked_fill(forbidden, float("-inf"))
        losses.append(-torch.log_softmax(row, dim=-1)[ids[t]])
        is_code.append(doc.modality[t])
    return torch.stack(losses), torch.tensor(is_code)


# ---------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------


def random_model(separated_ids: tuple[int, ...], seed: int, **overrides) -> GPTNeo:
    """A float64 model whose weights are all random and O(1), so that every path matters."""
    config = GPTNeoConfig(
        vocab_size=V,
        n_positions=64,
        d_model=16,
        n_layer=2,
        n_head=2,
        window_size=WINDOW,
        separated_ids=separated_ids,
        pad_token_id=PAD,
        loss_chunk_size=7,
        **overrides,
    )
    torch.manual_seed(seed)
    model = GPTNeo(config).double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight" else 0.0
            param.copy_(base + 0.3 * torch.randn_like(param))
    return model


def assert_rel_close(
    actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-10, what: str = ""
) -> None:
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * max(scale, 1e-300), f"{what}: max error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("separation", SEPARATIONS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_packed_loss_and_grads_match_original_method(objective: str, separation: str) -> None:
    seed = OBJECTIVES.index(objective) * 10 + SEPARATIONS.index(separation)
    rng = random.Random(seed)
    S = separated_set(rng, separation)
    docs = [make_doc(rng, objective) for _ in range(6)]
    model = random_model(S, seed)
    batch = pack(docs)
    assert batch["input_ids"].shape[0] >= 2 and (batch["doc_ids"] == 1).any(), (
        "rows must hold several documents"
    )

    loss, stats = model(**batch)
    loss.backward()

    params = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    per_doc = [reference_token_losses(params, model.config, doc) for doc in docs]
    token_losses = torch.cat([losses for losses, _ in per_doc])
    is_code = torch.cat([code for _, code in per_doc])
    ref_loss = token_losses.sum() / len(token_losses)
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()))

    assert_rel_close(loss.detach(), ref_loss.detach(), what="loss")
    for (name, param), ref_grad in zip(model.named_parameters(), ref_grads):
        assert_rel_close(param.grad, ref_grad, what=f"grad of {name}")
    ref_stats = torch.tensor(
        [
            token_losses[is_code].sum().item(),
            is_code.sum().item(),
            token_losses[~is_code].sum().item(),
            (~is_code).sum().item(),
        ],
        dtype=torch.float64,
    )
    assert stats.dtype == torch.float32
    torch.testing.assert_close(stats.double(), ref_stats, rtol=1e-6, atol=1e-6)
    if separation != "none":
        assert model.wte.weight.grad[V:].abs().sum() > 0, "code rows must be trained"


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gpu_path_row_kernels_and_cpu_positions_match_original_method(objective: str, monkeypatch) -> None:
    """The loss as the GPU step runs it: fused row kernels (`_fused_logsumexp`, `_fused_softmax_grad`,
    compiled there, run eagerly here) and target positions worked out beforehand on the CPU."""
    from ds_train import loss as loss_module

    monkeypatch.setattr(loss_module, "_row_ops",
                        lambda logits, fused: (loss_module._fused_logsumexp, loss_module._fused_softmax_grad))
    seed = 100 + OBJECTIVES.index(objective)
    rng = random.Random(seed)
    S = separated_set(rng, "partial")
    docs = [make_doc(rng, objective) for _ in range(6)]
    model = random_model(S, seed)  # chunks of 7 rows: several, a ragged last one
    batch = pack(docs)
    positions = loss_module.target_positions(batch["target"], batch["doc_ids"])

    loss, _ = model(**batch, target_positions=positions)
    loss.backward()

    params = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    token_losses = torch.cat([reference_token_losses(params, model.config, doc)[0] for doc in docs])
    assert len(positions) == len(token_losses)
    ref_loss = token_losses.sum() / len(token_losses)
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()))
    assert_rel_close(loss.detach(), ref_loss.detach(), what="loss")
    for (name, param), ref_grad in zip(model.named_parameters(), ref_grads):
        assert_rel_close(param.grad, ref_grad, what=f"grad of {name}")


def test_separated_rows_differ_from_text_rows() -> None:
    """Guard on the fixture: C must not equal E[S], or the code view could not be told apart."""
    model = random_model(tuple(REGULAR[:5]), seed=1)
    table = model.wte.weight.detach()
    assert (table[V:] - table[REGULAR[:5]]).abs().min() > 0
