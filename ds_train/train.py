"""`ds-train`: DeepSpeed ZeRO training of a GPT-Neo with modality-relative pre-training.

    ds-train [RECIPE.yaml ...] [--section.key=value ...]
    python -m ds_train.train ...
    deepspeed [--hostfile H] --module ds_train.train ...

With no arguments it runs the embedded default job: mine a corpus from this machine's Python
sources, train a tokenizer, train a tiny model (Code CLM + partial separation, ZeRO-2), checkpoint,
export fp16 and print a summary.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import signal
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch

from ds_train import checkpoint, distributed, errors
from ds_train.config import (
    Batch,
    Config,
    batch_arithmetic,
    deepspeed_config,
    load_config,
    offloads_optimizer,
    resolve_precision,
    resolved,
    save_config,
)
from ds_train.config_cli import parse_args, print_config
from ds_train.data.pack import read_meta
from ds_train.data.prepack import run_inputs
from ds_train.data.stream import build_dataloader, val_scalars, validation_batches
from ds_train.data.tokenizer import load_tokenizer, separated_ids
from ds_train.distributed import DistInfo
from ds_train.export import export_checkpoint
from ds_train.fileio import write_text
from ds_train.hf import load_model
from ds_train.loss import target_positions
from ds_train.metrics import Metrics, plot_loss_curve, startup_lines, summary_lines
from ds_train.model import GPTNeo, GPTNeoConfig, check_batch_ranges
from ds_train.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from ds_train.prepare import Prepared, prepare, tokenizer_sha

log = logging.getLogger("ds_train")

TENSOR_KEYS = ("input_ids", "position_ids", "doc_ids", "modality", "target", "prefix")


class TrainingStopped(errors.UsageError):
    """The run stopped on purpose (non-finite loss); the message says where."""


class QuietGC:
    """Python's garbage collector on a schedule: no automatic collection inside the step loop.

    An automatic full collection walks every object the process holds (the compiled graphs' caches,
    the engine, the data loader): tens to hundreds of milliseconds at a moment nobody chose, in the
    middle of a step on one rank, which the other ranks then wait for. Instead, what exists after the
    first step is frozen out of later collections, and the young generations are collected every
    `EVERY` steps on every rank (the same steps). Cyclic garbage that survives into the oldest
    generation waits for the end of the loop, when collection is switched back on.
    """

    EVERY = 50

    def __init__(self) -> None:
        self.was_enabled = gc.isenabled()
        self.first = True
        gc.collect()
        gc.freeze()
        gc.disable()

    def after(self, step: int) -> None:
        if self.first:  # what the first step built (compiled graphs, the loader's workers) stays
            self.first = False
            gc.collect(1)
            gc.freeze()
        elif step % self.EVERY == 0:
            gc.collect(1)

    def close(self) -> None:
        gc.unfreeze()
        if self.was_enabled:
            gc.enable()


@dataclass
class Outcome:
    step: int
    tokens: int
    last_row: dict[str, float]
    checkpoint: Path | None
    stopped_by_signal: bool
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    tokens_per_s: float = 0.0  # useful (non-padding) tokens, averaged over this invocation's steps
    raw_tokens_per_s: float = 0.0  # every position of the packed rows, padding included


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files, overrides, print_only = parse_args(argv)
    if print_only:
        return print_config(files, overrides)
    try:
        cfg = load_config(files, overrides)
        dist = distributed.init()
        cfg.validate(world_size=dist.world_size, has_gpu=dist.device.type == "cuda")
        outcome = Trainer(cfg, dist).run()
        if dist.is_main and outcome is not None:
            finish(cfg, outcome)
    except (ValueError, OSError, checkpoint.CheckpointError) as err:
        # UsageError (a ValueError), bad data, tokenizers and files: plain lines, no traceback.
        return errors.refuse("ds-train", err)
    except RuntimeError as err:
        if not distributed.is_lost_peer(err):
            raise
        return errors.refuse("ds-train", distributed.lost_peer_message(err))
    return 0


def _shown(ids: list[str]) -> str:
    """A batch's `_id`s for a message: the first eight, and `...` when there are more."""
    return f"{ids[:8]}{' ...' if len(ids) > 8 else ''}"


class _LossCheck:
    """A micro batch's `isfinite(loss)` on its way to the host: a pinned copy and an event on a GPU."""

    def __init__(self, step: int, ids: list[str], flag: torch.Tensor):
        self.step, self.ids = step, ids
        if flag.is_cuda:
            self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.ready = flag, None

    def finite(self) -> bool:
        if self.ready is not None:
            self.ready.synchronize()  # waits for this copy only, not for the work queued after it
        return bool(self.host)


class Trainer:
    """Builds the model, data and engine, then runs the step loop with checkpoints and metrics."""

    def __init__(self, cfg: Config, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.batch: Batch = batch_arithmetic(cfg.train, dist.world_size)
        self.stop_requested = False
        self.skipped_nonfinite = 0
        self.nonfinite_in_a_row = 0
        self.unchecked: deque[_LossCheck] = deque()  # losses whose finiteness is not read back yet
        self.trained_ids: list[dict[str, Any]] = []  # this step's micro batches (data.trace_ids)
        self.skipped_ids: list[str] = []
        self.resumed_from: checkpoint.Found | None = None  # the checkpoint this run resumed, if any
        self.pairs: int | None = None  # documents of the packed training corpus (rank 0)

    # ------------------------------------------------------------------ setup
    def run(self) -> Outcome | None:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        prepared = self._prepare()
        self._build(prepared)
        start_step, tokens, data_state = self._resume()
        if self.dist.is_main:  # accepted: only now does the run directory change
            save_config(resolved(self.cfg, self.batch), self.run_dir / "config.yaml")
            write_text(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=2))
        self.first_step = start_step
        if start_step >= self.cfg.train.max_steps:
            log.info("run already at step %d of %d; nothing to train", start_step, self.cfg.train.max_steps)
            return Outcome(start_step, tokens, {}, self._latest_path(), False)
        if self.dist.is_main:
            self.pairs = sum(int(read_meta(p)["docs"]) for p in self.train_sources)  # the packed corpus
            for line in startup_lines(self.cfg, self.batch, self.n_params, self.meta, start_step, self.pairs):
                log.info("%s", line)
        self.loader = self._dataloader(data_state)
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._install_signal_handlers()
        try:
            return self._loop(start_step, tokens)
        finally:
            self.loader.close()  # graceful: the workers ignore SIGTERM
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _prepare(self) -> Prepared:
        try:
            prepared = prepare(self.cfg, self.run_dir, self.dist.is_main)
            self.train_sources, self.val_sources = run_inputs(  # rank 0 packs raw pairs; the others wait
                prepared.sources, self.cfg.data.val_source, prepared.tokenizer_dir, self.run_dir,
                seq_len=self.cfg.data.seq_len, drop_overlong=self.cfg.data.drop_overlong, pack=self.dist.is_main)
            return prepared
        finally:
            distributed.barrier()

    def _build(self, prepared: Prepared) -> None:
        self.prepared = prepared
        tok = load_tokenizer(prepared.tokenizer_dir)
        sep = separated_ids(tok, self.cfg.objective.separation)
        torch.manual_seed(self.cfg.run.seed)
        mcfg = GPTNeoConfig.from_flavor(
            self.cfg.model.flavor, vocab_size=len(tok), separated_ids=tuple(sep), pad_token_id=tok.pad_token_id,
            activation_checkpointing=self.cfg.model.activation_checkpointing,
            loss_chunk_size=self.cfg.model.loss_chunk_size, local_attention=self.cfg.model.local_attention,
        )
        if self.cfg.model.init_from:  # shape from its config.json; vocabulary and S from our tokenizer
            model = load_model(
                self.cfg.model.init_from, vocab_size=len(tok), separated_ids=tuple(sep),
                pad_token_id=tok.pad_token_id, activation_checkpointing=self.cfg.model.activation_checkpointing,
                loss_chunk_size=self.cfg.model.loss_chunk_size, local_attention=self.cfg.model.local_attention)
            mcfg = model.config
        else:
            model = GPTNeo(mcfg)
        self.model_config = mcfg
        self.n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        self.flops_per_token = model.flops_per_token(self.cfg.data.seq_len)
        has_gpu = self.dist.device.type == "cuda"
        bf16_ok = has_gpu and torch.cuda.is_bf16_supported()
        self.precision = resolve_precision(self.cfg.train, has_gpu, bf16_ok)
        ds_cfg = self.ds_config = deepspeed_config(self.cfg, self.batch, self.precision)
        if self.cfg.model.compile and has_gpu:
            model.compile_blocks()
        opt_cfg = self.cfg.optim
        if offloads_optimizer(ds_cfg):  # DeepSpeed's CPU Adam runs the offloaded update
            ds_cfg["optimizer"] = {"type": "AdamW", "params": {
                "lr": opt_cfg.lr, "betas": [opt_cfg.beta1, opt_cfg.beta2], "eps": opt_cfg.eps,
                "weight_decay": opt_cfg.weight_decay}}
            optimizer, params = None, param_groups(model, opt_cfg.weight_decay)
        else:
            optimizer, params = build_optimizer(model, opt_cfg, self.dist.device), None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=params, config=ds_cfg,
            lr_scheduler=lambda opt: build_scheduler(opt, opt_cfg, self.cfg.train.max_steps),
        )
        self.meta = {
            "model": mcfg.to_dict(), "separation": self.cfg.objective.separation,
            "objective": self.cfg.objective.name, "tokenizer_sha": tokenizer_sha(prepared.tokenizer_dir),
            "zero_stage": self.engine.zero_optimization_stage(), "precision": self.precision,
            "schedule": {"max_steps": self.cfg.train.max_steps, "lr": opt_cfg.lr, "min_lr": opt_cfg.min_lr,
                         "warmup_ratio": opt_cfg.warmup_ratio},
        }

    def _resume(self) -> tuple[int, int, Any]:
        if not self.cfg.checkpoint.resume:
            return 0, 0, None
        found = checkpoint.find_for_resume(self.ckpt_dir)  # checksums verified; refuses if none is usable
        if found is None:
            return 0, 0, None
        checkpoint.check_compatible(found.meta, self.meta, where=f"checkpoint {found.path}")
        # Another world size: resharded through DeepSpeed's universal checkpoint; the stream goes on from its position.
        data_state, meta = checkpoint.load(self.engine, found, self.dist.rank, seed=self.cfg.run.seed)
        self.resumed_from = found
        log.info("resumed from %s (step %d)", found.path, found.step)
        self._warn_schedule_change(found)
        return found.step, int(meta.get("tokens_seen", 0)), data_state

    def _warn_schedule_change(self, found: checkpoint.Found) -> None:
        """A resume under another schedule (a larger train.max_steps stretches the cosine) makes the
        learning rate jump: say so, with the rate the next step had and the one it gets now."""
        old, new = found.meta.get("schedule"), self.meta["schedule"]
        if not old or old == new or not self.dist.is_main:
            return

        def lr_at(s: dict) -> float:
            return s["lr"] * lr_factor(found.step, s["max_steps"], s["warmup_ratio"], s["min_lr"] / s["lr"])

        changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v)
        log.warning("the learning-rate schedule differs from the checkpoint's (%s): the learning rate of step "
                    "%d moves from %.2e to %.2e", changed, found.step + 1, lr_at(old), lr_at(new))

    def _dataloader(self, state: Any):
        loader = build_dataloader(
            self.train_sources, self.prepared.tokenizer_dir, objective=self.cfg.objective.name,
            seq_len=self.cfg.data.seq_len, micro_batch_size=self.batch.micro, rank=self.dist.rank,
            world_size=self.dist.world_size, num_workers=self.cfg.data.num_workers, seed=self.cfg.run.seed,
            corrupt_prob=self.cfg.objective.corrupt_prob, val_share=self.cfg.data.val_share,
            val_sources=self.val_sources,
        )
        if state is not None:
            loader.load_state_dict(state)
        return loader

    def validate(self) -> dict[str, float]:
        """`val/loss` (and per modality) over the whole validation set, every rank a share of it."""
        cfg, stats = self.cfg, torch.zeros(4, device=self.dist.device)
        self.engine.eval()
        with torch.no_grad():
            for batch, counts in validation_batches(
                    self.val_sources or self.train_sources, self.prepared.tokenizer_dir, objective=cfg.objective.name,
                    seq_len=cfg.data.seq_len, micro_batch_size=self.batch.micro, rank=self.dist.rank,
                    world_size=self.dist.world_size, seed=cfg.run.seed, corrupt_prob=cfg.objective.corrupt_prob,
                    val_share=0.0 if self.val_sources else cfg.data.val_share):
                stats += self.engine(**self._inputs(batch))[1].to(stats.device) * counts
        self.engine.train()
        return val_scalars(distributed.all_reduce_sum(stats).tolist())

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            if not self.stop_requested:
                log.warning("rank %d: signal %s: saving a checkpoint at the end of this step", self.dist.rank,
                            signal.Signals(signum).name)
            self.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    # ------------------------------------------------------------------ loop
    def _loop(self, step: int, tokens: int) -> Outcome:
        cfg, dev = self.cfg, self.dist.device
        metrics = Metrics(self.run_dir, self.dist.is_main, cfg.train.max_steps, step, self.flops_per_token, dev)
        interval_stats = torch.zeros(4, device=dev)
        self.useful_tokens = 0  # this rank's non-padding tokens since the last report (host-side count)
        row: dict[str, float] = {}
        saved: Path | None = None
        steps_in_interval = 0
        batches = iter(self.loader)
        end = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
        trace = self._open_trace() if cfg.data.trace_ids else None
        stopped = False
        quiet_gc = QuietGC()
        try:
            while step < end:
                interval_stats += self.train_step(batches, step)
                step += 1
                quiet_gc.after(step)
                if trace is not None:
                    self._write_trace(trace, step)
                steps_in_interval += 1
                step_tokens = self.batch.global_ * cfg.data.seq_len
                tokens += step_tokens
                metrics.add_tokens(step_tokens)
                metrics.advance()
                last = step == end
                every = cfg.eval.every_steps
                eval_now = bool(cfg.data.val_share or self.val_sources) and (last or bool(every and step % every == 0))
                log_now = step % cfg.train.log_every == 0 or last or eval_now
                save_now = last or step % cfg.checkpoint.every_steps == 0
                stop = distributed.any_rank(self.stop_requested)
                # Losses are checked one step late (no host sync), and all of them before a log or save.
                self._check_finite(keep=0 if (log_now or save_now or stop) else self.batch.accum)
                if log_now:
                    scalars = {**self._scalars(), **(self.validate() if eval_now else {})}
                    useful = torch.tensor([float(self.useful_tokens)], device=dev)
                    row = metrics.report(step, distributed.all_reduce_sum(torch.cat([interval_stats, useful])),
                                         scalars, steps_in_interval)
                    interval_stats.zero_()
                    self.useful_tokens = steps_in_interval = 0
                if stop or save_now:
                    saved = self.save(step, tokens)
                if stop:
                    log.warning("rank %d stopped at step %d after a signal; checkpoint %s saved; exiting",
                                self.dist.rank, step, saved)
                    stopped = True
                    break
        finally:
            quiet_gc.close()
            batches.close()
            metrics.close()
            if trace is not None:
                trace.close()
            self._report_skips()
        return Outcome(step, tokens, row, saved, stopped, self.loader.skip_counts(), *metrics.run_average())

    def _open_trace(self):
        """RUN_DIR/trace/rank{r}.jsonl, appended to: a resumed run re-writes the steps after its checkpoint."""
        folder = self.run_dir / "trace"
        folder.mkdir(parents=True, exist_ok=True)
        return open(folder / f"rank{self.dist.rank}.jsonl", "a")

    def _write_trace(self, trace, step: int) -> None:
        """One line per step: the `_id`s this rank trained on (per micro batch)."""
        line = {"step": step, "rank": self.dist.rank, "ids": [i for b in self.trained_ids for i in b["ids"]],
                "batches": self.trained_ids, "skipped_ids": self.skipped_ids}
        trace.write(json.dumps(line) + "\n")
        trace.flush()

    def _report_skips(self) -> None:
        """Bad or overlong input was skipped and counted when the corpus was packed; say so on every rank."""
        counts = self.loader.skip_counts()
        if counts:
            log.warning("rank %d skipped input records: %s", self.dist.rank,
                        ", ".join(f"{k}={v}" for k, v in counts.items()))

    def train_step(self, batches: Iterator[dict], step: int) -> torch.Tensor:
        """One optimizer step: `accum` micro batches through forward, backward and engine.step().

        No host synchronisation on a GPU: target positions and id ranges are worked out on the CPU copy
        of each batch, and the loss's finiteness is read back later (`_check_finite`), except with
        `train.nonfinite=skip`, which must know before the backward pass whether to skip the batch.
        """
        dev = self.dist.device
        stats_sum = torch.zeros(4, device=dev)
        done = 0
        self.trained_ids, self.skipped_ids = [], []
        while done < self.batch.accum:
            batch = next(batches)
            ids = [i for row in batch.get("ids", []) for i in row]
            if step == self.first_step and done == 0:
                self._log_expected_epochs(batch)
            loss, stats = self.engine(**self._inputs(batch))
            # fp16: the loss scaler skips overflowing steps itself (counted in engine.skipped_steps).
            if self.precision != "fp16" and self.cfg.train.nonfinite == "skip":
                finite = bool(torch.isfinite(loss).item())
                if distributed.any_rank(not finite):  # every rank takes the same branch
                    self._nonfinite(step, ids, finite)
                    self.skipped_ids += ids
                    continue
            elif self.precision != "fp16":
                self.unchecked.append(_LossCheck(step, ids, torch.isfinite(loss.detach())))
            self.engine.backward(loss)
            self.engine.step()
            stats_sum += stats.to(dev)
            self.useful_tokens += batch["num_tokens"]  # counted when the stream built the batch
            done += 1
            self.nonfinite_in_a_row = 0
            self.trained_ids.append({"ids": ids})
        return stats_sum

    def _log_expected_epochs(self, batch: dict) -> None:
        """From the first micro batch: pairs per micro batch, and so about how many epochs the run covers."""
        pairs = self.pairs
        if not self.dist.is_main or not pairs or "doc_ids" not in batch:
            return
        per_micro = sum(len(set(r[r >= 0].tolist())) for r in batch["doc_ids"])  # documents restart per row
        micro_per_step = self.batch.global_ // self.batch.micro
        epochs = self.cfg.train.max_steps * micro_per_step * per_micro / pairs
        log.info("expected epochs: ~%.1f (%d steps x %d micro batches x ~%d pairs in the first one / %s pairs)",
                 epochs, self.cfg.train.max_steps, micro_per_step, per_micro, f"{pairs:,}")

    def _inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The model's inputs on this rank's device, with what needs the values worked out on the CPU."""
        check_batch_ranges(batch["input_ids"], batch["position_ids"], self.model_config.vocab_size,
                           self.model_config.n_positions)
        dev = self.dist.device
        inputs = {k: batch[k].to(dev, non_blocking=True) for k in TENSOR_KEYS if k in batch}
        positions = target_positions(batch["target"], batch.get("doc_ids"))
        if dev.type == "cuda":  # a copy from pageable memory would first wait for the device's queued work
            positions = positions.pin_memory()
        inputs["target_positions"] = positions.to(dev, non_blocking=True)
        return inputs

    def _check_finite(self, keep: int) -> None:
        """Read the finiteness of all but the newest `keep` unchecked losses; stop (every rank at the same
        step) if any rank saw a non-finite one. Each read waits only for its own forward pass."""
        bad = None
        while len(self.unchecked) > keep:
            check = self.unchecked.popleft()
            if not check.finite() and bad is None:
                bad = check
        if distributed.any_rank(bad is not None):
            where = (f"non-finite loss at step {bad.step + 1} on rank {self.dist.rank}, batch _ids {_shown(bad.ids)}"
                     if bad is not None else
                     "non-finite loss on another rank (it names the step and batch)")
            raise TrainingStopped(where + "; stopped without saving, the last checkpoint precedes it "
                                  "(train.nonfinite=skip skips such batches)")

    def _nonfinite(self, step: int, ids: list[str], finite_here: bool) -> None:
        """train.nonfinite=skip: count the skipped batch; give up after `nonfinite_limit` in a row."""
        where = f"non-finite loss at step {step + 1}"
        if not finite_here:
            where += f" on rank {self.dist.rank}, batch _ids {_shown(ids)}"
        else:
            where += " on another rank (it names the batch)"
        self.skipped_nonfinite += 1
        self.nonfinite_in_a_row += 1
        log.warning("%s: batch skipped (%d so far)", where, self.skipped_nonfinite)
        if self.nonfinite_in_a_row >= self.cfg.train.nonfinite_limit:
            raise TrainingStopped(f"{self.nonfinite_in_a_row} non-finite batches in a row up to step {step + 1}: "
                                  "the weights are likely no longer finite; resume from an earlier checkpoint "
                                  "with a lower optim.lr")

    def _scalars(self) -> dict[str, float]:
        out = {"train/lr": float(self.scheduler.get_last_lr()[0])}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            out["train/grad_norm"] = float(norm)
        if self.precision == "fp16":
            out["train/loss_scale"] = float(getattr(self.optimizer, "cur_scale", 0.0)
                                            or getattr(self.optimizer, "loss_scale", 0.0))
        out["train/skipped_steps"] = float(self.engine.skipped_steps + self.skipped_nonfinite)
        out["data/skipped_records"] = float(sum(self.loader.skip_counts().values()))
        return out

    def save(self, step: int, tokens: int) -> Path:
        meta = {**self.meta, "tokens_seen": tokens}
        return checkpoint.save(self.engine, self.ckpt_dir, step, meta, self.loader.state_dict(),
                               self.prepared.tokenizer_dir, self.cfg.checkpoint.keep_last,
                               self.dist.rank, self.dist.world_size)

    def _latest_path(self) -> Path | None:
        found = checkpoint.find_latest(self.ckpt_dir)
        return found.path if found else None


def finish(cfg: Config, outcome: Outcome) -> None:
    """Rank 0, after training: export (when asked), the loss curve and the closing summary."""
    run_dir = Path(cfg.run.dir)
    export_dir = None
    if cfg.export.enabled and outcome.checkpoint is not None and not outcome.stopped_by_signal:
        export_dir = run_dir / "export"
        marker = export_dir / "EXPORTED_FROM"
        if not (marker.is_file() and marker.read_text() == str(outcome.checkpoint.resolve())):
            export_checkpoint(outcome.checkpoint, export_dir, dtype=cfg.export.dtype, force=True)
            marker.write_text(str(outcome.checkpoint.resolve()))
    png = plot_loss_curve(run_dir, run_dir / "loss_curve.png")
    print("\n".join(summary_lines(cfg, outcome, export_dir, png)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
