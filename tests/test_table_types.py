"""Every table's Delta schema is one the Delta protocol's plain readers accept (delta-rs, so the API,
Polars, DuckDB): string columns are recorded as ``string``, never ``string collate UTF8_BINARY``, in
classic mode and over Spark Connect, whatever built the frame; a table written with the explicit
collation is repaired by the next write (issue 27)."""
from __future__ import annotations

import json
import os
import socket
import uuid
from datetime import date, datetime
from functools import reduce
from pathlib import Path

import pytest
from deltalake import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib.platform import catalog as C
from lib.platform.runs import StageResult, run_record
from lib.platform.storage import Tables

CONNECT_MODE = "SPARK_CONNECT_MODE_ENABLED"  # pyspark's process-wide switch to Connect columns


def log_schema(path: Path) -> str:
    """The table's current schema as its Delta log records it (the last metaData action)."""
    schemas = [json.loads(line)["metaData"]["schemaString"]
               for commit in sorted((path / "_delta_log").glob("*.json"))
               for line in commit.read_text().splitlines() if '"metaData"' in line]
    return schemas[-1]


@pytest.fixture(scope="module")
def connect_server(spark):
    """A Spark Connect server in the test session's own JVM (so with its Delta settings) on a free
    127.0.0.1 port, and a client session of it: the client-side type encoding of
    ``spark-submit.sh --remote`` without a second JVM."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    jvm, context = spark._jvm, spark.sparkContext._jsc.sc()
    context.conf().set("spark.connect.grpc.binding.address", "127.0.0.1")
    context.conf().set("spark.connect.grpc.binding.port", str(port))
    service = jvm.org.apache.spark.sql.connect.service.SparkConnectService
    service.start(context)
    flag = os.environ.get(CONNECT_MODE)
    try:
        remote = SparkSession.builder.remote(f"sc://127.0.0.1:{port}").create()
    finally:
        # Creating it switches pyspark.sql.functions to Connect columns process-wide; only the tests
        # that use it (the ``connect`` fixture) may run so, the rest of the suite is classic.
        os.environ.pop(CONNECT_MODE, None) if flag is None else os.environ.__setitem__(CONNECT_MODE, flag)
    try:
        yield remote
    finally:
        remote.stop()
        service.stop(jvm.scala.Option.empty(), jvm.scala.Option.empty())


@pytest.fixture
def connect(connect_server, monkeypatch):
    """The Connect client session, with pyspark's functions in Connect mode for this test only."""
    monkeypatch.setenv(CONNECT_MODE, "1")
    assert type(connect_server).__module__.startswith("pyspark.sql.connect")
    return connect_server


def test_conform_casts_by_ddl_text_that_parses_back_to_each_declared_type():
    for table in C.ALL_TABLES:
        for field in table.schema.fields:
            text = field.dataType.simpleString()
            assert "collate" not in text and C.parse_type(text) == field.dataType, (table.name, field.name, text)


def described_types(session: SparkSession, frame: DataFrame) -> list[str]:
    """The frame's column types as the server names them (Connect's client-side schema cannot tell an
    explicit UTF8_BINARY collation from plain ``string``)."""
    view = f"_types_{uuid.uuid4().hex[:8]}"
    frame.createOrReplaceTempView(view)
    try:
        return [row["data_type"] for row in session.sql(f"DESCRIBE {view}").collect()]
    finally:
        session.catalog.dropTempView(view)


def test_over_spark_connect_conform_gives_every_catalog_table_plain_strings(connect, tmp_path):
    """The cause: over Connect a cast to a ``StringType()`` object travels with its collation named and
    the server keeps it explicit (Delta then records it). ``TableSpec.conform`` casts by DDL text, so
    every catalog table's rows have plain strings, and so has the Delta log of a table written."""
    assert described_types(connect, connect.range(1).select(F.col("id").cast(T.StringType()))) \
        == ["string collate UTF8_BINARY"]

    # Every table's conformed rows at once (one struct column per table), in one server round trip.
    empty = connect.range(0)
    conformed = [table.conform(empty.select(*[F.lit(None).alias(c) for c in table.columns]))
                 .select(F.struct("*").alias(table.name)) for table in C.ALL_TABLES]
    assert described_types(connect, reduce(DataFrame.crossJoin, conformed)) == [
        T.StructType(table.schema.fields).simpleString() for table in C.ALL_TABLES]

    # The bookkeeping row every stage writes (createDataFrame with the catalog schema), through Tables.
    at = datetime(2026, 11, 1, 12, 0)
    Tables(root=str(tmp_path)).append(run_record(connect, "r1", "ingest", "success", at, at,
                                                 StageResult(3, 2, "ok", {"a": 1})), C.PIPELINE_RUNS)
    assert "collate" not in log_schema(tmp_path / "pipeline_runs")
    assert DeltaTable(str(tmp_path / "pipeline_runs")).to_pyarrow_table()["counts"].to_pylist() == [[("a", 1)]]


@pytest.mark.slow  # a dozen Delta commits over Connect
def test_every_write_path_over_spark_connect_records_plain_strings(connect, spark, tmp_path, delta_rs_rows):
    """createDataFrame rows with the catalog schema, literals, MERGE sources, empty tables, overwrites
    (overwriteSchema) and replaceWhere, through lib.platform.storage.Tables over Connect."""
    tables, at = Tables(root=str(tmp_path / "wh")), datetime(2026, 11, 1, 12, 0)
    # Appended, then MERGEd (upsert), like run_stage's bookkeeping: a map<string, bigint> column.
    tables.append(run_record(connect, "r1", "ingest", "running", at, None, StageResult()), C.PIPELINE_RUNS)
    tables.upsert(connect, run_record(connect, "r1", "ingest", "success", at, at, StageResult(3, 2, "ok", {"a": 1})),
                  C.PIPELINE_RUNS, "target.run_id = source.run_id AND target.stage = source.stage")
    # createDataFrame with the catalog schema: array<struct<item_id: string, ...>>, overwritten.
    tables.overwrite(connect.createDataFrame([(0, 4, 0.5, [("i1", 0.9)], [("i1", 2.5, 0.4)], True, "sports", "r1")],
                                             C.SEGMENT_PROFILES.schema), C.SEGMENT_PROFILES)
    # Literals.
    tables.append(connect.range(1).select(F.lit("r1").alias("run_id"), F.lit("als").alias("model"), F.lit(5).alias("k"),
                                          F.lit("ndcg").alias("metric"), F.lit(0.2).alias("value")), C.REC_METRICS)
    # An insert-only MERGE into a table it creates.
    tables.insert_new(connect, connect.createDataFrame([("i1",)], "item_id string").withColumn("item_idx", F.lit(0)),
                      C.ITEM_INDEX, ["item_id"])
    # An empty partitioned table with personal columns (create), then a replaceWhere of one partition.
    tables.create(connect, C.EVENTS)
    scores = connect.createDataFrame([("u1", date(2026, 11, 1), "r1")], "user_id string, as_of date, run_id string")
    scores = scores.select("*", *[F.lit(None).alias(c) for c in C.CUSTOMER_SCORES.columns if c not in scores.columns])
    tables.replace_where(scores, C.CUSTOMER_SCORES, "as_of = DATE'2026-11-01'")

    written = {p.parent.name for p in (tmp_path / "wh").glob("*/_delta_log")}
    assert written == {"pipeline_runs", "segment_profiles", "rec_metrics", "item_index", "events", "customer_scores"}
    for name in sorted(written):
        assert "collate" not in log_schema(tmp_path / "wh" / name), name
    assert delta_rs_rows(tmp_path / "wh") == {"pipeline_runs": 1, "segment_profiles": 1, "rec_metrics": 1,
                                              "item_index": 1, "events": 0, "customer_scores": 1}
    assert DeltaTable(str(tmp_path / "wh" / "pipeline_runs")).to_pyarrow_table()["status"].to_pylist() == ["success"]


COLLATED = ("CAST('u1' AS STRING COLLATE UTF8_BINARY) AS run_id, "
            "map(CAST('k' AS STRING COLLATE UTF8_BINARY), 1L) AS counts, "
            "array(named_struct('item_id', CAST('i1' AS STRING COLLATE UTF8_BINARY), 'weight', 0.5D)) AS top_items, "
            "DATE'2026-11-01' AS day")
SPEC = C.TableSpec("collated", "run_id string, counts map<string, bigint>, "
                   "top_items array<struct<item_id: string, weight: double>>, day date", "a test table",
                   partition_by=("day",))


@pytest.mark.parametrize("mode", ["path", "catalog"])
def test_a_table_with_the_explicit_collation_is_repaired_by_the_next_write(spark, tmp_path, delta_rs_rows, mode):
    """What Connect runs wrote before the fix: delta-rs refuses it; the next write through Tables rewrites
    the schema plainly in one metadata-only commit (no data file rewritten), once."""
    if mode == "catalog":
        schema = f"types_{uuid.uuid4().hex[:8]}"
        spark.sql(f"CREATE SCHEMA spark_catalog.{schema} LOCATION '{tmp_path}'")
        tables = Tables(catalog="spark_catalog", schema=schema)
    else:
        tables = Tables(root=str(tmp_path))
    path = tmp_path / SPEC.name
    try:
        writer = spark.sql(f"SELECT {COLLATED}").write.format("delta").partitionBy("day")
        writer.saveAsTable(tables.location(SPEC)) if tables.uses_catalog else writer.save(str(path))
        assert log_schema(path).count("collate UTF8_BINARY") == 3
        with pytest.raises(Exception, match="collate UTF8_BINARY"):
            DeltaTable(str(path)).to_pyarrow_table()

        tables.append(spark.createDataFrame([("u2", {"k": 2}, [("i2", 0.1)], date(2026, 11, 2))], SPEC.schema), SPEC)
        assert "collate" not in log_schema(path)
        assert delta_rs_rows(tmp_path) == {SPEC.name: 2}
        history = spark.sql(f"DESCRIBE HISTORY {tables.sql_name(SPEC)}").orderBy("version").collect()
        assert [row["operation"] for row in history][1:] == ["REPLACE COLUMNS", "WRITE"]
        assert (history[1]["operationMetrics"] or {}).get("numAddedFiles", "0") == "0"
        assert tables.repair_schema(spark, SPEC) is False  # idempotent
        assert sorted(r["run_id"] for r in tables.read(spark, SPEC).select("run_id").collect()) == ["u1", "u2"]
    finally:
        if tables.uses_catalog:
            spark.sql(f"DROP SCHEMA IF EXISTS spark_catalog.{tables.schema} CASCADE")


def test_an_overwrite_over_spark_connect_repairs_a_collated_table(connect, tmp_path, delta_rs_rows):
    """overwriteSchema alone keeps the collation (Delta counts the types equal): the repair runs first."""
    path = tmp_path / SPEC.name
    connect.sql(f"SELECT {COLLATED}").write.format("delta").partitionBy("day").save(str(path))
    assert "collate UTF8_BINARY" in log_schema(path)
    Tables(root=str(tmp_path)).overwrite(connect.sql(f"SELECT {COLLATED}"), SPEC)
    assert "collate" not in log_schema(path)
    assert delta_rs_rows(tmp_path) == {SPEC.name: 1}
