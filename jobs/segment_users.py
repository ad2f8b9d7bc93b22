"""Customer segments: NMF of the user x item interaction matrix into nmf_user_factors,
nmf_item_factors, user_segments, segment_profiles and nmf_history, plus a markdown report."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.common import main_for, tables_of
from lib.nmf import NMFParams, factorize
from lib.report import write_segment_report
from lib.runs import StageResult
from lib.segments import assign_segments, component_mass, factor_table, segment_profiles, transform_scores

log = logging.getLogger("jobs.segment_users")


def nmf_params(settings: dict[str, Any], k: int | None = None, max_iter: int | None = None) -> NMFParams:
    """NMF settings from the [segments] config table."""
    return NMFParams(
        k=k or settings["k"], solver=settings["solver"], max_iter=max_iter or settings["max_iter"],
        tol=settings["tol"], init=settings["init"], seed=settings["seed"],
        l1_w=settings["l1_w"], l2_w=settings["l2_w"], l1_h=settings["l1_h"], l2_h=settings["l2_h"],
        inner_passes=settings["inner_passes"], row_blocks=settings["row_blocks"],
        col_blocks=settings["col_blocks"], block_nnz=settings["block_nnz"],
        broadcast_limit_bytes=int(settings["broadcast_limit_mb"] * 1024 * 1024),
        checkpoint_interval=settings["checkpoint_interval"], parallelism=settings["parallelism"],
    )


def sweep_ks(settings: dict[str, Any]) -> list[int]:
    values = []
    for value in settings["sweep_ks"]:
        try:
            values.append(int(value))
        except (TypeError, ValueError):
            raise ValueError(f"segments.sweep_ks must hold integers, got {value!r}") from None
    if any(value < 1 for value in values):
        raise ValueError(f"segments.sweep_ks must hold integers >= 1, got {values}")
    return values


def report_directory(config: dict[str, Any]) -> Path | None:
    """Where the report goes: segments.report_dir, else <output.root>/reports/segments on a local root."""
    if config["segments"]["report_dir"]:
        return Path(config["segments"]["report_dir"])
    tables = tables_of(config)
    if tables.uses_catalog or "://" in tables.root and not tables.root.startswith("file:"):
        return None
    return Path(tables.root.removeprefix("file:")) / "reports" / "segments"


def run(spark: SparkSession, config: dict[str, Any], run_id: str) -> StageResult:
    settings = config["segments"]
    params = nmf_params(settings)
    ks = sweep_ks(settings)
    tables = tables_of(config)
    for table in ("interactions", "user_index", "item_index"):
        if not tables.exists(spark, table):
            raise ValueError(f"table {tables.location(table)} does not exist: run build_interactions first")
    interactions = tables.read(spark, "interactions")
    user_index, item_index = tables.read(spark, "user_index"), tables.read(spark, "item_index")
    n_users = user_index.agg(F.max("user_idx")).first()[0]
    n_items = item_index.agg(F.max("item_idx")).first()[0]
    if n_users is None or n_items is None:
        raise ValueError("user_index / item_index are empty: nothing to segment")

    entries, user_scales, item_weights = transform_scores(
        interactions, settings["transform"], settings["idf_items"], settings["row_normalize"])
    entries = entries.select(F.col("user_idx").alias("row"), F.col("item_idx").alias("col"), "value").persist()
    try:
        result = factorize(entries, params, n_rows=n_users + 1, n_cols=n_items + 1)
        transform = settings["transform"]
        tables.overwrite(factor_table(result.w, user_index, "user_idx", "user_id", user_scales, "row_scale",
                                      transform, run_id), "nmf_user_factors")
        tables.overwrite(factor_table(result.h, item_index, "item_idx", "item_id", item_weights, "item_weight",
                                      transform, run_id), "nmf_item_factors")
        result.release()

        sweep: list[tuple[int, float, int]] = []
        for k in ks:
            trial = factorize(entries, nmf_params(settings, k=k, max_iter=settings["sweep_max_iter"]),
                              n_rows=n_users + 1, n_cols=n_items + 1)
            sweep.append((k, trial.rel_error, trial.iterations))
            trial.release()
            log.info("k sweep: k=%d relative error %.5f after %d iterations", k, sweep[-1][1], sweep[-1][2])
    finally:
        entries.unpersist()

    history_rows = [(run_id, it, err, sec) for it, err, sec in result.history]
    tables.append(spark.createDataFrame(history_rows, "run_id string, iteration int, rel_error double, seconds double"),
                  "nmf_history")
    if sweep:
        tables.append(spark.createDataFrame([(run_id, k, err, its) for k, err, its in sweep],
                                            "run_id string, k int, rel_error double, iterations int"), "nmf_k_sweep")

    user_factors = tables.read(spark, "nmf_user_factors")
    item_factors = tables.read(spark, "nmf_item_factors")
    mass = component_mass(item_factors, params.k)
    tables.overwrite(assign_segments(user_factors, mass, run_id), "user_segments")
    user_segments = tables.read(spark, "user_segments")
    tables.overwrite(segment_profiles(user_segments, item_factors, params.k, settings["top_items"], run_id),
                     "segment_profiles")

    profiles = [
        {"segment_id": row["segment_id"], "size": row["size"], "share": row["share"], "label": row["label"],
         "top_items": [(item["item_id"], item["weight"]) for item in (row["top_items"] or [])]}
        for row in tables.read(spark, "segment_profiles").collect()  # k rows
    ]
    directory = report_directory(config)
    if directory is None:
        log.info("segment report skipped: catalog tables and no segments.report_dir configured")
    else:
        path = write_segment_report(directory, run_id, profiles, result.history, sweep,
                                    {key: settings[key] for key in ("k", "solver", "transform", "idf_items",
                                                                    "row_normalize", "init", "seed")})
        log.info("segment report written to %s", path)

    assigned = sum(p["size"] for p in profiles)
    counts = {"users": n_users + 1, "items": n_items + 1, "assigned_users": assigned,
              "iterations": result.iterations}
    return StageResult(rows_in=interactions.count(), rows_out=assigned, counts=counts,
                       message=f"k={params.k} rel_error={result.rel_error:.5f} layout={result.layout} "
                               f"grid={result.grid[0]}x{result.grid[1]}")


if __name__ == "__main__":
    main_for("segment_users", __doc__, run)
