"""Promotion gates: the checks on a few metric rows, and run_stage keeping the previous lists and scores
when a planted run's model loses to its baseline (the stage's own work is replaced by writing the planted
outputs and metrics, as it writes them)."""
from __future__ import annotations

import json
import math
from datetime import date
from pathlib import Path

import pytest
import yaml
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.regression import IsotonicRegression, IsotonicRegressionModel

from jobs import recommend_items, score_customers
from jobs.common import run_stage, score_models_root
from lib.platform import catalog as C
from lib.platform.promotion import list_checks, losing_summary, score_checks, segment_checks
from lib.platform.quality import Measurement
from lib.platform.runs import SavedModel, StageResult
from lib.platform.config import ConfigError


def test_lists_are_held_to_their_best_baseline_at_the_largest_k():
    rows = [("discover", 5, "ndcg", 0.30), ("discover", 10, "ndcg", 0.20), ("popular_new", 10, "ndcg", 0.25),
            ("popular_new", 5, "ndcg", 0.10), ("discover", 10, "recall", 0.90),
            ("shipped_blended", 10, "ndcg", 0.28), ("most_bought", 10, "ndcg", 0.27),
            ("segment_popular", 10, "ndcg", 0.28), ("popular_all", 10, "ndcg", float("nan"))]
    assert list_checks(rows) == [
        Measurement("promote_discover", 0.20, 0.25, False, "discover NDCG@10 against its best baseline popular_new"),
        Measurement("promote_shipped_blended", 0.28, 0.28, True,          # a tie ships the model
                    "shipped_blended NDCG@10 against its best baseline segment_popular")]
    assert list_checks([("als", 10, "ndcg", 0.4), ("popular", 10, "ndcg", 0.5)]) == []   # evaluation only
    assert list_checks([("shipped_buy_again", 10, "ndcg", 0.05)]) == []                   # no baseline measured


def test_scores_are_held_to_their_best_baseline():
    rows = [("churn", "gbt+isotonic", "roc_auc", 0.70), ("churn", "gbt", "roc_auc", 0.70),
            ("churn", "recency_baseline", "roc_auc", 0.75), ("churn", "rfm_baseline", "roc_auc", 0.72),
            ("churn", "recency_baseline", "pr_auc", 0.99),
            ("purchase", "logistic_regression+isotonic", "roc_auc", 0.80),
            ("purchase", "frequency_baseline", "roc_auc", 0.79)]
    checks = score_checks(rows, {"churn": "gbt+isotonic", "purchase": "logistic_regression+isotonic"})
    assert checks == [
        Measurement("promote_churn_score", 0.70, 0.75, False,
                    "churn: gbt+isotonic validation ROC-AUC against its best baseline recency_baseline"),
        Measurement("promote_purchase_score", 0.80, 0.79, True,
                    "purchase: logistic_regression+isotonic validation ROC-AUC against its best baseline "
                    "frequency_baseline")]
    assert losing_summary(checks) == ("promote_churn_score: 0.7000 < 0.7500 (churn: gbt+isotonic validation "
                                      "ROC-AUC against its best baseline recency_baseline)")
    assert score_checks(rows, {}) == []                    # an ineligible run shipped no model


def test_segments_are_held_to_the_stability_floor():
    assert [m.passed for m in segment_checks(0.79, 0.8) + segment_checks(0.8, 0.8)] == [False, True]
    assert segment_checks(float("nan"), 0.8) == segment_checks(None, 0.8) == []   # stability_check off


@pytest.mark.parametrize("key, value", [("action", '"fail"'), ("min_segment_stability", "1.5")])
def test_bad_promotion_settings_are_named(context, key, value):
    with pytest.raises(ConfigError, match=f"promotion.{key}"):
        context(f"promotion.{key}={value}")


def _plant_lists(monkeypatch, spark, discover: float, popular_new: float) -> None:
    """recommend_items writes one list per user and these NDCG@10 values instead of recommending."""
    def run(ctx):
        lists = [(f"u{u}", 1, f"i{u}", 1.0, "als", ctx.run_id, "discover") for u in range(3)]
        ctx.tables.overwrite(spark.createDataFrame(lists, C.RECOMMENDATIONS.schema), C.RECOMMENDATIONS)
        metrics = [(ctx.run_id, "discover", 10, "ndcg", discover), (ctx.run_id, "popular_new", 10, "ndcg", popular_new)]
        ctx.tables.append(spark.createDataFrame(metrics, C.REC_METRICS.schema), C.REC_METRICS)
        return StageResult(rows_out=len(lists))
    monkeypatch.setattr(recommend_items, "run", run)


def _outcome(ctx, run_id: str) -> tuple[str, str, set[str]]:
    """(status, message, run ids in recommendations) after ``run_id``."""
    spark = ctx.spark
    record = ctx.tables.read(spark, C.PIPELINE_RUNS).where(f"run_id = '{run_id}'").first()
    lists = {r["run_id"] for r in ctx.tables.read(spark, C.RECOMMENDATIONS).select("run_id").distinct().collect()}
    return record["status"], record["message"], lists


def test_lists_that_lose_to_popularity_keep_the_previous_lists(spark, tmp_path, context, monkeypatch):
    sets = (f"output.root={tmp_path / 'wh'}", "spark.shuffle_partitions=2", "quality.enabled=false")
    _plant_lists(monkeypatch, spark, discover=0.30, popular_new=0.20)
    run_stage(context(*sets, run_id="run-1"), "recommend_items")
    _plant_lists(monkeypatch, spark, discover=0.10, popular_new=0.20)
    ctx = context(*sets, run_id="run-2")
    run_stage(ctx, "recommend_items")

    status, message, lists = _outcome(ctx, "run-2")
    assert (status, lists) == ("not_promoted", {"run-1"})
    assert message.startswith("not promoted, restored recommendations to the previous run's: promote_discover: "
                              "0.1000 < 0.2000 (discover NDCG@10 against its best baseline popular_new)")
    # The evidence stays: the losing run's metrics and both runs' gate rows.
    metrics = ctx.tables.read(spark, C.REC_METRICS).where("run_id = 'run-2'").count()
    gates = {(r["run_id"], r["gate"], r["value"], r["threshold"], r["passed"])
             for r in ctx.tables.read(spark, C.DATA_QUALITY).collect()}
    assert metrics == 2
    assert gates == {("run-1", "promote_discover", 0.30, 0.20, True), ("run-2", "promote_discover", 0.10, 0.20, False)}

    # promotion.action = warn: the same loser ships, and the run says so.
    ctx = context(*sets, "promotion.action=warn", run_id="run-3")
    run_stage(ctx, "recommend_items")
    status, message, lists = _outcome(ctx, "run-3")
    assert (status, lists) == ("success", {"run-3"})
    assert message.startswith("shipped although it loses to a baseline (promotion.action = warn): promote_discover")


def test_a_first_model_that_loses_ships_with_a_warning(spark, tmp_path, context, monkeypatch):
    _plant_lists(monkeypatch, spark, discover=0.10, popular_new=0.20)
    ctx = context(f"output.root={tmp_path / 'wh'}", "spark.shuffle_partitions=2", "quality.enabled=false")
    run_stage(ctx, "recommend_items")
    status, message, lists = _outcome(ctx, "run-1")
    assert (status, lists) == ("success", {"run-1"})
    assert message.startswith("shipped although it loses to a baseline, no previous model to keep: promote_discover")


def test_scores_that_lose_to_recency_keep_the_previous_scores(spark, tmp_path, context, monkeypatch):
    """... and the MLflow registry's champion stays the winning run's model."""
    rows = spark.createDataFrame([(0.0, 0.0), (1.0, 0.0), (2.0, 1.0), (3.0, 1.0)], "recency double, churn double")
    classifier = Pipeline(stages=[VectorAssembler(inputCols=["recency"], outputCol="_fvec"),
                                  LogisticRegression(featuresCol="_fvec", labelCol="churn")]).fit(rows)
    calibrator = IsotonicRegression(featuresCol="recency", labelCol="churn").fit(rows)

    def plant(as_of: date, model_auc: float) -> None:
        def run(ctx):
            saved = f"{score_models_root(ctx)}/{ctx.run_id}/churn"
            classifier.write().overwrite().save(f"{saved}/classifier")
            calibrator.write().overwrite().save(f"{saved}/calibrator")
            empty = {name: None for name in C.CUSTOMER_SCORES.columns}
            rows = [{**empty, "user_id": f"u{i}", "as_of": as_of, "churn_probability": i / 4, "eligible": True,
                     "run_id": ctx.run_id} for i in range(4)]
            score_customers.replace_as_of(ctx, ctx.tables, spark.createDataFrame(rows, C.CUSTOMER_SCORES.schema), as_of)
            metrics = [(ctx.run_id, as_of, "churn", "gbt+isotonic", "roc_auc", None, model_auc),
                       (ctx.run_id, as_of, "churn", "gbt+isotonic", "beats_baseline", None, float(model_auc >= 0.7)),
                       (ctx.run_id, as_of, "churn", "recency_baseline", "roc_auc", None, 0.7)]
            ctx.tables.append(spark.createDataFrame(metrics, C.MODEL_METRICS.schema), C.MODEL_METRICS)
            return StageResult(rows_out=len(rows), models={"churn": SavedModel(saved, ("recency",))})
        monkeypatch.setattr(score_customers, "run", run)

    sets = (f"output.root={tmp_path / 'wh'}", "spark.shuffle_partitions=2", "drift.enabled=false",
            "tracking.enabled=true")
    plant(date(2026, 10, 8), 0.8)
    run_stage(context(*sets, run_id="run-1"), "score_customers")
    plant(date(2026, 10, 15), 0.6)
    ctx = context(*sets, run_id="run-2")
    run_stage(ctx, "score_customers")

    record = ctx.tables.read(spark, C.PIPELINE_RUNS).where("run_id = 'run-2'").first()
    scored = {(r["as_of"], r["run_id"]) for r in ctx.tables.read(spark, C.CUSTOMER_SCORES)
              .select("as_of", "run_id").distinct().collect()}
    assert record["status"] == "not_promoted"
    assert "promote_churn_score: 0.6000 < 0.7000" in record["message"]
    assert scored == {(date(2026, 10, 8), "run-1")}     # tonight's as_of is not there: the last scores stay
    assert math.isclose(ctx.tables.read(spark, C.MODEL_METRICS).where(
        "run_id = 'run-2' AND metric = 'roc_auc' AND model = 'gbt+isotonic'").first()["value"], 0.6)

    # Both models are registered, the loser unpromoted; the champion alias stays on the winner, and what
    # it points at is an MLflow model of the spark flavor that loads and scores like the fitted one.
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'wh').resolve()}/mlflow.db")
    versions = {v.tags["pipeline_run_id"]: v for v in client.search_model_versions("name = 'email_personalization.churn'")}
    assert {run: v.tags["promoted"] for run, v in versions.items()} == {"run-1": "true", "run-2": "false"}
    champion = client.get_model_version_by_alias("email_personalization.churn", "champion")
    assert champion.version == versions["run-1"].version
    local = Path(download_artifacts(champion.source, tracking_uri=client.tracking_uri))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["spark"]["model_data"] == "sparkml"
    assert [column["name"] for column in json.loads(mlmodel["signature"]["inputs"])] == ["recency"]
    loaded = PipelineModel.load(str(local / "sparkml"))
    assert [r["probability"][1] for r in loaded.transform(rows).collect()] == \
        [r["probability"][1] for r in classifier.transform(rows).collect()]
    assert IsotonicRegressionModel.load(str(local / "calibrator")).boundaries == calibrator.boundaries
