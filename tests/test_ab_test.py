"""A/B/n read-out statistics on simulated tests with planted rates (no Spark)."""
from __future__ import annotations

import numpy as np
import pytest

from lib.campaign.ab_test import (corrected_z, minimum_detectable_effect, probability_best, recipients_needed,
                                  variant_read_out, wilson_interval)


def test_wilson_interval_matches_the_textbook_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_the_planted_winner_is_found_and_its_interval_covers_the_planted_difference():
    rng = np.random.default_rng(7)
    planted = {"a": 0.050, "b": 0.065, "c": 0.050}
    counts = {v: (int(rng.binomial(20_000, p)), 20_000) for v, p in planted.items()}
    rows = {r["variant"]: r for r in variant_read_out(counts, control="a")}
    assert max(rows, key=lambda v: rows[v]["probability_best"]) == "b" and rows["b"]["probability_best"] > 0.99
    assert rows["b"]["difference_low"] <= 0.015 <= rows["b"]["difference_high"] and rows["b"]["difference_low"] > 0
    assert rows["c"]["difference_low"] <= 0.0 <= rows["c"]["difference_high"]
    assert rows["a"]["difference"] is None and list(rows) == ["a", "b", "c"]  # the control first
    assert sum(r["probability_best"] for r in rows.values()) == pytest.approx(1.0)


def test_corrected_intervals_cover_every_difference_together_at_least_95_percent():
    rng = np.random.default_rng(11)
    planted = {"a": 0.04, "b": 0.05, "c": 0.04, "d": 0.045}
    together = 0
    for _ in range(1_000):
        counts = {v: (int(rng.binomial(5_000, p)), 5_000) for v, p in planted.items()}
        rows = [r for r in variant_read_out(counts, "a") if r["variant"] != "a"]
        together += all(r["difference_low"] <= planted[r["variant"]] - planted["a"] <= r["difference_high"]
                        for r in rows)
    assert together / 1_000 >= 0.94  # 3 comparisons at 1 - 0.05 / 3 each: >= 95% jointly (Monte Carlo slack)


def test_the_minimum_detectable_effect_is_found_with_its_power():
    baseline, n, variants = 0.05, 8_000, 3
    effect = minimum_detectable_effect(n, baseline, variants)
    assert recipients_needed(baseline, effect, variants) == pytest.approx(n, abs=1)
    rng = np.random.default_rng(3)
    z = corrected_z(variants - 1)
    found = 0
    for _ in range(2_000):
        c0, c1 = rng.binomial(n, baseline), rng.binomial(n, baseline + effect)
        p0, p1 = c0 / n, c1 / n
        found += (p1 - p0) / np.sqrt(p0 * (1 - p0) / n + p1 * (1 - p1) / n) > z
    assert 0.77 <= found / 2_000 <= 0.85  # power 0.8 (the normal approximation, Monte Carlo error ~0.01)


def test_probability_best_is_reproducible_and_even_for_equal_counts():
    counts = {"a": (100, 2_000), "b": (100, 2_000)}
    assert probability_best(counts, seed=1) == probability_best(counts, seed=1)
    assert probability_best(counts)["a"] == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="control variant 'z'"):
        variant_read_out(counts, control="z")
