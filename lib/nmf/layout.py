"""The interface the driver loop sees of a block layout, and the lineage bookkeeping both layouts share."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol

from pyspark.sql import DataFrame, SparkSession


class Lineage:
    """When the plan is cut (every ``interval`` iterations) and which cached frames to release.

    An iterate depends on the previous one, so an uncut plan grows every iteration. ``keep`` persists
    an iterate, or checkpoints it on a cutting iteration. Unpersisting a DataFrame makes Spark drop the
    caches built on it, so frames held before a cut are released only once the iteration that cut
    them is over (``end_iteration``).
    """

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.cutting = False
        self._held: list[DataFrame] = []
        self._stale: list[DataFrame] = []

    def begin_iteration(self, iteration: int) -> None:
        self.cutting = iteration % self.interval == 0

    def keep(self, df: DataFrame, eager: bool = True) -> DataFrame:
        """An iterate: checkpointed on a cutting iteration (releasing what was held), else persisted.

        ``eager=False`` leaves it to the next action to compute it (the checkpoint or cache is filled
        then, and the plans built on it start from the checkpoint either way), so one Spark job can
        both compute the iterate and consume it; it must be computed before ``end_iteration``.
        """
        if self.cutting:
            self._stale += self._held
            self._held = []
            return df.localCheckpoint(eager=eager)
        return self.hold(df)

    def hold(self, df: DataFrame) -> DataFrame:
        """Persisted until the next cut."""
        df = df.persist()
        self._held.append(df)
        return df

    @staticmethod
    def cut(df: DataFrame, eager: bool = True) -> DataFrame:
        """Cut from its plan (small frames: the shipped factor, Gram rows); materialized now, or by the
        first action on it when not ``eager``."""
        return df.localCheckpoint(eager=eager)

    def end_iteration(self) -> None:
        for df in self._stale:
            df.unpersist()
        self._stale = []

    def held(self) -> list[DataFrame]:
        return list(self._held)


class Layout(Protocol):
    """A way of cutting X and the factors into blocks; the driver loop runs any of them."""

    name: str                 # "1d", "1d-transposed" or "2d"
    grid: tuple[int, int]     # blocks of X: (row blocks, column blocks)
    iteration_conf: dict[str, str]   # runtime SQL settings while iterating (not while building blocks)

    def start(self, lineage: Lineage) -> None:
        """Build the blocks of X and the initial factors."""

    def step(self, lineage: Lineage) -> tuple[float, float]:
        """One iteration (W, then H); returns the objective's terms tr(W' X H') and tr(W'W H H')."""

    def factors(self) -> tuple[DataFrame, DataFrame]:
        """W as (row_idx, factors) and H' as (col_idx, factors)."""

    def cached(self) -> list[DataFrame]:
        """Frames cached for the whole fit (released with the result)."""


@contextmanager
def session_conf(spark: SparkSession, conf: dict[str, str]) -> Iterator[None]:
    """Runtime SQL settings for the duration of a block, each restored (or unset) afterwards.

    Only plans executed (or lazily checkpointed) inside the block run under them.
    """
    previous = {key: spark.conf.get(key, None) for key in conf}
    for key, value in conf.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
