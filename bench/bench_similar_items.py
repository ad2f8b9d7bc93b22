"""Similar-item methods judged on what customers buy next, forward in time (not a test).

    PYTHONPATH=. .venv/bin/python bench/bench_similar_items.py /tmp/grocer_wh --conf conf/sources/completejourney.toml

A warehouse's purchases up to T = the latest purchase minus ``--horizon`` days are the history; each
method's item-to-item lists (top ``--top-k`` per item, as ``item_similarities`` holds them) are learned
from it alone. Each customer seen before T then gets the items most similar to their history (SAR's
scoring: the sum of the similarities from every item they bought, items already bought left out), and
the lists are judged by NDCG@10 on the items new to the customer that they bought in (T, T + horizon],
beside the popular items they have not bought. Items the preset excludes (patterns, categories) are in
no history and no list.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyspark.sql import DataFrame, Window  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from jobs.common import load_settings  # noqa: E402
from lib.ingest.products import recommendable_items  # noqa: E402
from lib.platform.session import local_session  # noqa: E402
from lib.recommend.als import AlsParams, fit_als, item_factors  # noqa: E402
from lib.recommend.metrics import per_user_ranking_metrics  # noqa: E402
from lib.recommend.similar import factor_similarities, item_similarities  # noqa: E402
from lib.recommend.topn import rank_and_exclude  # noqa: E402

log = logging.getLogger("bench_similar_items")


def sar_lists(history: DataFrame, similar: DataFrame, n: int) -> DataFrame:
    """(user_idx, item_idx, rank): each customer's ``n`` items by the summed similarity from their history."""
    scores = (history.select("user_idx", F.col("item_idx").alias("_from"))
              .join(similar.select(F.col("item_idx").alias("_from"), F.col("similar_item_idx").alias("item_idx"),
                                   "score"), "_from")
              .groupBy("user_idx", "item_idx").agg(F.sum("score").alias("score")))
    return rank_and_exclude(scores, n, history.select("user_idx", "item_idx"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("warehouse", help="output.root holding events (and products, when the preset has a catalog)")
    parser.add_argument("--conf", action="append", default=[], help="the preset the warehouse was made with")
    parser.add_argument("--horizon", type=float, default=14.0)
    parser.add_argument("--top-k", type=int, default=10, help="similar items kept per item")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--reg-param", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(args.conf, [])
    spark = local_session("bench-similar-items", conf={"spark.sql.shuffle.partitions": "8"})
    root = Path(args.warehouse)
    purchases = (spark.read.format("delta").load(str(root / "events")).where(F.col("event_type") == "purchase")
                 .select("user_id", "item_id", F.col("event_ts").alias("ts")))
    products = spark.read.format("delta").load(str(root / "products")) if (root / "products").is_dir() else None
    allowed = recommendable_items(products, purchases.select("item_id").distinct(),
                                  settings.products.exclude_item_patterns, settings.products.exclude_categories)
    purchases = purchases.join(allowed, "item_id").cache()
    cutoff = purchases.agg(F.max("ts")).first()[0].replace(tzinfo=timezone.utc) - timedelta(days=args.horizon)
    before = purchases.where(F.col("ts") <= F.lit(cutoff).cast("timestamp"))
    users = before.select("user_id").distinct().withColumn("user_idx", F.dense_rank().over(Window.orderBy("user_id")))
    items = before.select("item_id").distinct().withColumn("item_idx", F.dense_rank().over(Window.orderBy("item_id")))
    history = (before.groupBy("user_id", "item_id").agg(F.count(F.lit(1)).cast("double").alias("score"))
               .join(users, "user_id").join(items, "item_id").select("user_idx", "item_idx", "score")).cache()
    after = purchases.where(F.col("ts") > F.lit(cutoff).cast("timestamp")).select("user_id", "item_id").distinct()
    truth = (after.join(users, "user_id").join(items, "item_id", "left")
             .join(history.select("user_idx", "item_idx"), ["user_idx", "item_idx"], "left_anti")
             .select("user_id", "item_id")).cache()
    log.info("T = %s: %d customers, %d items, %d (customer, item) pairs before; %d new pairs after", cutoff,
             users.count(), items.count(), history.count(), truth.count())

    baseline: list[DataFrame] = []

    def measure(name: str, lists: DataFrame, seconds: float) -> None:
        """Log the lists' metrics and, after the first (popular), their NDCG's paired difference from it."""
        named = lists.join(users, "user_idx").join(items, "item_idx").select("user_id", "item_id", "rank")
        per_user = per_user_ranking_metrics(named, truth, 10).select("user_id", "ndcg", "precision", "recall")
        per_user = per_user.localCheckpoint(eager=True)
        if not baseline:
            baseline.append(per_user.select("user_id", F.col("ndcg").alias("_base")))
        paired = per_user.join(baseline[0], "user_id", "full").na.fill(0.0, ["ndcg", "_base"])
        row = paired.agg(F.count(F.lit(1)).alias("users"), F.mean("ndcg").alias("ndcg"),
                         (F.stddev("ndcg") / F.sqrt(F.count(F.lit(1)))).alias("ndcg_se"),
                         F.mean("precision").alias("precision"), F.mean("recall").alias("recall"),
                         F.mean(F.col("ndcg") - F.col("_base")).alias("diff"),
                         (F.stddev(F.col("ndcg") - F.col("_base")) / F.sqrt(F.count(F.lit(1)))).alias("diff_se")
                         ).first()
        log.info("%-12s NDCG@10 %.4f (SE %.4f), precision@10 %.4f, recall@10 %.4f, %d customers; minus popular's "
                 "NDCG %+.4f (paired SE %.4f); lists in %.0f s", name, row["ndcg"], row["ndcg_se"], row["precision"],
                 row["recall"], row["users"], row["diff"], row["diff_se"] or 0.0, seconds)

    started = time.perf_counter()
    # The 1,000 most popular are enough candidates: nobody has bought 990 of them.
    popular = history.groupBy("item_idx").agg(F.count(F.lit(1)).alias("score")).orderBy(F.desc("score")).limit(1000)
    measure("popular", rank_and_exclude(history.select("user_idx").distinct().crossJoin(popular), 10,
                                        history.select("user_idx", "item_idx")), time.perf_counter() - started)
    for method in ("jaccard", "lift"):
        started = time.perf_counter()
        similar = item_similarities(history, args.top_k, method).cache()
        similar.count()
        measure(method, sar_lists(history, similar, 10), time.perf_counter() - started)
        similar.unpersist()
    started = time.perf_counter()
    model = fit_als(history, AlsParams(rank=args.rank, reg_param=args.reg_param, alpha=args.alpha,
                                       checkpoint_interval=-1))
    similar = factor_similarities(item_factors(model), args.top_k).cache()
    similar.count()
    measure("als_cosine", sar_lists(history, similar, 10), time.perf_counter() - started)


if __name__ == "__main__":
    main()
