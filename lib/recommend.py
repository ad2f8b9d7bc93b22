"""Recommenders around ALS: popularity baselines, factor-score top-N, offline evaluation, final lists.

All user/item tables stay DataFrames: top-N lists come from ``recommendForUserSubset`` or from
joins of users with short per-group candidate lists, ranked by a window per user.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from lib.als import AlsParams, TuningResult, als_top_n, exclusion_tiers, fit_als, rank_and_exclude, tune_als
from lib.interactions import index_additions, score_events, to_matrix_entries
from lib.metrics import evaluate, ranking_metrics
from lib.splits import holdout_latest, relevant_items

log = logging.getLogger(__name__)

SOURCES = ("als", "segment_popular", "popular")
METRIC_NAMES = ("precision", "recall", "map", "ndcg", "coverage", "users")


def excluded_pairs(events: DataFrame, event_types: list[str]) -> DataFrame:
    """(user_id, item_id) pairs the user may not be recommended again (e.g. already bought)."""
    if not event_types:
        return events.sparkSession.createDataFrame([], "user_id string, item_id string")
    return events.where(F.col("event_type").isin(event_types)).select("user_id", "item_id").distinct()


def to_indexed(pairs: DataFrame, user_index: DataFrame, item_index: DataFrame) -> DataFrame:
    """(user_id, item_id, ...) -> (user_idx, item_idx, ...), dropping ids the indices lack."""
    return pairs.join(user_index, "user_id").join(item_index, "item_id").drop("user_id", "item_id")


def to_ids(recommended: DataFrame, user_index: DataFrame, item_index: DataFrame) -> DataFrame:
    """(user_idx, item_idx, ...) -> (user_id, item_id, ...)."""
    return recommended.join(user_index, "user_idx").join(item_index, "item_idx").drop("user_idx", "item_idx")


def item_popularity(entries: DataFrame) -> DataFrame:
    """(item_idx, popularity): how many distinct users interacted with each item."""
    return entries.groupBy("item_idx").agg(F.countDistinct("user_idx").cast("double").alias("popularity"))


def group_top_n(
    users: DataFrame,
    group_scores: DataFrame,
    n: int,
    exclude: DataFrame | None = None,
    group_col: str | None = None,
) -> DataFrame:
    """(user_idx, item_idx, score, rank) from per-group item scores (group_col, item_idx, score).

    A user needs the group's best ``n`` items plus as many as they have exclusions; users are
    put in tiers by exclusion-list length (as in ``lib.als.als_top_n``) and joined only with the
    group's best ``n + tier bound`` items. Without ``group_col`` there is one global group.
    """
    keys = [group_col] if group_col else []
    targets = users.select("user_idx", *keys)
    if exclude is not None:
        targets = targets.join(exclude.groupBy("user_idx").agg(F.count(F.lit(1)).alias("_excluded")),
                               "user_idx", "left").fillna(0, ["_excluded"])
        longest = int(targets.agg(F.max("_excluded")).first()[0] or 0)
    else:
        targets, longest = targets.withColumn("_excluded", F.lit(0)), 0
    bounds = exclusion_tiers(n, longest)
    bound = F.lit(bounds[-1])
    for upper in reversed(bounds[:-1]):
        bound = F.when(F.col("_excluded") <= upper, F.lit(upper)).otherwise(bound)
    targets = targets.withColumn("_wanted", F.lit(n) + bound).drop("_excluded")
    shortlist = group_scores.withColumn(
        "_pos", F.row_number().over(Window.partitionBy(*keys).orderBy(F.col("score").desc(), "item_idx"))
    ).where(F.col("_pos") <= n + bounds[-1])
    if group_col:
        candidates = targets.join(shortlist, group_col).where(F.col("_pos") <= F.col("_wanted"))
    else:
        candidates = targets.join(F.broadcast(shortlist), F.col("_pos") <= F.col("_wanted"))
    return rank_and_exclude(candidates.select("user_idx", "item_idx", "score"), n, exclude)


def popular_top_n(users: DataFrame, entries: DataFrame, n: int, exclude: DataFrame | None = None) -> DataFrame:
    """Global popularity baseline: the most widely used items, the user's exclusions removed."""
    return group_top_n(users, item_popularity(entries).withColumnRenamed("popularity", "score"), n, exclude)


def segment_popular_top_n(
    users_segment: DataFrame,
    entries: DataFrame,
    n: int,
    exclude: DataFrame | None = None,
    members: DataFrame | None = None,
) -> DataFrame:
    """Popularity within the user's segment for ``users_segment`` (user_idx, segment_id).

    Item popularity per segment counts the distinct ``members`` (user_idx, segment_id; default the
    same users) who used the item.
    """
    segment_scores = (
        entries.join(members if members is not None else users_segment, "user_idx")
        .groupBy("segment_id", "item_idx")
        .agg(F.countDistinct("user_idx").cast("double").alias("score"))
    )
    return group_top_n(users_segment, segment_scores, n, exclude, group_col="segment_id")


def factor_top_n(
    user_factors: DataFrame,
    item_factors: DataFrame,
    users: DataFrame,
    n: int,
    exclude: DataFrame | None = None,
) -> DataFrame:
    """Top-N by dot product of (user_idx, factors) and (item_idx, factors) arrays, e.g. NMF's W and H'.

    A distributed cross join of the requested users with all items; fine for catalogs of tens of
    thousands of items, each score a k-term dot product.
    """
    left = users.select("user_idx").distinct().join(user_factors.select("user_idx", F.col("factors").alias("u")), "user_idx")
    right = item_factors.select("item_idx", F.col("factors").alias("v"))
    scored = left.crossJoin(right).select(
        "user_idx", "item_idx",
        F.aggregate(F.zip_with("u", "v", lambda a, b: a * b), F.lit(0.0), lambda acc, x: acc + x).alias("score"),
    )
    return rank_and_exclude(scored, n, exclude)


def user_segment_of(segments: DataFrame) -> DataFrame:
    """(user_id, segment_id): each user's highest-affinity segment in the latest run of ``segments``."""
    latest = segments.agg(F.max("run_id")).first()[0]
    current = segments.where(F.col("run_id") == F.lit(latest)) if latest is not None else segments
    best = Window.partitionBy("user_id").orderBy(F.col("affinity").desc(), F.col("segment_id"))
    return current.withColumn("_pos", F.row_number().over(best)).where(F.col("_pos") == 1).select("user_id", "segment_id")


# ----------------------------------------------------------------------------------------------
# Offline evaluation
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvaluationSettings:
    """How the offline evaluation splits, scores and measures."""

    weights: dict[str, float]
    half_life_days: float
    exclude_event_types: list[str]
    k_values: list[int]
    tune_k: int
    holdout_fraction: float = 0.2
    holdout_cutoff: datetime | None = None
    validation_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not self.k_values or min(self.k_values) < 1 or self.tune_k < 1:
            raise ValueError(f"evaluation K values must be >= 1, got {self.k_values} and tune_k={self.tune_k}")


@dataclass
class TrainingSide:
    """Everything a model may learn from: computed from training events alone."""

    entries: DataFrame          # (user_idx, item_idx, score, n_events, last_ts)
    user_index: DataFrame
    item_index: DataFrame
    excluded: DataFrame         # (user_idx, item_idx)
    as_of: datetime


def training_side(train_events: DataFrame, settings: EvaluationSettings, as_of: datetime,
                  user_index: DataFrame | None = None, item_index: DataFrame | None = None) -> TrainingSide:
    """Scores (decayed to ``as_of``), indices (unless given) and exclusions from ``train_events`` only."""
    scored = score_events(train_events, settings.weights, settings.half_life_days, as_of)
    if user_index is None or item_index is None:  # both from the training events
        user_index, item_index = index_additions(scored, None, None)
    user_index, item_index = user_index.cache(), item_index.cache()
    entries = to_matrix_entries(scored, user_index, item_index).cache()
    excluded = to_indexed(excluded_pairs(train_events, settings.exclude_event_types), user_index, item_index).cache()
    return TrainingSide(entries, user_index, item_index, excluded, as_of)


def _truth(held_out: DataFrame, side: TrainingSide, excluded_ids: DataFrame) -> DataFrame:
    """(user_id, item_id) ground truth for users the training side knows."""
    return relevant_items(held_out, side.user_index, excluded_ids)


@dataclass
class EvaluationReport:
    """Metrics of each model on the held-out events, plus the ALS tuning trail."""

    best: AlsParams
    tuning: list[TuningResult]
    metrics: list[tuple[str, int, str, float]] = field(default_factory=list)  # (model, k, metric, value)
    notes: list[str] = field(default_factory=list)

    def value(self, model: str, k: int, metric: str) -> float:
        for row in self.metrics:
            if row[:3] == (model, k, metric):
                return row[3]
        raise KeyError((model, k, metric))


def _ndcg_at(recommended: DataFrame, truth: DataFrame, k: int) -> float:
    return ranking_metrics(recommended, truth, k, "user_idx", "item_idx")["ndcg"]


def _measure(report: EvaluationReport, model: str, recommended_ids: DataFrame, truth: DataFrame,
             k_values: list[int], catalog_size: int) -> None:
    for k in sorted(k_values):
        values = evaluate(recommended_ids, truth, k, catalog_size)
        report.metrics.extend((model, k, name, float(values[name])) for name in METRIC_NAMES)
        log.info("evaluation %s @%d: %s", model, k, {name: round(values[name], 4) for name in METRIC_NAMES})


def evaluate_offline(
    events: DataFrame,
    settings: EvaluationSettings,
    candidates: list[AlsParams],
    factor_recommender: Callable[[TrainingSide, DataFrame, int], DataFrame] | None = None,
    factor_model_name: str = "nmf_score",
    on_tuning_result: Callable[[TuningResult], None] | None = None,
) -> EvaluationReport:
    """Hold out each user's latest events, tune ALS on a validation split of the training side,
    then compare tuned ALS, global popularity and (optionally) a factor recommender on the held-out
    events. ``factor_recommender(training_side, users, n)`` must itself fit only on the training side.
    """
    split = holdout_latest(events, settings.holdout_fraction, settings.holdout_cutoff)
    train_events = split.train.cache()
    side = training_side(train_events, settings, split.train_end)
    excluded_ids = excluded_pairs(train_events, settings.exclude_event_types)
    test_truth_ids = _truth(split.held_out, side, excluded_ids).cache()
    max_k = max(settings.k_values)
    catalog_size = side.item_index.count()
    log.info("offline evaluation: training side ends %s; %d held-out users; catalog %d items",
             split.train_end.isoformat(), test_truth_ids.select("user_id").distinct().count(), catalog_size)

    # Validation carved from the training side; it reuses the training side's indices (ids only).
    inner = holdout_latest(train_events, settings.validation_fraction)
    inner_side = training_side(inner.train, settings, inner.train_end, side.user_index, side.item_index)
    inner_excluded_ids = excluded_pairs(inner.train, settings.exclude_event_types)
    validation_truth = to_indexed(_truth(inner.held_out, inner_side, inner_excluded_ids),
                                  side.user_index, side.item_index).cache()
    best, tuning = tune_als(inner_side.entries, validation_truth, candidates, settings.tune_k, _ndcg_at,
                            inner_side.excluded, on_tuning_result)
    log.info("ALS tuning chose %s", best)
    report = EvaluationReport(best=best, tuning=tuning)

    test_users = test_truth_ids.select("user_id").distinct().join(side.user_index, "user_id").select("user_idx").cache()

    model = fit_als(side.entries, best)
    als_recs = to_ids(als_top_n(model, test_users, max_k, side.excluded), side.user_index, side.item_index)
    _measure(report, "als", als_recs, test_truth_ids, settings.k_values, catalog_size)

    popular = to_ids(popular_top_n(test_users, side.entries, max_k, side.excluded), side.user_index, side.item_index)
    _measure(report, "popular", popular, test_truth_ids, settings.k_values, catalog_size)

    if factor_recommender is not None:
        factor_recs = to_ids(factor_recommender(side, test_users, max_k), side.user_index, side.item_index)
        _measure(report, factor_model_name, factor_recs, test_truth_ids, settings.k_values, catalog_size)

    for df in (train_events, test_truth_ids, validation_truth, test_users, side.entries, side.excluded,
               inner_side.entries, inner_side.excluded, side.user_index, side.item_index):
        df.unpersist()
    return report


# ----------------------------------------------------------------------------------------------
# Final recommendations
# ----------------------------------------------------------------------------------------------

def final_recommendations(
    model_top_n: Callable[[DataFrame, int, DataFrame], DataFrame],
    entries: DataFrame,
    user_index: DataFrame,
    item_index: DataFrame,
    excluded: DataFrame,
    n: int,
    min_history: int,
    segments: DataFrame | None = None,
) -> DataFrame:
    """(user_id, rank, item_id, score, source) for every user in ``entries``.

    Users with at least ``min_history`` distinct items get ``model_top_n(users, n, excluded)``
    (source ``als``); the rest get their segment's most popular items (``segment_popular``) when
    ``segments`` (user_id, segment_id) knows them, else global popularity (``popular``).
    ``excluded`` holds (user_idx, item_idx) pairs never to recommend.
    """
    if n < 1 or min_history < 1:
        raise ValueError(f"top-N needs n >= 1 and min_history >= 1, got n={n} min_history={min_history}")
    history = entries.groupBy("user_idx").agg(F.countDistinct("item_idx").alias("n_items"))
    warm = history.where(F.col("n_items") >= min_history).select("user_idx")
    cold = history.where(F.col("n_items") < min_history).select("user_idx")
    parts = [model_top_n(warm, n, excluded).withColumn("source", F.lit("als"))]
    if segments is not None:
        user_segment = user_segment_of(segments).join(user_index, "user_id").select("user_idx", "segment_id")
        cold_segment = cold.join(user_segment, "user_idx")
        parts.append(segment_popular_top_n(cold_segment, entries, n, excluded, members=user_segment)
                     .withColumn("source", F.lit("segment_popular")))
        cold = cold.join(cold_segment.select("user_idx"), "user_idx", "left_anti")
    parts.append(popular_top_n(cold, entries, n, excluded).withColumn("source", F.lit("popular")))
    union = parts[0]
    for part in parts[1:]:
        union = union.unionByName(part)
    return to_ids(union, user_index, item_index).select("user_id", "rank", "item_id", "score", "source")
