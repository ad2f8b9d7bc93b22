"""Segments that survive skew: the realistic generator, the segment_quality figures, and the default
settings' balance, stability and lift on realistic data (against the settings before issue 13)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from pyspark.sql import functions as F
from sklearn.metrics import adjusted_rand_score

from jobs import segment_users
from jobs.common import report_directory
from lib.features.interactions import write_matrix_tables
from lib.platform import catalog as C
from lib.sample import planted as sample_data
from lib.sample import realistic as R
from lib.segments.assign import (KTrial, adjusted_rand_index, assess_k, assign_fit, assign_segments, choose_k,
                                 seed_stability, size_balance)
from lib.segments.matrix import fit_segments, k_sweep, parse_score_transform, score_transform_name
from lib.segments.profiles import (distinctive_items, report_profiles, segment_item_lifts, segment_profiles,
                                   summarize_quality, top_item_lifts)

SPEC = R.RealisticSpec(users=1000, items=200, events=60_000, segments=5, seed=3)
# The settings before issue 13: no popularity damping, non-product lines factorized like products,
# and, before the grocer findings (docs/segments.md), the decayed score and the dominant segment.
BEFORE = ("segments.popular_share_cap=1.0", "products.exclude_item_patterns=[]", "segments.value_column=score",
          "segments.assignment=dominant", "segments.min_segment_size=0")


def test_adjusted_rand_index_matches_scikit_learn():
    rng = np.random.default_rng(5)
    for _ in range(20):
        a, b = rng.integers(0, 4, 300), rng.integers(0, 5, 300)
        b[:150] = a[:150]
        table = np.zeros((4, 5))
        np.add.at(table, (a, b), 1)
        assert adjusted_rand_index(table) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)
    assert adjusted_rand_index(np.diag([10, 20, 30])) == pytest.approx(1.0)


def test_size_balance():
    assert size_balance([25, 25, 25, 25], 4) == pytest.approx((0.25, 1.0))
    largest, entropy = size_balance([97, 1, 1, 1], 4)
    assert largest == pytest.approx(0.97) and 0 < entropy < 0.2
    assert size_balance([10, 0, 0], 3) == pytest.approx((1.0, 0.0))


def test_relative_assignment_picks_the_segment_a_customer_has_more_of_than_the_average(spark):
    # Shares of W[u, l] * mass[l]: with mass (1, 2) u1 is (0.9, 0.1) once normalized, u2 (0.8, 0.2),
    # u3 (0.6, 0.4), u4 (0.95, 0.05); the average customer is (0.8125, 0.1875). Everyone's largest
    # share is segment 0 (the staples), but u2 and u3 have more of segment 1 than the average.
    rows = [("u1", [0.9, 0.05]), ("u2", [0.8, 0.1]), ("u3", [0.6, 0.2]), ("u4", [0.95, 0.025]), ("u5", [0.0, 0.0])]
    factors = spark.createDataFrame(rows, "user_id string, factors array<double>")
    got = {r["user_id"]: (r["segment_id"], round(r["affinity"], 6))
           for r in assign_segments(factors, [1.0, 2.0], "r", "relative").collect()}
    assert got == {"u1": (0, 0.9), "u2": (1, 0.2), "u3": (1, 0.4), "u4": (0, 0.95)}
    dominant = {r["user_id"]: r["segment_id"] for r in assign_segments(factors, [1.0, 2.0], "r", "dominant").collect()}
    assert dominant == {"u1": 0, "u2": 0, "u3": 0, "u4": 0}
    with pytest.raises(ValueError, match="segments.assignment must be one of"):
        assign_segments(factors, [1.0, 2.0], "r", "largest")


def test_a_segment_under_the_minimum_share_is_merged_into_its_customers_next_segments(spark):
    # Dominant rule, equal masses: segments 0 and 1 hold three customers each, segment 2 two (25%).
    # With min_share 0.3 segment 2 goes: u7 moves to its next segment (1); u8 has weight only in
    # segment 2, so it goes to the largest remaining segment (0 and 1 tie at 3: the lower id).
    rows = [("u1", [0.9, 0.1, 0.0]), ("u2", [0.8, 0.2, 0.0]), ("u3", [0.7, 0.3, 0.0]),
            ("u4", [0.1, 0.9, 0.0]), ("u5", [0.2, 0.7, 0.1]), ("u6", [0.3, 0.6, 0.1]),
            ("u7", [0.2, 0.3, 0.5]), ("u8", [0.0, 0.0, 1.0])]
    factors = spark.createDataFrame(rows, "user_id string, factors array<double>")
    plain = {r["user_id"]: r["segment_id"] for r in assign_segments(factors, [1.0] * 3, "r", "dominant").collect()}
    assert plain == {"u1": 0, "u2": 0, "u3": 0, "u4": 1, "u5": 1, "u6": 1, "u7": 2, "u8": 2}
    merged = {r["user_id"]: (r["segment_id"], round(r["affinity"], 6))
              for r in assign_segments(factors, [1.0] * 3, "r", "dominant", min_share=0.3).collect()}
    assert merged == {"u1": (0, 0.9), "u2": (0, 0.8), "u3": (0, 0.7), "u4": (1, 0.9), "u5": (1, 0.7),
                      "u6": (1, 0.6), "u7": (1, 0.3), "u8": (0, 0.0)}
    # A share the segment reaches keeps it.
    kept = {r["user_id"]: r["segment_id"] for r in assign_segments(factors, [1.0] * 3, "r", "dominant",
                                                                   min_share=0.25).collect()}
    assert kept == plain


@pytest.fixture(scope="module")
def baskets(spark):
    """Five customers in three segments (a k = 4 fit leaves segment 3 empty): everyone buys milk,
    segment 0 nappies, segment 1 beer (and one of them wine, the other tea), segment 2 only milk."""
    held = {"a": ["milk", "nappies"], "b": ["milk", "nappies"], "c": ["milk", "beer", "wine"],
            "d": ["milk", "beer", "tea"], "e": ["milk"]}
    users = sorted(held)
    items = sorted({item for basket in held.values() for item in basket})
    user_index = spark.createDataFrame([(u, i) for i, u in enumerate(users)], "user_id string, user_idx int")
    item_index = spark.createDataFrame([(it, i) for i, it in enumerate(items)], "item_id string, item_idx int")
    interactions = spark.createDataFrame(
        [(users.index(u), items.index(it), 1.0) for u, basket in held.items() for it in basket],
        "user_idx int, item_idx int, score double")
    segments = spark.createDataFrame([("a", 0), ("b", 0), ("c", 1), ("d", 1), ("e", 2)],
                                     "user_id string, segment_id int")
    return interactions, user_index, item_index, segments


def test_item_lifts_and_distinctive_items_on_hand_made_baskets(spark, baskets):
    interactions, user_index, item_index, segments = baskets
    lifts = segment_item_lifts(interactions, user_index, item_index, segments)
    got = {(r["segment_id"], r["item_id"]): (round(r["support"], 6), round(r["lift"], 6)) for r in lifts.collect()}
    # lift = support in the segment / share of all five customers who have the item.
    assert got == {(0, "milk"): (1.0, 1.0), (0, "nappies"): (1.0, 2.5),
                   (1, "milk"): (1.0, 1.0), (1, "beer"): (1.0, 2.5), (1, "wine"): (0.5, 2.5), (1, "tea"): (0.5, 2.5),
                   (2, "milk"): (1.0, 1.0)}

    def listed(frame):
        return {r["segment_id"]: [(i["item_id"], round(i["lift"], 6)) for i in r["distinctive_items"]]
                for r in frame.collect()}

    # By lift, then support, then id; an item under the minimum support is not listed.
    assert listed(distinctive_items(lifts, 3, 0.5)) == {
        0: [("nappies", 2.5), ("milk", 1.0)], 1: [("beer", 2.5), ("tea", 2.5), ("wine", 2.5)], 2: [("milk", 1.0)]}
    assert listed(distinctive_items(lifts, 3, 0.6)) == {
        0: [("nappies", 2.5), ("milk", 1.0)], 1: [("beer", 2.5), ("milk", 1.0)], 2: [("milk", 1.0)]}
    excluded = spark.createDataFrame([("beer",)], "item_id string")
    assert listed(distinctive_items(lifts, 2, 0.5, excluded))[1] == [("tea", 2.5), ("wine", 2.5)]


def test_profiles_name_distinct_segments_by_their_distinctive_items_and_the_rest_general(spark, baskets):
    interactions, user_index, item_index, segments = baskets
    lifts = segment_item_lifts(interactions, user_index, item_index, segments)
    # H: segment 0 weighs milk most, segment 1 beer, segment 2 milk; segment 3 has weights but no customers.
    item_factors = spark.createDataFrame(
        [("milk", [0.6, 0.2, 1.0, 0.1]), ("nappies", [0.4, 0.0, 0.0, 0.1]), ("beer", [0.0, 0.7, 0.0, 0.0]),
         ("wine", [0.0, 0.05, 0.0, 0.0]), ("tea", [0.0, 0.05, 0.0, 0.0])], "item_id string, factors array<double>")
    products = spark.createDataFrame(
        [("milk", "Whole milk", "DAIRY"), ("nappies", "Nappies", "BABY"), ("beer", "Lager", "DRINKS"),
         ("wine", "Red wine", "DRINKS"), ("tea", "Green tea", "DRINKS")], "item_id string, name string, category string")
    profiles = segment_profiles(segments, item_factors, 4, 1, "r", products=products,
                                distinctive=distinctive_items(lifts, 1, 0.6), min_distinct_lift=2.0)
    got = {r["segment_id"]: (r["size"], r["distinct"], r["label"], [i["item_id"] for i in r["top_items"] or []])
           for r in profiles.collect()}
    assert got == {0: (2, True, "BABY: Nappies", ["milk"]), 1: (2, True, "DRINKS: Lager", ["beer"]),
                   2: (1, False, "General: DAIRY: Whole milk", ["milk"]),
                   3: (0, False, "(empty: merged or unused)", ["milk"])}
    # Without the distinctive items (or the catalog) every segment is named by its top items.
    plain = {r["segment_id"]: (r["distinct"], r["label"]) for r in segment_profiles(segments, item_factors, 4, 2, "r")
             .collect()}
    assert plain == {0: (True, "milk / nappies"), 1: (True, "beer / milk"), 2: (True, "milk"),
                     3: (False, "(empty: merged or unused)")}
    top = {(r["segment_id"], r["item_id"]): round(r["lift"], 6) for r in top_item_lifts(lifts, profiles).collect()}
    assert top == {(0, "milk"): 1.0, (1, "beer"): 2.5, (2, "milk"): 1.0, (3, "milk"): 0.0}
    # A name several listed products share (a catalog naming products by type) appears once.
    by_type = products.withColumn("name", F.when(F.col("item_id").isin("wine", "tea"), F.lit("Mixers"))
                                  .otherwise(F.col("name")))
    wider = segment_profiles(segments, item_factors, 4, 3, "r", products=by_type,
                             distinctive=distinctive_items(lifts, 3, 0.5), min_distinct_lift=2.0)
    assert wider.where("segment_id = 1").first()["label"] == "DRINKS: Lager / Mixers"


def test_quality_counts_only_segments_with_customers():
    profiles = [
        {"size": 60, "distinct": True, "lifts": [2.0, 4.0], "distinctive": [("a", 3.0, 0.5), ("b", 5.0, 0.2)]},
        {"size": 40, "distinct": False, "lifts": [1.0, 1.0], "distinctive": [("c", 1.2, 0.9)]},
        {"size": 0, "distinct": False, "lifts": [0.0], "distinctive": []},
    ]
    quality = summarize_quality(profiles, 3, 125, 0.9, 7, 2)
    assert quality.assigned_share == pytest.approx(0.8) and quality.largest_share == pytest.approx(0.6)
    # Entropy over the two segments customers could be in.
    assert quality.size_entropy == pytest.approx(-(0.6 * np.log(0.6) + 0.4 * np.log(0.4)) / np.log(2))
    assert quality.top_lifts[:2] == (3.0, 1.0) and np.isnan(quality.top_lifts[2])
    assert quality.distinct_lifts[:2] == (4.0, 1.2) and np.isnan(quality.distinct_lifts[2])
    assert (quality.min_top_lift, quality.median_top_lift, quality.min_distinct_lift) == (1.0, 2.0, 1.2)
    assert quality.distinct_share == pytest.approx(0.6) and quality.empty_segments == 1


def _trial(k: int, ari: float, entropy: float = 0.9, largest: float | None = None, empty: int = 0) -> KTrial:
    return KTrial(k=k, rel_error=0.9, iterations=10, largest_share=1.2 / k if largest is None else largest,
                  size_entropy=entropy, stability_ari=ari, empty_segments=empty)


def test_choose_k_keeps_the_largest_stable_balanced_k_else_the_most_stable():
    # 5 is unstable, 6 lost a segment to merging: 4 is the largest usable k.
    chosen, why = choose_k([_trial(3, 0.95), _trial(4, 0.9), _trial(5, 0.6), _trial(6, 0.85, empty=1)])
    assert chosen.k == 4 and why.startswith("k = 4: the largest of [3, 4, 5, 6]")
    # A catch-all (largest share above 2 / k) or unequal sizes (entropy under 0.8) disqualify too.
    assert choose_k([_trial(3, 0.95), _trial(4, 0.9, largest=0.51)])[0].k == 3
    assert choose_k([_trial(3, 0.95), _trial(4, 0.9, entropy=0.79)])[0].k == 3
    # None usable: the most stable, the smaller k on a tie.
    chosen, why = choose_k([_trial(3, 0.5), _trial(4, 0.7), _trial(5, 0.7)])
    assert chosen.k == 4 and "no k of [3, 4, 5]" in why and "the most stable (ARI 0.700)" in why
    with pytest.raises(ValueError, match="at least one candidate"):
        choose_k([])


def test_assess_k_measures_sizes_and_stability_of_a_planted_matrix(spark, context):
    # Three planted groups of 20 users, each buying its own 10 items (and one item every group buys).
    rows = [(u, (u // 20) * 10 + i, 1.0 + (u * 7 + i) % 3) for u in range(60) for i in range(10)]
    rows += [(u, 30, 1.0) for u in range(60)]
    entries = spark.createDataFrame(rows, "row int, col int, value double")
    user_index = spark.createDataFrame([(f"u{u}", u) for u in range(60)], "user_id string, user_idx int")
    scales = spark.createDataFrame([(u, 1.0) for u in range(60)], "user_idx int, row_scale double")
    settings = context("segments.k=3", "segments.sweep_ks=2,3", "segments.choose_k=true",
                       "segments.max_iter=30").settings.segments
    assert settings.k_candidates() == (2, 3)
    three = assess_k(entries, settings, 3, 60, 31, user_index, scales)
    assert (three.k, three.empty_segments) == (3, 0)
    assert three.largest_share == pytest.approx(1 / 3) and three.size_entropy == pytest.approx(1.0)
    assert three.stability_ari == pytest.approx(1.0) and 0 < three.rel_error < 1
    two = assess_k(entries, settings, 2, 60, 31, user_index, scales)
    # Two segments for three groups: two groups share one segment, nobody is split from their group.
    assert two.largest_share == pytest.approx(2 / 3) and two.rel_error > three.rel_error
    assert choose_k([two, three])[0].k == 3

    # The stage's stability check and k sweep on the same matrix: the planted groups come back from
    # another seed, and a short fit at each swept k explains more of the matrix at k = 3 than at k = 2.
    fit = fit_segments(entries, settings, 60, 31)
    shipped = assign_fit(fit, settings, 3, user_index, scales)
    assert seed_stability(entries, settings, shipped, user_index, scales, 60, 31) == pytest.approx(1.0)
    fit.release()
    sweep = k_sweep(entries, replace(settings, sweep_max_iter=5), 60, 31)
    assert [row["k"] for row in sweep] == [2, 3] and all(1 <= row["iterations"] <= 5 for row in sweep)
    assert sweep[0]["rel_error"] > sweep[1]["rel_error"]


def test_report_profiles_read_the_written_rows_in_segment_order():
    rows = [
        {"segment_id": 1, "size": 4, "share": 0.4, "label": "B", "distinct": False,
         "top_items": [{"item_id": "x", "weight": 0.7}], "distinctive_items": None},
        {"segment_id": 0, "size": 6, "share": 0.6, "label": "A", "distinct": True,
         "top_items": [{"item_id": "y", "weight": 0.9}, {"item_id": "z", "weight": 0.1}],
         "distinctive_items": [{"item_id": "y", "lift": 3.0, "support": 0.5}]},
    ]
    got = report_profiles(rows, {(0, "y"): 3.0, (1, "x"): 1.1})
    assert [p["segment_id"] for p in got] == [0, 1]
    assert got[0] == {"segment_id": 0, "size": 6, "share": 0.6, "label": "A", "distinct": True,
                      "top_items": [("y", 0.9), ("z", 0.1)], "lifts": [3.0, 0.0], "distinctive": [("y", 3.0, 0.5)]}
    assert got[1]["lifts"] == [1.1] and got[1]["distinctive"] == []


def test_score_transform_names_the_factorized_column():
    assert score_transform_name("log1p", "score") == "log1p"  # tables written before value_column
    assert score_transform_name("log1p", "n_events") == "log1p(n_events)"
    assert parse_score_transform("log1p") == ("log1p", "score")
    assert parse_score_transform("none(n_events)") == ("none", "n_events")
    with pytest.raises(ValueError, match="score_transform 'log1p\\(revenue\\)'"):
        parse_score_transform("log1p(revenue)")


def test_realistic_sample_is_skewed_like_an_invoice_log(spark):
    events = R.generate_events(spark, SPEC, partitions=1)
    planted = sample_data.generate_events(spark, sample_data.SampleSpec(50, 20, 500, 2, 1), partitions=1)
    assert events.schema == planted.schema  # the same columns and types as the planted generator
    assert events.count() == SPEC.events
    # Deterministic whatever the partitioning.
    assert events.exceptAll(R.generate_events(spark, SPEC, partitions=2)).count() == 0

    per_user = events.groupBy("user_id").agg(F.countDistinct("item_id").alias("items"),
                                             F.countDistinct("event_ts").alias("orders")).toPandas()
    users = len(per_user)
    assert per_user["orders"].max() >= 20 * per_user["orders"].median()  # heavy and light customers
    assert (per_user["orders"] <= 2).mean() > 0.05
    item_users = events.groupBy("item_id").agg(F.countDistinct("user_id").alias("users")).toPandas()
    item_users["share"] = item_users["users"] / users
    products = item_users[~item_users["item_id"].isin(R.NON_PRODUCT_ITEMS)].sort_values("share", ascending=False)
    assert (products["share"].head(R.HERO_ITEMS) > 0.5).all()  # best sellers nearly everyone buys
    assert products["share"].median() < 0.1                     # and a long tail
    non_product = item_users[item_users["item_id"].isin(R.NON_PRODUCT_ITEMS)].set_index("item_id")["share"]
    assert set(non_product.index) == set(R.NON_PRODUCT_ITEMS)
    assert non_product["POST"] > 0.1
    repeats = events.groupBy("user_id", "item_id").count().where("count >= 3").count()
    assert repeats > 0.5 * users                                  # staples bought again and again
    assert events.where("quantity <= 0 or revenue < 0 or event_type != 'purchase'").count() == 0

    truth = R.planted_user_segments(spark, SPEC).toPandas()
    assert len(truth) == SPEC.users and set(truth["segment_id"]) == set(range(SPEC.segments))
    shares = truth["segment_id"].value_counts(normalize=True).sort_index().to_numpy()
    assert shares == pytest.approx(R.segment_proportions(SPEC.segments), abs=0.05)
    kinds = R.planted_items(spark, SPEC).groupBy("kind").count().toPandas().set_index("kind")["count"]
    assert kinds.to_dict() == {"best_seller": R.HERO_ITEMS, "non_product": len(R.NON_PRODUCT_ITEMS),
                               "segment": SPEC.segments * ((SPEC.items - R.HERO_ITEMS) // (SPEC.segments + 1)),
                               "general": SPEC.items - R.HERO_ITEMS
                               - SPEC.segments * ((SPEC.items - R.HERO_ITEMS) // (SPEC.segments + 1))}


def _segment(spark, root, run_id: str, *sets: str):
    from jobs.common import StageContext, load_settings

    ctx = StageContext(spark, load_settings([], [f"output.root={root}", f"segments.k={SPEC.segments}",
                                                 "segments.max_iter=60", *sets]), run_id)
    result = segment_users.run(ctx)
    quality = ctx.tables.read(spark, C.SEGMENT_QUALITY).where(F.col("run_id") == run_id).collect()
    assert len(quality) == 1
    return ctx, result, quality[0]


@pytest.fixture(scope="module")
def realistic(spark, tmp_path_factory):
    """The realistic sample through lib.features.interactions, then the stage with the settings before and now."""
    from jobs.common import StageContext, load_settings

    root = tmp_path_factory.mktemp("quality_wh")
    ctx = StageContext(spark, load_settings([], [f"output.root={root}"]), "prep")
    tables = ctx.tables
    events = R.generate_events(spark, SPEC, partitions=1)
    write_matrix_tables(spark, tables, events, ctx.settings.interactions.weights, 30.0)
    # The plain k sweep (errors only, a few iterations) rides on the "before" run.
    before = _segment(spark, root, "before", *BEFORE, "segments.sweep_ks=3,4", "segments.sweep_max_iter=2")
    before_profiles = tables.read(spark, C.SEGMENT_PROFILES).collect()
    now = _segment(spark, root, "now")
    now_profiles = tables.read(spark, C.SEGMENT_PROFILES).collect()
    # A catalog: planted kinds as categories, and the first segment's top item made unrecommendable.
    hidden = min(now_profiles, key=lambda p: p["segment_id"])["top_items"][0]["item_id"]
    category = (F.when(F.col("kind") == "segment", F.format_string("Category %d", F.col("segment_id")))
                .when(F.col("kind") == "best_seller", F.lit("Best sellers")).otherwise(F.lit("General")))
    products = R.planted_items(spark, SPEC).select(
        "item_id", F.concat(F.lit("Product "), F.col("item_id")).alias("name"), category.alias("category"),
        F.lit(1.0).alias("price"), F.lit(True).alias("available"),
        (F.col("item_id") != hidden).alias("recommendable"), F.lit("catalog").alias("run_id"))
    tables.overwrite(products, C.PRODUCTS)
    _segment(spark, root, "named")   # its profiles (with the catalog) are what the label tests read
    return tables, before, before_profiles, now, hidden


@pytest.mark.slow
def test_defaults_give_balanced_stable_distinct_segments_on_realistic_data(spark, realistic):
    tables, (_, _, before), before_profiles, (ctx, result, now), _ = realistic
    # Before: a catch-all segment led by best sellers, and non-product lines among the top items.
    assert before["largest_share"] > 0.45
    sweep = tables.read(spark, C.NMF_K_SWEEP).where("run_id = 'before'").orderBy("k").collect()
    assert [row["k"] for row in sweep] == [3, 4]
    assert all(0 < row["rel_error"] < 1 and row["iterations"] <= 2 and row["chosen"] is None for row in sweep)
    assert before["min_top_lift"] < 1.5
    assert any(item["item_id"] in R.NON_PRODUCT_ITEMS for p in before_profiles for item in p["top_items"])

    # Now: the largest of five segments holds less than 45% (the largest planted one holds 34%; a
    # catch-all holds 50-70%), sizes are near equal, every segment's top items are bought at least twice
    # as often by its customers as by everyone, and another seed finds the same groups.
    assert now["largest_share"] < 0.45
    assert now["size_entropy"] > 0.85
    assert now["min_top_lift"] > 2.0 and now["median_top_lift"] > 2.5
    assert now["stability_ari"] >= 0.8
    assert now["assigned_share"] > 0.99
    assert now["excluded_items"] == len(R.NON_PRODUCT_ITEMS)
    assert 0 < now["capped_items"] < SPEC.items
    assert len(now["top_lifts"]) == SPEC.segments
    assert now["largest_share"] < before["largest_share"] and now["min_top_lift"] > before["min_top_lift"]

    profiles = tables.read(spark, C.SEGMENT_PROFILES).collect()  # the last run's (with a catalog)
    assert not any(item["item_id"] in R.NON_PRODUCT_ITEMS for p in profiles for item in p["top_items"])

    # The planted segments come back too (light customers with one or two orders are the misses).
    truth = R.planted_user_segments(spark, SPEC).withColumnRenamed("segment_id", "planted")
    labels = tables.read(spark, C.USER_SEGMENTS).join(truth, "user_id").select("segment_id", "planted").toPandas()
    assert adjusted_rand_score(labels["planted"], labels["segment_id"]) >= 0.7

    assert "largest_share" in result.message


@pytest.mark.slow
def test_labels_use_the_catalog_and_unrecommendable_items_stay_out(spark, realistic):
    tables, _, _, (ctx, _, _), hidden = realistic
    named = tables.read(spark, C.SEGMENT_QUALITY).where("run_id = 'named'").first()
    profiles = tables.read(spark, C.SEGMENT_PROFILES).orderBy("segment_id").collect()
    assert all(p["run_id"] == "named" for p in profiles)
    assert not any(item["item_id"] == hidden for p in profiles
                   for item in p["top_items"] + p["distinctive_items"])
    assert named["excluded_items"] == len(R.NON_PRODUCT_ITEMS) + 1
    planted = R.planted_items(spark, SPEC).toPandas().set_index("item_id")
    for p in profiles:
        # Every segment is distinct here, so its label names its distinctive items (highest lift first).
        assert p["distinct"]
        listed = p["distinctive_items"]
        assert [item["lift"] for item in listed] == sorted((item["lift"] for item in listed), reverse=True)
        category, names = p["label"].split(": ", 1)
        assert names == " / ".join(f"Product {item['item_id']}" for item in listed[:3])
        weights = {}
        for item in listed:
            row = planted.loc[item["item_id"]]
            name = (f"Category {int(row['segment_id'])}" if row["kind"] == "segment"
                    else "Best sellers" if row["kind"] == "best_seller" else "General")
            weights[name] = weights.get(name, 0.0) + item["lift"]
        assert category == max(sorted(weights), key=weights.get)  # the category of the largest summed lift
    # Every segment is led by one planted segment's products, not by best sellers or the general tail;
    # at 1000 customers the smallest planted segment (11%, about 100 customers) may merge into another
    # and a larger one split, so four of the five planted categories must lead a segment.
    categories = [p["label"].split(": ")[0] for p in profiles]
    assert all(name.startswith("Category ") for name in categories)
    assert len(set(categories)) >= SPEC.segments - 1

    report = report_directory(ctx, ctx.settings.segments.report_dir, "segments")
    text = (report / "segments.md").read_text()
    assert (report / "segment_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![segment quality](segment_quality.png)" in text
    assert f"| largest segment share | {named['largest_share']:.1%} |" in text
    assert f"| stability (ARI, seed vs seed + 1) | {named['stability_ari']:.3f} |" in text
    assert f"| customers in distinct (not General) segments | {named['distinct_share']:.1%} |" in text
    assert named["distinct_share"] == 1.0 and named["min_distinct_lift"] >= 2.0 and named["empty_segments"] == 0
    for p in profiles:
        assert p["label"] in text


@pytest.mark.slow
def test_segment_quality_table_appends_one_row_per_run(spark, realistic):
    tables = realistic[0]
    rows = tables.read(spark, C.SEGMENT_QUALITY).orderBy("run_id").collect()
    assert [row["run_id"] for row in rows] == ["before", "named", "now"]
    for row in rows:
        sizes = [p for p in row["top_lifts"]]
        assert len(sizes) == row["k"] == SPEC.segments
        assert 1.0 / SPEC.segments - 1e-9 <= row["largest_share"] <= 1.0
        assert 0.0 <= row["size_entropy"] <= 1.0 + 1e-9
        assert -1.0 <= row["stability_ari"] <= 1.0
        assert row["min_top_lift"] == pytest.approx(min(row["top_lifts"]))
        assert row["users"] == tables.read(spark, C.USER_INDEX).count()


def test_sample_mode_is_checked(context):
    from lib.platform.config import ConfigError

    with pytest.raises(ConfigError, match="'sample.mode' must be one of planted, realistic; got 'real'"):
        context("sample.mode=real")
    with pytest.raises(ConfigError, match="'sample.items' must be >= 15 in realistic mode"):
        context("sample.mode=realistic", "sample.items=12", "sample.segments=5")
    with pytest.raises(ConfigError, match="'segments.popular_share_cap' must be in"):
        context("segments.popular_share_cap=0")


@pytest.mark.slow
def test_generate_events_writes_the_realistic_sample_and_its_truth(spark, tmp_path, context):
    from jobs import generate_events

    ctx = context(f"output.root={tmp_path}", "sample.mode=realistic", "sample.users=200", "sample.items=60",
                  "sample.events=3000", "sample.segments=3")
    result = generate_events.run(ctx)
    root = tmp_path / "sample"
    events = spark.read.parquet(str(root / "events"))
    assert events.count() == result.rows_out == 3000
    assert events.columns == R.generate_events(spark, R.spec_from_settings(ctx.settings.sample)).columns
    assert events.where(F.col("item_id") == "POST").count() > 0
    truth = spark.read.parquet(str(root / "truth_user_segments"))
    assert truth.count() == 200 and {row[0] for row in truth.select("segment_id").distinct().collect()} == {0, 1, 2}
    items = spark.read.parquet(str(root / "truth_items"))
    assert items.count() == 60 + len(R.NON_PRODUCT_ITEMS)
    assert spark.read.parquet(str(root / "truth_segment_items")).count() == 3 * ((60 - R.HERO_ITEMS) // 4)
