"""`ds-eval loss` on `ds-export` directories, against two references written plainly here:

- the project's model with the training process's live fp32 weights, one document at a time (no packing);
- the *original method* on the exported directory alone (`transformers` GPT-Neo + modality_map.json):
  code tokens in S fed as their duplicate rows V + i, the full V + |S| logits, the forbidden columns of
  each target's modality set to -inf (code targets: the columns of S; text targets: V..V+|S|-1),
  per-token cross entropy in float64, mean over targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eval.loss import main

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "assets" / "tokenizer"
PAIRS = ROOT / "tests" / "assets" / "tiny_pairs.jsonl"
SEQ_LEN = 256
CASES = [(1, "none"), (2, "partial"), (3, "full")]  # (ZeRO stage, separation)


def train_checkpoint(run_dir: Path, stage: int, separation: str) -> None:
    """Two steps of a tiny GPTNeo under a real DeepSpeed engine, saved as the trainer saves; the live fp32
    weights go to reference.pt."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from ds_train import checkpoint
    from ds_train.data.tokenizer import load_tokenizer, separated_ids
    from ds_train.model import GPTNeo, GPTNeoConfig

    tok = load_tokenizer(TOKENIZER)
    config = GPTNeoConfig.from_flavor(
        "tiny",
        vocab_size=len(tok),
        separated_ids=separated_ids(TOKENIZER, separation),
        pad_token_id=tok.pad_token_id,
        n_layer=2,
        d_model=32,
        n_head=2,
        n_positions=SEQ_LEN,
        window_size=16,
    )
    torch.manual_seed(stage)
    model = GPTNeo(config)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-2), config=ds_config
    )
    g = torch.Generator().manual_seed(stage)
    for _ in range(2):
        ids = torch.randint(0, config.vocab_size, (2, 32), generator=g)
        code = torch.rand(2, 32, generator=g) > 0.5
        loss, _ = engine(ids, modality=code, target=torch.arange(32).expand(2, 32) > 0)
        engine.backward(loss)
        engine.step()
    meta = {"model": config.to_dict(), "separation": separation, "objective": "code_clm", "zero_stage": stage}
    checkpoint.save(engine, run_dir / "checkpoints", 2, meta, {}, TOKENIZER, 3, 0, 1)
    weights = {n: safe_get_full_fp32_param(p).clone() for n, p in model.named_parameters()}
    torch.save(weights, run_dir / "reference.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from ds_train import distributed

    root = tmp_path_factory.mktemp("loss_runs")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(var, raising=False)
        mp.setenv("DS_ACCELERATOR", "cpu")
        distributed.init()
        for stage, separation in CASES:
            train_checkpoint(root / separation, stage, separation)
    return {separation: root / separation for _, separation in CASES}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """60 pairs of the tiny corpus plus two bad records (skipped and counted)."""
    lines = PAIRS.read_text().splitlines()[:60]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text(
        "\n".join([*lines[:30], "{not json", json.dumps({"_id": "x", "code": "def f ( ) :"}), *lines[30:]])
        + "\n"
    )
    return path


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[tuple[str, str], Path]:
    from ds_train.export import export

    root = tmp_path_factory.mktemp("loss_exports")
    return {
        (sep, dtype): export(run, root / f"{sep}-{dtype}", dtype=dtype).out_dir
        for sep, run in runs.items()
        for dtype in ("fp32", "fp16")
    }


def ds_eval_loss(capsys, model: Path, data: Path, objective: str = "code_clm") -> dict:
    rc = main(
        [
            "--model",
            str(model),
            "--data",
            str(data),
            "--objective",
            objective,
            "--batch-size",
            "3",
            "--seq-len",
            str(SEQ_LEN),
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    return json.loads(out[-1])


def documents(tokenizer, data: Path, objective: str) -> list[tuple[torch.Tensor, ...]]:
    """(ids, is_code, is_target, is_prefix) of every pair that fits a row, encoded by the data Encoder
    (Corrupt Code CLM: the corruption of epoch 0)."""
    from ds_train.data.encode import Encoder, flags
    from ds_train.data.sources import SkipCounter, read_pairs

    encoder = Encoder(tokenizer, objective)
    docs = []
    for pair_id, ids, segments in encoder.layout(list(read_pairs(str(data), SkipCounter(quiet=True)))):
        if len(ids) > SEQ_LEN:
            continue
        if objective == "corrupt_code_clm":
            ids = encoder.corruption(pair_id, ids, segments, 0)
        modality, target, prefix = (torch.as_tensor(f).bool() for f in flags(segments, objective))
        docs.append((torch.as_tensor(ids), modality, target, prefix))
    return docs


def project_loss_per_document(run: Path, data: Path, objective: str) -> tuple[float, int]:
    """The project's loss with the checkpoint's live weights, each document alone (batch of one)."""
    from ds_train.data.tokenizer import load_tokenizer
    from ds_train.model import GPTNeo, GPTNeoConfig

    meta = json.loads((run / "checkpoints" / "step-2" / "ds_train.json").read_text())
    model = GPTNeo(GPTNeoConfig.from_dict(meta["model"])).eval()
    model.load_state_dict(torch.load(run / "reference.pt", weights_only=True))
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, code, target, prefix in documents(load_tokenizer(TOKENIZER), data, objective):
            _, stats = model(ids[None], modality=code[None], target=target[None], prefix=prefix[None])
            total += float(stats[0] + stats[2])
            count += int(stats[1] + stats[3])
    return total / count, count


def original_method_loss(export_dir: Path, data: Path, objective: str) -> tuple[float, int]:
    """The original MRPT loss from the exported directory alone, in float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mapping = json.loads((export_dir / "modality_map.json").read_text())
    V, S = mapping["base_vocab_size"], mapping["separated_ids"]
    slot = {s: i for i, s in enumerate(S)}
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    losses = []
    with torch.no_grad():
        for ids, code, target, _ in documents(tokenizer, data, objective):
            fed = torch.tensor(
                [V + slot[int(x)] if c and int(x) in slot else int(x) for x, c in zip(ids, code)]
            )
            logits = model(fed[None]).logits[0]  # (n, V + |S|)
            for t in range(1, len(ids)):
                if not target[t]:
                    continue
                row = logits[t - 1].clone()
                if code[t]:
                    row[S] = -torch.inf
                else:
                    row[V:] = -torch.inf
                losses.append(-torch.log_softmax(row, dim=-1)[fed[t]])
    return float(torch.stack(losses).mean()), len(losses)


@pytest.mark.parametrize(
    "separation, objective",
    [
        ("none", "code_clm"),
        ("partial", "code_clm"),
        ("full", "code_clm"),
        ("partial", "text_code_clm"),
        ("partial", "corrupt_code_clm"),
        ("full", "prefix_code_clm"),
    ],
)
def test_loss_equals_project_loss_from_checkpoint_weights(capsys, runs, exports, data, separation, objective):
    got = ds_eval_loss(capsys, exports[separation, "fp32"], data, objective)
    loss, count = project_loss_per_document(runs[separation], data, objective)
    assert got["targets"] == count > 100
    assert got["loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize(
    "separation, objective, dtype",
    [
        ("none", "code_clm", "fp32"),
        ("partial", "code_clm", "fp32"),
        ("partial", "code_clm", "fp16"),
        ("full", "code_clm", "fp16"),
        ("partial", "text_code_clm", "fp32"),
    ],
)
def test_loss_equals_original_method_on_the_export_alone(capsys, exports, data, separation, objective, dtype):
    export_dir = exports[separation, dtype]
    got = ds_eval_loss(capsys, export_dir, data, objective)
    loss, count = original_method_loss(export_dir, data, objective)
    assert got["targets"] == count
    assert got["loss"] == pytest.approx(loss, rel=1e-5)


def test_plain_gpt_neo_directory_without_modality_map(capsys, exports, data, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(exports["none", "fp32"], plain)
    (plain / "modality_map.json").unlink()
    assert ds_eval_loss(capsys, plain, data) == ds_eval_loss(capsys, exports["none", "fp32"], data)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--model", "{tmp}", "--data", "{data}"], "not a transformers model directory"),
        (["--model", "{export}", "--data", "{tmp}/missing.jsonl"], "missing.jsonl"),
        (["--model", "{export}", "--data", "{data}", "--objective", "mlm"], "mlm"),
        (["--model", "{export}", "--data", "{data}", "--seq-len", "4096"], "exceeds"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(capsys, exports, data, tmp_path, argv, fragment):
    fill = {"tmp": tmp_path, "data": data, "export": exports["partial", "fp32"]}
    rc = main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("ds-eval loss: ") and fragment in err[-1], err


@pytest.mark.slow
def test_python_dash_m_eval_loss_and_the_ds_export_script(exports, data, runs, tmp_path):
    """Both entry points as real processes: the JSON last line, and one error line with exit code 2."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    model = exports["partial", "fp32"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval.loss",
            "--model",
            str(model),
            "--data",
            str(data),
            "--seq-len",
            str(SEQ_LEN),
            "--device",
            "cpu",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(got) == {"loss", "targets"}
    assert got["loss"] == pytest.approx(
        project_loss_per_document(runs["partial"], data, "code_clm")[0], rel=1e-5
    )
    export_script = Path(sys.executable).parent / "ds-export"
    cmd = [str(export_script)] if export_script.is_file() else [sys.executable, "-m", "ds_train.export"]
    proc = subprocess.run(
        [*cmd, str(data.parent), str(tmp_path / "out")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()  # one line, naming the directory
    assert line.startswith(f"ds-export: {data.parent} is not a checkpoint"), line
