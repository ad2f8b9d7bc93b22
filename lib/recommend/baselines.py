"""The trivial lists every model must beat: global popularity, the segment's popular items, the
most bought items overall (nothing excluded).
"""
from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from lib.recommend.buy_again import top_n
from lib.recommend.topn import exclusion_tiers, rank_and_exclude


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
    put in tiers by exclusion-list length (as in ``lib.recommend.als.als_top_n``) and joined only with the
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


def user_segment_of(segments: DataFrame) -> DataFrame:
    """(user_id, segment_id): each user's segment in the latest run of ``segments`` (the highest affinity
    should a run hold several rows of a user)."""
    latest = segments.agg(F.max("run_id")).first()[0]
    current = segments.where(F.col("run_id") == F.lit(latest)) if latest is not None else segments
    best = Window.partitionBy("user_id").orderBy(F.col("affinity").desc(), F.col("segment_id"))
    return current.withColumn("_pos", F.row_number().over(best)).where(F.col("_pos") == 1).select("user_id", "segment_id")


def purchase_popularity(occasions: DataFrame) -> DataFrame:
    """(item_id, score): distinct buyers per item."""
    return occasions.groupBy("item_id").agg(F.countDistinct("user_id").cast("double").alias("score"))


def popular_for(users: DataFrame, popularity: DataFrame, n: int, exclude_pairs: DataFrame | None = None,
                exclude_items: DataFrame | None = None) -> DataFrame:
    """(user_id, item_id, score, rank): the most popular items of ``popularity`` (item_id, score) for
    ``users`` (user_id), minus their ``exclude_pairs``; a user needs at most n + (their exclusions)."""
    if exclude_items is not None:
        popularity = popularity.join(F.broadcast(exclude_items.select("item_id")), "item_id", "left_anti")
    longest = 0
    if exclude_pairs is not None:
        longest = int(exclude_pairs.groupBy("user_id").count().agg(F.max("count")).first()[0] or 0)
    shortlist = popularity.orderBy(F.col("score").desc(), "item_id").limit(n + longest)
    candidates = users.select("user_id").distinct().crossJoin(F.broadcast(shortlist))
    return top_n(candidates, n, [F.col("score").desc()], exclude_pairs=exclude_pairs)


def segment_popular_for(users: DataFrame, members: DataFrame, occasions: DataFrame, n: int,
                        exclude_items: DataFrame | None = None) -> DataFrame:
    """(user_id, item_id, score, rank): the items bought by most of the user's segment in ``occasions``
    (distinct buyers); users of ``users`` with no segment in ``members`` (user_id, segment_id), or whose
    segment bought nothing, get the most bought items overall, as cold-start lists do."""
    if exclude_items is not None:
        occasions = occasions.join(F.broadcast(exclude_items.select("item_id")), "item_id", "left_anti")
    in_segment = (occasions.join(members, "user_id").groupBy("segment_id", "item_id")
                  .agg(F.countDistinct("user_id").cast("double").alias("score")))
    ranked = in_segment.withColumn("rank", F.row_number().over(
        Window.partitionBy("segment_id").orderBy(F.col("score").desc(), "item_id"))).where(F.col("rank") <= n)
    targets = users.select("user_id").distinct()
    # A segment whose members bought nothing has no list: its users count as unassigned.
    listed = members.join(ranked.select("segment_id").distinct(), "segment_id").select("user_id", "segment_id")
    assigned = targets.join(listed, "user_id").join(ranked, "segment_id").select("user_id", "item_id", "score", "rank")
    unassigned = targets.join(listed, "user_id", "left_anti")
    return assigned.unionByName(popular_for(unassigned, purchase_popularity(occasions), n))
