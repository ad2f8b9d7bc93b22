"""Generate the sample clickstream (with planted segments) and its ground truth as parquet."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from jobs.common import main_for, tables_of
from lib.runs import StageResult
from lib.sample_data import SampleSpec, generate_events, planted_segment_items, planted_user_segments


def sample_root(config: dict[str, Any]) -> str:
    """Where the raw sample lands: sample.path, or <output.root>/sample."""
    if config["sample"]["path"]:
        path = config["sample"]["path"]
        return path if "://" in path else str(Path(path).resolve())
    tables = tables_of(config)
    if tables.uses_catalog or not tables.root:
        raise ValueError("set sample.path: the sample needs a directory when tables live in a catalog")
    return f"{tables.root}/sample"


def sample_spec(config: dict[str, Any]) -> SampleSpec:
    return SampleSpec(**{key: value for key, value in config["sample"].items() if key != "path"})


def run(spark: SparkSession, config: dict[str, Any], run_id: str) -> StageResult:
    spec = sample_spec(config)
    root = sample_root(config)
    generate_events(spark, spec).write.mode("overwrite").parquet(f"{root}/events")
    planted_user_segments(spark, spec).write.mode("overwrite").parquet(f"{root}/truth_user_segments")
    planted_segment_items(spark, spec).write.mode("overwrite").parquet(f"{root}/truth_segment_items")
    return StageResult(rows_in=0, rows_out=spec.events, message=f"sample written to {root}")


if __name__ == "__main__":
    main_for("generate_events", __doc__, run)
