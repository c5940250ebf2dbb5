"""Resuming on another number of ranks, with the real DeepSpeed engine on the CPU (gloo).

(a) ZeRO-0, 1 and 2, world size 2 stopped at step 3, resumed by one process; (b) ZeRO-3, one process
to step 3, resumed by two ranks under the deepspeed launcher. Each resumed run must:

- start at step 4 (a: with the engine's fp32 master weights, Adam moments and step count equal to the
  ones saved at step 3, read from the saved files directly and checked against DeepSpeed's
  `zero_to_fp32`);
- train steps 4-6 with the losses of a plain PyTorch AdamW continued from the saved weights, moments
  and schedule on the batches the stream hands out from the saved position (the batches each new rank
  trained on are checked against the trace of `_id`s);
- together with the saved run, see every pair of the first epoch once: none twice, none dropped;
- stay near the losses of an uninterrupted run of the same global batch (the data order differs).

(c) one rank resumed with dataloader workers and another micro batch size (the same global batch): every
pair of the first epoch once. The data-only checks of the split are in test_data_stream.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from ds_train.config import load_config
from ds_train.data.stream import STATE_FORMAT, build_dataloader
from ds_train.train import TENSOR_KEYS, main
from tests.test_faults import _layout_lengths, in_process  # noqa: F401 (fixture: a world of one in-process)
from tests.test_train import ASSETS, _launch_two_ranks, losses, overrides

pytestmark = pytest.mark.slow  # every test here launches ranks and resumes them under other layouts

SEQ_LEN = 128
K, N = 3, 6  # the saved step and the last step
SETTINGS = {"train__global_batch_size": 4, "train__max_steps": N, "checkpoint__every_steps": K,
            "data__trace_ids": "true"}
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


@pytest.fixture(scope="module")
def fitting_ids() -> set[str]:
    """The `_id`s of the corpus whose layout fits SEQ_LEN: one epoch trains each of them once."""
    pairs = [json.loads(line) for line in (ASSETS / "tiny_pairs.jsonl").read_text().splitlines()]
    return {p["_id"] for p, n in zip(pairs, _layout_lengths(pairs)) if n <= SEQ_LEN}


# ---------------------------------------------------------------------------------------------- references


def _trace(run_dir: Path) -> list[dict]:
    """Every trace line of every rank, in file order."""
    return [json.loads(line) for path in sorted((run_dir / "trace").glob("rank*.jsonl"))
            for line in path.read_text().splitlines()]


def _shard_tensors(step_dir: Path, key: str) -> dict[str, torch.Tensor]:
    """Full per-parameter tensors of one optimizer state (`exp_avg`, ...) or of the fp32 master weights
    (`fp32`), stitched from the saved ZeRO shards: each group's flat vector is the ranks' partitions
    back to back (ZeRO-1/2; ZeRO-3 here only from one rank), holding the parameters of `param_shapes`
    in order."""
    shards = sorted(step_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    states = [torch.load(p, weights_only=False)["optimizer_state_dict"] for p in shards]
    stage3 = states[0]["zero_stage"] == 3
    assert not stage3 or len(states) == 1, "ZeRO-3 partitions each parameter: read here from one rank only"
    model_file = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage3 else "mp_rank_00_model_states.pt"
    shapes = torch.load(step_dir / model_file, weights_only=False)["param_shapes"]
    fp32_key, base_key = ("fp32_flat_groups", "optimizer_state_dict") if stage3 else (
        "single_partition_of_fp32_groups", "base_optimizer_state")
    out = {}
    for group, names in enumerate(shapes):
        if key == "fp32":
            flat = torch.cat([s[fp32_key][group] for s in states])
        else:
            flat = torch.cat([s[base_key]["state"][group][key] for s in states])
        offset = 0
        for name, shape in names.items():
            out[name] = flat[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()
    return out


def _model(run_dir: Path):
    """A fresh model of the runs' configuration, and the parameter names in AdamW's group order."""
    from ds_train.data.tokenizer import load_tokenizer, separated_ids
    from ds_train.model import GPTNeo, GPTNeoConfig
    from ds_train.optim import param_groups

    cfg = load_config(None, overrides(run_dir, **SETTINGS))
    tok = load_tokenizer(cfg.data.tokenizer)
    model = GPTNeo(GPTNeoConfig.from_flavor(
        cfg.model.flavor, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
        separated_ids=tuple(separated_ids(tok, cfg.objective.separation))))
    names = {p: n for n, p in model.named_parameters()}
    return model, [names[p] for g in param_groups(model, cfg.optim.weight_decay) for p in g["params"]]


def _saved_state(run_dir: Path, step_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The fp32 weights and Adam moments saved at the step, by parameter name, read from the files:
    ZeRO 1-3 from the optimizer shards (checked against DeepSpeed's `zero_to_fp32`), ZeRO 0 from the
    model states file, where the module and the whole torch optimizer state are kept."""
    if any(step_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        out = {key: _shard_tensors(step_dir, key) for key in STATE_KEYS}
        fp32 = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        assert set(fp32) == set(out["fp32"]) and all(torch.equal(t, fp32[n]) for n, t in out["fp32"].items())
        return out
    saved = torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False)
    _, order = _model(run_dir)
    state = saved["optimizer"]["state"]
    out = {"fp32": {n: saved["module"][n] for n in order}}
    out.update({key: {n: state[i][key] for i, n in enumerate(order)} for key in ("exp_avg", "exp_avg_sq")})
    return out


def _engine_state(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """The engine's fp32 weights and Adam moments by parameter name (ZeRO: gathered by DeepSpeed)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = dict(trainer.engine.module.named_parameters())
    if trainer.engine.zero_optimization_stage() == 0:
        def weight(p):
            return p.detach()

        def moment(p, key):
            return trainer.optimizer.state[p][key]
    else:
        weight, moment = safe_get_full_fp32_param, safe_get_full_optimizer_state
    out = {"fp32": {n: weight(p) for n, p in params.items()}}
    out.update({key: {n: moment(p, key) for n, p in params.items()} for key in ("exp_avg", "exp_avg_sq")})
    return out


def _new_rank_batches(run_dir: Path, step_dir: Path, world: int, rank: int, micro: int = 2, workers: int = 0):
    """The micro batches rank `rank` of `world` ranks reads after resuming `step_dir`: (batch, epoch)."""
    cfg = load_config(None, overrides(run_dir, **SETTINGS))
    loader = build_dataloader(
        [str(run_dir / "packed")], cfg.data.tokenizer, objective=cfg.objective.name, seq_len=cfg.data.seq_len,
        micro_batch_size=micro, rank=rank, world_size=world, num_workers=workers, seed=cfg.run.seed,
        corrupt_prob=cfg.objective.corrupt_prob)
    loader.load_state_dict(torch.load(step_dir / "data_rank0.pt", weights_only=True))
    for batch in loader:
        yield batch, loader.epoch


def _ids(batch: dict) -> list[str]:
    return [i for row in batch["ids"] for i in row]


def _plain_continuation(run_dir: Path, step_dir: Path, saved: dict, world: int, steps: int):
    """Plain PyTorch from the saved state: the model with the saved fp32 weights, AdamW with the saved
    moments and step count, the saved schedule; gradients averaged over the new ranks' micro batches.
    Returns (losses, ids per (rank, step), the rows' iterators for the rest of the epoch)."""
    from ds_train.optim import build_scheduler, param_groups

    cfg = load_config(None, overrides(run_dir, **SETTINGS))
    model, _ = _model(run_dir)
    model.load_state_dict(saved["fp32"], strict=False)  # the tied head has no entry of its own
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    names = {p: n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p] = {"step": torch.tensor(float(K)), "exp_avg": saved["exp_avg"][names[p]].clone(),
                            "exp_avg_sq": saved["exp_avg_sq"][names[p]].clone()}
    sched = build_scheduler(opt, cfg.optim, cfg.train.max_steps)
    saved_sched = torch.load(next(step_dir.glob("*model_states.pt")), weights_only=False)["lr_scheduler"]
    sched.load_state_dict(saved_sched)
    for group, lr in zip(opt.param_groups, saved_sched["_last_lr"]):
        group["lr"] = lr
    accum = 4 // (2 * world)
    rows = [_new_rank_batches(run_dir, step_dir, world, r) for r in range(world)]
    out, ids = [], {}
    for step in range(K + 1, K + 1 + steps):
        opt.zero_grad()
        total = torch.zeros(4)
        for _ in range(accum):
            for rank, it in enumerate(rows):
                batch = next(it)[0]
                loss, stats = model(**{k: batch[k] for k in TENSOR_KEYS})
                (loss / (world * accum)).backward()
                total += stats
                ids.setdefault((rank, step), []).extend(_ids(batch))
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        out.append(float((total[0] + total[2]) / (total[1] + total[3])))
    return out, ids, rows


# ---------------------------------------------------------------------------------------------- checks


def _check_epoch_once(trained: list[str], rest: list, fitting: set[str]) -> None:
    """The `_id`s trained before and after the resume, then the new ranks' micro batches up to the end of
    the first epoch, hold every fitting pair once. The micro batch that crosses into the next epoch holds
    documents of both: it counts for coverage, not for repeats."""
    seen = list(trained)
    boundary: list[str] = []
    for it in rest:
        for batch, epoch in it:
            if epoch > 0:
                boundary += _ids(batch)
                break
            seen += _ids(batch)
    repeated = [i for i, n in Counter(seen).items() if n > 1]
    assert not repeated, f"pairs trained twice in the first epoch: {repeated[:5]}"
    assert set(seen) <= fitting
    dropped = fitting - set(seen) - set(boundary)
    assert not dropped, f"pairs of the first epoch never trained: {sorted(dropped)[:5]}"


def _check_resumed(run_dir: Path, step_dir: Path, before: list[dict], new_world: int, reference: dict,
                   fitting: set[str], saved: dict) -> None:
    got = losses(run_dir)
    assert sorted(got) == list(range(1, N + 1))
    plain, ids, rest = _plain_continuation(run_dir, step_dir, saved, new_world, N - K)
    assert [got[s] for s in range(K + 1, N + 1)] == pytest.approx(plain, rel=2e-5)
    after = [line for line in _trace(run_dir) if line["step"] > K]
    assert sorted((line["rank"], line["step"]) for line in after) == sorted(ids)
    assert {(line["rank"], line["step"]): line["ids"] for line in after} == ids
    _check_epoch_once([i for line in before + after for i in line["ids"]], rest, fitting)
    # The data order differs from the uninterrupted run's, and per-step losses of two data orders of
    # this tiny run differ by up to ~0.3 nats: compare where on the curve the resumed steps sit. They
    # are nearer the uninterrupted run's steps 4-6 than its steps 1-3 (where a restart would be), and
    # the first resumed loss is well under the untrained model's (step 1, ~7.3 nats).
    later, earlier = range(K + 1, N + 1), range(1, K + 1)
    resumed = sum(got[s] for s in later) / len(later)
    near, far = (abs(resumed - sum(reference[s] for s in r) / len(r)) for r in (later, earlier))
    assert near < far, (resumed, near, far)
    assert got[K + 1] < reference[1] - 0.3


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, request) -> Path:
    """One process, ZeRO-3, global batch 4 (2 micro batches of 2), steps 1-6 with checkpoints at 3 and 6."""
    request.getfixturevalue("in_process")
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(overrides(run_dir, train__deepspeed="zero3.json", **SETTINGS)) == 0
    return run_dir


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.usefixtures("in_process")
def test_two_ranks_resumed_by_one(stage, tmp_path, uninterrupted, fitting_ids, caplog, capfd):
    """(a) World size 2 to step 3, then one process to step 6 (ZeRO-1 and 2: through the universal
    checkpoint; ZeRO-0: nothing partitioned, loaded as it is)."""
    from ds_train import distributed
    from ds_train.train import Trainer

    run_dir = tmp_path / "run"
    settings = dict(SETTINGS, train__deepspeed=f"zero{stage}.json")
    proc = _launch_two_ranks(run_dir, train__stop_at_step=K, **settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step_dir = run_dir / "checkpoints" / f"step-{K}"
    assert json.loads((step_dir / "ds_train.json").read_text())["world_size"] == 2
    before = _trace(run_dir)
    saved = _saved_state(run_dir, step_dir)
    if stage > 0:  # the other ranks' wait for the conversion has its own timeout; a bad one is one line
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DS_TRAIN_CONVERT_TIMEOUT", "later")
            assert main(overrides(run_dir, **settings)) == 2
        lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("ds-train:")]
        assert lines == ["ds-train: DS_TRAIN_CONVERT_TIMEOUT='later' is not a number of seconds"]
        assert not (step_dir / "universal").exists()

    # Right after loading: the engine holds the saved weights, moments, step count and schedule.
    cfg = load_config(None, overrides(run_dir, **settings))
    trainer = Trainer(cfg, distributed.init())
    trainer._build(trainer._prepare())
    with caplog.at_level(logging.INFO):
        step, _, data_state = trainer._resume()
    assert step == K and data_state["format"] == STATE_FORMAT
    assert any("resharding it from 2 to 1 ranks" in r.getMessage() for r in caplog.records)
    loaded = _engine_state(trainer)
    for key in STATE_KEYS:
        assert set(loaded[key]) == set(saved[key])
        for name, tensor in saved[key].items():
            assert torch.equal(loaded[key][name], tensor), (key, name)
    base = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert {float(base.state[p]["step"]) for g in base.param_groups for p in g["params"]} == {float(K)}
    assert trainer.engine.global_steps == K and trainer.scheduler.last_epoch == K
    assert (step_dir / "universal" / "converted.json").is_file() == (stage > 0)
    del trainer

    with caplog.at_level(logging.INFO):
        assert main(overrides(run_dir, **settings)) == 0
    if stage > 0:
        assert any("reusing the universal checkpoint" in r.getMessage() for r in caplog.records)
    assert any(f"resumed from {step_dir} (step {K})" in r.getMessage() for r in caplog.records)
    _check_resumed(run_dir, step_dir, before, 1, losses(uninterrupted), fitting_ids, saved)


def test_one_rank_resumed_by_two(tmp_path, uninterrupted, fitting_ids):
    """(b) ZeRO-3: one process to step 3 (the uninterrupted run's first half), then world size 2 to step 6."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step-{N}")
    (run_dir / "checkpoints" / "latest").write_text(f"step-{K}")
    before = [line for line in _trace(run_dir) if line["step"] <= K]
    (run_dir / "trace" / "rank0.jsonl").write_text("".join(json.dumps(line) + "\n" for line in before))
    step_dir = run_dir / "checkpoints" / f"step-{K}"

    proc = _launch_two_ranks(run_dir, train__deepspeed="zero3.json", **SETTINGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "resharding it from 1 to 2 ranks" in out
    assert "rank 1 has no saved RNG state" in out
    assert f"resumed from {step_dir} (step {K})" in out
    saved = _saved_state(run_dir, step_dir)
    _check_resumed(run_dir, step_dir, before, 2, losses(uninterrupted), fitting_ids, saved)


@pytest.mark.usefixtures("in_process")
def test_one_rank_resumed_with_other_workers_and_micro_batch(tmp_path, fitting_ids, caplog):
    """The same one rank, micro batch 2 and no dataloader workers to step 3, then micro batch 1 (4 micro
    batches a step, the same global batch) and 2 workers to step 6: the steps before and after the
    change, then the rest of the epoch read from the step-6 state, hold every fitting pair once."""
    run_dir = tmp_path / "run"
    assert main(overrides(run_dir, train__stop_at_step=K, **SETTINGS)) == 0
    with caplog.at_level(logging.INFO):
        assert main(overrides(run_dir, data__num_workers=2, train__micro_batch_size=1, **SETTINGS)) == 0
    assert any(f"(step {K})" in r.getMessage() and r.getMessage().startswith("resumed from")
               for r in caplog.records)
    trace = _trace(run_dir)
    assert sorted(line["step"] for line in trace) == list(range(1, N + 1))
    assert [len(line["batches"]) for line in trace] == [2] * K + [4] * (N - K)
    trained = [i for line in trace for i in line["ids"]]
    rest = _new_rank_batches(run_dir, run_dir / "checkpoints" / f"step-{N}", 1, 0, micro=1, workers=2)
    _check_epoch_once(trained, [rest], fitting_ids)
    rest.close()


def test_resharding_refuses_unconvertible_checkpoints(tmp_path):
    """A tag DeepSpeed cannot convert: one-line errors."""
    from ds_train.checkpoint import CheckpointError, convert_to_universal

    (tmp_path / "step-3").mkdir()
    with pytest.raises(CheckpointError) as err:
        convert_to_universal(tmp_path / "step-3")
    head = f"DeepSpeed could not convert {tmp_path / 'step-3'} to a universal checkpoint ("
    assert str(err.value).startswith(head)
    assert "\n" not in str(err.value) and not (tmp_path / "step-3" / "universal").exists()
    # Files of the right names that do not unpickle: still one line, and no scratch folder left behind.
    torn = tmp_path / "step-4"
    torn.mkdir()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (torn / name).write_bytes(b"\x80\x02not a pickle" * 64)
    with pytest.raises(CheckpointError) as err:
        convert_to_universal(torn)
    assert str(err.value).startswith(f"DeepSpeed could not convert {torn} to a universal checkpoint (")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in torn.iterdir()) == ["mp_rank_00_model_states.pt",
                                                      "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
