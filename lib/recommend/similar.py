"""Similar items ("customers who bought this also bought"): item-to-item similarity from co-occurrence
in customers' histories, as SAR computes it (Jaccard or lift of the co-occurrence counts), with joins
and one window; or from a factor model's item factors (cosine, by the blockwise top-N engine). Never
an item x item matrix on the driver.

The history is the interaction matrix (user_idx, item_idx, score): every item a customer engaged with
counts once. Each customer contributes their ``max_items`` highest-scored items, which bounds the pairs
one long history adds (max_items^2) and so the cost of the self-join.
"""
from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from lib.recommend.topn import TopNBlocks, block_top_n

# recommend.similarity's co-occurrence measures; its other choice, als_cosine, comes from factors.
CO_OCCURRENCE_SIMILARITIES = ("jaccard", "lift")


def capped_history(history: DataFrame, max_items: int) -> DataFrame:
    """(user_idx, item_idx) of each customer's ``max_items`` highest-scored items (ties: smaller item_idx);
    pairs with a score of 0 are not history."""
    order = Window.partitionBy("user_idx").orderBy(F.col("score").desc(), "item_idx")
    return (history.where(F.col("score") > 0).select("user_idx", "item_idx", "score")
            .withColumn("_rank", F.row_number().over(order)).where(F.col("_rank") <= max_items)
            .select("user_idx", "item_idx"))


def co_occurrences(baskets: DataFrame) -> DataFrame:
    """(item_idx, similar_item_idx, customers): how many customers of ``baskets`` (user_idx, item_idx) hold
    both items, for every ordered pair of different items held together at least once. Each unordered
    pair is counted once (the self-join keeps a < b, half the rows to shuffle) and then mirrored."""
    first = baskets.select("user_idx", "item_idx")
    second = baskets.select("user_idx", F.col("item_idx").alias("similar_item_idx"))
    pairs = (first.join(second, "user_idx").where(F.col("item_idx") < F.col("similar_item_idx"))
             .groupBy("item_idx", "similar_item_idx").agg(F.count(F.lit(1)).alias("customers")))
    return pairs.unionByName(pairs.select(F.col("similar_item_idx").alias("item_idx"),
                                          F.col("item_idx").alias("similar_item_idx"), "customers"))


def item_similarities(history: DataFrame, top_k: int, similarity: str = "jaccard", min_customers: int = 2,
                      max_items: int = 200) -> DataFrame:
    """(item_idx, similar_item_idx, score, customers, rank): each item's ``top_k`` most similar items.

    With c_ab the customers holding both items, c_a and c_b those holding each and n all customers:
    ``jaccard`` = c_ab / (c_a + c_b - c_ab) (the share of either item's customers who hold both) and
    ``lift`` = c_ab n / (c_a c_b) (how many times more often than by chance). Pairs held together by
    fewer than ``min_customers`` customers are left out (one shared basket is noise, and lift favours
    rare items). Rank by score, then co-occurrence, then the smaller similar_item_idx.
    """
    if similarity not in CO_OCCURRENCE_SIMILARITIES:
        raise ValueError(f"similarity must be one of {', '.join(CO_OCCURRENCE_SIMILARITIES)}, got {similarity!r}")
    if top_k < 1 or min_customers < 1 or max_items < 2:
        raise ValueError(f"need top_k >= 1, min_customers >= 1 and max_items >= 2, got {top_k}, {min_customers}, "
                         f"{max_items}")
    baskets = capped_history(history, max_items)
    holders = baskets.groupBy("item_idx").agg(F.count(F.lit(1)).alias("_a"))
    pairs = (co_occurrences(baskets).where(F.col("customers") >= min_customers)
             .join(holders, "item_idx")
             .join(holders.withColumnRenamed("item_idx", "similar_item_idx").withColumnRenamed("_a", "_b"),
                   "similar_item_idx"))
    if similarity == "jaccard":
        score = F.col("customers") / (F.col("_a") + F.col("_b") - F.col("customers"))
    else:
        customers = baskets.agg(F.countDistinct("user_idx").alias("_n"))
        pairs = pairs.crossJoin(F.broadcast(customers))
        score = F.col("customers") * F.col("_n") / (F.col("_a") * F.col("_b"))
    order = Window.partitionBy("item_idx").orderBy(F.col("score").desc(), F.col("customers").desc(),
                                                   "similar_item_idx")
    return (pairs.withColumn("score", score.cast("double"))
            .withColumn("rank", F.row_number().over(order)).where(F.col("rank") <= top_k)
            .select("item_idx", "similar_item_idx", "score", "customers", "rank"))


def unit_factors(factors: DataFrame) -> DataFrame:
    """(item_idx, factors) scaled to length 1; items whose factors are all zero are left out (no direction)."""
    norm = F.sqrt(F.aggregate(F.transform("factors", lambda x: x * x), F.lit(0.0), lambda acc, x: acc + x))
    return (factors.select("item_idx", "factors", norm.alias("_norm")).where(F.col("_norm") > 0)
            .select("item_idx", F.transform("factors", lambda x: x / F.col("_norm")).alias("factors")))


def factor_similarities(item_factors: DataFrame, top_k: int, blocks: TopNBlocks | None = None) -> DataFrame:
    """(item_idx, similar_item_idx, score, customers, rank): each item's ``top_k`` nearest items by the
    cosine of their factors (``item_factors``: item_idx, factors, e.g. an ALS model's item factors).

    Items in the same customers' histories get similar ALS factors, so the cosine ranks co-bought items
    while smoothing over pairs few customers share. The item side is scored like a user side by the
    blockwise top-N, each item excluded from its own list; ``customers`` is null (not counted).
    Ties go to the smaller similar_item_idx.
    """
    if top_k < 1:
        raise ValueError(f"need top_k >= 1, got {top_k}")
    unit = unit_factors(item_factors.select(F.col("item_idx").cast("int"), "factors"))
    anchors = unit.withColumnRenamed("item_idx", "user_idx")
    itself = unit.select(F.col("item_idx").alias("user_idx"), "item_idx")
    top = block_top_n(anchors, unit, anchors.select("user_idx"), top_k, exclude=itself, blocks=blocks)
    return top.select(F.col("user_idx").alias("item_idx"), F.col("item_idx").alias("similar_item_idx"), "score",
                      F.lit(None).cast("long").alias("customers"), "rank")


def similar_item_ids(similar: DataFrame, item_index: DataFrame) -> DataFrame:
    """``item_similarities`` rows with item ids: (item_id, rank, similar_item_id, score, customers)."""
    ids = item_index.select("item_idx", "item_id")
    return (similar.join(ids, "item_idx")
            .join(ids.withColumnRenamed("item_idx", "similar_item_idx").withColumnRenamed("item_id", "similar_item_id"),
                  "similar_item_idx")
            .select("item_id", "rank", "similar_item_id", "score", F.col("customers").cast("long")))
