"""Population stability index (PSI): how far this run's distribution of a column moved from the last run's.

PSI = sum over bins of (a - e) * ln(a / e), with e the bin's share of the previous version's rows and a
its share of this run's. Identical distributions give 0; by the usual convention below 0.1 is stable,
0.1 to 0.25 a moderate shift worth a look, above 0.25 a shift that changes who gets what.

Numeric columns are cut at the previous version's quantiles (so each bin holds about the same share
of last run's customers); categorical columns (segment ids) use one bin per value. Everything heavy
runs in Spark: the driver only receives the bin edges and the per-bin counts, a few numbers per column.
Nulls are left out of numeric bins (an ineligible customer has no score) and are a category of their own
in shares.
"""
from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

# Share given to a bin that one side leaves empty, so ln(a / e) stays finite: an empty bin on one side
# adds about (share on the other side) * ln(share / EPSILON), a large but finite term.
EPSILON = 1e-4
# Relative rank error of the quantile sketch behind the bin edges: exact on small tables, one pass on large ones.
QUANTILE_ERROR = 1e-3


def psi(expected: Mapping[Hashable, float], actual: Mapping[Hashable, float], epsilon: float = EPSILON) -> float:
    """PSI between two histograms given as counts per bin (bins missing on one side count 0).

    ``expected`` is the previous run's, ``actual`` this run's; each is normalised to shares, and a share
    below ``epsilon`` is raised to it. An empty side gives nan (no distribution to compare).
    """
    total_expected, total_actual = sum(expected.values()), sum(actual.values())
    if total_expected <= 0 or total_actual <= 0:
        return math.nan
    value = 0.0
    for key in set(expected) | set(actual):
        e = max(expected.get(key, 0) / total_expected, epsilon)
        a = max(actual.get(key, 0) / total_actual, epsilon)
        value += (a - e) * math.log(a / e)
    return value


def quantile_edges(previous: DataFrame, columns: Sequence[str], bins: int) -> dict[str, list[float]]:
    """Per column, the distinct inner edges of ``bins`` equal-share bins of ``previous`` (one quantile
    pass over all columns; ties collapse edges, so a column with few values has fewer bins)."""
    probabilities = [i / bins for i in range(1, bins)]
    quantiles = previous.approxQuantile(list(columns), probabilities, QUANTILE_ERROR)
    return {column: sorted({v for v in values if not math.isnan(v)}) for column, values in zip(columns, quantiles)}


def _bin_of(column: str, edges: Sequence[float]) -> Column:
    """The bin index of ``column``: 0 up to and including the first edge, len(edges) above the last."""
    value = F.col(column).cast("double")
    index = F.lit(0)
    for edge in edges:
        index = index + (value > F.lit(edge)).cast("int")
    return index


def binned_counts(df: DataFrame, edges: Mapping[str, Sequence[float]]) -> dict[str, dict[int, int]]:
    """Per column, the count of non-null, non-NaN rows in each bin of ``edges`` (one aggregation pass)."""
    aggregates = []
    for position, (column, cuts) in enumerate(edges.items()):
        value = F.col(column).cast("double")
        present = value.isNotNull() & ~F.isnan(value)
        index = _bin_of(column, cuts)
        aggregates += [F.count(F.when(present & (index == b), True)).alias(f"c{position}_{b}")
                       for b in range(len(cuts) + 1)]
    if not aggregates:
        return {}
    row = df.agg(*aggregates).first()
    return {column: {b: int(row[f"c{position}_{b}"]) for b in range(len(cuts) + 1)}
            for position, (column, cuts) in enumerate(edges.items())}


def numeric_psis(previous: DataFrame, current: DataFrame, columns: Sequence[str], bins: int = 10) -> dict[str, float]:
    """PSI of each numeric column between ``previous`` and ``current``, bins cut at ``previous``'s
    quantiles; nan for a column with no values on one side."""
    if not columns:
        return {}
    edges = quantile_edges(previous, columns, bins)
    expected, actual = binned_counts(previous, edges), binned_counts(current, edges)
    return {column: psi(expected[column], actual[column]) for column in columns}


def shares(df: DataFrame, column: str) -> dict[Hashable, int]:
    """Rows per value of ``column`` (null is a value): for columns with few values, such as segment ids."""
    return {row[column]: int(row["count"]) for row in df.groupBy(column).count().collect()}


def share_psi(previous: DataFrame, current: DataFrame, column: str) -> float:
    """PSI of the shares of each value of a categorical ``column`` (e.g. customers per segment_id)."""
    return psi(shares(previous, column), shares(current, column))
