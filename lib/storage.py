"""Where the suite's Delta tables live: path-based under a root directory, or catalog tables.

Every write is a single Delta commit (overwrite, append or insert-only MERGE), so a run that fails
part-way leaves each table at its previous version, readable.
"""
from __future__ import annotations

from dataclasses import dataclass
from pyspark.sql import DataFrame, SparkSession
from pyspark.errors import AnalysisException

from lib.catalog import TableSpec


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

    def read(self, spark: SparkSession, table: TableSpec) -> DataFrame:
        """Read the current version of a table."""
        if self.uses_catalog:
            return spark.read.table(self.location(table))
        return spark.read.format("delta").load(self.location(table))

    def ensure_schema(self, spark: SparkSession) -> None:
        """Create the catalog schema when tables are catalog tables (no-op for paths)."""
        if self.uses_catalog:
            spark.sql(f"CREATE SCHEMA IF NOT EXISTS {self.catalog}.{self.schema}")

    def require(self, spark: SparkSession, table: TableSpec, producer: str) -> DataFrame:
        """Read a stage's input table, or fail naming the table and the stage that writes it."""
        if not self.exists(spark, table):
            raise ValueError(f"table {self.location(table)} does not exist: run the {producer} stage first")
        return self.read(spark, table)

    def _write(self, df: DataFrame, table: TableSpec, mode: str) -> None:
        writer = table.conform(df).write.format("delta").mode(mode)
        if table.partition_by:
            writer = writer.partitionBy(*table.partition_by)
        if mode == "overwrite":
            writer = writer.option("overwriteSchema", "true")
        if self.uses_catalog:
            writer.saveAsTable(self.location(table))
        else:
            writer.save(self.location(table))

    def overwrite(self, df: DataFrame, table: TableSpec) -> None:
        """Replace the table's contents (and schema) in one commit."""
        self._write(df, table, "overwrite")

    def append(self, df: DataFrame, table: TableSpec) -> None:
        """Append rows in one commit, creating the table if needed."""
        self._write(df, table, "append")

    def insert_new(
        self,
        spark: SparkSession,
        source: DataFrame,
        table: TableSpec,
        keys: list[str],
    ) -> int:
        """Insert the source rows whose ``keys`` are not in the table yet; return how many were inserted.

        An insert-only MERGE: re-running with the same source inserts nothing. The table is created
        (empty, with the source's schema) on first use.
        """
        if not self.exists(spark, table):
            self._write(source.limit(0), table, "append")
        view = f"_insert_new_{table.name}"
        table.conform(source).createOrReplaceTempView(view)
        condition = " AND ".join(f"target.`{key}` = source.`{key}`" for key in keys)
        result = spark.sql(
            f"MERGE INTO {self.sql_name(table)} AS target USING {view} AS source "
            f"ON {condition} WHEN NOT MATCHED THEN INSERT *"
        ).collect()
        spark.catalog.dropTempView(view)
        return int(result[0]["num_inserted_rows"]) if result else 0


def is_delta_path(spark: SparkSession, path: str) -> bool:
    """True when ``path`` holds a Delta table (has a readable transaction log)."""
    try:
        spark.read.format("delta").load(path).schema
    except AnalysisException:
        return False
    return True
