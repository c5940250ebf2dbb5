"""Peak CPU memory of the fused, chunked loss (forward + backward), against the naive B*T x V logits.

Run it as its own process (the measurement is this process's peak RSS):

    OMP_NUM_THREADS=2 .venv/bin/python bench/loss_memory.py            # V=32k, 16k targets, d=768
    .venv/bin/python bench/loss_memory.py --targets 8192 --d-model 64  # a quick one

It allocates the inputs (hidden states of the target rows, the [E; C] table), notes the resident set
size, runs `ds_train.loss.modality_loss` forward and backward, and reads the peak RSS (VmHWM after
resetting it; ru_maxrss where /proc is missing).
peak - baseline is an upper bound of the extra memory of the loss path, gradients included. It prints
one JSON line; the naive figure is the fp32 logits alone, targets x V x 4 bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
from pathlib import Path

import psutil
import torch

from ds_train.loss import modality_loss

MIB = 2**20
log = logging.getLogger("loss_memory")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000, help="V, text vocabulary size")
    parser.add_argument("--separated", type=int, default=1000, help="|S|, code rows")
    parser.add_argument(
        "--targets", type=int, default=16384, help="target tokens (one row of hidden state each)"
    )
    parser.add_argument("--d-model", type=int, default=768, help="hidden width d")
    parser.add_argument("--chunk", type=int, default=1024, help="rows per loss chunk")
    args = parser.parse_args(argv)
    if min(args.vocab, args.targets, args.d_model, args.chunk) < 1 or not 0 <= args.separated <= args.vocab:
        parser.error("sizes must be positive and --separated at most --vocab")
    return args


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux: /proc/self/clear_refs, "5").

    ru_maxrss alone is not enough: a process started by vfork + exec (Python's subprocess, e.g. from a
    large pytest process) can inherit its parent's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM where readable, else ru_maxrss (KiB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(vocab: int, separated: int, targets: int, d_model: int, chunk: int) -> dict[str, float]:
    """Run the loss once forward and backward; return memory figures in MiB."""
    g = torch.Generator().manual_seed(0)
    hidden = (0.1 * torch.randn(1, targets + 1, d_model, generator=g)).requires_grad_(True)
    weight = (0.1 * torch.randn(vocab + separated, d_model, generator=g)).requires_grad_(True)
    input_ids = torch.randint(0, vocab, (1, targets + 1), generator=g)
    modality = torch.rand(1, targets + 1, generator=g) < 0.5
    target = torch.ones(1, targets + 1, dtype=torch.bool)
    separated_ids = torch.randperm(vocab, generator=g)[:separated].sort().values

    reset_peak_rss()
    baseline = psutil.Process().memory_info().rss
    loss, _stats = modality_loss(
        hidden, weight, input_ids, target, modality, separated_ids, vocab_size=vocab, chunk_size=chunk
    )
    loss.backward()
    peak = peak_rss_bytes()
    gradients = hidden.grad.numel() * 4 + weight.grad.numel() * 4
    return {
        "vocab": vocab,
        "separated": separated,
        "targets": targets,
        "d_model": d_model,
        "chunk": chunk,
        "loss": loss.item(),
        "peak_extra_mib": (peak - baseline) / MIB,
        "gradients_mib": gradients / MIB,
        "chunk_logits_mib": chunk * vocab * 4 / MIB,
        "naive_logits_mib": targets * vocab * 4 / MIB,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    result = measure(args.vocab, args.separated, args.targets, args.d_model, args.chunk)
    log.info(
        "peak extra %.0f MiB (of which gradients %.0f MiB) vs naive fp32 logits %.0f MiB",
        result["peak_extra_mib"],
        result["gradients_mib"],
        result["naive_logits_mib"],
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
