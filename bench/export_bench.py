"""Time and peak RAM of `ds-export` on a pycodegpt-110m-sized checkpoint (CPU, world size 2).

    .venv/bin/python bench/export_bench.py [--work DIR] [--stages 2 3] [--precision fp32|bf16] [--baseline]

For each ZeRO stage: a synthetic 32k-token tokenizer (word level; the Python tokens are words, so partial
separation has a few hundred code rows) and a `pycodegpt-110m` GPTNeo are trained for one step by a real
DeepSpeed engine under `torchrun --nproc_per_node 2` (gloo) and saved as the trainer saves. Then
`ds-export` runs in a fresh process (fp16 output) and its wall time and peak RSS are reported; with
`--baseline`, DeepSpeed's own `zero_to_fp32` consolidation (+ fp16 cast + safetensors save) is measured
the same way for comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32_000
log = logging.getLogger("export_bench")


def make_tokenizer(out: Path) -> None:
    """A word-level tokenizer of VOCAB tokens with the project's special tokens and separation.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ds_train.data.tokenizer import SPECIAL_TOKENS, python_tokens, write_separation

    words = ["<unk>", *SPECIAL_TOKENS, *python_tokens()]
    words = list(dict.fromkeys(words))
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.save_pretrained(out)
    write_separation(tokenizer, out)


def worker(run_dir: Path, tokenizer_dir: Path, stage: int, precision: str) -> None:
    """One rank: build the model, one training step, save like the trainer."""
    import deepspeed

    from ds_train import checkpoint, distributed
    from ds_train.data.tokenizer import load_tokenizer, separated_ids
    from ds_train.model import GPTNeo, GPTNeoConfig

    dist = distributed.init()
    tok = load_tokenizer(tokenizer_dir)
    config = GPTNeoConfig.from_flavor(
        "pycodegpt-110m",
        vocab_size=len(tok),
        separated_ids=separated_ids(tokenizer_dir, "partial"),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = GPTNeo(config)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if precision == "bf16":
        ds_config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4), config=ds_config
    )
    ids = torch.randint(0, config.vocab_size, (1, 64))
    loss, _ = engine(
        ids, modality=torch.ones_like(ids, dtype=torch.bool), target=torch.ones_like(ids, dtype=torch.bool)
    )
    engine.backward(loss)
    engine.step()
    meta = {
        "model": config.to_dict(),
        "separation": "partial",
        "objective": "code_clm",
        "zero_stage": stage,
        "precision": precision,
    }
    checkpoint.save(
        engine, run_dir / "checkpoints", 1, meta, {}, tokenizer_dir, 1, dist.rank, dist.world_size
    )


def make_checkpoint(run_dir: Path, tokenizer_dir: Path, stage: int, precision: str) -> float:
    start = time.perf_counter()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        __file__,
        "--worker",
        str(run_dir),
        str(tokenizer_dir),
        str(stage),
        precision,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"checkpoint run failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def _free_port() -> int:
    from ds_train.distributed import free_port

    return free_port()


BASELINE = """
import sys, torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
sd = get_fp32_state_dict_from_zero_checkpoint(sys.argv[1], tag=sys.argv[2])
sd = {k: v.contiguous().half() for k, v in sd.items() if k != 'lm_head.weight'}
save_file(sd, sys.argv[3])
"""


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of a fresh process (run alone, so RUSAGE_CHILDREN is its peak)."""
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
        "p.returncode); print(p.stdout, end='')"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code, *cmd], env=env, capture_output=True, text=True, check=True
    )
    first, _, child_stdout = out.stdout.partition("\n")
    seconds, rss, rc = first.split()
    if rc != "0":
        raise SystemExit(f"{cmd} failed with exit code {rc}")
    return float(seconds), float(rss), child_stdout


def export_seconds(summary: str) -> float:
    """The time `ds-export` reports for its own work (after the interpreter and imports started)."""
    match = re.search(r", ([0-9.]+) s, peak RSS", summary)
    return float(match.group(1)) if match else float("nan")


def file_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def bench(work: Path, stages: list[int], precision: str, baseline: bool) -> list[dict]:
    tokenizer_dir = work / "tokenizer"
    if not tokenizer_dir.is_dir():
        make_tokenizer(tokenizer_dir)
    results = []
    for stage in stages:
        run = work / f"zero{stage}-{precision}"
        made = (
            make_checkpoint(run, tokenizer_dir, stage, precision)
            if not (run / "checkpoints").is_dir()
            else 0.0
        )
        out = work / f"export-zero{stage}"
        seconds, rss, summary = measure(
            [sys.executable, "-m", "ds_train.export", str(run), str(out), "--force", "--no-progress"]
        )
        row = {
            "stage": stage,
            "precision": precision,
            "world_size": 2,
            "checkpoint_mib": file_mib(run),
            "train_and_save_s": made,
            "export_s": seconds,
            "export_work_s": export_seconds(summary),
            "export_peak_rss_mib": rss,
            "safetensors_mib": (out / "model.safetensors").stat().st_size / 2**20,
        }
        if baseline:
            tag = (run / "checkpoints" / "latest").read_text().strip()
            target = str(work / "baseline.safetensors")
            seconds, rss, _ = measure([sys.executable, "-c", BASELINE, str(run / "checkpoints"), tag, target])
            row["zero_to_fp32_s"], row["zero_to_fp32_peak_rss_mib"] = seconds, rss
        results.append(row)
        log.info("%s", json.dumps(row))
    return results


def print_table(rows: list[dict], baseline: bool) -> None:
    head = (
        f"{'stage':>5} {'ckpt MiB':>9} {'export s':>9} {'(work s)':>9} {'peak RSS MiB':>13} {'fp16 MiB':>9}"
    )
    print(head + (f" {'zero_to_fp32 s':>15} {'its RSS MiB':>12}" if baseline else ""))
    for r in rows:
        line = (
            f"{r['stage']:>5} {r['checkpoint_mib']:>9.0f} {r['export_s']:>9.1f} {r['export_work_s']:>9.1f} "
            f"{r['export_peak_rss_mib']:>13.0f} {r['safetensors_mib']:>9.0f}"
        )
        if baseline:
            line += f" {r['zero_to_fp32_s']:>15.1f} {r['zero_to_fp32_peak_rss_mib']:>12.0f}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        run_dir, tokenizer_dir, stage, precision = argv[1:5]
        worker(Path(run_dir), Path(tokenizer_dir), int(stage), precision)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--baseline", action="store_true", help="also time DeepSpeed's zero_to_fp32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="export_bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = bench(work, args.stages, args.precision, args.baseline)
    print_table(rows, args.baseline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
