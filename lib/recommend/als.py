"""Implicit-feedback ALS (``pyspark.ml.recommendation.ALS``): candidates, fitting, tuning, and its top-N
(``als_top_n``, by the blockwise engine of ``lib.recommend.topn``).

MLlib's implicit ALS (Hu, Koren & Volinsky 2008) treats every stored score r > 0 as preference 1
with confidence ``1 + alpha * r`` and every absent pair as preference 0 with confidence 1; its
ridge term is ``regParam * n`` where n is the number of the user's (item's) stored scores
(the ALS-WR scaling), so regParam is comparable across data sets of different density.
"""
from __future__ import annotations

import itertools
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable

from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.platform.settings import AlsSettings
from lib.recommend.topn import TopNBlocks, block_top_n, exclusion_tiers, rank_and_exclude

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
class Estimate:
    """A metric's mean over evaluated users with its sampling error (standard error of the mean)."""

    users: int
    mean: float
    se: float = 0.0

    def lower(self, z: float) -> float:
        return self.mean - z * self.se

    def upper(self, z: float) -> float:
        return self.mean + z * self.se

    def combine(self, other: "Estimate") -> "Estimate":
        """The estimate over both (disjoint) sets of users, exactly as if measured at once."""
        users = self.users + other.users
        if users == 0:
            return self
        mean = (self.users * self.mean + other.users * other.mean) / users
        # Each part's sum of squared deviations from the pooled mean, from its own sd (se * sqrt(n)).
        squares = sum((part.users - 1) * part.users * part.se ** 2 + part.users * (part.mean - mean) ** 2
                      for part in (self, other) if part.users)
        se = math.sqrt(squares / (users - 1) / users) if users > 1 else 0.0
        return Estimate(users, mean, se)


@dataclass(frozen=True)
class TuningResult:
    """A candidate's validation score (with its sampling error) and how long its fit and evaluation took.

    ``stopped_early``: the candidate was measured on the first stage of the validation users only and
    found clearly worse than the best so far (see ``tune_als``); ``value`` is then that stage's mean.
    """

    params: AlsParams
    metric: str
    k: int
    value: float
    seconds: float
    se: float = 0.0
    users: int = 0
    stopped_early: bool = False


# Share of the validation users a candidate is measured on first, when it may be stopped early.
FIRST_STAGE_SHARE = 0.25


def user_hash_fraction(column: str, seed: int):
    """A seeded, uniform value in [0, 1) per user id: the same user lands in the same sample every run."""
    return F.pmod(F.xxhash64(F.col(column).cast("string"), F.lit(seed)), F.lit(1_000_003)) / F.lit(1_000_003.0)


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


def item_factors(model: ALSModel) -> DataFrame:
    """(item_idx, factors): the model's item factors under the top-N engine's column names."""
    return model.itemFactors.select(F.col("id").alias("item_idx"), F.col("features").alias("factors"))


def als_top_n(
    model: ALSModel,
    users: DataFrame,
    n: int,
    exclude: DataFrame | None = None,
    blocks: TopNBlocks | None = None,
) -> DataFrame:
    """(user_idx, item_idx, score, rank): the model's top ``n`` unexcluded items for ``users``.

    Blockwise scoring of the model's factor tables (``block_top_n``); the same lists as
    ``mllib_top_n`` (MLlib's ``recommendForUserSubset``) up to float rounding, at a fraction of its time.
    """
    return block_top_n(
        model.userFactors.select(F.col("id").alias("user_idx"), F.col("features").alias("factors")),
        item_factors(model),
        users.select(F.col(model.getUserCol()).alias("user_idx")), n,
        None if exclude is None else exclude.select(F.col(model.getUserCol()).alias("user_idx"),
                                                    F.col(model.getItemCol()).alias("item_idx")),
        blocks,
    )


def mllib_top_n(
    model: ALSModel,
    users: DataFrame,
    n: int,
    exclude: DataFrame | None = None,
) -> DataFrame:
    """(user_idx, item_idx, score, rank) by MLlib's ``recommendForUserSubset``, one call per exclusion tier.

    The previous top-N path, kept as the reference the blockwise ``als_top_n`` is benchmarked against
    (bench/bench_als.py). MLlib ranks all items blockwise on the executors (``recommendForUserSubset``). Each user must
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
    evaluate: Callable[[DataFrame, DataFrame, int], Estimate],
    exclude: DataFrame | None = None,
    on_result: Callable[[TuningResult], None] | None = None,
    best_model: list | None = None,
    blocks: TopNBlocks | None = None,
    stop_z: float = 0.0,
    seed: int = 42,
) -> tuple[AlsParams, list[TuningResult]]:
    """Fit every candidate on ``train``, score its top K for the validation users, keep the best.

    ``evaluate(recommended, truth, k)`` returns the selection metric (higher is better) over the users
    of ``truth`` with its standard error, e.g. NDCG@K; ``on_result`` sees each candidate as soon as it
    finishes. ``best_model``: a list that ends up holding the best candidate's fitted model (only one
    model is kept at a time).

    With ``stop_z`` > 0 every candidate after the first is measured in two stages: first on a seeded
    ``FIRST_STAGE_SHARE`` of the validation users; when its upper bound (mean + z SE) there is below the
    best's lower bound (mean - z SE), it is clearly worse and stops (its top-N for the remaining users is
    never computed); otherwise the remaining users are measured and both stages pooled, which gives
    exactly the mean over all validation users. A stopped candidate is never chosen.
    """
    if not candidates:
        raise ValueError("ALS tuning needs at least one candidate")
    truth = validation_truth.cache()
    users = truth.select("user_idx").distinct().cache()
    staged = stop_z > 0 and len(candidates) > 1
    if staged:
        first = user_hash_fraction("user_idx", seed + 1) < F.lit(FIRST_STAGE_SHARE)
        stages = [(users.where(first).cache(), truth.where(first)), (users.where(~first).cache(), truth.where(~first))]
        # A stage without users cannot be measured: small validation sets are measured at once.
        staged = all(stage_users.limit(1).count() for stage_users, _ in stages)
        if not staged:
            for stage_users, _ in stages:
                stage_users.unpersist()
    results: list[TuningResult] = []
    best: TuningResult | None = None
    for number, params in enumerate(candidates, start=1):
        started = time.perf_counter()
        model = fit_als(train, params)
        stopped = False
        if staged and best is not None:
            estimate = evaluate(als_top_n(model, stages[0][0], k, exclude, blocks), stages[0][1], k)
            stopped = estimate.upper(stop_z) < best.value - stop_z * best.se
            if not stopped:
                estimate = estimate.combine(
                    evaluate(als_top_n(model, stages[1][0], k, exclude, blocks), stages[1][1], k))
        else:
            estimate = evaluate(als_top_n(model, users, k, exclude, blocks), truth, k)
        result = TuningResult(params, "ndcg", k, estimate.mean, time.perf_counter() - started, estimate.se,
                              estimate.users, stopped)
        if not stopped and (best is None or result.value > best.value):
            best = result
            if best_model is not None:
                best_model[:] = [model]
        results.append(result)
        log.info("ALS candidate %d/%d %s: validation NDCG@%d = %.4f +- %.4f (SE, %d users)%s (%.1f s)", number,
                 len(candidates),
                 {key: val for key, val in asdict(params).items() if key in ("rank", "reg_param", "alpha")},
                 k, result.value, result.se, result.users,
                 f"; stopped early, clearly below the best's {best.value:.4f} +- {best.se:.4f}" if stopped else "",
                 result.seconds)
        if on_result is not None:
            on_result(result)
    users.unpersist()
    truth.unpersist()
    if staged:
        for stage_users, _ in stages:
            stage_users.unpersist()
    return best.params, results


def candidates(als: AlsSettings, partitions: int) -> list[AlsParams]:
    """The ALS candidates of the [recommend.als] settings; blocks default to ``partitions`` (the job's
    shuffle partitions: about one task per partition, as everywhere else)."""
    return candidate_grid(list(als.ranks), list(als.reg_params), list(als.alphas), als.max_iter, als.seed,
                          als.checkpoint_interval, als.search, als.max_candidates, als.num_blocks or partitions)


def top_n_blocks(als: AlsSettings) -> TopNBlocks:
    """The top-N block sizes of the [recommend.als] settings."""
    return TopNBlocks(als.top_n_user_block_mb, als.top_n_item_block_mb, als.top_n_broadcast_mb)
