"""Ranking metrics: a hand-computed example and agreement with Spark's RankingEvaluator."""
from __future__ import annotations

import math
import statistics

import pytest
from pyspark.ml.evaluation import RankingEvaluator
from pyspark.sql import Window
from pyspark.sql import functions as F

from lib.metrics import catalog_coverage, evaluate, group_ranking_metrics, ranking_evaluator_input, ranking_metrics


def _recs(spark, rows):
    return spark.createDataFrame(rows, "user_id string, item_id string, rank int")


def test_hand_computed_example(spark):
    # user a: ranking x1 x2 x3 x4, relevant {x2, x4, x9}; user b: ranking y1 y2, relevant {y1};
    # user c: relevant {z1} but no recommendations at all.
    recommended = _recs(spark, [("a", "x1", 1), ("a", "x2", 2), ("a", "x3", 3), ("a", "x4", 4),
                                ("b", "y1", 1), ("b", "y2", 2)])
    relevant = spark.createDataFrame([("a", "x2"), ("a", "x4"), ("a", "x9"), ("b", "y1"), ("c", "z1")],
                                     "user_id string, item_id string")
    got = ranking_metrics(recommended, relevant, k=3)

    precision = (1 / 3 + 1 / 3 + 0) / 3
    recall = (1 / 3 + 1 + 0) / 3
    ap_a = (1 / 2) / min(3, 3)                     # x2 hit at position 2; x4 is beyond K=3
    ap_b = 1.0 / min(1, 3)
    map_k = (ap_a + ap_b + 0) / 3
    ndcg_a = (1 / math.log2(3)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    ndcg_b = 1.0
    ndcg = (ndcg_a + ndcg_b + 0) / 3
    assert got["users"] == 3
    assert got["precision"] == pytest.approx(precision)
    assert got["recall"] == pytest.approx(recall)
    assert got["map"] == pytest.approx(map_k)
    assert got["ndcg"] == pytest.approx(ndcg)
    assert got["ndcg_se"] == pytest.approx(statistics.stdev([ndcg_a, ndcg_b, 0.0]) / math.sqrt(3))
    assert catalog_coverage(recommended, catalog_size=10, k=3) == pytest.approx(5 / 10)


def test_agrees_with_ranking_evaluator(spark):
    users, items, listed = 60, 40, 15
    # Random rankings without duplicates and random relevant sets, built in Spark.
    pairs = spark.range(users).withColumnRenamed("id", "user_idx").crossJoin(
        spark.range(items).withColumnRenamed("id", "item_idx"))
    ranked = pairs.withColumn("rank", F.row_number().over(
        Window.partitionBy("user_idx").orderBy(F.rand(11))))
    recommended = ranked.where(F.col("rank") <= listed)
    relevant = pairs.where(F.rand(5) < 0.12).select("user_idx", "item_idx")
    evaluator_input = ranking_evaluator_input(recommended, relevant, "user_idx", "item_idx").cache()

    names = {"precision": "precisionAtK", "recall": "recallAtK", "map": "meanAveragePrecisionAtK",
             "ndcg": "ndcgAtK"}
    for k in (1, 5, 20):
        ours = ranking_metrics(recommended, relevant, k, "user_idx", "item_idx")
        for metric, spark_name in names.items():
            theirs = RankingEvaluator(metricName=spark_name, k=k).evaluate(evaluator_input)
            assert ours[metric] == pytest.approx(theirs, abs=1e-9), (metric, k)
    # The random data must exercise the interesting cases: misses, partial hits, short lists.
    assert 0 < ranking_metrics(recommended, relevant, 10, "user_idx", "item_idx")["ndcg"] < 1
    evaluator_input.unpersist()


def test_evaluate_adds_coverage_and_rejects_bad_input(spark):
    recommended = _recs(spark, [("a", "x1", 1), ("b", "x1", 1), ("b", "x2", 2)])
    relevant = spark.createDataFrame([("a", "x1")], "user_id string, item_id string")
    got = evaluate(recommended, relevant, k=1, catalog_size=4)
    assert got["coverage"] == pytest.approx(1 / 4)
    assert got["ndcg"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="K >= 1"):
        ranking_metrics(recommended, relevant, k=0)
    with pytest.raises(ValueError, match="lacks column"):
        ranking_metrics(recommended.drop("rank"), relevant, k=1)


def test_group_metrics_average_each_groups_users(spark):
    # a: hit at rank 1 (NDCG 1); b: no hit (0); c: hit at rank 2 of one relevant (1 / log2(3)). d has no group.
    recommended = _recs(spark, [("a", "x", 1), ("b", "y", 1), ("c", "q", 1), ("c", "z", 2), ("d", "w", 1)])
    relevant = spark.createDataFrame([("a", "x"), ("b", "v"), ("c", "z"), ("d", "w")], "user_id string, item_id string")
    groups = spark.createDataFrame([("a", "repeat"), ("b", "repeat"), ("c", "one_order")],
                                   "user_id string, customer_group string")
    got = group_ranking_metrics(recommended, relevant, groups, k=2)
    assert set(got) == {"repeat", "one_order"}
    assert got["repeat"]["users"] == 2 and got["repeat"]["ndcg"] == pytest.approx(0.5)
    assert got["repeat"]["ndcg_se"] == pytest.approx(statistics.stdev([1.0, 0.0]) / math.sqrt(2))
    assert got["one_order"]["ndcg"] == pytest.approx(1 / math.log2(3)) and got["one_order"]["ndcg_se"] == 0.0
