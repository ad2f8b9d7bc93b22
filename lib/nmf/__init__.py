"""Blockwise non-negative matrix factorization X ~ W H on Spark DataFrames.

``factorize(entries, NMFParams(k=...))`` takes X (m x n, sparse, non-negative) as (row, col, value)
entries and returns an ``NMFResult`` with W as (row_idx, factors) and H' as (col_idx, factors).
Solvers: multiplicative updates (Lee & Seung, in scikit-learn's exact form for beta = 2) and HALS
(Cichocki; accelerated as in Gillis & Glineur 2012). The objective ||X - W H||_F / ||X||_F comes from
||X||^2 - 2 tr(W' X H') + tr(W'W H H') without forming W H; only k x k matrices and scalars reach
the Python driver.

Modules, one job each:
    params     NMFParams (validated) and NMFResult
    rules      pure numpy: update rules, objective, stopping test
    codec      the Arrow schema of each record kind, the kind names, byte encodings
    matrix     the input entries summed, checked and measured
    placement  block counts, task slots, partition keys, chunks
    init       initial factor blocks, one entry point for every init
    sketch     the sketch_svd init (NNDSVDa from a randomized sketch)
    shipped    the 1D layout's shipped factor record
    layout     the layout interface and the lineage bookkeeping
    layout1d   row blocks with their factor, the other factor shipped (the fast path)
    layout2d   the p x q grid, when neither factor can be shipped
    fit        factorize and the one driver loop
"""
from lib.nmf.fit import factorize
from lib.nmf.matrix import MatrixStats, matrix_entries, matrix_stats
from lib.nmf.params import INITS, SOLVERS, NMFParams, NMFResult
from lib.nmf.rules import MU_EPSILON, hals_sweeps, hals_update, make_rule, mu_update

__all__ = ["INITS", "MU_EPSILON", "SOLVERS", "MatrixStats", "NMFParams", "NMFResult", "factorize", "hals_sweeps",
           "hals_update", "make_rule", "matrix_entries", "matrix_stats", "mu_update"]
