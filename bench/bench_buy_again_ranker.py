"""Buy-again rankers against the trivial lists on a warehouse's events, forward in time (not a test).

    PYTHONPATH=. .venv/bin/python bench/bench_buy_again_ranker.py /tmp/wh [logistic_regression gbt]

Lists are made as of T = the latest purchase minus ``--horizon`` days and judged by NDCG@10 on what the
customers seen before T bought in (T, T + horizon]; each ranker is fitted on the window before T
(lib.recommend.buy_again.fit_ranker), as the recommend_items stage does.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyspark.sql import functions as F  # noqa: E402

from lib.platform.session import local_session
from lib.recommend.buy_again import (BuyAgainParams, buy_again_top_n, fit_ranker, most_bought_top_n, most_recent_top_n,
                                     purchase_occasions, ranker_top_n)
from lib.recommend.metrics import ranking_metrics

log = logging.getLogger("bench_buy_again_ranker")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("warehouse", help="output.root holding an events table")
    parser.add_argument("models", nargs="*", default=["logistic_regression"])
    parser.add_argument("--horizon", type=float, default=14.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spark = local_session("bench-buy-again-ranker", conf={"spark.sql.shuffle.partitions": "8"})
    events = spark.read.format("delta").load(str(Path(args.warehouse) / "events"))
    occasions = purchase_occasions(events, ["purchase"]).cache()
    params = BuyAgainParams(horizon_days=args.horizon)
    cutoff = occasions.agg(F.max("ts")).first()[0].replace(tzinfo=timezone.utc) - timedelta(days=args.horizon)
    at_cutoff = F.lit(cutoff).cast("timestamp")
    seen = occasions.where(F.col("ts") <= at_cutoff).select("user_id").distinct()
    truth = occasions.where(F.col("ts") > at_cutoff).select("user_id", "item_id").distinct().join(seen, "user_id").cache()

    def measure(name: str, lists) -> None:
        values = ranking_metrics(lists, truth, 10)
        log.info("%s: NDCG@10 %.4f (SE %.4f), precision@10 %.4f, recall@10 %.4f, %d customers", name,
                 values["ndcg"], values["ndcg_se"], values["precision"], values["recall"], values["users"])

    measure("most_bought", most_bought_top_n(occasions, cutoff, 10))
    measure("most_recent", most_recent_top_n(occasions, cutoff, 10))
    measure("heuristic", buy_again_top_n(occasions, cutoff, params, 10))
    for kind in args.models:
        started = time.perf_counter()
        ranker = fit_ranker(occasions, cutoff, params, kind)
        log.info("%s (%.0f s)", ranker.note, time.perf_counter() - started)
        measure(kind, ranker_top_n(ranker, occasions, cutoff, params, 10))


if __name__ == "__main__":
    main()
