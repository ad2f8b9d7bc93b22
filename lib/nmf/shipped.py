"""The 1D layout's shipped factor: one SHIPPED row of per-chunk blobs, built, read and exploded."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lib.nmf import codec
from lib.nmf.init import STREAM_SHIPPED, InitSpec, initial_block
from lib.nmf.placement import ShippedChunks


def shipped_batch(factor: np.ndarray, chunks: ShippedChunks) -> pa.RecordBatch:
    """A shipped factor (no objective terms yet) as one SHIPPED row of per-chunk blobs and Grams."""
    factor = codec.stored(factor)
    parts = []
    for c in range(chunks.count):
        part = factor[slice(*chunks.bounds(c))]
        parts.append({"chunk": c, "factor": codec.pack(part), "gram": (part.T @ part).tobytes()})
    return codec.batch([{"parts": parts, "tr_cross": 0.0, "tr_gram": 0.0}], codec.SHIPPED)


def read_shipped(batch: pa.RecordBatch, row: int, chunks: ShippedChunks, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole shipped factor and its Gram from the ``parts`` of one row of a batch."""
    parts = batch.column("parts")[row].values
    factor = np.empty((chunks.n_rows, k))
    gram = np.zeros((k, k))
    for chunk, blob, part_gram in zip(parts.field("chunk").to_pylist(), parts.field("factor"), parts.field("gram")):
        lo, hi = chunks.bounds(chunk)
        factor[lo:hi] = codec.unpack(blob.as_buffer(), hi - lo, k)
        gram += codec.dense(part_gram.as_buffer(), k, k)
    return factor, gram


def initial_shipped(spark: SparkSession, spec: InitSpec, chunks: ShippedChunks, initial: DataFrame | None) -> DataFrame:
    """The initial shipped factor in one SHIPPED row, made by one small task (custom: from ``initial``'s rows)."""
    initial_given = initial is not None  # the closure must not capture the DataFrame itself

    def make(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        records = [record for record in batches if record.num_rows]
        frame = None
        if initial_given:
            frame = pa.Table.from_batches(records).to_pandas() if records else codec.empty_parts()
        yield shipped_batch(initial_block(spec, STREAM_SHIPPED, 0, chunks.n_rows, parts=frame), chunks)

    if initial is None:
        source = spark.range(1, numPartitions=1)
    else:
        idx = F.col(initial.columns[0])
        source = codec.parts(initial, codec.Kind.GIVEN, F.lit(0), row=idx, factors=F.col("factors")).repartition(1)
    return source.mapInArrow(make, codec.spark_schema(codec.SHIPPED))


def shipped_rows(shipped: DataFrame, chunks: ShippedChunks, k: int) -> DataFrame:
    """FACTOR_ROWS of the shipped factor, exploded chunk by chunk inside the tasks."""
    start = F.col("chunk") * F.lit(chunks.size)
    return codec.explode_factor(
        shipped.select(F.inline("parts")).select(start.alias("start"), (F.least(start + F.lit(chunks.size),
                                                                               F.lit(chunks.n_rows)) - start)
                                                 .alias("n_rows"), "factor"), k)
