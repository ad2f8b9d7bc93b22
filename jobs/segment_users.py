"""Customer segments: NMF of the user x item interaction matrix into nmf_user_factors,
nmf_item_factors, user_segments, segment_profiles, nmf_history and segment_quality, plus a markdown report."""
from __future__ import annotations

import logging
from dataclasses import asdict, replace

from pyspark.sql import functions as F

from jobs.common import StageContext, main_for, read_matrix, report_directories
from lib.platform import catalog as C
from lib.platform.runs import StageResult
from lib.segments.assign import assess_k, assign_segments, choose_k, component_mass, seed_stability
from lib.segments.matrix import (capped_item_count, excluded_item_indices, factor_table, fit_segments, k_sweep,
                                 score_transform_name, segment_matrix)
from lib.segments.profiles import (distinctive_items, report_profiles, segment_item_lifts, segment_profiles,
                                   summarize_quality, top_item_lifts)
from lib.segments.report import write_segment_report

log = logging.getLogger("jobs.segment_users")



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

    # Items in no list are in no segment either: non-product lines (products.exclude_item_patterns) and,
    # when the optional catalog exists, unavailable or unrecommendable products; it also names the segments.
    products = tables.read(spark, C.PRODUCTS) if tables.exists(spark, C.PRODUCTS) else None
    excluded = excluded_item_indices(item_index, products, ctx.settings.products.exclude_item_patterns,
                                     ctx.settings.products.exclude_categories).persist()
    n_excluded = excluded.count()
    entries, user_scales, item_weights = segment_matrix(interactions, settings, excluded)
    matrix_name = score_transform_name(settings.transform, settings.value_column)
    entries = entries.persist()
    try:
        settings.check_against_matrix(*entries.where(F.col("value") > 0)
                                      .agg(F.countDistinct("row"), F.countDistinct("col")).first())
        sweep: list[dict] = []
        chosen = None
        if settings.choose_k:
            trials = []
            for k in settings.k_candidates():
                trials.append(assess_k(entries, settings, k, n_rows, n_cols, user_index, user_scales))
                log.info("choosing k: %s", trials[-1])
            chosen, why = choose_k(trials)
            log.info("choosing k: %s", why)
            settings = replace(settings, k=chosen.k)
            sweep = [{**asdict(trial), "chosen": trial is chosen} for trial in trials]
        result = fit_segments(entries, settings, n_rows, n_cols)
        tables.overwrite(factor_table(result.w, user_index, "user_idx", "user_id", user_scales, "row_scale",
                                      matrix_name, run_id), C.NMF_USER_FACTORS)
        tables.overwrite(factor_table(result.h, item_index, "item_idx", "item_id", item_weights, "item_weight",
                                      matrix_name, run_id), C.NMF_ITEM_FACTORS)
        result.release()
        user_factors = tables.read(spark, C.NMF_USER_FACTORS)
        item_factors = tables.read(spark, C.NMF_ITEM_FACTORS)
        tables.overwrite(assign_segments(user_factors, component_mass(item_factors, settings.k), run_id,
                                         settings.assignment, settings.min_share(settings.k)),
                         C.USER_SEGMENTS)
        user_segments = tables.read(spark, C.USER_SEGMENTS)

        stability = float("nan")
        if chosen is not None:
            stability = chosen.stability_ari  # the same two fits (same seeds and settings) as the trial's
        elif settings.stability_check:
            stability = seed_stability(entries, settings, user_segments, user_index, user_scales, n_rows, n_cols)
        if chosen is None:
            sweep = k_sweep(entries, settings, n_rows, n_cols)
    finally:
        entries.unpersist()

    tables.append(spark.createDataFrame([(run_id, it, err, sec) for it, err, sec in result.history],
                                        C.NMF_HISTORY.schema), C.NMF_HISTORY)
    if sweep:
        tables.append(spark.createDataFrame([(run_id, *[row.get(name) for name in C.NMF_K_SWEEP.columns[1:]])
                                             for row in sweep], C.NMF_K_SWEEP.schema), C.NMF_K_SWEEP)

    # Who has which item, per segment: names the segments by what sets them apart and measures their lift.
    lifts = segment_item_lifts(interactions, user_index, item_index, user_segments).persist()
    distinctive = distinctive_items(lifts, settings.top_items, settings.distinct_min_support, excluded)
    tables.overwrite(segment_profiles(user_segments, item_factors, settings.k, settings.top_items, run_id,
                                      products=products, excluded=excluded, distinctive=distinctive,
                                      min_distinct_lift=settings.min_distinct_lift),
                     C.SEGMENT_PROFILES)
    profile_rows = tables.read(spark, C.SEGMENT_PROFILES)
    excluded.unpersist()
    top_lifts = {(row["segment_id"], row["item_id"]): row["lift"]  # k x top_items rows
                 for row in top_item_lifts(lifts, profile_rows).collect()}
    lifts.unpersist()
    profiles = report_profiles(profile_rows.collect(), top_lifts)  # k rows
    matrix_users = interactions.where(F.col("score") > 0).select("user_idx").distinct().count()
    quality = summarize_quality(profiles, settings.k, matrix_users, stability, n_excluded,
                                capped_item_count(interactions, settings.popular_share_cap))
    assigned = sum(p["size"] for p in profiles)
    tables.append(spark.createDataFrame([quality.row(run_id)], C.SEGMENT_QUALITY.schema), C.SEGMENT_QUALITY)
    log.info("segment quality: largest share %.3f, size entropy %.3f, stability ARI %.3f, top-item lift "
             "min %.2f median %.2f, distinctive-item lift min %.2f, %.1f%% in distinct segments, %d empty",
             quality.largest_share, quality.size_entropy, quality.stability_ari, quality.min_top_lift,
             quality.median_top_lift, quality.min_distinct_lift, 100 * quality.distinct_share, quality.empty_segments)

    directory = report_directories(ctx)["segments"]
    if directory is None:
        log.info("segment report skipped: catalog tables and no segments.report_dir configured")
    else:
        shown = {key: value for key, value in asdict(settings).items()
                 if key in ("k", "solver", "value_column", "transform", "assignment", "idf_items", "row_normalize", "popular_share_cap",
                            "min_segment_size", "distinct_min_support", "min_distinct_lift", "choose_k",
                            "init", "seed")}
        path = write_segment_report(directory, run_id, profiles, result.history, sweep, shown, quality)
        log.info("segment report written to %s", path)

    counts = {"users": n_rows, "items": n_cols, "assigned_users": assigned, "iterations": result.iterations,
              "excluded_items": n_excluded, "capped_items": quality.capped_items}
    return StageResult(rows_in=interactions.count(), rows_out=assigned, counts=counts,
                       message=f"k={settings.k} rel_error={result.rel_error:.5f} layout={result.layout} "
                               f"grid={result.grid[0]}x{result.grid[1]} largest_share={quality.largest_share:.3f} "
                               f"stability_ari={quality.stability_ari:.3f}")


if __name__ == "__main__":
    main_for("segment_users")
