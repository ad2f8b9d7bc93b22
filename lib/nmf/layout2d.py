"""2D layout (when neither factor is small enough to ship): X in a p x q grid of blocks, W in p row
blocks, H' in q column blocks.

A half-step joins the X blocks with the other factor's blocks on their block id, multiplies inside
the tasks, and sums the products in a shuffle keyed on the own block id, where the own block is
updated; only the per-block k x k Grams and objective terms reach the driver.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.nmf import codec
from lib.nmf.codec import Kind
from lib.nmf.init import STREAM_COL_BLOCKS, STREAM_ROW_BLOCKS, InitSpec, initial_block
from lib.nmf.layout import Lineage
from lib.nmf.matrix import MatrixStats
from lib.nmf.params import NMFParams
from lib.nmf.placement import Chunks, grid_size
from lib.nmf.rules import Rule, hals_sweeps, make_rule

log = logging.getLogger("lib.nmf")
INITS = ("random", "custom")


class Grid:
    """X blocks keyed (bi, bj), W blocks keyed bi, H' blocks keyed bj (all FACTOR_BLOCK rows)."""

    name = "2d"
    iteration_conf: dict[str, str] = {}

    def __init__(self, summed: DataFrame, stats: MatrixStats, params: NMFParams,
                 initial_w: DataFrame | None, initial_h: DataFrame | None) -> None:
        m, n, k = stats.n_rows, stats.n_cols, params.k
        self.summed, self.k = summed, k
        self.x: DataFrame | None = None  # the blocks of X, built by start()
        self.initial_w, self.initial_h = initial_w, initial_h
        self.rows = Chunks.of(m, grid_size(stats.nnz, params.row_blocks, params.block_nnz, m))
        self.cols = Chunks.of(n, grid_size(stats.nnz, params.col_blocks, params.block_nnz, n))
        self.grid = (self.rows.count, self.cols.count)
        self.spec_w = InitSpec.of(params, stats, n, INITS)
        self.spec_h = InitSpec.of(params, stats, m, INITS)
        self.update_w = make_rule(params, "w", hals_sweeps(params, stats.nnz, m, n))
        self.update_h = make_rule(params, "h", hals_sweeps(params, stats.nnz, n, m))
        log.info("NMF layout 2D: %d x %d grid of blocks (<= %d x %d)", *self.grid, self.rows.size, self.cols.size)

    def start(self, lineage: Lineage) -> None:
        rows, cols = self.rows, self.cols

        def build(frame):
            import pandas as pd
            bi, bj = int(frame["bi"].iloc[0]), int(frame["bj"].iloc[0])
            (row_lo, row_hi), (col_lo, col_hi) = rows.bounds(bi), cols.bounds(bj)
            matrix = codec.block_matrix(frame, row_lo, col_lo, row_hi - row_lo, col_hi - col_lo)
            return pd.DataFrame({"bi": [bi], "bj": [bj], "n_rows": [row_hi - row_lo], "n_cols": [col_hi - col_lo],
                                 **codec.csr_columns(matrix)})

        self.x = (self.summed.withColumn("bi", (F.col("row") / rows.size).cast("long"))
                  .withColumn("bj", (F.col("col") / cols.size).cast("long"))
                  .groupBy("bi", "bj").applyInPandas(build, codec.spark_schema(codec.GRID))).persist()
        self.w = Lineage.cut(self._initial(self.initial_w, rows, self.spec_w, STREAM_ROW_BLOCKS))
        self.h = Lineage.cut(self._initial(self.initial_h, cols, self.spec_h, STREAM_COL_BLOCKS))
        self.gram_h, _ = self._gram_and_trace(self.h)

    def step(self, lineage: Lineage) -> tuple[float, float]:
        self.w = lineage.keep(self._half_step(self.h, self.w, "bj", "bi", self.gram_h, self.update_w, False))
        gram_w, _ = self._gram_and_trace(self.w)
        self.h = lineage.keep(self._half_step(self.w, self.h, "bi", "bj", gram_w, self.update_h, True))
        self.gram_h, tr_cross = self._gram_and_trace(self.h)
        return tr_cross, float(np.sum(gram_w * self.gram_h))

    def factors(self) -> tuple[DataFrame, DataFrame]:
        def rows(blocks: DataFrame, chunks: Chunks) -> DataFrame:
            return codec.explode_factor(blocks.withColumn("start", F.col("block") * F.lit(chunks.size)), self.k)
        return (rows(self.w, self.rows).withColumnRenamed("idx", "row_idx"),
                rows(self.h, self.cols).withColumnRenamed("idx", "col_idx"))

    def cached(self) -> list[DataFrame]:
        return [self.x] if self.x is not None else []

    def _initial(self, initial: DataFrame | None, chunks: Chunks, spec: InitSpec, stream: int) -> DataFrame:
        """FACTOR_BLOCK rows of an initial factor, one per block (custom: assembled from ``initial``'s rows)."""

        def make(frame):
            import pandas as pd
            block = int(frame["block"].iloc[0])
            lo, hi = chunks.bounds(block)
            factor = codec.stored(initial_block(spec, stream + block, lo, hi - lo, parts=frame))
            return pd.DataFrame({"block": [block], "n_rows": [hi - lo], "factor": [codec.pack(factor)],
                                 "gram": [(factor.T @ factor).tobytes()], "tr_cross": [0.0]})

        parts = codec.parts(self.summed.sparkSession.range(chunks.count), Kind.MARKER, F.col("id"))
        if initial is not None:
            idx = F.col(initial.columns[0])
            parts = parts.unionByName(codec.parts(initial, Kind.GIVEN, (idx / F.lit(chunks.size)).cast("long"),
                                                  row=idx, factors=F.col("factors")))
        return parts.groupBy("block").applyInPandas(make, codec.spark_schema(codec.FACTOR_BLOCK))

    def _gram_and_trace(self, blocks: DataFrame) -> tuple[np.ndarray, float]:
        """The factor's Gram (sum of the blocks' k x k Grams) and the blocks' summed tr(F' M), in one collect."""
        gram, trace = np.zeros((self.k, self.k)), 0.0
        for row in blocks.select("gram", "tr_cross").collect():
            gram += codec.dense(row["gram"], self.k, self.k)
            trace += row["tr_cross"]
        return gram, trace

    def _half_step(self, other: DataFrame, own: DataFrame, other_key: str, own_key: str,
                   other_gram: np.ndarray, update: Rule, transpose: bool) -> DataFrame:
        """Update the ``own`` factor blocks from the sum over other blocks of X_block (or X_block') times them."""
        k = self.k
        # Never a broadcast join: that would collect the other factor to the driver.
        other_blocks = other.select(F.col("block").alias(other_key), F.col("factor").alias("other_factor"))
        joined = self.x.join(other_blocks.hint("shuffle_hash"), other_key)

        def multiply(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for batch in batches:
                out = []
                for row in batch.to_pylist():
                    matrix = codec.csr(row["indptr"], row["indices"], row["data"], row["n_rows"], row["n_cols"])
                    if transpose:
                        product, rows = matrix.T @ codec.unpack(row["other_factor"], row["n_rows"], k), row["n_cols"]
                    else:
                        product, rows = matrix @ codec.unpack(row["other_factor"], row["n_cols"], k), row["n_rows"]
                    out.append({"block": row[own_key], "n_rows": rows,
                                "product": np.ascontiguousarray(product).tobytes()})
                yield codec.batch(out, codec.PRODUCT)

        products = joined.mapInArrow(multiply, codec.spark_schema(codec.PRODUCT)).select(
            "block", "n_rows", "product", F.lit(None).cast("binary").alias("factor"))
        old = own.select("block", "n_rows", F.lit(None).cast("binary").alias("product"), "factor")

        def combine(frame):
            import pandas as pd
            rows = int(frame["n_rows"].iloc[0])
            cross = np.zeros((rows, k))
            factor = np.zeros((rows, k))
            for product, previous in zip(frame["product"], frame["factor"]):
                if product is not None:
                    cross += codec.dense(product, rows, k)
                if previous is not None:
                    factor = codec.unpack(previous, rows, k)
            factor = codec.stored(update(factor, cross, other_gram))
            return pd.DataFrame({"block": [int(frame["block"].iloc[0])], "n_rows": [rows], "factor": [codec.pack(factor)],
                                 "gram": [(factor.T @ factor).tobytes()], "tr_cross": [float(np.sum(cross * factor))]})

        return products.unionByName(old).groupBy("block").applyInPandas(combine, codec.spark_schema(codec.FACTOR_BLOCK))
