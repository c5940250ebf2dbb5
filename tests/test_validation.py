"""The validation loss: a held-out share by `_id` that never trains, across a resume; `val/loss` logged
to metrics.jsonl and TensorBoard, equal to the saved model's loss on each held-out pair alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from ds_train.data.encode import Encoder
from ds_train.data.sources import read_pairs
from ds_train.data.tokenizer import load_tokenizer
from ds_train.train import TENSOR_KEYS, main
from tests.test_train import ASSETS, overrides, single_process  # noqa: F401 (fixture)

SHARE = 0.2
SETTINGS = {"data__val_share": SHARE, "eval__every_steps": 3, "data__trace_ids": "true",
            "train__deepspeed": "zero0.json", "train__max_steps": 6}


def held_out_ids() -> set[str]:
    """The split, transcribed: blake2b-64 of the `_id` (little-endian) below SHARE * 2**64."""
    return {p.id for p in read_pairs(ASSETS / "tiny_pairs.jsonl")
            if int.from_bytes(hashlib.blake2b(p.id.encode(), digest_size=8).digest(), "little") < SHARE * 2**64}


@pytest.mark.usefixtures("single_process")
def test_held_out_pairs_never_train_across_a_resume_and_val_loss_is_theirs(tmp_path: Path, capsys) -> None:
    from ds_train.data.batch import batch_spec, make_stream_batch
    from ds_train.data.pack import Doc
    from ds_train.model import GPTNeo, GPTNeoConfig

    run = tmp_path / "run"
    assert main(overrides(run, train__stop_at_step=3, **SETTINGS)) == 0
    assert main(overrides(run, **SETTINGS)) == 0
    held = held_out_ids()
    assert held
    trace = [json.loads(ln) for ln in (run / "trace" / "rank0.jsonl").read_text().splitlines()]
    assert sorted({line["step"] for line in trace}) == list(range(1, 7))
    trained = {i for line in trace for i in line["ids"]}
    assert trained and not trained & held

    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert [s for s, r in sorted(rows.items()) if "val/loss" in r] == [3, 6]
    assert "val loss:" in capsys.readouterr().out
    assert list((run / "tb").glob("events.out.tfevents.*"))

    # The saved step-6 model on each held-out pair alone (those that fit seq_len), summed over targets.
    cfg_model = json.loads((run / "checkpoints" / "step-6" / "ds_train.json").read_text())["model"]
    tok = load_tokenizer(ASSETS / "tokenizer")
    model = GPTNeo(GPTNeoConfig.from_dict(cfg_model))
    state = torch.load(run / "checkpoints" / "step-6" / "mp_rank_00_model_states.pt", weights_only=False)
    model.load_state_dict(state["module"], strict=False)
    model.eval()
    encoder = Encoder(tok, "code_clm")
    spec = batch_spec(encoder, "code_clm", 128)
    pairs = [p for p in read_pairs(ASSETS / "tiny_pairs.jsonl") if p.id in held]
    total = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for pair_id, ids, segments in encoder.layout(pairs):
            if len(ids) <= 128:
                one = make_stream_batch([Doc(pair_id, ids, segments)], [0], spec, len(ids))
                total += model(**{k: one[k] for k in TENSOR_KEYS})[1].double()
    expected = float((total[0] + total[2]) / (total[1] + total[3]))
    assert rows[6]["val/loss"] == pytest.approx(expected, rel=1e-4)
    assert rows[6]["val/code_loss"] == pytest.approx(float(total[0] / total[1]), rel=1e-4)
