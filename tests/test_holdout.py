"""Holdout and control groups: stable, the configured shares within sampling error, independent
between campaigns and of the global control, recomputable outside Spark."""
from __future__ import annotations

import math

import pytest
from pyspark.sql import functions as F
from scipy.stats import chi2_contingency

from lib.campaign.holdout import (GLOBAL_KEY, ab_key, assign_test_variant, assign_variant, bucket_col, bucket_of,
                                  holdout_assignments)

SALT = "test-salt"
N = 20_000


@pytest.fixture(scope="module")
def users(spark):
    return spark.range(N).select(F.format_string("cust-%06d", "id").alias("user_id")).cache()


def _within(count: int, n: int, share: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * share) <= sigmas * math.sqrt(n * share * (1 - share))


def test_assignments_are_stable_across_runs_order_and_duplicates(spark, users):
    campaigns = {"spring": 0.1, "winback": 0.2}
    first = holdout_assignments(users, campaigns, SALT, 0.05, "run-1").drop("run_id")
    shuffled = users.unionByName(users.limit(500)).repartition(7, F.rand(3))
    again = holdout_assignments(shuffled, campaigns, SALT, 0.05, "run-2").drop("run_id")
    assert first.count() == 2 * N
    assert first.exceptAll(again).count() == 0 and again.exceptAll(first).count() == 0
    # Another salt reshuffles: the two control groups overlap only by chance (about 5% of 5%).
    other = holdout_assignments(users, campaigns, "another-salt", 0.05, "run-3")
    both = (first.where("variant = 'global_control' and campaign_id = 'spring'").select("user_id")
            .intersect(other.where("variant = 'global_control' and campaign_id = 'spring'").select("user_id")).count())
    assert both < 0.05 * 0.05 * N * 3
    # The same bucket in plain Python.
    sample = first.where("campaign_id = 'winback'").orderBy("user_id").limit(50).collect()
    assert all(row["control_bucket"] == bucket_of(row["user_id"], GLOBAL_KEY, SALT) and
               row["campaign_bucket"] == bucket_of(row["user_id"], "winback", SALT) for row in sample)


def test_shares_are_within_sampling_error_and_control_is_never_mailed(users):
    campaigns = {"spring": 0.1, "winback": 0.2}
    rows = holdout_assignments(users, campaigns, SALT, 0.05, "run-1")
    counts = {(r["campaign_id"], r["variant"]): r["n"]
              for r in rows.groupBy("campaign_id", "variant").agg(F.count(F.lit(1)).alias("n")).collect()}
    control = counts[("spring", "global_control")]
    assert control == counts[("winback", "global_control")]  # one control group for every campaign
    assert _within(control, N, 0.05)
    for campaign, share in campaigns.items():
        assert _within(counts[(campaign, "holdout")], N - control, share)
        assert counts[(campaign, "treatment")] + counts[(campaign, "holdout")] + control == N
    # Control users are control in every campaign.
    per_user = rows.groupBy("user_id").agg(F.collect_set("variant").alias("v"))
    assert per_user.where(F.array_contains("v", "global_control") & (F.size("v") > 1)).count() == 0


def test_two_campaigns_holdouts_are_independent(users):
    both = users.select(
        (assign_variant("user_id", "spring", SALT, 0.3, 0.0) == "holdout").cast("int").alias("a"),
        (assign_variant("user_id", "winback", SALT, 0.3, 0.0) == "holdout").cast("int").alias("b"),
        (bucket_col("user_id", GLOBAL_KEY, SALT) < 3000).cast("int").alias("g"))
    table = {(r["a"], r["b"]): r["n"] for r in both.groupBy("a", "b").agg(F.count(F.lit(1)).alias("n")).collect()}
    _, p_value, _, _ = chi2_contingency([[table[(0, 0)], table[(0, 1)]], [table[(1, 0)], table[(1, 1)]]])
    assert p_value > 0.001
    with_global = {(r["a"], r["g"]): r["n"] for r in both.groupBy("a", "g").agg(F.count(F.lit(1)).alias("n")).collect()}
    _, p_global, _, _ = chi2_contingency([[with_global[(0, 0)], with_global[(0, 1)]],
                                          [with_global[(1, 0)], with_global[(1, 1)]]])
    assert p_global > 0.001
    # The test can fail: the same campaign twice is perfectly dependent.
    same = users.select((assign_variant("user_id", "spring", SALT, 0.3, 0.0) == "holdout").cast("int").alias("a"),
                        (assign_variant("user_id", "spring", SALT, 0.3, 0.0) == "holdout").cast("int").alias("b"))
    t = {(r["a"], r["b"]): r["n"] for r in same.groupBy("a", "b").agg(F.count(F.lit(1)).alias("n")).collect()}
    _, p_same, _, _ = chi2_contingency([[t.get((0, 0), 0), t.get((0, 1), 0)], [t.get((1, 0), 0), t.get((1, 1), 0)]])
    assert p_same < 1e-10


def test_bad_shares_and_reserved_ids_are_refused(users):
    with pytest.raises(ValueError, match="holdout_share"):
        assign_variant("user_id", "spring", SALT, 1.2, 0.05)
    with pytest.raises(ValueError, match="reserved"):
        holdout_assignments(users, {GLOBAL_KEY: 0.1}, SALT, 0.05, "r")


def test_without_campaigns_every_user_has_one_global_row(spark):
    users = spark.createDataFrame([(f"c{i}",) for i in range(40)], "user_id string")
    rows = holdout_assignments(users, {}, SALT, 0.2, "r").collect()
    assert sorted(r["user_id"] for r in rows) == sorted(f"c{i}" for i in range(40))
    assert {r["campaign_id"] for r in rows} == {GLOBAL_KEY}
    for r in rows:
        control = bucket_of(r["user_id"], GLOBAL_KEY, SALT) < 2000
        assert r["variant"] == ("global_control" if control else "treatment"), r


def test_an_ab_split_is_stable_recomputable_and_independent_of_the_holdout(users):
    shares = [("a", 0.5), ("b", 0.3), ("c", 0.2)]
    rows = users.select("user_id", assign_variant("user_id", "spring", SALT, 0.3, 0.0).alias("variant"),
                        assign_test_variant("user_id", "spring", SALT, shares).alias("arm")).collect()
    cut = lambda bucket: "a" if bucket < 5000 else "b" if bucket < 8000 else "c"  # noqa: E731
    assert all(r["arm"] == cut(bucket_of(r["user_id"], ab_key("spring"), SALT)) for r in rows)  # outside Spark too
    for arm, share in shares:
        assert _within(sum(r["arm"] == arm for r in rows), N, share), arm
    table = [[sum(r["variant"] == v and r["arm"] == arm for r in rows) for arm, _ in shares]
             for v in ("treatment", "holdout")]
    assert chi2_contingency(table)[1] > 0.001  # the arm says nothing of the holdout split
    # The check can fail: an arm cut from the holdout's own buckets is fully dependent on it.
    dependent = [[sum(r["variant"] == v and (bucket_of(r["user_id"], "spring", SALT) < 3000) == flag for r in rows)
                  for flag in (True, False)] for v in ("treatment", "holdout")]
    assert chi2_contingency(dependent)[1] < 1e-6
