from datetime import datetime, timezone

import pytest

from lib.features.interactions import (extend_index, latest_event_time, resolve_as_of, score_events,
                                       to_matrix_entries)

AS_OF = datetime(2026, 10, 31, tzinfo=timezone.utc)
WEIGHTS = {"view": 1.0, "purchase": 8.0, "email_send": 0.0}


def test_scores_are_weighted_and_decayed_exactly(spark):
    events = spark.createDataFrame(
        [
            ("u1", "i1", "view", datetime(2026, 10, 31)),      # age 0: 1.0
            ("u1", "i1", "purchase", datetime(2026, 10, 21)),  # age 10 = one half-life: 4.0
            ("u2", "i1", "view", datetime(2026, 10, 11)),      # age 20: 0.25
            ("u2", "i2", "view", datetime(2026, 11, 5)),       # after as_of: left out
            ("u2", "i1", "email_send", datetime(2026, 10, 1)), # weight 0: counted, but not as taste
        ],
        "user_id string, item_id string, event_type string, event_ts timestamp",
    )
    got = sorted(tuple(row) for row in score_events(events, WEIGHTS, 10.0, AS_OF).collect())
    assert got == [
        ("u1", "i1", pytest.approx(5.0), 2, 2, datetime(2026, 10, 31)),
        ("u2", "i1", pytest.approx(0.25), 2, 1, datetime(2026, 10, 11)),
    ]


def test_index_is_dense_ordered_and_stable_across_runs(spark):
    first_ids = spark.createDataFrame([(f"u{n:02d}",) for n in (5, 1, 3, 1, 9, 7)], "user_id string")
    first = extend_index(first_ids, None, "user_id", "user_idx", partitions=3)
    assert sorted(tuple(r) for r in first.collect()) == [("u01", 0), ("u03", 1), ("u05", 2), ("u07", 3), ("u09", 4)]

    second_ids = spark.createDataFrame([(f"u{n:02d}",) for n in (2, 3, 10, 0, 9)], "user_id string")
    added = extend_index(second_ids, first, "user_id", "user_idx", partitions=2)
    assert sorted(tuple(r) for r in added.collect()) == [("u00", 5), ("u02", 6), ("u10", 7)]

    again = extend_index(second_ids, first.unionByName(added), "user_id", "user_idx", partitions=2)
    assert again.count() == 0


def test_index_numbering_does_not_depend_on_partitioning(spark):
    ids = spark.range(0, 500).selectExpr("concat('id-', cast(id * 7919 % 500 as string)) as item_id")
    one = sorted(tuple(r) for r in extend_index(ids, None, "item_id", "item_idx", partitions=1).collect())
    many = sorted(tuple(r) for r in extend_index(ids, None, "item_id", "item_idx", partitions=7).collect())
    assert one == many
    assert sorted(idx for _, idx in many) == list(range(500))


def test_matrix_entries_use_the_indices(spark):
    scored = spark.createDataFrame([("u1", "i2", 3.0, 2, 1, datetime(2026, 10, 1))],
                                   "user_id string, item_id string, score double, n_events long, "
                                   "n_weighted_events long, last_ts timestamp")
    users = spark.createDataFrame([("u1", 4)], "user_id string, user_idx int")
    items = spark.createDataFrame([("i2", 9)], "item_id string, item_idx int")
    assert [tuple(r) for r in to_matrix_entries(scored, users, items).collect()] == [(4, 9, 3.0, 2, 1, datetime(2026, 10, 1))]


def test_index_is_unique_when_the_input_order_varies_between_evaluations(spark):
    # ids out of a shuffle arrive in a different order each time they are computed; the range
    # partitioning of two evaluations must not disagree (it did: duplicate and missing indices).
    from lib.sample.planted import SampleSpec, generate_events

    events = generate_events(spark, SampleSpec(users=3000, items=100, events=150_000, segments=3, seed=5))
    previous = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", "8")
    try:
        scored = score_events(events, {"view": 1.0}, 30.0, AS_OF).persist()
        users = scored.select("user_id").distinct().count()
        for _ in range(3):
            index = extend_index(scored.select("user_id"), None, "user_id", "user_idx", partitions=8)
            stats = index.selectExpr("count(*) as n", "count(distinct user_idx) as distinct_idx",
                                     "max(user_idx) as top").first()
            assert tuple(stats) == (users, users, users - 1)
        scored.unpersist()
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", previous)


def test_as_of_is_the_configured_instant_else_the_latest_event(spark):
    events = spark.createDataFrame([(datetime(2026, 1, 1, 5),), (datetime(2026, 1, 3, 7, 30),)], "event_ts timestamp")
    latest = datetime(2026, 1, 3, 7, 30, tzinfo=timezone.utc)
    assert latest_event_time(events) == latest and latest_event_time(events).tzinfo is not None
    assert resolve_as_of(None, events) == latest
    configured = datetime(2025, 12, 31, tzinfo=timezone.utc)
    assert resolve_as_of(configured, events) == configured
    empty = events.limit(0)
    assert latest_event_time(empty) is None
    assert resolve_as_of(configured, empty) == configured
    with pytest.raises(ValueError, match="table /wh/events is empty"):
        resolve_as_of(None, empty, "/wh/events")
