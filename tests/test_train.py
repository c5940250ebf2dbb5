"""The training engine with the real DeepSpeed engine on the CPU (gloo).

The reference is written plainly here: the same model and batches trained by a plain PyTorch loop
(AdamW, clipping, gradients averaged over the ranks' micro batches), with the learning-rate schedule
and the weight-decay groups written from their formulas in this file (not taken from ds_train.optim),
so a broken schedule or grouping fails here. The engine's per-step losses must match it for ZeRO 0-3,
world sizes 1 and 2, and across resume.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import GPTNeoConfig as HFConfig
from transformers import GPTNeoForCausalLM

from ds_train.config import load_config
from ds_train.data.stream import build_dataloader
from ds_train.data.tokenizer import load_tokenizer, separated_ids
from ds_train.distributed import free_port
from ds_train.model import GPTNeo, GPTNeoConfig
from ds_train.train import QuietGC, main

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tests" / "assets"
GOLDEN = ASSETS / "golden_losses.json"


def overrides(run_dir: Path, **extra) -> list[str]:
    base = {
        "run.dir": str(run_dir), "data.source": str(ASSETS / "tiny_pairs.jsonl"),
        "data.tokenizer": str(ASSETS / "tokenizer"), "data.seq_len": 128, "model.flavor": "tiny",
        "train.micro_batch_size": 2, "train.max_steps": 6, "train.log_every": 1,
        "checkpoint.every_steps": 3, "export.enabled": "false", "optim.lr": 3e-3, "optim.min_lr": 3e-4,
        "optim.warmup_ratio": 0.2, "train.deepspeed": "zero2.json",
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"--{k}={v}" for k, v in base.items()]


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows}


@pytest.fixture
def single_process(monkeypatch):
    """In-process runs need launcher variables of a world of one, on a fresh port each time."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def run_in_process(run_dir: Path, **extra) -> dict[int, float]:
    assert main(overrides(run_dir, **extra)) == 0
    return losses(run_dir)


def scheduled_lr(step: int, total: int, peak: float, floor: float, warmup_ratio: float) -> float:
    """README's schedule for 0-based optimizer step `step`: linear warm-up to `peak` over the first
    ceil(warmup_ratio x total) steps (step s gets (s + 1) / warm-up of it), then half a cosine from
    `peak` down to `floor`, reached at step `total`."""
    warm = math.ceil(warmup_ratio * total)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return floor + (peak - floor) * (1 + math.cos(math.pi * progress)) / 2


def test_the_step_loop_collects_garbage_on_its_schedule_only_and_restores_the_collector():
    collections: list[int] = []

    def watch(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(watch)
    try:
        quiet = QuietGC()
        collections.clear()
        kept = []
        for step in range(1, 101):
            kept.append([[] for _ in range(2_000)])  # 200,000 new containers: far past every automatic threshold
            quiet.after(step)
        assert collections == [1, 1, 1]  # after the first step, and at steps 50 and 100: nothing automatic
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        quiet.close()
        assert gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.callbacks.remove(watch)
        gc.unfreeze()
        gc.enable()


def test_scheduled_lr_formula_by_hand():
    assert scheduled_lr(0, 10, 1.0, 0.1, 0.2) == 0.5 and scheduled_lr(1, 10, 1.0, 0.1, 0.2) == 1.0
    assert scheduled_lr(2, 10, 1.0, 0.1, 0.2) == 1.0  # the top of the cosine
    assert scheduled_lr(6, 10, 1.0, 0.1, 0.2) == pytest.approx(0.55)  # half-way down: (1 + 0.1) / 2
    assert scheduled_lr(10, 10, 1.0, 0.1, 0.2) == pytest.approx(0.1)


def reference_losses(run_dir: Path, world_size: int, steps: int, accum: int = 1, **extra) -> list[float]:
    """Plain PyTorch: the batches each rank reads, one model, grads averaged like data parallelism."""
    cfg = load_config(None, overrides(run_dir, **extra))
    tok = load_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(cfg.run.seed)
    mcfg = GPTNeoConfig.from_flavor(cfg.model.flavor, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                    separated_ids=tuple(separated_ids(tok, cfg.objective.separation)))
    model = GPTNeo(mcfg)
    # Weight decay on the weight matrices of the blocks; none on biases, LayerNorms, wte ([E; C]) or wpe.
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim == 2
             and n not in ("wte.weight", "wpe.weight")]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    loaders = [iter(build_dataloader(
        [cfg.data.source], cfg.data.tokenizer, objective=cfg.objective.name, seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size, rank=r, world_size=world_size, num_workers=0,
        seed=cfg.run.seed, drop_overlong=True, corrupt_prob=cfg.objective.corrupt_prob))
        for r in range(world_size)]
    keys = ("input_ids", "position_ids", "doc_ids", "modality", "target", "prefix")
    out = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(step, cfg.train.max_steps, cfg.optim.lr, cfg.optim.min_lr,
                                       cfg.optim.warmup_ratio)
        opt.zero_grad()
        total = torch.zeros(4)
        for _ in range(accum):
            for loader in loaders:
                batch = next(loader)
                loss, stats = model(**{k: batch[k] for k in keys})
                (loss / (world_size * accum)).backward()
                total += stats
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        out.append(float((total[0] + total[2]) / (total[1] + total[3])))
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_match_plain_pytorch(stage, tmp_path, single_process):
    settings = {"train__deepspeed": f"zero{stage}.json", "train__max_steps": 4, "checkpoint__every_steps": 4,
                "optim__weight_decay": 0.1, "optim__warmup_ratio": 0.3}
    got = run_in_process(tmp_path / "run", **settings)
    ref = reference_losses(tmp_path / "run", world_size=1, steps=4, **settings)
    assert [got[s] for s in range(1, 5)] == pytest.approx(ref, rel=2e-5)
    assert ref[-1] < ref[0]  # it learns


def test_grad_accumulation_matches_plain_pytorch(tmp_path, single_process):
    settings = {"train__grad_accum": 2, "train__max_steps": 3, "checkpoint__every_steps": 3,
                "optim__weight_decay": 0.1}
    got = run_in_process(tmp_path / "run", **settings)
    ref = reference_losses(tmp_path / "run", world_size=1, steps=3, accum=2, **settings)
    assert [got[s] for s in (1, 2, 3)] == pytest.approx(ref, rel=2e-5)


def test_golden_losses(tmp_path, single_process):
    """A seeded short run must reproduce the losses kept in tests/assets (regression guard)."""
    got = run_in_process(tmp_path / "run", train__max_steps=6)
    golden = json.loads(GOLDEN.read_text())
    assert [got[s] for s in range(1, 7)] == pytest.approx(golden["train/loss"], rel=1e-4)


def test_stop_and_resume_equals_uninterrupted(tmp_path, single_process):
    full = run_in_process(tmp_path / "full", train__max_steps=6, checkpoint__every_steps=3)
    part = run_in_process(tmp_path / "part", train__max_steps=6, train__stop_at_step=3, checkpoint__every_steps=3)
    assert (tmp_path / "part" / "checkpoints" / "latest").read_text() == "step-3"
    resumed = run_in_process(tmp_path / "part", train__max_steps=6, checkpoint__every_steps=3)
    assert {s: part[s] for s in (1, 2, 3)} == {s: full[s] for s in (1, 2, 3)}
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]  # exact on the CPU
    kept = sorted(p.name for p in (tmp_path / "part" / "checkpoints").glob("step-*"))
    assert kept == ["step-3", "step-6"]
    again = run_in_process(tmp_path / "part", train__max_steps=6, checkpoint__every_steps=3)
    assert again == resumed  # a finished run starts nothing new


def test_overfit_one_batch(tmp_path, single_process):
    """The six shortest pairs (one packed batch) and a high learning rate: the loss must fall steeply."""
    lines = (ASSETS / "tiny_pairs.jsonl").read_text().splitlines(True)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(sorted(lines, key=len)[:6]))
    got = run_in_process(tmp_path / "run", data__source=str(small), train__max_steps=40,
                         checkpoint__every_steps=40, optim__lr=1e-2, optim__min_lr=1e-2, train__log_every=1)
    assert got[40] < 0.3 * got[1]


def test_tensorboard_scalars_read_back(tmp_path, single_process):
    run_in_process(tmp_path / "run", train__max_steps=4, objective__name="text_code_clm", train__log_every=2,
                   checkpoint__every_steps=4)
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/loss_code", "train/loss_text", "train/lr", "train/grad_norm",
                "perf/tokens_per_s", "mem/rss_gib"):
        assert tag in tags, tags
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    lr = [e.value for e in acc.Scalars("train/lr")]
    assert all(0 < v <= 3e-3 for v in lr)
    assert all(math.isfinite(e.value) for e in acc.Scalars("train/loss_text"))
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "ds_config.json").is_file()


def _launch_two_ranks(run_dir: Path, port: int | None = None, **extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(port or free_port()), "--module", "ds_train.train", *overrides(run_dir, **extra)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)


@pytest.mark.slow
def test_world_size_two_matches_plain_pytorch(tmp_path):
    settings = {"train__max_steps": 3, "checkpoint__every_steps": 3, "train__deepspeed": "zero2.json"}
    port = free_port()
    proc = _launch_two_ranks(tmp_path / "run", port=port, **settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # DeepSpeed's CPU shared-memory all-reduce would leave a 66 MB /dev/shm buffer per rank behind, named
    # after the master port; the launcher sets LOCAL_SIZE, so it maps them unless ds_train keeps it off.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    got = losses(tmp_path / "run")
    ref = reference_losses(tmp_path / "run", world_size=2, steps=3, **settings)
    assert [got[s] for s in (1, 2, 3)] == pytest.approx(ref, rel=2e-5)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-3" / "ds_train.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2


def test_init_from_a_transformers_gpt_neo(tmp_path, single_process):
    """Start from a local `transformers` GPT-Neo directory: at step 1 the code table is a copy of E, so
    the engine's first loss must equal the plain `transformers` model's cross-entropy on the same
    documents (run one by one, positions from 0), summed over the targets and divided by their count."""
    tok = load_tokenizer(ASSETS / "tokenizer")
    torch.manual_seed(0)
    hf = GPTNeoForCausalLM(HFConfig(vocab_size=len(tok), max_position_embeddings=256, hidden_size=32,
                                    num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                    window_size=16, intermediate_size=128))
    with torch.no_grad():
        hf.transformer.wte.weight[tok.pad_token_id] = 0.0  # DESIGN.md §3: the pad embedding is 0
    hf.save_pretrained(tmp_path / "hf")
    got = run_in_process(tmp_path / "run", model__init_from=str(tmp_path / "hf"), train__max_steps=2,
                         checkpoint__every_steps=2)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "ds_train.json").read_text())
    assert (meta["model"]["d_model"], meta["model"]["n_layer"], meta["model"]["window_size"]) == (32, 2, 16)

    cfg = load_config(None, overrides(tmp_path / "run"))
    batch = next(iter(build_dataloader(
        [cfg.data.source], cfg.data.tokenizer, objective=cfg.objective.name, seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size, rank=0, world_size=1, seed=cfg.run.seed)))
    total, count = 0.0, 0
    hf.eval()
    with torch.no_grad():
        for row in range(batch["input_ids"].shape[0]):
            docs = batch["doc_ids"][row]
            for doc in docs.unique().tolist():
                if doc < 0:
                    continue
                at = (docs == doc).nonzero().flatten()
                ids, tgt = batch["input_ids"][row, at], batch["target"][row, at]
                logp = torch.log_softmax(hf(input_ids=ids[None]).logits[0].double(), dim=-1)
                picked = logp[:-1].gather(1, ids[1:, None]).squeeze(1)
                total -= float(picked[tgt[1:]].sum())
                count += int(tgt[1:].sum())
    assert got[1] == pytest.approx(total / count, rel=1e-6)


def test_corpus_with_nothing_that_fits_stops_with_one_line(tmp_path, single_process, capsys):
    """Every pair longer than seq_len: the stream must say so, not loop forever looking for a row."""
    lines = (ASSETS / "tiny_pairs.jsonl").read_text().splitlines(True)
    longest = tmp_path / "long.jsonl"
    longest.write_text("".join(sorted(lines, key=len)[-6:]))
    assert main(overrides(tmp_path / "run", data__source=str(longest), data__seq_len=64)) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    err = [line for line in stderr.splitlines() if line.startswith("ds-train:")]
    assert len(err) == 1 and "every pair is longer than seq_len 64" in err[0] and "too_long=6" in err[0], err


def test_resume_under_another_zero_stage_is_refused_in_one_line(tmp_path, single_process, capsys):
    """DeepSpeed 0.19 can load a checkpoint neither directly nor through its universal form under another
    ZeRO stage (it fails on an assertion deep inside): the run must refuse with one line that says how."""
    run_in_process(tmp_path / "run", train__deepspeed="zero2.json", train__max_steps=2, checkpoint__every_steps=2)
    capsys.readouterr()
    assert main(overrides(tmp_path / "run", train__deepspeed="zero3.json", train__max_steps=4)) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    err = [line for line in stderr.splitlines() if line.startswith("ds-train:")]
    assert len(err) == 1 and "was written with ZeRO stage 2, this run uses stage 3" in err[0], err


def _tree(root: Path) -> dict[str, str]:
    """Every file under root with the sha256 of its bytes (and every folder), to compare two states."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_refused_run_leaves_the_run_directory_byte_identical(tmp_path, single_process, capsys):
    run = tmp_path / "run"
    run_in_process(run, train__max_steps=2, checkpoint__every_steps=2)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["train"]["grad_accum"], saved["train"]["global_batch_size"]) == (1, 2)  # resolved, not 0
    before = _tree(run)
    capsys.readouterr()
    assert main(overrides(run, objective__name="text_code_clm", train__max_steps=4)) == 2
    assert "does not match this run" in capsys.readouterr().err
    assert _tree(run) == before


def test_useful_tokens_per_s_excludes_padding(tmp_path, single_process, caplog):
    """perf/tokens_per_s / perf/raw_tokens_per_s must be the share of positions that belong to a document
    in the batches the run trained on (both rates share their interval's time)."""
    with caplog.at_level(logging.INFO, logger="ds_train"):
        run_in_process(tmp_path / "run", train__max_steps=4, train__log_every=2, checkpoint__every_steps=4)
    cfg = load_config(None, overrides(tmp_path / "run"))
    loader = build_dataloader([cfg.data.source], cfg.data.tokenizer, objective=cfg.objective.name,
                              seq_len=cfg.data.seq_len, micro_batch_size=2, rank=0, world_size=1, seed=cfg.run.seed)
    batches = [b for b, _ in zip(loader, range(4))]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row, pair in zip(rows, (batches[:2], batches[2:])):
        tokens = [int(t) for b in pair for row_ids in b["input_ids"] for t in row_ids]
        useful = sum(1 for b in pair for d in b["doc_ids"].flatten().tolist() if d >= 0)
        assert len(tokens) == 2 * 2 * cfg.data.seq_len and useful < len(tokens)  # there is padding
        assert row["perf/tokens_per_s"] / row["perf/raw_tokens_per_s"] == pytest.approx(useful / len(tokens))
    messages = [r.getMessage() for r in caplog.records]
    # start-up lines, then one plain line per logging interval (stderr is not a terminal here)
    assert any(m.startswith("batch: micro 2 x accumulation 1 x 1 rank = global batch 2 rows of 128 tokens = 256 "
                            "tokens per step") for m in messages), messages
    assert any(m.startswith("model: tiny GPT-Neo, ") and " parameters (" in m for m in messages)
    assert any(m.startswith("engine: DeepSpeed ZeRO stage 2, precision fp32") for m in messages)
    assert [m.split()[1] for m in messages if m.startswith("step ")] == ["2/4", "4/4"]
    assert not any("\r" in m for m in messages)


def test_resume_with_a_longer_schedule_warns_of_the_jump(tmp_path, single_process, caplog):
    run_in_process(tmp_path / "run", train__max_steps=4, checkpoint__every_steps=4)
    with caplog.at_level(logging.WARNING, logger="ds_train"):
        run_in_process(tmp_path / "run", train__max_steps=8, checkpoint__every_steps=4)
    cfg = load_config(None, overrides(tmp_path / "run"))
    old = scheduled_lr(4, 4, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_ratio)
    new = scheduled_lr(4, 8, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_ratio)
    warned = [r.getMessage() for r in caplog.records if "learning-rate schedule" in r.getMessage()]
    assert len(warned) == 1 and "max_steps 4 -> 8" in warned[0], warned
    moved = warned[0].split("step 5 moves from ")[1].split(" to ")
    assert [float(x) for x in moved] == pytest.approx([old, new], rel=5e-3)  # as printed, 3 digits


NAN_SEED = 5  # a data order whose first three batches hold shorter documents than a later one


def test_nonfinite_loss_read_one_step_late_stops_before_any_save(tmp_path, single_process, capsys):
    """train.log_every > 1: the loss of step k is read back at the end of step k + 1. A NaN met so must stop
    the run there, naming step k, with no checkpoint at or after it (the last one precedes it)."""
    tok = load_tokenizer(ASSETS / "tokenizer")
    loader = build_dataloader([str(ASSETS / "tiny_pairs.jsonl")], ASSETS / "tokenizer", objective="code_clm",
                              seq_len=64, micro_batch_size=2, seed=NAN_SEED)
    tops = [int(b["position_ids"].max()) for b, _ in zip(loader, range(8))]
    nan_from = max(tops[:3]) + 1  # position rows of the NaN model from here on: the first 3 batches are clean
    bad = next(i for i, top in enumerate(tops) if top >= nan_from)  # 0-based batch = step bad + 1
    assert bad >= 3, tops  # checkpoint.every_steps = bad saves once before it and never at bad + 1 or bad + 2
    torch.manual_seed(0)
    hf = GPTNeoForCausalLM(HFConfig(vocab_size=len(tok), max_position_embeddings=128, hidden_size=32,
                                    num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                    window_size=16, intermediate_size=128))
    with torch.no_grad():
        hf.transformer.wpe.weight[nan_from:] = float("nan")
    hf.save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    code = main(overrides(run, model__init_from=str(tmp_path / "hf"), run__seed=NAN_SEED, data__seq_len=64,
                          train__max_steps=bad + 6,
                          train__log_every=100, checkpoint__every_steps=bad, data__trace_ids="true"))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"ds-train: non-finite loss at step {bad + 1} on rank 0, batch _ids ")
    assert err[-1].endswith("stopped without saving, the last checkpoint precedes it "
                            "(train.nonfinite=skip skips such batches)")
    trace = [json.loads(line) for line in (run / "trace" / "rank0.jsonl").read_text().splitlines()]
    assert trace[-1]["step"] == bad + 2  # the step after the bad one ran: the read was one step late
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [f"step-{bad}"]
    assert (run / "checkpoints" / "latest").read_text() == f"step-{bad}"
