"""What a segment is: its sizes, top and distinctive items (lift), a label a marketer can read, and the
quality summary written to segment_quality.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from lib.segments.assign import size_balance


def segment_profiles(
    user_segments: DataFrame, item_factors: DataFrame, k: int, top_n: int, run_id: str,
    products: DataFrame | None = None, excluded: DataFrame | None = None,
    distinctive: DataFrame | None = None, min_distinct_lift: float = 1.0,
) -> DataFrame:
    """One row per segment: size, share of assigned users, top items by normalized H weight, its
    distinctive items, whether it is distinct, a label.

    ``distinctive`` (segment_id, distinctive_items: ``distinctive_items``): a segment is ``distinct``
    when its distinctive items' mean lift is at least ``min_distinct_lift``; its label then names them.
    A segment that is not (nothing its customers buy sets them apart) is labelled "General: " and its
    top items: a marketer should not mail it as a taste. Without ``distinctive`` every segment is
    distinct and named by its top items. Labels are three item ids, or with ``products`` (the catalog:
    item_id, name, category) the listed items' dominant category and three names (an item the
    catalog does not name keeps its id). ``excluded`` items (item_id) are never among the top items.
    """
    sizes = user_segments.groupBy("segment_id").agg(F.count(F.lit(1)).alias("size"))
    total = F.sum("size").over(Window.partitionBy())
    items = item_factors.select("item_id", F.posexplode("factors").alias("segment_id", "weight"))
    if excluded is not None:
        items = items.join(excluded.select("item_id").distinct(), "item_id", "left_anti")
    normalized = items.withColumn(
        "weight", F.col("weight") / F.sum("weight").over(Window.partitionBy("segment_id")))
    ranked = normalized.where(F.col("weight") > 0).withColumn(
        "rank", F.row_number().over(Window.partitionBy("segment_id").orderBy(F.desc("weight"), "item_id")))
    ranked = ranked.where(F.col("rank") <= top_n)
    top = ranked.groupBy("segment_id").agg(
        F.transform(F.sort_array(F.collect_list(F.struct("rank", "item_id", "weight"))),
                    lambda r: F.struct(r["item_id"].alias("item_id"), r["weight"].alias("weight"))).alias("top_items"))
    top = top.join(_labels(ranked.select("segment_id", "rank", "item_id", F.col("weight").alias("value")), products)
                   .withColumnRenamed("label", "top_label"), "segment_id", "left")
    all_segments = item_factors.sparkSession.range(k).select(F.col("id").cast("int").alias("segment_id"))
    profiles = all_segments.join(sizes, "segment_id", "left").join(top, "segment_id", "left")
    if distinctive is None:
        profiles = profiles.withColumn("distinctive_items", F.lit(None).cast(DISTINCTIVE_ITEMS_TYPE)) \
            .withColumn("distinct", F.lit(True)).withColumn("label", F.col("top_label"))
    else:
        listed = distinctive.select("segment_id", F.posexplode("distinctive_items").alias("rank", "item")).select(
            "segment_id", "rank", F.col("item.item_id").alias("item_id"), F.col("item.lift").alias("value"))
        mean_lift = F.when(F.size("distinctive_items") > 0, F.aggregate(
            "distinctive_items", F.lit(0.0), lambda acc, item: acc + item["lift"]) / F.size("distinctive_items"))
        profiles = (profiles.join(distinctive, "segment_id", "left")
                    .join(_labels(listed, products).withColumnRenamed("label", "distinct_label"), "segment_id", "left")
                    .withColumn("distinct", F.coalesce(F.size("distinctive_items") > 0, F.lit(False))
                                & F.coalesce(mean_lift >= F.lit(float(min_distinct_lift)), F.lit(False)))
                    .withColumn("label", F.when(F.col("distinct"), F.col("distinct_label"))
                                .otherwise(F.concat(F.lit("General: "), F.coalesce("top_label", F.lit("(no items)"))))))
    return (
        profiles.select("segment_id", F.coalesce("size", F.lit(0)).cast("long").alias("size"), "top_items",
                        "distinctive_items", "distinct", "label")
        .withColumn("share", F.when(total > 0, F.col("size") / total).otherwise(F.lit(0.0)))
        .select("segment_id", "size", "share", "top_items", "distinctive_items",
                F.when(F.col("size") > 0, F.col("distinct")).otherwise(F.lit(False)).alias("distinct"),
                F.when(F.col("size") > 0, F.coalesce("label", F.lit("(empty)")))
                .otherwise(F.lit("(empty: merged or unused)")).alias("label"),
                F.lit(run_id).alias("run_id"))
    )


DISTINCTIVE_ITEMS_TYPE = "array<struct<item_id: string, lift: double, support: double>>"


def _labels(listed: DataFrame, products: DataFrame | None) -> DataFrame:
    """(segment_id, label) from each segment's listed items (segment_id, rank, item_id, value): the three
    first item ids, or with ``products`` the category with the largest summed value among the listed
    items and the three first distinct names."""
    if products is None:
        listed = listed.withColumn("name", F.col("item_id"))
    else:
        names = products.select("item_id", F.trim("name").alias("name"), F.trim("category").alias("category"))
        listed = listed.join(names, "item_id", "left").withColumn(
            "name", F.when(F.length("name") > 0, F.col("name")).otherwise(F.col("item_id")))
    # Catalogs name products by type (several pack sizes of one yoghurt): each name once.
    first = listed.groupBy("segment_id").agg(F.concat_ws(" / ", F.slice(F.array_distinct(F.transform(
        F.sort_array(F.collect_list(F.struct("rank", "name"))), lambda r: r["name"])), 1, 3)).alias("label"))
    if products is None:
        return first
    categories = (listed.where(F.length("category") > 0).groupBy("segment_id", "category")
                  .agg(F.sum("value").alias("category_value"))
                  .withColumn("pick", F.row_number().over(
                      Window.partitionBy("segment_id").orderBy(F.desc("category_value"), "category")))
                  .where(F.col("pick") == 1).select("segment_id", "category"))
    return first.join(categories, "segment_id", "left").select(
        "segment_id", F.when(F.col("category").isNotNull(), F.concat_ws(": ", "category", "label"))
        .otherwise(F.col("label")).alias("label"))


def segment_item_lifts(interactions: DataFrame, user_index: DataFrame, item_index: DataFrame,
                       user_segments: DataFrame) -> DataFrame:
    """(segment_id, item_id, support, lift) for every item some customer of a segment has: ``support``
    is the share of the segment's customers who have the item, ``lift`` that share over the share of
    all assigned customers who have it (1 = no more than anyone)."""
    members = user_segments.join(user_index, "user_id").select("user_idx", "segment_id")
    had = interactions.where(F.col("score") > 0).select("user_idx", "item_idx").distinct().join(members, "user_idx")
    within = had.groupBy("segment_id", "item_idx").agg(F.count(F.lit(1)).alias("segment_item_users"))
    everyone = had.groupBy("item_idx").agg(F.count(F.lit(1)).alias("item_users"))
    sizes = members.groupBy("segment_id").agg(F.count(F.lit(1)).alias("segment_users"))
    assigned = members.agg(F.count(F.lit(1)).alias("assigned"))
    support = F.col("segment_item_users") / F.col("segment_users")
    return (within.join(everyone, "item_idx").join(sizes, "segment_id").crossJoin(assigned)
            .join(item_index, "item_idx")
            .select("segment_id", "item_id", support.alias("support"),
                    (support / (F.col("item_users") / F.col("assigned"))).alias("lift")))


def distinctive_items(lifts: DataFrame, top_n: int, min_support: float,
                      excluded: DataFrame | None = None) -> DataFrame:
    """(segment_id, distinctive_items): per segment, its ``top_n`` items with the highest lift among
    those at least ``min_support`` of its customers have (a rare item's lift is noise), as
    array<struct<item_id, lift, support>> by lift, then support, then item_id. ``excluded`` items
    (item_id) are never listed."""
    candidates = lifts.where(F.col("support") >= F.lit(float(min_support)))
    if excluded is not None:
        candidates = candidates.join(excluded.select("item_id").distinct(), "item_id", "left_anti")
    ranked = candidates.withColumn("rank", F.row_number().over(
        Window.partitionBy("segment_id").orderBy(F.desc("lift"), F.desc("support"), "item_id"))) \
        .where(F.col("rank") <= top_n)
    return ranked.groupBy("segment_id").agg(F.transform(
        F.sort_array(F.collect_list(F.struct("rank", "item_id", "lift", "support"))),
        lambda r: F.struct(r["item_id"].alias("item_id"), r["lift"].alias("lift"), r["support"].alias("support")))
        .alias("distinctive_items"))


def top_item_lifts(lifts: DataFrame, profiles: DataFrame) -> DataFrame:
    """(segment_id, item_id, lift) for each segment's top items (``segment_profiles``), from
    ``segment_item_lifts``; a top item none of the segment's customers has lifts 0."""
    top = (profiles.select("segment_id", F.explode("top_items").alias("top"))
           .select("segment_id", F.col("top.item_id").alias("item_id")))
    return top.join(lifts, ["segment_id", "item_id"], "left").select(
        "segment_id", "item_id", F.coalesce("lift", F.lit(0.0)).alias("lift"))


def report_profiles(profile_rows: list, top_lifts: dict[tuple[int, str], float]) -> list[dict]:
    """The written ``segment_profiles`` rows (k of them) as the report and ``summarize_quality`` read them:
    segment_id, size, share, label, distinct, top_items [(item, weight)], lifts (of the top items, from
    ``top_lifts`` {(segment_id, item_id): lift}, 0 where absent), distinctive [(item, lift, support)]."""
    return [
        {"segment_id": row["segment_id"], "size": row["size"], "share": row["share"], "label": row["label"],
         "distinct": row["distinct"],
         "top_items": [(item["item_id"], item["weight"]) for item in (row["top_items"] or [])],
         "lifts": [top_lifts.get((row["segment_id"], item["item_id"]), 0.0) for item in (row["top_items"] or [])],
         "distinctive": [(item["item_id"], item["lift"], item["support"]) for item in (row["distinctive_items"] or [])]}
        for row in sorted(profile_rows, key=lambda r: r["segment_id"])
    ]


@dataclass(frozen=True)
class SegmentQuality:
    """How usable one run's segments are (one row of ``segment_quality``). Per-segment figures are NaN
    for a segment without customers (merged by ``segments.min_segment_size``); min / median skip them."""

    k: int
    users: int                 # users in the matrix
    assigned_share: float      # share of them with a segment
    largest_share: float       # share of assigned users in the largest segment (1/k at best)
    size_entropy: float        # entropy of the sizes / log(k - merged) (1 = equal sizes, 0 = one segment)
    stability_ari: float       # ARI between this fit and one with segments.seed + 1 (nan: not measured)
    top_lifts: tuple[float, ...]  # per segment: mean lift of its top items over the global rate
    excluded_items: int
    capped_items: int          # items down-weighted by segments.popular_share_cap
    distinct_lifts: tuple[float, ...] = ()  # per segment: mean lift of its distinctive items
    distinct_share: float = float("nan")    # share of assigned users in distinct (not "General") segments
    empty_segments: int = 0                 # segments without customers (merged, or nobody's best)

    @property
    def min_top_lift(self) -> float:
        return _nan_stat(np.nanmin, self.top_lifts)

    @property
    def median_top_lift(self) -> float:
        return _nan_stat(np.nanmedian, self.top_lifts)

    @property
    def min_distinct_lift(self) -> float:
        return _nan_stat(np.nanmin, self.distinct_lifts)

    def row(self, run_id: str) -> tuple:
        return (run_id, int(self.k), int(self.users), float(self.assigned_share), float(self.largest_share),
                float(self.size_entropy), float(self.stability_ari), float(self.min_top_lift),
                float(self.median_top_lift), [float(v) for v in self.top_lifts], int(self.excluded_items),
                int(self.capped_items), [float(v) for v in self.distinct_lifts], float(self.min_distinct_lift),
                float(self.distinct_share), int(self.empty_segments))


def _nan_stat(stat: Callable, values: tuple[float, ...]) -> float:
    finite = [v for v in values if v == v]
    return float(stat(finite)) if finite else float("nan")


def summarize_quality(profiles: list[dict], k: int, matrix_users: int, stability_ari: float,
                      excluded_items: int, capped_items: int) -> SegmentQuality:
    """The ``segment_quality`` row of a run from its k profiles (dicts with size, distinct, lifts: the
    top items' lifts, distinctive: (item_id, lift, support) tuples). Sizes and lifts count only
    segments with customers; the size entropy is over the k segments minus the empty ones."""
    assigned = sum(p["size"] for p in profiles)
    empty = sum(1 for p in profiles if p["size"] == 0)
    largest, entropy = size_balance([p["size"] for p in profiles], k - empty)

    def mean_where_used(profile: dict, values: list[float]) -> float:
        return float(np.mean(values)) if profile["size"] > 0 and values else float("nan")

    return SegmentQuality(
        k=k, users=matrix_users, assigned_share=assigned / matrix_users if matrix_users else 0.0,
        largest_share=largest, size_entropy=entropy, stability_ari=stability_ari,
        top_lifts=tuple(mean_where_used(p, p["lifts"]) for p in profiles),
        excluded_items=excluded_items, capped_items=capped_items,
        distinct_lifts=tuple(mean_where_used(p, [lift for _, lift, _ in p["distinctive"]]) for p in profiles),
        distinct_share=sum(p["size"] for p in profiles if p["distinct"]) / assigned if assigned else float("nan"),
        empty_segments=empty)
