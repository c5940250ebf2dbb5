"""Finding and verifying checkpoints (`ds_train.checkpoint`), on checkpoints a real DeepSpeed engine saved
in this process (a world of one on the CPU).

- a marker that is not a readable JSON object is passed over with the torn-checkpoint warning and the
  previous complete checkpoint is used;
- a file whose bytes changed (same size) is caught by its CRC-32 (computed here with zlib, not with the
  module's code) when checksums are asked for, and passed over the same way;
- the marker names each optimizer group's parameters in the order the optimizer holds them (the groups
  written here from the weight-decay formula, not from `ds_train.optim`);
- `latest` is replaced atomically: a reader holding the old file still reads a whole tag name.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from ds_train import checkpoint

MARKER = "ds_train.json"


class Tiny(nn.Module):
    """A token table, a position table, a norm and two matrices with biases: both weight-decay groups."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 4)
        self.wpe = nn.Embedding(6, 4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 8)
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.wte(x) + self.wpe(torch.arange(x.shape[1])))  # (B, T, 4)
        return self.proj(self.fc(h).relu()).square().mean()


def groups_by_formula(model: nn.Module) -> list[list[str]]:
    """Weight decay on matrices only, not on biases, norms or the token/position tables."""
    decay = [n for n, p in model.named_parameters() if p.ndim >= 2 and n.split(".")[0] not in ("wte", "wpe")]
    return [decay, [n for n, _ in model.named_parameters() if n not in decay]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[list[str]], object]:
    """checkpoints/ with step-2 and step-4 of a bf16 ZeRO-2 engine, the groups its optimizer was given,
    and the engine."""
    import deepspeed

    from ds_train import distributed

    root = tmp_path_factory.mktemp("ckpt")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(var, raising=False)
        mp.setenv("DS_ACCELERATOR", "cpu")
        distributed.init()
        torch.manual_seed(0)
        model = Tiny()
        names = groups_by_formula(model)
        params = dict(model.named_parameters())
        groups = [{"params": [params[n] for n in names[0]], "weight_decay": 0.1},
                  {"params": [params[n] for n in names[1]], "weight_decay": 0.0}]
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
                  "bf16": {"enabled": True}, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-2),
                                          config=config)
        for step in (1, 2, 3, 4):
            engine.backward(engine(torch.randint(0, 11, (2, 6))))
            engine.step()
            if step % 2 == 0:
                checkpoint.save(engine, root / "checkpoints", step, {"tokens_seen": 0}, {"step": step}, None,
                                5, 0, 1)
    return root / "checkpoints", names, engine


def copy(saved, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[0], tmp_path / "checkpoints"))


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


BAD_MARKERS = {"list": b"[1, 2, 3]", "string": b'"step-4"', "no-files": b'{"step": 4}',
               "files-not-a-map": b'{"files": [1]}', "sizes-only": b'{"files": {"data_rank0.pt": 1279}}',
               "not-utf8": b"\xff\xfe{",
               "random-bytes": random.Random(0).randbytes(256)}


@pytest.mark.parametrize("marker", list(BAD_MARKERS.values()), ids=list(BAD_MARKERS))
def test_a_marker_that_is_not_a_json_object_is_passed_over(saved, tmp_path, caplog, marker):
    ckpts = copy(saved, tmp_path)
    (ckpts / "step-4" / MARKER).write_bytes(marker)
    with caplog.at_level(logging.WARNING, logger="ds_train.checkpoint"):
        found = checkpoint.find_latest(ckpts)
    assert found.step == 2
    lines = warnings(caplog)
    assert len(lines) == 1 and lines[0].startswith(
        f"checkpoint {ckpts / 'step-4'} is incomplete and is skipped: unreadable marker ("), lines
    assert checkpoint.is_complete(ckpts / "step-4")[0] is False


def test_the_marker_lists_every_file_with_its_crc32_and_the_optimizer_groups(saved):
    ckpts, names, _ = saved
    tag = ckpts / "step-4"
    marker = json.loads((tag / MARKER).read_text())
    files = sorted(str(p.relative_to(tag)) for p in tag.rglob("*") if p.is_file() and p.name != MARKER)
    assert sorted(marker["files"]) == files and "data_rank0.pt" in files and "rng_rank0.pt" in files
    for name in files:
        data = (tag / name).read_bytes()
        assert marker["files"][name] == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    assert marker["param_groups"] == names
    assert (marker["step"], marker["world_size"], marker["zero_stage"]) == (4, 1, 2)


def test_a_corrupted_file_is_caught_by_its_checksum(saved, tmp_path, caplog):
    """One byte changed in the middle of the largest file: the sizes still match, the CRC-32 does not."""
    ckpts = copy(saved, tmp_path)
    victim = max((ckpts / "step-4").glob("*.pt"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    assert checkpoint.find_latest(ckpts).step == 4  # the cheap check reads no file
    with caplog.at_level(logging.WARNING, logger="ds_train.checkpoint"):
        found = checkpoint.find_for_resume(ckpts)
    assert found.step == 2
    lines = warnings(caplog)
    assert len(lines) == 1 and f"is skipped: {victim.name} does not match its checksum" in lines[0], lines
    with pytest.raises(checkpoint.CheckpointError, match=f"{victim.name} does not match its checksum"):
        checkpoint.locate(ckpts / "step-4")


def test_checkpoints_none_of_which_is_usable_are_refused(saved, tmp_path):
    ckpts = copy(saved, tmp_path)
    for tag in ("step-2", "step-4"):
        (ckpts / tag / MARKER).write_text("[1, 2, 3]")
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.find_for_resume(ckpts)
    assert str(err.value).startswith(f"{ckpts} holds checkpoints and none is complete and intact")
    assert "\n" not in str(err.value)
    assert checkpoint.find_for_resume(tmp_path / "nothing-here") is None  # a fresh run starts at step 0


def test_latest_is_replaced_atomically_after_the_marker(saved, tmp_path):
    """A reader that opened `latest` before the next save still reads the whole old tag name; the new
    name comes in a new file (a rename) written after the new marker; no temporary file is left."""
    ckpts = copy(saved, tmp_path)
    latest = ckpts / "latest"
    with open(latest) as reader:
        before = latest.stat().st_ino
        checkpoint.save(saved[2], ckpts, 6, {"tokens_seen": 0}, {"step": 6}, None, 2, 0, 1)
        assert reader.read() == "step-4"
    assert latest.read_text() == "step-6" and latest.stat().st_ino != before
    assert latest.stat().st_mtime_ns >= (ckpts / "step-6" / MARKER).stat().st_mtime_ns
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-4", "step-6"]  # kept the last 2
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]
