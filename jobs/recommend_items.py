"""Recommend items per user with implicit ALS: tune and evaluate offline, then write top-N lists.

Reads events, interactions, user_index, item_index (and user_segments / nmf_* when present);
writes recommendations, rec_metrics, als_tuning and the ALS model under a versioned path.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.common import main_for, tables_of
from lib.als import AlsParams, TuningResult, als_top_n, candidate_grid, fit_als
from lib.interactions import validate_weights
from lib.recommend import EvaluationSettings, TrainingSide, evaluate_offline, factor_top_n, final_recommendations
from lib.runs import StageResult
from lib.storage import Tables

log = logging.getLogger("jobs.recommend_items")

REC_METRICS_SCHEMA = "run_id string, model string, k int, metric string, value double"
ALS_TUNING_SCHEMA = (
    "run_id string, candidate int, rank int, reg_param double, alpha double, max_iter int, "
    "metric string, k int, value double, seconds double, chosen boolean"
)


def _utc(text: str) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _candidates(als: dict[str, Any], partitions: int) -> list[AlsParams]:
    # Blocks default to the job's shuffle partitions: about one task per partition, as everywhere else.
    return candidate_grid(als["ranks"], als["reg_params"], als["alphas"], als["max_iter"], als["seed"],
                          als["checkpoint_interval"], als["search"], als["max_candidates"],
                          als["num_blocks"] or partitions)


def _model_path(config: dict[str, Any], tables: Tables, run_id: str) -> str:
    model_dir = config["recommend"]["model_dir"]
    if not model_dir:
        if tables.uses_catalog:
            raise ValueError("recommend.model_dir must be set when tables are catalog tables (output.catalog)")
        model_dir = f"{tables.root.rstrip('/')}/models/als"
    return f"{model_dir.rstrip('/')}/{run_id}"


def _nmf_recommender(spark: SparkSession, config: dict[str, Any], tables: Tables):
    """An NMF-score recommender fitted on the training side only, or (None, reason)."""
    if not (tables.exists(spark, "nmf_user_factors") and tables.exists(spark, "nmf_item_factors")):
        return None, "nmf_user_factors / nmf_item_factors absent: NMF-score recommender skipped"
    try:
        from jobs.segment_users import nmf_params
        from lib.nmf import factorize
        from lib.segments import transform_scores
    except ImportError as err:
        return None, f"NMF code unavailable ({err}): NMF-score recommender skipped"
    # The stored factors were fitted on every event, held-out ones included; scoring them on the
    # held-out events would leak. So NMF is refitted, with the segments stage's own settings, on
    # the training side's matrix, and its W H' scores rank the items.
    settings = config["segments"]

    def recommend(side: TrainingSide, users: DataFrame, n: int) -> DataFrame:
        entries, _, _ = transform_scores(side.entries, settings["transform"], settings["idf_items"],
                                         settings["row_normalize"])
        n_rows = side.user_index.agg(F.max("user_idx")).first()[0] + 1
        n_cols = side.item_index.agg(F.max("item_idx")).first()[0] + 1
        result = factorize(entries.select(F.col("user_idx").alias("row"), F.col("item_idx").alias("col"), "value"),
                           nmf_params(settings), n_rows=n_rows, n_cols=n_cols)
        log.info("NMF on the training side: k=%d, relative error %.4f after %d iterations",
                 settings["k"], result.rel_error, result.iterations)
        user_factors = result.w.withColumnRenamed("row_idx", "user_idx")
        item_factors = result.h.withColumnRenamed("col_idx", "item_idx")
        return factor_top_n(user_factors, item_factors, users, n, side.excluded)

    return recommend, f"NMF-score recommender refitted on the training side (segments.k={settings['k']})"


def run(spark: SparkSession, config: dict[str, Any], run_id: str) -> StageResult:
    settings = config["recommend"]
    weights = config["interactions"]["weights"]
    validate_weights(weights, config["ingest"]["event_types"])
    unknown = sorted(set(settings["exclude_event_types"]) - set(config["ingest"]["event_types"]))
    if unknown:
        raise ValueError(f"recommend.exclude_event_types names unknown event type(s): {', '.join(unknown)}")
    tables = tables_of(config)
    for table in ("events", "interactions", "user_index", "item_index"):
        if not tables.exists(spark, table):
            raise ValueError(f"table {tables.location(table)} does not exist: run ingest and build_interactions first")
    events = tables.read(spark, "events")
    partitions = config["spark"]["shuffle_partitions"]
    candidates = _candidates(settings["als"], partitions)
    notes: list[str] = []
    counts: dict[str, int] = {}

    if settings["evaluate"]:
        evaluation = EvaluationSettings(
            weights=weights, half_life_days=config["interactions"]["half_life_days"],
            exclude_event_types=settings["exclude_event_types"], k_values=settings["k_values"],
            tune_k=settings["tune_k"], holdout_fraction=settings["holdout_fraction"],
            holdout_cutoff=_utc(settings["holdout_cutoff"]), validation_fraction=settings["validation_fraction"],
        )
        nmf_recommender, nmf_note = _nmf_recommender(spark, config, tables)
        log.info("%s", nmf_note)
        notes.append(nmf_note)

        tuning_rows: list[tuple] = []

        def record_candidate(result: TuningResult) -> None:
            params = result.params
            tuning_rows.append((run_id, len(tuning_rows) + 1, params.rank, params.reg_param, params.alpha,
                                params.max_iter, result.metric, result.k, result.value, result.seconds, False))

        report = evaluate_offline(events, evaluation, candidates, nmf_recommender, "nmf_score", record_candidate)
        best = report.best
        tuning_rows = [row[:-1] + (row[2:5] == (best.rank, best.reg_param, best.alpha),) for row in tuning_rows]
        tables.append(spark.createDataFrame(tuning_rows, ALS_TUNING_SCHEMA), "als_tuning")
        metrics = [(run_id, model, k, metric, value) for model, k, metric, value in report.metrics]
        tables.append(spark.createDataFrame(metrics, REC_METRICS_SCHEMA), "rec_metrics")
        counts["candidates"] = len(tuning_rows)
    else:
        best = _candidates({**settings["als"], "search": "grid"}, partitions)[0]
        notes.append("evaluation off: no tuning, first grid candidate used")
    log.info("final ALS: %s", best)

    checkpoint_dir = spark.conf.get("spark.checkpoint.dir", "")
    if best.checkpoint_interval > 0 and not checkpoint_dir:
        log.info("spark.checkpoint.dir is not set: ALS checkpointing is off for this run")

    entries = tables.read(spark, "interactions").cache()
    user_index, item_index = tables.read(spark, "user_index"), tables.read(spark, "item_index")
    excluded = (
        events.where(F.col("event_type").isin(settings["exclude_event_types"])).select("user_id", "item_id").distinct()
        .join(user_index, "user_id").join(item_index, "item_id").select("user_idx", "item_idx")
    ).cache()
    model = fit_als(entries, best)
    model_path = _model_path(config, tables, run_id)
    model.write().overwrite().save(model_path)
    log.info("ALS model saved to %s", model_path)

    segments = tables.read(spark, "user_segments") if tables.exists(spark, "user_segments") else None
    if segments is None:
        notes.append("user_segments absent: cold-start users get global popularity")
    recommendations = final_recommendations(
        lambda users, n, exclude: als_top_n(model, users, n, exclude),
        entries, user_index, item_index, excluded, settings["top_n"], settings["min_history"], segments,
    ).withColumn("run_id", F.lit(run_id))
    tables.overwrite(recommendations, "recommendations")

    written = tables.read(spark, "recommendations")
    by_source = {row["source"]: int(row["count"]) for row in written.groupBy("source").count().collect()}
    counts.update({f"users_{source}": 0 for source in ("als", "segment_popular", "popular")})
    for row in written.groupBy("source").agg(F.countDistinct("user_id").alias("users")).collect():
        counts[f"users_{row['source']}"] = int(row["users"])
    entries.unpersist()
    excluded.unpersist()
    message = (f"ALS rank={best.rank} reg_param={best.reg_param} alpha={best.alpha}; model {model_path}; "
               + "; ".join(notes))
    return StageResult(rows_in=events.count(), rows_out=sum(by_source.values()), message=message, counts=counts)


if __name__ == "__main__":
    main_for("recommend_items", __doc__, run)
