"""GPU checks and step benchmark of the model (forward + backward; no optimizer, no DeepSpeed).

    python bench/model_bench.py --check                      # GPU path == reference path, compiled == plain
    python bench/model_bench.py --flavor pycodegpt-110m --batch 16 --seq 1024

--check runs, on a small packed batch in fp32: the FlexAttention path (block masks, compiled kernel)
against the dense-mask SDPA path, and the compiled blocks against the plain ones, comparing loss and
every gradient. The benchmark times a training step's forward and backward on packed rows of random
documents (code targets only, as Code CLM) and prints tokens/s, MFU (DESIGN.md §8, 989 TFLOP/s peak)
and the peak GPU memory, one JSON line per result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time

import torch

from ds_train.loss import modality_loss
from ds_train.model import FLAVORS, GPTNeo, GPTNeoConfig

H100_PEAK_FLOPS = 989e12
log = logging.getLogger("model_bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="run the GPU parity checks instead of timing")
    parser.add_argument("--flavor", default="pycodegpt-110m", choices=list(FLAVORS))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--separated", type=int, default=2000, help="|S| (partial separation size)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--backend", default="auto", choices=["auto", "flex", "sdpa"])
    parser.add_argument("--no-compile", action="store_true", help="do not torch.compile the blocks")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--chunk", type=int, default=4096, help="loss chunk rows")
    parser.add_argument(
        "--profile", action="store_true", help="print the top CUDA kernels of the timed steps"
    )
    parser.add_argument(
        "--loss-only", action="store_true", help="time the fused loss alone (random hidden states)"
    )
    return parser.parse_args(argv)


def packed_batch(B: int, T: int, vocab: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of random documents (64..512 tokens): first third text, the rest code and targets."""
    g = torch.Generator().manual_seed(seed)
    doc_ids = torch.full((B, T), -1, dtype=torch.int32)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    modality = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        start, doc = 0, 0
        while start < T:
            n = min(int(torch.randint(64, 513, (1,), generator=g)), T - start)
            doc_ids[b, start : start + n] = doc
            position_ids[b, start : start + n] = torch.arange(n)
            modality[b, start + n // 3 : start + n] = True
            start, doc = start + n, doc + 1
    batch = {
        "input_ids": torch.randint(0, vocab, (B, T), generator=g),
        "position_ids": position_ids,
        "doc_ids": doc_ids,
        "modality": modality,
        "target": modality & (position_ids > 0),
        "prefix": torch.zeros(B, T, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in batch.items()}


def loss_and_grads(
    model: GPTNeo, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = model(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def max_rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in b)


def run_checks(device: torch.device) -> list[dict]:
    """fp32, small: flex vs SDPA paths, compiled vs plain blocks; errors relative to each tensor's max."""
    results = []
    vocab, separated = 512, tuple(range(100, 300, 2))
    for window in (32, 128):
        config = GPTNeoConfig.from_flavor(
            "debug",
            vocab_size=vocab,
            separated_ids=separated,
            pad_token_id=0,
            window_size=window,
            n_positions=1024,
            loss_chunk_size=300,
        )
        torch.manual_seed(0)
        reference = GPTNeo(config).to(device)
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
        batch = packed_batch(4, 512, vocab, device)
        batch["prefix"] = (batch["position_ids"] < 20) & (batch["doc_ids"] % 2 == 0)
        ref_loss, ref_grads = loss_and_grads(_with_backend(reference, "sdpa"), batch)
        flex_loss, flex_grads = loss_and_grads(_with_backend(reference, "flex"), batch)
        reference.compile_blocks()
        comp_loss, comp_grads = loss_and_grads(_with_backend(reference, "flex"), batch)
        results.append(
            {
                "check": f"window {window}",
                "loss_sdpa": ref_loss.item(),
                "flex_vs_sdpa_loss_rel": abs(flex_loss.item() - ref_loss.item()) / ref_loss.item(),
                "flex_vs_sdpa_grad_rel": max_rel_error(flex_grads, ref_grads),
                "compiled_vs_plain_loss_rel": abs(comp_loss.item() - flex_loss.item()) / flex_loss.item(),
                "compiled_vs_plain_grad_rel": max_rel_error(comp_grads, flex_grads),
            }
        )
    return results


def check_bf16_loss(device: torch.device) -> dict:
    """The fused loss on bf16 CUDA tensors (tensor-core path) against float64 on the same values."""
    g = torch.Generator().manual_seed(0)
    V, n_sep, T, d = 32000, 2000, 4096, 768
    hidden = torch.randn(1, T, d, generator=g).bfloat16()
    weight = (0.05 * torch.randn(V + n_sep, d, generator=g)).bfloat16()
    input_ids = torch.randint(0, V, (1, T), generator=g)
    modality = torch.rand(1, T, generator=g) < 0.5
    target = torch.rand(1, T, generator=g) < 0.7
    separated = torch.arange(1000, 1000 + n_sep)
    results = {}
    for name, dtype, dev in (("bf16", torch.bfloat16, device), ("f64", torch.float64, torch.device("cpu"))):
        h = hidden.to(dev, dtype).requires_grad_(True)
        w = weight.to(dev, dtype).requires_grad_(True)
        batch = [t.to(dev) for t in (input_ids, target, modality, separated)]
        loss, _ = modality_loss(h, w, batch[0], batch[1], batch[2], batch[3], vocab_size=V, chunk_size=1000)
        loss.backward()
        results[name] = (loss.item(), h.grad.double().cpu(), w.grad.double().cpu())
    (l16, gh16, gw16), (l64, gh64, gw64) = results["bf16"], results["f64"]
    return {
        "check": "bf16 CUDA loss vs float64",
        "loss_rel": abs(l16 - l64) / l64,
        "grad_h_rel": ((gh16 - gh64).abs().max() / gh64.abs().max()).item(),
        "grad_w_rel": ((gw16 - gw64).abs().max() / gw64.abs().max()).item(),
    }


def time_loss(args: argparse.Namespace, device: torch.device) -> dict:
    """Forward + backward of the fused loss alone at the benchmark's shape (2/3 of the tokens are targets)."""
    dtype = getattr(torch, args.dtype)
    d = GPTNeoConfig.from_flavor(args.flavor, vocab_size=args.vocab).d_model
    B, T = args.batch, args.seq
    hidden = torch.randn(B, T, d, device=device, dtype=dtype, requires_grad=True)
    weight = (
        (0.02 * torch.randn(args.vocab + args.separated, d, device=device)).to(dtype).requires_grad_(True)
    )
    batch = packed_batch(B, T, args.vocab, device)
    separated = torch.arange(1000, 1000 + args.separated, device=device)

    def step() -> float:
        loss, _ = modality_loss(
            hidden,
            weight,
            batch["input_ids"],
            batch["target"],
            batch["modality"],
            separated,
            vocab_size=args.vocab,
            chunk_size=args.chunk,
        )
        loss.backward()
        return loss.item()

    seconds = _timed(step, args)
    return {
        "part": "loss",
        "dtype": args.dtype,
        "chunk": args.chunk,
        "targets": int(batch["target"].sum()),
        "ms": seconds * 1e3,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def _timed(step, args: argparse.Namespace) -> float:
    """Seconds per call of `step` after warm-up."""
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    profiler = torch.profiler.profile() if args.profile else contextlib.nullcontext()
    with profiler:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
    if args.profile:
        log.info(
            profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
        )
    return seconds


def _with_backend(model: GPTNeo, backend: str) -> GPTNeo:
    model.config.attention_backend = backend
    return model


def run_benchmark(args: argparse.Namespace, device: torch.device) -> dict:
    separated = tuple(range(1000, 1000 + args.separated))
    config = GPTNeoConfig.from_flavor(
        args.flavor,
        vocab_size=args.vocab,
        separated_ids=separated,
        pad_token_id=0,
        attention_backend=args.backend,
        activation_checkpointing=args.checkpointing,
        loss_chunk_size=args.chunk,
    )
    model = GPTNeo(config).to(device=device, dtype=getattr(torch, args.dtype))
    if not args.no_compile:
        model.compile_blocks()
    batches = [packed_batch(args.batch, args.seq, args.vocab, device, seed) for seed in range(4)]
    calls = iter(range(10**9))
    last_loss = []

    def step() -> None:
        last_loss.append(loss_and_step(model, batches[next(calls) % 4]))

    seconds = _timed(step, args)
    loss = last_loss[-1]
    tokens_per_s = args.batch * args.seq / seconds
    return {
        "flavor": args.flavor,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "backend": args.backend,
        "compiled": not args.no_compile,
        "checkpointing": args.checkpointing,
        "params": model.num_params(),
        "loss": loss,
        "step_ms": seconds * 1e3,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * model.flops_per_token(args.seq) / H100_PEAK_FLOPS,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "device": torch.cuda.get_device_name(),
    }


def loss_and_step(model: GPTNeo, batch: dict[str, torch.Tensor]) -> float:
    """One forward + backward; gradients are dropped (no optimizer here)."""
    model.zero_grad(set_to_none=True)
    loss, _ = model(**batch)
    loss.backward()
    return loss.item()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("model_bench: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    if args.check:
        results = run_checks(device) + [check_bf16_loss(device)]
    else:
        results = [time_loss(args, device) if args.loss_only else run_benchmark(args, device)]
    for result in results:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
