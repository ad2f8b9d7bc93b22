"""A/B/n tests of a campaign: which variant converts best, by how much, and how sure we are.

Each variant's treatment customers are counted (recipients, conversions, revenue) by Spark like the
holdout read-out (``lib.campaign.lift.outcome_rows``); the statistics are plain Python on one row
per variant:

- each variant's conversion rate with a 95% Wilson interval (good near 0, where email rates live);
- each variant's difference to the control variant (the first declared) with a Wald interval at the
  Bonferroni-corrected level: with m comparisons each interval is at 1 - 0.05 / m, so all m cover
  their true differences together at least 95% of the time;
- the probability of being best: the share of joint draws from each variant's Beta(1 + c, 1 + n - c)
  posterior (uniform prior) in which it has the highest rate;
- before the send, the minimum detectable effect: the smallest absolute difference to the control a
  two-sided test at the corrected level finds with the given power, for the planned recipients per
  variant and the baseline rate (the audience's mean purchase_probability).
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

ALPHA = 0.05
POWER = 0.8
POSTERIOR_DRAWS = 20_000


def z_quantile(p: float) -> float:
    """The standard normal quantile of ``p``."""
    return NormalDist().inv_cdf(p)


def corrected_z(comparisons: int, alpha: float = ALPHA) -> float:
    """The two-sided normal quantile of a Bonferroni-corrected level for ``comparisons`` intervals."""
    if comparisons < 1:
        raise ValueError(f"comparisons must be >= 1, got {comparisons}")
    return z_quantile(1 - alpha / (2 * comparisons))


def wilson_interval(conversions: int, recipients: int, z: float = z_quantile(1 - ALPHA / 2)) -> tuple[float, float]:
    """(low, high) of the Wilson score interval of a proportion; (0, 1) without recipients."""
    if recipients == 0:
        return 0.0, 1.0
    p = conversions / recipients
    centre = (p + z * z / (2 * recipients)) / (1 + z * z / recipients)
    half = z * math.sqrt(p * (1 - p) / recipients + z * z / (4 * recipients ** 2)) / (1 + z * z / recipients)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion_diff_ci(c1: int, n1: int, c0: int, n0: int,
                       z: float = z_quantile(1 - ALPHA / 2)) -> tuple[float, float, float]:
    """(p1 - p0, low, high): Wald interval of a difference of two independent proportions at quantile ``z``."""
    p1, p0 = c1 / n1, c0 / n0
    se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    return p1 - p0, p1 - p0 - z * se, p1 - p0 + z * se


def probability_best(counts: dict[str, tuple[int, int]], draws: int = POSTERIOR_DRAWS,
                     seed: int = 0) -> dict[str, float]:
    """Variant -> probability its rate is the highest, from joint draws of the Beta posteriors of
    ``counts`` (variant -> (conversions, recipients)); seeded, so a read-out is reproducible."""
    names = sorted(counts)
    rng = np.random.default_rng(seed)
    samples = np.column_stack([rng.beta(1 + counts[v][0], 1 + counts[v][1] - counts[v][0], draws) for v in names])
    wins = np.bincount(samples.argmax(axis=1), minlength=len(names))
    return {name: float(wins[i]) / draws for i, name in enumerate(names)}


def minimum_detectable_effect(recipients_per_variant: int, baseline: float, variants: int,
                              alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest absolute rise over ``baseline`` that a two-sided test (each of the ``variants - 1``
    comparisons at the Bonferroni-corrected ``alpha``) finds with ``power``, both arms of equal size;
    the unpooled variance of both arms, solved by fixed-point iteration."""
    if recipients_per_variant < 1 or not 0 < baseline < 1 or variants < 2:
        raise ValueError("needs recipients_per_variant >= 1, 0 < baseline < 1 and at least two variants")
    z = corrected_z(variants - 1, alpha) + z_quantile(power)
    effect = z * math.sqrt(2 * baseline * (1 - baseline) / recipients_per_variant)
    for _ in range(50):
        raised = min(baseline + effect, 1.0)
        effect = z * math.sqrt((baseline * (1 - baseline) + raised * (1 - raised)) / recipients_per_variant)
    return effect


def recipients_needed(baseline: float, effect: float, variants: int, alpha: float = ALPHA,
                      power: float = POWER) -> int:
    """Recipients per variant for a rise of ``effect`` over ``baseline`` to be found with ``power``
    (the inverse of ``minimum_detectable_effect``)."""
    if effect <= 0 or not 0 < baseline < baseline + effect < 1:
        raise ValueError(f"needs 0 < baseline < baseline + effect < 1, got {baseline} and {effect}")
    z = corrected_z(variants - 1, alpha) + z_quantile(power)
    raised = baseline + effect
    return math.ceil((baseline * (1 - baseline) + raised * (1 - raised)) * (z / effect) ** 2)


def variant_read_out(counts: dict[str, tuple[int, int]], control: str,
                     seed: int = 0) -> list[dict[str, float | str | None]]:
    """One row per variant: rate with its Wilson interval, difference to ``control`` with its corrected
    interval (null on the control's row), probability of being best."""
    if control not in counts:
        raise ValueError(f"control variant {control!r} is not among {', '.join(sorted(counts))}")
    z = corrected_z(max(len(counts) - 1, 1))
    best = probability_best(counts, seed=seed)
    c0, n0 = counts[control]
    rows = []
    for name in sorted(counts, key=lambda v: (v != control, v)):
        c, n = counts[name]
        low, high = wilson_interval(c, n)
        row = {"variant": name, "recipients": n, "conversions": c, "rate": c / n if n else None,
               "rate_low": low, "rate_high": high, "difference": None, "difference_low": None,
               "difference_high": None, "probability_best": best[name]}
        if name != control and n and n0:
            row["difference"], row["difference_low"], row["difference_high"] = proportion_diff_ci(c, n, c0, n0, z)
        rows.append(row)
    return rows
