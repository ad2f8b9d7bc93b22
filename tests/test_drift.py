"""Drift against the previous run: PSI by hand on a few rows, and the drift checks of run_stage on
planted score and segment shifts (the stage's own work is replaced by writing the planted rows)."""
from __future__ import annotations

import math
from dataclasses import replace
from datetime import date

import pytest

from jobs import score_customers
from jobs.common import run_stage
from jobs.stages import BY_NAME
from lib import catalog as C
from lib.drift import EPSILON, numeric_psi, psi, quantile_edges, share_psi
from lib.quality import DRIFT_CHECKS, DriftError, GateInput, measure_drift
from lib.runs import StageResult

# Half / half moved to 80 / 20: (0.8 - 0.5) ln(0.8 / 0.5) + (0.2 - 0.5) ln(0.2 / 0.5).
EIGHTY_TWENTY = 0.3 * math.log(1.6) - 0.3 * math.log(0.4)


def test_psi_by_hand():
    assert psi({"a": 5, "b": 5}, {"a": 50, "b": 50}) == 0.0
    assert psi({"a": 50, "b": 50}, {"a": 80, "b": 20}) == pytest.approx(EIGHTY_TWENTY, rel=1e-12)
    assert EIGHTY_TWENTY == pytest.approx(0.4159, abs=1e-4)
    # A bin empty on one side counts as EPSILON, not zero: finite, and large.
    assert psi({"a": 10}, {"a": 5, "b": 5}) == pytest.approx(
        (0.5 - 1) * math.log(0.5) + (0.5 - EPSILON) * math.log(0.5 / EPSILON), rel=1e-12)
    assert math.isnan(psi({}, {"a": 1}))


def test_numeric_psi_cuts_at_the_previous_quantiles(spark):
    previous = spark.createDataFrame([(float(v),) for v in range(1, 11)], "x double")
    assert quantile_edges(previous, ["x"], 5) == {"x": [2.0, 4.0, 6.0, 8.0]}
    same_with_a_null = spark.createDataFrame([(float(v),) for v in range(1, 11)] + [(None,)], "x double")
    assert numeric_psi(previous, same_with_a_null, "x", bins=5) == 0.0
    # 5..14 against bins (..2] (2..4] (4..6] (6..8] (8..): shares 0, 0, .2, .2, .6 against .2 each.
    shifted = spark.createDataFrame([(float(v),) for v in range(5, 15)], "x double")
    empty_bin = (EPSILON - 0.2) * math.log(EPSILON / 0.2)
    assert numeric_psi(previous, shifted, "x", bins=5) == pytest.approx(2 * empty_bin + 0.4 * math.log(3), rel=1e-12)
    assert math.isnan(numeric_psi(previous, spark.createDataFrame([(None,)], "x double"), "x", bins=5))


def test_share_psi_of_segment_ids(spark):
    halves = spark.createDataFrame([(f"u{i}", i % 2) for i in range(10)], "user_id string, segment_id int")
    eighty = spark.createDataFrame([(f"u{i}", int(i >= 8)) for i in range(10)], "user_id string, segment_id int")
    assert share_psi(halves, halves, "segment_id") == 0.0
    assert share_psi(halves, eighty, "segment_id") == pytest.approx(EIGHTY_TWENTY, rel=1e-12)


def test_each_drift_check_measures_columns_its_stage_writes():
    for stage, checks in DRIFT_CHECKS.items():
        for check in checks:
            assert check.table in BY_NAME[stage].writes, (stage, check.table.name)
            assert set(check.numeric) | set(check.categorical) | {check.latest or "run_id", "run_id"} \
                <= set(check.table.columns), check.table.name


def _scores(spark, run_id: str, as_of: date, churn: list[float]):
    """customer_scores rows of one run: one eligible user per churn probability, the rest of the row null."""
    empty = {name: None for name in C.CUSTOMER_SCORES.columns}
    rows = [{**empty, "user_id": f"u{i:02d}", "as_of": as_of, "churn_probability": p, "purchase_probability": 0.5,
             "churn_band": "high" if p >= 0.5 else "low", "eligible": True, "run_id": run_id}
            for i, p in enumerate(churn)]
    return spark.createDataFrame(rows, C.CUSTOMER_SCORES.schema)


def _plant(monkeypatch, spark, as_of: date, churn: list[float]) -> None:
    """score_customers writes these rows instead of scoring (as it writes: one as_of replaced)."""
    def run(ctx):
        score_customers.replace_as_of(ctx, ctx.tables, _scores(spark, ctx.run_id, as_of, churn), as_of)
        return StageResult(rows_out=len(churn))
    monkeypatch.setattr(score_customers, "run", run)


def _drift(ctx, run_id: str) -> dict[str, tuple]:
    rows = ctx.tables.read(ctx.spark, C.DRIFT).where(f"run_id = '{run_id}'").collect()
    return {r["column_name"]: (r["table_name"], r["statistic"], r["status"], r["threshold"], r["previous_version"],
                               round(r["value"], 9)) for r in rows}


def test_a_planted_score_shift_warns_or_fails_and_rolls_back(spark, tmp_path, context, monkeypatch):
    sets = (f"output.root={tmp_path / 'wh'}", "spark.shuffle_partitions=2", "drift.bins=5")
    first = context(*sets, run_id="run-1")
    spread = [i / 10 for i in range(10)]          # 0.0 .. 0.9: two users per bin of 5
    _plant(monkeypatch, spark, date(2026, 10, 1), spread)
    run_stage(first, "score_customers")
    assert not first.tables.exists(spark, C.DRIFT)   # the first version: nothing to compare

    _plant(monkeypatch, spark, date(2026, 10, 8), spread)
    run_stage(replace(first, run_id="run-2"), "score_customers")
    version_1 = first.tables.version(spark, C.CUSTOMER_SCORES) - 1
    # Columns with no value on either side (expected_revenue, the CLV columns, ...) have no PSI, no row.
    assert _drift(first, "run-2") == {
        column: ("customer_scores", "psi", "ok", 0.1, version_1, 0.0)
        for column in ("churn_probability", "purchase_probability", "churn_band", "eligible")}

    # Everyone's churn risk jumps above 0.5: two customers in the bin (0.5, 0.7], eight above 0.7.
    version_2 = first.tables.version(spark, C.CUSTOMER_SCORES)
    jumped = [0.6] * 2 + [0.9] * 8
    _plant(monkeypatch, spark, date(2026, 10, 15), jumped)
    failing = context(*sets, "drift.action=fail", run_id="run-3")
    with pytest.raises(DriftError, match=r"customer_scores.churn_probability psi = \d+\.\d+ \(threshold 0.25"):
        run_stage(failing, "score_customers")
    assert first.tables.read(spark, C.CUSTOMER_SCORES).where("run_id = 'run-3'").count() == 0   # rolled back
    status = first.tables.read(spark, C.PIPELINE_RUNS).where("run_id = 'run-3'").first()["status"]
    assert status == "failed"
    # Against shares .2 x 5: three bins empty now (EPSILON), the 4th keeps .2, the 5th holds .8.
    empty_bin = (EPSILON - 0.2) * math.log(EPSILON / 0.2)
    churn_psi = round(3 * empty_bin + 0.6 * math.log(4), 9)
    band_psi = round(psi({"low": 5, "high": 5}, {"high": 10}), 9)
    drift = _drift(first, "run-3")
    assert drift["churn_probability"] == ("customer_scores", "psi", "fail", 0.25, version_2, churn_psi)
    assert drift["churn_band"] == ("customer_scores", "psi", "fail", 0.25, version_2, band_psi)
    assert drift["purchase_probability"][2:] == ("ok", 0.1, version_2, 0.0)

    # The same shift with action = warn (the default): recorded as warn, the stage succeeds. Its
    # previous version is the restored one (run-2's rows, a newer version number).
    restored = first.tables.version(spark, C.CUSTOMER_SCORES)
    run_stage(context(*sets, run_id="run-4"), "score_customers")
    assert first.tables.read(spark, C.CUSTOMER_SCORES).where("run_id = 'run-4'").count() == 10
    drift = _drift(first, "run-4")
    assert drift["churn_probability"] == ("customer_scores", "psi", "warn", 0.25, restored, churn_psi)
    assert drift["eligible"][2] == "ok"


def test_segment_shares_drift(spark, tmp_path, context):
    ctx = context(f"output.root={tmp_path / 'wh'}", "spark.shuffle_partitions=2", "drift.psi_warn=0.05",
                  "drift.psi_fail=0.5", run_id="run-2")
    segments = lambda run_id, ids: spark.createDataFrame(  # noqa: E731
        [(f"u{i}", s, 1.0, run_id) for i, s in enumerate(ids)], C.USER_SEGMENTS.schema)
    ctx.tables.overwrite(segments("run-1", [i % 2 for i in range(10)]), C.USER_SEGMENTS)
    before = {C.USER_SEGMENTS.name: ctx.tables.version(spark, C.USER_SEGMENTS)}
    ctx.tables.overwrite(segments("run-2", [int(i >= 8) for i in range(10)]), C.USER_SEGMENTS)
    measured = measure_drift("segment_users", GateInput(spark, ctx.tables, ctx.settings, StageResult(), before,
                                                        "run-2"))
    assert [(m.table, m.column, m.status, m.threshold, m.previous_version) for m in measured] == [
        ("user_segments", "segment_id", "warn", 0.05, before["user_segments"])]
    assert measured[0].value == pytest.approx(EIGHTY_TWENTY, rel=1e-12)
    first_version = GateInput(spark, ctx.tables, ctx.settings, StageResult(), {C.USER_SEGMENTS.name: None}, "run-2")
    assert measure_drift("segment_users", first_version) == []
