"""The binomial upper tail against SciPy's values in the golden file, and its edges."""

from __future__ import annotations

import math

import pytest

from services.pow.v2.stats import binom_upper_tail
from tests.support.pocv2 import golden


@pytest.mark.parametrize("case", golden()["binomtest_greater"],
                         ids=lambda c: f"k{c['k']}-n{c['n']}-p{c['p']}")
def test_matches_scipy_binomtest_greater(case: dict[str, float]) -> None:
    got = binom_upper_tail(int(case["k"]), int(case["n"]), case["p"])
    assert got == pytest.approx(case["pvalue"], rel=1e-9, abs=1e-12)


def test_edges() -> None:
    assert binom_upper_tail(0, 0, 0.5) == 1.0
    assert binom_upper_tail(0, 10, 0.1) == 1.0
    assert binom_upper_tail(11, 10, 0.1) == 0.0
    assert binom_upper_tail(1, 10, 0.0) == 0.0
    assert binom_upper_tail(10, 10, 1.0) == 1.0
    assert binom_upper_tail(10, 10, 0.5) == pytest.approx(0.5**10, rel=1e-12)
    with pytest.raises(ValueError):
        binom_upper_tail(1, 10, 1.5)


def test_tails_are_monotone_and_stay_finite_for_large_samples() -> None:
    values = [binom_upper_tail(k, 100_000, 0.1) for k in (9_000, 10_000, 10_500, 11_000, 20_000)]
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in values)
    assert values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(1.0, abs=1e-12) and values[-1] == 0.0
