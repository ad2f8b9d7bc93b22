"""Where the suite's Delta tables live (paths under a root, or catalog tables) and how they are written.

Every write is one Delta commit (overwrite, append or insert-only MERGE) conformed to the table's
catalog schema (an append or replaceWhere adds the catalog's newer columns to an older table),
retried with backoff when a concurrent writer wins the commit race (a failed commit leaves nothing
behind, so a retry is safe). Stages that write several tables are made all-or-nothing
one level up (``jobs.common.run_stage``) with ``version`` and ``restore``: each commit carries the
run and stage in its ``userMetadata``, so a restore never rolls back another run's commits.
"""
from __future__ import annotations

import logging
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DateType, NumericType, StringType, TimestampNTZType, TimestampType

from lib.platform.catalog import TableSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

# Delta's optimistic-concurrency failures: another writer committed first; the write may be retried.
CONFLICT_MARKERS = (
    "ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
    "ConcurrentTransactionException", "ConcurrentWriteException", "MetadataChangedException",
    "ProtocolChangedException", "DELTA_CONCURRENT_", "DELTA_METADATA_CHANGED", "DELTA_PROTOCOL_CHANGED",
)
COMMIT_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"
# Column types Delta keeps min/max statistics for (it refuses others in dataSkippingStatsColumns).
STATS_TYPES = (NumericType, StringType, DateType, TimestampType, TimestampNTZType)
# The explicit default collation that writes over Spark Connect recorded before TableSpec.conform cast
# by DDL text: `string collate UTF8_BINARY` in the Delta log, refused by delta-rs (see repair_schema).
EXPLICIT_DEFAULT_COLLATION = re.compile(r"\s+collate\s+utf8_binary\b", re.IGNORECASE)
# Tables whose schema this process has checked (repair_schema), so each costs one DESCRIBE per run.
_schema_checked: set[str] = set()


def is_commit_conflict(err: BaseException) -> bool:
    """True for a Delta commit lost to a concurrent writer (classic and Spark Connect errors alike)."""
    text = f"{type(err).__name__}: {err}"
    return any(marker in text for marker in CONFLICT_MARKERS)


def with_retries(action: Callable[[], T], what: str, attempts: int = 6, base_delay: float = 0.5) -> T:
    """Run ``action``; on a commit conflict wait (exponential backoff with jitter) and run it again.

    ``action`` must recompute everything it derived from the table it writes: a retry sees the
    winner's commit. After ``attempts`` conflicts the last error is raised.
    """
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - re-raised unless it is a commit conflict
            if not is_commit_conflict(err) or attempt == attempts:
                raise
            delay = base_delay * 2 ** (attempt - 1) * (1 + random.random())
            log.warning("%s: concurrent commit (%s), retry %d/%d in %.1f s", what, type(err).__name__,
                        attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Tables:
    """Locates the suite's tables: ``root/<table>`` paths, or ``catalog.schema.<table>`` names."""

    root: str = ""
    catalog: str = ""
    schema: str = ""

    def __post_init__(self) -> None:
        if not self.root and not (self.catalog and self.schema):
            raise ValueError("tables need output.root, or output.catalog and output.schema")

    @property
    def uses_catalog(self) -> bool:
        return bool(self.catalog and self.schema)

    def location(self, table: TableSpec) -> str:
        """The table's path, or its fully qualified catalog name."""
        if self.uses_catalog:
            return f"{self.catalog}.{self.schema}.{table.name}"
        return f"{self.root.rstrip('/')}/{table.name}"

    def sql_name(self, table: TableSpec) -> str:
        """The table as SQL names it: ``catalog.schema.table`` or ``delta.`path```."""
        if self.uses_catalog:
            return self.location(table)
        return f"delta.`{self.location(table)}`"

    def exists(self, spark: SparkSession, table: TableSpec) -> bool:
        """True when the table exists and is a readable Delta table."""
        if self.uses_catalog:
            return spark.catalog.tableExists(self.location(table))
        return is_delta_path(spark, self.location(table))

    def read(self, spark: SparkSession, table: TableSpec, version: int | None = None) -> DataFrame:
        """Read the current version of a table, or the given one (time travel)."""
        reader = spark.read if version is None else spark.read.option("versionAsOf", version)
        if self.uses_catalog:
            return reader.table(self.location(table))
        return reader.format("delta").load(self.location(table))

    def run_rows(self, spark: SparkSession, table: TableSpec, run_id: str, *columns: str) -> list[tuple]:
        """``columns`` of one run's rows of a small table (a stage's metrics), collected; none when the
        table does not exist."""
        if not self.exists(spark, table):
            return []
        rows = self.read(spark, table).where(F.col("run_id") == F.lit(run_id)).select(*columns)
        return [tuple(row) for row in rows.collect()]

    def require(self, spark: SparkSession, table: TableSpec, producer: str) -> DataFrame:
        """Read a stage's input table, or fail naming the table and the stage that writes it."""
        if not self.exists(spark, table):
            raise ValueError(f"table {self.location(table)} does not exist: run the {producer} stage first")
        return self.read(spark, table)

    def ensure_schema(self, spark: SparkSession) -> None:
        """Create the catalog schema when tables are catalog tables (no-op for paths)."""
        if self.uses_catalog:
            spark.sql(f"CREATE SCHEMA IF NOT EXISTS {self.catalog}.{self.schema}")

    def create(self, spark: SparkSession, table: TableSpec) -> None:
        """Create the table empty, with no Delta statistics on its personal columns (so customer ids
        never land in the transaction log, which VACUUM does not clean)."""
        def attempt() -> None:
            if self.exists(spark, table):
                return
            writer = table.empty(spark).write.format("delta").mode("append")
            if table.partition_by:
                writer = writer.partitionBy(*table.partition_by)
            writer.saveAsTable(self.location(table)) if self.uses_catalog else writer.save(self.location(table))
            if table.personal:
                # Statistics only on plain, non-personal, non-partition columns (Delta refuses the others).
                indexed = [f.name for f in table.schema.fields if f.name not in table.personal
                           and f.name not in table.partition_by and isinstance(f.dataType, STATS_TYPES)]
                setting = (f"'delta.dataSkippingStatsColumns' = '{','.join(indexed)}'" if indexed
                           else "'delta.dataSkippingNumIndexedCols' = '0'")
                spark.sql(f"ALTER TABLE {self.sql_name(table)} SET TBLPROPERTIES ({setting})")

        with_retries(attempt, f"create {table.name}")

    def repair_schema(self, spark: SparkSession, table: TableSpec) -> bool:
        """Rewrite an explicit ``string collate UTF8_BINARY`` in the table's schema as plain ``string``;
        True when it did (False for a table that is plain already or does not exist).

        Tables written over Spark Connect before ``TableSpec.conform`` cast by DDL text carry that
        type, which delta-rs refuses. Delta counts it equal to ``string``, so an overwrite with
        ``overwriteSchema`` keeps it; ``ALTER TABLE ... REPLACE COLUMNS`` with the same columns
        written plainly commits the plain schema, metadata only (no data file is rewritten).
        Idempotent; every write runs it once per table and process (``_checked_schema``).
        """
        def attempt() -> bool:
            if not self.exists(spark, table):  # quietly: a failed DESCRIBE logs an error with its stack
                return False
            columns = []
            for row in spark.sql(f"DESCRIBE TABLE {self.sql_name(table)}").collect():
                # the columns, then a blank row or "# Partition Information"
                if not row["col_name"] or row["col_name"].startswith("#"):
                    break
                columns.append(row)
            if not any(EXPLICIT_DEFAULT_COLLATION.search(row["data_type"]) for row in columns):
                return False
            ddl = ", ".join(
                f"`{row['col_name']}` {EXPLICIT_DEFAULT_COLLATION.sub('', row['data_type'])}"
                + (f" COMMENT '{_sql_quote(row['comment'])}'" if row["comment"] else "")
                for row in columns)
            spark.sql(f"ALTER TABLE {self.sql_name(table)} REPLACE COLUMNS ({ddl})").collect()
            return True

        repaired = with_retries(attempt, f"repair schema of {table.name}")
        if repaired:
            log.info("%s: schema's explicit UTF8_BINARY collation rewritten as plain string", self.location(table))
        return repaired

    def _checked_schema(self, spark: SparkSession, table: TableSpec) -> None:
        """``repair_schema`` once per table and process, before the first write; a table whose repair
        fails is written all the same (Spark reads it either way), with a warning."""
        location = self.location(table)
        if location in _schema_checked:
            return
        try:
            self.repair_schema(spark, table)
        except Exception as err:  # noqa: BLE001 - the write goes on; only other readers are affected
            log.warning("%s: could not rewrite its string collation as plain string (%s: %s); delta-rs "
                        "may refuse the table", location, type(err).__name__, str(err).splitlines()[0][:300])
        _schema_checked.add(location)

    def _write(self, df: DataFrame, table: TableSpec, mode: str, replace_where: str = "") -> None:
        spark = df.sparkSession
        self._checked_schema(spark, table)
        if table.personal and not self.exists(spark, table):
            self.create(spark, table)
        writer = table.conform(df).write.format("delta").mode(mode)
        if replace_where:
            writer = writer.option("replaceWhere", replace_where)
        if table.partition_by:
            writer = writer.partitionBy(*table.partition_by)
        if mode == "overwrite" and not replace_where:
            writer = writer.option("overwriteSchema", "true")
        else:
            # A column the catalog added after the table was written joins it (Delta refuses the write
            # otherwise); its older rows read as null. conform() lets only catalog columns through.
            writer = writer.option("mergeSchema", "true")
        target = self.location(table)
        with_retries(lambda: writer.saveAsTable(target) if self.uses_catalog else writer.save(target),
                     f"{mode} {table.name}")

    def overwrite(self, df: DataFrame, table: TableSpec) -> None:
        """Replace the table's contents (and schema) in one commit."""
        self._write(df, table, "overwrite")

    def replace_where(self, df: DataFrame, table: TableSpec, condition: str) -> None:
        """Replace the rows matching ``condition`` (e.g. one partition) by ``df`` in one commit."""
        self._write(df, table, "overwrite", condition)

    def append(self, df: DataFrame, table: TableSpec) -> None:
        """Append rows in one commit, creating the table if needed."""
        self._write(df, table, "append")

    def insert_new(self, spark: SparkSession, source: DataFrame, table: TableSpec, keys: list[str],
                   also_unique: list[str] = (), attempts: int = 6) -> int:
        """Insert the source rows whose ``keys`` are not in the table yet; return how many were inserted.

        An insert-only MERGE: re-running with the same source inserts nothing, and two writers at
        once serialize (the loser's MERGE conflicts and is retried against the winner's rows). A row
        whose ``also_unique`` column value is already taken is not inserted either. ``attempts=1``
        leaves the retry to a caller that must recompute its rows. The table is created (empty, with
        the catalog schema) on first use.
        """
        self._checked_schema(spark, table)
        if not self.exists(spark, table):
            self.create(spark, table)
        view = f"_insert_new_{table.name}_{uuid.uuid4().hex[:8]}"  # unique: concurrent writers share a session
        table.conform(source).createOrReplaceTempView(view)
        condition = " AND ".join(f"target.`{key}` = source.`{key}`" for key in keys)
        condition = " OR ".join([f"({condition})"] + [f"target.`{col}` = source.`{col}`" for col in also_unique])
        statement = (f"MERGE INTO {self.sql_name(table)} AS target USING {view} AS source "
                     f"ON {condition} WHEN NOT MATCHED THEN INSERT *")
        result = with_retries(lambda: spark.sql(statement).collect(), f"merge into {table.name}", attempts)
        spark.catalog.dropTempView(view)
        return int(result[0]["num_inserted_rows"]) if result else 0

    def upsert(self, spark: SparkSession, source: DataFrame, table: TableSpec, condition: str) -> None:
        """MERGE ``source`` into the table: rows matching ``condition`` (SQL over ``target`` and
        ``source``) are replaced, the others inserted; one commit, retried on conflicts."""
        self._checked_schema(spark, table)
        if not self.exists(spark, table):
            self.create(spark, table)
        view = f"_upsert_{table.name}_{uuid.uuid4().hex[:8]}"
        table.conform(source).createOrReplaceTempView(view)
        statement = (f"MERGE INTO {self.sql_name(table)} AS target USING {view} AS source ON {condition} "
                     "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *")
        with_retries(lambda: spark.sql(statement).collect(), f"upsert into {table.name}")
        spark.catalog.dropTempView(view)

    def version(self, spark: SparkSession, table: TableSpec) -> int | None:
        """The table's current Delta version, or None when it does not exist."""
        try:
            row = spark.sql(f"DESCRIBE HISTORY {self.sql_name(table)} LIMIT 1").select("version").first()
        except AnalysisException:
            return None
        return None if row is None else int(row["version"])

    def commits_since(self, spark: SparkSession, table: TableSpec, version: int | None) -> list[tuple[int, str]]:
        """(version, userMetadata) of the table's commits after ``version`` (all of them for None)."""
        try:
            history = spark.sql(f"DESCRIBE HISTORY {self.sql_name(table)}")
        except AnalysisException:
            return []
        if version is not None:
            history = history.where(history["version"] > version)
        return [(int(r["version"]), r["userMetadata"] or "") for r in history.select("version", "userMetadata").collect()]

    def restore(self, spark: SparkSession, table: TableSpec, version: int | None) -> None:
        """Put the table back at ``version``; a table that did not exist then is removed."""
        _schema_checked.discard(self.location(table))  # an older version may predate a schema repair
        if version is not None:
            spark.sql(f"RESTORE TABLE {self.sql_name(table)} TO VERSION AS OF {version}")
        elif self.uses_catalog:
            spark.sql(f"DROP TABLE IF EXISTS {self.location(table)}")
        elif "://" not in self.root or self.root.startswith("file:"):
            shutil.rmtree(Path(self.location(table).removeprefix("file:")), ignore_errors=True)
        else:
            log.warning("%s was created by the failed stage and is left in place (remote path)",
                        self.location(table))


def _sql_quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def is_delta_path(spark: SparkSession, path: str) -> bool:
    """True when ``path`` holds a Delta table (has a readable transaction log)."""
    try:
        spark.read.format("delta").load(path).schema
    except AnalysisException:
        return False
    return True
