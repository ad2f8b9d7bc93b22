"""The recommend_items stage on small Delta tables: what it writes and what it refuses."""
from __future__ import annotations

from datetime import timezone
from pathlib import Path

import pytest
from pyspark.ml.recommendation import ALSModel
from pyspark.sql import functions as F

from jobs import recommend_items
from jobs.common import load_config, tables_of
from lib.interactions import extend_index, score_events, to_matrix_entries
from lib.sample_data import SampleSpec, generate_events


def _config(root: Path, *extra: str) -> dict:
    return load_config([], [
        f"output.root={root}", "spark.shuffle_partitions=2", "recommend.top_n=5", "recommend.k_values=5,10",
        "recommend.tune_k=5", "recommend.min_history=8", "recommend.als.search=grid", "recommend.als.ranks=6",
        "recommend.als.reg_params=0.1", "recommend.als.alphas=1.0", "recommend.als.max_iter=5", *extra])


def test_stage_writes_lists_metrics_tuning_and_model(spark, tmp_path: Path):
    config = _config(tmp_path / "wh")
    tables = tables_of(config)
    events = generate_events(spark, SampleSpec(users=120, items=40, events=4000, segments=3, seed=2), partitions=2)
    tables.overwrite(events, "events")
    events = tables.read(spark, "events")
    as_of = events.agg(F.max("event_ts")).first()[0].replace(tzinfo=timezone.utc)
    scored = score_events(events, config["interactions"]["weights"], 30.0, as_of)
    tables.overwrite(extend_index(scored, None, "user_id", "user_idx", 2), "user_index")
    tables.overwrite(extend_index(scored, None, "item_id", "item_idx", 2), "item_index")
    tables.overwrite(to_matrix_entries(scored, tables.read(spark, "user_index"), tables.read(spark, "item_index")),
                     "interactions")
    # Segments for the even-numbered users only: cold users split between both fallbacks.
    tables.overwrite(tables.read(spark, "user_index").where(F.col("user_idx") % 2 == 0).select(
        "user_id", (F.col("user_idx") % 3).alias("segment_id"), F.lit(1.0).alias("affinity"),
        F.lit("nmf-run").alias("run_id")), "user_segments")

    result = recommend_items.run(spark, config, "run-1")

    recs = tables.read(spark, "recommendations").cache()
    assert recs.columns[:6] == ["user_id", "rank", "item_id", "score", "source", "run_id"]
    assert recs.select("user_id").distinct().count() == tables.read(spark, "interactions").select("user_idx").distinct().count()
    assert recs.groupBy("user_id").count().where("count > 5").count() == 0
    assert {row["source"] for row in recs.select("source").distinct().collect()} == {"als", "segment_popular", "popular"}
    bought = events.where("event_type = 'purchase'").select("user_id", "item_id")
    assert recs.join(bought, ["user_id", "item_id"]).count() == 0
    assert result.counts["users_als"] > 0 and result.rows_out == recs.count()

    metrics = tables.read(spark, "rec_metrics")
    got = {(r["model"], r["k"], r["metric"]): r["value"] for r in metrics.collect()}
    assert {model for model, _, _ in got} == {"als", "popular"}   # no NMF tables: NMF-score skipped
    assert {k for _, k, _ in got} == {5, 10}
    assert all(0.0 <= value <= 1.0 for (_, _, metric), value in got.items() if metric != "users")
    tuning = tables.read(spark, "als_tuning").collect()
    assert len(tuning) == 1 and tuning[0]["chosen"] and tuning[0]["run_id"] == "run-1"
    assert "NMF-score recommender skipped" in result.message

    model = ALSModel.load(str(tmp_path / "wh" / "models" / "als" / "run-1"))
    assert model.rank == 6
    recs.unpersist()

    with pytest.raises(ValueError, match="unknown event type"):
        recommend_items.run(spark, _config(tmp_path / "wh", "recommend.exclude_event_types=refund"), "run-2")
    with pytest.raises(ValueError, match="does not exist"):
        recommend_items.run(spark, _config(tmp_path / "empty"), "run-3")


def test_nmf_score_recommender_refits_on_the_training_side(spark, tmp_path: Path):
    from lib.recommend import EvaluationSettings, training_side

    config = _config(tmp_path / "wh", "segments.k=3", "segments.max_iter=5")
    tables = tables_of(config)
    assert recommend_items._nmf_recommender(spark, config, tables)[0] is None   # no factor tables yet
    # Only the tables' presence matters: the comparison refits NMF on the training side.
    tables.overwrite(spark.createDataFrame([(0, "u", [1.0])], "user_idx int, user_id string, factors array<double>"),
                     "nmf_user_factors")
    tables.overwrite(spark.createDataFrame([(0, "i", [1.0])], "item_idx int, item_id string, factors array<double>"),
                     "nmf_item_factors")
    recommend, note = recommend_items._nmf_recommender(spark, config, tables)
    assert "refitted on the training side" in note

    events = generate_events(spark, SampleSpec(users=60, items=30, events=2000, segments=3, seed=4), partitions=2)
    as_of = events.agg(F.max("event_ts")).first()[0].replace(tzinfo=timezone.utc)
    side = training_side(events, EvaluationSettings(config["interactions"]["weights"], 30.0, ["purchase"], [5], 5), as_of)
    recs = recommend(side, side.user_index.select("user_idx"), 4).cache()
    assert recs.select("user_idx").distinct().count() == side.user_index.count()
    assert recs.groupBy("user_idx").count().where("count != 4").count() == 0
    assert recs.join(side.excluded, ["user_idx", "item_idx"]).count() == 0
    assert recs.where("score < 0").count() == 0          # NMF factors are non-negative
    recs.unpersist()
