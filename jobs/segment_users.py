"""Customer segments: NMF of the user x item interaction matrix into nmf_user_factors,
nmf_item_factors, user_segments, segment_profiles and nmf_history, plus a markdown report."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from pyspark.sql import functions as F

from jobs.common import StageContext, main_for, read_matrix
from lib import catalog as C
from lib.report import write_segment_report
from lib.runs import StageResult
from lib.segments import (assign_segments, component_mass, factor_table, fit_segments, segment_matrix,
                          segment_profiles)

log = logging.getLogger("jobs.segment_users")


def report_directory(ctx: StageContext) -> Path | None:
    """Where the report goes: segments.report_dir, else <output.root>/reports/segments on a local root."""
    if ctx.settings.segments.report_dir:
        return Path(ctx.settings.segments.report_dir)
    tables = ctx.tables
    if tables.uses_catalog or "://" in tables.root and not tables.root.startswith("file:"):
        return None
    return Path(tables.root.removeprefix("file:")) / "reports" / "segments"


def run(ctx: StageContext) -> StageResult:
    settings = ctx.settings.segments
    spark, tables, run_id = ctx.spark, ctx.tables, ctx.run_id
    interactions, user_index, item_index = read_matrix(ctx)
    n_users = user_index.agg(F.max("user_idx")).first()[0]
    n_items = item_index.agg(F.max("item_idx")).first()[0]
    if n_users is None or n_items is None:
        raise ValueError(f"{tables.location(C.USER_INDEX)} / {tables.location(C.ITEM_INDEX)} are empty: "
                         "build_interactions found no events to index")
    n_rows, n_cols = n_users + 1, n_items + 1

    entries, user_scales, item_weights = segment_matrix(interactions, settings)
    entries = entries.persist()
    try:
        result = fit_segments(entries, settings, n_rows, n_cols)
        tables.overwrite(factor_table(result.w, user_index, "user_idx", "user_id", user_scales, "row_scale",
                                      settings.transform, run_id), C.NMF_USER_FACTORS)
        tables.overwrite(factor_table(result.h, item_index, "item_idx", "item_id", item_weights, "item_weight",
                                      settings.transform, run_id), C.NMF_ITEM_FACTORS)
        result.release()

        sweep: list[tuple[int, float, int]] = []
        for k in settings.sweep_ks:
            trial = fit_segments(entries, settings, n_rows, n_cols, k=k, max_iter=settings.sweep_max_iter)
            sweep.append((k, trial.rel_error, trial.iterations))
            trial.release()
            log.info("k sweep: k=%d relative error %.5f after %d iterations", k, sweep[-1][1], sweep[-1][2])
    finally:
        entries.unpersist()

    tables.append(spark.createDataFrame([(run_id, it, err, sec) for it, err, sec in result.history],
                                        C.NMF_HISTORY.schema), C.NMF_HISTORY)
    if sweep:
        tables.append(spark.createDataFrame([(run_id, k, err, its) for k, err, its in sweep], C.NMF_K_SWEEP.schema),
                      C.NMF_K_SWEEP)

    user_factors = tables.read(spark, C.NMF_USER_FACTORS)
    item_factors = tables.read(spark, C.NMF_ITEM_FACTORS)
    mass = component_mass(item_factors, settings.k)
    tables.overwrite(assign_segments(user_factors, mass, run_id), C.USER_SEGMENTS)
    user_segments = tables.read(spark, C.USER_SEGMENTS)
    tables.overwrite(segment_profiles(user_segments, item_factors, settings.k, settings.top_items, run_id),
                     C.SEGMENT_PROFILES)

    profiles = [
        {"segment_id": row["segment_id"], "size": row["size"], "share": row["share"], "label": row["label"],
         "top_items": [(item["item_id"], item["weight"]) for item in (row["top_items"] or [])]}
        for row in tables.read(spark, C.SEGMENT_PROFILES).collect()  # k rows
    ]
    directory = report_directory(ctx)
    if directory is None:
        log.info("segment report skipped: catalog tables and no segments.report_dir configured")
    else:
        shown = {key: value for key, value in asdict(settings).items()
                 if key in ("k", "solver", "transform", "idf_items", "row_normalize", "init", "seed")}
        path = write_segment_report(directory, run_id, profiles, result.history, sweep, shown)
        log.info("segment report written to %s", path)

    assigned = sum(p["size"] for p in profiles)
    counts = {"users": n_rows, "items": n_cols, "assigned_users": assigned, "iterations": result.iterations}
    return StageResult(rows_in=interactions.count(), rows_out=assigned, counts=counts,
                       message=f"k={settings.k} rel_error={result.rel_error:.5f} layout={result.layout} "
                               f"grid={result.grid[0]}x{result.grid[1]}")


if __name__ == "__main__":
    main_for("segment_users")
