"""Run bookkeeping: one ``pipeline_runs`` row per stage per run (``running`` until it ends)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from pyspark.sql import DataFrame, SparkSession

from lib.platform.catalog import PIPELINE_RUNS

# A stage's outcome besides running / success / failed: it ran, its model lost to a baseline, and its
# shipped tables were restored to the previous run's (lib.platform.promotion).
NOT_PROMOTED = "not_promoted"


@dataclass(frozen=True)
class SavedModel:
    """A model a stage fitted and saved with Spark's writer: its directory and the columns it reads
    (the signature MLflow's registry shows)."""

    path: str
    inputs: tuple[str, ...]


@dataclass
class StageResult:
    """What a stage reports: rows read, rows written, a short message and named counts."""

    rows_in: int | None = None
    rows_out: int | None = None
    message: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    models: dict[str, "SavedModel"] = field(default_factory=dict)  # by model name (lib.platform.tracking)


def run_record(
    spark: SparkSession,
    run_id: str,
    stage: str,
    status: str,
    started_at: datetime,
    finished_at: datetime | None,
    result: StageResult,
) -> DataFrame:
    """A one-row DataFrame for ``pipeline_runs``."""
    row = (
        run_id, stage, status, started_at, finished_at,
        result.rows_in, result.rows_out, result.message[:4000],
        {key: int(value) for key, value in result.counts.items()},
    )
    return spark.createDataFrame([row], PIPELINE_RUNS.schema)
