"""How NMF blocks travel inside DataFrame rows: one Arrow schema per record kind, named kinds, and
the byte encodings of matrices.

Every row layout is declared once, as an Arrow schema; the Spark schema handed to ``mapInArrow`` /
``applyInPandas`` is derived from it (``spark_schema``), so the two cannot drift apart. Rows that
share a DataFrame are told apart by a string ``kind`` column holding one of the names in ``Kind``.

Factors and X's values are stored as float32 between steps (MLlib's ALS stores its factors so
too): moving them between the JVM and the Python workers is most of an iteration's cost, and
float32 halves it. Sums (cross products, Grams, sketches) travel as float64.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema
from pyspark.sql.types import StructType

STORED_DTYPE = np.float32
EXPLODE_BATCH_ROWS = 65536


class Kind:
    """Values of the ``kind`` column (a string wherever it appears)."""

    # Parts assembled into blocks (PARTS): an entry of X, a given initial factor row, a block marker.
    ENTRY = "entry"
    GIVEN = "given"
    MARKER = "marker"
    # Rows of the 1D state (STATE): a row block of X with its factor block, a task's partial sums for
    # one chunk of the shipped factor, the current value of one chunk of the shipped factor.
    BLOCK = "block"
    PARTIAL = "partial"
    SHIPPED = "shipped"


_CSR = [("indptr", pa.binary()), ("indices", pa.binary()), ("data", pa.binary())]

# Inputs of a block builder: entries of X, given factor rows and one marker per block, grouped by block.
PARTS = pa.schema([("block", pa.int64()), ("kind", pa.string()), ("row", pa.int64()), ("col", pa.int64()),
                   ("value", pa.float64()), ("factors", pa.list_(pa.float64()))])
# 1D: a row block of X (CSR) with its factor block, or a partial / shipped chunk (cross, gram, factor).
STATE = pa.schema([("kind", pa.string()), ("block", pa.int64()), ("n_rows", pa.int64()), *_CSR,
                   ("factor", pa.binary()), ("cross", pa.binary()), ("gram", pa.binary())])
# 1D: the whole shipped factor in one row, per chunk its stored rows and Gram, plus the objective terms.
SHIPPED_PART = pa.struct([("chunk", pa.int64()), ("factor", pa.binary()), ("gram", pa.binary())])
SHIPPED = pa.schema([("parts", pa.list_(SHIPPED_PART)), ("tr_cross", pa.float64()), ("tr_gram", pa.float64())])
# 1D: one updated chunk of the shipped factor, as the reduce emits it.
CHUNK = pa.schema([("chunk", pa.int64()), ("factor", pa.binary()), ("gram", pa.binary()),
                   ("tr_cross", pa.float64()), ("tr_gram", pa.float64())])
# 2D: one block (bi, bj) of X.
GRID = pa.schema([("bi", pa.int64()), ("bj", pa.int64()), ("n_rows", pa.int64()), ("n_cols", pa.int64()), *_CSR])
# 2D: one factor block with its Gram and its share of tr(F' M).
FACTOR_BLOCK = pa.schema([("block", pa.int64()), ("n_rows", pa.int64()), ("factor", pa.binary()),
                          ("gram", pa.binary()), ("tr_cross", pa.float64())])
# 2D: X_ij (or X_ij') times a block of the other factor, for factor block ``block``.
PRODUCT = pa.schema([("block", pa.int64()), ("n_rows", pa.int64()), ("product", pa.binary())])
# A small float64 sum computed per task (sketch Grams, projections, norms).
PARTIAL = pa.schema([("partial", pa.binary())])
# The sketch's SVD: P (shipped rows x rank), singular values, Z (r x rank), norms of P's signed parts.
SVD = pa.schema([("p", pa.binary()), ("values", pa.binary()), ("z", pa.binary()), ("p_norms", pa.binary())])
# A factor as rows: index and its k values (what factorize returns, renamed to row_idx / col_idx).
FACTOR_ROWS = pa.schema([("idx", pa.int64()), ("factors", pa.list_(pa.float64()))])


def spark_schema(schema: pa.Schema) -> StructType:
    """The Spark schema of an Arrow row layout."""
    return from_arrow_schema(schema)


def parts(frame: DataFrame, kind: str, block: Column, **columns: Column) -> DataFrame:
    """``frame`` as PARTS rows of ``kind``: the given columns cast to their PARTS types, the rest null."""
    given = {"block": block, "kind": F.lit(kind), **columns}
    return frame.select(*[(given[f.name] if f.name in given else F.lit(None))
                          .cast(spark_schema(PARTS)[f.name].dataType).alias(f.name) for f in PARTS])


# ---- byte encodings ------------------------------------------------------------------------------

def stored(values: np.ndarray) -> np.ndarray:
    """Values rounded to the stored precision, back in float64 for arithmetic.

    Grams, products and objective terms are computed from the rounded factor, so the objective
    describes exactly the factor that is stored.
    """
    return np.asarray(values, dtype=STORED_DTYPE).astype(np.float64)


def pack(values: np.ndarray) -> bytes:
    """A factor's bytes at the stored precision."""
    return np.ascontiguousarray(values, dtype=STORED_DTYPE).tobytes()


def unpack(blob, rows: int, k: int) -> np.ndarray:
    """A stored factor back as float64."""
    return np.frombuffer(blob, dtype=STORED_DTYPE).reshape(rows, k).astype(np.float64)


def dense(blob, rows: int, cols: int) -> np.ndarray:
    """A float64 matrix (sums: cross products, Grams, sketches) from its bytes."""
    return np.frombuffer(blob, dtype=np.float64).reshape(rows, cols)


def csr(indptr, indices, data, rows: int, cols: int) -> sp.csr_matrix:
    """A block of X from its three CSR blobs (read without copying)."""
    return sp.csr_matrix(
        (np.frombuffer(data, dtype=STORED_DTYPE), np.frombuffer(indices, dtype=np.int32),
         np.frombuffer(indptr, dtype=np.int64)),
        shape=(rows, cols),
    )


def csr_columns(matrix: sp.csr_matrix) -> dict[str, list[bytes]]:
    """The CSR arrays of one block as the indptr / indices / data columns of a one-row frame."""
    return {"indptr": [matrix.indptr.astype(np.int64).tobytes()],
            "indices": [matrix.indices.astype(np.int32).tobytes()],
            "data": [pack(matrix.data)]}


def block_matrix(frame, start_row: int, start_col: int, rows: int, cols: int) -> sp.csr_matrix:
    """The CSR block of the ENTRY rows (row, col, value) of a pandas frame, offset by the block's corner."""
    cells = frame.sort_values(["row", "col"])
    return sp.csr_matrix((cells["value"].to_numpy(STORED_DTYPE),
                          (cells["row"].to_numpy(np.int64) - start_row, cells["col"].to_numpy(np.int64) - start_col)),
                         shape=(rows, cols))


def batch(rows: list[dict], schema: pa.Schema) -> pa.RecordBatch:
    """Rows (dicts; missing columns null) as a record batch of ``schema``."""
    return pa.RecordBatch.from_pylist(rows, schema=schema)


def sum_rows(df: DataFrame, column: str, shape: tuple[int, ...]) -> np.ndarray:
    """Collect small float64 blobs (one per task or block, k x k-sized) and sum them on the driver."""
    total = np.zeros(shape)
    for row in df.select(column).collect():
        total += np.frombuffer(row[column], dtype=np.float64).reshape(shape)
    return total


# ---- factors back as rows ------------------------------------------------------------------------

def factor_batch(start: int, factor: np.ndarray) -> pa.RecordBatch:
    """FACTOR_ROWS for rows start, start + 1, ... of a factor."""
    rows, k = factor.shape
    values = pa.array(np.ascontiguousarray(factor, dtype=np.float64).ravel())
    offsets = pa.array(np.arange(0, (rows + 1) * k, k, dtype=np.int32))
    return pa.RecordBatch.from_arrays([pa.array(np.arange(start, start + rows, dtype=np.int64)),
                                       pa.ListArray.from_arrays(offsets, values)], schema=FACTOR_ROWS)


def explode_factor(blocks: DataFrame, k: int) -> DataFrame:
    """FACTOR_ROWS from rows (start, n_rows, factor) of stored factor blocks, exploded inside the tasks."""
    def explode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for record in batches:
            for row in record.to_pylist():
                factor = unpack(row["factor"], row["n_rows"], k)
                for lo in range(0, row["n_rows"], EXPLODE_BATCH_ROWS):
                    yield factor_batch(row["start"] + lo, factor[lo:lo + EXPLODE_BATCH_ROWS])

    return blocks.select("start", "n_rows", "factor").mapInArrow(explode, spark_schema(FACTOR_ROWS))


def empty_parts():
    """A pandas frame of PARTS columns and no rows."""
    return PARTS.empty_table().to_pandas()


def assemble_given(frame, start: int, rows: int, k: int) -> np.ndarray:
    """A factor block from the GIVEN rows (row, factors) of a pandas frame; rows not given are zero."""
    factor = np.zeros((rows, k))
    given = frame[frame["kind"] == Kind.GIVEN]
    if len(given):
        factor[given["row"].to_numpy(np.int64) - start] = np.stack(given["factors"].to_numpy())
    return factor
