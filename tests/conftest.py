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
    from lib.session import local_session

    session = local_session(
        "email-personalization-tests",
        master="local[2]",
        conf={
            "spark.sql.shuffle.partitions": "2",
            "spark.databricks.delta.snapshotPartitions": str(load_settings([], []).spark.delta_snapshot_partitions),
            "spark.default.parallelism": "2",
            "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{REPO_ROOT}/conf/log4j2.properties",
            "spark.sql.warehouse.dir": str(REPO_ROOT / "build" / "spark-warehouse"),
            "spark.driver.memory": "3g",
        },
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)
    yield session
    session.stop()


@pytest.fixture
def context(spark):
    """``context(*sets, conf=(), run_id=...)``: a StageContext from conf/base.toml, conf files and --set pairs."""
    from jobs.common import StageContext, load_settings

    def make(*sets: str, conf: tuple[str, ...] = (), run_id: str = "run-1") -> StageContext:
        return StageContext(spark, load_settings(list(conf), list(sets)), run_id)

    return make
