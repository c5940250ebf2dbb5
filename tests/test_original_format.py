"""A model in the original implementation's format converts into ours with the same logits.

The test writes a small checkpoint the way `lm_trainer.py` of the original implementation does
(duplicate tokens `[_DUP_]x` added in sorted order, a token it lacks added twice, the table resized
and each duplicate row copied from its source, the map pickled as `sample_concatenation.py` does)
and computes the original's logits as `generation.py` feeds a prompt: code tokens through the map,
`transformers`' GPTNeoForCausalLM over the whole extended vocabulary.
"""

import json
import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM

from ds_train import hf
from ds_train.errors import UsageError

ASSETS = Path(__file__).parent / "assets"
TO_SEPARATE = [
    "return",
    "▁return",
    "def",
    "▁def",
    "(",
    ")",
    "▁if",
    "zqzqz",
]  # the last one is not in the vocabulary


def original_checkpoint(out: Path) -> tuple[dict[int, int], int]:
    """An original-format directory; returns its replicated-tokens map and the vocabulary size before."""
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    vocab = tokenizer.get_vocab()
    before = len(vocab)
    # lm_trainer.py: extra tokens appended at the end, in sorted order
    new_tokens, mapping, count = [], {}, len(vocab)
    for token in sorted(set(TO_SEPARATE)):
        if token in tokenizer.all_special_tokens:
            continue
        if token in vocab:
            new_tokens.append(f"[_DUP_]{token}")
            mapping[tokenizer.convert_tokens_to_ids(token)] = count
            count += 1
        else:
            new_tokens.append(token)
            new_tokens.append(f"[_DUP_]{token}")
            mapping[count] = count + 1
            count += 2
    tokenizer.add_tokens(new_tokens)
    config = GPTNeoConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
    )
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(config).eval()
    with torch.no_grad():
        table = model.transformer.wte.weight
        table.mul_(5.0)
        for src, dup in mapping.items():  # copies, then "trained" apart
            table[dup] = table[src] + 0.1 * torch.randn_like(table[src])
        table[tokenizer.convert_tokens_to_ids("<pad>")] = 0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with open(out / "replicated_tokens_map.pkl", "wb") as f:
        pickle.dump(mapping, f)
    return mapping, before


def test_converted_model_has_the_original_logits(tmp_path):
    src, out = tmp_path / "original", tmp_path / "ours"
    mapping, before = original_checkpoint(src)
    out.mkdir()  # an empty directory is written in place (as ds-export's temporary directory is)
    mmap = hf.convert_original(src, out)

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    signature = "def f ( x ) : <NEW_LINE> <INDENT> return zqzqz ( x )"

    # the original: generation.py maps the prompt's code ids through the map; zqzqz is one added token there
    original_tok = AutoTokenizer.from_pretrained(src)
    orig_ids = original_tok.encode(signature, add_special_tokens=False)
    assert original_tok.convert_ids_to_tokens(orig_ids).count("zqzqz") == 1
    orig_model = GPTNeoForCausalLM.from_pretrained(src).eval()

    ours = hf.load_model(out).eval()
    new_tok = AutoTokenizer.from_pretrained(out, trust_remote_code=False, use_fast=True)
    assert mmap.separation == "original" and len(mmap.separated_ids) == len(mapping)
    assert ours.config.vocab_size == len(original_tok) - len(mapping) > before  # duplicates became code rows

    # the same sequence in both numberings
    sig_ours = new_tok.encode(signature, add_special_tokens=False)
    assert new_tok.convert_ids_to_tokens(sig_ours) == original_tok.convert_ids_to_tokens(orig_ids)
    old_of_new = dict(enumerate(i for i in range(len(original_tok)) if i not in set(mapping.values())))
    seq_ours = [tokenizer.convert_tokens_to_ids("<bot>"), *sig_ours]
    mod_ours = [0] + [1] * len(sig_ours)
    seq_orig = [old_of_new[seq_ours[0]]] + [mapping.get(old_of_new[i], old_of_new[i]) for i in sig_ours]

    with torch.no_grad():
        orig_logits = orig_model(torch.tensor([seq_orig])).logits[0]  # (T, rows of the extended table)
        for code_view in (False, True):
            got = ours.logits(
                torch.tensor([seq_ours]), modality=torch.tensor([mod_ours]).bool(), code_view=code_view
            )[0]
            columns = []
            for new in range(ours.config.vocab_size):
                old = old_of_new[new]
                columns.append(mapping[old] if code_view and old in mapping else old)
            torch.testing.assert_close(got, orig_logits[:, columns], rtol=1e-5, atol=1e-5)


def test_conversion_refusals(tmp_path):
    src = tmp_path / "original"
    mapping, _ = original_checkpoint(src)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("kept")
    with pytest.raises(UsageError, match="not an empty directory"):
        hf.convert_original(src, tmp_path / "taken")
    (src / "replicated_tokens_map.pkl").write_bytes(pickle.dumps({1: object()}))
    with pytest.raises(UsageError, match="not a map of token ids"):
        hf.convert_original(src, tmp_path / "out")
    (src / "replicated_tokens_map.pkl").unlink()
    with pytest.raises(UsageError, match="no replicated-tokens map"):
        hf.convert_original(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "bad.json").write_text(json.dumps({"5": 99999}))
    with pytest.raises(UsageError, match="outside the model"):
        hf.convert_original(src, tmp_path / "out", tokens_map=tmp_path / "bad.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "original", "taken"]
    (tmp_path / "good.json").write_text(json.dumps(mapping))
    hf.convert_original(src, tmp_path / "fresh", tokens_map=tmp_path / "good.json", objective="prefix_code_clm")
    assert hf.ModalityMap.read(tmp_path / "fresh").prefix_lm
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "fresh", "good.json", "original", "taken"]
