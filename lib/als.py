"""Implicit-feedback ALS (``pyspark.ml.recommendation.ALS``): fitting, top-N with exclusions, tuning.

MLlib's implicit ALS (Hu, Koren & Volinsky 2008) treats every stored score r > 0 as preference 1
with confidence ``1 + alpha * r`` and every absent pair as preference 0 with confidence 1; its
ridge term is ``regParam * n`` where n is the number of the user's (item's) stored scores
(the ALS-WR scaling), so regParam is comparable across data sets of different density.
"""
from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable

from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlsParams:
    """One ALS configuration."""

    rank: int
    reg_param: float
    alpha: float
    max_iter: int = 10
    seed: int = 42
    # Checkpointing cuts the lineage every N iterations; Spark ignores it unless a checkpoint
    # directory is set (spark.checkpoint.dir at submit time), and -1 switches it off.
    checkpoint_interval: int = 10
    # Blocks of users and of items the solver works in; 0 keeps MLlib's default (10). More blocks
    # spread big data over more tasks; small data runs faster with about one per core.
    num_blocks: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.max_iter < 1:
            raise ValueError(f"ALS rank and max_iter must be >= 1, got rank={self.rank} max_iter={self.max_iter}")
        if self.reg_param < 0 or self.alpha < 0:
            raise ValueError(f"ALS reg_param and alpha must be >= 0, got {self.reg_param}, {self.alpha}")
        if self.checkpoint_interval == 0 or self.checkpoint_interval < -1:
            raise ValueError(f"ALS checkpoint_interval must be >= 1 or -1, got {self.checkpoint_interval}")
        if self.num_blocks < 0:
            raise ValueError(f"ALS num_blocks must be >= 0, got {self.num_blocks}")


@dataclass(frozen=True)
class TuningResult:
    """A candidate's validation score and how long its fit and evaluation took."""

    params: AlsParams
    metric: str
    k: int
    value: float
    seconds: float


def fit_als(
    ratings: DataFrame,
    params: AlsParams,
    user_col: str = "user_idx",
    item_col: str = "item_idx",
    rating_col: str = "score",
) -> ALSModel:
    """Fit implicit-feedback ALS on (user, item, rating >= 0) rows with integer ids."""
    for column in (user_col, item_col, rating_col):
        if column not in ratings.columns:
            raise ValueError(f"ratings lack column {column}; has {', '.join(ratings.columns)}")
    als = ALS(
        rank=params.rank,
        maxIter=params.max_iter,
        regParam=params.reg_param,
        alpha=params.alpha,
        implicitPrefs=True,
        userCol=user_col,
        itemCol=item_col,
        ratingCol=rating_col,
        seed=params.seed,
        checkpointInterval=params.checkpoint_interval,
        coldStartStrategy="drop",
    )
    if params.num_blocks:
        als.setNumUserBlocks(params.num_blocks).setNumItemBlocks(params.num_blocks)
    return als.fit(ratings.select(user_col, F.col(item_col), F.col(rating_col).cast("float").alias(rating_col)))


def rank_and_exclude(
    candidates: DataFrame,
    n: int,
    exclude: DataFrame | None = None,
    user_col: str = "user_idx",
    item_col: str = "item_idx",
    score_col: str = "score",
) -> DataFrame:
    """(user, item, score, rank): each user's best ``n`` candidates after dropping excluded pairs.

    Ties in score go to the smaller item id so results are repeatable.
    """
    if exclude is not None:
        candidates = candidates.join(exclude.select(user_col, item_col), [user_col, item_col], "left_anti")
    order = Window.partitionBy(user_col).orderBy(F.col(score_col).desc(), F.col(item_col))
    return (
        candidates.withColumn("rank", F.row_number().over(order))
        .where(F.col("rank") <= n)
        .select(user_col, item_col, F.col(score_col).cast("double").alias("score"), "rank")
    )


def exclusion_tiers(n: int, longest: int, growth: int = 4) -> list[int]:
    """Upper bounds n, growth * n, ... of exclusion-list lengths, the last one >= ``longest``."""
    bounds = [n]
    while bounds[-1] < longest:
        bounds.append(bounds[-1] * growth)
    return bounds


def als_top_n(
    model: ALSModel,
    users: DataFrame,
    n: int,
    exclude: DataFrame | None = None,
) -> DataFrame:
    """(user_idx, item_idx, score, rank): the model's top ``n`` unexcluded items for ``users``.

    MLlib ranks all items blockwise on the executors (``recommendForUserSubset``). Each user must
    be asked for ``n`` plus as many items as they have exclusions, so users are grouped into tiers
    by the length of their exclusion list (up to n, 4n, 16n, ...) and each tier is asked for
    ``n + its bound``: the work per user stays within a small factor of what they need, instead of
    every user paying for the longest list.
    """
    if n < 1:
        raise ValueError(f"top-N needs n >= 1, got {n}")
    user_col, item_col = model.getUserCol(), model.getItemCol()
    targets = users.select(user_col).distinct()
    if exclude is None:
        tiers = [(targets, n)]
    else:
        per_user = (
            targets.join(exclude.groupBy(user_col).agg(F.count(F.lit(1)).alias("_excluded")), user_col, "left")
            .fillna(0, ["_excluded"])
        )
        longest = int(per_user.agg(F.max("_excluded")).first()[0] or 0)
        bounds = exclusion_tiers(n, longest)
        tiers = [
            (per_user.where((F.col("_excluded") > lower) & (F.col("_excluded") <= upper)).select(user_col), n + upper)
            for lower, upper in zip([-1] + bounds[:-1], bounds)
        ]
    parts = [
        model.recommendForUserSubset(subset, count).select(user_col, F.explode("recommendations").alias("rec"))
        for subset, count in tiers
    ]
    exploded = parts[0]
    for part in parts[1:]:
        exploded = exploded.unionByName(part)
    candidates = exploded.select(
        user_col, F.col(f"rec.{item_col}").alias(item_col), F.col("rec.rating").alias("score")
    )
    return rank_and_exclude(candidates, n, exclude, user_col, item_col)


def candidate_grid(
    ranks: list[int],
    reg_params: list[float],
    alphas: list[float],
    max_iter: int,
    seed: int,
    checkpoint_interval: int,
    search: str = "grid",
    max_candidates: int = 0,
    num_blocks: int = 0,
) -> list[AlsParams]:
    """The tuning candidates: the full grid, or ``max_candidates`` of it drawn at random (seeded)."""
    if not ranks or not reg_params or not alphas:
        raise ValueError("ALS tuning needs at least one rank, one reg_param and one alpha")
    grid = [
        AlsParams(rank, reg, alpha, max_iter, seed, checkpoint_interval, num_blocks)
        for rank, reg, alpha in itertools.product(ranks, reg_params, alphas)
    ]
    if search == "grid":
        return grid
    if search == "random":
        if max_candidates < 1:
            raise ValueError("random search needs max_candidates >= 1")
        return random.Random(seed).sample(grid, min(max_candidates, len(grid)))
    raise ValueError(f"ALS search must be 'grid' or 'random', got {search!r}")


def tune_als(
    train: DataFrame,
    validation_truth: DataFrame,
    candidates: list[AlsParams],
    k: int,
    evaluate: Callable[[DataFrame, DataFrame, int], float],
    exclude: DataFrame | None = None,
    on_result: Callable[[TuningResult], None] | None = None,
    best_model: list | None = None,
) -> tuple[AlsParams, list[TuningResult]]:
    """Fit every candidate on ``train``, score its top K for the validation users, keep the best.

    ``evaluate(recommended, truth, k)`` returns the selection metric (higher is better), e.g.
    NDCG@K; ``on_result`` sees each candidate as soon as it finishes. ``best_model``: a list that
    ends up holding the best candidate's fitted model (only one model is kept at a time).
    """
    if not candidates:
        raise ValueError("ALS tuning needs at least one candidate")
    users = validation_truth.select("user_idx").distinct().cache()
    results: list[TuningResult] = []
    for number, params in enumerate(candidates, start=1):
        started = time.perf_counter()
        model = fit_als(train, params)
        recommended = als_top_n(model, users, k, exclude)
        value = evaluate(recommended, validation_truth, k)
        result = TuningResult(params, "ndcg", k, value, time.perf_counter() - started)
        if best_model is not None and (not results or value > max(r.value for r in results)):
            best_model[:] = [model]
        results.append(result)
        log.info("ALS candidate %d/%d %s: validation NDCG@%d = %.4f (%.1f s)", number, len(candidates),
                 {key: val for key, val in asdict(params).items() if key in ("rank", "reg_param", "alpha")},
                 k, value, result.seconds)
        if on_result is not None:
            on_result(result)
    users.unpersist()
    best = max(results, key=lambda result: result.value)
    return best.params, results
