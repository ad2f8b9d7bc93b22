"""Keyed pseudonyms and erasure: an erased customer is gone from every table and every file on disk."""
from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from jobs.common import load_settings, run_stage
from lib.campaign.audience import CUSTOMER_VALUE_COLUMNS
from lib.campaign.exports import ExportError, export_directory, read_export, write_export
from lib.ingest import events as ingest
from lib.ingest import readers
from lib.platform import catalog as C
from lib.platform import privacy
from lib.platform.privacy import REDACTION, PrivacyError, load_key, pseudonym, pseudonymize_events
from lib.platform.runs import StageResult, run_record

ERASED = "alice-7f3c9e"      # distinctive, so a byte search cannot match anything else
KEPT = "bob-41d2aa"
CSV = f"""event_id,user_id,item_id,event_type,event_ts,quantity,revenue,campaign_id,channel
e1,{ERASED},sku-1,view,2026-10-01T10:00:00Z,,,,web
e2,{ERASED},sku-2,purchase,2026-10-02T10:00:00Z,1,19.5,,web
e3,{KEPT},sku-1,view,2026-10-01T11:00:00Z,,,,web
e4,{KEPT},sku-3,add_to_cart,2026-10-03T11:00:00Z,,,,app
e5,{ERASED},sku-3,teleport,2026-10-03T12:00:00Z,,,,web
"""


def test_pseudonym_is_hmac_sha256(spark):
    key = b"k" * 20
    ids = ["u1", "jos\u00e9", "a" * 100]
    got = [r[0] for r in spark.createDataFrame([(i,) for i in ids], "user_id string")
           .select(pseudonym(F.col("user_id"), key)).collect()]
    assert got == [hmac.new(key, i.encode(), hashlib.sha256).hexdigest() for i in ids]
    long_key = b"x" * 100  # longer than a block: hashed first, as RFC 2104 says
    assert spark.range(1).select(pseudonym(F.lit("u1"), long_key)).first()[0] == \
        hmac.new(long_key, b"u1", hashlib.sha256).hexdigest()


def test_missing_key_fails_naming_the_variable(monkeypatch):
    monkeypatch.delenv("EP_TEST_KEY", raising=False)
    with pytest.raises(PrivacyError, match="set the environment variable EP_TEST_KEY"):
        load_key("EP_TEST_KEY")
    monkeypatch.setenv("EP_TEST_KEY", "short")
    with pytest.raises(PrivacyError, match="at least 16 characters"):
        load_key("EP_TEST_KEY")


def test_quarantine_and_refusal_messages_hold_pseudonyms_not_raw_ids(spark, tmp_path):
    """With pseudonyms on, quarantined rows (raw, raw_line, detail) and a refused ingest's message
    quote the pseudonym; a line with no readable fields keeps only its SHA-256."""
    key, raw_id = b"test-key-0123456789abcdef", "carol-5e1f0a"
    stored = hmac.new(key, raw_id.encode(), hashlib.sha256).hexdigest()
    malformed = f"e3,{raw_id},sku-3,view"
    csv_file = tmp_path / "clicks.csv"
    csv_file.write_bytes(
        (f"event_id,user_id,item_id,event_type,event_ts\ne1,{raw_id},sku-1,view,2026-10-01T10:00:00Z\n"
         f"e2, {raw_id} ,sku-2,teleport,2026-10-02T10:00:00Z\n{malformed}\n").encode()
        + f"e4,{raw_id},sku-\xff,view,2026-10-01T10:00:00Z\n".encode("latin-1"))
    json_file = tmp_path / "clicks.json"
    json_file.write_text(f'{{"user_id": "{raw_id}", "item_id": "sku-1", "event_type": "teleport", '
                         f'"event_ts": "2026-10-01T10:00:00Z"}}\n{{"user_id": "{raw_id}", "item_id": \n')
    settings = load_settings([], [])
    rules = ingest.Rules(settings.ingest.event_types, latest=datetime(2026, 11, 1, tzinfo=timezone.utc))
    for location, fmt, quarantined in ((csv_file, "csv", 3), (json_file, "json", 2)):
        raw = readers.read_raw(spark, str(location), fmt, json_columns=sorted(settings.input.source_names.values()))
        classified, _ = pseudonymize_events(ingest.classify(ingest.normalize(raw, settings.input), rules), key)
        resolved = ingest.resolve(ingest.pseudonymize_raw(classified, "user_id"), None)
        rows = [r.asDict() for r in ingest.quarantined_rows(resolved, "run-1").collect()]
        assert len(rows) == quarantined, rows
        assert not [r for r in rows if raw_id in str(r) or raw_id.encode().hex() in str(r)], rows
        by_reason = {r["reason"]: r for r in rows}
        teleport = json.loads(by_reason["unknown_event_type"]["raw"])
        assert teleport["user_id"] == stored and teleport["item_id"] in ("sku-1", "sku-2")
        assert all(r["raw_line"] is None for r in rows)
        if fmt == "csv":
            assert json.loads(by_reason["malformed_record"]["raw"]) == {
                "_line_sha256": hashlib.sha256(malformed.encode()).hexdigest()}
            assert by_reason["invalid_encoding"]["detail"] == "bytes not valid utf-8"
        outcome = ingest.count_outcomes(resolved)
        with pytest.raises(ingest.IngestError) as refused:
            ingest.check_quarantine_share(outcome.total, outcome, 0.1)
        assert raw_id not in str(refused.value) and stored in str(refused.value)


def _strings_in_parquet(path: Path) -> set[str]:
    table = pq.read_table(path)
    found: set[str] = set()
    for column in table.columns:
        for value in column.to_pylist():
            found.add(str(value))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("pseudonymize", [False, True])
def test_forget_removes_every_trace_after_vacuum(spark, tmp_path, context, monkeypatch, pseudonymize):
    source = tmp_path / "clicks.csv"
    source.write_text(CSV)
    request = tmp_path / "erase.csv"
    request.write_text(f"user_id\n{ERASED}\n")
    root = tmp_path / "wh"
    key = "test-key-0123456789abcdef"
    monkeypatch.setenv("EP_TEST_PSEUDONYM_KEY", key)
    ctx = context(f"input.events={source}", f"output.root={root}", "spark.shuffle_partitions=2",
                  "ingest.now=2026-11-01T00:00:00+00:00", f"privacy.erasure_request={request}",
                  "privacy.vacuum_retention_hours=0", f"privacy.pseudonymize={str(pseudonymize).lower()}",
                  "privacy.key_env=EP_TEST_PSEUDONYM_KEY")
    run_stage(ctx, "ingest")
    run_stage(ctx, "build_interactions")
    held = hmac.new(key.encode(), ERASED.encode(), hashlib.sha256).hexdigest() if pseudonymize else ERASED
    assert ctx.tables.read(spark, C.EVENTS_QUARANTINE).where(F.col("raw").contains(held)).count() == 1
    if pseudonymize:  # no raw id anywhere but the identity map, pipeline_runs included
        for table in C.ALL_TABLES:
            if table is C.USER_IDENTITIES or not ctx.tables.exists(spark, table):
                continue
            rows = ctx.tables.read(spark, table)
            text = F.concat_ws("|", *[F.col(c).cast("string") for c in rows.columns])
            assert rows.where(text.contains(ERASED) | text.contains(KEPT)).count() == 0, table.name
    stored_ids = {r["user_id"] for r in ctx.tables.read(spark, C.EVENTS).select("user_id").distinct().collect()}
    if pseudonymize:
        expected = {hmac.new(key.encode(), raw.encode(), hashlib.sha256).hexdigest() for raw in (ERASED, KEPT)}
        assert stored_ids == expected
        identities = {(r["user_key"], r["user_id"]) for r in ctx.tables.read(spark, C.USER_IDENTITIES).collect()}
        assert {raw for _, raw in identities} == {ERASED, KEPT} and {k for k, _ in identities} >= expected
    else:
        assert stored_ids == {ERASED, KEPT}
    before_version = ctx.tables.version(spark, C.EVENTS)
    stored = {raw: r["user_id"] for raw in (ERASED, KEPT) for r in
              ctx.tables.read(spark, C.EVENTS).where(F.col("event_id") == ("e1" if raw == ERASED else "e3")).collect()}
    erased_ids = {ERASED, stored[ERASED]}  # the raw id and, with pseudonyms, the pseudonym
    _plant_traces(spark, ctx, root, stored)

    # Killed right after its events delete (the case): the rows are gone from the current
    # version, but not yet from the files on disk.
    real_delete = privacy._delete
    calls = []

    def killed_after_first_table(*args):
        if calls:
            raise RuntimeError("killed")
        calls.append(args[2].name)
        return real_delete(*args)

    monkeypatch.setattr(privacy, "_delete", killed_after_first_table)
    with pytest.raises(RuntimeError, match="killed"):
        run_stage(replace(ctx, run_id="erase-1"), "forget_users")
    monkeypatch.setattr(privacy, "_delete", real_delete)
    assert calls == ["events"]
    assert ctx.tables.read(spark, C.EVENTS).where(F.col("user_id") == stored[ERASED]).count() == 0
    assert any(erased_ids & _strings_in_parquet(p) for p in (root / "events").rglob("*.parquet"))

    result = run_stage(replace(ctx, run_id="erase-2"), "forget_users")
    assert result.counts["attempt"] == 2 and result.counts["files_pending_vacuum"] == 0
    assert result.counts["deleted.events"] == 2 and result.counts["deleted.events_quarantine"] == 1
    assert result.counts["deleted.user_index"] == 1 and result.counts["deleted.interactions"] == 2
    assert result.counts.get("deleted.user_identities", 0) == (1 if pseudonymize else 0)
    assert result.counts["redacted.pipeline_runs"] == 2
    assert result.counts["exports_removed"] == 1 and result.counts["models_rewritten"] == 1
    steps = {(r["run_id"], r["step"], r["target"]): r["rows"] for r in ctx.tables.read(spark, C.ERASURE_REQUESTS)
             .where(F.col("request") == str(request)).collect()}
    assert steps[("erase-1", "deleted", "events")] == 2 and ("erase-2", "verified", None) in steps
    assert ("erase-2", "vacuumed", "events") in steps and ("erase-1", "vacuumed", "events") not in steps

    messages = [r["message"] for r in ctx.tables.read(spark, C.PIPELINE_RUNS).collect()]
    assert sum(REDACTION in m for m in messages if m) == 2
    assert not any(i in m for m in messages if m for i in erased_ids)
    with pytest.raises(ExportError, match="no manifest"):
        read_export(export_directory(str(root / "exports"), "winback", "run-1"))
    kept_export = read_export(export_directory(str(root / "exports"), "welcome", "run-1"))
    assert [r["external_id"] for r in kept_export.records("json")] == [stored[KEPT]]
    factors = pq.read_table(root / "models" / "als" / "run-1" / "userFactors").column("id").to_pylist()
    assert len(factors) == 1

    for table in C.ALL_TABLES:
        if table in C.BOOKKEEPING or not ctx.tables.exists(spark, table):
            continue
        rows = ctx.tables.read(spark, table)
        text = F.concat_ws("|", *[F.col(c).cast("string") for c in rows.columns])
        assert rows.where(text.contains(ERASED) | text.contains(stored[ERASED])).count() == 0, table.name
    assert ctx.tables.read(spark, C.EVENTS).count() == 2   # the other customer's events stay

    # Nothing on disk: no data file holds the id (old versions were vacuumed), nor any log file.
    data_files = [p for p in root.rglob("*.parquet") if "_delta_log" not in p.parts]
    assert data_files
    for path in data_files:
        assert not any(ERASED in value for value in _strings_in_parquet(path)), path
        assert not erased_ids & _strings_in_parquet(path), path
    for path in root.rglob("*"):  # the logs, the exports, the model's metadata, the reports
        if path.is_file() and path.suffix != ".parquet":
            assert not any(i.encode() in path.read_bytes() for i in erased_ids), path
        if path.is_file() and "_delta_log" in path.parts:
            if path.suffix == ".parquet":
                assert not any(ERASED in value for value in _strings_in_parquet(path)), path
            else:
                assert ERASED.encode() not in path.read_bytes(), path
    with pytest.raises(Exception):  # the old version's files are gone: time travel cannot bring it back
        ctx.tables.read(spark, C.EVENTS, before_version).where(F.col("user_id") == ERASED).count()

    # A trace the erasure does not clean (a hand-written note) is found, the file named.
    (root / "reports" / "notes.md").write_text(f"customer `{ERASED}` asked twice\n")
    erased = privacy.prepare_request(spark, ctx.tables, spark.createDataFrame([(ERASED,)], "user_id string"),
                                     key.encode() if pseudonymize else None, "check", "check")
    targets = privacy.ErasureTargets(str(root / "exports"), str(root / "models" / "als"), (str(root / "reports"),))
    checked, failures, pending = privacy.verify_erasure(spark, ctx.tables, erased, targets, 0.0)
    assert checked > 0 and not pending
    assert [Path(f).name for f in failures] == ["notes.md"]


def _plant_traces(spark, ctx, root: Path, stored: dict[str, str]) -> None:
    """What later stages and a refused ingest leave: run messages quoting the id (raw and stored),
    an export naming the customer and one that does not, a saved model with their factors, a report."""
    now = datetime(2026, 11, 1, tzinfo=timezone.utc)
    for run_id, quoted in (("refused-1", ERASED), ("refused-2", stored[ERASED])):
        ctx.tables.append(run_record(spark, run_id, "ingest", "failed", now, now,
                                     StageResult(message=f"ValueError: refused row of {quoted} (line 3)")),
                          C.PIPELINE_RUNS)
    audience = spark.createDataFrame(
        [(campaign, stored[raw], "treatment", None, None, 1, "sports", [("sku-1", 1, 0.5, "als", "Ball", "sports", 9.5)], "high",
          0.3, 10, *[None] * len(CUSTOMER_VALUE_COLUMNS), "run-1")
         for campaign, raw in (("winback", ERASED), ("winback", KEPT), ("welcome", KEPT))], C.CAMPAIGN_AUDIENCE.schema)
    for campaign in ("winback", "welcome"):
        write_export(spark, audience.where(F.col("campaign_id") == campaign),
                     export_directory(str(root / "exports"), campaign, "run-1"), ("csv", "json"), 100, campaign,
                     "run-1", now)
    indices = {r["user_id"]: r["user_idx"] for r in ctx.tables.read(spark, C.USER_INDEX).collect()}
    spark.createDataFrame([(indices[stored[raw]], [0.1, 0.2]) for raw in (ERASED, KEPT)],
                          "id int, features array<float>").write.parquet(str(root / "models/als/run-1/userFactors"))
    (root / "reports" / "segments").mkdir(parents=True)
    (root / "reports" / "segments" / "segments.md").write_text(
        f"| segment | example |\n|---|---|\n| 1 | `{stored[KEPT]}` |\n")
