"""The sketch_svd init of the 1D layout: NNDSVDa from a randomized range sketch of X.

NNDSVDa (Boutsidis & Gallopoulos 2008) from a sketch (Halko et al. 2011): Y = X Omega (Omega:
shipped_n x r Gaussian, regenerated from the seed in each task; after ``power_iterations`` rounds
Omega <- orth(X' X Omega), each summed and orthonormalized in one task and shipped to the tasks
in one broadcast row), Q = Y L'^-1 with L L' = Y'Y (r x r,
on the driver), B = X' Q summed in one task and its thin SVD there: X ~ (Q Z) S P'. The kept factor
comes from U = Q Z block by block, the shipped one from P; zeros are filled with mean(X) as
scikit-learn's 'nndsvda' does. Only r x r matrices and per-component norms reach the driver.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.nmf import codec
from lib.nmf.codec import Kind
from lib.nmf.init import STREAM_SKETCH
from lib.nmf.placement import ShippedChunks
from lib.nmf.shipped import shipped_batch

log = logging.getLogger("lib.nmf")
SKETCH_OVERSAMPLING = 10


def _block(batch: pa.RecordBatch, i: int, shipped_n: int):
    """Row block i of a batch as a CSR matrix."""
    args = [batch.column(c)[i].as_buffer() for c in ("indptr", "indices", "data")]
    return codec.csr(*args, int(batch.column("n_rows")[i].as_py()), shipped_n)


def _per_task_sum(blocks: DataFrame, fn: Callable[..., np.ndarray], shipped_n: int,
                  omega_of: Callable[[pa.RecordBatch, int], np.ndarray]) -> DataFrame:
    """PARTIAL rows: per task, the sum over its row blocks of fn(block matrix, Omega)."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        total = None
        for batch in batches:
            for i in range(batch.num_rows):
                part = fn(_block(batch, i, shipped_n), omega_of(batch, i))
                total = part if total is None else total + part
        if total is not None:
            yield codec.batch([{"partial": np.ascontiguousarray(total).tobytes()}], codec.PARTIAL)

    return blocks.mapInArrow(run, codec.spark_schema(codec.PARTIAL))


def _orthonormal_omega(partials: DataFrame, shipped_n: int, r: int) -> DataFrame:
    """One row (omega: shipped_n x r float64 bytes): the summed X' X Omega partials, orthonormalized (QR)."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        total = np.zeros((shipped_n, r))
        for batch in batches:
            for blob in batch.column("partial"):
                total += codec.dense(blob.as_buffer(), shipped_n, r)
        yield pa.RecordBatch.from_pydict({"omega": [np.ascontiguousarray(np.linalg.qr(total)[0]).tobytes()]})

    return partials.repartition(1).mapInArrow(run, "omega binary").localCheckpoint(eager=True)


def sketch_svd(blocks: DataFrame, chunks: ShippedChunks, k: int, seed: int, mean: float,
               power_iterations: int = 0, limit_bytes: int = 64 * 1024 * 1024) -> tuple[DataFrame, DataFrame]:
    """(kept blocks as STATE rows with the init filled in, not yet cached; the shipped factor, checkpointed).

    ``power_iterations`` rounds of subspace iteration sharpen the sketch where X's spectrum is flat
    (a real basket log: its leading singular values differ by a few percent, and a plain sketch
    lands on a different subspace, hence different segments, for every seed). They are skipped
    when Omega (shipped_n x r doubles, in every task) would exceed ``limit_bytes``.
    """
    shipped_n = chunks.n_rows
    blocks_only = blocks.where(F.col("kind") == Kind.BLOCK)
    kept_rows = blocks_only.agg(F.sum("n_rows")).first()[0]
    r = max(1, min(k + SKETCH_OVERSAMPLING, shipped_n, kept_rows))
    rank = min(k, r)
    if power_iterations and shipped_n * r * 8 > limit_bytes:
        log.info("NMF init: no power iterations, the %d x %d sketch is above the broadcast limit", shipped_n, r)
        power_iterations = 0

    def gaussian(batch: pa.RecordBatch, i: int) -> np.ndarray:
        return np.random.default_rng([seed, STREAM_SKETCH]).standard_normal((shipped_n, r))

    def shipped_omega(batch: pa.RecordBatch, i: int) -> np.ndarray:
        return codec.dense(batch.column("omega")[i].as_buffer(), shipped_n, r)

    source, omega_of = blocks_only, gaussian
    for _ in range(power_iterations):
        partials = _per_task_sum(source, lambda m, om: np.asarray(m.T @ np.asarray(m @ om)), shipped_n, omega_of)
        source, omega_of = blocks_only.crossJoin(F.broadcast(_orthonormal_omega(partials, shipped_n, r))), shipped_omega

    def task_sum(fn: Callable[..., np.ndarray]) -> DataFrame:
        return _per_task_sum(source, fn, shipped_n, omega_of)

    gram = codec.sum_rows(task_sum(lambda m, om: (lambda y: y.T @ y)(np.asarray(m @ om))), "partial", (r, r))
    lower = np.linalg.cholesky(gram + 1e-10 * max(np.trace(gram), 1e-300) * np.eye(r))
    to_q = np.linalg.inv(lower).T  # Q = Y to_q has orthonormal columns

    def project(matrix, omega) -> np.ndarray:
        return np.asarray(matrix.T @ (np.asarray(matrix @ omega) @ to_q))

    def svd(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        projected = np.zeros((shipped_n, r))
        for batch in batches:
            for blob in batch.column("partial"):
                projected += codec.dense(blob.as_buffer(), shipped_n, r)
        left, values, right_t = np.linalg.svd(projected, full_matrices=False)  # X' Q = P S Z'
        p_top = left[:, :rank]
        norms = np.concatenate([np.linalg.norm(np.maximum(p_top, 0), axis=0),
                                np.linalg.norm(np.maximum(-p_top, 0), axis=0)])
        yield codec.batch([{"p": np.ascontiguousarray(p_top).tobytes(), "values": values[:rank].tobytes(),
                            "z": np.ascontiguousarray(right_t.T[:, :rank]).tobytes(), "p_norms": norms.tobytes()}],
                          codec.SVD)

    decomposed = (task_sum(project).repartition(1)
                  .mapInArrow(svd, codec.spark_schema(codec.SVD)).localCheckpoint(eager=True))
    small = decomposed.select("values", "z", "p_norms").first()
    values = np.frombuffer(small["values"], dtype=np.float64)
    z = np.frombuffer(small["z"], dtype=np.float64).reshape(r, rank)
    p_norms = np.frombuffer(small["p_norms"], dtype=np.float64).reshape(2, rank)
    to_u = to_q @ z

    def u_block(matrix, omega) -> np.ndarray:
        u = np.asarray(matrix @ omega) @ to_u
        return np.stack([np.sum(np.maximum(u, 0) ** 2, axis=0), np.sum(np.maximum(-u, 0) ** 2, axis=0)])

    u_norms = np.sqrt(codec.sum_rows(task_sum(u_block), "partial", (2, rank)))
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
                u = np.asarray(_block(batch, i, shipped_n) @ omega_of(batch, i)) @ to_u
                factors.append(codec.pack(nonneg(u, u_scale)))
            if "omega" in batch.schema.names:
                batch = batch.drop_columns(["omega"])
            index = batch.schema.get_field_index("factor")
            yield batch.set_column(index, "factor", pa.array(factors, pa.binary()))

    def fill_shipped(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for blob in batch.column("p"):
                yield shipped_batch(nonneg(codec.dense(blob.as_buffer(), shipped_n, rank), p_scale), chunks)

    kept = source.mapInArrow(fill_kept, codec.spark_schema(codec.STATE))
    shipped = decomposed.select("p").mapInArrow(fill_shipped, codec.spark_schema(codec.SHIPPED)).localCheckpoint(eager=True)
    log.info("NMF init: sketch of rank %d after %d power iterations, leading singular values %s", r,
             power_iterations, np.round(values[:rank], 4).tolist())
    return kept, shipped
