"""Evaluation splits: latest events held out per user, and nothing held out reaches training."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.recommend import EvaluationSettings, item_popularity, training_side
from lib.sample_data import SampleSpec, generate_events
from lib.splits import holdout_latest, relevant_items

WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0, "email_open": 0.5, "email_click": 2.0}


@pytest.fixture(scope="module")
def events(spark):
    spec = SampleSpec(users=80, items=30, events=3000, segments=3, seed=5, days=30)
    return generate_events(spark, spec, partitions=2).cache()


def _same_rows(left: DataFrame, right: DataFrame) -> bool:
    return left.exceptAll(right).count() == 0 and right.exceptAll(left).count() == 0


def test_fraction_holds_out_each_users_latest_events(events):
    split = holdout_latest(events, fraction=0.25)
    per_user = (
        events.groupBy("user_id").agg(F.count(F.lit(1)).alias("n"))
        .join(split.held_out.groupBy("user_id").agg(F.count(F.lit(1)).alias("held"),
                                                     F.min("event_ts").alias("first_held")), "user_id", "left")
        .join(split.train.groupBy("user_id").agg(F.max("event_ts").alias("last_train")), "user_id", "left")
    )
    wrong_count = per_user.where(F.coalesce("held", F.lit(0)) != F.floor(F.col("n") * 0.25)).count()
    not_latest = per_user.where(F.col("first_held") < F.col("last_train")).count()
    assert wrong_count == 0
    assert not_latest == 0
    assert split.train.count() + split.held_out.count() == events.count()
    assert split.held_out.count() > 0
    assert split.train_end == split.train.agg(F.max("event_ts")).first()[0].replace(tzinfo=timezone.utc)


def test_cutoff_holds_out_everything_after_it(events):
    cutoff = datetime(2026, 10, 20, tzinfo=timezone.utc)
    split = holdout_latest(events, cutoff=cutoff)
    assert split.held_out.where(F.col("event_ts") <= F.lit(cutoff)).count() == 0
    assert split.train.where(F.col("event_ts") > F.lit(cutoff)).count() == 0
    assert split.train_end <= cutoff
    with pytest.raises(ValueError, match="fraction"):
        holdout_latest(events, fraction=1.0)


def test_held_out_events_do_not_influence_training_inputs(events):
    """Rewrite every held-out event into a loud purchase of a new item: training inputs stay identical."""
    settings = EvaluationSettings(WEIGHTS, 30.0, ["purchase"], [10], 10)
    split = holdout_latest(events, fraction=0.2)
    original = training_side(split.train, settings, split.train_end)

    tampered_held = split.held_out.withColumn("item_id", F.lit("leak-item")).withColumn("event_type", F.lit("purchase"))
    tampered = split.train.unionByName(tampered_held)
    tampered_split = holdout_latest(tampered, fraction=0.2)
    again = training_side(tampered_split.train, settings, tampered_split.train_end)

    assert tampered_split.train_end == split.train_end
    assert _same_rows(original.entries, again.entries)
    assert _same_rows(original.user_index, again.user_index)
    assert _same_rows(original.item_index, again.item_index)
    assert _same_rows(original.excluded, again.excluded)
    assert _same_rows(item_popularity(original.entries), item_popularity(again.entries))
    assert again.item_index.where(F.col("item_id") == "leak-item").count() == 0
    # The tampering did reach the held-out side, so the equalities above are not vacuous.
    truth = relevant_items(tampered_split.held_out, again.user_index)
    assert truth.where(F.col("item_id") == "leak-item").count() > 0
