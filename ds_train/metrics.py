"""Metrics in one place: TensorBoard scalars, a JSONL log and the console progress bar (rank 0 only).

Tags: train/loss, train/loss_code, train/loss_text (when text tokens are counted), train/lr,
train/grad_norm, train/loss_scale, train/skipped_steps, perf/tokens_per_s, perf/mfu, mem/*.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import psutil
import torch

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
    """Collects per-interval sums and writes them out on rank 0."""

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
        self._t0 = time.perf_counter()
        self._tokens = 0
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the run, closed by close())
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def add_tokens(self, n: int) -> None:
        self._tokens += n

    def report(self, step: int, stats: torch.Tensor, scalars: dict[str, float], steps_done: int) -> dict[str, float]:
        """stats: summed over the interval and over ranks: [code_sum, code_n, text_sum, text_n]."""
        code_sum, code_n, text_sum, text_n = (float(x) for x in stats.tolist())
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tps = self._tokens / elapsed
        row: dict[str, float] = {
            "train/loss": (code_sum + text_sum) / max(code_n + text_n, 1.0),
            "train/loss_code": code_sum / max(code_n, 1.0),
            "perf/tokens_per_s": tps,
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
        self.bar.set_postfix(loss=f"{row['train/loss']:.3f}", lr=f"{row.get('train/lr', 0):.2e}",
                             tok_s=f"{tps:,.0f}", refresh=False)
        return row

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
    import matplotlib

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
