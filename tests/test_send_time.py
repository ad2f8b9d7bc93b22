"""Send times: planted preferred hours recovered, per-user hours beat the global hour on later opens,
quiet hours never chosen, thin evidence falls back to the segment, local display in the time zone."""
from __future__ import annotations

from datetime import date, timedelta

import pytest
from pyspark.sql import functions as F

from jobs.common import BASE_CONFIG
from lib.campaign.send_time import epoch_hour, send_times
from lib.platform.config import parse_toml
from lib.platform.settings import SendTimeSettings
from lib.sample.planted import SampleSpec, generate_events, planted_users

SPEC = SampleSpec(users=400, items=60, events=60_000, segments=3, seed=13, email_campaigns=True)
END = date.fromisoformat(SPEC.end_date) - timedelta(days=1)  # the last generated day


def _settings(**overrides) -> SendTimeSettings:
    """conf/base.toml's [send_time] defaults with overrides (this section only)."""
    section = parse_toml(BASE_CONFIG.read_text(), "base")["send_time"]
    values = {**section, **overrides}
    return SendTimeSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _hour_distance(a, b):
    diff = F.abs(a - b) % 24
    return F.least(diff, 24 - diff)


@pytest.fixture(scope="module")
def events(spark):
    df = generate_events(spark, SPEC, partitions=2).cache()
    yield df
    df.unpersist()


@pytest.fixture(scope="module")
def truth(spark):
    return planted_users(spark, SPEC).cache()


def test_planted_hours_are_recovered_for_users_with_five_opens(events, truth):
    chosen = send_times(events, END, _settings(), "run-t", truth.select("user_id", "segment_id")).cache()
    assert chosen.count() == events.select("user_id").distinct().count()
    opens = events.where("event_type = 'email_open'").groupBy("user_id").agg(F.count(F.lit(1)).alias("opens"))
    scored = (chosen.join(opens, "user_id").join(truth, "user_id")
              .where("opens >= 5 and preferred_hour is not null")
              .withColumn("off", _hour_distance(F.col("hour_utc"), F.col("preferred_hour"))))
    stats = scored.agg(F.count(F.lit(1)).alias("n"), F.avg((F.col("off") <= 1).cast("double")).alias("hit")).first()
    print(f"planted hour within 1 h for {stats['hit']:.1%} of {stats['n']} users with >= 5 opens")
    assert stats["n"] >= 100
    assert stats["hit"] >= 0.80
    assert chosen.where("hour_of_week_utc != weekday_utc * 24 + hour_utc or hour_utc < 6").count() == 0
    assert chosen.where("confidence < 0 or confidence >= 1").count() == 0
    # Thin evidence: the fallback flag, the segment's hour and lower confidence.
    assert chosen.where("is_fallback != (n_signals < 5)").count() == 0
    per_segment = chosen.where("is_fallback").groupBy("segment_id").agg(
        F.countDistinct("hour_of_week_utc").alias("hours")).collect()
    assert per_segment and all(row["hours"] == 1 for row in per_segment)
    confidence = {r["is_fallback"]: r["c"] for r in chosen.groupBy("is_fallback").agg(F.avg("confidence").alias("c"))
                  .collect()}
    assert confidence[True] < confidence[False]
    chosen.unpersist()


def test_per_user_hours_beat_the_global_hour_on_later_opens(events, truth):
    cutoff = END - timedelta(days=30)
    chosen = send_times(events, cutoff, _settings(), "run-t", truth.select("user_id", "segment_id"))
    start = F.lit(f"{cutoff + timedelta(days=1)} 00:00:00").cast("timestamp")
    train_opens = events.where((F.col("event_ts") < start) & (F.col("event_type") == "email_open"))
    global_hour = (train_opens.groupBy(epoch_hour(F.col("event_ts")).alias("h")).count()
                   .orderBy(F.desc("count")).first()["h"])
    later = events.where((F.col("event_ts") >= start) & (F.col("event_type") == "email_open")) \
        .select("user_id", epoch_hour(F.col("event_ts")).alias("h"))
    judged = later.join(chosen, "user_id").agg(
        F.avg((_hour_distance(F.col("h"), F.col("hour_utc")) <= 1).cast("double")).alias("own"),
        F.avg((_hour_distance(F.col("h"), F.lit(global_hour)) <= 1).cast("double")).alias("global"),
        F.count(F.lit(1)).alias("n")).first()
    print(f"held-out opens within 1 h: per-user {judged['own']:.1%} vs global hour {global_hour} "
          f"{judged['global']:.1%} ({judged['n']} opens)")
    assert judged["n"] >= 500
    assert judged["own"] >= judged["global"] + 0.15


def test_quiet_hours_are_never_chosen_and_local_time_is_shown(events):
    # Quiet 10:00-15:59 in New York (UTC-4 / UTC-5): many planted hours fall inside.
    settings = _settings(time_zone="America/New_York", quiet_hours=(10, 11, 12, 13, 14, 15))
    chosen = send_times(events, END, settings, "run-t").cache()
    assert chosen.where(F.col("hour_local").isin(10, 11, 12, 13, 14, 15)).count() == 0
    # At the end of 2026-10-30 New York is on daylight time: local = UTC - 4 h for the whole week.
    assert chosen.where("hour_local != (hour_utc + 20) % 24 or time_zone != 'America/New_York'").count() == 0
    assert chosen.where("hour_of_week_local != weekday_local * 24 + hour_local").count() == 0
    assert chosen.select("hour_utc").distinct().count() > 5  # still personal outside the quiet hours
    assert chosen.where("segment_id is not null").count() == 0  # no segments given: the global prior
    chosen.unpersist()
