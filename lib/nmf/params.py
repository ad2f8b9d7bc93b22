"""The settings of one factorization (validated on creation) and what a factorization returns."""
from __future__ import annotations

from dataclasses import dataclass, field

from pyspark.sql import DataFrame

SOLVERS = ("hals", "mu")
INITS = ("sketch_svd", "random_columns", "random", "custom")

# One entry of NMFResult.history: (iteration, relative error after it, seconds it took).
HistoryEntry = tuple[int, float, float]


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
    inner_passes: int = 5            # most HALS sweeps per distributed product (see rules.hals_sweeps())
    inner_tol: float = 0.1           # stop inner passes once a pass changes < inner_tol x the first
    row_blocks: int = 0              # 0: from the number of non-zeros
    col_blocks: int = 0              # 2D layout only; 0: from the number of non-zeros
    block_nnz: int = 1_000_000       # target non-zeros per block when the grid is automatic
    broadcast_limit_bytes: int = 64 * 1024 * 1024   # largest factor shipped to every task (1D)
    checkpoint_interval: int = 1     # cut the lineage every this many iterations (1: plans stay flat)
    parallelism: int = 0             # tasks per distributed step; 0: as many as Spark runs at once
    sketch_power_iterations: int = 7  # sketch_svd: rounds of X' X before the SVD (scikit-learn's randomized SVD runs 7)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"NMF rank k must be >= 1, got {self.k}")
        if self.solver not in SOLVERS:
            raise ValueError(f"NMF solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.init not in INITS:
            raise ValueError(f"NMF init must be one of {INITS}, got {self.init!r}")
        if self.sketch_power_iterations < 0:
            raise ValueError(f"NMF sketch_power_iterations must be >= 0, got {self.sketch_power_iterations}")
        if self.max_iter < 1:
            raise ValueError(f"NMF max_iter must be >= 1, got {self.max_iter}")
        if min(self.l1_w, self.l2_w, self.l1_h, self.l2_h) < 0:
            raise ValueError("NMF penalties l1_w, l2_w, l1_h, l2_h must be >= 0")
        if self.inner_passes < 1 or self.checkpoint_interval < 1:
            raise ValueError("NMF inner_passes and checkpoint_interval must be >= 1")
        if not 0 <= self.inner_tol <= 1:
            raise ValueError(f"NMF inner_tol must be in [0, 1], got {self.inner_tol}")
        if self.tol < 0 or self.block_nnz < 1 or min(self.row_blocks, self.col_blocks, self.parallelism) < 0:
            raise ValueError("NMF tol, block_nnz, row_blocks, col_blocks and parallelism must be non-negative")
        if self.broadcast_limit_bytes < 0:
            raise ValueError("NMF broadcast_limit_bytes must be >= 0")

    def penalties(self, side: str) -> tuple[float, float]:
        """(l1, l2) of the W side ("w") or the H side ("h")."""
        if side not in ("w", "h"):
            raise ValueError(f"NMF factor side must be 'w' or 'h', got {side!r}")
        return (self.l1_w, self.l2_w) if side == "w" else (self.l1_h, self.l2_h)


@dataclass
class NMFResult:
    """Factors as DataFrames (``row_idx``/``col_idx``, ``factors`` array<double> of length k) and the history."""

    w: DataFrame
    h: DataFrame
    history: list[HistoryEntry]
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
