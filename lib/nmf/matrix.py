"""The input matrix: entries summed and rounded to the stored precision, its shape and norms, bad input refused."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F


@dataclass(frozen=True)
class MatrixStats:
    n_rows: int
    n_cols: int
    nnz: int
    total: float
    norm_sq: float

    @property
    def mean(self) -> float:
        """mean(X) over all m x n cells (zeros included), as scikit-learn's inits use it."""
        return self.total / (self.n_rows * self.n_cols)


def matrix_entries(entries: DataFrame, row: str = "row", col: str = "col", value: str = "value") -> DataFrame:
    """(row, col, value) with duplicate (row, col) pairs summed, at float32 precision; zeros dropped."""
    return (
        entries.select(F.col(row).cast("long").alias("row"), F.col(col).cast("long").alias("col"),
                       F.col(value).cast("double").alias("value"))
        .groupBy("row", "col").agg(F.sum("value").alias("value"))
        # Rounded to the stored precision here, so ||X||^2 describes the X the blocks hold.
        .select("row", "col", F.col("value").cast("float").cast("double").alias("value"))
        .where(F.col("value") != 0)
    )


def matrix_stats(entries: DataFrame, n_rows: int | None = None, n_cols: int | None = None) -> MatrixStats:
    """Shape, non-zeros, sum and squared norm of summed entries; bad input raises ValueError."""
    stats = entries.agg(
        F.count(F.lit(1)).alias("nnz"), F.max("row").alias("max_row"), F.max("col").alias("max_col"),
        F.min("row").alias("min_row"), F.min("col").alias("min_col"), F.min("value").alias("min_value"),
        F.sum("value").alias("total"), F.sum(F.col("value") * F.col("value")).alias("norm_sq"),
        F.sum(F.when(F.col("row").isNull() | F.col("col").isNull() | F.col("value").isNull()
                     | F.isnan("value"), 1).otherwise(0)).alias("nulls"),
    ).first()
    if stats["nulls"]:
        raise ValueError(f"NMF input has {stats['nulls']} entries with a null/NaN row, column or value")
    if not stats["nnz"] or not stats["norm_sq"]:
        raise ValueError("NMF input is all zeros (no non-zero entries): nothing to factorize")
    if stats["min_value"] < 0:
        raise ValueError(f"NMF input must be non-negative; smallest value is {stats['min_value']}")
    if stats["min_row"] < 0 or stats["min_col"] < 0:
        raise ValueError("NMF input has negative row or column indices")
    m = int(stats["max_row"]) + 1 if n_rows is None else n_rows
    n = int(stats["max_col"]) + 1 if n_cols is None else n_cols
    if stats["max_row"] >= m or stats["max_col"] >= n:
        raise ValueError(f"NMF input has indices beyond the declared shape {m} x {n}")
    if not math.isfinite(stats["norm_sq"]):
        raise ValueError("NMF input has infinite values")
    return MatrixStats(m, n, int(stats["nnz"]), float(stats["total"]), float(stats["norm_sq"]))
