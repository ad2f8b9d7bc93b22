from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from jobs.common import load_settings, run_stage
from lib.ingest import events as ingest
from lib.ingest import readers
from lib.platform import catalog as C
from lib.platform.config import ConfigError

EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "email_open", "email_click")
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
SOURCE = load_settings([], []).input
# The default lower bound (ingest.earliest_event_ts): what a new user's export is judged by.
RULES = ingest.Rules(event_types=EVENT_TYPES, latest=NOW, earliest=load_settings([], []).ingest.earliest_utc)
RAW_SCHEMA = "event_id string, user_id string, item_id string, event_type string, event_ts string, " \
             "quantity string, revenue string"


def classify_rows(spark, rows, schema=RAW_SCHEMA, source=SOURCE, rules=RULES):
    raw = readers.with_meta(spark.createDataFrame(rows, schema))
    return ingest.classify(ingest.normalize(raw, source), rules)


def test_each_row_check_has_its_reason(spark):
    ts = "2026-10-01T10:00:00Z"
    rows = [
        ("e1", " u1 ", "i1", " VIEW ", ts, None, None),  # valid, normalized
        ("e2", None, "i1", "view", ts, None, None),
        ("e3", " \u00a0\t", "i1", "view", ts, None, None),
        ("e4", "u1", "", "view", ts, None, None),
        ("e5", "u1", "\u200b\u0000", "view", ts, None, None),
        ("e6", "u1", "i1", "", ts, None, None),
        ("e7", "u1", "i1", "wishlist", ts, None, None),
        ("e8", "u1", "i1", "view", None, None, None),
        ("e9", "u1", "i1", "view", "yesterday", None, None),
        ("e10", "u1", "i1", "view", "1759312800000", None, None),  # epoch ms read as seconds
        ("e11", "u1", "i1", "view", "0001-01-01T00:00:00Z", None, None),
        ("e12", "u1", "i1", "view", "2026-11-02T12:00:00Z", None, None),
        ("e13", "u1", "i1", "purchase", ts, "two", "5"),
        ("e14", "u1", "i1", "purchase", ts, "NaN", "5"),
        ("e15", "u1", "i1", "purchase", ts, "-1", "5"),
        ("e16", "u1", "i1", "purchase", ts, "1", "five"),
        ("e17", "u1", "i1", "purchase", ts, "1", "Infinity"),
        ("e18", "u1", "i1", "purchase", ts, "1", "-5"),
        ("e19", "u1", "i1", "purchase", "1759312800", "2", "10.5"),  # epoch seconds, valid
        ("e20", "u1", "i1", "view", "20240501", None, None),  # a date typed as a number: 1970 in seconds
        ("e21", "u1", "i1", "purchase", "1997-06-02T09:30:00Z", "1", "4.5"),  # an old order, not garbage
    ]
    got = {row["event_id"]: row["reason"] for row in classify_rows(spark, rows).select("event_id", "reason").collect()}
    assert got == {
        "e1": None, "e2": "missing_user_id", "e3": "blank_user_id", "e4": "missing_item_id",
        "e5": "blank_item_id", "e6": "missing_event_type", "e7": "unknown_event_type", "e8": "missing_event_ts",
        "e9": "unparseable_event_ts", "e10": "timestamp_unit_mismatch", "e11": "too_early_event_ts",
        "e12": "future_event_ts", "e13": "unparseable_quantity", "e14": "non_finite_quantity",
        "e15": "negative_quantity", "e16": "unparseable_revenue", "e17": "non_finite_revenue",
        "e18": "negative_revenue", "e19": None, "e20": "too_early_event_ts", "e21": None,
    }


def test_unit_mismatch_detail_names_the_unit_that_fits(spark):
    rows = [("e1", "u1", "i1", "view", "1759312800000", None, None)]
    detail = classify_rows(spark, rows).first()["detail"]
    assert "'s'" in detail and "read as 'ms' it is 2025-10-01 10:00:00" in detail


def test_valid_rows_are_normalized_exactly(spark):
    rows = [
        ("e1", "\u00a0u1\u200b", "i1", " VIEW ", "2026-10-01T10:00:00Z", None, None),
        ("e13", "u1", "i2", "purchase", "1759312800", "2", "10.5"),
        ("e14", "u2", "i1", "click", "2026-10-01 23:30:00+02:00", "", ""),
    ]
    resolved = ingest.resolve(classify_rows(spark, rows), None)
    events = ingest.valid_events(resolved, "run-1").orderBy("event_id").collect()
    assert [tuple(row) for row in events] == [
        ("e1", "u1", "i1", "view", datetime(2026, 10, 1, 10, 0), None, None, None, None,
         datetime(2026, 10, 1).date(), "run-1"),
        ("e13", "u1", "i2", "purchase", datetime(2025, 10, 1, 10, 0), 2.0, 10.5, None, None,
         datetime(2025, 10, 1).date(), "run-1"),
        ("e14", "u2", "i1", "click", datetime(2026, 10, 1, 21, 30), None, None, None, None,
         datetime(2026, 10, 1).date(), "run-1"),
    ]


def test_invisible_and_unicode_space_characters_inside_ids_follow_one_rule(spark, tmp_path):
    """Issue 19: "u\u200b1" and "u1" were two customers. Inside an id, whitespace and Unicode spaces become a
    plain space and control / format characters go; events, suppression lists and the catalog share the rule."""
    ts = "2026-10-01T10:00:00Z"
    rows = [
        ("e1", "u1", "i 1", "view", ts, None, None),
        ("e2", "u\u200b1", "i\u00a01", "view", ts, None, None),      # zero-width space, no-break space
        ("e3", "u\u00001", "i\u20031", "view", ts, None, None),      # NUL, em space
        ("e4", "\ufeffu\u20601\t", "i\t1", "view", ts, None, None),  # BOM, word joiner, tabs
        ("e5", "u\u00ad1", "i\u2028\u00851", "view", ts, None, None),  # soft hyphen; line separator, NEL
        ("e6", "u  1", "i1", "view", ts, None, None),                 # plain spaces inside are kept as they are
        ("e7", "\u200b\u00a0\u0000", "i1", "view", ts, None, None),  # nothing visible left
    ]
    got = {r["event_id"]: (r["user_id"], r["item_id"], r["reason"])
           for r in classify_rows(spark, rows).select("event_id", "user_id", "item_id", "reason").collect()}
    assert got == {"e1": ("u1", "i 1", None), "e2": ("u1", "i 1", None), "e3": ("u1", "i 1", None),
                   "e4": ("u1", "i 1", None), "e5": ("u1", "i 1", None), "e6": ("u  1", "i1", None),
                   "e7": (None, "i1", "blank_user_id")}

    from lib.campaign.campaigns import read_suppressions
    from lib.ingest.products import validate_products
    listed = tmp_path / "suppressions.csv"
    listed.write_text("user_id,reason\nu\u200b1,unsubscribed\n\u00a0u\u00a02 ,bounced\n", encoding="utf-8")
    assert sorted(r["user_id"] for r in read_suppressions(spark, str(listed), "input.suppressions").collect()) == \
        ["u 2", "u1"]
    catalog = spark.createDataFrame([("i\u00a01", "x"), ("i\u200b2", "y")], "item_id string, _source_file string")
    products, _ = validate_products(catalog, "catalog", "run-1")
    assert sorted(r["item_id"] for r in products.collect()) == ["i 1", "i2"]


def test_duplicates_and_event_id_conflicts_in_one_batch(spark):
    rows = [
        (None, "u1", "i1", "view", "2026-10-01T10:00:00Z", None, None),
        (None, " u1", "i1", "VIEW", "2026-10-01T10:00:00Z", None, None),  # the same event, other spelling
        (None, "u1", "i1", "view", "2026-10-01T10:00:01Z", None, None),
        ("x", "u2", "i9", "click", "2026-10-02T10:00:00Z", None, None),  # x: a later payload...
        ("x", "u1", "i1", "view", "2026-10-01T10:00:00Z", None, None),  # ...loses to the earliest
        ("x", "u1", "i1", "view", "2026-10-01T10:00:00Z", None, None),  # an exact duplicate of the winner
    ]
    classified = classify_rows(spark, rows)
    ids = [row["event_id"] for row in classified.collect()]
    assert ids[0] == ids[1] != ids[2] and len(ids[0]) == 64
    assert ids == [row["event_id"] for row in classify_rows(spark, rows).collect()]  # deterministic
    resolved = ingest.resolve(classified, None)
    outcome = ingest.count_outcomes(resolved)
    assert (outcome.new, outcome.duplicates, outcome.reasons) == (3, {"batch": 2}, {"event_id_conflict": 1})
    kept = {r["event_id"]: r["user_id"] for r in ingest.valid_events(resolved, "r").collect()}
    assert kept["x"] == "u1"
    conflict = ingest.quarantined_rows(resolved, "r").first()
    assert '"u2"' in conflict["raw"] and "earliest event_ts wins" in conflict["detail"]


def test_reconciliation_and_share_checks_fail_loudly():
    outcome = ingest.Outcome(new=3, duplicates={"batch": 1}, reasons={"unknown_event_type": 5, "missing_user_id": 1},
                             samples={"unknown_event_type": '{"event":"teleport"}', "missing_user_id": "{}"})
    ingest.check_reconciliation(10, outcome)
    with pytest.raises(ingest.IngestError, match="reader saw 11 records but ingest sorted 10"):
        ingest.check_reconciliation(11, outcome)
    ingest.check_quarantine_share(10, outcome, 0.6)
    with pytest.raises(ingest.IngestError) as err:
        ingest.check_quarantine_share(10, outcome, 0.5)
    message = str(err.value)
    assert "6 of 10 input records (60.0%)" in message and "nothing was written" in message
    assert message.index("unknown_event_type: 5 rows") < message.index("missing_user_id: 1 rows")
    assert '{"event":"teleport"}' in message


def test_missing_required_column_is_a_clear_error(spark):
    raw = readers.with_meta(spark.createDataFrame([("u1", "i1", "view")], "user_id string, item_id string, event_type string"))
    with pytest.raises(ingest.InputContractError, match="lacks required column.*event_ts"):
        ingest.normalize(raw, SOURCE)
    renamed = replace(SOURCE, columns={"visitorid": "user_id"})
    raw = readers.with_meta(spark.createDataFrame([("u1", "i1", "view", "1")],
                                                  "user_id string, item_id string, event_type string, event_ts string"))
    with pytest.raises(ingest.InputContractError, match="lacks required column.*visitorid"):
        ingest.normalize(raw, renamed)


def test_format_inference():
    assert readers.infer_format("/data/clicks.csv", False) == "csv"
    assert readers.infer_format("/data/clicks.jsonl", False) == "json"
    assert readers.infer_format("/data/events", True) == "delta"
    assert readers.infer_format("main.raw.clickstream", False) == "table"
    with pytest.raises(ValueError, match="set input.format"):
        readers.infer_format("/data/events", False)


def test_string_open_tables_take_strings():
    settings = load_settings([], ["input.columns.visitorid=user_id", "input.event_type_map.transaction=purchase"])
    assert settings.input.columns == {"visitorid": "user_id"}
    assert settings.input.event_type_map == {"transaction": "purchase"}
    with pytest.raises(ConfigError, match="'input.columns' maps to uid, not contract columns"):
        load_settings([], ["input.columns.visitorid=uid"])
    with pytest.raises(ConfigError, match="'input.timestamp_unit' must be one of s, ms, us"):
        load_settings([], ["input.timestamp_unit=min"])
    with pytest.raises(ConfigError, match="'ingest.encoding' must be one of"):
        load_settings([], ["ingest.encoding=cp1252"])


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


@pytest.mark.slow
def test_ingest_stage_reconciles_counts_and_is_idempotent(spark, tmp_path, context):
    csv_path = tmp_path / "clicks.csv"
    csv_path.write_text(CSV)
    ctx = context(*_sets(tmp_path, csv_path))
    tables = ctx.tables

    first = run_stage(ctx, "ingest")
    assert (first.rows_in, first.rows_out) == (8, 3)
    assert first.counts["quarantined"] == 4 and first.counts["duplicates"] == first.counts["duplicates.batch"] == 1
    assert first.rows_in == first.rows_out + first.counts["quarantined"] + first.counts["duplicates"]

    events = tables.read(spark, C.EVENTS)
    assert sorted((r["event_id"], r["user_id"], r["event_type"]) for r in events.collect()) == [
        ("a1", "alice", "view"), ("a2", "alice", "purchase"), ("a3", "bob", "email_click")]
    quarantine = {row["reason"]: row for row in tables.read(spark, C.EVENTS_QUARANTINE).collect()}
    assert set(quarantine) == {"missing_user_id", "unknown_event_type", "future_event_ts", "unparseable_event_ts"}
    assert '"event_id":"a5"' in quarantine["unknown_event_type"]["raw"]
    assert quarantine["unknown_event_type"]["raw_line"] == "a5,bob,sku-2,teleport,2026-10-01T10:00:00Z,,,,web"
    assert quarantine["unknown_event_type"]["source_file"].endswith("clicks.csv")

    second = run_stage(replace(ctx, run_id="run-2"), "ingest")
    assert (second.rows_in, second.rows_out, second.counts["duplicates"]) == (8, 0, 4)  # 3 known + 1 in batch
    assert (second.counts["duplicates.stored"], second.counts["duplicates.batch"]) == (4, 0)
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


@pytest.mark.slow
def test_a_changed_payload_under_a_stored_event_id_is_a_conflict(spark, tmp_path, context):
    csv_path = tmp_path / "clicks.csv"
    csv_path.write_text(CSV)
    ctx = context(*_sets(tmp_path, csv_path))
    run_stage(ctx, "ingest")
    csv_path.write_text(CSV.replace("a2,alice,sku-1,purchase,2026-10-01T10:05:00Z,1,19.99",
                                    "a2,alice,sku-1,purchase,2026-10-01T10:05:00Z,1,29.99", 1)
                        + "a8,dave,sku-4,click,2026-10-03T08:00:00Z,,,,web\n")
    lenient = load_settings([], [*_sets(tmp_path, csv_path), "ingest.max_quarantine_share=0.9"])
    second = run_stage(replace(ctx, run_id="run-2", settings=lenient), "ingest")
    # a1, a3 and one a2 stored as they are; the changed a2 conflicts; a8 is new.
    assert (second.rows_in, second.rows_out) == (9, 1)
    assert second.counts["reason.event_id_conflict"] == 1 and second.counts["duplicates.stored"] == 3
    assert second.rows_in == second.rows_out + second.counts["quarantined"] + second.counts["duplicates"]
    stored = ctx.tables.read(spark, C.EVENTS).where("event_id = 'a2'").collect()
    assert [row["revenue"] for row in stored] == [19.99]  # the first stored payload wins
    conflict = ctx.tables.read(spark, C.EVENTS_QUARANTINE).where("reason = 'event_id_conflict'").first()
    assert "29.99" in conflict["raw_line"] and "already stored" in conflict["detail"]


@pytest.mark.slow
def test_too_much_quarantined_fails_before_writing(spark, tmp_path, context):
    csv_path = tmp_path / "clicks.csv"
    csv_path.write_text(CSV)
    ctx = context(*_sets(tmp_path, csv_path))
    run_stage(ctx, "ingest")
    bad = CSV.splitlines()[0] + "\n" + "\n".join(f"b{i},bob,sku-2,teleport,2026-10-01T10:00:00Z,,,,web"
                                                  for i in range(3)) + "\nb9,bob,sku-2,view,,,,,web\n"
    csv_path.write_text(bad + "b10,bob,sku-2,view,2026-10-02T10:00:00Z,,,,web\n")
    with pytest.raises(ingest.IngestError) as err:
        run_stage(replace(ctx, run_id="run-2"), "ingest")
    message = str(err.value)
    assert "4 of 5 input records (80.0%)" in message
    assert "unknown_event_type: 3 rows, e.g. b0,bob,sku-2,teleport" in message and "missing_event_ts: 1 rows" in message
    assert ctx.tables.read(spark, C.EVENTS).count() == 3  # the previous run's events, nothing added
    assert ctx.tables.read(spark, C.EVENTS_QUARANTINE).count() == 4
    failed = ctx.tables.read(spark, C.PIPELINE_RUNS).where("run_id = 'run-2'").first()
    assert failed["status"] == "failed" and "unknown_event_type: 3 rows" in failed["message"]
    # The same input passes when the limit allows it.
    ok = run_stage(replace(ctx, run_id="run-3", settings=load_settings([], [*_sets(tmp_path, csv_path),
                                                                             "ingest.max_quarantine_share=0.9"])),
                   "ingest")
    assert (ok.rows_in, ok.rows_out, ok.counts["quarantined"]) == (5, 1, 4)


@pytest.mark.slow
def test_counts_that_do_not_reconcile_fail_the_stage_before_writing(spark, tmp_path, context, monkeypatch):
    csv_path = tmp_path / "clicks.csv"
    csv_path.write_text(CSV)
    ctx = context(*_sets(tmp_path, csv_path))
    resolve = ingest.resolve
    # A bug that loses a row between the reader and the writers must not pass as "reconciled".
    monkeypatch.setattr(ingest, "resolve", lambda classified, stored: resolve(classified, stored)
                        .where("coalesce(event_id, '') != 'a1'"))
    with pytest.raises(ingest.IngestError, match="reader saw 8 records but ingest sorted 7"):
        run_stage(ctx, "ingest")
    assert not ctx.tables.exists(spark, C.EVENTS)


@pytest.mark.slow
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
