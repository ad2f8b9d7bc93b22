"""Benchmark: MLlib implicit ALS vs the ``implicit`` library on the same matrix (not a test).

For each size (about 1M and 5M interactions by default) it generates a user x item matrix with
planted taste groups, holds out 20% of each user's items (users with >= 5 items), then times on
local[2] (implicit with 2 threads):

- MLlib: ALS fit, then top-10 for all users with their training items excluded, by both top-N paths
  on the same model: the blockwise scoring of lib.recommend.als.als_top_n (user blocks x broadcast item blocks,
  numpy matmul and partial sort in mapInArrow) and MLlib's recommendForUserSubset per exclusion tier
  (lib.recommend.als.mllib_top_n, the previous path); both write their lists to parquet;
- implicit: AlternatingLeastSquares fit (exact Cholesky solver, use_cg=False), then
  ``recommend(..., N=10, filter_already_liked_items=True)`` for all users;

and scores every top-10 list with lib.recommend.metrics.ranking_metrics (NDCG@10) on the held-out items; it also
counts the blockwise rows that differ from MLlib's lists and the excluded (training) items in them.

Same in substance: MLlib's confidence is 1 + alpha * r; implicit's is alpha * value, so implicit
gets value = 1 + alpha * r and alpha = 1. MLlib scales its ridge term by each user's (item's)
number of ratings (ALS-WR); implicit's is a constant, so implicit gets regularization =
regParam x the mean ratings per user, which equals MLlib's penalty for an average user (items
differ: they have more ratings each). Same rank, same iterations.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/bench_als.py [--sizes 1000000,5000000] [--out docs/als_benchmark.md]
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

# implicit runs its own threads; a second OpenBLAS thread pool underneath only contends with them.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from pyspark.sql import DataFrame, SparkSession, Window  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from lib.platform.session import local_session
from lib.recommend.als import AlsParams, als_top_n, fit_als, mllib_top_n
from lib.recommend.metrics import ranking_metrics
from lib.recommend.topn import TopNBlocks

log = logging.getLogger("bench_als")
ITEMS_PER_USER = 20
GROUPS = 20
USERS_PER_TASK = 20_000


def generate_matrix(spark: SparkSession, n_interactions: int, seed: int) -> tuple[DataFrame, int, int]:
    """(user_idx, item_idx, score) with planted taste groups; returns it with its user and item counts."""
    # Repeat picks of the same item merge, leaving about 15 distinct items per user from 20 draws.
    n_users = n_interactions // 15
    n_items = max(2_000, n_interactions // 250)
    group_items = np.array_split(np.random.default_rng(seed).permutation(n_items), GROUPS)
    zipf = [np.cumsum(1 / np.arange(1, len(g) + 1) ** 0.8) for g in group_items]
    zipf = [c / c[-1] for c in zipf]
    overall = np.cumsum(1 / np.arange(1, n_items + 1) ** 0.8)
    overall = overall / overall[-1]

    def block(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for start in batch.column("id").to_pylist():
                rng = np.random.default_rng([seed, start])
                users = np.arange(start, min(start + USERS_PER_TASK, n_users))
                sizes = np.clip(rng.lognormal(np.log(ITEMS_PER_USER) - 0.3, 0.75, len(users)).astype(int), 1, 300)
                user_col = np.repeat(users, sizes)
                group = (user_col * 7919 + seed) % GROUPS
                in_group = rng.random(len(user_col)) < 0.8
                items = np.searchsorted(overall, rng.random(len(user_col)))
                for g in range(GROUPS):
                    pick = in_group & (group == g)
                    items[pick] = group_items[g][np.searchsorted(zipf[g], rng.random(int(pick.sum())))]
                counts = 1.0 + rng.poisson(1.0, len(user_col))
                yield pa.RecordBatch.from_arrays(
                    [pa.array(user_col.astype(np.int32)), pa.array(items.astype(np.int32)), pa.array(counts)],
                    names=["user_idx", "item_idx", "score"])

    starts = spark.range(0, n_users, USERS_PER_TASK, numPartitions=max(2, n_users // USERS_PER_TASK // 2))
    raw = starts.mapInArrow(block, "user_idx int, item_idx int, score double")
    return raw.groupBy("user_idx", "item_idx").agg(F.sum("score").alias("score")), n_users, n_items


def split_matrix(entries: DataFrame, seed: int) -> tuple[DataFrame, DataFrame]:
    """20% of each user's items held out (users with >= 5 items), chosen by a seeded hash."""
    sized = entries.withColumn("_n", F.count(F.lit(1)).over(Window.partitionBy("user_idx")))
    held = (F.col("_n") >= 5) & ((F.abs(F.xxhash64("user_idx", "item_idx", F.lit(seed))) % 5) == 0)
    return sized.where(~held).drop("_n"), sized.where(held).select("user_idx", "item_idx")


def run_size(spark: SparkSession, workdir: Path, size: int, params: AlsParams, seed: int,
             blocks: TopNBlocks) -> dict:
    import implicit
    import pandas as pd
    import scipy.sparse as sp

    entries, n_users, n_items = generate_matrix(spark, size, seed)
    train, test = split_matrix(entries, seed)
    train.write.mode("overwrite").parquet(str(workdir / f"train_{size}"))
    test.write.mode("overwrite").parquet(str(workdir / f"test_{size}"))
    train = spark.read.parquet(str(workdir / f"train_{size}")).cache()
    test = spark.read.parquet(str(workdir / f"test_{size}")).cache()
    nnz, test_nnz = train.count(), test.count()
    log.info("size %d: %d users, %d items, %d training and %d held-out interactions", size, n_users, n_items, nnz, test_nnz)

    started = time.perf_counter()
    model = fit_als(train, params)
    model.userFactors.count()
    mllib_fit = time.perf_counter() - started
    users = train.select("user_idx").distinct()
    exclude = train.select("user_idx", "item_idx")
    timings, ndcgs = {}, {}
    # Both paths on the same model, each writing its lists: the blockwise one first, then MLlib's.
    for name, top_n in (("block", lambda: als_top_n(model, users, 10, exclude, blocks)),
                        ("mllib", lambda: mllib_top_n(model, users, 10, exclude))):
        started = time.perf_counter()
        top_n().write.mode("overwrite").parquet(str(workdir / f"{name}_recs_{size}"))
        timings[name] = time.perf_counter() - started
        ndcgs[name] = ranking_metrics(spark.read.parquet(str(workdir / f"{name}_recs_{size}")), test, 10,
                                      "user_idx", "item_idx")["ndcg"]
        log.info("MLlib model, %s top-10: %.1f s, NDCG@10 %.4f", name, timings[name], ndcgs[name])
    block = spark.read.parquet(str(workdir / f"block_recs_{size}"))
    mllib = spark.read.parquet(str(workdir / f"mllib_recs_{size}"))
    block_rows = block.count()
    # Rows (user, rank, item) of one path that the other lacks: float rounding can swap near-ties.
    differing = block.select("user_idx", "rank", "item_idx").exceptAll(mllib.select("user_idx", "rank", "item_idx")).count()
    excluded_shown = block.join(exclude, ["user_idx", "item_idx"]).count()
    log.info("blockwise vs MLlib lists: %d of %d rows differ; %d excluded pairs in the blockwise lists",
             differing, block_rows, excluded_shown)

    # implicit reads the same training matrix; the driver holds it because implicit is single-node.
    frame = pd.read_parquet(workdir / f"train_{size}")
    confidence = 1.0 + params.alpha * frame["score"].to_numpy()
    user_items = sp.csr_matrix((confidence.astype(np.float32), (frame["user_idx"], frame["item_idx"])),
                               shape=(n_users, n_items))
    regularization = params.reg_param * nnz / frame["user_idx"].nunique()
    als = implicit.cpu.als.AlternatingLeastSquares(
        factors=params.rank, regularization=regularization, alpha=1.0, iterations=params.max_iter,
        use_cg=False, num_threads=2, random_state=seed, calculate_training_loss=False)
    started = time.perf_counter()
    als.fit(user_items, show_progress=False)
    implicit_fit = time.perf_counter() - started
    started = time.perf_counter()
    user_ids = np.unique(frame["user_idx"].to_numpy())
    ids, scores = als.recommend(user_ids, user_items[user_ids], N=10, filter_already_liked_items=True)
    implicit_top = time.perf_counter() - started
    recs = pd.DataFrame({
        "user_idx": np.repeat(user_ids, ids.shape[1]).astype(np.int32),
        "item_idx": ids.ravel().astype(np.int32),
        "rank": np.tile(np.arange(1, ids.shape[1] + 1), len(user_ids)).astype(np.int32),
    })
    recs = recs[recs["item_idx"] >= 0]
    recs.to_parquet(workdir / f"implicit_recs_{size}.parquet")
    implicit_ndcg = ranking_metrics(spark.read.parquet(str(workdir / f"implicit_recs_{size}.parquet")), test, 10,
                                    "user_idx", "item_idx")["ndcg"]
    log.info("implicit %s: fit %.1f s, top-10 %.1f s, NDCG@10 %.4f", implicit.__version__, implicit_fit,
             implicit_top, implicit_ndcg)
    train.unpersist()
    test.unpersist()
    return {"size": size, "users": n_users, "items": n_items, "train_nnz": nnz, "test_nnz": test_nnz,
            "mllib_fit": mllib_fit, "block_top": timings["block"], "block_ndcg": ndcgs["block"],
            "mllib_top": timings["mllib"], "mllib_ndcg": ndcgs["mllib"], "rows": block_rows,
            "differing": differing, "excluded_shown": excluded_shown,
            "implicit_fit": implicit_fit, "implicit_top": implicit_top, "implicit_ndcg": implicit_ndcg,
            "implicit_reg": regularization, "implicit_version": implicit.__version__}


def write_report(rows: list[dict], params: AlsParams, blocks: TopNBlocks, load: str, out: Path) -> None:
    lines = [
        "# ALS benchmark: MLlib vs implicit",
        "",
        "Produced by `bench/bench_als.py` (one run, this 2-core machine; MLlib on local[2], implicit with",
        "2 threads). Synthetic matrix with 20 planted taste groups, about 20 items per user (lognormal),",
        "values 1 + Poisson(1) summed per pair; 20% of each user's items (users with >= 5) held out.",
        f"Both: rank {params.rank}, {params.max_iter} iterations, MLlib regParam {params.reg_param}, alpha {params.alpha}.",
        "Top-10 excludes each user's training items. NDCG@10 from `lib.recommend.metrics` on the held-out items.",
        "Two top-N paths on the same MLlib model, side by side: **blockwise** (`lib.recommend.als.als_top_n`: user",
        f"blocks of about {blocks.user_block_mb:g} MB x broadcast item blocks of <= {blocks.item_block_mb:g} MB, numpy matmul, -inf",
        "masking and a partial sort inside `mapInArrow`) and **MLlib** (`lib.recommend.als.mllib_top_n`:",
        "`recommendForUserSubset` once per exclusion tier, the previous path). Both top-N timings include",
        "writing the lists to parquet.",
        "",
        f"Load average at the start of the run (`uptime`): {load}",
        "",
        "| interactions (all) | interactions (train) | users | items | MLlib fit s | implicit fit s "
        "| top-10 s blockwise | top-10 s MLlib | top-10 s implicit | blockwise / implicit "
        "| NDCG@10 blockwise | NDCG@10 MLlib | NDCG@10 implicit | rows differing blockwise vs MLlib | excluded items shown |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['train_nnz'] + row['test_nnz']:,} | {row['train_nnz']:,} | {row['users']:,} | {row['items']:,} "
            f"| {row['mllib_fit']:.1f} | {row['implicit_fit']:.1f} | {row['block_top']:.1f} | {row['mllib_top']:.1f} "
            f"| {row['implicit_top']:.1f} | {row['block_top'] / row['implicit_top']:.1f}x "
            f"| {row['block_ndcg']:.4f} | {row['mllib_ndcg']:.4f} | {row['implicit_ndcg']:.4f} "
            f"| {row['differing']:,} of {row['rows']:,} | {row['excluded_shown']} |")
    version = rows[0]["implicit_version"] if rows else "?"
    lines += [
        "",
        "## Making the two the same in substance",
        "",
        "- Confidence: MLlib uses c = 1 + alpha * r for stored pairs; implicit (" + version + ") multiplies the",
        "  stored value by its own alpha. implicit therefore gets value = 1 + alpha * r and alpha = 1.",
        "- Regularization: MLlib's ridge term for a user (item) is regParam x that user's (item's) number of",
        "  ratings (ALS-WR scaling, `numExplicits * regParam` in MLlib's solver); implicit's is a constant.",
        "  implicit gets regParam x mean ratings per user "
        + ", ".join(f"({row['implicit_reg']:.3f} at {row['train_nnz']:,})" for row in rows) + ",",
        "  the same penalty for an average user; items, which have more ratings each, are penalised less",
        "  by implicit. That is the one remaining difference in the objectives.",
        "- Solver: both exact (MLlib Cholesky on the normal equations; implicit with use_cg=False).",
        "- Timings: MLlib's include Spark job overheads (its top-10 includes writing the lists to",
        "  parquet); implicit's run in-process on a matrix already in driver memory.",
    ]
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,5000000")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reg", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=5.0)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--user-block-mb", type=float, default=TopNBlocks().user_block_mb,
                        help="bytes of a user block of the blockwise top-N (factors, exclusions, scores chunk)")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "als_benchmark.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    spark = local_session("bench-als", "local[2]", {"spark.driver.memory": "8g", "spark.sql.shuffle.partitions": "8"})
    params = AlsParams(rank=args.rank, reg_param=args.reg, alpha=args.alpha, max_iter=args.iters,
                       seed=args.seed, checkpoint_interval=-1)
    blocks = TopNBlocks(user_block_mb=args.user_block_mb)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    log.info("load at start: %s", load)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_als_") as tmp:
        for size in (int(part) for part in args.sizes.split(",")):
            rows.append(run_size(spark, Path(tmp), size, params, args.seed, blocks))
            write_report(rows, params, blocks, load, Path(args.out))
    log.info("load at the end: %s", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
