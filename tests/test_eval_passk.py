"""pass@k: the unbiased estimator against exact binomials and hand-computed values."""

from fractions import Fraction
from math import comb

import pytest

from eval.passk import overall, parse_ks, pass_at_k, per_problem


def exact(n: int, c: int, k: int) -> Fraction:
    """1 - C(n-c, k) / C(n, k) in exact rational arithmetic (math.comb is 0 when k > n-c)."""
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # 1 - 3/5
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (5, 2, 4, 1.0),  # n - c < k
        (10, 0, 1, 0.0),
        (10, 10, 10, 1.0),
        (10, 1, 1, 0.1),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    ],
)
def test_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_matches_exact_binomials_including_large_n():
    for n, c, k in [(200, 3, 1), (200, 3, 10), (200, 3, 100), (200, 150, 100), (1000, 7, 100), (37, 36, 36)]:
        assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), rel=1e-9, abs=1e-12)


def test_bad_arguments_raise():
    for n, c, k in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_aggregation_uses_only_k_that_fit():
    counts = {"a": (5, 2), "b": (5, 5), "c": (3, 0)}
    rows = per_problem(counts, [1, 2, 5])
    assert rows["a"] == pytest.approx({"pass@1": 0.4, "pass@2": 0.7, "pass@5": 1.0})
    assert rows["c"] == {"pass@1": 0.0, "pass@2": 0.0}  # k=5 > n=3 is left out
    means = overall(counts, [1, 2, 5])
    assert means == pytest.approx({"pass@1": (0.4 + 1 + 0) / 3, "pass@2": (0.7 + 1 + 0) / 3})


def test_parse_ks():
    assert parse_ks("10,1, 100") == [1, 10, 100]
    for bad in ("", "a", "0,1", "1;2"):
        with pytest.raises(ValueError):
            parse_ks(bad)
