"""Routing, activation checkpointing, the FlexAttention path on the CPU, precision, config and flavors."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from ds_train.attention import Regrouped, attend, block_mask, build_masks, dense_mask, make_mask_mod
from ds_train.loss import chunks, modality_loss
from ds_train.model import FLAVORS, GPTNeo, GPTNeoConfig

V = 30
S = (10, 11, 12, 13)
PAD = 0


def tiny_model(dtype: torch.dtype = torch.float64, **overrides) -> GPTNeo:
    config = GPTNeoConfig(
        vocab_size=V,
        n_positions=64,
        d_model=16,
        n_layer=2,
        n_head=2,
        window_size=3,
        separated_ids=S,
        pad_token_id=PAD,
        loss_chunk_size=4,
        **overrides,
    )
    torch.manual_seed(0)
    model = GPTNeo(config).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def packed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows, three documents each (positions restart), a prefix in some documents, trailing padding."""
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 24
    doc_ids = torch.tensor([[0] * 9 + [1] * 7 + [2] * 5 + [-1] * 3, [0] * 4 + [1] * 12 + [2] * 8])
    position_ids = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for d in doc_ids[b].unique():
            where = doc_ids[b] == d
            position_ids[b, where] = torch.arange(int(where.sum()))
    input_ids = torch.randint(1, V, (B, T), generator=g)
    input_ids[doc_ids == -1] = PAD
    modality = (torch.rand(B, T, generator=g) < 0.5) & (doc_ids >= 0)
    target = (position_ids > 0) & (doc_ids >= 0)
    prefix = (position_ids < 3) & (doc_ids == 1)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "doc_ids": doc_ids.int(),
        "modality": modality,
        "target": target,
        "prefix": prefix,
    }


# ---------------------------------------------------------------------------------------------------
# Routing: which rows of [E; C] receive gradient
# ---------------------------------------------------------------------------------------------------


def test_input_routing_sends_code_tokens_of_S_to_C_rows_only() -> None:
    model = tiny_model()
    input_ids = torch.tensor([[10, 11, 5, 12, 5, 20]])
    modality = torch.tensor([[True, False, True, True, False, True]])
    model(input_ids, modality=modality).sum().backward()  # hidden states only: no head, input side alone
    grad_rows = model.wte.weight.grad.abs().sum(-1) > 0
    used = {V + 0, 11, 5, V + 2, 20}  # 10 as code -> C[0]; 11 as text -> E[11]; 12 as code -> C[2]
    assert set(torch.nonzero(grad_rows).flatten().tolist()) == used
    assert torch.equal(model.route[:V][list(S)], torch.arange(V, V + len(S)))


def test_text_targets_never_touch_C_and_code_targets_never_touch_E_rows_of_S() -> None:
    model = tiny_model()
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])  # no token of S in the input
    modality = torch.zeros_like(input_ids, dtype=torch.bool)

    only_text = torch.tensor([[False, True, True, True, True, True, True, True]])
    loss, _ = model(input_ids, modality=modality, target=only_text)
    loss.backward()
    assert torch.equal(model.wte.weight.grad[V:], torch.zeros(len(S), 16, dtype=torch.float64))
    assert (model.wte.weight.grad[list(S)].abs().sum(-1) > 0).all(), "text view trains E rows of S"

    model.zero_grad()
    code_modality = only_text.clone()  # targets are code tokens (inputs 2..8 are not in S either way)
    loss, _ = model(input_ids, modality=code_modality, target=only_text)
    loss.backward()
    assert torch.equal(model.wte.weight.grad[list(S)], torch.zeros(len(S), 16, dtype=torch.float64))
    assert (model.wte.weight.grad[V:].abs().sum(-1) > 0).all(), "code view trains the C rows"


def test_zero_targets_give_zero_loss_with_a_graph() -> None:
    model = tiny_model()
    batch = packed_batch()
    batch["target"][:] = False
    loss, stats = model(**batch)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(stats, torch.zeros(4))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_integer_flags_act_like_bool_flags() -> None:
    model = tiny_model()
    batch = packed_batch()
    as_ints = {k: v.long() if v.dtype == torch.bool else v for k, v in batch.items()}
    loss_bool, stats_bool = model(**batch)
    loss_int, stats_int = model(**as_ints)
    assert torch.equal(loss_bool, loss_int) and torch.equal(stats_bool, stats_int)


def test_targets_across_document_boundaries_are_not_counted() -> None:
    model = tiny_model()
    batch = packed_batch()
    boundary = torch.zeros_like(batch["target"])
    boundary[0, 9] = True  # first token of document 1: its predecessor is in document 0
    with_boundary = dict(batch, target=batch["target"] | boundary)
    loss_a, stats_a = model(**batch)
    loss_b, stats_b = model(**with_boundary)
    assert torch.equal(loss_a, loss_b) and torch.equal(stats_a, stats_b)


# ---------------------------------------------------------------------------------------------------
# Activation checkpointing and the FlexAttention path
# ---------------------------------------------------------------------------------------------------


def test_activation_checkpointing_gives_identical_loss_and_grads() -> None:
    plain, recomputed = tiny_model(), tiny_model(activation_checkpointing=True)
    batch = packed_batch()
    results = []
    for model in (plain, recomputed):
        loss, stats = model(**batch)
        loss.backward()
        results.append((loss.detach(), stats, {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(stats_a, stats_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("window", [None, 3])
def test_flex_mask_mod_equals_dense_reference(window: int | None) -> None:
    batch = packed_batch()
    doc_ids, prefix = batch["doc_ids"], batch["prefix"]
    B, T = doc_ids.shape
    expected = dense_mask(doc_ids, prefix, window)  # (B, 1, T, T)
    from_mod = create_mask(make_mask_mod(doc_ids, prefix, window), B, None, T, T, device="cpu")
    assert torch.equal(from_mod, expected)
    # And by hand, for one query: row 0, t = 10 (document 1, position 1, inside its prefix).
    allowed = {s for s in range(9, 16) if s <= 10 or (prefix[0, s] and s < 12)}
    if window is not None:
        allowed = {s for s in allowed if abs(10 - s) < window}
    assert set(torch.nonzero(expected[0, 0, 10]).flatten().tolist()) == allowed


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_on_cpu_matches_sdpa_reference() -> None:
    batch = packed_batch()
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 24, 16) for _ in range(3))  # (B, nh, T, hs)
    for window in (None, 3):
        dense = dense_mask(batch["doc_ids"], batch["prefix"], window)
        blocks = block_mask(batch["doc_ids"], batch["prefix"], window, block_size=8)
        torch.testing.assert_close(attend(q, k, v, blocks), attend(q, k, v, dense), rtol=0, atol=1e-5)


def block_table(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A BlockMask's (B, 1, n) counts and (B, 1, n, n) ordered indices as a (B, n, n) boolean table."""
    B, _, n = counts.shape
    table = torch.zeros(B, n, n, dtype=torch.bool)
    for b in range(B):
        for i in range(n):
            table[b, i, indices[b, 0, i, : counts[b, 0, i]].long()] = True
    return table


def stream_layout(seed: int, B: int, T: int, shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    """doc ids and prefix flags: `stream` (documents back to back, padding at the tail), `scattered`
    (ids drawn at random per token: documents that are not contiguous), both with random prefixes."""
    g = torch.Generator().manual_seed(seed)
    if shape == "scattered":
        doc_ids = torch.randint(-1, 4, (B, T), generator=g)
    else:
        doc_ids = torch.full((B, T), -1)
        for b in range(B):
            t, d = 0, 0
            while True:
                n = int(torch.randint(1, 40, (1,), generator=g))
                if t + n > T - int(torch.randint(0, 6, (1,), generator=g)):
                    break
                doc_ids[b, t : t + n], t, d = d, t + n, d + 1
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run_position = torch.zeros_like(doc_ids)
    for b in range(B):
        for t in range(1, T):
            run_position[b, t] = 0 if starts[b, t] else run_position[b, t - 1] + 1
    prefix = (run_position < torch.randint(0, 12, (B, T), generator=g)) & (doc_ids >= 0)
    return doc_ids.int(), prefix


@pytest.mark.parametrize("shape", ["stream", "scattered"])
@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("window", [None, 3, 8, 21])
def test_block_tables_from_document_extents_apply_exactly_the_dense_rule(shape, with_prefix, window) -> None:
    """What the kernel applies (full blocks whole, `mask_mod` inside partial blocks, nothing elsewhere)
    is the dense reference rule, position for position; for contiguous documents without a prefix the
    blocks visited are exactly those where the rule allows something."""
    for seed in range(3):
        doc_ids, prefix = stream_layout(seed, 2, 96, shape)
        prefix = prefix if with_prefix else None
        for size in (4, 8):
            mask = block_mask(doc_ids, prefix, window, block_size=size)
            partial = block_table(mask.kv_num_blocks, mask.kv_indices)
            full = block_table(mask.full_kv_num_blocks, mask.full_kv_indices)
            assert not (partial & full).any()
            rule = dense_mask(doc_ids, prefix, window)[:, 0]  # (B, T, T)

            def spread(table: torch.Tensor) -> torch.Tensor:
                return table.repeat_interleave(size, 1).repeat_interleave(size, 2)  # noqa: B023

            assert torch.equal(spread(full) | (spread(partial) & rule), rule)
            if shape == "stream" and prefix is None:
                touched = rule.reshape(2, 96 // size, size, 96 // size, size).any(4).any(2)
                assert torch.equal(partial | full, touched)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_model_forward_with_flex_backend_matches_sdpa_backend() -> None:
    batch = packed_batch()
    sdpa, flex = tiny_model(torch.float32), tiny_model(torch.float32, attention_backend="flex")
    with torch.no_grad():  # flex_attention has no CPU backward; the forward is what we can check here
        hidden = {
            b: m(**{k: v for k, v in batch.items() if k != "target"}) for b, m in (("s", sdpa), ("f", flex))
        }
    torch.testing.assert_close(hidden["f"], hidden["s"], rtol=0, atol=1e-5)
    assert set(build_masks(batch["doc_ids"], None, [None, 3], "flex")) == {None, 3}


# ---------------------------------------------------------------------------------------------------
# Precision of the fused loss
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 6, 7, 8, 9, 14, 15, 22])
def test_loss_chunks_cover_every_row_once_and_hold_one_row_only_when_there_is_one(n: int) -> None:
    parts = chunks(n, 7)
    assert [i for part in parts for i in range(n)[part]] == list(range(n))
    assert all(part.stop - part.start <= 8 for part in parts)
    assert n == 1 or all(part.stop - part.start >= 2 for part in parts)


def test_a_last_chunk_of_one_row_gives_the_loss_and_gradients_of_one_chunk() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(1, 10, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V + len(S), 16, dtype=torch.float64, requires_grad=True)
    input_ids = torch.randint(1, V, (1, 10))
    input_ids[0, 3:7] = torch.tensor(S)  # separated tokens among the targets
    modality = torch.tensor([[False, True, True, False, True, True, False, True, False, True]])
    target = torch.ones(1, 10, dtype=torch.bool)  # 9 counted targets: chunks of 4 would leave one row
    results = []
    for size in (4, 100):
        loss, _ = modality_loss(hidden, weight, input_ids, target, modality, torch.tensor(S), vocab_size=V,
                                chunk_size=size)
        results.append((loss.detach(), *torch.autograd.grad(loss, (hidden, weight))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_loss_on_bf16_inputs_accumulates_in_fp32() -> None:
    """bf16 hidden states and table: the loss must equal the float64 formula on the same bf16 values."""
    torch.manual_seed(2)
    N, d = 12, 32
    hidden = torch.randn(1, N, d).bfloat16().requires_grad_(True)
    weight = torch.randn(V + len(S), d).bfloat16().requires_grad_(True)
    input_ids = torch.randint(0, V, (1, N))
    modality = torch.rand(1, N) < 0.5
    target = torch.ones(1, N, dtype=torch.bool)
    separated = torch.tensor(S)
    loss, _ = modality_loss(
        hidden, weight, input_ids, target, modality, separated, vocab_size=V, chunk_size=5
    )
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.bfloat16

    h64, w64 = hidden.detach().double()[0, :-1], weight.detach().double()
    logits = h64 @ w64[:V].T  # (N-1, V)
    code = modality[0, 1:]
    logits[:, list(S)] = torch.where(code[:, None], h64 @ w64[V:].T, logits[:, list(S)])
    expected = torch.nn.functional.cross_entropy(logits, input_ids[0, 1:])
    assert abs(loss.item() - expected.item()) < 1e-5 * abs(expected.item())


# ---------------------------------------------------------------------------------------------------
# Config, flavors, counting
# ---------------------------------------------------------------------------------------------------


def test_config_round_trip_and_alternating_layers() -> None:
    config = GPTNeoConfig.from_flavor("tiny", vocab_size=100, separated_ids=[5, 7], pad_token_id=0)
    assert config.attention_types == ("global", "local")
    assert GPTNeoConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["separated_ids"] == [5, 7]


def test_invalid_config_lists_every_problem() -> None:
    config = GPTNeoConfig(
        vocab_size=10,
        d_model=30,
        n_head=4,
        separated_ids=(5, 3, 12),
        pad_token_id=3,
        attention_types=("global", "sideways"),
        n_layer=3,
    )
    with pytest.raises(ValueError) as error:
        config.validate()
    message = str(error.value)
    assert "\n" not in message
    for fragment in ("not a multiple of n_head", "2 entries for 3 layers", "sideways", "sorted", "[0, 10)"):
        assert fragment in message
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        GPTNeoConfig.from_dict({"vocab_size": 10, "colour": "red"})
    with pytest.raises(ValueError, match="unknown model flavor"):
        GPTNeoConfig.from_flavor("huge", vocab_size=10)


def test_out_of_range_input_ids_are_a_one_line_error() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 30\)"):
        model(torch.tensor([[1, 2, V]]))
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 64\)"):
        model(torch.ones(1, 65, dtype=torch.long))


def test_logits_with_a_per_position_view_mix_the_two_views() -> None:
    model = tiny_model()
    input_ids = torch.tensor([[1, 10, 11, 5, 12, 20]])
    code_view = torch.tensor([[True, False, True, True, False, False]])
    with torch.no_grad():
        mixed = model.logits(input_ids, code_view=code_view)
        text, code = model.logits(input_ids), model.logits(input_ids, code_view=True)
    torch.testing.assert_close(mixed, torch.where(code_view[..., None], code, text), rtol=0, atol=0)
    assert (code[..., list(S)] != text[..., list(S)]).all()
    others = [i for i in range(V) if i not in S]
    assert torch.equal(code[..., others], text[..., others])


@pytest.mark.parametrize("name", list(FLAVORS))
def test_flavors_parameter_count_by_hand(name: str) -> None:
    V_, n_sep = 32000, 100
    config = GPTNeoConfig.from_flavor(name, vocab_size=V_, separated_ids=range(n_sep))
    with torch.device("meta"):
        model = GPTNeo(config)
    d, L = config.d_model, config.n_layer
    per_block = (
        4 * d * d + d + 2 * (4 * d * d) + 4 * d + d + 4 * d
    )  # q,k,v,out (+bias), fc, proj (+biases), 2 LN
    expected = (V_ + n_sep) * d + config.n_positions * d + L * per_block + 2 * d
    assert model.num_params() == expected
    assert model.flops_per_token(1024) == 6 * expected + 12 * L * d * 1024
    assert config.attention_types == tuple("global" if i % 2 == 0 else "local" for i in range(L))


@pytest.mark.parametrize("window", [None, 5])
def test_a_long_stream_regrouped_into_rows_attends_as_the_dense_rule(window: int | None) -> None:
    """A micro batch packed as one stream of short documents: the reference path regroups the documents
    into rows (one gather, one scatter); outputs and gradients equal the (1, T, T) dense rule's."""
    rng = torch.Generator().manual_seed(7)
    lengths = torch.randint(3, 20, (30,), generator=rng).tolist()
    T = sum(lengths) + 5  # five padding tokens at the tail
    doc_ids = torch.full((1, T), -1, dtype=torch.int32)
    prefix = torch.zeros(1, T, dtype=torch.bool)
    start = 0
    for d, n in enumerate(lengths):
        doc_ids[0, start : start + n] = d
        prefix[0, start : start + min(n, d % 4)] = True  # some documents with a bidirectional prefix
        start += n
    masks = build_masks(doc_ids, prefix, [window], "sdpa")
    assert isinstance(masks[window], Regrouped)  # 30 documents of < 20 tokens: rows of 64, not T x T
    dense = dense_mask(doc_ids, prefix, window)
    q, k, v = (torch.randn(1, 2, T, 8, dtype=torch.float64, generator=rng, requires_grad=True) for _ in range(3))
    ours = attend(q, k, v, masks[window])
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    reference = attend(q, k, v, dense)
    ref_grads = torch.autograd.grad(reference.square().sum(), (q, k, v))
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_rows_that_are_already_short_keep_the_dense_mask() -> None:
    batch = packed_batch()
    masks = build_masks(batch["doc_ids"], batch["prefix"], [None, 3], "sdpa")
    assert all(isinstance(m, torch.Tensor) for m in masks.values())
