"""Blockwise non-negative matrix factorization X ~ W H on Spark DataFrames.

X (m x n, sparse, non-negative) arrives as (row, col, value) entries. Both factors are kept as
"rows x k" matrices: W (m x k) and Ht = H' (n x k), so one update rule serves both half-steps:
a factor F is updated from M = X F_other (its "cross" product) and G = F_other' F_other (a k x k Gram).

Two layouts, chosen by the size of the smaller factor (``broadcast_limit_bytes``):

- 1D (the fast path): X is cut into p row blocks, each stored in one DataFrame row next to its
  factor block, spread evenly over one partition per task slot, so the kept factor's half-step is
  a map. The other ("shipped") factor (k x min(m, n)) travels to the tasks in one row through a
  broadcast join hint, attached to one block per task. Each map task also emits the partial
  product X_i' W_i and Gram W_i' W_i summed over its blocks, cut into chunks of shipped rows; the
  shipped half-step is row-separable, so one reduce task per chunk sums its partials and updates
  it. Per iteration: one pass over X and a shuffle of tasks x n x k doubles.
- 2D (when neither factor is small): X is cut into a p x q grid; W lives in p row blocks, H in q
  column blocks. A half-step joins X blocks with factor blocks on the block id, multiplies, and sums
  the products in a shuffle keyed on the other block id; only the k x k Grams reach the driver.

Solvers: multiplicative updates (Lee & Seung, in scikit-learn's exact form for beta = 2) and HALS
(Cichocki; accelerated as in Gillis & Glineur 2012: several inner passes reuse one distributed
product). The objective ||X - W H||_F / ||X||_F comes from ||X||^2 - 2 tr(W' X H') + tr(W'W H H')
without forming W H. Only k x k matrices and scalars ever reach the Python driver.

Factors and X's values are stored as float32 between steps (arithmetic is float64): moving blocks
between the JVM and the Python workers is most of an iteration's time, and Python tasks carry a
fixed start-up cost, so an iteration runs exactly two Python stages of one wave each.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

log = logging.getLogger("lib.nmf")

# scikit-learn's guard against a zero denominator in the multiplicative update (_nmf.EPSILON).
MU_EPSILON = float(np.finfo(np.float32).eps)
SOLVERS = ("hals", "mu")
INITS = ("sketch_svd", "random_columns", "random", "custom")
SKETCH_OVERSAMPLING = 10
STORED_DTYPE = np.float32

_BLOCK_SCHEMA = (
    "kind string, block long, n_rows long, indptr binary, indices binary, data binary, "
    "factor binary, cross binary, gram binary"
)
_SHIPPED_SCHEMA = ("parts array<struct<chunk long, factor binary, gram binary>>, tr_cross double, "
                   "tr_gram double")


@dataclass(frozen=True)
class NMFParams:
    """Settings of one factorization."""

    k: int
    solver: str = "hals"
    max_iter: int = 100
    tol: float = 1e-4
    init: str = "sketch_svd"
    seed: int = 0
    l1_w: float = 0.0
    l2_w: float = 0.0
    l1_h: float = 0.0
    l2_h: float = 0.0
    inner_passes: int = 5            # most HALS sweeps per distributed product (see hals_sweeps())
    inner_tol: float = 0.1           # stop inner passes once a pass changes < inner_tol x the first
    row_blocks: int = 0              # 0: from the number of non-zeros
    col_blocks: int = 0              # 2D layout only; 0: from the number of non-zeros
    block_nnz: int = 1_000_000       # target non-zeros per block when the grid is automatic
    broadcast_limit_bytes: int = 64 * 1024 * 1024   # largest factor shipped to every task (1D)
    checkpoint_interval: int = 1     # cut the lineage every this many iterations (1: plans stay flat)
    parallelism: int = 0             # tasks per distributed step; 0: as many as Spark runs at once

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"NMF rank k must be >= 1, got {self.k}")
        if self.solver not in SOLVERS:
            raise ValueError(f"NMF solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.init not in INITS:
            raise ValueError(f"NMF init must be one of {INITS}, got {self.init!r}")
        if self.max_iter < 1:
            raise ValueError(f"NMF max_iter must be >= 1, got {self.max_iter}")
        if min(self.l1_w, self.l2_w, self.l1_h, self.l2_h) < 0:
            raise ValueError("NMF penalties l1_w, l2_w, l1_h, l2_h must be >= 0")
        if self.inner_passes < 1 or self.checkpoint_interval < 1:
            raise ValueError("NMF inner_passes and checkpoint_interval must be >= 1")
        if self.tol < 0 or self.block_nnz < 1 or min(self.row_blocks, self.col_blocks, self.parallelism) < 0:
            raise ValueError("NMF tol, block_nnz, row_blocks, col_blocks and parallelism must be non-negative")


@dataclass
class NMFResult:
    """Factors as DataFrames (``row_idx``/``col_idx``, ``factors`` array<double> of length k) and the history."""

    w: DataFrame
    h: DataFrame
    history: list[tuple[int, float, float]]  # (iteration, relative error, seconds for it)
    layout: str
    grid: tuple[int, int]
    x_norm_sq: float
    _cached: list[DataFrame] = field(default_factory=list, repr=False)

    @property
    def rel_error(self) -> float:
        return self.history[-1][1]

    @property
    def iterations(self) -> int:
        return self.history[-1][0]

    def release(self) -> None:
        """Drop the cached blocks once the factors are written."""
        for df in self._cached:
            df.unpersist()
        self._cached.clear()


# ----------------------------------------------------------------------------------------------
# Update rules on one "rows x k" factor block: F from M = X F_other and G = F_other' F_other.
# ----------------------------------------------------------------------------------------------

def mu_update(factor: np.ndarray, cross: np.ndarray, gram: np.ndarray, l1: float, l2: float) -> np.ndarray:
    """One multiplicative update, as scikit-learn does it for the Frobenius loss."""
    denominator = factor @ gram
    if l1 > 0:
        denominator += l1
    if l2 > 0:
        denominator = denominator + l2 * factor
    denominator[denominator == 0] = MU_EPSILON
    return factor * (cross / denominator)


def hals_update(
    factor: np.ndarray, cross: np.ndarray, gram: np.ndarray, l1: float, l2: float,
    passes: int, inner_tol: float,
) -> np.ndarray:
    """Up to ``passes`` cyclic HALS sweeps over the k columns, reusing ``cross`` and ``gram``.

    Extra sweeps cost rows x k^2 each against nnz x k for the product, so they are nearly free;
    they stop once a sweep moves the factor less than ``inner_tol`` times the first sweep did.
    """
    factor = np.array(factor, dtype=np.float64, order="F", copy=True)
    gram = gram + l2 * np.eye(gram.shape[0]) if l2 else gram
    cross = cross - l1 if l1 else cross
    first_change = 0.0
    for sweep in range(passes):
        change = 0.0
        for col in range(factor.shape[1]):
            hess = gram[col, col]
            if hess <= 0:
                continue
            step = (cross[:, col] - factor @ gram[:, col]) / hess
            updated = np.maximum(factor[:, col] + step, 0.0)
            change += float(np.sum((updated - factor[:, col]) ** 2))
            factor[:, col] = updated
        if sweep == 0:
            first_change = change
        elif change <= inner_tol * inner_tol * first_change:
            break
    return np.ascontiguousarray(factor)


def hals_sweeps(params: NMFParams, nnz: int, own_rows: int, other_rows: int) -> int:
    """HALS sweeps per distributed product for one factor: Gillis & Glineur's (2012) 1 + alpha * rho.

    rho = 1 + (nnz + other_rows * k) / (own_rows * k + own_rows) compares the cost of the product
    X F_other and Gram F_other' F_other with one sweep over the factor; alpha = 0.5 as they
    recommend, capped at ``params.inner_passes``. For a sparse X with many more users than items,
    this gives the user factor one sweep (a sweep costs more than the product) and the item factor
    several.
    """
    k = params.k
    rho = 1.0 + (nnz + other_rows * k) / (own_rows * k + own_rows)
    return max(1, min(params.inner_passes, int(1 + 0.5 * rho)))


def make_rule(params: NMFParams, side: str, passes: int | None = None) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """The update of the W side ("w") or the H side ("h") with that side's penalties.

    ``passes``: HALS sweeps per product (default ``params.inner_passes``); ignored by MU.
    """
    l1, l2 = (params.l1_w, params.l2_w) if side == "w" else (params.l1_h, params.l2_h)
    if params.solver == "mu":
        return lambda factor, cross, gram: mu_update(factor, cross, gram, l1, l2)
    passes = passes or params.inner_passes
    inner_tol = params.inner_tol
    return lambda factor, cross, gram: hals_update(factor, cross, gram, l1, l2, passes, inner_tol)


# ----------------------------------------------------------------------------------------------
# Encoding of blocks inside DataFrame rows
# ----------------------------------------------------------------------------------------------

def _dense(blob: bytes, rows: int, k: int) -> np.ndarray:
    """A float64 matrix (sums: cross products, Grams, sketches) from its bytes."""
    return np.frombuffer(blob, dtype=np.float64).reshape(rows, k)


def _stored(values: np.ndarray) -> np.ndarray:
    """Values rounded to the stored precision, back in float64 for arithmetic.

    Factors and X's values are stored as float32 between steps (MLlib's ALS stores its factors
    so too): moving them between the JVM and the Python workers is most of an iteration's cost,
    and float32 halves it. Grams, products and objective terms are float64 and are computed from
    the rounded factor, so the objective describes exactly the factor that is stored.
    """
    return np.asarray(values, dtype=STORED_DTYPE).astype(np.float64)


def _pack(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype=STORED_DTYPE).tobytes()


def _unpack(blob: bytes, rows: int, k: int) -> np.ndarray:
    return np.frombuffer(blob, dtype=STORED_DTYPE).reshape(rows, k).astype(np.float64)


def _csr(indptr: bytes, indices: bytes, data: bytes, rows: int, cols: int) -> sp.csr_matrix:
    return sp.csr_matrix(
        (np.frombuffer(data, dtype=STORED_DTYPE), np.frombuffer(indices, dtype=np.int32),
         np.frombuffer(indptr, dtype=np.int64)),
        shape=(rows, cols),
    )


def _csr_columns(matrix: sp.csr_matrix) -> dict[str, list[bytes]]:
    """The CSR arrays of one block as the indptr / indices / data columns of a block row."""
    return {"indptr": [matrix.indptr.astype(np.int64).tobytes()],
            "indices": [matrix.indices.astype(np.int32).tobytes()],
            "data": [_pack(matrix.data)]}


_BLOCK_ARROW_SCHEMA = pa.schema([
    ("kind", pa.string()), ("block", pa.int64()), ("n_rows", pa.int64()), ("indptr", pa.binary()),
    ("indices", pa.binary()), ("data", pa.binary()), ("factor", pa.binary()), ("cross", pa.binary()),
    ("gram", pa.binary()),
])


def _block_batch(rows: list[dict]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=_BLOCK_ARROW_SCHEMA)


def _random_factor(seed: int, stream: int, rows: int, k: int, scale: float) -> np.ndarray:
    """scikit-learn's 'random' init shape: |N(0, 1)| * sqrt(mean(X) / k), seeded per block."""
    rng = np.random.default_rng([seed, stream])
    return np.abs(rng.standard_normal((rows, k))) * scale


def _column_groups(seed: int, n_cols: int, k: int) -> list[np.ndarray]:
    """Random disjoint column sets, one per component (random-Acol init, Langville et al. 2006)."""
    per_group = max(1, min(n_cols // k, 50))
    order = np.random.default_rng([seed, 2]).permutation(n_cols)
    return [order[(l * per_group) % n_cols: (l * per_group) % n_cols + per_group] for l in range(k)]


# ----------------------------------------------------------------------------------------------
# Input checks and the grid
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MatrixStats:
    n_rows: int
    n_cols: int
    nnz: int
    total: float
    norm_sq: float


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


def _grid_size(nnz: int, requested: int, block_nnz: int, extent: int) -> int:
    size = requested or max(2, math.ceil(nnz / block_nnz))  # at least two tasks share the work
    return max(1, min(size, extent))


def task_slots(spark) -> int:
    """How many tasks the cluster runs at once: the partition count Spark gives a plain range.

    Read through a query rather than ``SparkContext.defaultParallelism`` so that it also works
    under Spark Connect, where there is no SparkContext.
    """
    parts = spark.range(0, 1 << 20).select(F.spark_partition_id().alias("part"))
    return int(parts.agg(F.max("part")).first()[0]) + 1


def partition_keys(spark, count: int) -> list[int]:
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


def _key_of(index: F.Column, keys: list[int]) -> F.Column:
    """The partition key of chunk or task ``index`` (0-based)."""
    return F.element_at(F.array(*[F.lit(key) for key in keys]), (index + 1).cast("int"))


@dataclass(frozen=True)
class ShippedChunks:
    """The shipped factor's rows cut into ``count`` contiguous chunks, each updated by its own task.

    The shipped half-step is row-separable: rows r of the shipped factor need only rows r of the
    summed cross product and the k x k Gram. So the reduce runs in parallel, one chunk per task.
    """

    n_rows: int
    count: int
    keys: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.ceil(self.n_rows / self.count)

    def bounds(self, chunk: int) -> tuple[int, int]:
        return chunk * self.size, min((chunk + 1) * self.size, self.n_rows)

    @staticmethod
    def plan(spark, n_rows: int, tasks: int) -> "ShippedChunks":
        size = math.ceil(n_rows / max(1, min(tasks, n_rows)))
        count = math.ceil(n_rows / size)
        return ShippedChunks(n_rows, count, tuple(partition_keys(spark, count)))


# ----------------------------------------------------------------------------------------------
# The driver loop
# ----------------------------------------------------------------------------------------------

def factorize(
    entries: DataFrame,
    params: NMFParams,
    n_rows: int | None = None,
    n_cols: int | None = None,
    initial_w: DataFrame | None = None,
    initial_h: DataFrame | None = None,
) -> NMFResult:
    """Factorize the matrix of ``entries`` (row, col, value) into W (n_rows x k) and H (k x n_cols).

    Duplicate (row, col) entries are summed. ``initial_w`` (row_idx, factors) and ``initial_h``
    (col_idx, factors) are required with ``init='custom'``. The result's factor DataFrames are
    cached; call ``release()`` after writing them.
    """
    if (initial_w is None) != (initial_h is None) or (params.init == "custom") != (initial_w is not None):
        raise ValueError("init='custom' needs both initial_w and initial_h (and only it takes them)")
    summed = matrix_entries(entries).persist()
    try:
        stats = matrix_stats(summed, n_rows, n_cols)
        m, n, k = stats.n_rows, stats.n_cols, params.k
        smaller = min(m, n) * k * 8
        log.info("NMF: %d x %d, nnz=%d, k=%d, solver=%s, init=%s", m, n, stats.nnz, k, params.solver, params.init)
        if smaller <= params.broadcast_limit_bytes:
            result = _factorize_1d(summed, stats, params, initial_w, initial_h, transposed=n > m)
        else:
            result = _factorize_2d(summed, stats, params, initial_w, initial_h)
    except BaseException:
        summed.unpersist()
        raise
    # Unpersisting the input now would make Spark drop the caches built on it (the last iterates).
    result._cached.append(summed)
    return result


def _rel_error(norm_sq: float, tr_cross: float, tr_gram: float) -> float:
    return math.sqrt(max(norm_sq - 2.0 * tr_cross + tr_gram, 0.0) / norm_sq)


def _converged(history: list[tuple[int, float, float]], tol: float) -> bool:
    if tol <= 0 or len(history) < 2:
        return False
    previous, current = history[-2][1], history[-1][1]
    return previous > 0 and (previous - current) / previous < tol


# ----------------------------------------------------------------------------------------------
# 1D layout: X row blocks travel with their factor block; the other factor is broadcast.
# ----------------------------------------------------------------------------------------------

def _factorize_1d(
    summed: DataFrame, stats: MatrixStats, params: NMFParams,
    initial_w: DataFrame | None, initial_h: DataFrame | None, transposed: bool,
) -> NMFResult:
    """Kept side = the larger dimension (rows of X, or of X' when ``transposed``)."""
    k = params.k
    if transposed:
        summed = summed.select(F.col("col").alias("row"), F.col("row").alias("col"), "value")
        kept_n, shipped_n = stats.n_cols, stats.n_rows
        initial_kept, initial_shipped = initial_h, initial_w
        kept_side, shipped_side = "h", "w"
    else:
        kept_n, shipped_n = stats.n_rows, stats.n_cols
        initial_kept, initial_shipped = initial_w, initial_h
        kept_side, shipped_side = "w", "h"
    spark = summed.sparkSession
    tasks = params.parallelism or task_slots(spark)
    p = _grid_size(stats.nnz, params.row_blocks, params.block_nnz, kept_n)
    if not params.row_blocks:
        p = min(tasks * math.ceil(p / tasks), kept_n)  # every task gets the same number of blocks
    rows_per_block = math.ceil(kept_n / p)
    p = math.ceil(kept_n / rows_per_block)
    tasks = min(tasks, p)
    scale = math.sqrt(stats.total / (stats.n_rows * stats.n_cols) / k)
    chunks = ShippedChunks.plan(spark, shipped_n, tasks)
    log.info("NMF layout 1D%s: %d row blocks of <= %d rows in %d tasks; shipped factor %d x %d in %d chunks",
             " (transposed)" if transposed else "", p, rows_per_block, tasks, shipped_n, k, chunks.count)

    blocks = _build_row_blocks(spark, summed, initial_kept, params, kept_n, shipped_n, p, rows_per_block, scale,
                               partition_keys(spark, tasks))
    blocks = blocks.persist()
    shipped = _initial_shipped(spark, initial_shipped, params, chunks, scale)

    kept_passes = hals_sweeps(params, stats.nnz, kept_n, shipped_n)
    shipped_passes = hals_sweeps(params, stats.nnz, shipped_n, kept_n)
    update_kept = make_rule(params, kept_side, kept_passes)
    update_shipped = make_rule(params, shipped_side, shipped_passes)
    if params.solver == "hals":
        log.info("NMF HALS sweeps per product: %d on %s, %d on %s", kept_passes, kept_side.upper(),
                 shipped_passes, shipped_side.upper())
    # The shipped factor depends on the kept blocks and on its previous value, so an uncut plan
    # doubles every iteration: the one-row shipped factor is checkpointed every iteration (cheap),
    # the blocks are persisted and checkpointed every checkpoint_interval iterations. Unpersisting
    # a DataFrame makes Spark drop the caches built on it, so old iterates are released only after a cut.
    pending: list[DataFrame] = [blocks]
    shipped = shipped.localCheckpoint(eager=True)
    if params.init == "sketch_svd":
        blocks, shipped = _sketch_svd_init(blocks, chunks, k, params.seed,
                                           stats.total / (stats.n_rows * stats.n_cols))
        pending.append(blocks)
    if params.init == "random_columns":
        # The column-average init fixes the kept factor; fit the shipped one to it before iterating.
        init_rule = make_rule(NMFParams(k=k, inner_passes=10, l1_w=params.l1_w, l2_w=params.l2_w,
                                        l1_h=params.l1_h, l2_h=params.l2_h), shipped_side)
        partials = _map_kept(blocks, shipped, chunks, k, tasks, None).persist()
        shipped = _reduce_shipped(partials, chunks, k, init_rule).localCheckpoint(eager=True)
        pending.append(partials)

    history: list[tuple[int, float, float]] = []
    state = blocks
    for iteration in range(1, params.max_iter + 1):
        started = time.perf_counter()
        cut = iteration % params.checkpoint_interval == 0
        new_state = _map_kept(state, shipped, chunks, k, tasks, update_kept)
        new_state = new_state.localCheckpoint(eager=True) if cut else new_state.persist()
        mapped = time.perf_counter()
        shipped = _reduce_shipped(new_state, chunks, k, update_shipped).localCheckpoint(eager=True)
        reduced = time.perf_counter()
        terms = shipped.select("tr_cross", "tr_gram").first()
        log.debug("NMF iteration %d: kept side %.3f s, shipped side %.3f s, objective %.3f s", iteration,
                  mapped - started, reduced - mapped, time.perf_counter() - reduced)
        state = new_state
        if cut:
            for old in pending:
                old.unpersist()
            pending = []
        else:
            pending.append(state)
        seconds = time.perf_counter() - started
        history.append((iteration, _rel_error(stats.norm_sq, terms["tr_cross"], terms["tr_gram"]), seconds))
        log.info("NMF iteration %d: relative error %.6f (%.2f s)", iteration, history[-1][1], seconds)
        if _converged(history, params.tol):
            break

    kept_rows = _kept_rows(state, k, rows_per_block)
    shipped_rows = _shipped_rows(shipped, chunks, k)
    w, h = (shipped_rows, kept_rows) if transposed else (kept_rows, shipped_rows)
    w = w.withColumnRenamed("idx", "row_idx")
    h = h.withColumnRenamed("idx", "col_idx")
    return NMFResult(w=w, h=h, history=history, layout="1d-transposed" if transposed else "1d", grid=(p, 1),
                     x_norm_sq=stats.norm_sq, _cached=pending + [state])


def _build_row_blocks(
    spark, summed: DataFrame, initial: DataFrame | None, params: NMFParams,
    kept_n: int, shipped_n: int, p: int, rows_per_block: int, scale: float, task_keys: list[int],
) -> DataFrame:
    """One DataFrame row per row block (CSR of X_i and the initial factor block); block i in task i mod tasks."""
    k, seed, init = params.k, params.seed, params.init
    block_of = (F.col("row") / F.lit(rows_per_block)).cast("long")
    entries = summed.select(block_of.alias("block"), F.lit(0).alias("kind"), "row", "col", "value",
                            F.lit(None).cast("array<double>").alias("factors"))
    markers = spark.range(p).select(F.col("id").alias("block"), F.lit(2).alias("kind"), F.lit(None).cast("long").alias("row"),
                                    F.lit(None).cast("long").alias("col"), F.lit(None).cast("double").alias("value"),
                                    F.lit(None).cast("array<double>").alias("factors"))
    parts = entries.unionByName(markers)
    if initial is not None:
        parts = parts.unionByName(initial.select(
            (F.col(initial.columns[0]) / F.lit(rows_per_block)).cast("long").alias("block"), F.lit(1).alias("kind"),
            F.col(initial.columns[0]).cast("long").alias("row"), F.lit(None).cast("long").alias("col"),
            F.lit(None).cast("double").alias("value"), F.col("factors").cast("array<double>")))
    groups = _column_groups(seed, shipped_n, k) if init == "random_columns" else None

    def build(frame):
        import pandas as pd
        block = int(frame["block"].iloc[0])
        start = block * rows_per_block
        n_block = min(rows_per_block, kept_n - start)
        cells = frame[frame["kind"] == 0].sort_values(["row", "col"])
        local = cells["row"].to_numpy(np.int64) - start
        matrix = sp.csr_matrix((cells["value"].to_numpy(STORED_DTYPE), (local, cells["col"].to_numpy(np.int64))),
                               shape=(n_block, shipped_n))
        if init == "custom":
            given = frame[frame["kind"] == 1]
            factor = np.zeros((n_block, k))
            if len(given):
                factor[given["row"].to_numpy(np.int64) - start] = np.stack(given["factors"].to_numpy())
        elif init == "random":
            factor = _random_factor(seed, 10 + block, n_block, k, scale)
        elif init == "sketch_svd":
            factor = np.zeros((n_block, k))  # filled from the sketch once all blocks exist
        else:
            csc = matrix.tocsc()
            factor = np.column_stack([np.asarray(csc[:, group].mean(axis=1)).ravel() for group in groups])
        return pd.DataFrame({"kind": ["block"], "block": [block], "n_rows": [n_block], **_csr_columns(matrix),
                             "factor": [_pack(factor)], "cross": [None], "gram": [None]})

    tasks = len(task_keys)
    built = parts.groupBy("block").applyInPandas(build, _BLOCK_SCHEMA)
    return built.repartition(tasks, _key_of(F.col("block") % tasks, task_keys))


def _sum_partials(df: DataFrame, column: str, shape: tuple[int, ...]) -> np.ndarray:
    """Sum small per-task partials (k x k-sized) on the driver."""
    total = np.zeros(shape)
    for row in df.select(column).collect():
        total += np.frombuffer(row[column], dtype=np.float64).reshape(shape)
    return total


def _sketch_svd_init(
    blocks: DataFrame, chunks: ShippedChunks, k: int, seed: int, mean: float,
) -> tuple[DataFrame, DataFrame]:
    """NNDSVDa (Boutsidis & Gallopoulos 2008) from a randomized range sketch of X (Halko et al. 2011).

    Y = X Omega (Omega: shipped_n x r Gaussian, regenerated from the seed in each task), Q = Y L'^-1
    with L L' = Y'Y (r x r, on the driver), B = X' Q summed in one task and its thin SVD there:
    X ~ (Q Z) S P'. The kept factor comes from U = Q Z block by block, the shipped one from P;
    zeros are filled with mean(X) as scikit-learn's 'nndsvda' does. Only r x r matrices and
    per-component norms reach the driver.
    """
    shipped_n = chunks.n_rows
    blocks_only = blocks.where(F.col("kind") == "block")
    kept_rows = blocks_only.agg(F.sum("n_rows")).first()[0]
    r = max(1, min(k + SKETCH_OVERSAMPLING, shipped_n, kept_rows))
    rank = min(k, r)

    def sketch(indptr, indices, data, n_rows) -> np.ndarray:
        omega = np.random.default_rng([seed, 3]).standard_normal((shipped_n, r))
        return np.asarray(_csr(indptr, indices, data, n_rows, shipped_n) @ omega)

    def blockwise(fn, schema: str):
        def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            total = None
            for batch in batches:
                for i in range(batch.num_rows):
                    args = [batch.column(c)[i].as_buffer() for c in ("indptr", "indices", "data")]
                    part = fn(*args, int(batch.column("n_rows")[i].as_py()))
                    total = part if total is None else total + part
            if total is not None:
                yield pa.RecordBatch.from_pydict({"partial": [np.ascontiguousarray(total).tobytes()]},
                                                 schema=pa.schema([("partial", pa.binary())]))
        return blocks_only.mapInArrow(run, schema)

    gram = _sum_partials(blockwise(lambda *a: (lambda y: y.T @ y)(sketch(*a)), "partial binary"), "partial", (r, r))
    lower = np.linalg.cholesky(gram + 1e-10 * max(np.trace(gram), 1e-300) * np.eye(r))
    to_q = np.linalg.inv(lower).T  # Q = Y to_q has orthonormal columns

    def project(indptr, indices, data, n_rows) -> np.ndarray:
        matrix = _csr(indptr, indices, data, n_rows, shipped_n)
        return np.asarray(matrix.T @ (np.asarray(matrix @ np.random.default_rng([seed, 3]).standard_normal(
            (shipped_n, r))) @ to_q))

    def svd(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        projected = np.zeros((shipped_n, r))
        for batch in batches:
            for blob in batch.column("partial"):
                projected += _dense(blob.as_buffer(), shipped_n, r)
        left, values, right_t = np.linalg.svd(projected, full_matrices=False)  # X' Q = P S Z'
        p_top = left[:, :rank]
        norms = np.concatenate([np.linalg.norm(np.maximum(p_top, 0), axis=0),
                                np.linalg.norm(np.maximum(-p_top, 0), axis=0)])
        yield pa.RecordBatch.from_pydict(
            {"p": [np.ascontiguousarray(p_top).tobytes()], "values": [values[:rank].tobytes()],
             "z": [np.ascontiguousarray(right_t.T[:, :rank]).tobytes()], "p_norms": [norms.tobytes()]},
            schema=pa.schema([("p", pa.binary()), ("values", pa.binary()), ("z", pa.binary()),
                              ("p_norms", pa.binary())]))

    decomposed = (blockwise(project, "partial binary").repartition(1)
                  .mapInArrow(svd, "p binary, values binary, z binary, p_norms binary").localCheckpoint(eager=True))
    small = decomposed.select("values", "z", "p_norms").first()
    values = np.frombuffer(small["values"], dtype=np.float64)
    z = np.frombuffer(small["z"], dtype=np.float64).reshape(r, rank)
    p_norms = np.frombuffer(small["p_norms"], dtype=np.float64).reshape(2, rank)
    to_u = to_q @ z

    def u_block(indptr, indices, data, n_rows) -> np.ndarray:
        u = sketch(indptr, indices, data, n_rows) @ to_u
        return np.stack([np.sum(np.maximum(u, 0) ** 2, axis=0), np.sum(np.maximum(-u, 0) ** 2, axis=0)])

    u_norms = np.sqrt(_sum_partials(blockwise(u_block, "partial binary"), "partial", (2, rank)))
    # Per component keep the sign whose positive part carries more of the singular pair.
    positive = u_norms[0] * p_norms[0] >= u_norms[1] * p_norms[1]
    chosen_u = np.where(positive, u_norms[0], u_norms[1])
    chosen_p = np.where(positive, p_norms[0], p_norms[1])
    weight = np.sqrt(values * chosen_u * chosen_p)
    u_scale = np.divide(weight, chosen_u, out=np.zeros(rank), where=chosen_u > 0)
    p_scale = np.divide(weight, chosen_p, out=np.zeros(rank), where=chosen_p > 0)
    signs = np.where(positive, 1.0, -1.0)

    def nonneg(raw: np.ndarray, scale: np.ndarray) -> np.ndarray:
        part = np.maximum(raw * signs, 0.0) * scale
        factor = np.zeros((raw.shape[0], k))
        factor[:, :rank] = part
        factor[factor == 0] = mean
        return factor

    def fill_kept(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            factors = []
            for i in range(batch.num_rows):
                args = [batch.column(c)[i].as_buffer() for c in ("indptr", "indices", "data")]
                u = sketch(*args, int(batch.column("n_rows")[i].as_py())) @ to_u
                factors.append(_pack(nonneg(u, u_scale)))
            index = batch.schema.get_field_index("factor")
            yield batch.set_column(index, "factor", pa.array(factors, pa.binary()))

    def fill_shipped(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for blob in batch.column("p"):
                yield _shipped_batch(nonneg(_dense(blob.as_buffer(), shipped_n, rank), p_scale), chunks)

    kept = blocks_only.mapInArrow(fill_kept, _BLOCK_SCHEMA).persist()
    shipped = decomposed.select("p").mapInArrow(fill_shipped, _SHIPPED_SCHEMA).localCheckpoint(eager=True)
    log.info("NMF init: sketch of rank %d, leading singular values %s", r, np.round(values[:rank], 4).tolist())
    return kept, shipped


def _initial_shipped(spark, initial: DataFrame | None, params: NMFParams, chunks: ShippedChunks,
                     scale: float) -> DataFrame:
    """The shipped factor as a one-row DataFrame (custom rows assembled by one small task)."""
    k, seed, shipped_n = params.k, params.seed, chunks.n_rows
    if initial is None:
        def generate(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for _ in batches:
                yield _shipped_batch(_random_factor(seed, 1, shipped_n, k, scale), chunks)
        return spark.range(1, numPartitions=1).mapInArrow(generate, _SHIPPED_SCHEMA)

    def assemble(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        factor = np.zeros((shipped_n, k))
        for batch in batches:
            idx = batch.column(0).to_numpy()
            values = batch.column(1).flatten().to_numpy(zero_copy_only=False)
            if len(idx):
                factor[idx] = values.reshape(len(idx), k)
        yield _shipped_batch(factor, chunks)

    rows = initial.select(F.col(initial.columns[0]).cast("long").alias("idx"), F.col("factors").cast("array<double>"))
    return rows.repartition(1).mapInArrow(assemble, _SHIPPED_SCHEMA)


_PART_TYPE = pa.struct([("chunk", pa.int64()), ("factor", pa.binary()), ("gram", pa.binary())])
_SHIPPED_ARROW_SCHEMA = pa.schema([("parts", pa.list_(_PART_TYPE)), ("tr_cross", pa.float64()),
                                   ("tr_gram", pa.float64())])


_CHUNK_ARROW_SCHEMA = pa.schema([("chunk", pa.int64()), ("factor", pa.binary()), ("gram", pa.binary()),
                                 ("tr_cross", pa.float64()), ("tr_gram", pa.float64())])


def _shipped_batch(factor: np.ndarray, chunks: ShippedChunks) -> pa.RecordBatch:
    """An initial shipped factor (no objective terms yet) as one row of per-chunk blobs and Grams."""
    factor = _stored(factor)
    parts = []
    for c in range(chunks.count):
        part = factor[slice(*chunks.bounds(c))]
        parts.append({"chunk": c, "factor": _pack(part), "gram": (part.T @ part).tobytes()})
    return pa.RecordBatch.from_pydict({"parts": [parts], "tr_cross": [0.0], "tr_gram": [0.0]},
                                      schema=_SHIPPED_ARROW_SCHEMA)


def _read_shipped(batch: pa.RecordBatch, row: int, chunks: ShippedChunks, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole shipped factor and its Gram from the ``parts`` of one row of a batch."""
    parts = batch.column("parts")[row].values
    factor = np.empty((chunks.n_rows, k))
    gram = np.zeros((k, k))
    for chunk, blob, part_gram in zip(parts.field("chunk").to_pylist(), parts.field("factor"), parts.field("gram")):
        lo, hi = chunks.bounds(chunk)
        factor[lo:hi] = _unpack(blob.as_buffer(), hi - lo, k)
        gram += _dense(part_gram.as_buffer(), k, k)
    return factor, gram


def _map_kept(
    state: DataFrame, shipped: DataFrame, chunks: ShippedChunks, k: int, tasks: int,
    update: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None,
) -> DataFrame:
    """Update every kept block from the broadcast factor (a map), and emit what the shipped side needs.

    Output: the blocks (kind 'block', X unchanged, new factor); per task and per chunk c of the
    shipped factor one 'partial' row (block = c) with rows c of sum_i X_i' F_i and the whole
    sum_i F_i' F_i (k x k); and the current shipped chunk c ('shipped', block = c) from the task
    that holds block c, so the reduce reads one DataFrame. ``update=None`` keeps the kept factor.
    Rows of other kinds in ``state`` (the previous iteration's partials) are skipped.
    """
    # Block b sits in task b mod tasks, so blocks 0..tasks-1 are one per task: only they carry the
    # broadcast factor into Python, instead of every block row carrying a copy of it.
    carries = (F.col("kind") == "block") & (F.col("block") < F.lit(tasks))
    joined = state.join(F.broadcast(shipped), carries, "left")
    shipped_n = chunks.n_rows

    def step(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        cross_sum = np.zeros((shipped_n, k))
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
                matrix = _csr(batch.column("indptr")[i].as_buffer(), batch.column("indices")[i].as_buffer(),
                              batch.column("data")[i].as_buffer(), int(n_rows[i]), shipped_n)
                factor = _unpack(batch.column("factor")[i].as_buffer(), int(n_rows[i]), k)
                if update is not None:
                    factor = _stored(update(factor, np.asarray(matrix @ shipped_factor), shipped_gram))
                cross_sum += np.asarray(matrix.T @ factor)
                gram_sum += factor.T @ factor
                factors.append(_pack(factor))
            empty = pa.nulls(batch.num_rows, pa.binary())
            return pa.RecordBatch.from_arrays(
                [pa.array(["block"] * batch.num_rows), batch.column("block"), batch.column("n_rows"),
                 batch.column("indptr"), batch.column("indices"), batch.column("data"),
                 pa.array(factors, pa.binary()), empty, empty],
                schema=_BLOCK_ARROW_SCHEMA)

        for batch in batches:
            is_block = pc.equal(batch.column("kind"), "block")
            if not pc.all(is_block).as_py():
                batch = batch.filter(is_block)
            if batch.num_rows == 0:
                continue
            if shipped_factor is None:
                carrier = pc.index(pc.is_valid(batch.column("parts")), True).as_py()
                if carrier < 0:
                    waiting.append(batch)
                    continue
                shipped_factor, shipped_gram = _read_shipped(batch, carrier, chunks, k)
                for earlier in waiting:
                    yield update_blocks(earlier)
                waiting.clear()
            yield update_blocks(batch)
        if waiting:
            raise RuntimeError("NMF: a task holds row blocks but none of them carried the shipped factor")
        if shipped_factor is None:
            return  # a task without blocks has nothing to add
        rows = []
        for c in range(chunks.count):
            lo, hi = chunks.bounds(c)
            rows.append({"kind": "partial", "block": c, "n_rows": hi - lo, "indptr": None, "indices": None,
                         "data": None, "factor": None, "cross": cross_sum[lo:hi].tobytes(), "gram": gram_sum.tobytes()})
            if c in held:
                rows.append({"kind": "shipped", "block": c, "n_rows": hi - lo, "indptr": None, "indices": None,
                             "data": None, "factor": _pack(shipped_factor[lo:hi]), "cross": None, "gram": None})
        yield _block_batch(rows)

    return joined.mapInArrow(step, _BLOCK_SCHEMA)


def _reduce_shipped(
    state: DataFrame, chunks: ShippedChunks, k: int,
    update: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
) -> DataFrame:
    """Sum the partials and update the shipped factor, one task per chunk; also the objective's trace terms.

    The chunks are gathered back into the one-row shipped layout by a small aggregation.
    """
    def reduce(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        cross: dict[int, np.ndarray] = {}
        gram: dict[int, np.ndarray] = {}
        factor: dict[int, np.ndarray] = {}
        for batch in batches:
            kinds = batch.column("kind").to_pylist()
            for i, chunk in enumerate(batch.column("block").to_pylist()):
                lo, hi = chunks.bounds(chunk)
                if kinds[i] == "shipped":
                    factor[chunk] = _unpack(batch.column("factor")[i].as_buffer(), hi - lo, k)
                else:
                    cross[chunk] = cross.get(chunk, 0) + _dense(batch.column("cross")[i].as_buffer(), hi - lo, k)
                    gram[chunk] = gram.get(chunk, 0) + _dense(batch.column("gram")[i].as_buffer(), k, k)
        if set(factor) != set(cross):
            raise RuntimeError(f"NMF reduce got partials for chunks {sorted(cross)} but factors for {sorted(factor)}")
        for chunk, old_factor in factor.items():
            new_factor = _stored(update(old_factor, cross[chunk], gram[chunk]))
            own_gram = new_factor.T @ new_factor
            yield pa.RecordBatch.from_pydict(
                {"chunk": [chunk], "factor": [_pack(new_factor)], "gram": [own_gram.tobytes()],
                 "tr_cross": [float(np.sum(cross[chunk] * new_factor))],
                 "tr_gram": [float(np.sum(gram[chunk] * own_gram))]},
                schema=_CHUNK_ARROW_SCHEMA)

    # Each DataFrame operation here is analysed on the driver every iteration: keep them few.
    reduced = (state.where(F.col("kind") != "block")
               .repartition(chunks.count, _key_of(F.col("block"), list(chunks.keys)))
               .mapInArrow(reduce, from_arrow_schema(_CHUNK_ARROW_SCHEMA)))
    return reduced.agg(F.sort_array(F.collect_list(F.struct("chunk", "factor", "gram"))).alias("parts"),
                       F.sum("tr_cross").alias("tr_cross"), F.sum("tr_gram").alias("tr_gram"))


def _kept_rows(state: DataFrame, k: int, rows_per_block: int) -> DataFrame:
    """(idx, factors) rows of the kept factor, exploded from its blocks inside the tasks."""
    def explode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for row in batch.to_pylist():
                factor = _unpack(row["factor"], row["n_rows"], k)
                start = row["block"] * rows_per_block
                yield _factor_batch(np.arange(start, start + row["n_rows"]), factor, k)

    return state.where(F.col("kind") == "block").mapInArrow(explode, "idx long, factors array<double>")


def _shipped_rows(shipped: DataFrame, chunks: ShippedChunks, k: int) -> DataFrame:
    """(idx, factors) rows of the shipped factor, exploded chunk by chunk inside the tasks."""
    def explode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for row in batch.to_pylist():
                lo, hi = chunks.bounds(row["chunk"])
                factor = _unpack(row["factor"], hi - lo, k)
                for start in range(lo, hi, 65536):
                    stop = min(start + 65536, hi)
                    yield _factor_batch(np.arange(start, stop), factor[start - lo:stop - lo], k)

    return shipped.select(F.inline("parts")).mapInArrow(explode, "idx long, factors array<double>")


def _factor_batch(idx: np.ndarray, factor: np.ndarray, k: int) -> pa.RecordBatch:
    values = pa.array(np.ascontiguousarray(factor, dtype=np.float64).ravel())
    offsets = pa.array(np.arange(0, (len(idx) + 1) * k, k, dtype=np.int32))
    return pa.RecordBatch.from_arrays([pa.array(idx.astype(np.int64)), pa.ListArray.from_arrays(offsets, values)],
                                      names=["idx", "factors"])


def _factorize_2d(
    summed: DataFrame, stats: MatrixStats, params: NMFParams,
    initial_w: DataFrame | None, initial_h: DataFrame | None,
) -> NMFResult:
    """p x q grid: X blocks keyed (bi, bj), W blocks keyed bi, H' blocks keyed bj.

    A half-step joins X blocks with the other factor's blocks on their block id, multiplies inside
    the tasks, and sums the products in a shuffle keyed on the own block id, where the own block is
    updated; the k x k Grams are collected per block and summed on the driver.
    """
    m, n, k = stats.n_rows, stats.n_cols, params.k
    p = _grid_size(stats.nnz, params.row_blocks, params.block_nnz, m)
    q = _grid_size(stats.nnz, params.col_blocks, params.block_nnz, n)
    rows_per, cols_per = math.ceil(m / p), math.ceil(n / q)
    p, q = math.ceil(m / rows_per), math.ceil(n / cols_per)
    scale = math.sqrt(stats.total / (m * n) / k)
    spark = summed.sparkSession
    if params.init not in ("random", "custom"):
        log.info("NMF 2D layout: init %s is 1D-only, using seeded random", params.init)
    log.info("NMF layout 2D: %d x %d grid of blocks (<= %d x %d)", p, q, rows_per, cols_per)

    def build(frame):
        import pandas as pd
        bi, bj = int(frame["bi"].iloc[0]), int(frame["bj"].iloc[0])
        rows = min(rows_per, m - bi * rows_per)
        cols = min(cols_per, n - bj * cols_per)
        matrix = sp.csr_matrix((frame["value"].to_numpy(STORED_DTYPE),
                                (frame["row"].to_numpy(np.int64) - bi * rows_per,
                                 frame["col"].to_numpy(np.int64) - bj * cols_per)), shape=(rows, cols))
        return pd.DataFrame({"bi": [bi], "bj": [bj], "n_rows": [rows], "n_cols": [cols], **_csr_columns(matrix)})

    grid = (summed.withColumn("bi", (F.col("row") / rows_per).cast("long"))
            .withColumn("bj", (F.col("col") / cols_per).cast("long"))
            .groupBy("bi", "bj").applyInPandas(build, "bi long, bj long, n_rows long, n_cols long, indptr binary, "
                                                      "indices binary, data binary")).persist()
    w = _initial_blocks_2d(spark, initial_w, m, rows_per, p, k, params.seed, 10, scale).localCheckpoint(eager=True)
    h = _initial_blocks_2d(spark, initial_h, n, cols_per, q, k, params.seed, 1_000_000, scale).localCheckpoint(eager=True)
    gram_h = _collect_gram(h, k)
    update_w = make_rule(params, "w", hals_sweeps(params, stats.nnz, m, n))
    update_h = make_rule(params, "h", hals_sweeps(params, stats.nnz, n, m))
    history: list[tuple[int, float, float]] = []
    for iteration in range(1, params.max_iter + 1):
        started = time.perf_counter()
        w = _half_step_2d(grid, h, w, "bj", "bi", gram_h, update_w, k, transpose=False).localCheckpoint(eager=True)
        gram_w = _collect_gram(w, k)
        h = _half_step_2d(grid, w, h, "bi", "bj", gram_w, update_h, k, transpose=True).localCheckpoint(eager=True)
        sums = h.agg(F.sum("tr_cross").alias("tr_cross")).first()
        gram_h = _collect_gram(h, k)
        seconds = time.perf_counter() - started
        history.append((iteration, _rel_error(stats.norm_sq, sums["tr_cross"], float(np.sum(gram_w * gram_h))),
                        seconds))
        log.info("NMF iteration %d: relative error %.6f (%.2f s)", iteration, history[-1][1], seconds)
        if _converged(history, params.tol):
            break
    return NMFResult(w=_explode_blocks_2d(w, rows_per, k).withColumnRenamed("idx", "row_idx"),
                     h=_explode_blocks_2d(h, cols_per, k).withColumnRenamed("idx", "col_idx"),
                     history=history, layout="2d", grid=(p, q), x_norm_sq=stats.norm_sq, _cached=[grid])


_FACTOR_2D_SCHEMA = "block long, n_rows long, factor binary, gram binary, tr_cross double"


def _initial_blocks_2d(spark, initial: DataFrame | None, size: int, per_block: int, blocks: int, k: int,
                       seed: int, stream: int, scale: float) -> DataFrame:
    """Factor blocks (block, n_rows, factor, gram, tr_cross): seeded random, or assembled from given rows."""
    random = initial is None  # the closure must not capture the DataFrame itself

    def make(frame):
        import pandas as pd
        block = int(frame["block"].iloc[0])
        rows = min(per_block, size - block * per_block)
        given = frame[frame["idx"] >= 0]
        if random:
            factor = _random_factor(seed, stream + block, rows, k, scale)
        else:
            factor = np.zeros((rows, k))
            if len(given):
                factor[given["idx"].to_numpy(np.int64) - block * per_block] = np.stack(given["factors"].to_numpy())
        factor = _stored(factor)
        return pd.DataFrame({"block": [block], "n_rows": [rows], "factor": [_pack(factor)],
                             "gram": [(factor.T @ factor).tobytes()], "tr_cross": [0.0]})

    markers = spark.range(blocks).select(F.col("id").alias("block"), F.lit(-1).cast("long").alias("idx"),
                                         F.lit(None).cast("array<double>").alias("factors"))
    if initial is not None:
        idx = F.col(initial.columns[0]).cast("long")
        markers = markers.unionByName(initial.select((idx / per_block).cast("long").alias("block"), idx.alias("idx"),
                                                     F.col("factors").cast("array<double>")))
    return markers.groupBy("block").applyInPandas(make, _FACTOR_2D_SCHEMA)


def _collect_gram(factor_blocks: DataFrame, k: int) -> np.ndarray:
    return _sum_partials(factor_blocks, "gram", (k, k))


def _half_step_2d(grid: DataFrame, other: DataFrame, own: DataFrame, other_key: str, own_key: str,
                  other_gram: np.ndarray, update, k: int, transpose: bool) -> DataFrame:
    """Update the ``own`` factor blocks from sum over other blocks of X_block (or X_block') times them."""
    joined = grid.join(other.select(F.col("block").alias(other_key), F.col("factor").alias("other_factor")),
                       other_key)

    def multiply(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out_block, out_rows, out_product = [], [], []
            for row in batch.to_pylist():
                matrix = _csr(row["indptr"], row["indices"], row["data"], row["n_rows"], row["n_cols"])
                if transpose:
                    product = matrix.T @ _unpack(row["other_factor"], row["n_rows"], k)
                    out_rows.append(row["n_cols"])
                else:
                    product = matrix @ _unpack(row["other_factor"], row["n_cols"], k)
                    out_rows.append(row["n_rows"])
                out_block.append(row[own_key])
                out_product.append(np.ascontiguousarray(product).tobytes())
            yield pa.RecordBatch.from_pydict({"block": out_block, "n_rows": out_rows, "product": out_product},
                                             schema=pa.schema([("block", pa.int64()), ("n_rows", pa.int64()),
                                                               ("product", pa.binary())]))

    products = joined.mapInArrow(multiply, "block long, n_rows long, product binary").select(
        "block", "n_rows", "product", F.lit(None).cast("binary").alias("factor"))
    old = own.select("block", "n_rows", F.lit(None).cast("binary").alias("product"), "factor")

    def combine(frame):
        import pandas as pd
        rows = int(frame["n_rows"].iloc[0])
        cross = np.zeros((rows, k))
        factor = np.zeros((rows, k))
        for product, previous in zip(frame["product"], frame["factor"]):
            if product is not None:
                cross += _dense(product, rows, k)
            if previous is not None:
                factor = _unpack(previous, rows, k)
        factor = _stored(update(factor, cross, other_gram))
        return pd.DataFrame({"block": [int(frame["block"].iloc[0])], "n_rows": [rows], "factor": [_pack(factor)],
                             "gram": [(factor.T @ factor).tobytes()], "tr_cross": [float(np.sum(cross * factor))]})

    return products.unionByName(old).groupBy("block").applyInPandas(combine, _FACTOR_2D_SCHEMA)


def _explode_blocks_2d(blocks: DataFrame, per_block: int, k: int) -> DataFrame:
    def explode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for row in batch.to_pylist():
                start = row["block"] * per_block
                yield _factor_batch(np.arange(start, start + row["n_rows"]), _unpack(row["factor"], row["n_rows"], k), k)

    return blocks.select("block", "n_rows", "factor").mapInArrow(explode, "idx long, factors array<double>")
