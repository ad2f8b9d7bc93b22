"""All-or-nothing stages, data-quality gates and concurrent writers, on small Delta tables."""
from __future__ import annotations

import threading
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from pyspark.sql import functions as F

from jobs import build_interactions
from jobs.common import run_stage
from lib.ingest import events as ingest
from lib.platform import catalog as C
from lib.platform.quality import DataQualityError

pytestmark = pytest.mark.slow  # runs whole stages on generated data

START = datetime(2026, 10, 1)


def _events(spark, users: range, items: int = 5, day: int = 0):
    """Each user views ``items`` items on one day: users x items events with distinct ids."""
    rows = [(f"ev-{day}-{u}-{i}", f"u{u:04d}", f"i{(u + i) % 11:03d}", "view", START + timedelta(days=day, minutes=i),
             None, None, None, "web", (START + timedelta(days=day)).date(), "test")
            for u in users for i in range(items)]
    return spark.createDataFrame(rows, C.EVENTS.schema)


def _sets(root) -> list[str]:
    return [f"output.root={root}", "spark.shuffle_partitions=2"]


def test_a_failure_between_two_writes_restores_every_table_of_the_stage(spark, tmp_path, context, monkeypatch):
    ctx = context(*_sets(tmp_path / "wh"), run_id="run-1")
    ctx.tables.append(_events(spark, range(0, 20)), C.EVENTS)
    run_stage(ctx, "build_interactions")
    before = {t.name: ctx.tables.version(spark, t) for t in (C.USER_INDEX, C.ITEM_INDEX, C.INTERACTIONS)}
    users_before = sorted(tuple(r) for r in ctx.tables.read(spark, C.USER_INDEX).collect())

    ctx.tables.append(_events(spark, range(20, 30), day=1), C.EVENTS)  # 10 new users
    seen_running = []

    def fail_after_the_indices_grew(*args, **kwargs):
        # By now user_index and item_index have new commits; the run is visible as running.
        grown = ctx.tables.read(spark, C.USER_INDEX).count()
        running = ctx.tables.read(spark, C.PIPELINE_RUNS).where("run_id = 'run-2' AND status = 'running'").count()
        seen_running.append((grown, running))
        raise RuntimeError("injected failure between two writes")

    monkeypatch.setattr(build_interactions, "to_matrix_entries", fail_after_the_indices_grew)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_stage(replace(ctx, run_id="run-2"), "build_interactions")

    assert seen_running == [(30, 1)]
    after = {t.name: ctx.tables.version(spark, t) for t in (C.USER_INDEX, C.ITEM_INDEX, C.INTERACTIONS)}
    assert after["interactions"] == before["interactions"]          # never written
    assert after["user_index"] == before["user_index"] + 2          # grown, then restored (RESTORE commits)
    assert sorted(tuple(r) for r in ctx.tables.read(spark, C.USER_INDEX).collect()) == users_before
    run = ctx.tables.read(spark, C.PIPELINE_RUNS).where("run_id = 'run-2'").collect()
    assert [(r["status"], r["finished_at"] is not None) for r in run] == [("failed", True)]
    assert "restored user_index" in run[0]["message"] and "injected failure" in run[0]["message"]

    monkeypatch.undo()
    run_stage(replace(ctx, run_id="run-3"), "build_interactions")   # the next run starts from clean tables
    users = ctx.tables.read(spark, C.USER_INDEX)
    assert users.agg(F.count(F.lit(1)), F.countDistinct("user_idx"), F.max("user_idx")).first() == (30, 30, 29)


def test_a_failed_quality_gate_rolls_the_stage_back_and_is_recorded(spark, tmp_path, context):
    ctx = context(*_sets(tmp_path / "wh"), "quality.max_row_drop=0.1", run_id="run-1")
    ctx.tables.append(_events(spark, range(0, 10)), C.EVENTS)
    ctx.tables.append(_events(spark, range(10, 20), day=5), C.EVENTS)
    run_stage(ctx, "build_interactions")
    rows_before = ctx.tables.read(spark, C.INTERACTIONS).count()

    # As of day 2 half the users have no events yet: interactions would shrink by half.
    shrunk = context(*_sets(tmp_path / "wh"), "quality.max_row_drop=0.1",
                     "interactions.as_of=2026-10-03T00:00:00", run_id="run-2")
    with pytest.raises(DataQualityError, match="interactions_row_drop = 0.5 \\(threshold 0.1"):
        run_stage(shrunk, "build_interactions")
    assert ctx.tables.read(spark, C.INTERACTIONS).count() == rows_before
    gates = {(r["run_id"], r["gate"]): r["passed"] for r in ctx.tables.read(spark, C.DATA_QUALITY).collect()}
    assert gates[("run-1", "interactions_row_drop")] and gates[("run-1", "index_bijection")]
    assert gates[("run-2", "interactions_row_drop")] is False
    status = ctx.tables.read(spark, C.PIPELINE_RUNS).where("run_id = 'run-2'").first()["status"]
    assert status == "failed"


@pytest.mark.slow
def test_concurrent_build_interactions_keep_the_indices_exact(spark, tmp_path, context):
    """Two runs at once, twice, each time with new users: no id or index twice, no gap."""
    root = tmp_path / "wh"
    first = context(*_sets(root), run_id="a")
    for round_number in range(2):
        first.tables.append(_events(spark, range(round_number * 40, (round_number + 1) * 40), day=round_number),
                            C.EVENTS)
        errors: list[BaseException] = []

        def build(run_id: str) -> None:
            try:
                run_stage(context(*_sets(root), run_id=f"{run_id}{round_number}"), "build_interactions")
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=build, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        users = first.tables.read(spark, C.USER_INDEX)
        expected = (round_number + 1) * 40
        assert users.agg(F.count(F.lit(1)), F.countDistinct("user_id"), F.countDistinct("user_idx"),
                         F.min("user_idx"), F.max("user_idx")).first() == (expected, expected, expected, 0,
                                                                           expected - 1)
        interactions = first.tables.read(spark, C.INTERACTIONS)
        assert interactions.count() == interactions.select("user_idx", "item_idx").distinct().count()
        assert interactions.agg(F.sum("n_events")).first()[0] == expected * 5
    runs = first.tables.read(spark, C.PIPELINE_RUNS).where("stage = 'build_interactions'")
    assert runs.where("status = 'success'").count() == 4
    assert runs.where("counts['events_after_as_of'] < 0").count() == 0


CSV_HEADER = "event_id,user_id,item_id,event_type,event_ts,quantity,revenue"


def _csv_lines(ids: range) -> list[str]:
    return [f"e{i:04d},u{i % 37:03d},i{i % 13:03d},{'purchase' if i % 5 == 0 else 'view'},"
            f"2026-10-{1 + i % 28:02d}T{i % 24:02d}:00:00Z,{'1' if i % 5 == 0 else ''},{'9.5' if i % 5 == 0 else ''}"
            for i in ids]


@pytest.mark.slow
def test_concurrent_ingests_of_overlapping_files_leave_exact_tables(spark, tmp_path, context, monkeypatch):
    """Two ingests at once over files sharing event_ids (and one id with two payloads, and the same bad
    lines): every event once, quarantine rows once, and each run's counts reconcile."""
    shared_bad = ["b1,u1,i1,teleport,2026-10-01T10:00:00Z,,", "b2,,i1,view,2026-10-01T10:00:00Z,,"]
    files = {
        "a": _csv_lines(range(0, 300)) + shared_bad + ["c1,u1,i1,view,2026-10-02T10:00:00Z,,", "b3,u1,i1,view,,,"],
        "b": _csv_lines(range(200, 500)) + shared_bad + ["c1,u1,i2,view,2026-10-02T10:00:00Z,,"],
    }
    for name, lines in files.items():
        (tmp_path / f"{name}.csv").write_text("\n".join([CSV_HEADER, *lines]) + "\n")
    root = tmp_path / "wh"

    # Both runs have sorted their batch against the (empty) events table before either writes: the race
    # in which the second MERGE finds another run's rows under event_ids it counted as new.
    barrier = threading.Barrier(2, timeout=300)
    check_share = ingest.check_quarantine_share

    def both_sorted_then_write(*args, **kwargs):
        check_share(*args, **kwargs)
        barrier.wait()

    monkeypatch.setattr(ingest, "check_quarantine_share", both_sorted_then_write)
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            run_stage(context(*_sets(root), f"input.events={tmp_path / name}.csv",
                              "ingest.now=2026-11-01T00:00:00+00:00", run_id=f"ingest-{name}"), "ingest")
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(name,)) for name in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

    tables = context(*_sets(root)).tables
    events = tables.read(spark, C.EVENTS)
    ids = {f"e{i:04d}" for i in range(500)} | {"c1"}
    assert events.agg(F.count(F.lit(1)), F.countDistinct("event_id")).first() == (len(ids), len(ids))
    assert {r["event_id"] for r in events.select("event_id").collect()} == ids
    quarantine = tables.read(spark, C.EVENTS_QUARANTINE)
    assert quarantine.count() == quarantine.select("raw_hash", "reason").distinct().count() == 4
    assert {r["reason"]: r["n"] for r in quarantine.groupBy("reason").agg(F.count(F.lit(1)).alias("n")).collect()} \
        == {"unknown_event_type": 1, "missing_user_id": 1, "missing_event_ts": 1, "event_id_conflict": 1}

    runs = {r["run_id"]: r for r in tables.read(spark, C.PIPELINE_RUNS).where("stage = 'ingest'").collect()}
    assert sorted(runs) == ["ingest-a", "ingest-b"]
    for name, run_row in runs.items():
        counts = run_row["counts"]
        assert run_row["status"] == "success", run_row["message"]
        assert run_row["rows_in"] == len(files[name[-1]])
        assert run_row["rows_in"] == run_row["rows_out"] + counts["quarantined"] + counts["duplicates"]
    assert sum(r["rows_out"] for r in runs.values()) == len(ids)
    # The 100 shared events and the conflicting c1 went to whichever run lost the race.
    loser = min(runs.values(), key=lambda r: r["rows_out"])
    assert loser["counts"]["duplicates.stored"] == 100 and loser["counts"]["reason.event_id_conflict"] == 1
