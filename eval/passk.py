"""pass@k with the unbiased estimator of Chen et al. (2021), and its aggregation over problems."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k of n samples, c of them correct, hold a pass.

    Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which never forms the huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def parse_ks(text: str) -> list[int]:
    """`"1,10,100"` -> [1, 10, 100]; raises ValueError on anything else."""
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--k takes comma-separated positive integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise ValueError(f"--k takes comma-separated positive integers, got {text!r}")
    return ks


def per_problem(counts: Mapping[str, tuple[int, int]], ks: Iterable[int]) -> dict[str, dict[str, float]]:
    """{task_id: {"pass@k": value}} for every k <= that problem's number of samples."""
    return {task: {f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n} for task, (n, c) in counts.items()}


def overall(counts: Mapping[str, tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """Mean pass@k over problems, for each k that every problem has enough samples for."""
    if not counts:
        return {}
    fewest = min(n for n, _ in counts.values())
    return {
        f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
        for k in ks
        if k <= fewest
    }
