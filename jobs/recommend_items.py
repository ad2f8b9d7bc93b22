"""Recommend items per user with implicit ALS: tune and evaluate offline, then write top-N lists.

Reads events, interactions, user_index, item_index (and user_segments / nmf_* / products when present);
writes recommendations (one list per user and strategy: discover, buy_again, blended), item_similarities
(similar items by co-occurrence), rec_metrics, segment_usefulness (with user_segments), als_tuning and the
ALS model under a versioned path. For each customer group where a baseline won the validation of
buy_again or blended, that group's list IS the baseline (its source names it).
"""
from __future__ import annotations

import logging
from dataclasses import replace

from pyspark.sql import functions as F

from jobs.common import StageContext, main_for, models_root, read_matrix, report_directories
from lib.features.interactions import resolve_as_of
from lib.ingest.products import excluded_items
from lib.platform import catalog as C
from lib.platform.runs import SavedModel, StageResult
from lib.recommend.als import TuningResult, als_top_n, candidates, fit_als, item_factors, top_n_blocks
from lib.recommend.baselines import user_segment_of
from lib.recommend.buy_again import buy_again_params, fit_ranker, purchase_occasions
from lib.recommend.evaluation import TrainingSideNmf, evaluate_offline, evaluation_settings
from lib.recommend.lists import final_recommendations, list_counts, shipped_notes, strategy_lists
from lib.recommend.metrics import write_strategy_report
from lib.recommend.pairs import excluded_pairs, to_indexed
from lib.recommend.similar import factor_similarities, item_similarities, similar_item_ids

log = logging.getLogger("jobs.recommend_items")


def _model_path(ctx: StageContext) -> str:
    return f"{models_root(ctx)}/{ctx.run_id}"


def run(ctx: StageContext) -> StageResult:
    settings = ctx.settings.recommend
    spark, tables, run_id = ctx.spark, ctx.tables, ctx.run_id
    events = tables.require(spark, C.EVENTS, "ingest")
    entries, user_index, item_index = read_matrix(ctx)
    partitions = ctx.settings.spark.shuffle_partitions
    als_candidates = candidates(settings.als, partitions)
    notes: list[str] = []
    counts: dict[str, int] = {}

    # Items no list may hold: the catalog's unavailable / unrecommendable items, its excluded categories
    # and ids matching products.exclude_item_patterns (postage, fees, ...). Small: one row per excluded item.
    products = tables.read(spark, C.PRODUCTS) if tables.exists(spark, C.PRODUCTS) else None
    exclude = excluded_items(products, item_index, ctx.settings.products.exclude_item_patterns,
                             ctx.settings.products.exclude_categories).cache()
    counts["excluded_items"] = exclude.count()
    notes.append(("products table absent: " if products is None else "")
                 + f"{counts['excluded_items']} items excluded from every list (catalog flags, categories and patterns)")
    exclude_ids = exclude.select("item_id") if counts["excluded_items"] else None
    settings.check_against_items(item_index.join(exclude, "item_id", "left_anti").count(), item_index.count())
    segments = tables.read(spark, C.USER_SEGMENTS) if tables.exists(spark, C.USER_SEGMENTS) else None
    if segments is None:
        notes.append("user_segments absent: cold-start users get global popularity, no segment_popular baseline")

    if settings.evaluate:
        evaluation = evaluation_settings(settings, ctx.settings.interactions)
        # The segments stage's NMF, refitted on each training side: the nmf_score recommender where its
        # factors exist, the segments of the segment_popular baseline where its segments exist.
        has_nmf = tables.exists(spark, C.NMF_USER_FACTORS) and tables.exists(spark, C.NMF_ITEM_FACTORS)
        training_nmf = TrainingSideNmf(ctx.settings.segments, top_n_blocks(settings.als))
        notes.append(f"NMF-score recommender refitted on the training side (segments.k={ctx.settings.segments.k})"
                     if has_nmf else "nmf_user_factors / nmf_item_factors absent: NMF-score recommender skipped")
        log.info("%s", notes[-1])

        tuning: list[TuningResult] = []
        report = evaluate_offline(events, evaluation, als_candidates, training_nmf.recommend if has_nmf else None,
                                  "nmf_score", tuning.append, exclude_ids,
                                  None if segments is None else training_nmf.segments)
        training_nmf.release()
        notes.extend(report.notes)
        best = report.best
        calibration = report.calibration
        shipped = report.shipped
        tuning_rows = [(run_id, number, r.params.rank, r.params.reg_param, r.params.alpha, r.params.max_iter,
                        r.metric, r.k, r.value, r.seconds, r.params == best)
                       for number, r in enumerate(tuning, start=1)]
        tables.append(spark.createDataFrame(tuning_rows, C.ALS_TUNING.schema), C.ALS_TUNING)
        metrics = [(run_id, model, k, metric, value) for model, k, metric, value in report.metrics]
        tables.append(spark.createDataFrame(metrics, C.REC_METRICS.schema), C.REC_METRICS)
        if report.segment_usefulness:
            usefulness = [(run_id, *[row[name] for name in C.SEGMENT_USEFULNESS.columns[1:]])
                          for row in report.segment_usefulness]
            tables.append(spark.createDataFrame(usefulness, C.SEGMENT_USEFULNESS.schema), C.SEGMENT_USEFULNESS)
        counts["candidates"] = len(tuning_rows)
        counts["candidates_stopped_early"] = sum(result.stopped_early for result in tuning)
        if counts["candidates_stopped_early"]:
            notes.append(f"{counts['candidates_stopped_early']} of {len(tuning)} ALS candidates stopped early "
                         f"(clearly worse on the first quarter of the validation users)")
        directory = report_directories(ctx)["recommendations"]
        if directory is None:
            log.info("strategy report skipped: tables are not under a local output.root")
        else:
            path = write_strategy_report(directory, run_id, report.metrics, report.notes, report.segment_usefulness)
            if path is not None:
                log.info("strategy report: %s", path)
    else:
        best = candidates(replace(settings.als, search="grid"), partitions)[0]
        calibration = None
        shipped = {}
        notes.append("no blend calibration without evaluation: blended lists interleave by propensity")
        notes.append("evaluation off: no tuning, first grid candidate used")
    log.info("final ALS: %s", best)

    if best.checkpoint_interval > 0 and not spark.conf.get("spark.checkpoint.dir", ""):
        log.info("spark.checkpoint.dir is not set: ALS checkpointing is off for this run")

    if exclude_ids is not None:  # excluded items are neither learned nor ranked
        entries = entries.join(F.broadcast(exclude_ids.join(item_index, "item_id").select("item_idx")),
                               "item_idx", "left_anti")
    entries = entries.cache()
    excluded = to_indexed(excluded_pairs(events, list(settings.exclude_event_types)), user_index, item_index).cache()
    model = fit_als(entries, best)
    model_path = _model_path(ctx)
    model.write().overwrite().save(model_path)
    log.info("ALS model saved to %s", model_path)

    discover = final_recommendations(
        lambda users, n, exclude_pairs: als_top_n(model, users, n, exclude_pairs, top_n_blocks(settings.als)),
        entries, user_index, item_index, excluded, settings.top_n, settings.min_history, segments,
    )
    if "blended" in settings.strategies:  # read twice: as itself and inside the blend
        discover = discover.localCheckpoint(eager=True)
    as_of = resolve_as_of(ctx.settings.interactions.as_of_utc, events, tables.location(C.EVENTS))
    occasions = purchase_occasions(events, settings.purchase_event_types).cache()
    ranker = fit_ranker(occasions, as_of, buy_again_params(settings), settings.buy_again_model, settings.als.seed)
    notes.append(f"lists: {ranker.note}")
    notes.extend(shipped_notes(shipped))
    recommendations = strategy_lists(discover, occasions, as_of, buy_again_params(settings), settings.top_n,
                                     settings.strategies, exclude_ids, calibration, ranker, shipped,
                                     None if segments is None else user_segment_of(segments)
                                     ).withColumn("run_id", F.lit(run_id))
    tables.overwrite(recommendations, C.RECOMMENDATIONS)

    written, rows_out = list_counts(tables.read(spark, C.RECOMMENDATIONS), settings.strategies)
    counts.update(written)

    if settings.similar_top_k:  # from the same matrix the lists learned from, excluded items out
        if settings.similarity == "als_cosine":
            similar = factor_similarities(item_factors(model), settings.similar_top_k, top_n_blocks(settings.als))
        else:
            similar = item_similarities(entries, settings.similar_top_k, settings.similarity,
                                        settings.similar_min_customers, settings.similar_max_items)
        tables.overwrite(similar_item_ids(similar, item_index).select(
            F.lit(run_id).alias("run_id"), "*", F.lit(settings.similarity).alias("method")), C.ITEM_SIMILARITIES)
        counts["similar_items"] = tables.read(spark, C.ITEM_SIMILARITIES).select("item_id").distinct().count()
        notes.append(f"similar items ({settings.similarity}) for {counts['similar_items']} items")
    elif tables.exists(spark, C.ITEM_SIMILARITIES):  # an older run's lists must not outlive the switch-off
        tables.overwrite(C.ITEM_SIMILARITIES.empty(spark), C.ITEM_SIMILARITIES)
        notes.append("similar items off (recommend.similar_top_k = 0): item_similarities emptied")
    entries.unpersist()
    excluded.unpersist()
    exclude.unpersist()
    occasions.unpersist()
    message = (f"ALS rank={best.rank} reg_param={best.reg_param} alpha={best.alpha}; model {model_path}; "
               f"strategies {', '.join(settings.strategies)}; " + "; ".join(notes))
    return StageResult(rows_in=events.count(), rows_out=rows_out, message=message, counts=counts,
                       models={"als": SavedModel(model_path, ("user_idx", "item_idx"))})


if __name__ == "__main__":
    main_for("recommend_items")
