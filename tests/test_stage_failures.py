"""A stage that runs out of memory: rolled back and recorded like any failure (one tiny table, fast)."""
from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from jobs import build_interactions
from jobs.common import run_stage
from lib.platform import catalog as C
from lib.platform.settings import INT32_MAX


def test_a_task_out_of_memory_restores_the_tables_and_records_the_failure(spark, tmp_path, context, monkeypatch):
    # Without lib.platform.session.LOCAL_CONF a task's OutOfMemoryError exits the whole local JVM (code 52),
    # before the job can restore or record anything; that is the failure this test guards against.
    assert spark.sparkContext.getConf().get("spark.executor.killOnFatalError.depth") == "0"
    ctx = context(f"output.root={tmp_path / 'wh'}", "spark.shuffle_partitions=2", run_id="run-oom")
    ctx.tables.overwrite(spark.createDataFrame([("i1", 0)], C.ITEM_INDEX.schema), C.ITEM_INDEX)

    def run_out_of_memory(ctx):
        ctx.tables.overwrite(spark.createDataFrame([("i2", 0)], C.ITEM_INDEX.schema), C.ITEM_INDEX)
        # A real java.lang.OutOfMemoryError in a task without filling the heap: a 2 GB string is
        # beyond the JVM's largest array. Computed from a column, so it runs in a task, not the optimizer.
        ctx.spark.range(1).select(F.repeat(F.lit("x"), (F.col("id") + INT32_MAX).cast("int"))).collect()

    monkeypatch.setattr(build_interactions, "run", run_out_of_memory)
    with pytest.raises(Exception, match="OutOfMemoryError"):
        run_stage(ctx, "build_interactions")

    assert [tuple(r) for r in ctx.tables.read(spark, C.ITEM_INDEX).collect()] == [("i1", 0)]
    runs = ctx.tables.read(spark, C.PIPELINE_RUNS).where("run_id = 'run-oom'").collect()
    assert [(r["stage"], r["status"], r["finished_at"] is not None) for r in runs] == [
        ("build_interactions", "failed", True)]
    assert "OutOfMemoryError" in runs[0]["message"] and "restored item_index" in runs[0]["message"]
