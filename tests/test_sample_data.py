from datetime import date, timedelta

from pyspark.sql import functions as F

from lib.sample.planted import SampleSpec, generate_events, planted_segment_items, planted_user_segments

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


START = date.fromisoformat("2026-10-31") - timedelta(days=90)
EMAIL_SPEC = SampleSpec(users=300, items=60, events=60_000, segments=3, seed=21, churn_fraction=0.3,
                        email_campaigns=True)


def test_email_campaigns_plant_sends_hours_and_churners_who_stop_opening_first(spark):
    from lib.sample.planted import EMAIL_LEAD_DAYS, planted_users
    from lib.campaign.send_time import epoch_hour

    plain = generate_events(spark, SampleSpec(users=50, items=20, events=2000, segments=2, seed=1))
    assert plain.where("event_type = 'email_send'").count() == 0  # direct callers keep the old sample

    events = generate_events(spark, EMAIL_SPEC, partitions=2).cache()
    truth = planted_users(spark, EMAIL_SPEC).cache()
    assert events.count() == EMAIL_SPEC.events  # sends count inside sample.events
    counts = {r["event_type"]: r["count"] for r in events.groupBy("event_type").count().collect()}
    assert counts["view"] > 3 * counts["click"] and counts["click"] > counts["add_to_cart"] > counts["purchase"] > 0
    assert 0.2 < counts["email_open"] / counts["email_send"] < 0.45 and counts["email_open"] > counts["email_click"]
    assert events.where("(event_type like 'email%') != (channel = 'email') or "
                        "(event_type like 'email%') != (campaign_id is not null)").count() == 0

    # Every customer is mailed alike: sends per user spread like a binomial, unlike visits.
    spread = (events.where("event_type in ('email_send', 'view')").groupBy("user_id", "event_type").count()
              .groupBy("event_type").agg((F.stddev("count") / F.avg("count")).alias("cv"),
                                         F.count(F.lit(1)).alias("users")))
    cv = {r["event_type"]: (r["cv"], r["users"]) for r in spread.collect()}
    assert cv["email_send"][1] == EMAIL_SPEC.users and cv["email_send"][0] < 0.4 < cv["view"][0]

    # Truth: shares as planted; churners' opens stop EMAIL_LEAD_DAYS before their visits, sends go on.
    stats = truth.agg(F.count(F.lit(1)).alias("n"), F.avg(F.col("churner").cast("double")).alias("churn"),
                      F.avg(F.col("preferred_hour").isNotNull().cast("double")).alias("hour")).first()
    assert stats["n"] == EMAIL_SPEC.users and abs(stats["churn"] - 0.3) < 0.08 and abs(stats["hour"] - 0.8) < 0.08
    last = events.groupBy("user_id").agg(
        F.max(F.when(F.col("event_type") == "email_open", F.to_date("event_ts"))).alias("last_open"),
        F.max(F.when(~F.col("event_type").like("email%"), F.to_date("event_ts"))).alias("last_visit"),
        F.max(F.when(F.col("event_type") == "email_send", F.to_date("event_ts"))).alias("last_send"))
    churners = last.join(truth.where("churner"), "user_id").cache()
    assert churners.where("last_open > email_stop_date or last_visit > churn_date").count() == 0
    assert churners.where(F.datediff("churn_date", "email_stop_date") != EMAIL_LEAD_DAYS).where(
        F.datediff("churn_date", F.lit(str(START))) >= EMAIL_LEAD_DAYS).count() == 0
    assert churners.where("last_send > churn_date").count() > 0.8 * churners.count()
    # Opens sit at the planted hour (+-1 h) far more often than chance (3 hours of 24).
    opens = events.where("event_type = 'email_open'").join(truth.where("preferred_hour is not null"), "user_id")
    diff = F.abs(epoch_hour(F.col("event_ts")) - F.col("preferred_hour")) % 24
    on_hour = opens.agg(F.avg((F.least(diff, 24 - diff) <= 1).cast("double"))).first()[0]
    assert on_hour > 0.6
    churners.unpersist()
    events.unpersist()
