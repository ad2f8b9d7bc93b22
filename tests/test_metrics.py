"""Ranking metrics: a hand-computed example and agreement with Spark's RankingEvaluator."""
from __future__ import annotations

import math
import statistics

import pytest
from pyspark.ml.evaluation import RankingEvaluator
from pyspark.sql import Window
from pyspark.sql import functions as F

from lib.recommend.metrics import (SEGMENT_USEFULNESS_COLUMNS, evaluate, group_ranking_metrics, ranking_evaluator_input,
                                   ranking_metrics, segment_usefulness, segments_beating_global, write_strategy_report)


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
    everything = evaluate(recommended, relevant, k=3, catalog_size=10)  # the same, plus coverage, in one action
    assert everything == pytest.approx({**got, "coverage": 5 / 10})


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
    with pytest.raises(ValueError, match="catalog size must be >= 1"):
        evaluate(recommended, relevant, k=1, catalog_size=0)
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


def test_segment_usefulness_pairs_each_customers_two_lists(spark):
    # K = 2, binary gains: NDCG of one relevant item hit at rank 1 is 1, of two relevant items with one hit
    # at rank r is (1 / log2(r + 1)) / (1 + 1 / log2(3)). Segment 0's list a b c, segment 1's c d e, the
    # global list x y z for everyone but u3 and u9. u3 is missing from the segment list, u9 from both: NDCG 0.
    # u7 has no segment (left out); u8 has a segment but no held-out purchase (not evaluated).
    segment_lists = _recs(spark, [(u, item, r) for u in ("u1", "u2") for r, item in enumerate("abc", 1)]
                          + [(u, item, r) for u in ("u4", "u5", "u6", "u8") for r, item in enumerate("cde", 1)])
    global_lists = _recs(spark, [(u, item, r) for u in ("u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8")
                                 for r, item in enumerate("xyz", 1)])
    truth = spark.createDataFrame([("u1", "a"), ("u2", "b"), ("u2", "x"), ("u3", "a"), ("u4", "x"), ("u5", "y"),
                                   ("u5", "e"), ("u6", "c"), ("u7", "x"), ("u9", "a")], "user_id string, item_id string")
    segments = spark.createDataFrame([("u1", 0), ("u2", 0), ("u3", 0), ("u4", 1), ("u5", 1), ("u6", 1), ("u8", 1),
                                      ("u9", 2)], "user_id string, segment_id int")

    got = [row.asDict() for row in segment_usefulness(segment_lists, global_lists, truth, segments, k=2).collect()]

    second = 1 / math.log2(3)
    both = 1 + second                              # IDCG@2 of two relevant items
    # segment 0: u1 hit a at 1 (segment) / none (global); u2 b at 2 of {b, x} / x at 1; u3 none / none
    seg0 = ([1.0, second / both, 0.0], [0.0, 1 / both, 0.0])
    # segment 1: u4 none / x at 1; u5 e is at rank 3 > K / y at 2 of {y, e}; u6 c at 1 / none
    seg1 = ([0.0, 0.0, 1.0], [1.0, second / both, 0.0])
    expected = []
    for segment, (own, overall) in enumerate((seg0, seg1)):
        diffs = [a - b for a, b in zip(own, overall)]
        expected.append({"segment_id": segment, "users": 3, "ndcg_segment": pytest.approx(sum(own) / 3),
                         "ndcg_global": pytest.approx(sum(overall) / 3), "ndcg_diff": pytest.approx(sum(diffs) / 3),
                         "ndcg_diff_se": pytest.approx(statistics.stdev(diffs) / math.sqrt(3))})
    expected[0].update(hit_segment=pytest.approx(2 / 3), hit_global=pytest.approx(1 / 3))
    expected[1].update(hit_segment=pytest.approx(1 / 3), hit_global=pytest.approx(2 / 3))
    # u9 alone, on no list: NDCG 0 on both, no standard error for one customer.
    expected.append({"segment_id": 2, "users": 1, "ndcg_segment": 0.0, "ndcg_global": 0.0, "ndcg_diff": 0.0,
                     "ndcg_diff_se": None, "hit_segment": 0.0, "hit_global": 0.0})
    assert [tuple(row) for row in got] == [SEGMENT_USEFULNESS_COLUMNS] * 3
    assert got == expected
    assert got[0]["ndcg_diff"] > 0 > got[1]["ndcg_diff"]   # segment 1's own list is the worse one
    with pytest.raises(ValueError, match="segments lacks column.s. segment_id"):
        segment_usefulness(segment_lists, global_lists, truth, segments.withColumnRenamed("segment_id", "s"), k=2)


def test_segments_beating_global_count_customers_beyond_two_standard_errors(tmp_path):
    rows = [{"k": 10, "segment_id": 0, "users": 10, "ndcg_segment": 0.5, "ndcg_global": 0.2, "ndcg_diff": 0.3,
             "ndcg_diff_se": 0.1, "hit_segment": 0.6, "hit_global": 0.4},
            {"k": 10, "segment_id": 1, "users": 30, "ndcg_segment": 0.3, "ndcg_global": 0.2, "ndcg_diff": 0.1,
             "ndcg_diff_se": 0.1, "hit_segment": 0.4, "hit_global": 0.3},
            {"k": 10, "segment_id": 2, "users": 1, "ndcg_segment": 1.0, "ndcg_global": 0.0, "ndcg_diff": 1.0,
             "ndcg_diff_se": None, "hit_segment": 1.0, "hit_global": 0.0}]
    assert segments_beating_global(rows) == (1, 3, pytest.approx(10 / 41))
    assert segments_beating_global(rows, z=0.5) == (2, 3, pytest.approx(40 / 41))
    metrics = [("blended", 10, metric, 0.1) for metric in ("ndcg", "recall", "precision", "users")]
    report = write_strategy_report(tmp_path, "run-1", metrics, segment_rows=rows).read_text()
    assert "in 1 of 3 training-side segments, holding 24.4% of the 41 evaluated customers" in report
    assert "| 0 | 10 | 0.5000 | 0.2000 | +0.3000 (0.1000) | 0.600 | 0.400 |" in report
    assert "| 2 | 1 | 1.0000 | 0.0000 | +1.0000 (-) | 1.000 | 0.000 |" in report
