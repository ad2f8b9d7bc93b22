"""Lift read-out (campaign_report): interval arithmetic, and a planted campaign whose known lift the
stage recovers within its 95% interval."""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from jobs.common import run_stage
from lib.campaign.holdout import assign_test_variant, assign_variant, bucket_col
from lib.campaign.ab_test import proportion_diff_ci
from lib.campaign.lift import ab_test_results, mean_diff_ci, relative_lift_ci, variant_totals
from lib.platform import catalog as C
from lib.sample.campaign import planted_campaign_events, sample_campaign_events

SEND = datetime(2026, 10, 20, 9, tzinfo=timezone.utc)


def test_interval_arithmetic():
    diff, low, high = proportion_diff_ci(150, 1000, 100, 1000)
    se = math.sqrt(0.15 * 0.85 / 1000 + 0.1 * 0.9 / 1000)
    assert diff == pytest.approx(0.05) and (low, high) == pytest.approx((0.05 - 1.96 * se, 0.05 + 1.96 * se), abs=1e-4)
    rel, rlow, rhigh = relative_lift_ci(150, 1000, 100, 1000)
    assert rel == pytest.approx(0.5) and rlow < 0.5 < rhigh and (1 + rlow) * (1 + rhigh) == pytest.approx(1.5 ** 2)
    assert all(math.isnan(v) for v in relative_lift_ci(3, 100, 0, 100))
    rng = np.random.default_rng(1)
    a, b = rng.exponential(3.0, 400), rng.exponential(2.0, 300)
    mean, low, high = mean_diff_ci(a.sum(), (a * a).sum(), len(a), b.sum(), (b * b).sum(), len(b))
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert mean == pytest.approx(a.mean() - b.mean())
    assert (low, high) == pytest.approx((mean - 1.959964 * se, mean + 1.959964 * se))


def _events(ctx, frame):
    rows = frame.select("*", F.to_date("event_ts").alias("event_date"), F.lit("t").alias("ingest_run_id"))
    ctx.tables.overwrite(rows, C.EVENTS)


@pytest.mark.slow
def test_planted_lift_is_recovered_within_its_interval(spark, tmp_path: Path, context):
    users = spark.range(6000).select(F.format_string("u%05d", "id").alias("user_id"))
    ctx = context(f"output.root={tmp_path / 'wh'}", "holdout.control_share=0.05",
                  "campaigns.weekly_newsletter.holdout_share=0.3", "campaign_report.conversion_window_days=7",
                  f"campaign_report.report_dir={tmp_path / 'report'}",
                  # winback wants everyone too (unscored here) and sends nothing: named in the message
                  "campaigns.winback.churn_bands=[]", "contact_policy.arbitration=none", run_id="lift")
    planted = planted_campaign_events(users, "weekly_newsletter", salt=ctx.settings.holdout.salt, control_share=0.05,
                                      holdout_share=0.3, send_ts=SEND, base_rate=0.05, lift=0.10, window_days=7)
    # Purchases outside the window (before the send, after it closes) must not count.
    outside = users.where(F.col("user_id") < "u03000").select(
        F.concat("user_id", F.lit("-old")).alias("event_id"), "user_id", F.lit("i1").alias("item_id"),
        F.lit("purchase").alias("event_type"),
        F.when(F.col("user_id") < "u01500", F.lit(SEND - timedelta(days=2)))
        .otherwise(F.lit(SEND + timedelta(days=7, hours=1))).alias("event_ts"),
        F.lit(1.0).alias("quantity"), F.lit(99.0).alias("revenue"), F.lit(None).cast("string").alias("campaign_id"),
        F.lit("web").alias("channel"))
    _events(ctx, planted.unionByName(outside))
    ctx.tables.overwrite(users.select("user_id", F.lit(1).alias("rank"), F.lit("i1").alias("item_id"),
                                      F.lit(1.0).alias("score"), F.lit("popular").alias("source"),
                                      F.lit("r0").alias("run_id"), F.lit("blended").alias("strategy")),
                          C.RECOMMENDATIONS)
    run_stage(ctx, "build_audience")
    result = run_stage(ctx, "campaign_report")

    rows = {(r["campaign_id"], r["variant"]): r for r in ctx.tables.read(spark, C.CAMPAIGN_RESULTS).collect()}
    assert set(rows) == {("weekly_newsletter", v) for v in ("treatment", "holdout", "global_control")}
    treated, held = rows[("weekly_newsletter", "treatment")], rows[("weekly_newsletter", "holdout")]
    assert treated["ci_low"] <= 0.10 <= treated["ci_high"] and treated["ci_low"] > 0
    assert treated["ci_high"] - treated["ci_low"] < 0.06
    assert held["lift"] is None and rows[("weekly_newsletter", "global_control")]["conversions"] == 0
    # Every count equals a direct count of the planted events.
    audience = ctx.tables.read(spark, C.CAMPAIGN_AUDIENCE).where("campaign_id = 'weekly_newsletter'")
    variant = {r["user_id"]: r["variant"] for r in audience.collect()}
    bought = [r["user_id"] for r in planted.where("event_type = 'purchase'").collect()]
    sent = [r["user_id"] for r in planted.where("event_type = 'email_send'").collect()]
    for name, row in (("treatment", treated), ("holdout", held)):
        assert row["recipients"] == sum(v == name for v in variant.values())
        assert row["conversions"] == sum(variant[u] == name for u in bought)
        assert row["revenue"] == pytest.approx(25.0 * row["conversions"])
    assert treated["sent"] == len(sent) == treated["recipients"] and held["sent"] == 0
    assert treated["relative_ci_low"] < treated["relative_lift"] < treated["relative_ci_high"]
    assert treated["revenue_ci_low"] <= 2.5 <= treated["revenue_ci_high"]  # 0.10 x 25.0 per recipient
    assert "winback: no email_send events carry this campaign_id" in result.message
    report = (tmp_path / "report" / "campaigns.md").read_text()
    assert "| weekly_newsletter | treatment |" in report and (tmp_path / "report" / "lift.png").stat().st_size > 0


def test_test_variants_sum_to_their_variant_and_read_out_against_the_control():
    start = datetime(2026, 10, 20, 9)
    outcome = lambda variant, arm, n, c: {"campaign_id": "spring", "variant": variant, "test_variant": arm,  # noqa: E731
                                          "send_start": start, "recipients": n, "sent": n if variant == "treatment"
                                          else 0, "conversions": c, "revenue": 10.0 * c, "revenue_sq": 100.0 * c}
    outcomes = [outcome("holdout", None, 100, 4), outcome("treatment", "a", 400, 20), outcome("treatment", "b", 300, 24),
                outcome("winback_only", None, 1, 0) | {"campaign_id": "winback", "variant": "treatment"}]
    totals = {(r["campaign_id"], r["variant"]): r for r in variant_totals(outcomes)}
    assert (totals[("spring", "treatment")]["recipients"], totals[("spring", "treatment")]["conversions"]) == (700, 44)
    assert totals[("spring", "treatment")]["revenue"] == 440.0 and len(totals) == 3
    rows, notes = ab_test_results(outcomes, {"spring": "a"}, 7, "r1")
    assert [(r["test_variant"], r["control"], r["recipients"], r["conversions"]) for r in rows] == [
        ("a", True, 400, 20), ("b", False, 300, 24)]
    assert rows[1]["difference"] == pytest.approx(0.08 - 0.05) and rows[1]["revenue_per_recipient"] == 0.8
    assert notes == []
    rows, notes = ab_test_results(outcomes, {}, 7, "r1")  # a test in the audience, none configured now
    assert rows == [] and notes == ["spring: test variants a, b in the audience, control (none configured): "
                                    "no A/B read-out"]


@pytest.mark.slow  # campaign_report on 24,000 customers
def test_a_planted_ab_winner_is_found_with_its_interval(spark, tmp_path: Path, context):
    salt, planted = "ab-test-salt", {"a": 0.05, "b": 0.08, "c": 0.05}  # b wins by 0.03; c ties the control a
    arms = [("a", 0.4), ("b", 0.3), ("c", 0.3)]
    ctx = context(f"output.root={tmp_path / 'wh'}", f"holdout.salt={salt}", "holdout.control_share=0.0",
                  "campaigns.spring.holdout_share=0.1", f"campaign_report.report_dir={tmp_path / 'report'}",
                  *[f"ab_variants.{arm}.{key}={value}" for arm, share in arms
                    for key, value in (("campaign", "spring"), ("share", share))], run_id="ab")
    people = spark.range(24_000).select(F.format_string("u%05d", "id").alias("user_id")).select(
        "user_id", assign_variant("user_id", "spring", salt, 0.1, 0.0).alias("variant"))
    people = people.withColumn("test_variant", F.when(F.col("variant") == "treatment",
                                                      assign_test_variant("user_id", "spring", salt, arms)))
    audience = people.select(F.lit("spring").alias("campaign_id"), "*", F.lit("ab").alias("run_id"))
    ctx.tables.overwrite(audience.select(*[c if c in audience.columns else F.lit(None).alias(c)
                                           for c in C.CAMPAIGN_AUDIENCE.columns]), C.CAMPAIGN_AUDIENCE)
    rate = F.coalesce(*[F.when(F.col("test_variant") == arm, F.lit(p)) for arm, p in planted.items()], F.lit(0.04))
    buys = people.where(bucket_col("user_id", "buys", salt) < rate * 10_000)
    event = lambda frame, kind, ts, campaign: frame.select(  # noqa: E731
        F.concat("user_id", F.lit(f"-{kind}")).alias("event_id"), "user_id", F.lit("i1").alias("item_id"),
        F.lit(kind).alias("event_type"), F.lit(ts).alias("event_ts"), F.lit(1.0).alias("quantity"),
        F.lit(10.0 if kind == "purchase" else None).cast("double").alias("revenue"),
        F.lit(campaign).cast("string").alias("campaign_id"), F.lit("email").alias("channel"))
    _events(ctx, event(people.where("variant = 'treatment'"), "email_send", SEND, "spring")
            .unionByName(event(buys, "purchase", SEND + timedelta(days=1), None)))
    result = run_stage(ctx, "campaign_report")

    rows = {r["test_variant"]: r for r in ctx.tables.read(spark, C.CAMPAIGN_TESTS).collect()}
    assert sorted(rows) == ["a", "b", "c"] and rows["a"]["control"] and rows["a"]["difference"] is None
    bought = {(r["test_variant"]): r["n"] for r in buys.groupBy("test_variant").agg(F.count(F.lit(1)).alias("n"))
              .collect()}
    assert all(rows[arm]["conversions"] == bought[arm] for arm in rows)  # a direct count of the planted buys
    assert max(rows, key=lambda arm: rows[arm]["probability_best"]) == "b" and rows["b"]["probability_best"] > 0.99
    assert rows["b"]["difference_low"] <= 0.03 <= rows["b"]["difference_high"] and rows["b"]["difference_low"] > 0
    assert rows["c"]["difference_low"] <= 0.0 <= rows["c"]["difference_high"]
    assert "spring test: b +0.0" in result.message and result.counts["spring.test.b.conversions"] == bought["b"]
    report = (tmp_path / "report" / "campaigns.md").read_text()
    assert "## A/B/n tests" in report and (tmp_path / "report" / "tests.png").stat().st_size > 0


def test_sample_campaign_is_the_first_enabled_one_inside_the_sample(spark, context):
    ctx = context("sample.end_date=2026-10-31", "campaign_report.conversion_window_days=7")
    users = spark.range(2000).select(F.format_string("u%07d", "id").alias("user_id"))
    events = sample_campaign_events(users, ctx.settings)
    sends = events.where("event_type = 'email_send'")
    assert {r[0] for r in sends.select("campaign_id").distinct().collect()} == {"weekly_newsletter"}
    bounds = events.agg(F.min("event_ts"), F.max("event_ts")).first()
    assert bounds[0] == datetime(2026, 10, 23, 9) and bounds[1] < datetime(2026, 10, 30, 9)
    assert 0 < events.where("event_type = 'purchase'").count() < 2000 * 0.2
