"""1D layout: X row blocks travel with their factor block (the kept factor); the other factor is shipped.

X is cut into p row blocks, each stored in one STATE row next to its factor block, spread evenly over
one partition per task slot, so the kept factor's half-step is a map. The shipped factor
(k x min(m, n)) travels to the tasks in one SHIPPED row through a broadcast join hint, attached to one
block per task. Each map task also emits the partial product X_i' F_i and Gram F_i' F_i summed over
its blocks, cut into chunks of shipped rows; the shipped half-step is row-separable, so one reduce
task per chunk sums its partials and updates it. Per iteration: one pass over X, a shuffle of
tasks x n x k doubles, exactly two Python stages of one wave each, run as one Spark job (after the
job that broadcasts the shipped factor) by the one action of the iteration, reading the objective.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.nmf import codec
from lib.nmf.codec import Kind
from lib.nmf.init import STREAM_ROW_BLOCKS, InitSpec, initial_block
from lib.nmf.layout import Lineage
from lib.nmf.matrix import MatrixStats
from lib.nmf.params import INITS, NMFParams
from lib.nmf.placement import Chunks, ShippedChunks, grid_size, key_of, partition_keys, task_slots
from lib.nmf.rules import Rule, hals_sweeps, make_rule
from lib.nmf.shipped import initial_shipped, read_shipped, shipped_rows
from lib.nmf.sketch import sketch_svd

log = logging.getLogger("lib.nmf")


# Runtime SQL settings the iterations run under (fit.run sets them around the loop and restores them):
# - one row block per Arrow batch, so a map task works on a block while the JVM converts the next
#   (with the default 10,000 rows a batch, Python waited for all of its blocks before starting);
# - no adaptive execution: these plans have nothing for it to adapt (explicit partitioning, a hinted
#   broadcast), and it ran each stage as a job of its own, re-planned on the driver in between.
ITERATION_CONF = {"spark.sql.execution.arrow.maxRecordsPerBatch": "1", "spark.sql.adaptive.enabled": "false"}


class RowBlocks:
    """The kept side is the larger dimension: rows of X, or of X' when ``transposed``."""

    iteration_conf = ITERATION_CONF

    def __init__(self, summed: DataFrame, stats: MatrixStats, params: NMFParams,
                 initial_w: DataFrame | None, initial_h: DataFrame | None, transposed: bool) -> None:
        if transposed:
            summed = summed.select(F.col("col").alias("row"), F.col("row").alias("col"), "value")
        self.summed, self.stats, self.params, self.k = summed, stats, params, params.k
        self.transposed = transposed
        self.name = "1d-transposed" if transposed else "1d"
        self.kept_side, self.shipped_side = ("h", "w") if transposed else ("w", "h")
        self.initial_kept, self.initial_shipped = (initial_h, initial_w) if transposed else (initial_w, initial_h)
        kept_n, shipped_n = (stats.n_cols, stats.n_rows) if transposed else (stats.n_rows, stats.n_cols)
        spark = summed.sparkSession
        tasks = params.parallelism or task_slots(spark)
        p = grid_size(stats.nnz, params.row_blocks, params.block_nnz, kept_n)
        if not params.row_blocks:
            p = min(tasks * -(-p // tasks), kept_n)  # every task gets the same number of blocks
        self.blocks = Chunks.of(kept_n, p)
        self.tasks = min(tasks, self.blocks.count)
        self.grid = (self.blocks.count, 1)
        self.chunks = ShippedChunks.plan(spark, shipped_n, self.tasks)
        self.spec = InitSpec.of(params, stats, shipped_n, INITS)
        kept_passes = hals_sweeps(params, stats.nnz, kept_n, shipped_n)
        shipped_passes = hals_sweeps(params, stats.nnz, shipped_n, kept_n)
        self.update_kept = make_rule(params, self.kept_side, kept_passes)
        self.update_shipped = make_rule(params, self.shipped_side, shipped_passes)
        log.info("NMF layout 1D%s: %d row blocks of <= %d rows in %d tasks; shipped factor %d x %d in %d chunks",
                 " (transposed)" if transposed else "", self.blocks.count, self.blocks.size, self.tasks,
                 shipped_n, self.k, self.chunks.count)
        if params.solver == "hals":
            log.info("NMF HALS sweeps per product: %d on %s, %d on %s", kept_passes, self.kept_side.upper(),
                     shipped_passes, self.shipped_side.upper())

    def start(self, lineage: Lineage) -> None:
        spark = self.summed.sparkSession
        self.state = lineage.hold(self._row_blocks(partition_keys(spark, self.tasks)))
        if self.spec.init == "sketch_svd":
            kept, self.shipped = sketch_svd(self.state, self.chunks, self.k, self.params.seed, self.stats.mean,
                                            self.params.sketch_power_iterations, self.params.broadcast_limit_bytes)
            self.state = lineage.hold(kept)
            return
        shipped_spec = dataclasses.replace(self.spec, init="random") if self.spec.init == "random_columns" else self.spec
        self.shipped = Lineage.cut(initial_shipped(spark, shipped_spec, self.chunks, self.initial_shipped))
        if self.spec.init == "random_columns":
            # The column-average init fixes the kept factor; fit the shipped one to it before iterating.
            fit = make_rule(dataclasses.replace(self.params, solver="hals", inner_passes=10, inner_tol=0.1), self.shipped_side)
            partials = lineage.hold(self._map(self.state, None))
            self.shipped = Lineage.cut(self._reduce(partials, fit))

    def step(self, lineage: Lineage) -> tuple[float, float]:
        # One action per iteration: reading the objective's terms computes the new shipped factor, and
        # its reduce runs the kept half-step as its first stage, filling the new state's checkpoint as
        # it goes (no job of its own for the map, none that re-reads the state to find the partials).
        self.state = lineage.keep(self._map(self.state, self.update_kept), eager=False)
        self.shipped = Lineage.cut(self._reduce(self.state, self.update_shipped), eager=False)
        terms = self.shipped.select("tr_cross", "tr_gram").first()
        return terms["tr_cross"], terms["tr_gram"]

    def factors(self) -> tuple[DataFrame, DataFrame]:
        blocks = self.state.where(F.col("kind") == Kind.BLOCK)
        kept = codec.explode_factor(blocks.withColumn("start", F.col("block") * F.lit(self.blocks.size)), self.k)
        shipped = shipped_rows(self.shipped, self.chunks, self.k)
        w, h = (shipped, kept) if self.transposed else (kept, shipped)
        return w.withColumnRenamed("idx", "row_idx"), h.withColumnRenamed("idx", "col_idx")

    def cached(self) -> list[DataFrame]:
        return []

    def _row_blocks(self, task_keys: list[int]) -> DataFrame:
        """One STATE row per row block (CSR of X_i and the initial factor block); block i in task i mod tasks."""
        spec, blocks, shipped_n = self.spec, self.blocks, self.chunks.n_rows
        block_of = (F.col("row") / F.lit(blocks.size)).cast("long")
        spark = self.summed.sparkSession
        parts = (codec.parts(self.summed, Kind.ENTRY, block_of, row=F.col("row"), col=F.col("col"), value=F.col("value"))
                 .unionByName(codec.parts(spark.range(blocks.count), Kind.MARKER, F.col("id"))))
        if self.initial_kept is not None:
            idx = F.col(self.initial_kept.columns[0])
            parts = parts.unionByName(codec.parts(self.initial_kept, Kind.GIVEN, (idx / F.lit(blocks.size)).cast("long"),
                                                  row=idx, factors=F.col("factors")))

        def build(frame):
            import pandas as pd
            block = int(frame["block"].iloc[0])
            start, stop = blocks.bounds(block)
            matrix = codec.block_matrix(frame[frame["kind"] == Kind.ENTRY], start, 0, stop - start, shipped_n)
            factor = initial_block(spec, STREAM_ROW_BLOCKS + block, start, stop - start, parts=frame, matrix=matrix)
            return pd.DataFrame({"kind": [Kind.BLOCK], "block": [block], "n_rows": [stop - start],
                                 **codec.csr_columns(matrix), "factor": [codec.pack(factor)],
                                 "cross": [None], "gram": [None]})

        built = parts.groupBy("block").applyInPandas(build, codec.spark_schema(codec.STATE))
        tasks = len(task_keys)
        return built.repartition(tasks, key_of(F.col("block") % tasks, task_keys))

    def _map(self, state: DataFrame, update: Rule | None) -> DataFrame:
        """Update every kept block from the shipped factor (a map) and emit what the shipped side needs.

        Output STATE rows: the blocks (BLOCK: X unchanged, new factor); per task and per chunk c of the
        shipped factor one PARTIAL row (block = c) with rows c of sum_i X_i' F_i and the whole
        sum_i F_i' F_i (k x k); and the current shipped chunk c (SHIPPED, block = c) from the task that
        holds block c, so the reduce reads one DataFrame. ``update=None`` keeps the kept factor. Rows of
        other kinds in ``state`` (the previous iteration's partials) are skipped.
        """
        # Block b sits in task b mod tasks, so blocks 0..tasks-1 are one per task: only they carry the
        # broadcast factor into Python, instead of every block row carrying a copy of it.
        carries = (F.col("kind") == Kind.BLOCK) & (F.col("block") < F.lit(self.tasks))
        # Only the blocks go to Python: the previous iteration's partials stay in the JVM.
        joined = state.where(F.col("kind") == Kind.BLOCK).join(F.broadcast(self.shipped), carries, "left")
        chunks, k = self.chunks, self.k

        def step(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            cross_sum = np.zeros((chunks.n_rows, k))
            gram_sum = np.zeros((k, k))
            shipped_factor = shipped_gram = None
            held: list[int] = []
            waiting: list[pa.RecordBatch] = []

            def update_blocks(batch: pa.RecordBatch) -> pa.RecordBatch:
                nonlocal cross_sum, gram_sum
                factors = []
                n_rows = batch.column("n_rows").to_numpy()
                held.extend(batch.column("block").to_pylist())
                for i in range(batch.num_rows):
                    # X stays in Arrow buffers: read without copying, passed through unchanged.
                    matrix = codec.csr(batch.column("indptr")[i].as_buffer(), batch.column("indices")[i].as_buffer(),
                                       batch.column("data")[i].as_buffer(), int(n_rows[i]), chunks.n_rows)
                    factor = codec.unpack(batch.column("factor")[i].as_buffer(), int(n_rows[i]), k)
                    if update is not None:
                        factor = codec.stored(update(factor, np.asarray(matrix @ shipped_factor), shipped_gram))
                    cross_sum += np.asarray(matrix.T @ factor)
                    gram_sum += factor.T @ factor
                    factors.append(codec.pack(factor))
                empty = pa.nulls(batch.num_rows, pa.binary())
                return pa.RecordBatch.from_arrays(
                    [pa.array([Kind.BLOCK] * batch.num_rows), batch.column("block"), batch.column("n_rows"),
                     batch.column("indptr"), batch.column("indices"), batch.column("data"),
                     pa.array(factors, pa.binary()), empty, empty], schema=codec.STATE)

            for batch in batches:
                is_block = pc.equal(batch.column("kind"), Kind.BLOCK)
                if not pc.all(is_block).as_py():
                    batch = batch.filter(is_block)
                if batch.num_rows == 0:
                    continue
                if shipped_factor is None:
                    carrier = pc.index(pc.is_valid(batch.column("parts")), True).as_py()
                    if carrier < 0:
                        waiting.append(batch)
                        continue
                    shipped_factor, shipped_gram = read_shipped(batch, carrier, chunks, k)
                    # The carrier's batch first: in the next iteration it leads its partition, so Python
                    # starts on it while the JVM still converts the task's other blocks (ITERATION_CONF).
                    yield update_blocks(batch)
                    for earlier in waiting:
                        yield update_blocks(earlier)
                    waiting.clear()
                    continue
                yield update_blocks(batch)
            if waiting:
                raise RuntimeError("NMF: a task holds row blocks but none of them carried the shipped factor")
            if shipped_factor is None:
                return  # a task without blocks has nothing to add
            rows = []
            for c in range(chunks.count):
                lo, hi = chunks.bounds(c)
                rows.append({"kind": Kind.PARTIAL, "block": c, "n_rows": hi - lo,
                             "cross": cross_sum[lo:hi].tobytes(), "gram": gram_sum.tobytes()})
                if c in held:
                    rows.append({"kind": Kind.SHIPPED, "block": c, "n_rows": hi - lo,
                                 "factor": codec.pack(shipped_factor[lo:hi])})
            yield codec.batch(rows, codec.STATE)

        return joined.mapInArrow(step, codec.spark_schema(codec.STATE))

    def _reduce(self, state: DataFrame, update: Rule) -> DataFrame:
        """Sum the partials and update the shipped factor, one task per chunk; also the objective's trace terms.

        The chunks are gathered back into the one-row SHIPPED layout by a small aggregation.
        """
        chunks, k = self.chunks, self.k

        def reduce(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            cross: dict[int, np.ndarray] = {}
            gram: dict[int, np.ndarray] = {}
            factor: dict[int, np.ndarray] = {}
            for batch in batches:
                kinds = batch.column("kind").to_pylist()
                for i, chunk in enumerate(batch.column("block").to_pylist()):
                    lo, hi = chunks.bounds(chunk)
                    if kinds[i] == Kind.SHIPPED:
                        factor[chunk] = codec.unpack(batch.column("factor")[i].as_buffer(), hi - lo, k)
                    else:
                        cross[chunk] = cross.get(chunk, 0) + codec.dense(batch.column("cross")[i].as_buffer(), hi - lo, k)
                        gram[chunk] = gram.get(chunk, 0) + codec.dense(batch.column("gram")[i].as_buffer(), k, k)
            if set(factor) != set(cross):
                raise RuntimeError(f"NMF reduce got partials for chunks {sorted(cross)} but factors for {sorted(factor)}")
            for chunk, old_factor in factor.items():
                new_factor = codec.stored(update(old_factor, cross[chunk], gram[chunk]))
                own_gram = new_factor.T @ new_factor
                yield codec.batch([{"chunk": chunk, "factor": codec.pack(new_factor), "gram": own_gram.tobytes(),
                                    "tr_cross": float(np.sum(cross[chunk] * new_factor)),
                                    "tr_gram": float(np.sum(gram[chunk] * own_gram))}], codec.CHUNK)

        # Each DataFrame operation here is analysed on the driver every iteration: keep them few.
        reduced = (state.where(F.col("kind") != Kind.BLOCK)
                   .repartition(chunks.count, key_of(F.col("block"), chunks.keys))
                   .mapInArrow(reduce, codec.spark_schema(codec.CHUNK)))
        return reduced.agg(F.sort_array(F.collect_list(F.struct("chunk", "factor", "gram"))).alias("parts"),
                           F.sum("tr_cross").alias("tr_cross"), F.sum("tr_gram").alias("tr_gram"))
