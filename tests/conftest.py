"""One local SparkSession (classic, with Delta) shared by the whole test session."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Workers must import the same interpreter's packages as the driver.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def spark():
    from jobs.common import load_settings
    from lib.platform.session import local_session

    session = local_session(
        "email-personalization-tests",
        master="local[2]",
        conf={
            **load_settings([], []).spark.runtime_conf(),  # what a job's session gets from conf/base.toml
            "spark.sql.shuffle.partitions": "2",
            "spark.default.parallelism": "2",
            "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{REPO_ROOT}/conf/log4j2.properties",
            "spark.sql.warehouse.dir": str(REPO_ROOT / "build" / "spark-warehouse"),
            "spark.driver.memory": "3g",
            # One driver serves the whole suite (~300 tests, tens of thousands of queries): keep the
            # UI's history of queries, jobs and stages short so it cannot fill the heap by the end.
            "spark.sql.ui.retainedExecutions": "50",
            "spark.ui.retainedJobs": "100",
            "spark.ui.retainedStages": "100",
            "spark.ui.retainedTasks": "1000",
            # Delta keeps the log of every table path it opened, with its snapshot's plans and cached
            # state; the suite opens thousands of temporary tables (measured: about 1.4M live plan nodes).
            "spark.databricks.delta.delta.log.cacheSize": "100",
        },
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)
    yield session
    session.stop()


@pytest.fixture(scope="module", autouse=True)
def _release_cached_frames():
    """Drop every cached DataFrame once a module is done. Stages leave some cached intermediates
    for their process's exit to free; in one test session that runs dozens of stages they piled up
    in the heap that broadcast joins are built in (CI: "Not enough memory to build and broadcast")."""
    yield
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is not None:
        session.catalog.clearCache()


@pytest.fixture
def context(spark):
    """``context(*sets, conf=(), run_id=...)``: a StageContext from conf/base.toml, conf files and --set pairs."""
    from jobs.common import StageContext, load_settings

    def make(*sets: str, conf: tuple[str, ...] = (), run_id: str = "run-1") -> StageContext:
        # MLflow tracking off unless a test turns it on: test_pipeline checks it on a whole run.
        return StageContext(spark, load_settings(list(conf), ["tracking.enabled=false", *sets]), run_id)

    return make


@pytest.fixture
def delta_rs_rows(spark):
    """``delta_rs_rows(root)``: every Delta table under ``root`` opened with an independent reader
    (delta-rs, no JVM, what the API and most non-JVM tools build on); each must have the rows Spark
    sees, and ``events``, when there, the same stored event times as instants. Returns rows per table."""
    from deltalake import DeltaTable

    def check(root: Path) -> dict[str, int]:
        rows = {}
        for path in sorted(log.parent for log in Path(root).rglob("_delta_log")):
            rows[path.name] = DeltaTable(str(path)).to_pyarrow_table().num_rows
            assert rows[path.name] == spark.read.format("delta").load(str(path)).count(), path.name
        if (Path(root) / "events" / "_delta_log").is_dir():
            arrow = DeltaTable(str(Path(root) / "events")).to_pyarrow_table(columns=["event_id", "event_ts"])
            by_rs = {e: ts.timestamp() for e, ts in zip(arrow["event_id"].to_pylist(), arrow["event_ts"].to_pylist())}
            by_spark = {r["event_id"]: r["s"] for r in spark.read.format("delta").load(str(Path(root) / "events"))
                        .selectExpr("event_id", "unix_micros(event_ts) / 1e6 AS s").collect()}
            assert by_rs == by_spark
        return rows

    return check
