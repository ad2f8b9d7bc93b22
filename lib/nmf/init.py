"""Initial factor blocks: one entry point (``initial_block``) for every init and every layout.

Every block builder (the 1D row blocks, the 1D shipped factor, the 2D factor blocks) asks
``initial_block`` for its block; what it gets depends only on the init, the seed and the block, never
on how the work is spread. ``sketch_svd`` is computed from all of X at once, so here it only reserves
the block (zeros) and ``lib.nmf.sketch`` fills it; the 2D layout supports ``random`` and ``custom``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from lib.nmf.codec import assemble_given
from lib.nmf.matrix import MatrixStats
from lib.nmf.params import NMFParams

log = logging.getLogger("lib.nmf")

# Random streams of the seeded inits: one per factor block, disjoint between the layouts' factors.
STREAM_SHIPPED = 1
STREAM_COLUMNS = 2
STREAM_SKETCH = 3
STREAM_ROW_BLOCKS = 10
STREAM_COL_BLOCKS = 1_000_000


@dataclass(frozen=True)
class InitSpec:
    """What a task needs to make an initial block (small and picklable: no DataFrame in it)."""

    init: str
    k: int
    seed: int
    scale: float                     # scikit-learn's sqrt(mean(X) / k) for random factors
    groups: tuple[np.ndarray, ...] = ()   # random_columns: the column set of each component

    @staticmethod
    def of(params: NMFParams, stats: MatrixStats, other_n: int, supported: tuple[str, ...]) -> "InitSpec":
        """The init for a factor whose blocks span ``other_n`` columns of X, in a layout that ``supported``."""
        init = params.init
        if init not in supported:
            log.info("NMF: init %s is not available in this layout, using seeded random", init)
            init = "random"
        groups = tuple(column_groups(params.seed, other_n, params.k)) if init == "random_columns" else ()
        return InitSpec(init, params.k, params.seed, math.sqrt(stats.mean / params.k), groups)


def initial_block(spec: InitSpec, stream: int, start: int, rows: int,
                  parts=None, matrix: sp.csr_matrix | None = None) -> np.ndarray:
    """The initial ``rows x k`` block starting at factor row ``start``.

    ``parts``: the block's pandas PARTS rows (custom init reads its GIVEN rows); ``matrix``: the
    block's rows of X (random_columns averages its column groups). ``stream`` seeds random blocks.
    """
    if spec.init == "custom":
        return assemble_given(parts, start, rows, spec.k)
    if spec.init == "random":
        return random_factor(spec.seed, stream, rows, spec.k, spec.scale)
    if spec.init == "sketch_svd":
        return np.zeros((rows, spec.k))  # filled from the sketch once all blocks exist
    if spec.init == "random_columns":
        csc = matrix.tocsc()
        return np.column_stack([np.asarray(csc[:, group].mean(axis=1)).ravel() for group in spec.groups])
    raise ValueError(f"NMF init {spec.init!r} has no block rule")


def random_factor(seed: int, stream: int, rows: int, k: int, scale: float) -> np.ndarray:
    """scikit-learn's 'random' init shape: |N(0, 1)| * sqrt(mean(X) / k), seeded per block."""
    rng = np.random.default_rng([seed, stream])
    return np.abs(rng.standard_normal((rows, k))) * scale


def column_groups(seed: int, n_cols: int, k: int) -> list[np.ndarray]:
    """Random disjoint column sets, one per component (random-Acol init, Langville et al. 2006)."""
    per_group = max(1, min(n_cols // k, 50))
    order = np.random.default_rng([seed, STREAM_COLUMNS]).permutation(n_cols)
    return [order[(l * per_group) % n_cols: (l * per_group) % n_cols + per_group] for l in range(k)]
