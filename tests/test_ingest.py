from datetime import datetime, timezone
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from dataclasses import replace

from jobs.common import run_stage
from lib import catalog as C
from lib import ingest
from lib.config import ConfigError

EVENT_TYPES = ["view", "click", "add_to_cart", "purchase", "email_open", "email_click"]
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
RAW_SCHEMA = "event_id string, user_id string, item_id string, event_type string, event_ts string, " \
             "quantity string, revenue string"


def classify_rows(spark, rows):
    raw = spark.createDataFrame(rows, RAW_SCHEMA)
    return ingest.classify(ingest.normalize(raw), EVENT_TYPES, NOW)


def test_each_quarantine_reason(spark):
    rows = [
        ("e1", " u1 ", "i1", " VIEW ", "2026-10-01T10:00:00Z", None, None),  # valid, normalized
        ("e2", "  ", "i1", "view", "2026-10-01T10:00:00Z", None, None),
        ("e3", "u1", None, "view", "2026-10-01T10:00:00Z", None, None),
        ("e4", "u1", "i1", "", "2026-10-01T10:00:00Z", None, None),
        ("e5", "u1", "i1", "wishlist", "2026-10-01T10:00:00Z", None, None),
        ("e6", "u1", "i1", "view", None, None, None),
        ("e7", "u1", "i1", "view", "yesterday", None, None),
        ("e8", "u1", "i1", "view", "2026-11-02T12:00:00Z", None, None),
        ("e9", "u1", "i1", "purchase", "2026-10-01T10:00:00Z", "two", "5"),
        ("e10", "u1", "i1", "purchase", "2026-10-01T10:00:00Z", "-1", "5"),
        ("e11", "u1", "i1", "purchase", "2026-10-01T10:00:00Z", "1", "five"),
        ("e12", "u1", "i1", "purchase", "2026-10-01T10:00:00Z", "1", "-5"),
        ("e13", "u1", "i1", "purchase", "1759312800", "2", "10.5"),  # epoch seconds, valid
    ]
    got = {row["event_id"]: row["reason"] for row in classify_rows(spark, rows).collect()}
    assert got == {
        "e1": None, "e2": "missing_user_id", "e3": "missing_item_id", "e4": "missing_event_type",
        "e5": "unknown_event_type", "e6": "missing_event_ts", "e7": "unparseable_event_ts",
        "e8": "future_event_ts", "e9": "unparseable_quantity", "e10": "negative_quantity",
        "e11": "unparseable_revenue", "e12": "negative_revenue", "e13": None,
    }
    assert set(got.values()) - {None} == set(ingest.QUARANTINE_REASONS)


def test_valid_rows_are_normalized_exactly(spark):
    rows = [
        ("e1", " u1 ", "i1", " VIEW ", "2026-10-01T10:00:00Z", None, None),
        ("e13", "u1", "i2", "purchase", "1759312800", "2", "10.5"),
        ("e14", "u2", "i1", "click", "2026-10-01 23:30:00+02:00", "", ""),
    ]
    events = ingest.valid_events(classify_rows(spark, rows), "run-1").orderBy("event_id").collect()
    assert [tuple(row) for row in events] == [
        ("e1", "u1", "i1", "view", datetime(2026, 10, 1, 10, 0), None, None, None, None,
         datetime(2026, 10, 1).date(), "run-1"),
        ("e13", "u1", "i2", "purchase", datetime(2025, 10, 1, 10, 0), 2.0, 10.5, None, None,
         datetime(2025, 10, 1).date(), "run-1"),
        ("e14", "u2", "i1", "click", datetime(2026, 10, 1, 21, 30), None, None, None, None,
         datetime(2026, 10, 1).date(), "run-1"),
    ]


def test_missing_event_id_gets_a_deterministic_hash_and_duplicates_collapse(spark):
    rows = [
        (None, "u1", "i1", "view", "2026-10-01T10:00:00Z", None, None),
        (None, "u1", "i1", "view", "2026-10-01T10:00:00Z", None, None),  # same event twice
        (None, "u1", "i1", "view", "2026-10-01T10:00:01Z", None, None),
        ("x", "u1", "i1", "view", "2026-10-01T10:00:00Z", None, None),
        ("x", "u2", "i9", "click", "2026-10-02T10:00:00Z", None, None),  # same id: a duplicate
    ]
    classified = classify_rows(spark, rows)
    ids = [row["event_id"] for row in classified.collect()]
    assert ids[0] == ids[1] != ids[2] and len(ids[0]) == 64
    assert ids == [row["event_id"] for row in classify_rows(spark, rows).collect()]
    assert ingest.valid_events(classified, "r").count() == 3


def test_missing_required_column_is_a_clear_error(spark):
    raw = spark.createDataFrame([("u1", "i1", "view")], "user_id string, item_id string, event_type string")
    with pytest.raises(ingest.InputContractError, match="lacks required column.*event_ts"):
        ingest.normalize(raw)


def test_format_inference():
    assert ingest.infer_format("/data/clicks.csv", False) == "csv"
    assert ingest.infer_format("/data/clicks.jsonl", False) == "json"
    assert ingest.infer_format("/data/events", True) == "delta"
    assert ingest.infer_format("main.raw.clickstream", False) == "table"
    with pytest.raises(ValueError, match="set input.format"):
        ingest.infer_format("/data/events", False)


CSV = """event_id,user_id,item_id,event_type,event_ts,quantity,revenue,campaign_id,channel
a1,alice,sku-1,view,2026-10-01T10:00:00Z,,,,web
a2,alice,sku-1,purchase,2026-10-01T10:05:00Z,1,19.99,,web
a2,alice,sku-1,purchase,2026-10-01T10:05:00Z,1,19.99,,web
a3,bob,sku-2,EMAIL_CLICK,1759312800,,,cmp-1,email
a4,,sku-2,view,2026-10-01T10:00:00Z,,,,web
a5,bob,sku-2,teleport,2026-10-01T10:00:00Z,,,,web
a6,bob,sku-3,view,2099-01-01T00:00:00Z,,,,web
a7,carol,sku-3,add_to_cart,not a date,,,,app
"""


def _sets(tmp_path: Path, csv_path: Path) -> list[str]:
    return [f"input.events={csv_path}", f"output.root={tmp_path / 'wh'}", "spark.shuffle_partitions=2",
            "ingest.now=2026-11-01T00:00:00+00:00"]


def test_ingest_stage_reconciles_counts_and_is_idempotent(spark, tmp_path, context):
    csv_path = tmp_path / "clicks.csv"
    csv_path.write_text(CSV)
    ctx = context(*_sets(tmp_path, csv_path))
    tables = ctx.tables

    first = run_stage(ctx, "ingest")
    assert (first.rows_in, first.rows_out) == (8, 3)
    assert first.counts["quarantined"] == 4 and first.counts["duplicates"] == 1
    assert first.rows_in == first.rows_out + first.counts["quarantined"] + first.counts["duplicates"]

    events = tables.read(spark, C.EVENTS)
    assert sorted((r["event_id"], r["user_id"], r["event_type"]) for r in events.collect()) == [
        ("a1", "alice", "view"), ("a2", "alice", "purchase"), ("a3", "bob", "email_click")]
    quarantine = {row["reason"]: row["raw"] for row in tables.read(spark, C.EVENTS_QUARANTINE).collect()}
    assert set(quarantine) == {"missing_user_id", "unknown_event_type", "future_event_ts", "unparseable_event_ts"}
    assert '"event_id":"a5"' in quarantine["unknown_event_type"]

    second = run_stage(replace(ctx, run_id="run-2"), "ingest")
    assert (second.rows_in, second.rows_out, second.counts["duplicates"]) == (8, 0, 4)  # 3 known + 1 in batch
    assert second.counts["quarantine_new_rows"] == 0
    assert tables.read(spark, C.EVENTS).count() == 3
    assert tables.read(spark, C.EVENTS_QUARANTINE).count() == 4

    runs = tables.read(spark, C.PIPELINE_RUNS).where("stage = 'ingest'").orderBy("run_id").collect()
    assert [(r["run_id"], r["status"], r["rows_in"], r["rows_out"]) for r in runs] == [
        ("run-1", "success", 8, 3), ("run-2", "success", 8, 0)]
    for r in runs:
        assert r["rows_in"] == r["rows_out"] + r["counts"]["quarantined"] + r["counts"]["duplicates"]
    partitions = {row["event_date"] for row in events.select("event_date").distinct().collect()}
    assert len(partitions) == 2  # 2026-10-01 and the epoch event's 2025-10-01


def test_json_lines_with_typed_values_and_a_malformed_line(spark, tmp_path):
    path = tmp_path / "clicks.json"
    path.write_text(
        '{"user_id": "u1", "item_id": "i1", "event_type": "purchase", "event_ts": 1759312800, "quantity": 2, "revenue": 9.5}\n'
        '{"user_id": "u2", "item_id": "i1", "event_type": "view", "event_ts": "2026-10-01T10:00:00+00:00"}\n'
        '{"user_id": "u3", "item_id": \n'
    )
    raw = ingest.read_raw(spark.read, str(path), "json")
    classified = ingest.classify(ingest.normalize(raw), EVENT_TYPES, NOW)
    got = sorted((r["user_id"] or "", r["event_ts"], r["quantity"], r["reason"]) for r in classified.collect())
    assert got == [
        ("", None, None, "missing_user_id"),  # the malformed line is kept, as raw text, in quarantine
        ("u1", datetime(2025, 10, 1, 10, 0), 2.0, None),
        ("u2", datetime(2026, 10, 1, 10, 0), None, None),
    ]
    bad = ingest.quarantined_rows(classified, "r").first()
    assert "_corrupt_record" in bad["raw"] and "u3" in bad["raw"]


def test_failed_stage_is_recorded_and_leaves_tables_readable(spark, tmp_path, context):
    csv_path = tmp_path / "clicks.csv"
    csv_path.write_text(CSV)
    ctx = context(*_sets(tmp_path, csv_path))
    run_stage(ctx, "ingest")
    with pytest.raises(ConfigError, match="half_life_days' must be > 0"):
        context(*_sets(tmp_path, csv_path), "interactions.half_life_days=0")
    # A stage failing on its input is recorded as failed, with the error, before it re-raises.
    empty = context(f"output.root={tmp_path / 'empty'}", "spark.shuffle_partitions=2", run_id="run-2")
    with pytest.raises(ValueError, match="run the ingest stage first"):
        run_stage(empty, "build_interactions")
    failed = empty.tables.read(spark, C.PIPELINE_RUNS).where("run_id = 'run-2'").first()
    assert failed["status"] == "failed" and "events does not exist" in failed["message"]
    assert ctx.tables.read(spark, C.EVENTS).count() == 3
