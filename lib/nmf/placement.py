"""Where the work runs: block counts, task slots, and partition keys that give each chunk its own task."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pyspark.sql import Column, SparkSession
from pyspark.sql import functions as F


def grid_size(nnz: int, requested: int, block_nnz: int, extent: int) -> int:
    """Blocks along one dimension: ``requested``, else nnz / block_nnz (at least two), at most ``extent``."""
    size = requested or max(2, math.ceil(nnz / block_nnz))  # at least two tasks share the work
    return max(1, min(size, extent))


def task_slots(spark: SparkSession) -> int:
    """How many tasks the cluster runs at once: the partition count Spark gives a plain range.

    Read through a query rather than ``SparkContext.defaultParallelism`` so that it also works
    under Spark Connect, where there is no SparkContext.
    """
    parts = spark.range(0, 1 << 20).select(F.spark_partition_id().alias("part"))
    return int(parts.agg(F.max("part")).first()[0]) + 1


def partition_keys(spark: SparkSession, count: int) -> list[int]:
    """One key per partition 0..count-1 such that ``repartition(count, key)`` sends key i to partition i.

    Hash partitioning is pmod(hash(key), count), the SQL ``hash`` function, so the keys are found by
    asking Spark (at most 64 x count small numbers come back). With these keys every chunk of the
    shipped factor gets its own reduce task instead of two sharing one by a hash collision.
    """
    found = (spark.range(0, 64 * count).select("id", F.expr(f"pmod(hash(id), {count})").alias("part"))
             .groupBy("part").agg(F.min("id").alias("id")).collect())
    keys = {row["part"]: row["id"] for row in found}
    if len(keys) < count:
        raise RuntimeError(f"no hash key found for {count - len(keys)} of {count} partitions")
    return [int(keys[part]) for part in range(count)]


def key_of(index: Column, keys: list[int] | tuple[int, ...]) -> Column:
    """The partition key of chunk or task ``index`` (0-based)."""
    return F.element_at(F.array(*[F.lit(key) for key in keys]), (index + 1).cast("int"))


@dataclass(frozen=True)
class Chunks:
    """``n_rows`` rows cut into ``count`` contiguous chunks of ``size`` rows (the last one shorter)."""

    n_rows: int
    count: int

    @staticmethod
    def of(n_rows: int, parts: int) -> "Chunks":
        """At most ``parts`` chunks of equal size (fewer when rows are few), none empty."""
        size = math.ceil(n_rows / max(1, min(parts, n_rows)))
        return Chunks(n_rows, math.ceil(n_rows / size))

    @property
    def size(self) -> int:
        return math.ceil(self.n_rows / self.count)

    def bounds(self, chunk: int) -> tuple[int, int]:
        return chunk * self.size, min((chunk + 1) * self.size, self.n_rows)


@dataclass(frozen=True)
class ShippedChunks(Chunks):
    """The shipped factor's rows in chunks, each updated by its own task (``keys``: one per chunk).

    The shipped half-step is row-separable: rows r of the shipped factor need only rows r of the
    summed cross product and the k x k Gram. So the reduce runs in parallel, one chunk per task.
    """

    keys: tuple[int, ...] = ()

    @staticmethod
    def plan(spark: SparkSession, n_rows: int, tasks: int) -> "ShippedChunks":
        chunks = Chunks.of(n_rows, tasks)
        return ShippedChunks(chunks.n_rows, chunks.count, tuple(partition_keys(spark, chunks.count)))
