"""Blockwise NMF on local Spark against scikit-learn's NMF on the same matrix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import NMF

from lib.nmf import NMFParams, factorize

REPO_ROOT = Path(__file__).resolve().parents[1]


def planted_matrix(m: int, n: int, k: int, seed: int, density: float = 0.3) -> sp.coo_matrix:
    """A sparse non-negative matrix with rank-k structure plus noise."""
    rng = np.random.default_rng(seed)
    dense = rng.gamma(1.0, 1.0, (m, k)) @ rng.gamma(0.5, 1.0, (k, n)) + 0.1 * rng.random((m, n))
    mask = rng.random((m, n)) < density
    return sp.coo_matrix(dense * mask)


def entries_df(spark, matrix: sp.coo_matrix):
    rows = [(int(r), int(c), float(v)) for r, c, v in zip(matrix.row, matrix.col, matrix.data)]
    return spark.createDataFrame(rows, "row long, col long, value double")


def factor_df(spark, factor: np.ndarray, name: str):
    return spark.createDataFrame([(i, factor[i].tolist()) for i in range(factor.shape[0])],
                                 f"{name} long, factors array<double>")


def to_numpy(df, size: int, k: int) -> np.ndarray:
    out = np.zeros((size, k))
    for idx, factors in df.toPandas().itertuples(index=False):
        out[idx] = factors
    return out


def rel_error(dense: np.ndarray, w: np.ndarray, h: np.ndarray) -> float:
    return float(np.linalg.norm(dense - w @ h) / np.linalg.norm(dense))


@pytest.mark.slow  # a whole stage or model fit: over 9 s
def test_multiplicative_update_matches_sklearn_every_iteration(spark):
    m, n, k, iterations = 90, 30, 4, 20
    matrix = planted_matrix(m, n, k, seed=1)
    rng = np.random.default_rng(5)
    w0, h0 = rng.random((m, k)) + 0.1, rng.random((k, n)) + 0.1

    result = factorize(entries_df(spark, matrix), NMFParams(k=k, solver="mu", init="custom", max_iter=iterations,
                                                            tol=0.0, row_blocks=3, checkpoint_interval=4),
                       n_rows=m, n_cols=n, initial_w=factor_df(spark, w0, "row_idx"),
                       initial_h=factor_df(spark, h0.T, "col_idx"))
    assert [h[0] for h in result.history] == list(range(1, iterations + 1))
    dense = matrix.toarray()
    for iteration in range(1, iterations + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = NMF(k, solver="mu", init="custom", max_iter=iteration, tol=0.0)
            w = model.fit_transform(matrix.tocsr(), W=w0.copy(), H=h0.copy())
        expected = rel_error(dense, w, model.components_)
        assert result.history[iteration - 1][1] == pytest.approx(expected, rel=1e-6), iteration
    # The written factors are the ones whose error was reported.
    assert rel_error(dense, to_numpy(result.w, m, k), to_numpy(result.h, n, k).T) == pytest.approx(
        result.rel_error, rel=1e-6)
    result.release()


@pytest.mark.slow  # a whole stage or model fit: over 9 s
def test_hals_reaches_sklearn_cd_error_in_no_more_iterations(spark):
    m, n, k = 150, 50, 5
    matrix = planted_matrix(m, n, k, seed=2)
    rng = np.random.default_rng(3)
    w0, h0 = rng.random((m, k)) + 0.1, rng.random((k, n)) + 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = NMF(k, solver="cd", init="custom", max_iter=200, tol=1e-4)
        w = model.fit_transform(matrix.tocsr(), W=w0.copy(), H=h0.copy())
    sklearn_error = rel_error(matrix.toarray(), w, model.components_)

    result = factorize(entries_df(spark, matrix), NMFParams(k=k, solver="hals", init="custom",
                                                            max_iter=model.n_iter_, tol=1e-4, row_blocks=2),
                       n_rows=m, n_cols=n, initial_w=factor_df(spark, w0, "row_idx"),
                       initial_h=factor_df(spark, h0.T, "col_idx"))
    assert result.iterations <= model.n_iter_
    assert result.rel_error <= 1.01 * sklearn_error, (result.history, sklearn_error, model.n_iter_)
    result.release()


def test_wide_matrix_is_factorized_transposed_and_reports_its_factors_error(spark):
    m, n = 20, 80
    k = 3
    matrix = planted_matrix(m, n, k, seed=4)
    result = factorize(entries_df(spark, matrix), NMFParams(k=k, max_iter=6, tol=0.0, row_blocks=3),
                       n_rows=m, n_cols=n)
    assert result.layout == "1d-transposed"
    errors = [h[1] for h in result.history]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:])), errors
    w, h = to_numpy(result.w, m, k), to_numpy(result.h, n, k).T
    assert (w >= 0).all() and (h >= 0).all()
    assert rel_error(matrix.toarray(), w, h) == pytest.approx(result.rel_error, rel=1e-6)
    result.release()


def test_sketch_power_iterations_make_the_init_independent_of_the_seed(spark):
    # Twelve planted components of slowly falling strength: singular values 70.8, 33.2, 32.4, 30.6, ...,
    # flat like a real basket log's. A plain sketch of rank k + 10 misses the leading subspace by
    # 10-15% and each seed misses it differently; seven rounds of X'X find it whatever the seed.
    rng = np.random.default_rng(6)
    m, n, k = 120, 40, 3
    dense = (rng.gamma(1.0, 1.0, (m, 12)) * 0.85 ** np.arange(12)) @ rng.gamma(0.5, 1.0, (12, n))
    entries = entries_df(spark, sp.coo_matrix(dense * (rng.random((m, n)) < 0.3)))
    first_w = {}
    for power in (0, 7):
        for seed in (1, 2):
            result = factorize(entries, NMFParams(k=k, seed=seed, max_iter=1, tol=0.0, row_blocks=2,
                                                  sketch_power_iterations=power), n_rows=m, n_cols=n)
            first_w[power, seed] = to_numpy(result.w, m, k)
            result.release()
    scale = np.abs(first_w[7, 1]).max()
    # (Not exactly equal: the second and third singular values are 2.5% apart, so seven rounds leave
    # about 2e-4 of the scale between the seeds.)
    with_power = np.abs(first_w[7, 1] - first_w[7, 2]).max() / scale
    without = np.abs(first_w[0, 1] - first_w[0, 2]).max() / scale
    assert with_power < 1e-3 and without > 1e-2, (with_power, without)
    with pytest.raises(ValueError, match="sketch_power_iterations must be >= 0"):
        NMFParams(k=2, sketch_power_iterations=-1)


def test_sketch_init_is_deterministic_and_beats_random(spark):
    m, n, k = 120, 40, 4
    matrix = planted_matrix(m, n, k, seed=6)
    entries = entries_df(spark, matrix)
    runs = {}
    for name, init, seed in (("sketch", "sketch_svd", 11), ("again", "sketch_svd", 11), ("random", "random", 11)):
        result = factorize(entries, NMFParams(k=k, init=init, seed=seed, max_iter=1, tol=0.0, row_blocks=2),
                           n_rows=m, n_cols=n)
        runs[name] = (result.rel_error, to_numpy(result.w, m, k))
        result.release()
    assert runs["sketch"][0] == runs["again"][0]
    np.testing.assert_array_equal(runs["sketch"][1], runs["again"][1])
    assert runs["sketch"][0] < runs["random"][0]


def test_edge_cases_empty_rows_and_columns_small_blocks_single_block_rank_one(spark):
    # Rows 7 and 8 and column 5 are empty; 5 row blocks of 2 rows each hold fewer rows than k = 3.
    dense = np.zeros((10, 6))
    dense[:7, :5] = planted_matrix(7, 5, 2, seed=7, density=0.9).toarray()
    dense[9, 0] = 1.0
    matrix = sp.coo_matrix(dense)
    entries = entries_df(spark, matrix)
    for params in (NMFParams(k=3, max_iter=3, row_blocks=5, tol=0.0),
                   NMFParams(k=1, max_iter=3, row_blocks=1, solver="mu", tol=0.0, init="random_columns")):
        result = factorize(entries, params, n_rows=10, n_cols=6)
        w, h = to_numpy(result.w, 10, params.k), to_numpy(result.h, 6, params.k).T
        assert np.isfinite(w).all() and np.isfinite(h).all()
        assert np.allclose(w[7:9], 0) and np.allclose(h[:, 5], 0)
        assert rel_error(dense, w, h) == pytest.approx(result.rel_error, rel=1e-6)
        assert result.rel_error < 1.0
        result.release()


@pytest.mark.slow  # a whole stage or model fit: over 9 s
def test_number_of_tasks_and_chunks_does_not_change_the_result(spark):
    # 1, 2 and 3 tasks: the row blocks, the item-factor chunks and their reduce tasks all differ.
    m, n, k = 60, 25, 3
    matrix = planted_matrix(m, n, k, seed=12)
    entries = entries_df(spark, matrix)
    runs = []
    for tasks in (1, 2, 3):
        result = factorize(entries, NMFParams(k=k, max_iter=4, tol=0.0, parallelism=tasks), n_rows=m, n_cols=n)
        assert result.grid[0] % tasks == 0
        runs.append(([h[1] for h in result.history], to_numpy(result.w, m, k), to_numpy(result.h, n, k)))
        result.release()
    for errors, w, h in runs[1:]:
        assert errors == pytest.approx(runs[0][0], rel=1e-9)
        np.testing.assert_allclose(w, runs[0][1], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(h, runs[0][2], rtol=1e-5, atol=1e-9)


def test_duplicate_entries_are_summed(spark):
    matrix = planted_matrix(30, 12, 2, seed=8)
    rows = [(int(r), int(c), float(v)) for r, c, v in zip(matrix.row, matrix.col, matrix.data)]
    halves = [(r, c, v / 2) for r, c, v in rows] * 2
    params = NMFParams(k=2, max_iter=3, tol=0.0, row_blocks=2)
    whole = factorize(spark.createDataFrame(rows, "row long, col long, value double"), params, 30, 12)
    split = factorize(spark.createDataFrame(halves, "row long, col long, value double"), params, 30, 12)
    assert [h[1] for h in split.history] == pytest.approx([h[1] for h in whole.history], rel=1e-9)
    whole.release()
    split.release()


def test_bad_input_gets_a_clear_error(spark):
    zeros = spark.createDataFrame([(0, 0, 0.0), (1, 2, 0.0)], "row long, col long, value double")
    with pytest.raises(ValueError, match="all zeros"):
        factorize(zeros, NMFParams(k=2))
    negative = spark.createDataFrame([(0, 0, 1.0), (1, 2, -3.0)], "row long, col long, value double")
    with pytest.raises(ValueError, match="non-negative"):
        factorize(negative, NMFParams(k=2))
    outside = spark.createDataFrame([(0, 0, 1.0), (5, 2, 3.0)], "row long, col long, value double")
    with pytest.raises(ValueError, match="beyond the declared shape"):
        factorize(outside, NMFParams(k=2), n_rows=3, n_cols=3)
    with pytest.raises(ValueError, match="rank k"):
        NMFParams(k=0)


DRIVER_PROBE = textwrap.dedent("""
    import json, pickle, sys
    sys.path.insert(0, sys.argv[1])
    from pyspark.sql import SparkSession, functions as F
    from lib.nmf import NMFParams, factorize

    spark = (SparkSession.builder.master("local[2]").config("spark.driver.maxResultSize", "1m")
             .config("spark.sql.shuffle.partitions", "2").config("spark.ui.enabled", "false").getOrCreate())
    # Count what every DataFrame collection hands the Python driver (rows and pickled bytes);
    # take / head / first go through collect.
    frame_class = type(spark.range(1))
    collected = []
    def counting(name):
        original = getattr(frame_class, name)
        def wrapper(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            collected.append((name, len(out) if hasattr(out, "__len__") else 1, len(pickle.dumps(out))))
            return out
        return wrapper
    for name in ("collect", "tail", "toPandas", "toArrow"):
        setattr(frame_class, name, counting(name))
    def refuse(*args, **kwargs):
        raise AssertionError("toLocalIterator streams a frame to the driver")
    frame_class.toLocalIterator = refuse
    m, n, k = 60000, 30, 4
    # Each user touches about 3 of the 30 items at random (random values, so W does not compress):
    # about 180k non-zeros, W is m x k doubles (about 1.9 MB).
    entries = (spark.range(m * 3).select((F.col("id") / 3).cast("long").alias("row"),
               (F.rand(1) * n).cast("long").alias("col"), (0.1 + F.rand(2)).alias("value")))
    out = {}
    for name, params in (("1d", NMFParams(k=k, max_iter=3, tol=0.0, row_blocks=4)),
                         ("2d", NMFParams(k=k, max_iter=2, tol=0.0, row_blocks=4, col_blocks=2, init="random",
                                          broadcast_limit_bytes=64))):
        collected.clear()
        result = factorize(entries, params, n_rows=m, n_cols=n)
        during = list(collected)
        # W's size measured on the executors: only two scalars come back.
        size = result.w.agg(F.count(F.lit(1)).alias("rows"), F.sum(F.size("factors")).alias("values")).first()
        out[name] = {"layout": result.layout, "rel_error": result.rel_error, "w_rows": size["rows"],
                     "w_bytes": 8 * size["values"], "collections": len(during),
                     "largest": max(b for _, _, b in during), "total": sum(b for _, _, b in during),
                     "most_rows": max(r for _, r, _ in during)}
        try:
            result.w.collect()
            out[name]["collect_w"] = "succeeded"
        except Exception as err:
            out[name]["collect_w"] = "failed: " + ("maxResultSize" if "maxResultSize" in str(err) else str(err)[:300])
        result.release()
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow  # a whole stage or model fit: over 9 s
def test_factors_never_pass_through_the_driver(tmp_path):
    """In a session of its own with spark.driver.maxResultSize = 1 MB (a static setting), both layouts
    factorize a matrix whose W measures about 1.9 MB on the executors, while collecting that W fails;
    and everything the factorization collected to the driver, counted call by call, is a few small
    rows (k x k Grams, scalars, partition keys), nowhere near W's size."""
    script = tmp_path / "probe.py"
    script.write_text(DRIVER_PROBE)
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    done = subprocess.run([sys.executable, str(script), str(REPO_ROOT)], capture_output=True, text=True,
                          env=env, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT "):])
    for name, result in results.items():
        assert result["layout"] == name
        assert result["w_rows"] == 60000
        assert result["w_bytes"] == 60000 * 4 * 8 > 1024 * 1024, result  # above maxResultSize
        assert 0 < result["rel_error"] < 1
        assert result["collect_w"] == "failed: maxResultSize", result
        assert result["collections"] > 0, result  # the counting saw the factorization's own collects
        assert result["largest"] < 16 * 1024 and result["most_rows"] <= 64, result
        assert result["total"] < result["w_bytes"] / 20, result


def test_2d_grid_layout_matches_sklearn_multiplicative_update(spark):
    """With both factors above the broadcast limit the 2D grid runs; same numbers as scikit-learn, every
    iteration, with the lineage cut every second iteration (persisted iterates in between)."""
    m, n, k, iterations = 40, 24, 3, 3
    matrix = planted_matrix(m, n, k, seed=9)
    rng = np.random.default_rng(10)
    w0, h0 = rng.random((m, k)) + 0.1, rng.random((k, n)) + 0.1
    result = factorize(entries_df(spark, matrix), NMFParams(k=k, solver="mu", init="custom", max_iter=iterations,
                                                            tol=0.0, row_blocks=3, col_blocks=2,
                                                            broadcast_limit_bytes=64, checkpoint_interval=2),
                       n_rows=m, n_cols=n, initial_w=factor_df(spark, w0, "row_idx"),
                       initial_h=factor_df(spark, h0.T, "col_idx"))
    assert result.layout == "2d" and result.grid == (3, 2)
    assert [h[0] for h in result.history] == list(range(1, iterations + 1))
    for iteration in range(1, iterations + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = NMF(k, solver="mu", init="custom", max_iter=iteration, tol=0.0)
            w = model.fit_transform(matrix.tocsr(), W=w0.copy(), H=h0.copy())
        expected = rel_error(matrix.toarray(), w, model.components_)
        assert result.history[iteration - 1][1] == pytest.approx(expected, rel=1e-6), iteration
    np.testing.assert_allclose(to_numpy(result.w, m, k), w, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(to_numpy(result.h, n, k), model.components_.T, rtol=1e-6, atol=1e-12)
    result.release()
