"""Reliability under faults, with the real DeepSpeed engine on the CPU.

- world size 2 under the deepspeed launcher: a rank SIGKILLed at a seeded step (twice), then SIGTERM to
  the whole process group (ranks save and stop), then a clean finish; the losses equal an uninterrupted
  world-size-2 run's exactly and the `_id` trace shows every example once per epoch;
- torn checkpoints (truncated, missing file, no marker) are passed over with one warning line and the
  previous one is resumed; a checkpoint of another configuration is refused, one line per difference;
- a write error during a save (file-size limit) stops the run with one line, older checkpoints intact;
- a non-finite loss stops the run naming the step and `_id`s, or is skipped and counted;
- bad data in the middle of the stream (malformed lines, a corrupt Parquet file, a file that vanishes
  between a stop and a resume) is skipped, counted and reported with file and position.

fp16 (loss-scaler overflow) needs a GPU: not tested here.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from ds_train import checkpoint
from ds_train.distributed import free_port
from ds_train.train import main
from tests.test_train import ASSETS, ROOT, _launch_two_ranks, losses, overrides

pytestmark = pytest.mark.slow  # every test here starts ranks or runs whole jobs

SEQ_LEN = 128


def _layout_lengths(pairs: list[dict]) -> list[int]:
    """Token count of each pair's §2 layout (what decides `too_long`)."""
    from ds_train.data.encode import Encoder
    from ds_train.data.sources import Pair, SkipCounter
    from ds_train.data.tokenizer import load_tokenizer

    encoder = Encoder(load_tokenizer(ASSETS / "tokenizer"), "code_clm", seed=0)
    pairs_ = [Pair(p["_id"], p["docstring"], p["code"]) for p in pairs]
    return [len(ids) for _, ids, _ in encoder.layout(pairs_, SkipCounter(quiet=True))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str], set[str]]:
    """36 pairs that fit SEQ_LEN and 4 that do not, mixed: (file, `_id`s in file order, overlong `_id`s)."""
    pairs = [json.loads(line) for line in (ASSETS / "tiny_pairs.jsonl").read_text().splitlines()]
    lengths = _layout_lengths(pairs)
    fit = [p for p, n in zip(pairs, lengths) if n <= SEQ_LEN][:36]
    long = [p for p, n in zip(pairs, lengths) if n > SEQ_LEN][:4]
    chosen = fit[:9] + long[:1] + fit[9:18] + long[1:2] + fit[18:27] + long[2:3] + fit[27:] + long[3:]
    path = tmp_path_factory.mktemp("corpus") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in chosen))
    return path, [p["_id"] for p in chosen], {p["_id"] for p in long}


# ---------------------------------------------------------------------------------------------- world size 2

CHAIN = {"data__num_workers": 2, "data__trace_ids": "true", "train__max_steps": 10,
         "checkpoint__every_steps": 2, "checkpoint__keep_last": 2}
WORKERS = 2


def _start_two_ranks(run_dir: Path, **extra) -> subprocess.Popen:
    """`_launch_two_ranks`, started in its own process group and not waited for."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(free_port()), "--module", "ds_train.train", *overrides(run_dir, **extra)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The job's output once every process holding its pipe has ended; a job still running after
    `timeout` seconds is a hang: `proc`, every process below it and their process groups are killed (a
    supervised job runs in a session of its own, out of reach of `proc`'s group) and the test fails."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        pass
    try:  # listed before any kill: a killed parent's children move to init, out of this tree
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    groups = {proc.pid}  # their groups too: the job's own session, a process forked after the listing
    for p in tree:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    for pgid in groups - {os.getpgrp()}:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in tree:  # `proc` itself in the caller's group, one that made a group of its own
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        out = proc.communicate(timeout=10)[0]
    except subprocess.TimeoutExpired:  # a process outside the tree still holds the pipe: don't block on it
        out = "(output not read: the pipe is still held open)"
    raise AssertionError(f"the job did not end within {timeout} s: {out[-3000:]}")


def _trace_lines(run_dir: Path, rank: int) -> list[dict]:
    """The complete lines of a rank's trace (one being written while we read is left for the next poll)."""
    path = run_dir / "trace" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.is_file() else []


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, rank: int, step: int, seen_before: int) -> None:
    """Poll `rank`'s trace until this run (lines after `seen_before`) shows `step`."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if any(rec["step"] >= step for rec in _trace_lines(run_dir, rank)[seen_before:]):
            return
        assert proc.poll() is None, f"the run ended before step {step}: {_finish(proc, timeout=60)[-3000:]}"
        time.sleep(0.05)
    try:
        _finish(proc, timeout=0)  # kills the run's whole process tree
    except AssertionError as e:
        raise AssertionError(f"rank {rank} did not reach step {step}; {e}") from None
    raise AssertionError(f"rank {rank} did not reach step {step}")


def _rank_process(proc: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of `rank`: a child of DeepSpeed's per-node launch.py (not a dataloader worker)."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        if "deepspeed.launcher.launch" in " ".join(child.cmdline()):
            for p in child.children():
                if p.environ().get("RANK") == str(rank):
                    return p
    raise AssertionError(f"no process of rank {rank}")


def _resumed_step(output: str) -> int:
    lines = [ln for ln in output.splitlines() if "resumed from" in ln]
    assert lines, output[-3000:]
    return int(lines[-1].rsplit("(step ", 1)[1].split(")")[0])


def _kill_one_rank(run_dir: Path, seed: int, after: int, extra: dict) -> int:
    """Start the job, SIGKILL the seed's rank when its trace shows the seed's step; returns that step."""
    rng = random.Random(seed)
    rank, step = rng.randrange(2), rng.randrange(after + 1, after + 4)
    seen = len(_trace_lines(run_dir, rank))
    proc = _start_two_ranks(run_dir, **extra)
    _wait_for_step(proc, run_dir, rank, step, seen)
    _rank_process(proc, rank).send_signal(signal.SIGKILL)
    out = _finish(proc)  # the launcher ends the job: no hang
    assert proc.returncode != 0, out[-3000:]
    assert f"ds-train: rank {1 - rank} lost contact with the other ranks" in out, out[-3000:]
    assert "Traceback" not in out
    return step


def _sigterm_all(run_dir: Path, after: int, extra: dict) -> tuple[int, str]:
    """Start the job, SIGTERM its whole process group (launcher, ranks, workers) after step `after` + 1."""
    seen = len(_trace_lines(run_dir, 0))
    proc = _start_two_ranks(run_dir, **extra)
    _wait_for_step(proc, run_dir, 0, after + 1, seen)
    os.killpg(proc.pid, signal.SIGTERM)
    out = _finish(proc)  # the ranks save and exit; DeepSpeed's launch.py waits for them (at most 30 s)
    return _resumed_step(out), out


def _last_per_step(run_dir: Path) -> dict[tuple[int, int], dict]:
    """(rank, step) -> the trace line written last (a resumed run re-trains the steps after its checkpoint)."""
    return {(rec["rank"], rec["step"]): rec for rank in (0, 1) for rec in _trace_lines(run_dir, rank)}


def _check_once_per_epoch(trace: dict[tuple[int, int], dict], ids: list[str], overlong: set[str]) -> None:
    """The trained `_id`s in the stream's order (step, micro batch, rank: micro batch m of a step went to
    rank m % 2) run through the fitting pairs once per epoch: each full epoch is all of them."""
    fitting = set(ids) - overlong
    seq: list[str] = []
    for step in sorted({s for _, s in trace}):
        per_rank = [trace[(rank, step)]["batches"] for rank in (0, 1)]
        for micro in range(len(per_rank[0])):
            for rank in (0, 1):
                seq += per_rank[rank][micro]["ids"]
    epochs = 0
    for start in range(0, len(seq), len(fitting)):
        chunk = seq[start:start + len(fitting)]
        assert len(set(chunk)) == len(chunk), "an example twice in one epoch"
        assert set(chunk) <= fitting
        epochs += len(chunk) == len(fitting)
    assert epochs >= 1, "the run should span at least one full epoch"


def test_kills_and_sigterm_resume_exactly(tmp_path, corpus):
    """SIGKILL a rank twice (seeded rank and step), then SIGTERM everything, then finish: the same losses
    and the same batches as an uninterrupted run; every example once per epoch; no hang."""
    path, ids, overlong = corpus
    extra = dict(CHAIN, data__source=str(path))
    ref = _launch_two_ranks(tmp_path / "ref", **extra)
    assert ref.returncode == 0, ref.stderr[-3000:]
    for rank in (0, 1):  # each rank reports the corpus's overlong pairs, counted once when it was packed
        assert f"rank {rank} skipped input records: too_long={len(overlong)}" in ref.stderr

    run = tmp_path / "run"
    k1 = _kill_one_rank(run, seed=1, after=1, extra=extra)  # rank 0 at step 4
    k2 = _kill_one_rank(run, seed=7, after=k1, extra=extra)  # rank 1 at step 5
    assert k2 > k1
    _, out = _sigterm_all(run, after=k2, extra=extra)
    stops = [ln for ln in out.splitlines() if "stopped at step" in ln and "after a signal" in ln]
    assert {ln.split("rank ")[1].split()[0] for ln in stops} == {"0", "1"}, out[-3000:]
    stopped = int(stops[0].split("stopped at step ")[1].split()[0])
    assert "Traceback" not in out
    found = checkpoint.find_latest(run / "checkpoints")
    assert found.step == stopped and found.meta["world_size"] == 2
    assert sorted(p.name for p in found.path.glob("data_rank*.pt")) == ["data_rank0.pt", "data_rank1.pt"]

    done = _launch_two_ranks(run, **extra)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _resumed_step(done.stdout + done.stderr) == stopped

    assert losses(run) == losses(tmp_path / "ref")  # exact on the CPU, every step 1..10
    got, want = _last_per_step(run), _last_per_step(tmp_path / "ref")
    assert set(got) == {(r, s) for r in (0, 1) for s in range(1, 11)}
    assert {k: v["ids"] for k, v in got.items()} == {k: v["ids"] for k, v in want.items()}
    _check_once_per_epoch(got, ids, overlong)


@pytest.mark.parametrize("sig, rank", [(signal.SIGINT, 1), (signal.SIGTERM, 0)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_one_rank_saves_and_exits_zero(tmp_path, corpus, sig, rank):
    """Ctrl-C or a pre-emption notice that reaches one rank only: every rank finishes its step, a complete
    checkpoint of both ranks is saved at that step, and the job exits 0."""
    run_dir = tmp_path / "run"
    extra = {"data__source": str(corpus[0]), "data__trace_ids": "true", "train__max_steps": 40,
             "checkpoint__every_steps": 100}
    proc = _start_two_ranks(run_dir, **extra)
    _wait_for_step(proc, run_dir, rank, 2, 0)
    _rank_process(proc, rank).send_signal(sig)
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    stops = [ln for ln in out.splitlines() if "stopped at step" in ln and "after a signal" in ln]
    assert {ln.split("rank ")[1].split()[0] for ln in stops} == {"0", "1"}, out[-3000:]
    stopped = {int(ln.split("stopped at step ")[1].split()[0]) for ln in stops}
    assert len(stopped) == 1 and 2 <= min(stopped) < 40
    found = checkpoint.locate(run_dir)  # complete, every file matching its checksum
    assert (found.step, found.meta["world_size"]) == (stopped.pop(), 2)
    assert {"data_rank0.pt", "data_rank1.pt", "rng_rank0.pt", "rng_rank1.pt"} <= set(found.meta["files"])


# ---------------------------------------------------------------------------------------------- one process

BASE = {"train__max_steps": 4, "checkpoint__every_steps": 2}


@pytest.fixture(scope="module")
def in_process():
    """In-process runs need launcher variables of a world of one (see tests/test_train.py)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(var, raising=False)
        mp.setenv("DS_ACCELERATOR", "cpu")
        yield


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus, in_process) -> Path:
    """One process, 4 steps, checkpoints step-2 and step-4."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    assert main(overrides(run_dir, data__source=str(corpus[0]), **BASE)) == 0
    return run_dir


def _copy(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


def _tear(tag_dir: Path, how: str) -> str:
    """Damage a checkpoint the way a crash or a bad disk would; returns what the warning must say."""
    if how == "truncated":
        biggest = max(tag_dir.glob("*.pt"), key=lambda p: p.stat().st_size)
        size = biggest.stat().st_size
        os.truncate(biggest, size // 2)
        return f"{biggest.name} has {size // 2} bytes, the save wrote {size} (truncated or changed)"
    if how == "missing_rank_file":
        (tag_dir / "rng_rank0.pt").unlink()
        return "rng_rank0.pt is missing"
    if how == "corrupted":  # a bad disk: one byte changed, the size kept
        biggest = max(tag_dir.glob("*.pt"), key=lambda p: p.stat().st_size)
        data = bytearray(biggest.read_bytes())
        data[len(data) // 2] ^= 0x01
        biggest.write_bytes(bytes(data))
        return f"{biggest.name} does not match its checksum (crc32 "
    (tag_dir / checkpoint.MARKER).unlink()  # the save was interrupted before the marker
    return "no ds_train.json marker (the save did not finish)"


def _warnings(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and needle in r.getMessage()]


@pytest.mark.parametrize("how", ["truncated", "missing_rank_file", "no_marker", "corrupted"])
def test_torn_checkpoint_is_passed_over(how, base_run, tmp_path, caplog):
    ckpts = _copy(base_run / "checkpoints", tmp_path / "checkpoints")
    why = _tear(ckpts / "step-4", how)
    with caplog.at_level(logging.WARNING, logger="ds_train.checkpoint"):
        found = checkpoint.find_latest(ckpts, checksums=True)
    assert found.step == 2
    [line] = _warnings(caplog, "incomplete")
    assert line.startswith(f"checkpoint {ckpts / 'step-4'} is incomplete and is skipped: {why}"), line


@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_torn_latest_resumes_the_previous_one(how, base_run, tmp_path, corpus, caplog):
    """Through ds-train: step-4 truncated or corrupted, the run resumes step-2 and re-trains steps 3-4
    exactly."""
    run_dir = _copy(base_run, tmp_path / "run")
    why = _tear(run_dir / "checkpoints" / "step-4", how)
    with caplog.at_level(logging.INFO):
        assert main(overrides(run_dir, data__source=str(corpus[0]), **BASE)) == 0
    assert [why in line for line in _warnings(caplog, "step-4 is incomplete")] == [True]
    assert any("resumed from" in r.getMessage() and "step-2" in r.getMessage() for r in caplog.records)
    assert losses(run_dir) == losses(base_run)  # steps 3 and 4 re-trained from step-2: the same losses
    assert checkpoint.is_complete(run_dir / "checkpoints" / "step-4") == (True, "")


def test_checkpoint_of_another_configuration_is_refused(base_run, tmp_path, corpus, capsys):
    run_dir = _copy(base_run, tmp_path / "run")
    before = (run_dir / "metrics.jsonl").read_text()
    code = main(overrides(run_dir, data__source=str(corpus[0]), objective__separation="none",
                          objective__name="text_code_clm", train__max_steps=6, checkpoint__every_steps=2))
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    from ds_train.data.tokenizer import separated_ids

    partial = separated_ids(ASSETS / "tokenizer", "partial")
    assert lines[0] == (f"ds-train: checkpoint {run_dir / 'checkpoints' / 'step-4'} does not match this run "
                        "(use another run.dir, or checkpoint.resume=false):")
    assert sorted(lines[1:]) == sorted([
        f"ds-train: model.separated_ids: checkpoint {checkpoint._short(list(partial))} vs run []",
        "ds-train: separation: checkpoint 'partial' vs run 'none'",
        "ds-train: objective: checkpoint 'code_clm' vs run 'text_code_clm'",
    ]), lines
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing trained


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_during_a_save_stops_cleanly(base_run, tmp_path, corpus, caplog):
    """A write error in the step-6 save (every file capped at 256 KiB): one line, exit 2, step-4 intact."""
    run_dir = _copy(base_run, tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    cmd = [sys.executable, "-m", "ds_train.train",
           *overrides(run_dir, data__source=str(corpus[0]), train__max_steps=6, checkpoint__every_steps=2)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env={**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(256 << 10))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ds-train: rank 0 could not write checkpoint {run_dir / 'checkpoints' / 'step-6'} (")
    assert last.endswith(f"{run_dir / 'checkpoints' / 'step-4'} is intact and a restart resumes from it")
    assert "Traceback" not in proc.stderr
    assert checkpoint.find_latest(run_dir / "checkpoints").step == 4
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-4"
    assert checkpoint.is_complete(run_dir / "checkpoints" / "step-2") == (True, "")
    assert not (run_dir / "checkpoints" / "step-6" / checkpoint.MARKER).exists()
    with caplog.at_level(logging.INFO):  # space again: the restart loads step-4 and saves step-6 anew
        assert main(overrides(run_dir, data__source=str(corpus[0]), train__max_steps=6, checkpoint__every_steps=2)) == 0
    assert any("resumed from" in r.getMessage() and "step-4" in r.getMessage() for r in caplog.records)
    assert checkpoint.is_complete(run_dir / "checkpoints" / "step-6") == (True, "")


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file's bytes (config.yaml included: a run writes it only once it is accepted)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_refuses_when_no_checkpoint_can_be_read(base_run, tmp_path, corpus, capsys):
    """Every marker unreadable: one line, exit 2, and nothing in the run directory changed (no restart
    from step 0 that would append metrics, overwrite and prune the checkpoints)."""
    run_dir = _copy(base_run, tmp_path / "run")
    (run_dir / "checkpoints" / "step-2" / checkpoint.MARKER).write_text("[1, 2, 3]")
    (run_dir / "checkpoints" / "step-4" / checkpoint.MARKER).write_bytes(random.Random(0).randbytes(300))
    before = _snapshot(run_dir)
    assert main(overrides(run_dir, data__source=str(corpus[0]), **BASE)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [(f"ds-train: {run_dir / 'checkpoints'} holds checkpoints and none is complete and intact "
                     "(see the warnings above): move them away to start afresh, or use another run.dir")], lines
    assert _snapshot(run_dir) == before


def test_changed_model_shape_or_tokenizer_is_refused(base_run, tmp_path, corpus, capsys):
    """Another flavor (tiny: 2 layers of 64, 512 positions, window 32; debug: 4 of 256, 1024, 256), then a
    tokenizer whose files differ: refused with the difference named, nothing trained."""
    run_dir = _copy(base_run, tmp_path / "run")
    before = (run_dir / "metrics.jsonl").read_text()
    assert main(overrides(run_dir, data__source=str(corpus[0]), model__flavor="debug", **BASE)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].endswith("does not match this run (use another run.dir, or checkpoint.resume=false):")
    assert {"ds-train: model.n_layer: checkpoint 2 vs run 4", "ds-train: model.d_model: checkpoint 64 vs run 256",
            "ds-train: model.n_positions: checkpoint 512 vs run 1024",
            "ds-train: model.window_size: checkpoint 32 vs run 256"} <= set(lines[1:])
    assert all(line.startswith("ds-train: model.") for line in lines[1:])
    tokenizer = Path(shutil.copytree(ASSETS / "tokenizer", tmp_path / "tokenizer"))
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({**config, "comment": "another tokenizer"}))
    assert main(overrides(run_dir, data__source=str(corpus[0]), data__tokenizer=str(tokenizer), **BASE)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("ds-train: tokenizer_sha: checkpoint '"), lines
    assert (run_dir / "metrics.jsonl").read_text() == before


# ---------------------------------------------------------------------------------------------- bad numbers

NAN_FROM = 110  # position embeddings from here on are NaN: only batches with a document that long break


@pytest.fixture(scope="module")
def nan_positions_model(tmp_path_factory) -> Path:
    """A `transformers` GPT-Neo directory (tiny, our tokenizer) whose position rows >= NAN_FROM are NaN."""
    from safetensors.torch import save_file

    from ds_train.data.tokenizer import load_tokenizer, separated_ids
    from ds_train.hf import hf_config_dict, to_hf_state_dict
    from ds_train.model import GPTNeo, GPTNeoConfig

    tok = load_tokenizer(ASSETS / "tokenizer")
    cfg = GPTNeoConfig.from_flavor("tiny", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                   separated_ids=tuple(separated_ids(tok, "partial")))
    torch.manual_seed(0)
    state = GPTNeo(cfg).state_dict()
    state["wpe.weight"][NAN_FROM:] = float("nan")
    out = tmp_path_factory.mktemp("nan_model")
    hf = {k: v.clone() for k, v in to_hf_state_dict(state, cfg).items() if k != "lm_head.weight"}  # tied
    save_file(hf, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    return out


def _batches_reaching(corpus_path: Path, count: int) -> list[tuple[bool, list[str]]]:
    """The first `count` batches of a one-process run: (has a position >= NAN_FROM, `_id`s)."""
    from ds_train.data.stream import build_dataloader

    loader = build_dataloader([str(corpus_path)], ASSETS / "tokenizer", objective="code_clm", seq_len=SEQ_LEN,
                              micro_batch_size=2, seed=1234)
    out = []
    for batch, _ in zip(loader, range(count)):
        out.append((bool((batch["position_ids"] >= NAN_FROM).any()), [i for row in batch["ids"] for i in row]))
    return out


def test_nonfinite_loss_stops_naming_step_and_ids(nan_positions_model, corpus, tmp_path, capsys):
    batches = _batches_reaching(corpus[0], 12)
    bad = next(k for k, (broken, _) in enumerate(batches) if broken)
    assert bad >= 1, "the first batch should be finite"
    code = main(overrides(tmp_path / "run", data__source=str(corpus[0]), model__init_from=str(nan_positions_model),
                          train__max_steps=12, checkpoint__every_steps=12))
    assert code == 2
    ids = batches[bad][1]
    shown = f"{ids[:8]}{' ...' if len(ids) > 8 else ''}"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ds-train: non-finite loss at step {bad + 1} on rank 0, batch _ids {shown}; stopped without saving, "
        "the last checkpoint precedes it (train.nonfinite=skip skips such batches)")
    assert sorted(losses(tmp_path / "run")) == list(range(1, bad + 1))  # the steps before it were trained


def test_nonfinite_loss_skipped_and_counted(nan_positions_model, corpus, tmp_path):
    steps = 6
    batches = _batches_reaching(corpus[0], 24)
    good = [k for k, (broken, _) in enumerate(batches) if not broken]
    used = batches[:good[steps - 1] + 1]  # the batches read until `steps` finite ones were trained
    skipped = sum(broken for broken, _ in used)
    assert skipped >= 1
    assert main(overrides(tmp_path / "run", data__source=str(corpus[0]), model__init_from=str(nan_positions_model),
                          train__max_steps=steps, checkpoint__every_steps=steps, train__nonfinite="skip",
                          data__trace_ids="true")) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == steps and rows[-1]["train/skipped_steps"] == skipped
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
    trace = _trace_lines(tmp_path / "run", 0)
    assert [i for rec in trace for i in rec["skipped_ids"]] == [i for broken, ids in used if broken for i in ids]
    assert [i for rec in trace for i in rec["ids"]] == [i for broken, ids in used if not broken for i in ids]


def test_skipping_stops_when_the_weights_are_broken(corpus, tmp_path, capsys):
    """An absurd learning rate: step 1 trains, its update overflows the weights, every later batch is
    non-finite; `skip` gives up after `train.nonfinite_limit` of them in a row instead of eating the data."""
    code = main(overrides(tmp_path / "run", data__source=str(corpus[0]), optim__lr=1e30, optim__min_lr=1e30,
                          optim__warmup_ratio=0, train__nonfinite="skip", train__nonfinite_limit=3,
                          train__max_steps=6, checkpoint__every_steps=6))
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ds-train: 3 non-finite batches in a row up to step 2: the weights are likely no longer finite; "
        "resume from an earlier checkpoint with a lower optim.lr")
    assert sorted(losses(tmp_path / "run")) == [1]


# ---------------------------------------------------------------------------------------------- bad data


def test_bad_data_mid_stream_is_skipped_counted_and_reported(corpus, tmp_path, caplog, capsys):
    """A folder of three files: malformed lines, a truncated Parquet file, and a file deleted between a
    stop and the resume. The corpus is packed once before training: each bad record is reported with file
    and position and counted; the resume trains on the packed corpus it started with (the deleted file's
    pairs included)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [json.loads(line) for line in corpus[0].read_text().splitlines()]
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps(p) for p in pairs[:8]]
    lines[3], lines[5] = '{"_id": "broken", "docstring": ', '{"_id": "no-code", "docstring": "x"}'
    (data / "a.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist(pairs[8:28]), data / "b.parquet")
    (data / "b.parquet").write_bytes((data / "b.parquet").read_bytes()[:300])
    (data / "c.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[28:]))
    vanishing = data / "c.jsonl"
    settings = {"data__source": str(data), "train__max_steps": 5, "checkpoint__every_steps": 5,
                "data__trace_ids": "true"}
    with caplog.at_level(logging.INFO):
        assert main(overrides(tmp_path / "run", train__stop_at_step=1, **settings)) == 0
        vanishing.unlink()
        assert main(overrides(tmp_path / "run", **settings)) == 0
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5]
    messages = [r.getMessage() for r in caplog.records]
    assert f"skipped (malformed_json) at {data / 'a.jsonl'}:4: " in "\n".join(messages)
    assert f"skipped (missing_field) at {data / 'a.jsonl'}:6: code" in messages
    assert any(m.startswith(f"skipped (corrupt_file) at {data / 'b.parquet'}:row 0") for m in messages)
    assert any(m.startswith("data: reusing the packed corpus") for m in messages)
    trained = {i for rec in _trace_lines(tmp_path / "run", 0) for i in rec["ids"]}
    assert trained & {p["_id"] for p in pairs[28:]}  # the deleted file's pairs still train
    summary = capsys.readouterr().out
    assert "data skipped: " in summary
    for reason in ("malformed_json=1", "missing_field=1", "corrupt_file=1"):
        assert reason in summary.split("data skipped: ")[-1].splitlines()[0]
