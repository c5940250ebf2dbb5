"""One-process comparison on one GPU: our step against the original method's and plain `transformers`'.

    python bench/original_bench.py [--flavor pycodegpt-110m] [--batch 16] [--seq 1024] [--out results.jsonl]

Three training steps (forward, loss, backward, fused AdamW step), same shape, batch and card, bf16:
- `ours`: ds_train's GPT-Neo on packed rows (FlexAttention block masks, routed [E; C] gather, the
  fused chunked modality loss), no DeepSpeed (bench/train_step through the engine is separate);
- `original`: `transformers`' GPTNeoForCausalLM under bf16 autocast with the vocabulary extended by
  |S| duplicated rows, code tokens remapped, full fp32 logits and two -inf-masked copies (the
  original MRPT implementation's loss);
- `hf_plain`: the same `transformers` model with its own causal-LM loss.
Prints one JSON line per step kind (tokens/s, MFU per DESIGN.md §8, peak memory) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_bench import H100_PEAK_FLOPS, packed_batch

from ds_train.hf import hf_config_dict
from ds_train.model import GPTNeo, GPTNeoConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="pycodegpt-110m")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--separated", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="", help="append the JSON lines to this file too")
    p.add_argument("--only", default="ours,original,hf_plain")
    return p.parse_args(argv)


def timed(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def original_mrpt_loss(logits: torch.Tensor, labels: torch.Tensor, code: torch.Tensor, target: torch.Tensor,
                       separated: torch.Tensor, vocab: int) -> torch.Tensor:
    """The original loss: fp32 logits over V + |S|, a text copy and a code copy with -inf columns."""
    logits = logits.float()
    text_view = logits.clone()
    text_view[..., vocab:] = float("-inf")
    code_view = logits.clone()
    code_view[..., separated] = float("-inf")
    lp = torch.where(code[..., None], code_view, text_view)
    return F.cross_entropy(lp[target], labels[target])


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> list[dict]:
    """Time the asked step kinds; returns their rows (also printed as JSON lines)."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from transformers import GPTNeoConfig as HFConfig
    from transformers import GPTNeoForCausalLM

    separated = tuple(range(1000, 1000 + args.separated))
    cfg = GPTNeoConfig.from_flavor(args.flavor, vocab_size=args.vocab, separated_ids=separated, pad_token_id=0,
                                   loss_chunk_size=4096)
    B, T, V, S = args.batch, args.seq, args.vocab, len(separated)
    flops = None
    results = []
    kinds = args.only.split(",")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"

    def report(kind: str, seconds: float, extra: dict) -> None:
        tps = B * T / seconds
        row = {"kind": kind, "flavor": args.flavor, "batch": B, "seq": T, "step_ms": seconds * 1e3,
               "tokens_per_s": tps, "mfu": tps * flops / H100_PEAK_FLOPS,
               # net of what was already allocated (earlier measurements in the same process)
               "peak_mem_gib": (torch.cuda.max_memory_allocated() - base[0]) / 2**30 if device.type == "cuda" else 0.0,
               "device": card, **extra}
        results.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    torch.manual_seed(0)
    batch = packed_batch(B, T, V, device)
    base = [torch.cuda.memory_allocated() if device.type == "cuda" else 0]
    if "ours" in kinds:
        model = GPTNeo(cfg).to(device=device, dtype=torch.bfloat16)
        flops = model.flops_per_token(T)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

        def ours() -> None:
            loss, _ = model(**batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        report("ours", timed(ours, args.steps, args.warmup, device), {"dtype": "bf16 params"})
        model = opt = None  # free the GPU memory before the baselines
    hf_cfg = HFConfig(**{k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type")})
    flops = flops or GPTNeo(cfg).flops_per_token(T)
    code = batch["modality"]
    target = torch.zeros_like(code)
    target[:, 1:] = code[:, 1:]  # predict code tokens from the previous position (unpacked rows)
    route = torch.arange(V, device=device)
    route[list(separated)] = torch.arange(V, V + S, device=device)
    ids = torch.where(code, route[batch["input_ids"]], batch["input_ids"])
    sep = torch.tensor(separated, device=device)
    for kind in ("original", "hf_plain"):
        if kind not in kinds:
            continue
        hf_cfg.vocab_size = V + S if kind == "original" else V
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base[0] = torch.cuda.memory_allocated()
        hf = GPTNeoForCausalLM(hf_cfg).to(device)
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=device.type == "cuda")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)

        def step(kind=kind, hf=hf, opt=opt, autocast=autocast) -> None:
            with autocast:
                if kind == "original":
                    logits = hf(input_ids=ids).logits
                    loss = original_mrpt_loss(logits[:, :-1], ids[:, 1:], code[:, 1:], target[:, 1:], sep, V)
                else:
                    loss = hf(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        report(kind, timed(step, args.steps, args.warmup, device), {"dtype": "fp32 params, bf16 autocast"})
        hf = opt = None
    by = {r["kind"]: r for r in results}
    if "ours" in by:
        for base in ("original", "hf_plain"):
            if base in by:
                print(json.dumps({"ratio": f"ours/{base}",
                                  "speed": by["ours"]["tokens_per_s"] / by[base]["tokens_per_s"],
                                  "memory": by["ours"]["peak_mem_gib"] / max(by[base]["peak_mem_gib"], 1e-9)}))
    return results


if __name__ == "__main__":
    sys.exit(main())
