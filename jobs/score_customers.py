"""Customer scores: churn and purchase probability in the next horizon, expected revenue, customer value
(CLV, p_alive, next order date) and email engagement per user into customer_scores (one row per user per
as_of; a re-run replaces its as_of), validation metrics beside their baselines into model_metrics, the
segments' mean scores into segment_outcomes (when user_segments exists), a markdown report, and each
target's chosen Spark model with its calibrator under <root>/models/scores/<run_id>/<target> (registered in
MLflow by lib.platform.tracking)."""
from __future__ import annotations

import logging
from datetime import date

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.common import StageContext, main_for, report_directories, score_models_root
from lib.features.customers import segment_affinities
from lib.features.interactions import resolve_as_of
from lib.platform import catalog as C
from lib.platform.runs import SavedModel, StageResult
from lib.platform.storage import Tables
from lib.scores.report import write_score_report
from lib.scores.scoring import finalize_scores, score_customers, segment_outcomes

log = logging.getLogger("jobs.score_customers")


def replace_as_of(ctx: StageContext, tables: Tables, rows: DataFrame, as_of: date,
                  table: C.TableSpec = C.CUSTOMER_SCORES) -> None:
    """Write one as_of's rows in one Delta commit, replacing that date's earlier rows (replaceWhere)."""
    if not tables.exists(ctx.spark, table):
        tables.append(rows, table)
    else:
        tables.replace_where(rows, table, f"as_of = DATE'{as_of.isoformat()}'")


def run(ctx: StageContext) -> StageResult:
    settings = ctx.settings.scores
    spark, tables, run_id = ctx.spark, ctx.tables, ctx.run_id
    events = tables.require(spark, C.EVENTS, "ingest")
    as_of = resolve_as_of(settings.as_of_utc, events, tables.location(C.EVENTS)).date()
    affinities, k = None, 0
    if tables.exists(spark, C.NMF_USER_FACTORS):
        factors = tables.read(spark, C.NMF_USER_FACTORS)
        k = factors.agg(F.max(F.size("factors"))).first()[0] or 0
        affinities = segment_affinities(factors) if k else None

    outcome = score_customers(events, as_of, settings, affinities, k)
    if outcome.eligible:
        version = ";".join(f"{t}={m}+{settings.calibration}" for t, m in sorted(outcome.chosen.items()))
        version += f"@{run_id}"
    else:
        version = f"none@{run_id}"
    rows = finalize_scores(outcome.scores, as_of, settings, version, run_id).persist()
    replace_as_of(ctx, tables, rows, as_of)
    by_segment: list[dict] = []
    if tables.exists(spark, C.USER_SEGMENTS):
        by_segment = [row.asDict() for row in  # k rows
                      segment_outcomes(rows, tables.read(spark, C.USER_SEGMENTS)).collect()]
        replace_as_of(ctx, tables, spark.createDataFrame(
            [(run_id, as_of, *[row[name] for name in C.SEGMENT_OUTCOMES.columns[2:]]) for row in by_segment],
            C.SEGMENT_OUTCOMES.schema), as_of, C.SEGMENT_OUTCOMES)
    summary = rows.agg(F.count(F.lit(1)).alias("users"), F.sum(F.col("eligible").cast("int")).alias("eligible"),
                       *[F.sum((F.col("churn_band") == b).cast("int")).alias(b) for b in ("low", "medium", "high")]
                       ).first()
    rows.unpersist()
    outcome.scores.unpersist()
    saved = {}
    for target, (model, calibrator) in sorted(outcome.models.items()):
        path = f"{score_models_root(ctx)}/{run_id}/{target}"
        model.write().overwrite().save(f"{path}/classifier")
        calibrator.write().overwrite().save(f"{path}/calibrator")
        saved[target] = SavedModel(path, tuple(model.stages[0].getInputCols()))  # its VectorAssembler's
        log.info("%s model saved to %s", target, path)

    # Appended even when empty (an ineligible run): the table then exists for readers and exports.
    tables.append(spark.createDataFrame(
        [(run_id, as_of, t, m, metric, b, float(v)) for t, m, metric, b, v in outcome.metrics],
        C.MODEL_METRICS.schema), C.MODEL_METRICS)
    directory = report_directories(ctx)["scores"]
    message = (f"as_of={as_of} " + (" ".join(f"{t}={m}" for t, m in sorted(outcome.chosen.items())) if outcome.eligible
                                     else f"not scored: {outcome.reason} ({outcome.counts})"))
    if directory is not None:
        path = write_score_report(directory, run_id, as_of.isoformat(), outcome.metrics, outcome.chosen,
                                  settings.calibration, message, by_segment)
        log.info("score report written to %s", path)
    roc = {t: v for t, m, metric, b, v in outcome.metrics
           if metric == "roc_auc" and m == f"{outcome.chosen.get(t)}+{settings.calibration}"}
    if roc:
        message += " " + " ".join(f"{t}_roc_auc={v:.3f}" for t, v in sorted(roc.items()))
    counts = {**outcome.counts, "users": summary["users"], "eligible": summary["eligible"] or 0,
              "ineligible": summary["users"] - (summary["eligible"] or 0),
              **{f"band.{b}": summary[b] or 0 for b in ("low", "medium", "high")}}
    if not outcome.eligible:
        counts[f"reason.{outcome.reason}"] = summary["users"]
    return StageResult(rows_in=None, rows_out=summary["users"], message=message, counts=counts, models=saved)


if __name__ == "__main__":
    main_for("score_customers")
