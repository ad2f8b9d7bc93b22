"""Top-K ranking metrics with binary relevance, computed as DataFrame joins and aggregations.

Inputs are long tables, never per-user lists on the driver:
- ``recommended``: (user, item, rank) with rank 1, 2, ... per user (rank 1 is the best);
- ``relevant``: (user, item), the items each evaluated user actually engaged with.

The evaluated users are the distinct users of ``relevant``; a user with no recommendations scores 0.
Definitions match ``pyspark.ml.evaluation.RankingEvaluator`` (``RankingMetrics``) when each
user's ranking has no duplicate items, with ``hits@K`` the relevant items among the top K and
``R`` the user's number of relevant items:

- precision@K = hits@K / K (K even when fewer than K items were recommended);
- recall@K = hits@K / R;
- MAP@K: mean over users of (sum over hit positions i <= K of hits@i / i) / min(R, K);
- NDCG@K = DCG / IDCG with DCG = sum over hit positions i <= K of 1 / log2(i + 1) and
  IDCG = sum over i = 1..min(R, K) of 1 / log2(i + 1) (the log base cancels);
- coverage@K (not in RankingEvaluator) = distinct items in anyone's top K / catalog size.
"""
from __future__ import annotations

import math

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

RANKING_METRICS = ("precision", "recall", "map", "ndcg")


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"ranking metrics need K >= 1, got {k}")


def _check_columns(df: DataFrame, columns: tuple[str, ...], name: str) -> None:
    missing = [column for column in columns if column not in df.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {', '.join(missing)}; has {', '.join(df.columns)}")


def ideal_dcg_prefix(k: int) -> list[float]:
    """IDCG for 1..K relevant items: the running sums of 1 / log2(i + 1)."""
    _check_k(k)
    sums, total = [], 0.0
    for position in range(1, k + 1):
        total += 1.0 / math.log2(position + 1)
        sums.append(total)
    return sums


def per_user_ranking_metrics(
    recommended: DataFrame,
    relevant: DataFrame,
    k: int,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rank_col: str = "rank",
) -> DataFrame:
    """One row per evaluated user: (user, n_relevant, hits, precision, recall, map, ndcg) at K."""
    _check_k(k)
    _check_columns(recommended, (user_col, item_col, rank_col), "recommended")
    _check_columns(relevant, (user_col, item_col), "relevant")
    truth = relevant.select(user_col, item_col).distinct()
    n_relevant = truth.groupBy(user_col).agg(F.count(F.lit(1)).alias("n_relevant"))

    top_k = recommended.where(F.col(rank_col) <= k).select(user_col, item_col, rank_col)
    # hits@i at each hit position i: a running count of hits in rank order per user.
    hits = top_k.join(truth, [user_col, item_col]).withColumn(
        "hits_so_far",
        F.row_number().over(Window.partitionBy(user_col).orderBy(rank_col)),
    )
    per_user_hits = hits.groupBy(user_col).agg(
        F.count(F.lit(1)).alias("hits"),
        F.sum(F.col("hits_so_far") / F.col(rank_col)).alias("precision_sum"),
        F.sum(1.0 / F.log2(F.col(rank_col) + 1.0)).alias("dcg"),
    )
    idcg = F.element_at(
        F.array(*[F.lit(value) for value in ideal_dcg_prefix(k)]),
        F.least(F.col("n_relevant"), F.lit(k)).cast("int"),
    )
    joined = n_relevant.join(per_user_hits, user_col, "left").fillna(0.0, ["precision_sum", "dcg"]).fillna(0, ["hits"])
    return joined.select(
        user_col,
        "n_relevant",
        "hits",
        (F.col("hits") / F.lit(float(k))).alias("precision"),
        (F.col("hits") / F.col("n_relevant")).alias("recall"),
        (F.col("precision_sum") / F.least(F.col("n_relevant"), F.lit(k))).alias("map"),
        (F.col("dcg") / idcg).alias("ndcg"),
    )


def ranking_metrics(
    recommended: DataFrame,
    relevant: DataFrame,
    k: int,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rank_col: str = "rank",
) -> dict[str, float]:
    """Means over evaluated users of precision, recall, MAP and NDCG at K, plus ``users`` evaluated."""
    per_user = per_user_ranking_metrics(recommended, relevant, k, user_col, item_col, rank_col)
    row = per_user.agg(
        F.count(F.lit(1)).alias("users"), *[F.avg(name).alias(name) for name in RANKING_METRICS]
    ).first()
    if not row["users"]:
        raise ValueError("no evaluated users: the relevant table is empty")
    return {"users": float(row["users"]), **{name: float(row[name]) for name in RANKING_METRICS}}


def catalog_coverage(
    recommended: DataFrame,
    catalog_size: int,
    k: int,
    item_col: str = "item_id",
    rank_col: str = "rank",
) -> float:
    """Share of the catalog that appears in at least one user's top K."""
    _check_k(k)
    if catalog_size < 1:
        raise ValueError(f"catalog size must be >= 1, got {catalog_size}")
    distinct = recommended.where(F.col(rank_col) <= k).select(item_col).distinct().count()
    return distinct / catalog_size


def evaluate(
    recommended: DataFrame,
    relevant: DataFrame,
    k: int,
    catalog_size: int,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rank_col: str = "rank",
) -> dict[str, float]:
    """All metrics at K: precision, recall, map, ndcg, coverage and the number of users evaluated."""
    metrics = ranking_metrics(recommended, relevant, k, user_col, item_col, rank_col)
    metrics["coverage"] = catalog_coverage(recommended, catalog_size, k, item_col, rank_col)
    return metrics


def ranking_evaluator_input(
    recommended: DataFrame,
    relevant: DataFrame,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rank_col: str = "rank",
) -> DataFrame:
    """(user, prediction, label) rows as ``RankingEvaluator`` reads them: arrays of doubles.

    Item ids must be numeric (e.g. item_idx). Users without recommendations get an empty prediction.
    """
    predictions = recommended.groupBy(user_col).agg(
        F.transform(
            F.array_sort(F.collect_list(F.struct(F.col(rank_col).alias("r"), F.col(item_col).alias("i")))),
            lambda entry: entry["i"].cast("double"),
        ).alias("prediction")
    )
    labels = relevant.groupBy(user_col).agg(
        F.collect_set(F.col(item_col).cast("double")).alias("label")
    )
    return labels.join(predictions, user_col, "left").select(
        user_col,
        F.coalesce(F.col("prediction"), F.array().cast("array<double>")).alias("prediction"),
        "label",
    )
