"""Customer segments from an NMF of the interaction matrix: score transforms, factor tables,
dominant segments, segment profiles, and the objective recomputed from the written tables.

The factorized matrix is X[u, i] = row_scale[u] * item_weight[i] * f(score[u, i]), where f is the
identity or log1p. ``row_scale`` is stored in ``nmf_user_factors`` and ``item_weight`` in
``nmf_item_factors`` (with ``score_transform`` naming f), so ``interactions`` and the two factor
tables alone give X, and with it ||X - W H||_F / ||X||_F.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from lib.nmf import NMFParams, factorize
from lib.settings import SegmentsSettings

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
    )


def segment_matrix(interactions: DataFrame, settings: SegmentsSettings) -> tuple[DataFrame, DataFrame, DataFrame]:
    """The matrix the segments factorize, as NMF entries (row, col, value), with its scalings
    (user_idx, row_scale) and (item_idx, item_weight): see ``transform_scores``."""
    entries, user_scales, item_weights = transform_scores(
        interactions, settings.transform, settings.idf_items, settings.row_normalize)
    return (entries.select(F.col("user_idx").alias("row"), F.col("item_idx").alias("col"), "value"),
            user_scales, item_weights)


def fit_segments(entries: DataFrame, settings: SegmentsSettings, n_rows: int, n_cols: int,
                 k: int | None = None, max_iter: int | None = None):
    """Factorize ``segment_matrix`` entries with the [segments] settings; the caller releases the result."""
    return factorize(entries, nmf_params(settings, k, max_iter), n_rows=n_rows, n_cols=n_cols)


def transformed_score(score: F.Column, transform: str) -> F.Column:
    """f(score): the identity or log1p."""
    if transform not in TRANSFORMS:
        raise ValueError(f"segments.transform must be one of {TRANSFORMS}, got {transform!r}")
    return F.log1p(score) if transform == "log1p" else score


def transform_scores(
    interactions: DataFrame, transform: str, idf_items: bool, row_normalize: bool,
) -> tuple[DataFrame, DataFrame, DataFrame]:
    """The matrix to factorize and its scalings.

    Returns (entries(user_idx, item_idx, value), user_scales(user_idx, row_scale),
    item_weights(item_idx, item_weight)). ``idf_items`` weights item i by log(1 + users / users_of_i)
    so that items everyone touches shape segments less; ``row_normalize`` scales each user's row to
    sum 1 so heavy users do not dominate the factorization.
    """
    base = interactions.select("user_idx", "item_idx",
                               transformed_score(F.col("score").cast("double"), transform).alias("fscore"))
    if idf_items:
        users = interactions.agg(F.countDistinct("user_idx")).first()[0]
        item_weights = base.where(F.col("fscore") > 0).groupBy("item_idx").agg(
            F.log1p(F.lit(float(users)) / F.count(F.lit(1))).alias("item_weight"))
    else:
        item_weights = base.select("item_idx").distinct().withColumn("item_weight", F.lit(1.0))
    weighted = base.join(item_weights, "item_idx", "left").select(
        "user_idx", "item_idx", (F.col("fscore") * F.coalesce("item_weight", F.lit(0.0))).alias("weighted"))
    if row_normalize:
        user_scales = weighted.groupBy("user_idx").agg(F.sum("weighted").alias("row_total")).select(
            "user_idx", F.when(F.col("row_total") > 0, 1.0 / F.col("row_total")).otherwise(1.0).alias("row_scale"))
    else:
        user_scales = weighted.select("user_idx").distinct().withColumn("row_scale", F.lit(1.0))
    entries = weighted.join(user_scales, "user_idx").select(
        "user_idx", "item_idx", (F.col("weighted") * F.col("row_scale")).alias("value"))
    return entries, user_scales, item_weights


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


def component_mass(item_factors: DataFrame, k: int) -> list[float]:
    """sum_i H[l, i] for each component l (k scalars)."""
    rows = (item_factors.select(F.posexplode("factors").alias("segment_id", "weight"))
            .groupBy("segment_id").agg(F.sum("weight").alias("mass")).collect())
    mass = [0.0] * k
    for row in rows:
        mass[row["segment_id"]] = float(row["mass"])
    return mass


def assign_segments(user_factors: DataFrame, mass: list[float], run_id: str) -> DataFrame:
    """Each user's dominant segment and its share of the user's weight.

    The weight of user u in segment l is W[u, l] * sum_i H[l, i] (the part of the user's row the
    segment reconstructs), so the scale ambiguity of W H does not tilt the choice. Users whose row
    of W is all zero (nothing to explain) get no segment.
    """
    mass_col = F.array(*[F.lit(float(value)) for value in mass])
    weighted = F.zip_with("factors", mass_col, lambda w, h: w * h)
    scored = user_factors.select("user_id", weighted.alias("weights"))
    scored = scored.select(
        "user_id", "weights", F.aggregate("weights", F.lit(0.0), lambda acc, x: acc + x).alias("total"),
        F.array_max("weights").alias("best"))
    return scored.where(F.col("total") > 0).select(
        "user_id",
        (F.array_position("weights", F.col("best")) - 1).cast("int").alias("segment_id"),
        (F.col("best") / F.col("total")).alias("affinity"),
        F.lit(run_id).alias("run_id"),
    )


def segment_profiles(
    user_segments: DataFrame, item_factors: DataFrame, k: int, top_n: int, run_id: str,
) -> DataFrame:
    """One row per segment: size, share of assigned users, top items by normalized H weight, a label."""
    sizes = user_segments.groupBy("segment_id").agg(F.count(F.lit(1)).alias("size"))
    total = F.sum("size").over(Window.partitionBy())
    items = item_factors.select("item_id", F.posexplode("factors").alias("segment_id", "weight"))
    normalized = items.withColumn(
        "weight", F.col("weight") / F.sum("weight").over(Window.partitionBy("segment_id")))
    ranked = normalized.where(F.col("weight") > 0).withColumn(
        "rank", F.row_number().over(Window.partitionBy("segment_id").orderBy(F.desc("weight"), "item_id")))
    top = (ranked.where(F.col("rank") <= top_n)
           .groupBy("segment_id")
           .agg(F.sort_array(F.collect_list(F.struct("rank", "item_id", "weight"))).alias("ranked")))
    top = top.select(
        "segment_id",
        F.transform("ranked", lambda r: F.struct(r["item_id"].alias("item_id"), r["weight"].alias("weight"))).alias("top_items"),
        F.concat_ws(" / ", F.slice(F.transform("ranked", lambda r: r["item_id"]), 1, 3)).alias("label"),
    )
    all_segments = item_factors.sparkSession.range(k).select(F.col("id").cast("int").alias("segment_id"))
    return (
        all_segments.join(sizes, "segment_id", "left").join(top, "segment_id", "left")
        .select("segment_id", F.coalesce("size", F.lit(0)).cast("long").alias("size"), "top_items", "label")
        .withColumn("share", F.when(total > 0, F.col("size") / total).otherwise(F.lit(0.0)))
        .select("segment_id", "size", "share", "top_items",
                F.coalesce("label", F.lit("(empty)")).alias("label"), F.lit(run_id).alias("run_id"))
    )


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

    X[u, i] = row_scale[u] * item_weight[i] * f(score), f named by ``score_transform``; the
    cross term is a join over the non-zeros, the W'W and H H' Grams are k x k sums.
    """
    transforms = [row[0] for row in item_factors.select("score_transform").distinct().collect()]
    if len(transforms) != 1:
        raise ValueError(f"nmf_item_factors must name exactly one score_transform, found {transforms}")
    k = len(user_factors.select("factors").first()[0])
    entries = (
        interactions.join(user_factors.select("user_idx", F.col("factors").alias("w"), "row_scale"), "user_idx")
        .join(item_factors.select("item_idx", F.col("factors").alias("h"), "item_weight"), "item_idx")
        .select((F.col("row_scale") * F.col("item_weight")
                 * transformed_score(F.col("score").cast("double"), transforms[0])).alias("x"), "w", "h")
    )
    dot = F.aggregate(F.zip_with("w", "h", lambda a, b: a * b), F.lit(0.0), lambda acc, v: acc + v)
    sums = entries.agg(F.sum(F.col("x") * F.col("x")).alias("norm_sq"), F.sum(F.col("x") * dot).alias("cross")).first()
    gram_w, gram_h = _gram(user_factors, k), _gram(item_factors, k)
    residual = sums["norm_sq"] - 2.0 * sums["cross"] + float(np.sum(gram_w * gram_h))
    return math.sqrt(max(residual, 0.0) / sums["norm_sq"])
