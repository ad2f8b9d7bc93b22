"""The recommend_items stage on small Delta tables: what it writes and what it refuses."""
from __future__ import annotations

from datetime import timezone
from pathlib import Path

import pytest
from pyspark.ml.recommendation import ALSModel
from pyspark.sql import functions as F

from jobs import recommend_items
from lib.features.interactions import index_additions, score_events, to_matrix_entries
from lib.platform import catalog as C
from lib.platform.config import ConfigError
from lib.recommend.als import item_factors
from lib.recommend.similar import factor_similarities, similar_item_ids
from lib.sample.planted import SampleSpec, generate_events, planted_segment_items

pytestmark = pytest.mark.slow  # runs whole stages on generated data

SETS = ("spark.shuffle_partitions=2", "recommend.top_n=5", "recommend.k_values=5,10",
        "recommend.tune_k=5", "recommend.min_history=8", "recommend.als.search=grid", "recommend.als.ranks=6",
        "recommend.als.reg_params=0.1", "recommend.als.alphas=1.0", "recommend.als.max_iter=5",
        "segments.k=3", "segments.max_iter=5")


def test_stage_writes_lists_metrics_tuning_and_model(spark, tmp_path: Path, context):
    # Co-occurrence similarities here; the default (ALS factors) is checked below from the saved model.
    ctx = context(f"output.root={tmp_path / 'wh'}", *SETS, "recommend.similarity=jaccard")
    tables = ctx.tables
    spec = SampleSpec(users=120, items=40, events=4000, segments=3, seed=2)
    events = generate_events(spark, spec, partitions=2)
    tables.overwrite(events.withColumn("event_date", F.to_date("event_ts")).withColumn("ingest_run_id", F.lit("x")),
                     C.EVENTS)
    events = tables.read(spark, C.EVENTS)
    as_of = events.agg(F.max("event_ts")).first()[0].replace(tzinfo=timezone.utc)
    scored = score_events(events, ctx.settings.interactions.weights, 30.0, as_of)
    new_users, new_items = index_additions(scored, None, None, 2)
    tables.overwrite(new_users, C.USER_INDEX)
    tables.overwrite(new_items, C.ITEM_INDEX)
    tables.overwrite(to_matrix_entries(scored, tables.read(spark, C.USER_INDEX), tables.read(spark, C.ITEM_INDEX)),
                     C.INTERACTIONS)
    # Segments for the even-numbered users only: cold users split between both fallbacks.
    tables.overwrite(tables.read(spark, C.USER_INDEX).where(F.col("user_idx") % 2 == 0).select(
        "user_id", (F.col("user_idx") % 3).alias("segment_id"), F.lit(1.0).alias("affinity"),
        F.lit("nmf-run").alias("run_id")), C.USER_SEGMENTS)

    result = recommend_items.run(ctx)

    recs = tables.read(spark, C.RECOMMENDATIONS).cache()
    assert recs.columns == ["user_id", "rank", "item_id", "score", "source", "run_id", "strategy"]
    discover = recs.where("strategy = 'discover'")
    assert discover.select("user_id").distinct().count() == \
        tables.read(spark, C.INTERACTIONS).select("user_idx").distinct().count()
    assert recs.groupBy("user_id", "strategy").count().where("count > 5").count() == 0
    assert recs.groupBy("user_id", "strategy", "rank").count().where("count > 1").count() == 0
    assert {row["source"] for row in discover.select("source").distinct().collect()} == \
        {"als", "segment_popular", "popular"}
    bought = events.where("event_type = 'purchase'").select("user_id", "item_id").distinct()
    assert discover.join(bought, ["user_id", "item_id"]).count() == 0
    again = recs.where("strategy = 'buy_again'")
    assert again.count() > 0 and again.join(bought, ["user_id", "item_id"], "left_anti").count() == 0
    # Where a baseline won a customer group's validation, that group's list is the baseline, and the run says so.
    again_sources = {r["source"] for r in again.select("source").distinct().collect()}
    assert "buy_again" in again_sources and again_sources <= {"buy_again", "most_bought", "most_recent"}
    assert all(f"({source})" in result.message for source in again_sources - {"buy_again"})
    # The segment_popular baseline was validated with segments fitted on the training side.
    assert "validation NDCG@5 segment_popular on " in result.message
    blended_sources = {r["source"] for r in recs.where("strategy = 'blended'").select("source").distinct().collect()}
    assert "blended ships per customer group: no_order -> " in result.message
    if "blended: a baseline won validation" in result.message:
        shipped = result.message.split("blended: a baseline won validation")[1].split(";")[0]
        named = {name for name in ("most_bought", "most_recent", "segment_popular") if f"({name})" in shipped}
        assert named and named <= blended_sources
    else:  # the blend itself: bought items and ALS discoveries
        assert {"buy_again", "als"} <= blended_sources
    assert result.counts["users_als"] > 0 and result.rows_out == recs.count()

    metrics = tables.read(spark, C.REC_METRICS)
    got = {(r["model"], r["k"], r["metric"]): r["value"] for r in metrics.collect()}
    # No NMF tables: NMF-score skipped; every strategy beside its trivial baselines.
    assert {model for model, _, _ in got} == {"als", "popular", "buy_again", "buy_again_heuristic", "most_bought",
                                              "most_recent", "blended", "popular_all", "shipped_buy_again",
                                              "shipped_blended", "discover", "popular_new", "segment_popular"}
    assert {k for _, k, _ in got} == {5, 10}
    assert all(0.0 <= value <= 1.0 for (_, _, metric), value in got.items() if metric != "users")
    # Per training-side segment at max K; every evaluated customer here has a segment (a non-zero row of W).
    usefulness = tables.read(spark, C.SEGMENT_USEFULNESS).collect()
    assert {(r["run_id"], r["k"]) for r in usefulness} == {("run-1", 10)}
    assert sum(r["users"] for r in usefulness) == got[("segment_popular", 10, "users")]
    report = (tmp_path / "wh" / "reports" / "recommendations" / "recommendations.md").read_text()
    assert "## Do the segments predict next purchases?" in report
    tuning = tables.read(spark, C.ALS_TUNING).collect()
    assert len(tuning) == 1 and tuning[0]["chosen"] and tuning[0]["run_id"] == "run-1"
    assert "NMF-score recommender skipped" in result.message

    # Similar items recover the planted structure: an item of a segment's own is most similar to another of
    # the same segment's (three segments: a third by chance).
    similar = tables.read(spark, C.ITEM_SIMILARITIES).cache()
    # Each item's ranks run 1, 2, ... without gaps or repeats, at most similar_top_k (10) of them.
    ranks = similar.groupBy("item_id").agg(F.count(F.lit(1)).alias("n"), F.countDistinct("rank").alias("distinct"),
                                           F.min("rank").alias("first"), F.max("rank").alias("last"))
    assert ranks.where("n > 10 or distinct != n or first != 1 or last != n").count() == 0
    assert {r["method"] for r in similar.select("method").distinct().collect()} == {"jaccard"}
    assert similar.where("customers < 2 or score <= 0 or score > 1").count() == 0
    own = planted_segment_items(spark, spec).select("item_id", "segment_id")
    top = (similar.where("rank = 1").join(own, "item_id")
           .join(own.toDF("similar_item_id", "similar_segment"), "similar_item_id"))
    same = top.where(F.col("segment_id") == F.col("similar_segment")).count()
    assert top.count() >= 10 and same / top.count() >= 0.8, (same, top.count())
    assert f"similar items (jaccard) for {result.counts['similar_items']} items" in result.message
    similar.unpersist()

    # The cosine of the run's ALS item factors recovers the same structure (recommend.similarity = als_cosine).
    model = ALSModel.load(str(tmp_path / "wh" / "models" / "als" / "run-1"))
    by_factors = similar_item_ids(factor_similarities(item_factors(model), top_k=10),
                                  tables.read(spark, C.ITEM_INDEX))
    top = (by_factors.where("rank = 1").join(own, "item_id")
           .join(own.toDF("similar_item_id", "similar_segment"), "similar_item_id"))
    same = top.where(F.col("segment_id") == F.col("similar_segment")).count()
    assert top.count() >= 10 and same / top.count() >= 0.8, (same, top.count())

    assert model.rank == 6
    recs.unpersist()

    with pytest.raises(ConfigError, match="recommend.exclude_event_types' names event type.s. refund"):
        context(f"output.root={tmp_path / 'wh'}", *SETS, "recommend.exclude_event_types=refund")
    with pytest.raises(ValueError, match="events does not exist: run the ingest stage first"):
        recommend_items.run(context(f"output.root={tmp_path / 'empty'}", *SETS, run_id="run-3"))


def test_nmf_score_recommender_refits_on_the_training_side(spark, tmp_path: Path, context):
    from lib.recommend.evaluation import EvaluationSettings, TrainingSideNmf, training_side

    ctx = context(f"output.root={tmp_path / 'wh'}", *SETS)
    training_nmf = TrainingSideNmf(ctx.settings.segments)

    events = generate_events(spark, SampleSpec(users=60, items=30, events=2000, segments=3, seed=4), partitions=2)
    as_of = events.agg(F.max("event_ts")).first()[0].replace(tzinfo=timezone.utc)
    side = training_side(events, EvaluationSettings(ctx.settings.interactions.weights, 30.0, ["purchase"], [5], 5),
                         as_of)
    recs = training_nmf.recommend(side, side.user_index.select("user_idx"), 4).cache()
    assert recs.select("user_idx").distinct().count() == side.user_index.count()
    assert recs.groupBy("user_idx").count().where("count != 4").count() == 0
    assert recs.join(side.excluded, ["user_idx", "item_idx"]).count() == 0
    assert recs.where("score < 0").count() == 0          # NMF factors are non-negative
    # The same fit groups the side's users: one segment each, of the k.
    segments = training_nmf.segments(side)
    assert segments.columns == ["user_id", "segment_id"]
    assert segments.count() == segments.select("user_id").distinct().count() == side.user_index.count()
    assert {r["segment_id"] for r in segments.select("segment_id").distinct().collect()} <= {0, 1, 2}
    assert segments.join(side.user_index, "user_id", "left_anti").count() == 0
    training_nmf.release()
    recs.unpersist()
