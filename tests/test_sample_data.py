from pyspark.sql import functions as F

from lib.sample_data import SampleSpec, generate_events, planted_segment_items, planted_user_segments

SPEC = SampleSpec(users=300, items=60, events=120_000, segments=3, seed=11)


def test_generation_is_deterministic_and_independent_of_partitioning(spark):
    one = generate_events(spark, SPEC, partitions=1)
    two = generate_events(spark, SPEC, partitions=2)
    assert one.count() == SPEC.events
    assert one.exceptAll(two).count() == 0 and two.exceptAll(one).count() == 0
    assert one.select("event_id").distinct().count() == SPEC.events


def test_funnel_time_range_and_planted_preferences(spark):
    events = generate_events(spark, SPEC)
    counts = {r["event_type"]: r["count"] for r in events.groupBy("event_type").count().collect()}
    assert counts["view"] > 3 * counts["click"] > 0
    assert counts["click"] > counts["add_to_cart"] > counts["purchase"] > 0
    assert counts["email_open"] > counts["email_click"] > 0
    bounds = events.agg(F.min("event_ts").alias("lo"), F.max("event_ts").alias("hi")).first()
    assert (bounds["hi"] - bounds["lo"]).days == SPEC.days - 1
    assert events.where("event_type = 'purchase' and (revenue <= 0 or quantity < 1)").count() == 0

    truth_users = planted_user_segments(spark, SPEC)
    truth_items = planted_segment_items(spark, SPEC)
    assert truth_users.count() == SPEC.users
    own = (events.join(truth_users, "user_id")
           .join(truth_items, ["segment_id", "item_id"], "left")
           .agg(F.avg(F.col("popularity_rank").isNotNull().cast("double"))).first()[0])
    assert abs(own - SPEC.in_segment_share) < 0.02


def test_churned_users_go_quiet(spark):
    spec = SampleSpec(users=200, items=40, events=50_000, segments=2, seed=3, churn_fraction=0.5)
    events = generate_events(spark, spec)
    last_seen = events.groupBy("user_id").agg(F.max("event_ts").alias("last"))
    cutoff = events.agg(F.max("event_ts")).first()[0]
    quiet = last_seen.where(F.col("last") < F.lit(cutoff) - F.expr("INTERVAL 20 DAYS")).count()
    assert quiet >= 0.3 * spec.users
