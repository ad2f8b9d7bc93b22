"""The driver loop: one for every layout. It owns the history, the tolerance test, when the lineage
is cut and what is released; the layout only says how one iteration runs on its blocks."""
from __future__ import annotations

import logging
import time

from pyspark.sql import DataFrame, SparkSession

from lib.nmf.layout import Layout, Lineage, session_conf
from lib.nmf.layout1d import RowBlocks
from lib.nmf.layout2d import Grid
from lib.nmf.matrix import MatrixStats, matrix_entries, matrix_stats
from lib.nmf.params import HistoryEntry, NMFParams, NMFResult
from lib.nmf.rules import converged, rel_error

log = logging.getLogger("lib.nmf")


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
        log.info("NMF: %d x %d, nnz=%d, k=%d, solver=%s, init=%s", stats.n_rows, stats.n_cols, stats.nnz,
                 params.k, params.solver, params.init)
        result = run(choose_layout(summed, stats, params, initial_w, initial_h), stats, params,
                     summed.sparkSession)
    except BaseException:
        summed.unpersist()
        raise
    # Unpersisting the input now would make Spark drop the caches built on it (the last iterates).
    result._cached.append(summed)
    return result


def choose_layout(summed: DataFrame, stats: MatrixStats, params: NMFParams,
                  initial_w: DataFrame | None, initial_h: DataFrame | None) -> Layout:
    """1D when the smaller factor (k x min(m, n) doubles) may be shipped to every task, else the 2D grid."""
    if min(stats.n_rows, stats.n_cols) * params.k * 8 <= params.broadcast_limit_bytes:
        return RowBlocks(summed, stats, params, initial_w, initial_h, transposed=stats.n_cols > stats.n_rows)
    return Grid(summed, stats, params, initial_w, initial_h)


def run(layout: Layout, stats: MatrixStats, params: NMFParams, spark: SparkSession) -> NMFResult:
    """Iterate until ``max_iter`` or until an iteration improves the relative error by less than ``tol``.

    The iterations (not the building of the blocks) run under the layout's ``iteration_conf``.
    """
    lineage = Lineage(params.checkpoint_interval)
    history: list[HistoryEntry] = []
    try:
        layout.start(lineage)
        with session_conf(spark, layout.iteration_conf):
            for iteration in range(1, params.max_iter + 1):
                started = time.perf_counter()
                lineage.begin_iteration(iteration)
                tr_cross, tr_gram = layout.step(lineage)
                lineage.end_iteration()
                seconds = time.perf_counter() - started
                history.append((iteration, rel_error(stats.norm_sq, tr_cross, tr_gram), seconds))
                log.info("NMF iteration %d: relative error %.6f (%.2f s)", iteration, history[-1][1], seconds)
                if converged(history, params.tol):
                    break
    except BaseException:
        for df in lineage.held() + layout.cached():
            df.unpersist()
        raise
    w, h = layout.factors()
    return NMFResult(w=w, h=h, history=history, layout=layout.name, grid=layout.grid, x_norm_sq=stats.norm_sq,
                     _cached=lineage.held() + layout.cached())
