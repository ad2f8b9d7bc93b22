"""Customer segments from an NMF of the interaction matrix: score transforms, factor tables,
segment assignment, segment profiles, and the objective recomputed from the written tables.

The factorized matrix is X[u, i] = row_scale[u] * item_weight[i] * f(value[u, i]), where f is the
identity or log1p and value the interactions column ``segments.value_column`` (score, n_events or n_weighted_events). ``row_scale`` is stored in ``nmf_user_factors`` and ``item_weight`` in
``nmf_item_factors`` (with ``score_transform`` naming f), so ``interactions`` and the two factor
tables alone give X, and with it ||X - W H||_F / ||X||_F.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from lib.nmf import NMFParams, factorize
from lib.settings import SEGMENT_ASSIGNMENTS as ASSIGNMENTS
from lib.settings import SEGMENT_VALUE_COLUMNS as VALUE_COLUMNS
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
    ``lib.products.excluded_items`` keeps out of every list (ids matching products.exclude_item_patterns,
    such as postage and manual adjustments, and, with a catalog, unavailable or unrecommendable items and
    those of products.exclude_categories)."""
    from lib.products import excluded_items

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


def size_balance(sizes: list[int], k: int) -> tuple[float, float]:
    """(largest share, entropy of the size distribution / log k) of segment sizes; ``k`` counts the
    segments customers could be in (merged segments left out)."""
    total = float(sum(sizes))
    if total <= 0:
        return float("nan"), float("nan")
    shares = np.array([size / total for size in sizes if size > 0])
    entropy = float(-(shares * np.log(shares)).sum() / math.log(k)) if k > 1 else 1.0
    return float(shares.max()), entropy


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
