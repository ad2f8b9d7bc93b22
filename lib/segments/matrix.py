"""The matrix the segments' NMF factorizes and its fit: score transforms, item weights and excluded
items, the factor tables, and the objective recomputed from the written tables.

The factorized matrix is X[u, i] = row_scale[u] * item_weight[i] * f(value[u, i]), where f is the
identity or log1p and value the interactions column ``segments.value_column`` (score, n_events or n_weighted_events). ``row_scale`` is stored in ``nmf_user_factors`` and ``item_weight`` in
``nmf_item_factors`` (with ``score_transform`` naming f), so ``interactions`` and the two factor
tables alone give X, and with it ||X - W H||_F / ||X||_F.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.nmf import NMFParams, factorize
from lib.platform.settings import SEGMENT_VALUE_COLUMNS as VALUE_COLUMNS
from lib.platform.settings import SegmentsSettings

log = logging.getLogger(__name__)

TRANSFORMS = ("none", "log1p")


def nmf_params(settings: SegmentsSettings, k: int | None = None, max_iter: int | None = None) -> NMFParams:
    """The factorization's parameters from the [segments] settings (``k`` / ``max_iter`` for a sweep)."""
    return NMFParams(
        k=k or settings.k, solver=settings.solver, max_iter=max_iter or settings.max_iter,
        tol=settings.tol, init=settings.init, seed=settings.seed,
        l1_w=settings.l1_w, l2_w=settings.l2_w, l1_h=settings.l1_h, l2_h=settings.l2_h,
        inner_passes=settings.inner_passes, row_blocks=settings.row_blocks,
        col_blocks=settings.col_blocks, block_nnz=settings.block_nnz,
        broadcast_limit_bytes=int(settings.broadcast_limit_mb * 1024 * 1024),
        checkpoint_interval=settings.checkpoint_interval, parallelism=settings.parallelism,
        sketch_power_iterations=settings.sketch_power_iterations,
    )


def segment_matrix(interactions: DataFrame, settings: SegmentsSettings,
                   excluded: DataFrame | None = None) -> tuple[DataFrame, DataFrame, DataFrame]:
    """The matrix the segments factorize, as NMF entries (row, col, value), with its scalings
    (user_idx, row_scale) and (item_idx, item_weight): see ``transform_scores``. ``excluded``
    (item_idx) lists items left out (non-product lines, non-recommendable products): weight 0."""
    entries, user_scales, item_weights = transform_scores(
        interactions, settings.transform, settings.idf_items, settings.row_normalize,
        popular_share_cap=settings.popular_share_cap, excluded=excluded, value_column=settings.value_column)
    return (entries.select(F.col("user_idx").alias("row"), F.col("item_idx").alias("col"), "value"),
            user_scales, item_weights)


def fit_segments(entries: DataFrame, settings: SegmentsSettings, n_rows: int, n_cols: int,
                 k: int | None = None, max_iter: int | None = None):
    """Factorize ``segment_matrix`` entries with the [segments] settings; the caller releases the result."""
    return factorize(entries, nmf_params(settings, k, max_iter), n_rows=n_rows, n_cols=n_cols)


def k_sweep(entries: DataFrame, settings: SegmentsSettings, n_rows: int, n_cols: int) -> list[dict]:
    """(k, rel_error, iterations) of a short fit (``segments.sweep_max_iter``) at each of ``segments.sweep_ks``:
    how much of the matrix each rank explains, for the report's elbow."""
    sweep = []
    for k in settings.sweep_ks:
        trial = fit_segments(entries, settings, n_rows, n_cols, k=k, max_iter=settings.sweep_max_iter)
        sweep.append({"k": k, "rel_error": trial.rel_error, "iterations": trial.iterations})
        trial.release()
        log.info("k sweep: k=%d relative error %.5f after %d iterations", k, trial.rel_error, trial.iterations)
    return sweep


def transformed_score(score: F.Column, transform: str) -> F.Column:
    """f(score): the identity or log1p."""
    if transform not in TRANSFORMS:
        raise ValueError(f"segments.transform must be one of {TRANSFORMS}, got {transform!r}")
    return F.log1p(score) if transform == "log1p" else score


def score_transform_name(transform: str, value_column: str) -> str:
    """The factor tables' ``score_transform``: f alone over ``score`` (e.g. "log1p"), else f(column)."""
    return transform if value_column == "score" else f"{transform}({value_column})"


def parse_score_transform(name: str) -> tuple[str, str]:
    """(transform, value_column) from a ``score_transform`` written by ``score_transform_name``."""
    transform, _, column = name.partition("(")
    column = column.rstrip(")") or "score"
    if transform not in TRANSFORMS or column not in VALUE_COLUMNS:
        raise ValueError(f"score_transform {name!r} names no known transform of {VALUE_COLUMNS}")
    return transform, column


def transform_scores(
    interactions: DataFrame, transform: str, idf_items: bool, row_normalize: bool,
    popular_share_cap: float = 1.0, excluded: DataFrame | None = None, value_column: str = "score",
) -> tuple[DataFrame, DataFrame, DataFrame]:
    """The matrix to factorize and its scalings.

    Returns (entries(user_idx, item_idx, value), user_scales(user_idx, row_scale),
    item_weights(item_idx, item_weight)). ``idf_items`` weights item i by log(1 + users / users_of_i)
    so that items everyone touches shape segments less; ``popular_share_cap`` c multiplies the weight
    of an item that more than a share c of the users have by c / share (an item everyone buys counts
    as if a share c bought it; rarer items keep weight 1); ``excluded`` items (item_idx) get weight 0
    and no entries; ``row_normalize`` scales each user's row to sum 1 so heavy users do not dominate.
    ``value_column`` is the interactions column f is applied to (one of VALUE_COLUMNS).
    """
    if value_column not in VALUE_COLUMNS:
        raise ValueError(f"segments.value_column must be one of {VALUE_COLUMNS}, got {value_column!r}")
    if value_column not in interactions.columns:
        raise ValueError(f"interactions has no column {value_column} (segments.value_column): it was written "
                         "before the column existed; run build_interactions again")
    base = interactions.select("user_idx", "item_idx",
                               transformed_score(F.col(value_column).cast("double"), transform).alias("fscore"))
    item_users = base.where(F.col("fscore") > 0).groupBy("item_idx").agg(F.count(F.lit(1)).alias("item_users"))
    weight = F.lit(1.0)
    if idf_items or popular_share_cap < 1.0:
        users = interactions.where(F.col("score") > 0).agg(F.countDistinct("user_idx")).first()[0] or 1
        share = F.col("item_users") / F.lit(float(users))
        if idf_items:
            weight = weight * F.log1p(F.lit(float(users)) / F.col("item_users"))
        if popular_share_cap < 1.0:
            weight = weight * F.least(F.lit(1.0), F.lit(float(popular_share_cap)) / share)
    item_weights = base.select("item_idx").distinct().join(item_users, "item_idx", "left")
    if excluded is not None:
        flagged = excluded.select(F.col("item_idx").cast("int"), F.lit(True).alias("excluded")).distinct()
        item_weights = item_weights.join(flagged, "item_idx", "left")
        weight = F.when(F.col("excluded").isNotNull(), F.lit(0.0)).otherwise(weight)
    item_weights = item_weights.select(
        "item_idx", F.when(F.col("item_users") > 0, weight).otherwise(F.lit(0.0)).alias("item_weight"))
    weighted = base.join(item_weights, "item_idx", "left").select(
        "user_idx", "item_idx", (F.col("fscore") * F.coalesce("item_weight", F.lit(0.0))).alias("weighted"))
    weighted = weighted.where(F.col("weighted") > 0)
    if row_normalize:
        user_scales = weighted.groupBy("user_idx").agg(F.sum("weighted").alias("row_total")).select(
            "user_idx", F.when(F.col("row_total") > 0, 1.0 / F.col("row_total")).otherwise(1.0).alias("row_scale"))
    else:
        user_scales = weighted.select("user_idx").distinct().withColumn("row_scale", F.lit(1.0))
    entries = weighted.join(user_scales, "user_idx").select(
        "user_idx", "item_idx", (F.col("weighted") * F.col("row_scale")).alias("value"))
    return entries, user_scales, item_weights


def excluded_item_indices(item_index: DataFrame, products: DataFrame | None,
                          patterns: tuple[str, ...] | list[str], categories: tuple[str, ...] = ()) -> DataFrame:
    """(item_idx, item_id, reason) of the indexed items the segments leave out: the items
    ``lib.ingest.products.excluded_items`` keeps out of every list (ids matching products.exclude_item_patterns,
    such as postage and manual adjustments, and, with a catalog, unavailable or unrecommendable items and
    those of products.exclude_categories)."""
    from lib.ingest.products import excluded_items

    return (item_index.join(excluded_items(products, item_index, patterns, categories), "item_id")
            .select("item_idx", "item_id", "reason"))


def factor_table(
    factors: DataFrame, index: DataFrame, idx_col: str, id_col: str, scales: DataFrame, scale_col: str,
    transform: str, run_id: str,
) -> DataFrame:
    """A factor table (idx, id, factors, scale, score_transform, run_id) from NMF rows (row_idx|col_idx, factors)."""
    source_idx = factors.columns[0]
    return (
        factors.select(F.col(source_idx).cast("int").alias(idx_col), "factors")
        .join(index.select(F.col(idx_col).cast("int"), id_col), idx_col, "left")
        .join(scales.select(F.col(idx_col).cast("int"), scale_col), idx_col, "left")
        .select(idx_col, id_col, "factors", F.coalesce(scale_col, F.lit(1.0)).alias(scale_col),
                F.lit(transform).alias("score_transform"), F.lit(run_id).alias("run_id"))
    )


def capped_item_count(interactions: DataFrame, cap: float) -> int:
    """How many items more than a share ``cap`` of the users have (those segments.popular_share_cap damps)."""
    if cap >= 1.0:
        return 0
    had = interactions.where(F.col("score") > 0)
    users = had.agg(F.countDistinct("user_idx")).first()[0] or 0
    return had.groupBy("item_idx").count().where(F.col("count") > cap * users).count()


def _gram_partials(factors: DataFrame, k: int) -> DataFrame:
    def gram(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        total = np.zeros((k, k))
        for batch in batches:
            column = batch.column("factors")
            if len(column):
                values = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), k)
                total += values.T @ values
        yield pa.RecordBatch.from_pydict({"gram": [total.ravel().tolist()]})

    return factors.select("factors").mapInArrow(gram, "gram array<double>")


def _gram(factors: DataFrame, k: int) -> np.ndarray:
    summed = _gram_partials(factors, k).select(
        F.posexplode("gram").alias("pos", "value")).groupBy("pos").agg(F.sum("value").alias("value")).collect()
    gram = np.zeros(k * k)
    for row in summed:
        gram[row["pos"]] = row["value"]
    return gram.reshape(k, k)


def relative_error_from_tables(interactions: DataFrame, user_factors: DataFrame, item_factors: DataFrame) -> float:
    """||X - W H||_F / ||X||_F recomputed from ``interactions`` and the two factor tables alone.

    X[u, i] = row_scale[u] * item_weight[i] * f(value), f and the value's column named by
    ``score_transform`` (``score_transform_name``); the
    cross term is a join over the non-zeros, the W'W and H H' Grams are k x k sums.
    """
    transforms = [row[0] for row in item_factors.select("score_transform").distinct().collect()]
    if len(transforms) != 1:
        raise ValueError(f"nmf_item_factors must name exactly one score_transform, found {transforms}")
    transform, value_column = parse_score_transform(transforms[0])
    k = len(user_factors.select("factors").first()[0])
    entries = (
        interactions.join(user_factors.select("user_idx", F.col("factors").alias("w"), "row_scale"), "user_idx")
        .join(item_factors.select("item_idx", F.col("factors").alias("h"), "item_weight"), "item_idx")
        .select((F.col("row_scale") * F.col("item_weight")
                 * transformed_score(F.col(value_column).cast("double"), transform)).alias("x"), "w", "h")
    )
    dot = F.aggregate(F.zip_with("w", "h", lambda a, b: a * b), F.lit(0.0), lambda acc, v: acc + v)
    sums = entries.agg(F.sum(F.col("x") * F.col("x")).alias("norm_sq"), F.sum(F.col("x") * dot).alias("cross")).first()
    gram_w, gram_h = _gram(user_factors, k), _gram(item_factors, k)
    residual = sums["norm_sq"] - 2.0 * sums["cross"] + float(np.sum(gram_w * gram_h))
    return math.sqrt(max(residual, 0.0) / sums["norm_sq"])
