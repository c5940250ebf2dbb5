"""Host time of the training step, measured on the CPU where the compute is negligible.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python bench/host_overhead.py

A 12-layer GPT-Neo of width 64 (the layer and parameter count of pycodegpt-110m, none of its work)
steps through DeepSpeed's engine in several configurations and through plain PyTorch. What is left is
Python and dispatch: forward, backward (DeepSpeed's per-parameter gradient hooks run here) and the
optimizer step. On an H100 the batch-16 step of pycodegpt-110m is bound by this host work, so these
figures rank the engine settings before any GPU time is spent. Prints one JSON line per configuration.
"""

from __future__ import annotations

import json
import time

import torch

from ds_train import distributed
from ds_train.model import GPTNeo, GPTNeoConfig

STEPS, WARMUP = 30, 5


def small_model() -> GPTNeo:
    torch.manual_seed(0)
    return GPTNeo(GPTNeoConfig(vocab_size=512, n_positions=64, d_model=64, n_layer=12, n_head=2, window_size=16,
                               separated_ids=tuple(range(100, 150)), pad_token_id=0))


def batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 512, (1, 16)), "target": torch.ones(1, 16, dtype=torch.bool),
            "modality": torch.ones(1, 16, dtype=torch.bool)}


def timed(forward, backward, step) -> dict[str, float]:
    """Milliseconds per step of each phase, after a warm-up."""
    spent = {"forward_ms": 0.0, "backward_ms": 0.0, "step_ms": 0.0}
    for i in range(WARMUP + STEPS):
        t0 = time.perf_counter()
        loss = forward()
        t1 = time.perf_counter()
        backward(loss)
        t2 = time.perf_counter()
        step()
        t3 = time.perf_counter()
        if i >= WARMUP:
            for key, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2)):
                spent[key] += dt * 1e3 / STEPS
    return {k: round(v, 2) for k, v in spent.items()}


def deepspeed_step(zero: int, contiguous_gradients: bool) -> dict[str, float]:
    import deepspeed

    model = small_model()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "steps_per_print": 10**9, "bf16": {"enabled": True, "check_grad_overflow": False},
              "zero_optimization": {"stage": zero, "overlap_comm": False,
                                    "contiguous_gradients": contiguous_gradients, "reduce_bucket_size": 5e8}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                      config=config)
    inputs = batch()
    return timed(lambda: engine(**inputs)[0], engine.backward, engine.step)


def plain_step() -> dict[str, float]:
    model = small_model().bfloat16()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    inputs = batch()

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(lambda: model(**inputs)[0], lambda loss: loss.backward(), step)


def main() -> int:
    distributed.init()
    torch.set_num_threads(1)
    for zero, contiguous in ((0, True), (1, True), (2, True), (2, False)):
        print(json.dumps({"engine": f"deepspeed zero{zero}", "contiguous_gradients": contiguous,
                          **deepspeed_step(zero, contiguous)}), flush=True)
    print(json.dumps({"engine": "plain torch (clip + AdamW foreach)", **plain_step()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
