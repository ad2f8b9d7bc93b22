"""Blockwise top-N by factor dot products: the one engine behind the ALS, NMF-score and evaluation lists,
with per-user exclusions; never a user x item matrix on the driver.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F


log = logging.getLogger(__name__)


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


# Bytes a user block spends per user beside its factors (4 bytes a float) and per excluded pair in
# Spark's row format, where a whole block travels as one row (an array slot, a struct header, the
# ids, the factors' array header; a pair is a slot plus a struct of two ints, 8-byte aligned).
USER_ROW_BYTES = 48


PAIR_ROW_BYTES = 32


@dataclass(frozen=True)
class TopNBlocks:
    """How blockwise top-N cuts its work (``block_top_n``).

    Users are dealt into blocks (user_idx modulo the block count) of about ``user_block_mb`` each,
    counting their factors, their exclusion pairs and the Python task's scores chunk; a block is one
    row inside Spark, copied whole by every operator it passes, so its size, not the number of users,
    is what must fit the heap. Item factors are cut into blocks of at most ``item_block_mb`` (several
    blocks: each user's partial lists are merged by a second pass); the item blocks ride Spark's
    broadcast while all item factors together are at most ``broadcast_mb`` (above it the cross join
    with the user blocks shuffles instead).
    """

    user_block_mb: float = 16.0
    item_block_mb: float = 64.0
    broadcast_mb: float = 256.0
    # Scores per numpy chunk (users x items): 2M float32 = 8 MB stays in cache-friendly territory.
    chunk_elements: int = 1 << 21

    def __post_init__(self) -> None:
        if self.item_block_mb <= 0 or self.broadcast_mb < 0 or self.chunk_elements < 1:
            raise ValueError(f"top-N blocks need item_block_mb > 0, broadcast_mb >= 0, chunk_elements >= 1; "
                             f"got {self}")
        if self.user_block_mb * 2**20 <= 4 * self.chunk_elements:
            raise ValueError(f"top-N user_block_mb must exceed the scores chunk ({4 * self.chunk_elements / 2**20:g} MB "
                             f"of float32), got {self.user_block_mb}")

    def block_bytes(self, users: int, rank: int, pairs: int) -> int:
        """Estimated bytes of one user block: its users' rows and factors, its exclusion pairs, the scores chunk."""
        return users * (USER_ROW_BYTES + 4 * rank) + pairs * PAIR_ROW_BYTES + 4 * self.chunk_elements

    def user_blocks(self, users: int, rank: int, pairs: int, longest: int) -> int:
        """How many blocks ``users`` (with ``pairs`` exclusions, at most ``longest`` for one user) are dealt into.

        Each block gets an even share of the bytes plus, in the worst case, the heaviest user: the
        budget left after the chunk and that user is what the shares are cut to. A budget too small
        for even that gives one user per block.
        """
        if users < 1:
            return 1
        chunk = 4 * self.chunk_elements
        room = self.user_block_mb * 2**20 - self.block_bytes(1, rank, longest)
        if room <= 0:
            return users
        return max(1, min(users, math.ceil((self.block_bytes(users, rank, pairs) - chunk) / room)))


def top_n_rows(scores, n: int):
    """Each row's best ``n`` finite scores of a (users x items) float matrix, exactly and repeatably.

    Returns (row, column, score, rank) numpy arrays, rows ascending, rank 1..n within a row; ties go to
    the smaller column. Excluded entries are -inf and never returned. A full partial sort per row is
    the costly step, so it is done on a strided sample of the columns only: the sample's n-th largest
    score is a lower bound of the row's n-th largest, and the few columns at or above it (about n x the
    stride) are the only candidates sorted.
    """
    import numpy as np

    rows, cols = scores.shape
    if rows == 0 or cols == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=scores.dtype), empty
    if cols > n:
        stride = max(1, cols // max(4 * n, cols // 8))
        sample = scores[:, ::stride]
        width = sample.shape[1]
        if width > n:
            bound = np.partition(sample, width - n, axis=1)[:, width - n]
        else:  # the sample is no longer than a list: everything is a candidate
            bound = np.full(rows, -np.inf, dtype=scores.dtype)
        # flatnonzero of the flat mask is several times faster than a 2-D nonzero.
        row, col = np.divmod(np.flatnonzero(scores >= bound[:, None]), cols)
    else:
        row, col = np.divmod(np.arange(rows * cols), cols)
    value = scores[row, col]
    finite = value > -np.inf
    row, col, value = row[finite], col[finite], value[finite]
    order = np.lexsort((col, -value, row))
    row, col, value = row[order], col[order], value[order]
    rank = np.arange(len(row)) - np.searchsorted(row, row, side="left") + 1
    keep = rank <= n
    return row[keep], col[keep], value[keep], rank[keep]


def _factor_matrix(block, id_field: str):
    """(sorted ids, float32 factors in the same order) from an Arrow list of (id, factors) structs."""
    import numpy as np

    ids = block.field(id_field).to_numpy(zero_copy_only=False)
    flat = block.field("factors").flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    factors = flat.reshape(len(ids), -1) if len(ids) else flat.reshape(0, 0)
    order = np.argsort(ids, kind="stable")
    return ids[order], np.ascontiguousarray(factors[order])


def _score_block(users, excluded, items, n: int, chunk_elements: int):
    """One (user block, item block) pair scored: an Arrow batch of (user_idx, item_idx, score, rank)."""
    import numpy as np
    import pyarrow as pa

    user_ids, user_factors = _factor_matrix(users, "user_idx")
    item_ids, item_factors = _factor_matrix(items, "item_idx")
    ex_row = ex_col = np.zeros(0, dtype=np.int64)
    if excluded is not None and len(excluded) and len(user_ids) and len(item_ids):
        ex_user = excluded.field("user_idx").to_numpy(zero_copy_only=False)
        ex_item = excluded.field("item_idx").to_numpy(zero_copy_only=False)
        row = np.minimum(np.searchsorted(user_ids, ex_user), len(user_ids) - 1)
        col = np.minimum(np.searchsorted(item_ids, ex_item), len(item_ids) - 1)
        # Pairs of users or items outside this pair of blocks (or without factors) are not ours.
        known = (user_ids[row] == ex_user) & (item_ids[col] == ex_item)
        order = np.argsort(row[known], kind="stable")
        ex_row, ex_col = row[known][order], col[known][order]
    item_t = np.ascontiguousarray(item_factors.T)
    step = max(1, chunk_elements // max(1, len(item_ids)))
    parts = []
    for start in range(0, len(user_ids), step):
        stop = min(start + step, len(user_ids))
        scores = user_factors[start:stop] @ item_t
        lo, hi = np.searchsorted(ex_row, [start, stop])
        scores[ex_row[lo:hi] - start, ex_col[lo:hi]] = -np.inf
        row, col, value, rank = top_n_rows(scores, n)
        parts.append((user_ids[row + start], item_ids[col], value, rank))
    if not parts:
        parts = [(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64))]
    return pa.RecordBatch.from_arrays(
        [pa.array(np.concatenate([p[0] for p in parts]).astype(np.int32)),
         pa.array(np.concatenate([p[1] for p in parts]).astype(np.int32)),
         pa.array(np.concatenate([p[2] for p in parts]).astype(np.float64)),
         pa.array(np.concatenate([p[3] for p in parts]).astype(np.int32))],
        names=["user_idx", "item_idx", "score", "rank"])


def _score_blocks(n: int, chunk_elements: int) -> Callable:
    """The ``mapInArrow`` function: each joined row (a user block with its exclusions, an item block) scored."""

    def score(batches):
        for batch in batches:
            users, excluded, items = batch.column("users"), batch.column("excluded"), batch.column("items")
            for row in range(batch.num_rows):
                yield _score_block(users[row].values, excluded[row].values if excluded[row].is_valid else None,
                                   items[row].values, n, chunk_elements)

    return score


def block_top_n(
    user_factors: DataFrame,
    item_factors: DataFrame,
    users: DataFrame,
    n: int,
    exclude: DataFrame | None = None,
    blocks: TopNBlocks | None = None,
) -> DataFrame:
    """(user_idx, item_idx, score, rank): the top ``n`` items by dot product for ``users``, exclusions honoured.

    ``user_factors`` (user_idx, factors) and ``item_factors`` (item_idx, factors): float arrays of one
    length; ``exclude`` (user_idx, item_idx): pairs never returned. Users without factors get no list.
    What the single-node libraries do, spread over Spark: users are dealt into blocks (user_idx modulo
    a count sized by ``TopNBlocks.user_blocks`` from the users', pairs' and longest list's counts) each
    carrying its exclusion pairs, item factors into a few blocks (collected by Spark, never by the
    driver), every user block is cross-joined with the item blocks, and a Python task scores each pair
    with one matrix product per chunk of users, masks the excluded pairs to -inf and keeps the best
    ``n`` by a partial sort (``top_n_rows``). With several item blocks each user's partial lists are
    merged by a window. Ties go to the smaller item_idx, as in ``rank_and_exclude``.
    """
    if n < 1:
        raise ValueError(f"top-N needs n >= 1, got {n}")
    blocks = blocks or TopNBlocks()
    factor = F.col("factors").cast("array<float>").alias("factors")
    wanted = users.select("user_idx").distinct().join(user_factors.select("user_idx", factor), "user_idx")
    pairs = None
    if exclude is not None:
        # Only the wanted users' pairs travel: a block never carries lists nobody is scored against.
        pairs = (exclude.select(F.col("user_idx").cast("int"), F.col("item_idx").cast("int"))
                 .join(wanted.select("user_idx"), "user_idx", "left_semi"))
        lengths = wanted.select("user_idx").join(pairs.groupBy("user_idx").agg(F.count(F.lit(1)).alias("_pairs")),
                                                 "user_idx", "left")
    else:
        lengths = wanted.select("user_idx", F.lit(None).cast("long").alias("_pairs"))
    # One action sizes both sides (each action costs about 0.3 s however small its input).
    sizes = item_factors.agg(F.count(F.lit(1)).alias("items"), F.max(F.size("factors")).alias("rank")).crossJoin(
        lengths.agg(F.count(F.lit(1)).alias("users"), F.sum("_pairs").alias("pairs"),
                    F.max("_pairs").alias("longest"))).first()
    n_items, rank = int(sizes["items"]), int(sizes["rank"] or 0)
    item_mb = n_items * rank * 4 / 2**20
    n_item_blocks = max(1, math.ceil(item_mb / blocks.item_block_mb))
    n_users, n_pairs, longest = int(sizes["users"]), int(sizes["pairs"] or 0), int(sizes["longest"] or 0)
    n_user_blocks = blocks.user_blocks(n_users, rank, n_pairs, longest)
    log.info("blockwise top-%d: %d users with %d exclusion pairs (longest list %d) in %d user block(s) of about "
             "%.1f MB; %d items x rank %d (%.1f MB) in %d item block(s), %s", n, n_users, n_pairs, longest,
             n_user_blocks, (blocks.block_bytes(n_users, rank, n_pairs) - 4 * blocks.chunk_elements)
             / n_user_blocks / 2**20, n_items, rank, item_mb, n_item_blocks,
             "broadcast" if item_mb <= blocks.broadcast_mb else "shuffled (over broadcast_mb)")
    block_of = F.pmod(F.col("user_idx"), F.lit(n_user_blocks)).alias("_ublock")
    user_blocks = wanted.groupBy(block_of).agg(F.collect_list(F.struct("user_idx", "factors")).alias("users"))
    pair = "array<struct<user_idx:int,item_idx:int>>"
    if pairs is not None:
        excluded = pairs.groupBy(block_of).agg(F.collect_list(F.struct("user_idx", "item_idx")).cast(pair)
                                               .alias("excluded"))
        user_blocks = user_blocks.join(excluded, "_ublock", "left")
    else:
        user_blocks = user_blocks.withColumn("excluded", F.lit(None).cast(pair))
    item_blocks = (
        item_factors.select(F.col("item_idx").cast("int"), factor)
        .groupBy((F.col("item_idx") % F.lit(n_item_blocks)).alias("_iblock"))
        .agg(F.collect_list(F.struct("item_idx", "factors")).alias("items"))
    )
    if item_mb <= blocks.broadcast_mb:
        item_blocks = F.broadcast(item_blocks)
    scored = (user_blocks.select("users", "excluded").crossJoin(item_blocks.select("items"))
              .mapInArrow(_score_blocks(n, blocks.chunk_elements),
                          "user_idx int, item_idx int, score double, rank int"))
    if n_item_blocks == 1:
        return scored
    return rank_and_exclude(scored.drop("rank"), n)
