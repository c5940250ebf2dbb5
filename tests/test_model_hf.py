"""Parity with `transformers`' GPTNeoForCausalLM: logits, weight layout, config.json, loading a directory."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from ds_train.hf import from_hf_state_dict, hf_config_dict, load_model, to_hf_state_dict
from ds_train.model import GPTNeo, GPTNeoConfig

V = 50
S = (9, 12, 20, 33, 47)
PAD = 0
ATOL = 1e-5  # fp32 logits of O(1) random weights


def random_model(**overrides) -> GPTNeo:
    """A tiny fp32 model with random O(0.1) weights (so attention and MLPs are far from trivial)."""
    config = GPTNeoConfig.from_flavor(
        "tiny", vocab_size=V, separated_ids=S, pad_token_id=PAD, window_size=5, **overrides
    )
    torch.manual_seed(0)
    model = GPTNeo(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def hf_model(model: GPTNeo) -> transformers.GPTNeoForCausalLM:
    """The same weights in `transformers`' model, through our exported layout and config."""
    hf = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**hf_config_dict(model.config))).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.config))
    return hf


def hf_view_logits(hf_logits: torch.Tensor, code_view: bool) -> torch.Tensor:
    """The original method's V-way view of (.., V + |S|) logits: code view takes the duplicate columns of S."""
    logits = hf_logits[..., :V].clone()
    if code_view:
        logits[..., list(S)] = hf_logits[..., V:]
    return logits


@pytest.mark.parametrize("code_view", [False, True])
def test_logits_match_transformers_with_local_window_and_routing(code_view: bool) -> None:
    model = random_model()
    hf = hf_model(model)
    T = 40  # window 5 < T: the local layer's window matters
    input_ids = torch.randint(0, V, (3, T))
    modality = torch.rand(3, T) < 0.5
    with torch.no_grad():
        ours = model.logits(input_ids, modality=modality, code_view=code_view)
        # `transformers` sees the extended vocabulary: code tokens of S fed as their duplicate ids.
        routed = torch.where(modality, model.route[input_ids], input_ids)
        theirs = hf_view_logits(hf(routed).logits, code_view)
    assert ours.shape == (3, T, V)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_local_window_changes_the_output() -> None:
    """Guard: with window 5 < T the local layer must differ from a global one (else parity proves little)."""
    local = random_model()
    global_only = random_model(attention_types=("global", "global"))
    input_ids = torch.randint(0, V, (1, 30))
    with torch.no_grad():
        assert (local.logits(input_ids) - global_only.logits(input_ids)).abs().max() > 1e-3


def test_state_dict_round_trip_through_transformers_layout() -> None:
    model = random_model()
    state = model.state_dict()
    hf_state = to_hf_state_dict(state, model.config)
    assert hf_state["lm_head.weight"] is hf_state["transformer.wte.weight"]
    assert hf_state["transformer.wte.weight"].shape == (V + len(S), model.config.d_model)
    assert set(hf_state) == set(hf_model(model).state_dict())
    back = from_hf_state_dict(hf_state, model.config)
    assert set(back) == set(state)
    for name, value in state.items():
        assert torch.equal(back[name], value), name


def test_hf_config_dict_matches_our_layers() -> None:
    config = random_model(attention_types=("global", "local")).config
    content = hf_config_dict(config)
    hf_config = transformers.GPTNeoConfig(**json.loads(json.dumps(content)))
    assert hf_config.vocab_size == V + len(S)
    assert tuple(hf_config.attention_layers) == config.attention_types
    odd = GPTNeoConfig(vocab_size=V, n_layer=3, attention_types=("local", "global", "global"))
    assert tuple(transformers.GPTNeoConfig(**hf_config_dict(odd)).attention_layers) == odd.attention_types


def test_from_pretrained_hf_extends_a_plain_checkpoint(tmp_path) -> None:
    """A plain GPT-Neo with V_hf < V rows: added rows drawn, code rows copied from E[S], pad row zeroed."""
    V_hf = V - 4
    plain = GPTNeoConfig.from_flavor("tiny", vocab_size=V_hf)
    torch.manual_seed(1)
    source = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**hf_config_dict(plain)))
    source.save_pretrained(tmp_path)
    source_table = source.transformer.wte.weight.detach()

    model = load_model(tmp_path, vocab_size=V, separated_ids=S, pad_token_id=PAD).eval()
    table = model.wte.weight.detach()
    assert table.shape == (V + len(S), plain.d_model)
    assert torch.equal(table[1:V_hf], source_table[1:V_hf])
    assert torch.equal(table[PAD], torch.zeros(plain.d_model))
    assert torch.equal(table[V:], table[list(S)])
    added = table[V_hf:V]
    assert added.abs().min() > 0 and 0.5 * plain.init_std < added.std() < 2.0 * plain.init_std

    input_ids = torch.randint(1, V_hf, (2, 24))
    with torch.no_grad():
        ours = model.logits(input_ids)[..., 1:V_hf]
        theirs = source(input_ids).logits[..., 1:V_hf]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_from_pretrained_hf_reads_an_export_with_modality_map(tmp_path) -> None:
    model = random_model()
    hf = hf_model(model)
    hf.save_pretrained(tmp_path)
    map_content = {"separation": "partial", "base_vocab_size": V, "separated_ids": list(S)}
    (tmp_path / "modality_map.json").write_text(json.dumps(map_content))
    loaded = load_model(tmp_path)
    assert loaded.config.vocab_size == V and loaded.config.separated_ids == S
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_bad_checkpoints_are_one_line_errors(tmp_path) -> None:
    model = random_model()
    hf_state = to_hf_state_dict(model.state_dict(), model.config)
    too_big = GPTNeoConfig.from_flavor("tiny", vocab_size=V - 10, separated_ids=(3,), pad_token_id=PAD)
    with pytest.raises(ValueError, match="rows"):
        from_hf_state_dict(hf_state, too_big)
    del hf_state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing \['h.1.mlp.c_fc.bias'\]"):
        from_hf_state_dict(hf_state, model.config)
    untied = to_hf_state_dict(model.state_dict(), model.config)
    untied["lm_head.weight"] = untied["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="tied"):
        from_hf_state_dict(untied, model.config)
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)


def test_local_attention_generation_only_trains_every_layer_as_global() -> None:
    """`local_attention="generation_only"` is the original's training: its 3-D packed mask replaced
    GPT-Neo's windowed `bias` (gpt_neo/modeling_gpt_neo.py of the original, `_attn`), so every layer
    attended globally. Reference: transformers' GPT-Neo with every layer global, same weights. The
    export keeps the local layers, so generation windows as GPT-Neo does."""
    windowed = random_model()
    original = GPTNeoConfig.from_dict({**windowed.config.to_dict(), "local_attention": "generation_only"})
    model = GPTNeo(original).eval()
    model.load_state_dict(windowed.state_dict())
    all_global = GPTNeoConfig.from_dict(
        {**windowed.config.to_dict(), "attention_types": ["global"] * windowed.config.n_layer}
    )
    reference = hf_model(GPTNeo(all_global))
    reference.load_state_dict(to_hf_state_dict(windowed.state_dict(), all_global))
    T = 40
    input_ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        ours = model.logits(input_ids)
        theirs = hf_view_logits(reference(input_ids).logits, code_view=False)
        default = windowed.logits(input_ids)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert (ours - default).abs().max() > 1e-3  # the switch changes the model: the window mattered
    assert hf_config_dict(original)["attention_types"] == hf_config_dict(windowed.config)["attention_types"]
    with pytest.raises(ValueError, match="local_attention"):
        GPTNeoConfig.from_dict({**windowed.config.to_dict(), "local_attention": "never"}).validate()
