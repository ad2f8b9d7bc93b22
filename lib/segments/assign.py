"""Customers to segments: shares of each NMF component, the assignment rule, small segments merged,
agreement between fits (ARI) and the choice of k.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.platform.settings import SEGMENT_ASSIGNMENTS as ASSIGNMENTS
from lib.platform.settings import SegmentsSettings
from lib.segments.matrix import factor_table, fit_segments

log = logging.getLogger(__name__)


def _per_segment(frame: DataFrame, array_col: str, aggregate: Callable[[str], F.Column], k: int) -> list[float]:
    """k scalars: ``aggregate`` of each position of the array column over the rows (0.0 where none)."""
    rows = (frame.select(F.posexplode(array_col).alias("segment_id", "value"))
            .groupBy("segment_id").agg(aggregate("value").alias("value")).collect())
    values = [0.0] * k
    for row in rows:
        values[row["segment_id"]] = float(row["value"])
    return values


def component_mass(item_factors: DataFrame, k: int) -> list[float]:
    """sum_i H[l, i] for each component l (k scalars)."""
    return _per_segment(item_factors, "factors", F.sum, k)


def segment_shares(user_factors: DataFrame, mass: list[float]) -> DataFrame:
    """(user_id, shares): user u's share of their weight in each segment, W[u, l] * sum_i H[l, i]
    over its sum (the part of the user's row each segment reconstructs, so the scale ambiguity of
    W H does not tilt it). Users whose row of W is all zero (nothing to explain) are left out."""
    mass_col = F.array(*[F.lit(float(value)) for value in mass])
    weighted = user_factors.select("user_id", F.zip_with("factors", mass_col, lambda w, h: w * h).alias("weights"))
    weighted = weighted.select("user_id", "weights",
                               F.aggregate("weights", F.lit(0.0), lambda acc, x: acc + x).alias("total"))
    # The divisor is null, not 0, for an empty row: the optimizer may compute shares before filtering.
    divisor = F.when(F.col("total") > 0, F.col("total"))
    return weighted.where(F.col("total") > 0).select(
        "user_id", F.transform("weights", lambda w: w / divisor).alias("shares"))


def mean_shares(shares: DataFrame, k: int) -> list[float]:
    """The average customer's share in each segment (k scalars)."""
    return _per_segment(shares, "shares", F.avg, k)


def assign_segments(user_factors: DataFrame, mass: list[float], run_id: str, rule: str = "relative",
                    min_share: float = 0.0) -> DataFrame:
    """Each user's segment and its share of the user's weight (``affinity``).

    ``dominant``: the segment with the largest share. ``relative``: the segment whose share most
    exceeds the average customer's share of it. On a real basket log one component holds the
    staples every household buys; it has the largest share of nearly every customer, so the
    dominant rule puts 86-95% of them in it (docs/segments.md, findings), while the relative rule
    asks what sets the customer apart. Users whose row of W is all zero get no segment.

    ``min_share``: a segment left with fewer than this share of the assigned users is merged, the
    smallest first: its users go to their best remaining segment (a user with no weight in any
    remaining segment to the largest one), and the sizes are counted again (k scalars per round).
    A merged segment keeps its id and has no users.
    """
    if rule not in ASSIGNMENTS:
        raise ValueError(f"segments.assignment must be one of {ASSIGNMENTS}, got {rule!r}")
    k = len(mass)
    shares = segment_shares(user_factors, mass)
    if rule == "dominant":
        scores = F.col("shares")
    else:
        means = F.array(*[F.lit(value) for value in mean_shares(shares, k)])
        # A segment nobody has (mean 0) can never be picked: its score is 0 like every share of it.
        scores = F.zip_with("shares", means, lambda s, m: F.when(m > 0, s / m).otherwise(F.lit(0.0)))
    scored = shares.select("user_id", "shares", scores.alias("scores"))
    kept = list(range(k))
    assigned = scored.select("user_id", "shares", _best_of(kept, k, kept[0]).alias("segment_id"))
    while min_share > 0 and len(kept) > 1:
        sizes = segment_sizes(assigned, k)
        total = sum(sizes)
        small = [segment for segment in kept if sizes[segment] < min_share * total]
        if not small:
            break
        kept.remove(min(small, key=lambda segment: (sizes[segment], segment)))
        largest = max(kept, key=lambda segment: (sizes[segment], -segment))
        assigned = scored.select("user_id", "shares", _best_of(kept, k, largest).alias("segment_id"))
    return assigned.select("user_id", "segment_id", F.element_at("shares", F.col("segment_id") + 1).alias("affinity"),
                           F.lit(run_id).alias("run_id"))


def _best_of(kept: list[int], k: int, fallback: int) -> F.Column:
    """The 0-based position of the largest ``scores`` entry among the ``kept`` segments (the lowest id on
    a tie); ``fallback`` when every kept score is 0."""
    masked = F.zip_with("scores", F.array(*[F.lit(segment in kept) for segment in range(k)]),
                        lambda score, keep: F.when(keep, score).otherwise(F.lit(-1.0)))
    best = F.array_max(masked)
    return F.when(best > 0, F.array_position(masked, best) - 1).otherwise(F.lit(fallback)).cast("int")


def segment_sizes(user_segments: DataFrame, k: int) -> list[int]:
    """Users per segment (k scalars; 0 for a segment nobody is in)."""
    sizes = [0] * k
    for row in user_segments.groupBy("segment_id").count().collect():
        sizes[row["segment_id"]] = int(row["count"])
    return sizes


def adjusted_rand_index(contingency: np.ndarray) -> float:
    """ARI of two labelings from their contingency table (counts[a, b]); 1.0 when both put everyone together."""
    table = np.asarray(contingency, dtype=float)
    n = table.sum()

    def pairs(x):
        return float(np.sum(x * (x - 1) / 2.0))

    index, rows, cols = pairs(table), pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    total = n * (n - 1) / 2.0
    if total == 0:
        return 1.0
    expected = rows * cols / total
    maximum = (rows + cols) / 2.0
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))


def assignment_agreement(first: DataFrame, second: DataFrame) -> float:
    """ARI between two (user_id, segment_id) assignments over the users both assign (a k x k table
    is all that reaches the driver)."""
    counts = (first.select("user_id", F.col("segment_id").alias("a"))
              .join(second.select("user_id", F.col("segment_id").alias("b")), "user_id")
              .groupBy("a", "b").count().collect())
    if not counts:
        return float("nan")
    size = max(max(row["a"], row["b"]) for row in counts) + 1
    table = np.zeros((size, size))
    for row in counts:
        table[row["a"], row["b"]] = row["count"]
    return adjusted_rand_index(table)


@dataclass(frozen=True)
class KTrial:
    """One candidate k of ``segments.choose_k``: its fit and how usable its segments are."""

    k: int
    rel_error: float
    iterations: int
    largest_share: float   # of the assigned customers
    size_entropy: float    # entropy / log(k - empty)
    stability_ari: float   # between the fits from seed and seed + 1
    empty_segments: int    # merged by segments.min_segment_size, or nobody's best segment


# What ``choose_k`` asks of a k: the goals of docs/segments.md.
CHOOSE_K_MIN_ARI = 0.8


CHOOSE_K_MIN_ENTROPY = 0.8


CHOOSE_K_LARGEST_TIMES_EQUAL = 2.0  # the largest segment holds at most this many times 1/k


def assign_fit(result, settings: SegmentsSettings, k: int, user_index: DataFrame,
               user_scales: DataFrame) -> DataFrame:
    """(user_id, segment_id, affinity, run_id) of a fit still held in memory (a trial or another seed's
    fit, not written), by the stage's rule and merge; the caller releases the fit after using them."""
    users = factor_table(result.w, user_index, "user_idx", "user_id", user_scales, "row_scale", "", "")
    return assign_segments(users, component_mass(result.h, k), "", settings.assignment, settings.min_share(k))


def seed_stability(entries: DataFrame, settings: SegmentsSettings, user_segments: DataFrame, user_index: DataFrame,
                   user_scales: DataFrame, n_rows: int, n_cols: int) -> float:
    """ARI between ``user_segments`` (the fit from ``settings.seed``) and the same fit from ``seed + 1``,
    assigned by the same rule: do customers land together again?"""
    other = fit_segments(entries, replace(settings, seed=settings.seed + 1), n_rows, n_cols)
    try:
        ari = assignment_agreement(user_segments, assign_fit(other, settings, settings.k, user_index, user_scales))
    finally:
        other.release()
    log.info("stability: ARI %.4f between seeds %d and %d", ari, settings.seed, settings.seed + 1)
    return ari


def assess_k(entries: DataFrame, settings: SegmentsSettings, k: int, n_rows: int, n_cols: int,
             user_index: DataFrame, user_scales: DataFrame) -> KTrial:
    """Fit ``k`` segments from ``settings.seed`` and ``seed + 1`` (full ``max_iter``), assign the users of
    both with the stage's rule and merge, and measure the first fit's sizes and the two fits' agreement.
    Only k-sized counts reach the driver; both fits are released."""
    assignments, first = [], None
    for seed in (settings.seed, settings.seed + 1):
        result = fit_segments(entries, replace(settings, k=k, seed=seed), n_rows, n_cols)
        assignments.append(assign_fit(result, settings, k, user_index, user_scales).localCheckpoint(eager=True))
        first = first or (result.rel_error, result.iterations)
        result.release()
    sizes = segment_sizes(assignments[0], k)
    empty = sum(1 for size in sizes if size == 0)
    largest, entropy = size_balance(sizes, k - empty)
    return KTrial(k=k, rel_error=first[0], iterations=first[1], largest_share=largest, size_entropy=entropy,
                  stability_ari=assignment_agreement(*assignments), empty_segments=empty)


def choose_k(trials: list[KTrial]) -> tuple[KTrial, str]:
    """The largest k whose segments are usable: stable (ARI between seeds >= CHOOSE_K_MIN_ARI), balanced
    (size entropy >= CHOOSE_K_MIN_ENTROPY, largest share <= CHOOSE_K_LARGEST_TIMES_EQUAL / k) and all kept
    (none merged for being too small). More segments mail more precise tastes, as long as they hold.
    When no k qualifies, the most stable one (the smaller on a tie). Returns the trial and why."""
    if not trials:
        raise ValueError("choose_k needs at least one candidate k")

    def usable(trial: KTrial) -> bool:
        return (trial.stability_ari >= CHOOSE_K_MIN_ARI and trial.size_entropy >= CHOOSE_K_MIN_ENTROPY
                and trial.largest_share <= CHOOSE_K_LARGEST_TIMES_EQUAL / trial.k and trial.empty_segments == 0)

    rule = (f"stability ARI >= {CHOOSE_K_MIN_ARI}, size entropy >= {CHOOSE_K_MIN_ENTROPY}, largest share <= "
            f"{CHOOSE_K_LARGEST_TIMES_EQUAL:g} / k, no segment merged")
    passing = [trial for trial in trials if usable(trial)]
    if passing:
        chosen = max(passing, key=lambda trial: trial.k)
        return chosen, f"k = {chosen.k}: the largest of {[t.k for t in trials]} with {rule}"
    chosen = max(trials, key=lambda trial: (np.nan_to_num(trial.stability_ari, nan=-1.0), -trial.k))
    return chosen, (f"k = {chosen.k}: no k of {[t.k for t in trials]} has {rule}; the most stable "
                    f"(ARI {chosen.stability_ari:.3f})")


def size_balance(sizes: list[int], k: int) -> tuple[float, float]:
    """(largest share, entropy of the size distribution / log k) of segment sizes; ``k`` counts the
    segments customers could be in (merged segments left out)."""
    total = float(sum(sizes))
    if total <= 0:
        return float("nan"), float("nan")
    shares = np.array([size / total for size in sizes if size > 0])
    entropy = float(-(shares * np.log(shares)).sum() / math.log(k)) if k > 1 else 1.0
    return float(shares.max()), entropy
