"""The Spark-free parts of lib.nmf: update rules against scikit-learn's own update functions and
hand-computed cases, the objective, the stopping test, the encodings, chunking and the inits.
No SparkSession is started here."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.optimize import nnls
from sklearn.decomposition import _nmf as sk_nmf

from lib.nmf import NMFParams, hals_sweeps, hals_update, make_rule, mu_update
from lib.nmf import codec
from lib.nmf.init import InitSpec, column_groups, initial_block, random_factor
from lib.nmf.matrix import MatrixStats
from lib.nmf.placement import Chunks
from lib.nmf.rules import converged, rel_error


def problem(m=40, n=15, k=4, seed=0):
    rng = np.random.default_rng(seed)
    x = sp.random(m, n, density=0.4, random_state=seed, format="csr") * 3.0
    return x, rng.random((m, k)) + 0.1, rng.random((k, n)) + 0.1


@pytest.mark.parametrize("l1, l2", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.7), (0.2, 0.5)])
def test_mu_update_is_sklearns_update_of_w_and_of_h(l1, l2):
    x, w, h = problem()
    expected_w = sk_nmf._multiplicative_update_w(x, w.copy(), h, 2, l1, l2, 1.0)[0]
    np.testing.assert_allclose(mu_update(w, np.asarray(x @ h.T), h @ h.T, l1, l2), expected_w, rtol=1e-12)
    # The H half-step is the same rule on H' (rows x k) with X' W and W'W.
    expected_h = sk_nmf._multiplicative_update_h(x, w, h.copy(), 2, l1, l2, 1.0)
    np.testing.assert_allclose(mu_update(h.T, np.asarray(x.T @ w), w.T @ w, l1, l2), expected_h.T, rtol=1e-12)


def test_mu_update_guards_a_zero_denominator_like_sklearn():
    factor = np.array([[0.0, 1.0]])
    out = mu_update(factor, np.array([[0.0, 2.0]]), np.eye(2), 0.0, 0.0)
    np.testing.assert_array_equal(out, [[0.0, 2.0]])  # 0 * (0 / eps), not NaN


@pytest.mark.parametrize("l1, l2", [(0.0, 0.0), (0.4, 0.0), (0.0, 0.9)])
def test_one_hals_sweep_is_sklearns_coordinate_descent_update(l1, l2):
    x, w, h = problem(seed=3)
    expected = w.copy()
    sk_nmf._update_coordinate_descent(x, expected, h.T.copy(), l1, l2, False, None)
    got = hals_update(w, np.asarray(x @ h.T), h @ h.T, l1, l2, passes=1, inner_tol=0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(w, problem(seed=3)[1])  # the input factor is not modified


def test_many_hals_sweeps_reach_the_nonnegative_least_squares_solution():
    # With cross = X F_other and gram = F_other' F_other, each row of the fixed point solves
    # min_{f >= 0} ||x_row - F_other f||: scipy's NNLS, row by row.
    x, w, h = problem(m=12, n=20, k=3, seed=5)
    dense = x.toarray()
    got = hals_update(w, dense @ h.T, h @ h.T, 0.0, 0.0, passes=500, inner_tol=0.0)
    expected = np.stack([nnls(h.T, dense[i])[0] for i in range(dense.shape[0])])
    np.testing.assert_allclose(got, expected, atol=1e-7)
    assert (got == 0).any()  # the constraint is active somewhere, so this is not plain least squares


def test_hals_sweeps_lower_the_objective_and_stop_early_by_inner_tol():
    x, w, h = problem(seed=7)
    cross, gram = np.asarray(x @ h.T), h @ h.T

    def objective(f):  # ||X - F H||^2 without the constant ||X||^2
        return float(-2 * np.sum(cross * f) + np.sum((f.T @ f) * gram))

    values = [objective(hals_update(w, cross, gram, 0.0, 0.0, passes, 0.0)) for passes in (1, 2, 3, 6)]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(values, values[1:])), values
    # inner_tol = 1: the second sweep moves less than the first, so it is the last one.
    two = hals_update(w, cross, gram, 0.0, 0.0, passes=2, inner_tol=0.0)
    np.testing.assert_array_equal(hals_update(w, cross, gram, 0.0, 0.0, passes=9, inner_tol=1.0), two)


def test_hals_skips_a_component_with_a_zero_gram_diagonal():
    factor = np.array([[1.0, 2.0], [3.0, 4.0]])
    gram = np.array([[2.0, 0.0], [0.0, 0.0]])
    out = hals_update(factor, np.array([[4.0, 9.0], [2.0, 9.0]]), gram, 0.0, 0.0, passes=1, inner_tol=0.0)
    np.testing.assert_allclose(out, [[2.0, 2.0], [1.0, 4.0]])  # column 0: cross / 2; column 1 untouched


def test_hals_sweeps_follow_gillis_glineur_hand_computed():
    params = NMFParams(k=20)
    # The benchmark's 4.1M matrix: W (470,588 rows) rho = 1.517 -> 1 sweep; H (50,000 rows) rho = 13.9 -> 7, capped at 5.
    assert hals_sweeps(params, 4_107_821, 470_588, 50_000) == 1
    assert hals_sweeps(params, 4_107_821, 50_000, 470_588) == 5
    assert hals_sweeps(NMFParams(k=20, inner_passes=9), 4_107_821, 50_000, 470_588) == 7
    # k = 2, 100 own rows, 10 other rows, 300 non-zeros: rho = 1 + 320 / 300 = 2.07 -> int(2.03) = 2.
    assert hals_sweeps(NMFParams(k=2), 300, 100, 10) == 2


def test_make_rule_takes_the_solver_and_its_sides_penalties():
    x, w, h = problem(seed=9)
    cross, gram = np.asarray(x @ h.T), h @ h.T
    params = NMFParams(k=4, solver="mu", l1_w=0.3, l2_h=0.8)
    np.testing.assert_array_equal(make_rule(params, "w")(w, cross, gram), mu_update(w, cross, gram, 0.3, 0.0))
    np.testing.assert_array_equal(make_rule(params, "h")(w, cross, gram), mu_update(w, cross, gram, 0.0, 0.8))
    hals = NMFParams(k=4, l2_w=0.5, inner_passes=4, inner_tol=0.0)
    np.testing.assert_array_equal(make_rule(hals, "w", passes=2)(w, cross, gram),
                                  hals_update(w, cross, gram, 0.0, 0.5, 2, 0.0))
    np.testing.assert_array_equal(make_rule(hals, "w")(w, cross, gram), hals_update(w, cross, gram, 0.0, 0.5, 4, 0.0))
    with pytest.raises(ValueError, match="side"):
        make_rule(params, "x")


def test_relative_error_from_the_trace_terms_equals_the_dense_norm():
    x, w, h = problem(seed=11)
    dense = x.toarray()
    norm_sq = float(np.sum(dense ** 2))
    tr_cross = float(np.sum((dense @ h.T) * w))
    tr_gram = float(np.sum((w.T @ w) * (h @ h.T)))
    expected = np.linalg.norm(dense - w @ h) / np.linalg.norm(dense)
    assert rel_error(norm_sq, tr_cross, tr_gram) == pytest.approx(expected, rel=1e-12)
    assert rel_error(4.0, 2.0, 0.0) == 0.0  # rounding below zero is clipped, not a NaN


def test_converged_compares_the_last_relative_improvement_with_tol():
    assert not converged([(1, 0.5, 0.1)], 0.1)
    assert converged([(1, 0.5, 0.1), (2, 0.46, 0.1)], 0.1)          # 8% < 10%
    assert not converged([(1, 0.5, 0.1), (2, 0.44, 0.1)], 0.1)      # 12%
    assert not converged([(1, 0.5, 0.1), (2, 0.5, 0.1)], 0.0)       # tol 0: run to max_iter
    assert converged([(1, 0.5, 0.1), (2, 0.51, 0.1)], 1e-4)         # getting worse also stops


def test_params_are_validated():
    for bad, match in ((dict(k=0), "rank k"), (dict(k=2, solver="als"), "solver"), (dict(k=2, init="svd"), "init"),
                       (dict(k=2, max_iter=0), "max_iter"), (dict(k=2, l1_h=-1.0), "penalties"),
                       (dict(k=2, checkpoint_interval=0), "checkpoint_interval"), (dict(k=2, inner_tol=2.0), "inner_tol"),
                       (dict(k=2, row_blocks=-1), "row_blocks"), (dict(k=2, broadcast_limit_bytes=-1), "broadcast")):
        with pytest.raises(ValueError, match=match):
            NMFParams(**bad)


def test_codec_round_trips_at_the_stored_precision():
    rng = np.random.default_rng(0)
    factor = rng.random((5, 3))
    back = codec.unpack(codec.pack(factor), 5, 3)
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back, codec.stored(factor))
    np.testing.assert_array_equal(codec.stored(back), back)  # rounding is idempotent
    assert np.max(np.abs(back - factor)) < 1e-7
    matrix = sp.random(6, 9, density=0.3, random_state=1, format="csr", dtype=np.float32)
    cols = codec.csr_columns(matrix)
    again = codec.csr(cols["indptr"][0], cols["indices"][0], cols["data"][0], 6, 9)
    np.testing.assert_array_equal(again.toarray(), matrix.toarray())


def test_block_matrix_places_entries_relative_to_the_block_corner_and_sums_duplicates():
    frame = pd.DataFrame({"row": [10, 11, 10, 10], "col": [5, 7, 6, 5], "value": [1.0, 2.0, 3.0, 0.5]})
    matrix = codec.block_matrix(frame, 10, 5, 2, 3)
    np.testing.assert_array_equal(matrix.toarray(), [[1.5, 3.0, 0.0], [0.0, 0.0, 2.0]])


def test_factor_batch_has_the_factor_rows_schema_and_consecutive_indices():
    factor = np.arange(6.0).reshape(3, 2)
    batch = codec.factor_batch(7, factor)
    assert batch.schema == codec.FACTOR_ROWS
    assert batch.column("idx").to_pylist() == [7, 8, 9]
    assert batch.column("factors").to_pylist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]


def test_every_record_kind_has_one_arrow_schema_and_the_spark_schema_is_derived_from_it():
    for schema in (codec.PARTS, codec.STATE, codec.SHIPPED, codec.CHUNK, codec.GRID, codec.FACTOR_BLOCK,
                   codec.PRODUCT, codec.PARTIAL, codec.SVD, codec.FACTOR_ROWS):
        assert codec.spark_schema(schema).fieldNames() == schema.names
    kinds = {v for name, v in vars(codec.Kind).items() if name.isupper()}
    assert all(isinstance(kind, str) for kind in kinds) and len(kinds) == 6


@pytest.mark.parametrize("n_rows, parts", [(1, 4), (7, 3), (10, 5), (10, 4), (100, 7), (3, 3), (50_000, 2)])
def test_chunks_cover_every_row_once_with_no_empty_chunk(n_rows, parts):
    chunks = Chunks.of(n_rows, parts)
    assert 1 <= chunks.count <= min(parts, n_rows)
    bounds = [chunks.bounds(c) for c in range(chunks.count)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n_rows
    assert all(hi == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:]))
    assert all(hi > lo for lo, hi in bounds)


def spec(init, k=3, seed=4):
    stats = MatrixStats(n_rows=6, n_cols=8, nnz=10, total=12.0, norm_sq=30.0)
    return InitSpec.of(NMFParams(k=k, init=init, seed=seed), stats, 8, ("sketch_svd", "random_columns", "random", "custom"))


def test_random_init_is_sklearns_scale_and_depends_only_on_seed_and_stream():
    s = spec("random")
    assert s.scale == pytest.approx(math.sqrt(12.0 / 48 / 3))
    block = initial_block(s, 11, 0, 500)
    np.testing.assert_array_equal(block, random_factor(4, 11, 500, 3, s.scale))
    np.testing.assert_array_equal(block, initial_block(s, 11, 0, 500))
    assert not np.array_equal(block, initial_block(s, 12, 0, 500))
    assert (block >= 0).all() and np.mean(block) == pytest.approx(s.scale * math.sqrt(2 / math.pi), rel=0.05)


def test_custom_init_places_given_rows_and_leaves_the_rest_zero():
    frame = pd.DataFrame({"kind": [codec.Kind.MARKER, codec.Kind.GIVEN, codec.Kind.GIVEN],
                          "row": [None, 12, 10], "factors": [None, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]})
    block = initial_block(spec("custom"), 0, 10, 4, parts=frame)
    np.testing.assert_array_equal(block, [[4, 5, 6], [0, 0, 0], [1, 2, 3], [0, 0, 0]])


def test_random_columns_init_averages_each_components_column_group():
    s = spec("random_columns", k=2)
    assert [len(g) for g in s.groups] == [4, 4]  # min(8 // 2, 50) columns each, disjoint
    assert len(set(np.concatenate(s.groups))) == 8
    matrix = sp.csr_matrix(np.arange(24.0).reshape(3, 8))
    block = initial_block(s, 0, 0, 3, matrix=matrix)
    expected = np.stack([matrix.toarray()[:, g].mean(axis=1) for g in s.groups], axis=1)
    np.testing.assert_allclose(block, expected)
    np.testing.assert_array_equal(column_groups(4, 8, 2)[0], s.groups[0])


def test_an_init_a_layout_lacks_falls_back_to_random():
    stats = MatrixStats(n_rows=6, n_cols=8, nnz=10, total=12.0, norm_sq=30.0)
    assert InitSpec.of(NMFParams(k=2, init="sketch_svd"), stats, 8, ("random", "custom")).init == "random"
    np.testing.assert_array_equal(initial_block(spec("sketch_svd"), 0, 0, 2), np.zeros((2, 3)))


def test_the_2d_grid_is_planned_without_spark_and_holds_no_cache_before_it_starts():
    from lib.nmf.layout2d import Grid

    stats = MatrixStats(n_rows=10, n_cols=7, nnz=30, total=30.0, norm_sq=50.0)
    grid = Grid(None, stats, NMFParams(k=2, row_blocks=3, col_blocks=2, init="sketch_svd"), None, None)
    assert grid.grid == (3, 2) and (grid.rows.size, grid.cols.size) == (4, 4)
    assert grid.spec_w.init == grid.spec_h.init == "random"  # sketch_svd is 1D-only
    assert grid.cached() == []  # a fit that fails before start() releases nothing that does not exist
