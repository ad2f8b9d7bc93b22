"""Data-quality gates: checks on what a stage just wrote, before the stage counts as done.

Each gate measures one number on the stage's output (a share, a count, a change against the table's
previous version) and compares it with a threshold from ``[quality]``. Every measurement becomes a
``data_quality`` row; a failed gate fails the stage, which ``jobs.common.run_stage`` then rolls back,
so later stages never read output that failed a gate.

Drift checks sit beside the gates: after a stage that writes customer scores or segments, each
measured column's population stability index (``lib.platform.drift``) against the table's version before the
stage becomes a ``drift`` row with status ok / warn / fail (``[drift]``); a fail, only with
``drift.action = "fail"``, fails and rolls back the stage like a gate.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lib.platform import catalog as C
from lib.platform.drift import numeric_psis, share_psi
from lib.platform.runs import StageResult
from lib.platform.settings import DriftSettings, Settings
from lib.platform.storage import Tables

log = logging.getLogger("lib.platform.quality")


class DataQualityError(RuntimeError):
    """A gate failed; the message names the gate, the measured value and the threshold."""


class DriftError(DataQualityError):
    """A column drifted beyond drift.psi_fail with drift.action = "fail"; the message names it."""


@dataclass(frozen=True)
class GateInput:
    """What a gate may look at: the written tables, the settings, the stage's result, and the version
    each written table had before the stage ran (None: it did not exist)."""

    spark: SparkSession
    tables: Tables
    settings: Settings
    result: StageResult
    versions_before: dict[str, int | None]
    run_id: str = ""

    def previous(self, table: C.TableSpec) -> DataFrame | None:
        version = self.versions_before.get(table.name)
        return None if version is None else self.tables.read(self.spark, table, version)


@dataclass(frozen=True)
class Measurement:
    gate: str
    value: float
    threshold: float
    passed: bool
    detail: str


Gate = Callable[[GateInput], Measurement]


def _at_most(gate: str, value: float, threshold: float, detail: str) -> Measurement:
    return Measurement(gate, float(value), float(threshold), value <= threshold, detail)


def _at_least(gate: str, value: float, threshold: float, detail: str) -> Measurement:
    return Measurement(gate, float(value), float(threshold), value >= threshold, detail)


def _bad_rows(df: DataFrame, condition) -> int:
    return int(df.where(condition).count())


def events_without_keys(ctx: GateInput) -> Measurement:
    events = ctx.tables.read(ctx.spark, C.EVENTS)
    bad = _bad_rows(events, F.col("user_id").isNull() | F.col("item_id").isNull() | F.col("event_ts").isNull())
    return _at_most("events_null_keys", bad, 0, "events rows with a null user_id, item_id or event_ts")


def interactions_scores_valid(ctx: GateInput) -> Measurement:
    rows = ctx.tables.read(ctx.spark, C.INTERACTIONS)
    bad = _bad_rows(rows, F.col("score").isNull() | F.isnan("score") | (F.col("score") < 0)
                    | F.col("user_idx").isNull() | F.col("item_idx").isNull())
    return _at_most("interactions_score_range", bad, 0, "interactions rows with a null key or a score < 0 / NaN")


def interactions_row_drop(ctx: GateInput) -> Measurement:
    """Share of rows lost against the previous version: a sudden shrink means a broken input."""
    previous = ctx.previous(C.INTERACTIONS)
    limit = ctx.settings.quality.max_row_drop
    if previous is None:
        return _at_most("interactions_row_drop", 0.0, limit, "first version: nothing to compare")
    before = previous.count()
    after = ctx.tables.read(ctx.spark, C.INTERACTIONS).count()
    drop = max(0.0, (before - after) / before) if before else 0.0
    return _at_most("interactions_row_drop", drop, limit, f"{before} rows before, {after} now")


def indices_exact(ctx: GateInput) -> Measurement:
    """Each index is a bijection onto 0..n-1: no id twice, no index twice, no gap."""
    problems = 0
    for table, id_col, idx_col in ((C.USER_INDEX, "user_id", "user_idx"), (C.ITEM_INDEX, "item_id", "item_idx")):
        row = ctx.tables.read(ctx.spark, table).agg(
            F.count(F.lit(1)).alias("rows"), F.countDistinct(id_col).alias("ids"),
            F.countDistinct(idx_col).alias("idxs"), F.max(idx_col).alias("top")).first()
        rows = int(row["rows"])
        problems += (rows - int(row["ids"])) + (rows - int(row["idxs"])) + abs((int(row["top"]) + 1 if rows else 0) - rows)
    return _at_most("index_bijection", problems, 0, "duplicate ids, duplicate indices or gaps in user/item_index")


def largest_segment_share(ctx: GateInput) -> Measurement:
    share = ctx.tables.read(ctx.spark, C.SEGMENT_PROFILES).agg(F.max("share")).first()[0] or 0.0
    return _at_most("largest_segment_share", share, ctx.settings.quality.max_segment_share,
                    "share of assigned customers in the largest segment")


def recommended_user_share(ctx: GateInput) -> Measurement:
    users = ctx.tables.read(ctx.spark, C.INTERACTIONS).select("user_idx").distinct().count()
    listed = ctx.tables.read(ctx.spark, C.RECOMMENDATIONS).select("user_id").distinct().count()
    share = listed / users if users else 1.0
    return _at_least("recommended_user_share", share, ctx.settings.quality.min_recommended_user_share,
                     f"{listed} of {users} users with interactions have a list")


def recommendation_scores_valid(ctx: GateInput) -> Measurement:
    recs = ctx.tables.read(ctx.spark, C.RECOMMENDATIONS)
    top_n = ctx.settings.recommend.top_n
    bad = _bad_rows(recs, F.col("score").isNull() | F.isnan("score") | (F.col("rank") < 1) | (F.col("rank") > top_n))
    return _at_most("recommendation_rows_valid", bad, 0, f"rows with a null/NaN score or a rank outside 1..{top_n}")


# Gates per stage name, in the order they run.
GATES: dict[str, tuple[Gate, ...]] = {
    "ingest": (events_without_keys,),
    "build_interactions": (indices_exact, interactions_scores_valid, interactions_row_drop),
    "segment_users": (largest_segment_share,),
    "recommend_items": (recommendation_scores_valid, recommended_user_share),
}


def check_gates(stage: str, ctx: GateInput) -> list[Measurement]:
    """Every gate of ``stage``, measured (all of them, so the table shows each failure)."""
    if not ctx.settings.quality.enabled:
        return []
    return [gate(ctx) for gate in GATES.get(stage, ())]


def quality_rows(spark: SparkSession, run_id: str, stage: str, measurements: list[Measurement]) -> DataFrame:
    return spark.createDataFrame(
        [(run_id, stage, m.gate, m.value, m.threshold, m.passed, m.detail) for m in measurements],
        C.DATA_QUALITY.schema)


def raise_on_failure(stage: str, measurements: list[Measurement]) -> None:
    failed = [m for m in measurements if not m.passed]
    if failed:
        raise DataQualityError(f"stage {stage}: data-quality gate(s) failed: " + "; ".join(
            f"{m.gate} = {m.value:g} (threshold {m.threshold:g}: {m.detail})" for m in failed))


@dataclass(frozen=True)
class DriftCheck:
    """What drift is measured on one table: numeric columns (quantile bins) and categorical ones (shares).

    ``latest``: a partition column whose newest value in the previous version is the previous run's
    rows (customer_scores keeps every as_of; the previous run is its latest one). This run's rows are
    the ones carrying its run_id.
    """

    table: C.TableSpec
    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    latest: str = ""


@dataclass(frozen=True)
class DriftMeasurement:
    table: str
    column: str
    statistic: str
    value: float
    threshold: float
    status: str
    previous_version: int


# What each stage's drift checks measure. churn_percentile is left out: a rank within the run, uniform
# by construction, its PSI is always near 0. eligible's share catches a run that could not score at all
# (its numeric columns are then empty, so they have no PSI).
DRIFT_CHECKS: dict[str, tuple[DriftCheck, ...]] = {
    "segment_users": (DriftCheck(C.USER_SEGMENTS, categorical=("segment_id",)),),
    "score_customers": (DriftCheck(
        C.CUSTOMER_SCORES,
        numeric=("churn_probability", "purchase_probability", "expected_revenue", "engagement_score",
                 "historic_clv", "predicted_clv", "total_clv", "p_alive", "expected_orders",
                 "avg_days_between_orders"),
        categorical=("churn_band", "eligible"), latest="as_of"),),
}


def drift_status(value: float, settings: DriftSettings) -> tuple[str, float]:
    """(status, the threshold that decided it): fail above psi_fail only when action is fail."""
    if value > settings.psi_fail:
        return ("fail" if settings.action == "fail" else "warn"), settings.psi_fail
    return ("warn" if value > settings.psi_warn else "ok"), settings.psi_warn


def _previous_run_rows(previous: DataFrame, latest: str) -> DataFrame:
    if not latest:
        return previous
    newest = previous.agg(F.max(latest)).first()[0]
    return previous.where(F.col(latest) == F.lit(newest)) if newest is not None else previous.limit(0)


def measure_drift(stage: str, ctx: GateInput) -> list[DriftMeasurement]:
    """Every drift check of ``stage`` against the versions before it ran; a table's first version has
    nothing to compare (no rows), and a numeric column with no values on one side has no PSI."""
    settings = ctx.settings.drift
    if not settings.enabled:
        return []
    measurements = []
    for check in DRIFT_CHECKS.get(stage, ()):
        version = ctx.versions_before.get(check.table.name)
        if version is None:
            log.info("drift of %s: first version, nothing to compare", check.table.name)
            continue
        started = time.monotonic()
        previous = _previous_run_rows(ctx.previous(check.table), check.latest)
        current = ctx.tables.read(ctx.spark, check.table).where(F.col("run_id") == F.lit(ctx.run_id))
        values = {**numeric_psis(previous, current, check.numeric, settings.bins),
                  **{column: share_psi(previous, current, column) for column in check.categorical}}
        for column in (*check.numeric, *check.categorical):
            value = values[column]
            if math.isnan(value):
                log.info("drift of %s.%s: no values in the previous or this run, no PSI", check.table.name, column)
                continue
            status, threshold = drift_status(value, settings)
            if status != "ok":
                log.warning("drift of %s.%s: PSI %.3f above %g (%s) against version %d", check.table.name,
                            column, value, threshold, status, version)
            measurements.append(DriftMeasurement(check.table.name, column, "psi", value, threshold, status, version))
        log.info("drift of %s against version %d: %d columns in %.1f s", check.table.name, version,
                 len(check.numeric) + len(check.categorical), time.monotonic() - started)
    return measurements


def drift_rows(spark: SparkSession, run_id: str, stage: str, measurements: list[DriftMeasurement]) -> DataFrame:
    return spark.createDataFrame(
        [(run_id, stage, m.table, m.column, m.statistic, m.value, m.threshold, m.status, m.previous_version)
         for m in measurements], C.DRIFT.schema)


def raise_on_drift(stage: str, measurements: list[DriftMeasurement]) -> None:
    failed = [m for m in measurements if m.status == "fail"]
    if failed:
        raise DriftError(f"stage {stage}: drift beyond drift.psi_fail (drift.action = fail): " + "; ".join(
            f"{m.table}.{m.column} {m.statistic} = {m.value:.3f} (threshold {m.threshold:g}, previous version "
            f"{m.previous_version})" for m in failed))
