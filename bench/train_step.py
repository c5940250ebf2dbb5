"""The full training step through the DeepSpeed engine, with the reference, the baselines and scale sweeps.

    # once, on any machine: document layouts (segment lengths) of real mined pairs
    python bench/train_step.py layouts --pairs runs/default/data/pairs.jsonl \
        --tokenizer runs/default/tokenizer --out bench/doc_layouts.json
    # on the GPU (deepspeed from the wheels of bench/gpu_wheels.sh):
    python bench/train_step.py run --packing rows,stream --more-batches 32 --lean path/to/lean_gpt.py \
        --baselines --out results.jsonl
    # the recipe's 256 x 1024 on one GPU: micro batch 16, 16 micro batches per optimizer step
    python bench/train_step.py run --packing rows,stream --accumulation 16 --steps 64 --warmup 16
    python bench/train_step.py run --baselines --sweep --curve 200 --out results.jsonl
    # the recipe's 256 x 1024 at several micro batches, and settings that take work out of the step
    python bench/train_step.py run --global-batch 256 --batch 16 --more-batches 32,64 --host-variants --profile DIR
    # the fast path's loss against the plain path's over 200 steps of a real corpus
    python bench/train_step.py run --curve 200 --curve-data RUN_DIR/packed --curve-tokenizer RUN_DIR/tokenizer
    # a real ds-train run's sustained rate, from its metrics.jsonl (the first 10 steps left out: compiling)
    python bench/train_step.py rate RUN_DIR/metrics.jsonl --after 10 --set device="NVIDIA H100 80GB HBM3"
    # a smoke run on the CPU (DeepSpeed's CPU accelerator, not compiled; the figures mean nothing)
    DS_ACCELERATOR=cpu python bench/train_step.py run --flavor tiny --seq 128 --batch 2 --vocab 3000 \
        --separated 100 --steps 2 --warmup 1 --no-compile --packing rows,stream

`run` times forward, fused loss, backward and the optimizer step of `deepspeed.initialize`'s engine
(ZeRO-2 by default, bf16, fused torch AdamW, gradient clipping 1.0) for `pycodegpt-110m`, sequence
1024, batch 16, Code CLM + partial separation (|S| = 2000 of a 32k vocabulary), on micro batches made
from the documents of `--layouts` (their real segment lengths: `<bot>` SIGNATURE `<comments>`
DOCSTRING `<python>` BODY `<eot>`; token ids drawn at random). `--packing` picks how: `stream` (the
training stream's: one (1, batch x seq) token stream of whole documents, padding only at its tail,
through `stream.Cut` and `batch.make_stream_batch`) and/or `rows` (batch rows of seq tokens, each
padded at its end). It prints one JSON line per measurement (`kind` "step"): useful (non-padding)
and raw tokens/s, MFU on useful tokens (DESIGN.md §8, 989 TFLOP/s), peak memory. `--lean PATH` first
times the `lean_flex` variant of a reference script (a compact compiled GPT of the same shape with
FlexAttention document masks; `kind` "lean") at `--lean-batch`, in the same process on the same card.
`--baselines` adds the original method and plain `transformers` (bench/original_bench.py; `kind`
"original" and "hf_plain");
`--sweep` adds sequence 512/1024/2048 (same tokens per step) and the 350m/760m flavors;
`--curve N` trains N steps on the fast path (compiled, FlexAttention) and on the plain path
(not compiled, dense-mask SDPA) from the same seed and batches and reports the largest loss gap.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import io
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ds_train.data.batch import BatchSpec, make_stream_batch
from ds_train.data.encode import Corruption, Segment
from ds_train.data.pack import Doc
from ds_train.data.stream import Cut, Position
from ds_train.loss import modality_loss, target_positions
from ds_train.model import GPTNeo, GPTNeoConfig

PEAK = 989e12
HERE = Path(__file__).resolve().parent
log = logging.getLogger("train_step")


# ------------------------------------------------------------------------------------------ layouts
def make_layouts(pairs: Path, tokenizer: Path, out: Path, limit: int) -> int:
    """Segment lengths [signature, docstring, body] of real pairs through the project's encoder."""
    from ds_train.data.encode import Encoder
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


def layout_doc(k: int, layout: list[int], vocab: int, rng: np.random.Generator) -> Doc:
    """The document of one layout [signature, docstring, body]: random ids, the encoder's segments."""
    sig, text, body = layout
    segments = np.repeat(np.arange(len(Segment), dtype=np.int8), [1, sig, 1, text, 1, body, 1])
    return Doc(str(k), rng.integers(0, vocab, len(segments), dtype=np.int64), segments)


def stream_batches(layouts: list[list[int]], batch: int, seq: int, vocab: int, seed: int,
                   count: int) -> list[dict[str, torch.Tensor]]:
    """`count` consecutive micro batches as the training stream makes them: the documents of a seeded
    order, whole, back to back in one (1, batch x seq) stream, padded only at its tail (`stream.Cut`
    and `batch.make_stream_batch`, what ds-train's stream calls). Documents that do not fit `seq`
    are left out, as `packed_rows` does."""
    rng = np.random.default_rng(seed)
    docs = [layout_doc(k, d, vocab, rng) for k, d in enumerate(d for d in layouts if sum(d) + 4 <= seq)]
    cut = Cut(np.array([len(d) for d in docs]), seed, batch * seq)
    corruption = Corruption(0.0, seed, 0, np.zeros(vocab, dtype=bool), np.arange(vocab))  # Code CLM: unused
    spec = BatchSpec("code_clm", seq, 0, corruption)
    out, at = [], Position(0, 0)
    for _ in range(count):
        picked, at = cut.next(at)
        made = make_stream_batch([docs[k] for _, k in picked], [e for e, _ in picked], spec, batch * seq)
        out.append({k: v for k, v in made.items() if isinstance(v, torch.Tensor)})  # not ids, num_tokens
    return out


def host_batches(layouts, packing: str, batch: int, seq: int, vocab: int, seed: int, count: int) -> list[dict]:
    """`count` micro batches on the host: `stream` (one (1, batch x seq) stream) or `rows` ((batch, seq))."""
    if packing == "stream":
        return stream_batches(layouts, batch, seq, vocab, seed, count)
    return [packed_rows(layouts, batch, seq, vocab, seed + s) for s in range(count)]


# ------------------------------------------------------------------------------------------ engine
@dataclass(frozen=True)
class Variant:
    """What the step does; the defaults are the fast path, `ABLATION` walks there from the old step."""

    name: str = "fast"
    overlap_comm: bool = False  # DeepSpeed's overlap_comm device-synchronises around every reduction
    check_grad_overflow: bool = False  # bf16: DeepSpeed's per-parameter inf/nan scan and a host sync
    cpu_positions: bool = True  # target positions from the CPU batch (no boolean gather on the GPU)
    fused_rows: bool = True  # compiled fused logsumexp / softmax-gradient kernels in the loss
    chunk: int = 0  # rows per loss chunk (0: --chunk)
    whole_stack: bool = True  # compile the 12 blocks as one graph (else each block on its own)
    contiguous_gradients: bool = True  # ZeRO-2 copies each gradient into one buffer in its hook
    zero: int = -1  # ZeRO stage (-1: --zero)
    cuda_graphs: bool = False  # the compiled block stack replayed as CUDA graphs ("reduce-overhead")
    scanned_masks: bool = False  # block masks by evaluating mask_mod at every position (the earlier construction)
    throughput_timer: bool = False  # DeepSpeed's default timer: a device sync at every forward and step()


PER_BLOCK = Variant("+ fused row kernels", whole_stack=False)
"""The fast path with each block compiled on its own (the ablation step before the one compiled graph)."""

HOST_VARIANTS = {
    "cuda_graphs": Variant("fast, CUDA graphs over the block stack", cuda_graphs=True),
    "zero1": Variant("fast, ZeRO-1", zero=1),
    "contiguous_off": Variant("fast, contiguous_gradients off", contiguous_gradients=False),
    "zero0": Variant("fast, ZeRO-0", zero=0),
    "scanned_masks": Variant("fast, block masks scanned over every position", scanned_masks=True),
    "throughput_timer": Variant("fast, DeepSpeed's throughput timer on (its default)", throughput_timer=True),
}
"""Settings that take work out of the step (`--host-variants`); each is timed beside the fast path."""

ABLATION = (
    Variant("session-1 step", overlap_comm=True, check_grad_overflow=True, cpu_positions=False, fused_rows=False,
            whole_stack=False, throughput_timer=True),
    Variant("+ no overflow scan", overlap_comm=True, cpu_positions=False, fused_rows=False, whole_stack=False,
            throughput_timer=True),
    Variant("+ no overlap_comm syncs", cpu_positions=False, fused_rows=False, whole_stack=False,
            throughput_timer=True),
    Variant("+ CPU target positions", fused_rows=False, whole_stack=False, throughput_timer=True),
    dataclasses.replace(PER_BLOCK, throughput_timer=True),
    Variant("+ one compiled graph for the blocks", throughput_timer=True),
    Variant("+ DeepSpeed's throughput timer off (fast)"),
    Variant("fast, chunk 16384", chunk=16384),
    HOST_VARIANTS["contiguous_off"],  # bench/host_overhead.py: -5 ms host
)
"""The step from session 1's settings to the fast path, one change at a time (`--ablation`)."""

class EagerRowsGPTNeo(GPTNeo):
    """The model with the loss's eager row operations on CUDA (`modality_loss(fused_rows=False)`): the
    ablation's steps before the fused row kernels."""

    def forward(self, input_ids, position_ids=None, doc_ids=None, modality=None, target=None, prefix=None,
                target_positions=None):
        hidden = self.hidden_states(input_ids, position_ids, doc_ids, modality, prefix)
        return modality_loss(hidden, self.wte.weight, input_ids, target, modality, self.separated,
                             vocab_size=self.config.vocab_size, chunk_size=self.config.loss_chunk_size,
                             doc_ids=doc_ids, positions=target_positions, fused_rows=False)


def scanned_block_mask(doc_ids, prefix, window, *, block_size: int = 128):
    """The block mask as it was built before its tables came from the documents' extents:
    `create_block_mask` evaluating the rule at every (query, key) position, compiled."""
    from torch.nn.attention.flex_attention import create_block_mask

    from ds_train.attention import make_mask_mod

    B, T = doc_ids.shape
    return create_block_mask(make_mask_mod(doc_ids, prefix, window), B, None, T, T, device=doc_ids.device,
                             BLOCK_SIZE=block_size, _compile=doc_ids.device.type == "cuda")


def build_engine(cfg: GPTNeoConfig, zero: int, micro: int, compile_blocks: bool, seed: int,
                 variant: Variant = Variant(), accumulation: int = 1, lr: float = 1e-4):
    import deepspeed  # slow to import; `layouts` runs without it

    torch.manual_seed(seed)
    model = GPTNeo(cfg) if variant.fused_rows else EagerRowsGPTNeo(cfg)
    if compile_blocks:
        model.compile_blocks(whole=variant.whole_stack, cuda_graphs=variant.cuda_graphs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=torch.cuda.is_available())
    ds_config = {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 1.0, "steps_per_print": 10**9,
        "bf16": {"enabled": True, "check_grad_overflow": variant.check_grad_overflow},
        "timers": {"throughput": {"enabled": variant.throughput_timer, "synchronized": variant.throughput_timer}},
        "zero_optimization": {"stage": zero if variant.zero < 0 else variant.zero, "overlap_comm": variant.overlap_comm,
                              "contiguous_gradients": variant.contiguous_gradients,
                              "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
    }
    n_params = model.num_params()  # before ZeRO-3 partitions the parameters into placeholders
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    engine.bench_flops_per_token = lambda seq: 6 * n_params + 12 * cfg.n_layer * cfg.d_model * seq
    return engine


def device_batches(batches: list[dict], dev, cpu_positions: bool) -> list[dict]:
    """Host batches on the device; with `cpu_positions`, plus the target positions worked out on the CPU."""
    out = []
    for rows in batches:
        if cpu_positions:
            rows = {**rows, "target_positions": target_positions(rows["target"], rows["doc_ids"])}
        out.append({k: v.to(dev) for k, v in rows.items()})
    return out


def synchronize(dev: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_device() -> torch.device:
    """This rank's device: its GPU, else the CPU (a smoke run)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def time_engine(engine, batches: list[dict], steps: int, warmup: int) -> tuple[float, list[float]]:
    """Seconds per step over `steps` steps after `warmup`, and the losses (read after the timing)."""
    for i in range(warmup):
        engine_step(engine, batches[i % len(batches)])
    synchronize(engine.device)
    start = time.perf_counter()
    out = [engine_step(engine, batches[i % len(batches)]) for i in range(steps)]
    synchronize(engine.device)
    return (time.perf_counter() - start) / steps, [float(x) for x in out]


def engine_step(engine, batch: dict) -> torch.Tensor:
    """One optimizer step through the engine; returns the detached loss (no host sync)."""
    with torch.profiler.record_function("forward"):
        loss, _ = engine(**batch)
    with torch.profiler.record_function("backward"):
        engine.backward(loss)
    with torch.profiler.record_function("optimizer_step"):
        engine.step()
    return loss.detach()


def profile_engine(engine, batches: list[dict], steps: int, out_dir: str, emit, tag: str) -> None:
    """torch.profiler over `steps` steps: GPU kernel time by kind, host time per phase, host syncs.

    The figures are summed from the exported trace (kernel events, and the `record_function` spans of
    `engine_step` on the host); the trace is kept as out_dir/trace_<tag>.json.gz.
    """
    import gzip

    from torch.profiler import ProfilerActivity, profile

    for i in range(3):
        engine_step(engine, batches[i % len(batches)])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for i in range(steps):
            engine_step(engine, batches[i % len(batches)])
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    trace = Path(out_dir) / f"trace_{tag}.json"
    prof.export_chrome_trace(str(trace))
    raw = trace.read_bytes()
    with gzip.open(str(trace) + ".gz", "wb") as dst:
        dst.write(raw)
    trace.unlink()
    events = json.loads(raw)["traceEvents"]
    kernels = {}
    for e in events:
        if e.get("cat") == "kernel":
            kind = kernel_kind(e["name"])
            kernels[kind] = kernels.get(kind, 0.0) + e["dur"] / 1e3 / steps
    host = {}
    for e in events:
        if e.get("cat") == "user_annotation" and e["name"] in ("forward", "backward", "optimizer_step"):
            host[e["name"]] = host.get(e["name"], 0.0) + e["dur"] / 1e3 / steps
    averages = prof.key_averages()
    syncs = {e.key: e.count / steps for e in averages
             if any(k in e.key for k in ("Synchronize", "aten::item", "aten::_local_scalar_dense", "aten::nonzero"))}
    kernel_ms = sum(kernels.values())
    emit({"kind": "profile", "tag": tag, "step_ms": wall * 1e3, "gpu_kernel_ms": kernel_ms,
          "gpu_busy": kernel_ms / (wall * 1e3), "kernel_ms_by_kind": kernels, "host_ms_by_phase": host,
          "syncs_per_step": syncs})
    print(averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60), flush=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60), flush=True)


def kernel_kind(name: str) -> str:
    """The group of a CUDA kernel, by its name, for the per-step breakdown."""
    if "flex_attention" in name:
        return "attention"
    if "nvjet" in name or "gemm" in name or "splitK" in name:
        return "matmul"
    if "multi_tensor" in name:
        return "optimizer"
    if name.startswith("triton"):
        return "fused (inductor)"
    return "other element-wise / reduction"


def measure(args, flavor: str, seq: int, batch: int, compile_blocks: bool, layouts, emit,
            variant: Variant = Variant(), profile: bool = False, packing: str = "stream") -> dict:
    """Time the engine step on every rank (each its own batches); rank 0 emits per-GPU figures.

    Useful tokens are the positions inside a document (`doc_ids >= 0`); raw tokens every position of
    the micro batch (batch x seq). MFU counts useful tokens."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = GPTNeoConfig.from_flavor(flavor, vocab_size=args.vocab, pad_token_id=0,
                                   loss_chunk_size=variant.chunk or args.chunk,
                                   separated_ids=tuple(range(1000, 1000 + args.separated)))
    dev = bench_device()
    host = host_batches(layouts, packing, batch, seq, args.vocab, 1000 * rank, 8)
    useful = sum(int((b["doc_ids"] >= 0).sum()) for b in host) / len(host)  # per step, this rank
    batches = device_batches(host, dev, variant.cpu_positions)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0  # the batches, and what earlier measurements left
    accumulation = accumulation_of(args, batch)
    engine = build_engine(cfg, args.zero, batch, compile_blocks, seed=0, variant=variant, accumulation=accumulation)
    # whole optimizer steps in the warm-up and the timing: each micro batch's share of one
    whole = accumulation
    from unittest import mock

    from ds_train import attention

    scanned = variant.scanned_masks
    masks = mock.patch.object(attention, "block_mask", scanned_block_mask) if scanned else contextlib.nullcontext()
    with masks:
        seconds, losses = time_engine(engine, batches, -(-args.steps // whole) * whole,
                                      -(-args.warmup // whole) * whole)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else 0.0
    stats = torch.tensor([seconds, peak], device=dev)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    seconds, peak = stats.tolist()
    total = torch.tensor([useful], device=dev, dtype=torch.float64)
    dist.all_reduce(total)  # useful tokens of one step, every rank
    raw_tps = batch * seq / seconds  # per GPU
    tps = total.item() / world / seconds  # per GPU
    emit({"kind": "step", "packing": packing, "variant": variant.name, "flavor": flavor,
          "zero": engine.zero_optimization_stage(), "world_size": world, "batch": batch,
          "accumulation": accumulation, "seq": seq,
          "compiled": compile_blocks,
          "loss_chunk": cfg.loss_chunk_size, "step_ms": seconds * 1e3, "tokens_per_s": tps * world,
          "raw_tokens_per_s": raw_tps * world, "tokens_per_s_per_gpu": tps,
          "mfu": tps * engine.bench_flops_per_token(seq) / PEAK, "non_pad_share": tps / raw_tps,
          "peak_mem_gib": peak, "peak_mem_gib_per_gpu": peak, "last_loss": losses[-1]})
    if profile and args.profile and world == 1 and cuda:
        profile_engine(engine, batches, 5, args.profile, emit, f"{flavor}_b{batch}_s{seq}_{packing}")
    release(engine)
    return {"tokens_per_s": tps, "raw_tokens_per_s": raw_tps, "peak_mem_gib": peak}


def accumulation_of(args, batch: int) -> int:
    """Micro batches per optimizer step: `--global-batch` / micro batch when given, else `--accumulation`."""
    if not args.global_batch:
        return args.accumulation
    if args.global_batch % batch:
        raise SystemExit(f"train_step: --global-batch {args.global_batch} is not a multiple of micro batch {batch}")
    return args.global_batch // batch


def lean_reference(path: str, batch: int, steps: int, emit) -> None:
    """The `lean_flex` variant of the reference script at `path`, in this process on this card.

    The script (a compact compiled GPT of the 125M GPT-Neo shape: packed documents of 64-512 tokens
    filling every row, GPT-Neo's local windows through FlexAttention block masks, random ids) is
    imported, not copied: its batch and step count are its module globals `B` and `STEPS`, and its
    `main` prints one JSON line per variant. Every position of its rows is a document's, so its
    useful and raw rates are the same.
    """
    spec = importlib.util.spec_from_file_location("lean_gpt", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"train_step: --lean {path}: not a Python file")
    lean = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lean)
    lean.B, lean.STEPS = batch, steps
    printed, argv = io.StringIO(), sys.argv
    sys.argv = [path, "lean_flex"]
    try:
        with contextlib.redirect_stdout(printed):
            lean.main()
    finally:
        sys.argv = argv
    lines = [json.loads(x) for x in printed.getvalue().splitlines() if x.startswith("{")]
    row = lines[-1] if lines else {"error": printed.getvalue()[-300:]}
    if "error" in row:
        emit({"kind": "lean", "variant": "lean_flex", "batch": batch, "error": row["error"]})
    else:
        emit({"kind": "lean", "variant": "lean_flex", "flavor": "lean_gpt 125M (GPT-Neo shape)", "batch": batch,
              "seq": lean.T, "step_ms": row["step_ms"], "tokens_per_s": row["tokens_per_s"],
              "raw_tokens_per_s": row["tokens_per_s"], "mfu": row["mfu"], "peak_mem_gib": row["peak_gib"],
              "non_pad_share": 1.0, "last_loss": row["loss"], "script": Path(path).name})
    del lean
    torch._dynamo.reset()  # its compiled graphs hold its models
    gc.collect()
    torch.cuda.empty_cache()


def attempt(emit, name: str, work) -> None:
    """Run one optional measurement; a failure is reported as a row and the benchmark goes on."""
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - an experiment that fails is a result, not the end of the run
        emit({"kind": "error", "variant": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def release(engine) -> None:
    """Give an engine's GPU memory back before the next measurement (hooks hold references)."""
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def real_batches(source: str, tokenizer_dir: str, seq: int, batch: int,
                 count: int) -> tuple[int, tuple[int, ...], int, list[dict]]:
    """`count` micro batches of a real corpus as `ds-train`'s stream makes them (pairs or a packed
    folder, with its tokenizer; Code CLM, partial separation): (vocabulary, separated ids, pad id, batches)."""
    from ds_train.data.stream import build_dataloader
    from ds_train.data.tokenizer import load_tokenizer, separated_ids

    tok = load_tokenizer(tokenizer_dir)
    loader = build_dataloader([source], tokenizer_dir, objective="code_clm", seq_len=seq, micro_batch_size=batch)
    stream = iter(loader)
    out = [{k: v for k, v in next(stream).items() if isinstance(v, torch.Tensor)} for _ in range(count)]
    return len(tok), tuple(separated_ids(tokenizer_dir, "partial")), tok.pad_token_id, out


def loss_curve(args, layouts, emit) -> None:
    """Fast path vs plain path, same seed and batches, N steps: the largest gap in loss.

    The batches are synthetic (`--layouts`, random ids) or, with `--curve-data` and `--curve-tokenizer`,
    real: the first N micro batches of that corpus through the project's stream."""
    curves = {}
    plain = Variant("plain", cpu_positions=False, fused_rows=False)
    packing = args.packing[0]
    if args.curve_data:
        vocab, separated, pad, host = real_batches(args.curve_data, args.curve_tokenizer, args.seq, args.batch,
                                                   args.curve)
    else:
        vocab, separated, pad = args.vocab, tuple(range(1000, 1000 + args.separated)), 0
        host = host_batches(layouts, packing, args.batch, args.seq, args.vocab, 0, args.curve)
    for name, backend, compiled, variant in (("fast", "auto", True, Variant()), ("plain", "sdpa", False, plain)):
        cfg = GPTNeoConfig.from_flavor(args.flavor, vocab_size=vocab, pad_token_id=pad, loss_chunk_size=args.chunk,
                                       attention_backend=backend, separated_ids=separated)
        engine = build_engine(cfg, args.zero, args.batch, compiled, seed=0, variant=variant, lr=args.curve_lr)
        rows = device_batches(host, engine.device, variant.cpu_positions)
        _, curves[name] = time_engine(engine, rows, args.curve, warmup=0)
        del rows
        release(engine)
    gaps = [abs(a - b) for a, b in zip(curves["fast"], curves["plain"])]
    emit({"kind": "loss_curve", "data": args.curve_data or "synthetic (random ids)", "packing": packing,
          "flavor": args.flavor, "batch": args.batch, "seq": args.seq, "lr": args.curve_lr, "steps": args.curve,
          "max_abs_gap": max(gaps), "mean_abs_gap": sum(gaps) / len(gaps),
          "first": [curves["fast"][0], curves["plain"][0]], "last": [curves["fast"][-1], curves["plain"][-1]],
          "every_10th": {k: v[::10] for k, v in curves.items()}, "tolerance": "bf16: max |gap| < 0.05 nats"})


# ------------------------------------------------------------------------------------------ a real run
def write_row(row: dict, out: str) -> None:
    """Print one result line, and append it to `out` when given."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def run_rate(metrics: Path, after: int) -> dict:
    """A `ds-train` run's sustained rate from its metrics.jsonl: the logged intervals after step `after`
    (the warm-up: compiling), weighted by their duration (tokens / seconds), with the smallest and
    largest interval rate, MFU on useful tokens and the peak memory."""
    try:
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    except OSError as err:
        raise SystemExit(f"train_step: {metrics}: {err.strerror or err}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"train_step: {metrics}:{number}: not a JSON line (skipped)", file=sys.stderr)
    rows = [r for r in rows if isinstance(r, dict) and "perf/tokens_per_s" in r]
    if not rows:
        raise SystemExit(f"train_step: {metrics}: no perf/tokens_per_s rows")
    steps = [r["step"] for r in rows]
    kept = [(prev, r) for prev, r in zip([0, *steps], rows) if prev >= after]
    if not kept:
        raise SystemExit(f"train_step: {metrics}: nothing logged after step {after} (last logged: {steps[-1]})")
    seconds = [r["perf/step_time_s"] * (r["step"] - prev) for prev, r in kept]
    total = sum(seconds)
    useful = sum(r["perf/tokens_per_s"] * t for (_, r), t in zip(kept, seconds)) / total
    raw = sum(r["perf/raw_tokens_per_s"] * t for (_, r), t in zip(kept, seconds)) / total
    mfu = sum(r.get("perf/mfu", 0.0) * t for (_, r), t in zip(kept, seconds)) / total
    rates = [r["perf/tokens_per_s"] for _, r in kept]
    return {"kind": "ds-train", "steps_averaged": [kept[0][0], kept[-1][1]["step"]], "seconds_averaged": total,
            "tokens_per_s": useful, "raw_tokens_per_s": raw, "mfu": mfu, "non_pad_share": useful / raw,
            "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
            "peak_mem_gib": max(r.get("mem/peak_allocated_gib", 0.0) for _, r in kept),
            "per_log": [[r["step"], round(r["perf/tokens_per_s"]), round(r["perf/raw_tokens_per_s"])] for r in rows]}


# ------------------------------------------------------------------------------------------ main
def packings(value: str) -> list[str]:
    """`--packing`'s list, each of stream and rows."""
    names = [x for x in value.split(",") if x]
    if not names or any(x not in ("stream", "rows") for x in names):
        raise argparse.ArgumentTypeError(f"{value!r}: expected stream, rows or both (comma-separated)")
    return names


def variant_names(value: str) -> list[str]:
    """`--host-variants`' list, each a key of HOST_VARIANTS."""
    names = [x for x in value.split(",") if x]
    if unknown := [x for x in names if x not in HOST_VARIANTS]:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; known: {', '.join(HOST_VARIANTS)}")
    return names


def positive(value: str) -> int:
    """A whole number >= 1."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole number >= 1")
    return int(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lay = sub.add_parser("layouts", help="write document layouts of real pairs")
    lay.add_argument("--pairs", required=True)
    lay.add_argument("--tokenizer", required=True)
    lay.add_argument("--out", default=str(HERE / "doc_layouts.json"))
    lay.add_argument("--limit", type=int, default=6000)
    rate = sub.add_parser("rate", help="the sustained rate of a ds-train run from its metrics.jsonl")
    rate.add_argument("metrics", type=Path)
    rate.add_argument("--after", type=int, default=10, help="leave out the steps up to this one (warm-up)")
    rate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="add a field to the row (device, flavor, batch, seq, run, ...); values read as JSON")
    rate.add_argument("--out", default="")
    run = sub.add_parser("run", help="time the engine step (GPU)")
    run.add_argument("--layouts", default=str(HERE / "doc_layouts.json"))
    run.add_argument("--flavor", default="pycodegpt-110m")
    run.add_argument("--vocab", type=int, default=32000)
    run.add_argument("--separated", type=int, default=2000)
    run.add_argument("--batch", type=int, default=16)
    run.add_argument("--seq", type=int, default=1024)
    run.add_argument("--zero", type=int, default=2)
    run.add_argument("--chunk", type=int, default=4096)
    run.add_argument("--steps", type=int, default=20, help="micro batches timed (rounded up to whole optimizer steps)")
    run.add_argument("--warmup", type=int, default=5)
    run.add_argument("--accumulation", type=positive, default=1,
                     help="micro batches per optimizer step (the recipe's 256 x 1024 on one GPU at micro 16: 16); "
                          "step_ms and the rates are per micro batch")
    run.add_argument("--global-batch", type=positive, default=0,
                     help="accumulate this many sequences per optimizer step at every micro batch timed "
                          "(the recipe's 256: micro batch 16 accumulates 16, 64 accumulates 4); "
                          "overrides --accumulation")
    run.add_argument("--host-variants", type=variant_names, nargs="?", const=list(HOST_VARIANTS), default=[],
                     metavar="NAMES",
                     help="also time the fast path with these settings (comma-separated; all when no list is "
                          f"given): {', '.join(HOST_VARIANTS)}")
    run.add_argument("--no-compile", action="store_true")
    run.add_argument("--baselines", action="store_true")
    run.add_argument("--sweep", action="store_true")
    run.add_argument("--curve", type=int, default=0,
                     help="train this many steps on the fast and on the plain path and compare the losses")
    run.add_argument("--curve-data", default="", metavar="SOURCE",
                     help="the curve's batches from this corpus (pairs or a packed folder; real data)")
    run.add_argument("--curve-tokenizer", default="", metavar="DIR", help="the tokenizer of --curve-data")
    run.add_argument("--curve-lr", type=float, default=1e-4)
    run.add_argument("--out", default="")
    run.add_argument("--ablation", action="store_true",
                     help="first time the step from session 1's settings to the fast path, one change at a time")
    run.add_argument("--per-block", action="store_true",
                     help="first time the fast path with each block compiled on its own (the step before it)")
    run.add_argument("--more-batches", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                     help="also time the fast path at these micro batch sizes, e.g. 32,64")
    run.add_argument("--packing", type=packings, default=["stream"],
                     help="how micro batches are made, comma-separated: stream (the training stream's one "
                          "token stream of whole documents) and/or rows (padded rows); default stream")
    run.add_argument("--lean", default="", metavar="PATH",
                     help="first time the lean_flex variant of this reference script in the same process")
    run.add_argument("--lean-batch", type=int, default=16)
    run.add_argument("--profile", default="", metavar="DIR",
                     help="also profile 5 steps (one GPU): kernel table, GPU busy share, trace_*.json.gz in DIR")
    args = p.parse_args(argv)
    if args.cmd == "run" and bool(args.curve_data) != bool(args.curve_tokenizer):
        p.error("--curve-data and --curve-tokenizer go together")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    if args.cmd == "layouts":
        n = make_layouts(Path(args.pairs), Path(args.tokenizer), Path(args.out), args.limit)
        print(f"{n} document layouts -> {args.out}")
        return 0
    if args.cmd == "rate":
        row = {}
        for item in args.set:
            key, _, value = item.partition("=")
            try:
                row[key] = json.loads(value)
            except json.JSONDecodeError:
                row[key] = value
        row.update(run_rate(args.metrics, args.after))
        write_row(row, args.out)
        return 0
    from ds_train import distributed

    distributed.init()
    layouts = json.loads(Path(args.layouts).read_text())["docs"]
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    import torch.distributed as dist

    is_main = dist.get_rank() == 0

    def emit(row: dict) -> None:
        if is_main:
            write_row({**row, "device": card}, args.out)

    compiled = not args.no_compile
    one_gpu = dist.get_world_size() == 1
    if args.lean and one_gpu and torch.cuda.is_available():  # first: a clean process for its peak memory
        lean_reference(args.lean, args.lean_batch, args.steps, emit)
    if args.ablation:
        for variant in ABLATION:
            measure(args, args.flavor, args.seq, args.batch, compiled, layouts, emit, variant)
    elif args.per_block:
        measure(args, args.flavor, args.seq, args.batch, compiled, layouts, emit, PER_BLOCK)
    for name in args.host_variants:
        variant = HOST_VARIANTS[name]
        attempt(emit, variant.name, lambda v=variant: measure(args, args.flavor, args.seq, args.batch, compiled,
                                                              layouts, emit, v, packing=args.packing[0]))
    fast = {packing: measure(args, args.flavor, args.seq, args.batch, compiled, layouts, emit, profile=True,
                             packing=packing) for packing in args.packing}
    if not one_gpu:  # the baselines, sweeps and curve are one-GPU measurements
        return 0
    if args.baselines:
        from original_bench import run as original

        rows = original(["--only", "original,hf_plain", "--flavor", args.flavor, "--batch", str(args.batch),
                         "--seq", str(args.seq), "--vocab", str(args.vocab), "--separated", str(args.separated)])
        for row in rows:  # the same batch, process and card; their rows are full documents, no padding
            emit({**row, "raw_tokens_per_s": row["tokens_per_s"], "non_pad_share": 1.0})
            for packing, ours in fast.items():
                emit({"kind": "ratio", "of": f"step[{packing}]/{row['kind']}", "batch": args.batch,
                      "speed": ours["tokens_per_s"] / row["tokens_per_s"],
                      "raw_speed": ours["raw_tokens_per_s"] / row["tokens_per_s"],
                      "memory": ours["peak_mem_gib"] / row["peak_mem_gib"]})
    for batch in args.more_batches:
        for packing in args.packing:
            measure(args, args.flavor, args.seq, batch, compiled, layouts, emit, profile=True, packing=packing)
    if args.curve:
        loss_curve(args, layouts, emit)
    if args.sweep:
        tokens = args.batch * args.seq
        for seq in (512, 2048):
            measure(args, args.flavor, seq, tokens // seq, compiled, layouts, emit, packing=args.packing[0])
        for flavor in ("gpt-neo-350m", "gpt-neo-760m"):
            measure(args, flavor, args.seq, args.batch, compiled, layouts, emit, packing=args.packing[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
