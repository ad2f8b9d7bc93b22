"""Buy-again scores, the trivial "most bought" baseline, repeat propensity, the blend, and the
repeat-purchase generator; on generated repeat-purchase data the buy-again and blended lists beat
their trivial baselines and discovery keeps beating popularity on new items."""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest
from pyspark.sql import functions as F

from lib.recommend.als import AlsParams
from lib.recommend.buy_again import (BuyAgainParams, blend, buy_again_scores, buy_again_top_n, choose_per_group,
                                     customer_groups, fit_ranker, item_intervals, most_bought_top_n, most_recent_top_n,
                                     purchase_occasions, ranker_top_n, repeat_propensity)
from lib.recommend.evaluation import EvaluationSettings, evaluate_offline
from lib.recommend.lists import strategy_lists
from lib.sample.repeat import RepeatSpec, generate_repeat_purchases, item_interval_days

AS_OF = datetime(2026, 3, 1, tzinfo=timezone.utc)
DAY = 86_400


def _purchases(spark, rows):
    """rows: (user, item, days before AS_OF)."""
    data = [(f"e{n}", u, i, "purchase", datetime.fromtimestamp(AS_OF.timestamp() - d * DAY, timezone.utc))
            for n, (u, i, d) in enumerate(rows)]
    return spark.createDataFrame(data, "event_id string, user_id string, item_id string, event_type string, "
                                       "event_ts timestamp")


def test_scores_follow_frequency_interval_and_recency(spark):
    # Item "milk" is re-bought every 10 days by u1 and u2; "tv" bought once by u1; "soap" every 30 days.
    rows = ([("u1", "milk", d) for d in (42, 32, 22, 12)] + [("u2", "milk", d) for d in (30, 20, 10)]
            + [("u1", "tv", 3)] + [("u1", "soap", d) for d in (95, 65)]       # soap: last 65 days ago, overdue
            + [("u2", "soap", d) for d in (62, 32)]                          # u2's soap due in 28 days
            + [("u1", "milk", 12)]                                           # same day twice: one occasion
            + [("u1", "late", -1)])                                          # after as_of: ignored
    events = _purchases(spark, rows).withColumn(
        "event_ts", F.when(F.col("event_id") == "e12", F.col("event_ts") + F.expr("INTERVAL 1 HOUR"))
        .otherwise(F.col("event_ts")))
    occasions = purchase_occasions(events, ["purchase"])
    intervals = {r["item_id"]: r for r in item_intervals(occasions.where(F.col("ts") <= F.lit(AS_OF)), 2).collect()}
    assert intervals["milk"]["interval_days"] == pytest.approx(10.0, abs=0.01)   # 5 gaps of 10 days
    assert intervals["soap"]["interval_days"] == pytest.approx(30.0, abs=0.01)
    assert intervals["tv"]["interval_days"] == pytest.approx(10.0, abs=0.01)     # < 2 gaps: median of all gaps
    assert intervals["milk"]["repeat_rate"] == 1.0 and intervals["tv"]["repeat_rate"] == 0.0

    params = BuyAgainParams(horizon_days=7.0, overdue_decay=1.0, min_gaps=2)
    scores = {(r["user_id"], r["item_id"]): r for r in buy_again_scores(occasions, AS_OF, params).collect()}
    assert ("u1", "late") not in scores
    milk = scores[("u1", "milk")]
    assert milk["n_occasions"] == 4
    # staple = (4 - 1 + 1) / 4 = 1; since 12 d less the hour, interval 10: due = 1 * exp(-(since / 10 - 1) / 1)
    assert milk["score"] == pytest.approx(math.exp(-((12 - 1 / 24) / 10 - 1)), rel=1e-6)
    # tv: one occasion of an item nobody re-buys: staple 0
    assert scores[("u1", "tv")]["score"] == 0.0
    # u2's soap: since 32 d of 30: due = 1 * exp(-2/30); staple = (2 - 1 + 1) / 2 = 1
    assert scores[("u2", "soap")]["score"] == pytest.approx(math.exp(-2 / 30), rel=1e-6)
    # u1's soap is 65 days since, overdue by > one interval: ranked below milk. u2's milk (since 10 d
    # of 10, 3 occasions) is due: 1.0, above u2's soap
    assert scores[("u1", "soap")]["score"] == pytest.approx(math.exp(-35 / 30), rel=1e-6)

    lists = buy_again_top_n(occasions, AS_OF, params, 2).orderBy("user_id", "rank").collect()
    assert [(r["user_id"], r["item_id"]) for r in lists] == [("u1", "milk"), ("u1", "soap"),
                                                              ("u2", "milk"), ("u2", "soap")]
    trivial = most_bought_top_n(occasions, AS_OF, 2, spark.createDataFrame([("soap",)], "item_id string"))
    assert [(r["user_id"], r["item_id"], r["score"]) for r in trivial.orderBy("user_id", "rank").collect()] == [
        ("u1", "milk", 4.0), ("u1", "tv", 1.0), ("u2", "milk", 3.0)]


def _lists(rows) -> dict[str, list[str]]:
    by_user: dict[str, list[str]] = {}
    for row in sorted(rows, key=lambda r: (r["user_id"], r["rank"])):
        by_user.setdefault(row["user_id"], []).append(row["item_id"])
    return by_user


def test_ranker_learns_that_a_stopped_item_is_not_bought_again(spark):
    """Six customers bought "fad" six times long ago and then stopped, and buy "milk" weekly. The window
    before AS_OF teaches the ranker that milk comes back and fad does not: it ranks milk first where the
    most-bought baseline ranks fad first (6 occasions against milk's 5)."""
    rows = [(f"u{u}", "fad", d) for u in range(6) for d in (200, 190, 180, 170, 160, 150)] \
        + [(f"u{u}", "milk", d) for u in range(6) for d in (28, 21, 14, 7, 1)]
    occasions = purchase_occasions(_purchases(spark, rows), ["purchase"]).cache()
    params = BuyAgainParams(horizon_days=14.0, min_gaps=2)
    ranker = fit_ranker(occasions, AS_OF, params, "logistic_regression")
    assert ranker.model is not None and "12 pairs" in ranker.note and "0.500 re-bought" in ranker.note
    learned = _lists(ranker_top_n(ranker, occasions, AS_OF, params, 2).collect())
    assert learned == {f"u{u}": ["milk", "fad"] for u in range(6)}
    assert _lists(most_bought_top_n(occasions, AS_OF, 2).collect()) == {f"u{u}": ["fad", "milk"] for u in range(6)}
    assert _lists(most_recent_top_n(occasions, AS_OF, 1).collect()) == {f"u{u}": ["milk"] for u in range(6)}
    # Nothing re-bought in the window before the moment: nothing to learn, the heuristic ranks.
    fallback = fit_ranker(occasions, AS_OF - timedelta(days=100), params, "logistic_regression")
    assert fallback.model is None and "heuristic used" in fallback.note
    occasions.unpersist()


def test_a_group_whose_validation_a_baseline_won_gets_the_baseline_list(spark):
    """u1 has one order, u2 several. Validation: on one-order customers most_bought beat the buy-again list,
    on repeat customers it tied (the list ships). u1's buy_again list is then their most-bought items,
    recorded as source most_bought; u2 keeps the ranker's list."""
    ndcg = {("buy_again", "one_order"): 0.20, ("most_bought", "one_order"): 0.25, ("most_recent", "one_order"): 0.1,
            ("buy_again", "repeat"): 0.40, ("most_bought", "repeat"): 0.40}
    chosen = choose_per_group("buy_again", ("most_bought", "most_recent"), ndcg)
    # No validation figure for customers without an order: they keep the model's list.
    assert chosen == {"no_order": "buy_again", "one_order": "most_bought", "repeat": "buy_again"}
    assert set(choose_per_group("buy_again", ("most_bought",), {}).values()) == {"buy_again"}
    # Five one-order customers in validation are too few to replace the model's list.
    assert choose_per_group("buy_again", ("most_bought", "most_recent"), ndcg, {"one_order": 5, "repeat": 400},
                            30) == {"no_order": "buy_again", "one_order": "buy_again", "repeat": "buy_again"}

    rows = [("u1", "x", 3), ("u1", "y", 3), ("u1", "y", 3)] + [("u2", "a", d) for d in (30, 20, 10)] + [("u2", "b", 2)]
    occasions = purchase_occasions(_purchases(spark, rows), ["purchase"])
    discover = spark.createDataFrame([], "user_id string, rank int, item_id string, score double, source string")
    lists = strategy_lists(discover, occasions, AS_OF, BuyAgainParams(horizon_days=7.0, min_gaps=1), 2,
                           ("buy_again",), shipped={"buy_again": chosen}).collect()
    got = {(r["user_id"], r["rank"]): (r["item_id"], r["source"], r["strategy"]) for r in lists}
    # u1's most bought: x and y once each (same day), ties by recency then id.
    assert {key: value[1] for key, value in got.items()} == {("u1", 1): "most_bought", ("u1", 2): "most_bought",
                                                             ("u2", 1): "buy_again", ("u2", 2): "buy_again"}
    assert [got[("u1", r)][0] for r in (1, 2)] == [r["item_id"] for r in most_bought_top_n(occasions, AS_OF, 2)
                                                   .where("user_id = 'u1'").orderBy("rank").collect()]
    assert {value[2] for value in got.values()} == {"buy_again"}


def test_customer_groups_count_order_days_and_name_visitors(spark):
    """u1 bought twice on one day (one_order), u2 on two days (repeat), u7 only after the moment and u8
    never (no_order, both listed by ``users``); without ``users`` only buyers are grouped."""
    rows = [("u1", "x", 3), ("u1", "y", 3), ("u2", "a", 20), ("u2", "a", 10), ("u7", "z", -2)]
    occasions = purchase_occasions(_purchases(spark, rows), ["purchase"])
    users = spark.createDataFrame([("u1",), ("u8",), ("u7",)], "user_id string")
    grouped = {r["user_id"]: r["customer_group"] for r in customer_groups(occasions, AS_OF, users).collect()}
    assert grouped == {"u1": "one_order", "u2": "repeat", "u7": "no_order", "u8": "no_order"}
    assert {r["user_id"] for r in customer_groups(occasions, AS_OF).collect()} == {"u1", "u2"}


def test_segment_popular_ships_where_it_won_validation(spark):
    """Validation chose segment_popular as the blended list of customers with no or one order: u1 (one
    order, segment 0) gets the items most of segment 0 bought, recorded as source segment_popular, and so
    does u6 (a visitor of segment 1 with no order); u2 (repeat) keeps the blend (their discovery list is
    empty here: buy-again items only). Without segments the lists cannot be made, and the error says so."""
    rows = [("u1", "x", 3)] + [("u2", "a", d) for d in (30, 20, 10)] + [("u2", "b", 2)] \
        + [("u3", "p", 5), ("u3", "q", 5), ("u4", "p", 6), ("u4", "x", 6), ("u5", "q", 4)]
    occasions = purchase_occasions(_purchases(spark, rows), ["purchase"])
    segments = spark.createDataFrame([("u1", 0), ("u3", 0), ("u4", 0), ("u2", 1), ("u5", 1), ("u6", 1)],
                                     "user_id string, segment_id int")
    discover = spark.createDataFrame([("u6", 1, "z", 1.0, "als")],
                                     "user_id string, rank int, item_id string, score double, source string")
    shipped = {"blended": {"no_order": "segment_popular", "one_order": "segment_popular", "repeat": "blended"}}
    lists = strategy_lists(discover, occasions, AS_OF, BuyAgainParams(horizon_days=7.0, min_gaps=1), 2,
                           ("blended",), shipped=shipped, segments=segments).collect()
    got = {(r["user_id"], r["rank"]): (r["item_id"], r["source"]) for r in lists
           if r["user_id"] in ("u1", "u2", "u6")}
    # Segment 0's buyers: p by u3 and u4, x by u1 and u4, q by u3: p and x (2 buyers each; ties by id).
    assert got[("u1", 1)] == ("p", "segment_popular") and got[("u1", 2)] == ("x", "segment_popular")
    # Segment 1's: a and b by u2, q by u5 (one buyer each): a and b by id.
    assert [got[("u6", r)] for r in (1, 2)] == [("a", "segment_popular"), ("b", "segment_popular")]
    assert {value[1] for key, value in got.items() if key[0] == "u2"} == {"buy_again"}
    with pytest.raises(ValueError, match="no segments were given"):
        strategy_lists(discover, occasions, AS_OF, BuyAgainParams(horizon_days=7.0, min_gaps=1), 2,
                       ("blended",), shipped=shipped)


def test_repeat_propensity_is_shrunk_to_the_global_share(spark):
    # u1: 4 occasions of one item (3 repeats); u2: 4 different items (0 repeats). Global 3 / 8.
    rows = [("u1", "a", d) for d in (40, 30, 20, 10)] + [("u2", i, 5) for i in "wxyz"]
    occasions = purchase_occasions(_purchases(spark, rows), ["purchase"])
    got = {r["user_id"]: r for r in repeat_propensity(occasions, 4.0).collect()}
    assert (got["u1"]["occasions"], got["u1"]["repeats"]) == (4, 3)
    assert got["u1"]["propensity"] == pytest.approx((3 + 4 * 3 / 8) / 8)
    assert got["u2"]["propensity"] == pytest.approx((0 + 4 * 3 / 8) / 8)
    raw = {r["user_id"]: r["propensity"] for r in repeat_propensity(occasions, 0.0).collect()}
    assert raw == {"u1": 0.75, "u2": 0.0}


def test_blend_interleaves_by_propensity_and_dedupes(spark):
    again = spark.createDataFrame([(u, f"a{r}", 1.0, r) for u in ("u1", "u2") for r in range(1, 5)],
                                  "user_id string, item_id string, score double, rank int")
    discover = spark.createDataFrame([(u, f"d{r}", 1.0, r, "als") for u in ("u1", "u2", "u3") for r in range(1, 5)]
                                     + [("u2", "a1", 1.0, 5, "als")],
                                     "user_id string, item_id string, score double, rank int, source string")
    propensity = spark.createDataFrame([("u1", 0.75), ("u2", 0.25)], "user_id string, propensity double")
    lists = blend(again, discover, propensity, 4, default_propensity=0.5).orderBy("user_id", "rank").collect()
    by_user = {}
    for row in lists:
        by_user.setdefault(row["user_id"], []).append((row["item_id"], row["source"]))
    # u1 (p = 0.75): places a: 0.67, 2, 3.33, 4.67; d: 2, 6 -> a1, a2 (tie goes to buy-again), d1, a3
    assert by_user["u1"] == [("a1", "buy_again"), ("a2", "buy_again"), ("d1", "als"), ("a3", "buy_again")]
    # u2 (p = 0.25): d at 0.67, 2, 3.33, 4.67; a at 2, 6 -> d1, a1, d2, d3 (a1 from discovery's rank 5 dropped)
    assert by_user["u2"] == [("d1", "als"), ("a1", "buy_again"), ("d2", "als"), ("d3", "als")]
    # u3 has no buy-again list: discovery only
    assert [item for item, _ in by_user["u3"]] == ["d1", "d2", "d3", "d4"]
    assert all(r["score"] > 0 for r in lists)


def test_generator_is_seeded_distributed_and_plants_intervals(spark):
    spec = RepeatSpec(users=300, items=60, days=150, segments=3, seed=5)
    events = generate_repeat_purchases(spark, spec, partitions=3).cache()
    again = generate_repeat_purchases(spark, spec, partitions=1)
    assert events.count() == again.count() > 0
    assert events.exceptAll(again).count() == 0                      # partitioning does not matter
    assert events.select("event_id").distinct().count() == events.count()
    assert {r[0] for r in events.select("event_type").distinct().collect()} == {"purchase"}
    occasions = purchase_occasions(events, ["purchase"])
    propensity = repeat_propensity(occasions, 0.0)
    stats = propensity.where("occasions >= 10").agg(F.min("propensity"), F.max("propensity"),
                                                    F.sum("repeats") / F.sum("occasions")).first()
    assert stats[0] < 0.35 and stats[1] > 0.8                        # users differ in repeat behaviour
    assert 0.3 < stats[2] < 0.85
    # The median gap of well-observed items recovers the planted interval.
    planted = spark.range(spec.items).select(F.format_string("i%05d", "id").alias("item_id"),
                                             item_interval_days(spec, F.col("id")).alias("planted"))
    observed = item_intervals(occasions, 30).where("n_gaps >= 30").join(planted, "item_id").cache()
    close = observed.where(F.abs(F.col("interval_days") / F.col("planted") - 1) < 0.15).count()
    assert observed.count() >= 10 and close / observed.count() > 0.7
    events.unpersist()


@pytest.mark.slow
def test_strategies_beat_their_trivial_baselines_on_repeat_purchases(spark):
    """Buy again beats "your most bought items", blended beats both it and popularity on all next
    purchases, and discovery beats popularity on new items."""
    events = generate_repeat_purchases(spark, RepeatSpec(users=700, items=150, days=180, max_staples=12,
                                                         explore_mean=10, seed=3)).cache()
    settings = EvaluationSettings({"purchase": 8.0}, 30.0, ["purchase"], [10], 10,
                                  strategies=("discover", "buy_again", "blended"),
                                  buy_again=BuyAgainParams(horizon_days=28.0))
    report = evaluate_offline(events, settings, [AlsParams(16, 0.1, 10.0, max_iter=8, num_blocks=2)])
    ndcg = {model: report.value(model, 10, "ndcg")
            for model in ("buy_again", "most_bought", "blended", "popular_all", "discover", "popular_new")}
    print("NDCG@10", {k: round(v, 4) for k, v in ndcg.items()}, report.notes)
    assert ndcg["buy_again"] > ndcg["most_bought"]
    assert ndcg["blended"] > ndcg["most_bought"] and ndcg["blended"] > ndcg["popular_all"]
    assert ndcg["discover"] > ndcg["popular_new"]
    assert report.value("blended", 10, "users") == report.value("most_bought", 10, "users") > 500
    assert report.value("discover", 10, "users") == report.value("popular_new", 10, "users") > 100
    events.unpersist()
