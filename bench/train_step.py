"""The full training step through the DeepSpeed engine (issue 7), with the baselines and scale sweeps.

    # once, on any machine: document layouts (segment lengths) of real mined pairs
    python bench/train_step.py layouts --pairs runs/default/data/pairs.jsonl \
        --tokenizer runs/default/tokenizer --out bench/doc_layouts.json
    # on the GPU (deepspeed from the wheels of bench/gpu_wheels.sh):
    python bench/train_step.py run --baselines --sweep --curve 200 --out results.jsonl

`run` times forward, fused loss, backward and the optimizer step of `deepspeed.initialize`'s engine
(ZeRO-2 by default, bf16, fused torch AdamW, gradient clipping 1.0) for `pycodegpt-110m`, sequence
1024, batch 16, Code CLM + partial separation (|S| = 2000 of a 32k vocabulary), on rows packed from
the documents of `--layouts` (their real segment lengths: `<bot>` SIGNATURE `<comments>` DOCSTRING
`<python>` BODY `<eot>`; token ids drawn at random). It prints one JSON line per measurement:
tokens/s, MFU (DESIGN.md §8, 989 TFLOP/s), peak memory. `--baselines` adds, in the same process on
the same card, the original method and plain `transformers` (bench/original_bench.py);
`--sweep` adds sequence 512/1024/2048 (same tokens per step) and the 350m/760m flavors;
`--curve N` trains N steps on the fast path (compiled, FlexAttention) and on the plain path
(not compiled, dense-mask SDPA) from the same seed and batches and reports the largest loss gap.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ds_train.model import GPTNeo, GPTNeoConfig  # noqa: E402

PEAK = 989e12
HERE = Path(__file__).resolve().parent
log = logging.getLogger("train_step")


# ------------------------------------------------------------------------------------------ layouts
def make_layouts(pairs: Path, tokenizer: Path, out: Path, limit: int) -> int:
    """Segment lengths [signature, docstring, body] of real pairs through the project's encoder."""
    from ds_train.data.encode import Encoder, Segment
    from ds_train.data.sources import read_pairs
    from ds_train.data.tokenizer import load_tokenizer

    enc = Encoder(load_tokenizer(tokenizer), "code_clm", seed=0, corrupt_prob=0.0)
    rows = []
    for pair in read_pairs([str(pairs)]):
        for _id, _ids, seg in enc.layout([pair]):
            rows.append([int((seg == s).sum()) for s in (Segment.SIGNATURE, Segment.DOCSTRING, Segment.BODY)])
        if len(rows) >= limit:
            break
    out.write_text(json.dumps({"source": str(pairs), "tokenizer": str(tokenizer), "docs": rows}))
    return len(rows)


def packed_rows(layouts: list[list[int]], batch: int, seq: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Greedy-pack documents (in a seeded order) into `batch` rows of `seq`, as the data pipeline does."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, T = batch, seq
    out = {
        "input_ids": torch.randint(0, vocab, (B, T), generator=g),
        "position_ids": torch.zeros(B, T, dtype=torch.long),
        "doc_ids": torch.full((B, T), -1, dtype=torch.int32),
        "modality": torch.zeros(B, T, dtype=torch.bool),
        "target": torch.zeros(B, T, dtype=torch.bool),
        "prefix": torch.zeros(B, T, dtype=torch.bool),
    }
    docs = [d for d in layouts if sum(d) + 4 <= T]
    for b in range(B):
        start, doc = 0, 0
        while True:
            sig, text, body = rng.choice(docs)
            n = sig + text + body + 4
            if start + n > T:
                break
            # <bot> SIG <comments> DOC <python> BODY <eot>: code = SIG, BODY, <eot>; targets = BODY, <eot>
            code = [False] + [True] * sig + [False] * (text + 2) + [True] * (body + 1)
            tgt = [False] * (sig + text + 3) + [True] * (body + 1)
            sl = slice(start, start + n)
            out["position_ids"][b, sl] = torch.arange(n)
            out["doc_ids"][b, sl] = doc
            out["modality"][b, sl] = torch.tensor(code)
            out["target"][b, sl] = torch.tensor(tgt)
            start, doc = start + n, doc + 1
    return out


# ------------------------------------------------------------------------------------------ engine
def build_engine(cfg: GPTNeoConfig, zero: int, micro: int, compile_blocks: bool, seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = GPTNeo(cfg)
    if compile_blocks:
        model.compile_blocks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.cuda.is_available())
    ds_config = {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "bf16": {"enabled": True}, "steps_per_print": 10**9,
        "zero_optimization": {"stage": zero, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    return engine


def time_engine(engine, batches: list[dict], steps: int, warmup: int) -> tuple[float, list[float]]:
    def step(batch: dict) -> torch.Tensor:
        loss, _ = engine(**batch)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    for i in range(warmup):
        step(batches[i % len(batches)])
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = [step(batches[i % len(batches)]) for i in range(steps)]
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, [float(x) for x in out]


def measure(args, flavor: str, seq: int, batch: int, compile_blocks: bool, layouts, emit) -> None:
    cfg = GPTNeoConfig.from_flavor(flavor, vocab_size=args.vocab, pad_token_id=0, loss_chunk_size=args.chunk,
                                   separated_ids=tuple(range(1000, 1000 + args.separated)))
    dev = torch.device("cuda")
    batches = [{k: v.to(dev) for k, v in packed_rows(layouts, batch, seq, args.vocab, s).items()} for s in range(8)]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = build_engine(cfg, args.zero, batch, compile_blocks, seed=0)
    seconds, losses = time_engine(engine, batches, args.steps, args.warmup)
    tps = batch * seq / seconds
    real = sum(int((b["doc_ids"] >= 0).sum()) for b in batches) / (len(batches) * batch * seq)
    emit({"kind": "ours_deepspeed", "flavor": flavor, "zero": args.zero, "batch": batch, "seq": seq,
          "compiled": compile_blocks, "step_ms": seconds * 1e3, "tokens_per_s": tps,
          "mfu": tps * engine.module.flops_per_token(seq) / PEAK, "non_pad_share": real,
          "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "last_loss": losses[-1]})
    del engine
    torch.cuda.empty_cache()


def loss_curve(args, layouts, emit) -> None:
    """Fast path vs plain path, same seed and batches, N steps: the largest gap in loss."""
    curves = {}
    for name, backend, compiled in (("fast", "auto", True), ("plain", "sdpa", False)):
        cfg = GPTNeoConfig.from_flavor(args.flavor, vocab_size=args.vocab, pad_token_id=0,
                                       loss_chunk_size=args.chunk, attention_backend=backend,
                                       separated_ids=tuple(range(1000, 1000 + args.separated)))
        engine = build_engine(cfg, args.zero, args.batch, compiled, seed=0)
        dev = engine.device
        rows = [{k: v.to(dev) for k, v in packed_rows(layouts, args.batch, args.seq, args.vocab, s).items()}
                for s in range(args.curve)]
        _, curves[name] = time_engine(engine, rows, args.curve, warmup=0)
        del engine
        torch.cuda.empty_cache()
    gaps = [abs(a - b) for a, b in zip(curves["fast"], curves["plain"])]
    emit({"kind": "loss_curve", "steps": args.curve, "max_abs_gap": max(gaps), "mean_abs_gap": sum(gaps) / len(gaps),
          "first": [curves["fast"][0], curves["plain"][0]], "last": [curves["fast"][-1], curves["plain"][-1]],
          "tolerance": "bf16: max |gap| < 0.05 nats"})


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lay = sub.add_parser("layouts", help="write document layouts of real pairs")
    lay.add_argument("--pairs", required=True)
    lay.add_argument("--tokenizer", required=True)
    lay.add_argument("--out", default=str(HERE / "doc_layouts.json"))
    lay.add_argument("--limit", type=int, default=6000)
    run = sub.add_parser("run", help="time the engine step (GPU)")
    run.add_argument("--layouts", default=str(HERE / "doc_layouts.json"))
    run.add_argument("--flavor", default="pycodegpt-110m")
    run.add_argument("--vocab", type=int, default=32000)
    run.add_argument("--separated", type=int, default=2000)
    run.add_argument("--batch", type=int, default=16)
    run.add_argument("--seq", type=int, default=1024)
    run.add_argument("--zero", type=int, default=2)
    run.add_argument("--chunk", type=int, default=4096)
    run.add_argument("--steps", type=int, default=20)
    run.add_argument("--warmup", type=int, default=5)
    run.add_argument("--no-compile", action="store_true")
    run.add_argument("--baselines", action="store_true")
    run.add_argument("--sweep", action="store_true")
    run.add_argument("--curve", type=int, default=0)
    run.add_argument("--out", default="")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    if args.cmd == "layouts":
        n = make_layouts(Path(args.pairs), Path(args.tokenizer), Path(args.out), args.limit)
        print(f"{n} document layouts -> {args.out}")
        return 0
    if not torch.cuda.is_available():
        print("train_step: `run` needs a CUDA device", file=sys.stderr)
        return 2
    from ds_train import distributed

    distributed.init()
    layouts = json.loads(Path(args.layouts).read_text())["docs"]
    card = torch.cuda.get_device_name()

    def emit(row: dict) -> None:
        line = json.dumps({**row, "device": card})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    measure(args, args.flavor, args.seq, args.batch, not args.no_compile, layouts, emit)
    if args.baselines:
        from original_bench import main as original

        original(["--only", "original,hf_plain", "--flavor", args.flavor, "--batch", str(args.batch),
                  "--seq", str(args.seq), "--vocab", str(args.vocab), "--separated", str(args.separated)]
                 + (["--out", args.out] if args.out else []))
    if args.sweep:
        tokens = args.batch * args.seq
        for seq in (512, 2048):
            measure(args, args.flavor, seq, tokens // seq, False, layouts, emit)
        for flavor in ("gpt-neo-350m", "gpt-neo-760m"):
            measure(args, flavor, args.seq, args.batch, False, layouts, emit)
    if args.curve:
        loss_curve(args, layouts, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
