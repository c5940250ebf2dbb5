"""What a run reports, in one place (rank 0 only): TensorBoard scalars, a JSONL log, progress (a tqdm bar
on a terminal, one plain log line per logging interval otherwise), the start-up lines and the summary.

Tags: train/loss, train/loss_code, train/loss_text (when text tokens are counted), train/lr,
train/grad_norm, train/loss_scale, train/skipped_steps, perf/tokens_per_s (useful tokens: positions
that belong to a document, padding excluded), perf/raw_tokens_per_s (every position of the packed
rows), perf/step_time_s, perf/mfu (on useful tokens), mem/*.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ds_train.config import Batch, Config

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device (DESIGN.md §8); MFU is only reported where the peak is known.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def memory_stats(device: torch.device) -> dict[str, float]:
    gib = 2**30
    if device.type == "cuda":
        return {
            "mem/allocated_gib": torch.cuda.memory_allocated(device) / gib,
            "mem/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
            "mem/reserved_gib": torch.cuda.memory_reserved(device) / gib,
        }
    return {"mem/rss_gib": psutil.Process().memory_info().rss / gib}


class Metrics:
    """Collects per-interval sums and writes them out on rank 0; keeps the run's token rates."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 flops_per_token: float, device: torch.device):
        self.enabled = enabled
        self.flops_per_token = flops_per_token
        self.device = device
        self.peak = peak_flops(device)
        self.writer = None
        self.bar = None
        self.jsonl = None
        self.history: list[dict[str, Any]] = []
        self.total_steps = total_steps
        self._t0 = self._run_t0 = time.perf_counter()
        self._tokens = 0
        self._run_raw = self._run_useful = 0.0  # summed over the reported intervals of this invocation
        self._run_s = 0.0
        if not enabled:
            return
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the run, closed by close())
        if sys.stderr.isatty():  # a log file gets one plain line per interval instead of `\r` updates
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def add_tokens(self, n: int) -> None:
        self._tokens += n

    def report(self, step: int, stats: torch.Tensor, scalars: dict[str, float], steps_done: int) -> dict[str, float]:
        """stats: summed over the interval and over ranks: [code_sum, code_n, text_sum, text_n, useful tokens];
        the raw tokens come from `add_tokens` (global batch x seq_len per step)."""
        code_sum, code_n, text_sum, text_n, useful = (float(x) for x in stats.tolist())
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tps, raw_tps = useful / elapsed, self._tokens / elapsed
        self._run_useful += useful
        self._run_raw += self._tokens
        self._run_s = time.perf_counter() - self._run_t0
        row: dict[str, float] = {
            "train/loss": (code_sum + text_sum) / max(code_n + text_n, 1.0),
            "train/loss_code": code_sum / max(code_n, 1.0),
            "perf/tokens_per_s": tps,
            "perf/raw_tokens_per_s": raw_tps,
            "perf/step_time_s": elapsed / max(steps_done, 1),
        }
        if text_n > 0:
            row["train/loss_text"] = text_sum / text_n
        if self.peak:
            row["perf/mfu"] = tps * self.flops_per_token / self.peak
        row.update(scalars)
        row.update(memory_stats(self.device))
        self._t0, self._tokens = time.perf_counter(), 0
        if not self.enabled:
            return row
        for key, value in row.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()
        self.history.append({"step": step, **row})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['train/loss']:.3f}", lr=f"{row.get('train/lr', 0):.2e}",
                                 tok_s=f"{tps:,.0f}", refresh=False)
        else:
            text = f"  text {row['train/loss_text']:.4f}" if "train/loss_text" in row else ""
            text += f"  val {row['val/loss']:.4f}" if "val/loss" in row else ""
            log.info("step %d/%d  loss %.4f  code %.4f%s  lr %.2e  %s tokens/s (raw %s)  %.3f s/step",
                     step, self.total_steps, row["train/loss"], row["train/loss_code"], text,
                     row.get("train/lr", 0.0), f"{tps:,.0f}", f"{raw_tps:,.0f}", row["perf/step_time_s"])
        return row

    def run_average(self) -> tuple[float, float]:
        """(useful, raw) tokens per second over every reported step of this invocation, from its first
        step to its last report (saves and evaluation included: what the user got)."""
        if self._run_s <= 0:
            return 0.0, 0.0
        return self._run_useful / self._run_s, self._run_raw / self._run_s

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def plot_loss_curve(run_dir: Path, out: Path) -> Path | None:
    """A PNG of train/loss over steps from RUN_DIR/metrics.jsonl (all resumed segments)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib  # slow to import (~0.5 s) and needed once, at the end of a run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["train/loss"] for r in rows], label="loss (targets)")
    if any("train/loss_text" in r for r in rows):
        pts = [(r["step"], r["train/loss_text"]) for r in rows if "train/loss_text" in r]
        ax.plot(*zip(*pts), label="text-token loss", alpha=0.7)
    if any("val/loss" in r for r in rows):
        pts = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
        ax.plot(*zip(*pts), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- start-up and summary


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def startup_lines(cfg: Config, batch: Batch, n_params: int, meta: dict[str, Any], start_step: int,
                  pairs: int | None) -> list[str]:
    """What the run is about to do, in plain lines for the log (rank 0)."""
    m = meta["model"]
    seq = cfg.data.seq_len
    ranks = "rank" if batch.world_size == 1 else "ranks"
    sched = meta["schedule"]
    corpus = cfg.data.source if cfg.data.source != "mined" else f"mined into {Path(cfg.run.dir) / 'data'}"
    lines = [
        f"model: {cfg.model.flavor} GPT-Neo, {_count(n_params)} parameters ({m.get('n_layer')} layers, "
        f"d_model {m.get('d_model')}, vocabulary {m.get('vocab_size')} + {len(m.get('separated_ids', ()))} code "
        f"rows); objective {cfg.objective.name}, separation {cfg.objective.separation}",
        f"batch: micro {batch.micro} x accumulation {batch.accum} x {batch.world_size} {ranks} = global batch "
        f"{batch.global_} rows of {seq} tokens = {batch.global_ * seq:,} tokens per step",
        f"engine: DeepSpeed ZeRO stage {meta['zero_stage']}, precision {meta['precision']}",
        f"schedule: steps {start_step + 1}..{cfg.train.max_steps}"
        + (f" (this invocation stops after {cfg.train.stop_at_step})" if cfg.train.stop_at_step else "")
        + f", lr {sched['lr']:.1e} warm-up {sched['warmup_ratio']:.0%} then cosine to {sched['min_lr']:.1e}",
        f"corpus: {corpus}" + (f" ({pairs:,} pairs)" if pairs else ""),
        f"output: {Path(cfg.run.dir).resolve()} (checkpoints every {cfg.checkpoint.every_steps} steps, "
        f"metrics every {cfg.train.log_every}; tensorboard --logdir {Path(cfg.run.dir) / 'tb'})",
    ]
    return lines


def summary_lines(cfg: Config, outcome: Any, export_dir: Path | None, png: Path | None) -> list[str]:
    """The closing summary of a run (`outcome`: a `train.Outcome`)."""
    run_dir = Path(cfg.run.dir)
    row = outcome.last_row
    lines = [
        "",
        f"run:          {run_dir.resolve()}",
        f"step:         {outcome.step} of {cfg.train.max_steps}  ({outcome.tokens:,} tokens)",
    ]
    if row:
        lines.append(f"final loss:   {row.get('train/loss', float('nan')):.4f} (code tokens "
                     f"{row.get('train/loss_code', float('nan')):.4f})")
        if "val/loss" in row:
            lines.append(f"val loss:     {row['val/loss']:.4f} (code tokens "
                         f"{row.get('val/code_loss', float('nan')):.4f})")
    if outcome.tokens_per_s:
        lines.append(f"tokens/s:     {outcome.tokens_per_s:,.0f} useful, {outcome.raw_tokens_per_s:,.0f} with "
                     "padding (average over this invocation's steps)")
    if outcome.skipped:
        lines.append("data skipped: " + ", ".join(f"{k}={v}" for k, v in outcome.skipped.items())
                     + " (rank 0's share; see the log for every rank)")
    lines += [
        f"checkpoint:   {outcome.checkpoint}",
        f"export:       {export_dir or '(not exported)'}",
        f"loss curve:   {png or '(no metrics yet)'}",
        f"TensorBoard:  tensorboard --logdir {run_dir / 'tb'}",
    ]
    return lines
