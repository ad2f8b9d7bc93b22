"""Ingest: normalize a raw clickstream to the input contract and sort rows into valid or quarantined.

Every input row ends in exactly one place: ``events`` (new), ``events_quarantine`` (with a reason),
or counted as a duplicate of an event already kept, so ``rows_in = rows_out + quarantined +
duplicates`` holds for every run.
"""
from __future__ import annotations

from datetime import datetime

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

REQUIRED_COLUMNS = ("user_id", "item_id", "event_type", "event_ts")
OPTIONAL_STRING_COLUMNS = ("event_id", "campaign_id", "channel")
OPTIONAL_AMOUNT_COLUMNS = ("quantity", "revenue")

EVENT_COLUMNS = (
    "event_id", "user_id", "item_id", "event_type", "event_ts",
    "quantity", "revenue", "campaign_id", "channel", "event_date",
)

# Checked in this order; a row gets the first reason that applies.
QUARANTINE_REASONS = (
    "missing_user_id",
    "missing_item_id",
    "missing_event_type",
    "unknown_event_type",
    "missing_event_ts",
    "unparseable_event_ts",
    "future_event_ts",
    "unparseable_quantity",
    "negative_quantity",
    "unparseable_revenue",
    "negative_revenue",
)


class InputContractError(ValueError):
    """The raw input lacks a required column of the events contract."""


def _blank_to_null(column: Column) -> Column:
    trimmed = F.trim(column.cast("string"))
    return F.when(trimmed == "", None).otherwise(trimmed)


def _parse_timestamp(column: Column, data_type: T.DataType) -> Column:
    """Timestamps arrive typed, as epoch seconds, or as ISO-8601 strings."""
    if isinstance(data_type, (T.TimestampType, T.TimestampNTZType)):
        return column.cast("timestamp")
    if isinstance(data_type, (T.IntegralType, T.FloatType, T.DoubleType, T.DecimalType)):
        return F.timestamp_seconds(column.cast("double"))
    text = _blank_to_null(column)
    epoch = text.rlike(r"^-?[0-9]+(\.[0-9]+)?$")
    return F.when(epoch, F.timestamp_seconds(text.try_cast("double"))).otherwise(F.try_to_timestamp(text))


def normalize(raw: DataFrame) -> DataFrame:
    """Contract columns, trimmed and typed, beside the raw row as JSON (``raw``).

    Parsing failures become nulls here next to the original text (``*_text`` columns), so
    ``classify`` can tell a missing value from an unparseable one.
    """
    missing = [name for name in REQUIRED_COLUMNS if name not in raw.columns]
    if missing:
        raise InputContractError(
            f"input lacks required column(s) {', '.join(missing)}; found {', '.join(raw.columns) or 'none'}"
        )
    types = {field.name: field.dataType for field in raw.schema.fields}

    def text_of(name: str) -> Column:
        return _blank_to_null(F.col(name)) if name in types else F.lit(None).cast("string")

    def amount_of(name: str) -> Column:
        return text_of(name).try_cast("double")

    return raw.select(
        F.to_json(F.struct(*[F.col(name) for name in raw.columns])).alias("raw"),
        text_of("event_id").alias("event_id"),
        text_of("user_id").alias("user_id"),
        text_of("item_id").alias("item_id"),
        F.lower(text_of("event_type")).alias("event_type"),
        _parse_timestamp(F.col("event_ts"), types["event_ts"]).alias("event_ts"),
        text_of("event_ts").alias("event_ts_text"),
        amount_of("quantity").alias("quantity"),
        text_of("quantity").alias("quantity_text"),
        amount_of("revenue").alias("revenue"),
        text_of("revenue").alias("revenue_text"),
        text_of("campaign_id").alias("campaign_id"),
        text_of("channel").alias("channel"),
    )


def quarantine_reason(event_types: list[str], latest_allowed: datetime) -> Column:
    """The first quarantine reason that applies to a normalized row, or null for a valid row."""
    known = F.col("event_type").isin(list(event_types))
    checks = [
        (F.col("user_id").isNull(), "missing_user_id"),
        (F.col("item_id").isNull(), "missing_item_id"),
        (F.col("event_type").isNull(), "missing_event_type"),
        (~known, "unknown_event_type"),
        (F.col("event_ts_text").isNull(), "missing_event_ts"),
        (F.col("event_ts").isNull(), "unparseable_event_ts"),
        (F.col("event_ts") > F.lit(latest_allowed), "future_event_ts"),
        (F.col("quantity_text").isNotNull() & F.col("quantity").isNull(), "unparseable_quantity"),
        (F.col("quantity") < 0, "negative_quantity"),
        (F.col("revenue_text").isNotNull() & F.col("revenue").isNull(), "unparseable_revenue"),
        (F.col("revenue") < 0, "negative_revenue"),
    ]
    reason = F.lit(None).cast("string")
    for condition, name in reversed(checks):
        reason = F.when(condition, F.lit(name)).otherwise(reason)
    return reason


def row_hash(*columns: Column) -> Column:
    """A deterministic SHA-256 of the given columns; nulls hash differently from empty strings."""
    return F.sha2(F.concat_ws("\u0001", *[F.coalesce(c.cast("string"), F.lit("\u0000")) for c in columns]), 256)


def classify(normalized: DataFrame, event_types: list[str], latest_allowed: datetime) -> DataFrame:
    """Add ``reason`` (null when valid) and fill a missing ``event_id`` with a hash of the event."""
    event_hash = row_hash(
        F.col("user_id"), F.col("item_id"), F.col("event_type"),
        F.date_format(F.col("event_ts"), "yyyy-MM-dd'T'HH:mm:ss.SSSSSS"),
        F.col("quantity"), F.col("revenue"), F.col("campaign_id"), F.col("channel"),
    )
    return normalized.withColumn("reason", quarantine_reason(event_types, latest_allowed)).withColumn(
        "event_id", F.coalesce(F.col("event_id"), event_hash)
    )


def valid_events(classified: DataFrame, run_id: str) -> DataFrame:
    """The valid rows in the ``events`` table's columns, one row per ``event_id``."""
    return (
        classified.where(F.col("reason").isNull())
        .dropDuplicates(["event_id"])
        .withColumn("event_date", F.to_date("event_ts"))
        .select(*EVENT_COLUMNS, F.lit(run_id).alias("ingest_run_id"))
    )


def quarantined_rows(classified: DataFrame, run_id: str) -> DataFrame:
    """The rows that failed a check, as (raw, raw_hash, reason, ingest_run_id)."""
    return classified.where(F.col("reason").isNotNull()).select(
        "raw",
        F.sha2(F.col("raw"), 256).alias("raw_hash"),
        "reason",
        F.lit(run_id).alias("ingest_run_id"),
    )


def read_raw(reader, location: str, fmt: str, csv_delimiter: str = ","):
    """Read the raw clickstream from a path (csv, json, parquet, delta) or a catalog table.

    CSV is read with every column as a string so parsing (and its failures) happens in
    ``normalize``, not silently in the reader.
    """
    if fmt == "table":
        return reader.table(location)
    if fmt == "csv":
        return reader.option("header", "true").option("sep", csv_delimiter).option("inferSchema", "false").csv(location)
    if fmt == "json":
        # Typed JSON values (numbers) stay as they are; malformed lines come back in _corrupt_record.
        return reader.option("mode", "PERMISSIVE").json(location)
    if fmt in ("parquet", "delta"):
        return reader.format(fmt).load(location)
    raise ValueError(f"input.format must be csv, json, parquet, delta or table, got {fmt!r}")


def infer_format(location: str, has_delta_log: bool) -> str:
    """csv / json / parquet / delta / table from a location when input.format is not set."""
    lowered = location.lower().rstrip("/")
    for suffix, fmt in ((".csv", "csv"), (".csv.gz", "csv"), (".json", "json"), (".jsonl", "json"),
                        (".json.gz", "json"), (".parquet", "parquet")):
        if lowered.endswith(suffix):
            return fmt
    if has_delta_log:
        return "delta"
    if "/" not in location and "." in location:
        return "table"
    raise ValueError(
        f"cannot infer input.format from {location!r}: set input.format to csv, json, parquet, delta or table"
    )
