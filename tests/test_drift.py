"""Drift against the previous run: PSI by hand on a few rows, and the drift checks of run_stage on
planted score and segment shifts (the stage's own work is replaced by writing the planted rows)."""
from __future__ import annotations

import math
from datetime import date

import pytest

from jobs import score_customers
from jobs.common import run_stage
from jobs.stages import BY_NAME
from lib.platform import catalog as C
from lib.platform.drift import EPSILON, numeric_psis, psi, quantile_edges, share_psi
from lib.platform.quality import DRIFT_CHECKS, DriftError, GateInput, measure_drift, raise_on_drift
from lib.platform.runs import StageResult

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
    assert numeric_psis(previous, same_with_a_null, ["x"], bins=5)["x"] == 0.0
    # 5..14 against bins (..2] (2..4] (4..6] (6..8] (8..): shares 0, 0, .2, .2, .6 against .2 each.
    shifted = spark.createDataFrame([(float(v),) for v in range(5, 15)], "x double")
    empty_bin = (EPSILON - 0.2) * math.log(EPSILON / 0.2)
    assert numeric_psis(previous, shifted, ["x"], bins=5)["x"] == pytest.approx(2 * empty_bin + 0.4 * math.log(3), rel=1e-12)
    assert math.isnan(numeric_psis(previous, spark.createDataFrame([(None,)], "x double"), ["x"], bins=5)["x"])


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


def test_a_planted_score_shift_fails_and_rolls_back_or_only_warns(spark, tmp_path, context, monkeypatch):
    sets = (f"output.root={tmp_path / 'wh'}", "spark.shuffle_partitions=2", "drift.bins=5")
    ctx = context(*sets, "drift.action=fail", run_id="run-2")
    spread = [i / 10 for i in range(10)]          # 0.0 .. 0.9: two users per bin of 5
    jumped = [0.6] * 2 + [0.9] * 8                # two in the bin (0.5, 0.7], eight above 0.7
    # An older as_of already shifted, then the previous run's: only the latest as_of is compared.
    ctx.tables.append(_scores(spark, "run-0", date(2026, 10, 1), jumped), C.CUSTOMER_SCORES)
    last_run = date(2026, 10, 8)
    score_customers.replace_as_of(ctx, ctx.tables, _scores(spark, "run-1", last_run, spread), last_run)
    previous = ctx.tables.version(spark, C.CUSTOMER_SCORES)

    tonight = date(2026, 10, 15)
    _plant(monkeypatch, spark, tonight, jumped)
    with pytest.raises(DriftError, match=r"customer_scores.churn_probability psi = \d+\.\d+ \(threshold 0.25"):
        run_stage(ctx, "score_customers")
    assert ctx.tables.read(spark, C.CUSTOMER_SCORES).where("run_id = 'run-2'").count() == 0   # rolled back
    assert ctx.tables.read(spark, C.PIPELINE_RUNS).where("run_id = 'run-2'").first()["status"] == "failed"
    # Against shares .2 x 5: three bins empty now (EPSILON), the 4th keeps .2, the 5th holds .8.
    empty_bin = (EPSILON - 0.2) * math.log(EPSILON / 0.2)
    churn_psi = round(3 * empty_bin + 0.6 * math.log(4), 9)
    band_psi = round(psi({"low": 5, "high": 5}, {"high": 10}), 9)
    # Columns with no value on either side (expected_revenue, the CLV columns, ...) have no PSI, no row.
    assert _drift(ctx, "run-2") == {
        "churn_probability": ("customer_scores", "psi", "fail", 0.25, previous, churn_psi),
        "churn_band": ("customer_scores", "psi", "fail", 0.25, previous, band_psi),
        "purchase_probability": ("customer_scores", "psi", "ok", 0.1, previous, 0.0),
        "eligible": ("customer_scores", "psi", "ok", 0.1, previous, 0.0)}

    # The same shift with action = warn (the default): status warn, nothing raised.
    before = {C.CUSTOMER_SCORES.name: ctx.tables.version(spark, C.CUSTOMER_SCORES)}
    score_customers.replace_as_of(ctx, ctx.tables, _scores(spark, "run-3", tonight, jumped), tonight)
    measured = measure_drift("score_customers", GateInput(spark, ctx.tables, context(*sets).settings, StageResult(),
                                                          before, "run-3"))
    assert {(m.column, m.status, m.threshold, round(m.value, 9)) for m in measured} == {
        ("churn_probability", "warn", 0.25, churn_psi), ("churn_band", "warn", 0.25, band_psi),
        ("purchase_probability", "ok", 0.1, 0.0), ("eligible", "ok", 0.1, 0.0)}
    raise_on_drift("score_customers", measured)


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
