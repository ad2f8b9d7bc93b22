"""Customer scores: no leakage past as_of, planted churners recovered above the recency baseline,
eligibility instead of fake scores, one as_of replaced on re-run, config errors naming the key."""
from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta

import pytest
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.sql import functions as F

from jobs.common import BASE_CONFIG, load_settings, run_stage
from lib.features.customers import customer_features, feature_names, labels
from lib.platform import catalog as C
from lib.platform.config import ConfigError, parse_toml
from lib.platform.settings import ScoresSettings
from lib.sample.planted import SampleSpec, generate_events, planted_users
from lib.scores.report import write_score_report
from lib.scores.scoring import finalize_scores, informative_features, score_customers, segment_outcomes

SPEC = SampleSpec(users=400, items=60, events=60_000, segments=3, seed=5, churn_fraction=0.3, email_campaigns=True)
START = date.fromisoformat(SPEC.end_date) - timedelta(days=SPEC.days)
AS_OF = START + timedelta(days=65)   # churners churn on days 22..67: most already gone, some about to go
HORIZON = 14
WINDOWS = (7, 30, 90)


@pytest.fixture(scope="module")
def events(spark):
    df = generate_events(spark, SPEC, partitions=2).cache()
    yield df
    df.unpersist()


def _settings(**overrides) -> ScoresSettings:
    """conf/base.toml's [scores] defaults, a 14-day horizon, smaller GBTs, then ``overrides``."""
    section = parse_toml(BASE_CONFIG.read_text(), "base")["scores"]
    values = {**section, "horizon_days": HORIZON, "gbt_max_iter": 15, **overrides}
    return ScoresSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _same(left, right) -> bool:
    return left.exceptAll(right).count() == 0 and right.exceptAll(left).count() == 0


def _rewritten_after_as_of(spark, events):
    """``events`` with every event after the end of AS_OF rewritten: another item, type, time and revenue,
    each one twice (new ids), plus email opens of known users and of a newcomer."""
    end = F.lit(f"{AS_OF + timedelta(days=1)} 00:00:00").cast("timestamp")
    later = F.col("event_ts") >= end
    rewritten = events.select(
        "event_id", "user_id", F.when(later, F.lit("i_rewritten")).otherwise(F.col("item_id")).alias("item_id"),
        F.when(later, F.lit("purchase")).otherwise(F.col("event_type")).alias("event_type"),
        F.when(later, F.col("event_ts") + F.expr("INTERVAL 3 HOURS")).otherwise(F.col("event_ts")).alias("event_ts"),
        "quantity", F.when(later, F.lit(1000.0)).otherwise(F.col("revenue")).alias("revenue"),
        "campaign_id", "channel")
    copies = (rewritten.where(F.col("event_ts") >= end)
              .select(F.concat("event_id", F.lit("-copy")).alias("event_id"), "user_id", "item_id",
                      F.lit("add_to_cart").alias("event_type"), "event_ts", "quantity", "revenue",
                      "campaign_id", "channel"))
    extra = spark.createDataFrame(
        [(f"x{i}", f"u{i % 50:07d}" if i % 2 else "newcomer", "i000001", "email_open", None, None, None, None, None)
         for i in range(40)],
        "event_id string, user_id string, item_id string, event_type string, event_ts timestamp, quantity double, "
        "revenue double, campaign_id string, channel string").withColumn("event_ts", end + F.expr("INTERVAL 2 DAYS"))
    return rewritten.unionByName(copies).unionByName(extra)


def test_feature_counts_of_one_customer_exactly(spark):
    end = datetime.combine(AS_OF + timedelta(days=1), time.min)   # the first instant after AS_OF (UTC)
    rows = [("view", 0.5, None), ("click", 0.7, None), ("purchase", 3.2, 20.0), ("view", 10.1, None),
            ("add_to_cart", 40.0, None), ("email_send", 1.0, None), ("email_open", 1.5, None),
            ("view", -2.0, None)]   # after AS_OF: never seen
    events = spark.createDataFrame(
        [(f"e{n}", "u1", "i1", kind, end - timedelta(days=age), revenue) for n, (kind, age, revenue) in enumerate(rows)],
        "event_id string, user_id string, item_id string, event_type string, event_ts timestamp_ntz, revenue double",
    ).withColumn("event_ts", F.to_utc_timestamp("event_ts", "UTC"))
    row = customer_features(events, AS_OF, WINDOWS).first().asDict()
    assert {w: row[f"active_days_{w}d"] for w in WINDOWS} == {7: 2.0, 30: 3.0, 90: 4.0}   # days 0, 3, 10, 40
    assert {w: row[f"site_events_{w}d"] for w in WINDOWS} == {7: 3.0, 30: 4.0, 90: 5.0}
    assert (row["purchases_30d"], row["revenue_30d"], row["sends_7d"], row["opens_7d"]) == (1.0, 20.0, 1.0, 1.0)
    assert row["site_recency_days"] == pytest.approx(0.5) and row["tenure_days"] == pytest.approx(40.0)
    assert row["log_site_recency_days"] == pytest.approx(math.log1p(0.5))
    assert row["log_purchase_recency_days"] == pytest.approx(math.log1p(3.2))
    assert row["open_rate_7d"] == pytest.approx((1 + 0.3) / (1 + 1.0))


def test_features_constant_on_the_training_window_are_left_out(spark):
    # p_alive of a purchase model that sees no dropout is 1 - 1e-9 for everyone: standardised, the
    # next window's 0.99 would become a huge input and saturate every probability (ROC-AUC 0.5).
    rows = [(float(n), 1.0 - 1e-9 * (n % 2), 5.0, 1e3 + (n % 2)) for n in range(6)]
    train = spark.createDataFrame(rows, "varying double, p_alive double, constant double, revenue double")
    assert informative_features(train, ["varying", "p_alive", "constant", "revenue"]) == ["varying", "revenue"]


def test_features_do_not_change_when_every_later_event_is_rewritten(spark, events):
    rewritten = _rewritten_after_as_of(spark, events)
    # The rewrite does change what happens after as_of ...
    assert not _same(labels(events, AS_OF, HORIZON), labels(rewritten, AS_OF, HORIZON))
    # ... and nothing the features see.
    before = customer_features(events, AS_OF, WINDOWS)
    after = customer_features(rewritten, AS_OF, WINDOWS)
    assert before.columns == ["user_id", *feature_names(WINDOWS)]
    assert _same(before, after)
    assert before.where(" or ".join(f"{c} is null" for c in before.columns)).count() == 0


@pytest.mark.slow
def test_scores_do_not_change_when_every_later_event_is_rewritten(spark, events):
    """The whole scoring (features, the time-based training and validation windows, the model, its
    calibration, expected revenue, engagement, bands and percentiles) for AS_OF ignores every later event."""
    settings = _settings(models=("logistic_regression",))  # one candidate: the guard is about the data, not the model
    # The same physical layout for both inputs (partitions by user, each user's events in time order, the
    # later ones last): the model fits then sum the same numbers in the same order, so the scores must agree
    # to the last bits unless a later event reaches them. (Laid out differently, MLlib's distributed sums
    # alone move a probability by ~1e-10.)
    laid_out = [frame.repartition(2, "user_id").sortWithinPartitions("user_id", "event_ts", "event_id").cache()
                for frame in (events, _rewritten_after_as_of(spark, events))]
    runs = []
    for frame in laid_out:
        outcome = score_customers(frame, AS_OF, settings)
        assert outcome.eligible and outcome.reason == ""
        rows = finalize_scores(outcome.scores, AS_OF, settings, "v", "run").collect()
        runs.append(({r["user_id"]: r for r in rows}, outcome))
    (before, first), (after, second) = runs
    assert set(after) == set(before) and "newcomer" not in after
    assert sum(r["eligible"] for r in before.values()) > 100
    for user, row in before.items():
        other = after[user]
        assert (other["eligible"], other["reason_code"], other["churn_band"]) == \
            (row["eligible"], row["reason_code"], row["churn_band"]), user
        for column in ("churn_probability", "purchase_probability", "expected_revenue", "engagement_score",
                       "churn_percentile"):
            if row[column] is None:
                assert other[column] is None, (user, column)
            else:
                assert other[column] == pytest.approx(row[column], rel=0, abs=1e-12), (user, column)
    assert first.chosen == second.chosen and first.counts == second.counts
    assert [m[:4] for m in first.metrics] == [m[:4] for m in second.metrics]
    assert [m[4] for m in second.metrics] == pytest.approx([m[4] for m in first.metrics], rel=0, abs=1e-12)
    for frame in laid_out:
        frame.unpersist()


@pytest.mark.slow
def test_planted_churners_are_recovered_above_the_recency_baseline(spark, events):
    settings = _settings()
    outcome = score_customers(events, AS_OF, settings)
    assert outcome.eligible and outcome.reason == ""
    metrics = {(t, m, metric): v for t, m, metric, b, v in outcome.metrics if b is None}
    chosen = f"{outcome.chosen['churn']}+isotonic"
    assert metrics[("churn", chosen, "beats_baseline")] == 1.0
    base_rate = metrics[("churn", chosen, "base_rate")]
    assert metrics[("churn", chosen, "brier")] < base_rate * (1 - base_rate)  # better than a constant
    reliability = [(b, v) for t, m, metric, b, v in outcome.metrics
                   if t == "churn" and m == chosen and metric == "reliability_users"]
    assert sum(v for _, v in reliability) == metrics[("churn", chosen, "n")]

    scores = finalize_scores(outcome.scores, AS_OF, settings, "test", "run-t").cache()
    assert scores.where("eligible and (churn_probability < 0 or churn_probability > 1 or churn_band is null "
                        "or churn_percentile not between 0 and 100 or purchase_probability is null "
                        "or expected_revenue < 0)").count() == 0
    # Truth: a planted churner who is gone by the end of the horizon.
    truth = planted_users(spark, SPEC).select(
        "user_id", (F.col("churner") & (F.col("churn_date") <= F.lit(AS_OF + timedelta(days=HORIZON))))
        .cast("double").alias("y"))
    recency = customer_features(events, AS_OF, WINDOWS).select("user_id", "site_recency_days")
    scored = scores.where("eligible").join(truth, "user_id").join(recency, "user_id").cache()

    def auc(df, column):
        return BinaryClassificationEvaluator(rawPredictionCol=column, labelCol="y").evaluate(df)

    model, baseline = auc(scored, "churn_probability"), auc(scored, "site_recency_days")
    # Customers seen in the last week look alike to the recency rule; their email opens tell.
    recent = scored.where("site_recency_days < 7")
    recent_model, recent_baseline = auc(recent, "churn_probability"), auc(recent, "site_recency_days")
    print(f"planted churners: ROC-AUC {model:.3f} vs recency {baseline:.3f}; seen last week "
          f"{recent_model:.3f} vs {recent_baseline:.3f}")
    assert model >= 0.80
    assert model >= baseline + 0.02
    assert recent_model >= recent_baseline + 0.08
    bands = {r["churn_band"]: r["p"] for r in scored.groupBy("churn_band").agg(F.avg("y").alias("p")).collect()}
    assert bands["high"] > bands["low"]
    scored.unpersist()
    scores.unpersist()


def test_too_short_a_history_gives_ineligible_rows_without_scores(spark, events):
    tiny = events.where(F.col("event_ts") < F.lit(f"{START + timedelta(days=20)}").cast("timestamp"))
    outcome = score_customers(tiny, START + timedelta(days=19), _settings())
    assert not outcome.eligible and outcome.reason == "insufficient_history"
    assert outcome.metrics == []
    rows = finalize_scores(outcome.scores, START + timedelta(days=19), _settings(), "none", "r")
    assert rows.count() == tiny.select("user_id").distinct().count()
    assert rows.where("eligible or reason_code != 'insufficient_history' or churn_probability is not null "
                      "or purchase_probability is not null or churn_band is not null").count() == 0


def test_a_clickstream_without_email_events_is_scored_with_no_engagement(spark, events):
    """Source presets (RetailRocket, REES46, invoice lines) carry no email events: no sends anywhere
    must give a null engagement_score, not a division by zero (ANSI mode)."""
    site_only = events.where(~F.col("event_type").startswith("email_")
                             & (F.col("event_ts") < F.lit(f"{START + timedelta(days=20)}").cast("timestamp")))
    outcome = score_customers(site_only, START + timedelta(days=19), _settings())
    assert outcome.reason == "insufficient_history"
    assert outcome.scores.count() == site_only.select("user_id").distinct().count() > 0
    assert outcome.scores.where("engagement_score is not null").count() == 0


def test_too_few_positives_in_a_label_window_gives_ineligible_rows(events):
    outcome = score_customers(events, AS_OF, _settings(min_positives=500))
    assert outcome.reason == "too_few_positives"
    assert 0 < outcome.counts["train_churn_positives"] < 500
    assert outcome.scores.where("eligible or churn_probability is not null").count() == 0


@pytest.mark.slow  # a whole stage or model fit: over 9 s
def test_stage_replaces_its_as_of_and_records_the_reason(spark, events, context, tmp_path):
    root = tmp_path / "wh"
    ctx = context(f"output.root={root}", f"scores.as_of={START + timedelta(days=10)}")
    short = events.where(F.col("event_ts") < F.lit(f"{START + timedelta(days=12)}").cast("timestamp"))
    ctx.tables.overwrite(short.withColumn("event_date", F.to_date("event_ts"))
                         .withColumn("ingest_run_id", F.lit("i")), C.EVENTS)
    run_stage(ctx, "score_customers")
    first = ctx.tables.read(spark, C.CUSTOMER_SCORES).count()
    run_stage(context(f"output.root={root}", f"scores.as_of={START + timedelta(days=10)}", run_id="run-2"),
              "score_customers")
    scores = ctx.tables.read(spark, C.CUSTOMER_SCORES)
    assert scores.count() == first > 0  # the same as_of was replaced, not appended
    assert {r["run_id"] for r in scores.select("run_id").distinct().collect()} == {"run-2"}
    run_stage(context(f"output.root={root}", f"scores.as_of={START + timedelta(days=11)}", run_id="run-3"),
              "score_customers")
    assert ctx.tables.read(spark, C.CUSTOMER_SCORES).groupBy("as_of").count().count() == 2
    record = ctx.tables.read(spark, C.PIPELINE_RUNS).where("run_id = 'run-2'").first()
    assert record["status"] == "success" and "insufficient_history" in record["message"]
    assert record["counts"]["reason.insufficient_history"] == first
    assert record["counts"]["eligible"] == 0


def test_segment_outcomes_average_the_eligible_customers_of_each_segment(spark, tmp_path):
    scores = spark.createDataFrame(
        [("a", True, 0.2, 0.6, 10.0, 100.0, 0.5), ("b", True, 0.4, 0.2, 30.0, 300.0, 0.1),
         ("c", False, None, None, None, None, None), ("d", True, 0.9, 0.1, 0.0, 20.0, 0.0),
         ("e", True, 0.5, 0.5, 5.0, 50.0, 0.5)],
        "user_id string, eligible boolean, churn_probability double, purchase_probability double, "
        "expected_revenue double, historic_clv double, engagement_score double")
    segments = spark.createDataFrame([("a", 0), ("b", 0), ("c", 0), ("d", 1), ("x", 2)],
                                     "user_id string, segment_id int")
    rows = [row.asDict() for row in segment_outcomes(scores, segments).collect()]
    # e has no segment, x no score; c counts as a customer but not in the means.
    assert [(r["segment_id"], r["customers"], r["eligible"]) for r in rows] == [(0, 3, 2), (1, 1, 1)]
    assert rows[0]["churn_probability"] == pytest.approx(0.3) and rows[0]["historic_clv"] == pytest.approx(200.0)
    assert rows[1]["churn_probability"] == pytest.approx(0.9) and rows[1]["engagement_score"] == 0.0
    path = write_score_report(tmp_path, "r", "2026-01-01", [], {"churn": "logistic_regression"}, "platt",
                              segments=rows)
    assert "| 0 | 3 | 2 | 0.300 | 0.400 | 20.000 | 200.000 | 0.300 |" in path.read_text()


@pytest.mark.parametrize("key, value, named", [
    ("scores.horizon_days", "0", "scores.horizon_days"),
    ("scores.churn_band_high", "0.2", "scores.churn_band_high"),
    ("scores.churn_band_medium", "1.5", "scores.churn_band_medium"),
    ("scores.windows_days", "7,0", "scores.windows_days"),
    ("scores.models", "logistic_regression,svm", "scores.models"),
    ("scores.calibration", "magic", "scores.calibration"),
    ("scores.churn_definition", "no_email", "scores.churn_definition"),
    ("scores.purchase_model_max_rows", "5", "scores.purchase_model_max_rows"),
    ("send_time.quiet_hours", ",".join(str(h) for h in range(24)), "send_time.quiet_hours"),
    ("send_time.time_zone", "Mars/Olympus", "send_time.time_zone"),
    ("campaigns.winback.holdout_share", "1.0", "campaigns.winback.holdout_share"),
    ("holdout.control_share", "1.0", "holdout.control_share"),
])
def test_bad_config_is_named(key, value, named):
    with pytest.raises(ConfigError, match=f"'{named}'"):
        load_settings([], [f"{key}={value}"])
