"""Spark session settings shared by jobs, tests and benchmarks."""
from __future__ import annotations

from pyspark.sql import SparkSession

# Delta's Python package is pinned at 4.4.1, but Maven Central serves the JVM artifact for
# Spark 4.2 only up to 4.4.0; the Python side is a thin API over the JVM and the two are
# compatible across a patch release.
DELTA_PACKAGE = "io.delta:delta-spark_4.2_2.13:4.4.0"

DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}

# Settings every batch run wants: UTC everywhere (event dates are UTC days), no console
# progress bar in batch logs.
BATCH_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.showConsoleProgress": "false",
}

# Local mode runs the executors inside the driver's JVM, where Spark answers a task's
# java.lang.OutOfMemoryError by exiting the whole JVM (exit code 52): the job could then neither
# restore its tables nor record the failure. Depth 0 makes such an error fail the task, hence the
# stage, like any other error; the failed task's buffers are garbage once it ends. On a cluster the
# default stays: a lost executor is replaced and the driver records the failure itself.
LOCAL_CONF = {
    "spark.executor.killOnFatalError.depth": "0",
}


def local_session(
    app_name: str,
    master: str = "local[2]",
    conf: dict[str, str] | None = None,
) -> SparkSession:
    """Build (or reuse) a classic local SparkSession with Delta resolved from Maven Central.

    Used by tests and benchmarks; jobs get their session from spark-submit instead.
    """
    builder = SparkSession.builder.master(master).appName(app_name)
    settings = {"spark.jars.packages": DELTA_PACKAGE, **DELTA_CONF, **BATCH_CONF, **LOCAL_CONF, **(conf or {})}
    for key, value in settings.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()
