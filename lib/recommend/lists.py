"""The lists a run ships: ALS discover lists with cold-start fallbacks, buy-again and blended lists,
each customer group's list replaced by the baseline that won its validation.
"""
from __future__ import annotations

from datetime import datetime
from typing import Callable

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from lib.platform.settings import RECOMMEND_STRATEGIES
from lib.recommend.baselines import popular_top_n, segment_popular_for, segment_popular_top_n, user_segment_of
from lib.recommend.buy_again import (BlendCalibration, BuyAgainParams, BuyAgainRanker, blend, customer_groups,
                                     global_repeat_share, most_bought_top_n, most_recent_top_n, ranker_top_n,
                                     repeat_propensity, ship_what_wins)
from lib.recommend.pairs import to_ids


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


def strategy_lists(
    discover: DataFrame,
    occasions: DataFrame,
    as_of: datetime,
    params: BuyAgainParams,
    n: int,
    strategies: tuple[str, ...] | list[str],
    exclude_items: DataFrame | None = None,
    calibration: BlendCalibration | None = None,
    ranker: BuyAgainRanker | None = None,
    shipped: dict[str, dict[str, str]] | None = None,
    segments: DataFrame | None = None,
) -> DataFrame:
    """(user_id, rank, item_id, score, source, strategy): the lists of each requested strategy.

    ``discover`` (user_id, rank, item_id, score, source): ``final_recommendations``' lists.
    ``buy_again``: every user with a purchase occasion (``lib.recommend.buy_again.purchase_occasions``) before
    ``as_of`` gets their repeat-purchase list, ranked by ``ranker`` (default: the heuristic score; source
    ``buy_again``). ``blended``: both interleaved by the user's repeat propensity (calibrated by
    ``calibration`` when given, see ``lib.recommend.buy_again.blend``); each row keeps the source it came from.
    ``shipped`` (strategy -> customer group -> list, from validation): a group whose validation a baseline
    won gets that baseline's list instead, its rows' source naming it (e.g. ``most_bought``);
    ``segment_popular`` needs ``segments`` (user_id, segment_id).
    ``exclude_items`` (item_id) never appear in any list.
    """
    unknown = sorted(set(strategies) - set(RECOMMEND_STRATEGIES))
    if unknown or not strategies:
        raise ValueError(f"strategies must name some of {', '.join(RECOMMEND_STRATEGIES)}, got {list(strategies)}")
    if exclude_items is not None:  # discover lists were built without these items; this is the safety net
        discover = discover.join(F.broadcast(exclude_items.select("item_id")), "item_id", "left_anti").withColumn(
            "rank", F.row_number().over(Window.partitionBy("user_id").orderBy("rank")))
    shipped = shipped or {}
    parts = []
    if "discover" in strategies:
        parts.append(discover.withColumn("strategy", F.lit("discover")))
    if "buy_again" in strategies or "blended" in strategies:
        ranker = ranker or BuyAgainRanker("heuristic", None, "heuristic")
        again = ranker_top_n(ranker, occasions, as_of, params, n, exclude_items).withColumn(
            "source", F.lit("buy_again")).localCheckpoint(eager=True)
        lists = {"buy_again": again}
        groups = None
        baselines = {name for strategy, chosen in shipped.items() for name in chosen.values() if name != strategy}
        if baselines:
            groups = customer_groups(occasions, as_of, discover.select("user_id")).cache()
            lists["most_bought"] = most_bought_top_n(occasions, as_of, n, exclude_items)
            lists["most_recent"] = most_recent_top_n(occasions, as_of, n, exclude_items)
        if "segment_popular" in baselines:
            if segments is None:
                raise ValueError("validation shipped segment_popular, but no segments were given for the lists")
            past = occasions.where(F.col("ts") <= F.lit(as_of).cast("timestamp"))
            lists["segment_popular"] = segment_popular_for(groups.select("user_id"), segments, past, n, exclude_items)

        def shipped_list(strategy: str) -> DataFrame:
            chosen = shipped.get(strategy, {})
            if groups is None or all(name == strategy for name in chosen.values()):
                return lists[strategy]
            return ship_what_wins(lists, groups, chosen, strategy)

        if "blended" in strategies:
            propensity = repeat_propensity(occasions.where(F.col("ts") <= F.lit(as_of).cast("timestamp")),
                                           params.prior_strength).cache()
            share = global_repeat_share(propensity)
            lists["blended"] = blend(again, discover, propensity, n, share, calibration)
        for strategy in ("buy_again", "blended"):
            if strategy in strategies:
                parts.append(shipped_list(strategy).withColumn("strategy", F.lit(strategy)))
    union = parts[0]
    for part in parts[1:]:
        union = union.unionByName(part)
    return union.select("user_id", "rank", "item_id", "score", "source", "strategy")


def shipped_notes(shipped: dict[str, dict[str, str]]) -> list[str]:
    """One line per strategy whose list a baseline replaces for some customer groups (validation's choice)."""
    notes = []
    for strategy, chosen in shipped.items():
        baselines = {group: name for group, name in chosen.items() if name != strategy}
        if baselines:
            notes.append(f"{strategy}: a baseline won validation, so it ships as the list of " + ", ".join(
                f"{group} customers ({name})" for group, name in sorted(baselines.items())))
    return notes


def list_counts(recommendations: DataFrame, strategies: tuple[str, ...] | list[str]) -> tuple[dict[str, int], int]:
    """(counts, rows) of the written lists in one aggregation: ``users_<source>`` of the discover lists (als,
    segment_popular, popular; 0 when absent), ``users_<strategy>_<source>`` of the other strategies (which
    list each buy-again / blended customer got), ``rows_<strategy>``, and all rows."""
    counts = {f"users_{source}": 0 for source in ("als", "segment_popular", "popular")}
    counts.update({f"rows_{strategy}": 0 for strategy in strategies})
    rows = 0
    for row in recommendations.groupBy("strategy", "source").agg(
            F.count(F.lit(1)).alias("rows"), F.countDistinct("user_id").alias("users")).collect():
        if row["strategy"] == "discover":
            counts[f"users_{row['source']}"] = int(row["users"])
        else:
            counts[f"users_{row['strategy']}_{row['source']}"] = int(row["users"])
        counts[f"rows_{row['strategy']}"] += int(row["rows"])
        rows += int(row["rows"])
    return counts, rows

