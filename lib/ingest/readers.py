"""Strict readers: every input record reaches ingest, the broken ones flagged instead of fixed or lost.

``read_raw`` returns the source's columns (strings for csv and json, the stored types for parquet,
delta and tables) beside these metadata columns:

- ``_raw``: the record as JSON (``events_quarantine.raw``);
- ``_raw_line``: the input line of a csv / json file (null for typed sources);
- ``_source_file``: the file the record came from;
- ``_read_error``: null, or ``invalid_encoding``, ``malformed_record``, ``malformed_json``;
- ``_read_detail``: what was wrong, for the quarantine's ``detail``.

CSV and JSON lines are read as raw text lines (``spark.read.text`` keeps the bytes), so a line with
bytes that are invalid in ``ingest.encoding`` is flagged rather than decoded to U+FFFD, a CSV line
with the wrong number of fields is flagged rather than padded or cut, and a bad JSON line (or one
with a duplicate key) is flagged while the other lines load. Blank lines are not records; a line
equal to the header (a header repeated by every file of a directory) is not a record either.
With ``ingest.csv_multiline`` quoted fields may span lines: Spark's CSV reader then splits the
records (see ``_read_csv_multiline`` for what it can and cannot check).
"""
from __future__ import annotations

import csv
from typing import Sequence

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

META_COLUMNS = ("_raw", "_raw_line", "_source_file", "_read_error", "_read_detail")
READ_REASONS = ("invalid_encoding", "malformed_record", "malformed_json")
LINE_AS_HEX = "; the line as hex: "  # in the detail of an invalid_encoding line, before its bytes
# A complete quoted CSV field (RFC 4180: a quote inside is doubled).
_QUOTED_FIELD = r'"(?:[^"]|"")*"'


class InputContractError(ValueError):
    """The raw input cannot be read as the events contract (a required column is missing, no header)."""


def _decoded(value: Column, encoding: str) -> Column:
    """The text of a raw line; invalid bytes shown as U+FFFD (the line is flagged, see ``_valid``)."""
    if encoding == "utf-8":
        return F.make_valid_utf8(value)
    return F.decode(value.cast("binary"), "ISO-8859-1")  # us-ascii is checked byte-wise in _valid


def _valid(value: Column, encoding: str) -> Column:
    """True when the raw line's bytes are valid in ``encoding``."""
    if encoding == "utf-8":
        return F.is_valid_utf8(value)
    if encoding == "us-ascii":
        return ~F.decode(value.cast("binary"), "ISO-8859-1").rlike("[^\\x00-\\x7F]")
    return F.lit(True)  # iso-8859-1: every byte is a character


def _text_lines(spark: SparkSession, location: str, encoding: str) -> DataFrame:
    """Non-blank lines as ``_line`` (text), ``_valid`` (encoding), ``_bad_hex`` (the bytes of an invalid line)."""
    lines = spark.read.text(location)
    value = F.col("value")
    return (
        lines.select(
            _decoded(value, encoding).alias("_line"),
            _valid(value, encoding).alias("_valid"),
            F.hex(value.cast("binary")).alias("_hex"),
            F.input_file_name().alias("_source_file"),
        )
        .where(F.trim(F.col("_line")) != "")
        .select("_line", "_valid", F.when(~F.col("_valid"), F.col("_hex")).alias("_bad_hex"), "_source_file")
    )


def _header_names(spark: SparkSession, location: str, encoding: str, sep: str) -> tuple[str, list[str]]:
    """The header line (its text) and its column names, from the first line of the input."""
    first = spark.read.text(location).limit(1).select(_decoded(F.col("value"), encoding)).collect()
    if not first or not first[0][0].strip():
        raise InputContractError(f"{location}: no header line (empty input)")
    line = first[0][0].lstrip("\ufeff")
    names = [name.strip() or f"_c{i}" for i, name in enumerate(next(csv.reader([line], delimiter=sep)))]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InputContractError(f"{location}: the header names column(s) {', '.join(twice)} more than once")
    return line, names


def _read_csv_lines(spark: SparkSession, location: str, sep: str, encoding: str) -> DataFrame:
    header, names = _header_names(spark, location, encoding, sep)
    lines = _text_lines(spark, location, encoding)
    line = F.regexp_replace(F.col("_line"), "^\ufeff", "")
    lines = lines.withColumn("_line", line).where(F.col("_line") != F.lit(header))
    # Fields = separators outside quoted fields + 1; a line with another count is malformed.
    n_fields = F.size(F.split(F.regexp_replace(F.col("_line"), _QUOTED_FIELD, ""), "\\Q" + sep + "\\E", -1))
    schema = T.StructType([T.StructField(f"_c{i}", T.StringType()) for i in range(len(names))])
    parsed = F.from_csv(F.col("_line"), schema.simpleString(), {"sep": sep, "quote": '"', "escape": '"',
                                                                  "mode": "PERMISSIVE"})
    bad_count = n_fields != len(names)
    # A quote opening a field that never closes: the record goes on past the line (csv_multiline).
    unclosed = F.regexp_replace(F.col("_line"), _QUOTED_FIELD, "").rlike("(^|\\Q" + sep + '\\E)"')
    error = (F.when(~F.col("_valid"), F.lit("invalid_encoding"))
             .when(unclosed | bad_count, F.lit("malformed_record")))
    detail = (F.when(~F.col("_valid"), F.concat(F.lit(f"bytes not valid {encoding}{LINE_AS_HEX}"),
                                                 F.col("_bad_hex")))
              .when(unclosed, F.lit("a quoted field does not close on this line (see ingest.csv_multiline)"))
              .when(bad_count, F.concat(F.lit(f"expected {len(names)} fields, found "),
                                         n_fields.cast("string"))))
    fields = [F.when(error.isNull(), F.col("_p")[f"_c{i}"]).alias(name) for i, name in enumerate(names)]
    return (
        lines.select("*", parsed.alias("_p"), error.alias("_read_error"), detail.alias("_read_detail"))
        .select(
            *fields,
            F.when(F.col("_read_error").isNull(), F.to_json(F.struct(*[F.col("_p")[f"_c{i}"].alias(name)
                                                                      for i, name in enumerate(names)])))
            .otherwise(F.to_json(F.struct(F.col("_line").alias("_line")))).alias("_raw"),
            F.col("_line").alias("_raw_line"), "_source_file", "_read_error", "_read_detail",
        )
    )


def _read_csv_multiline(spark: SparkSession, location: str, sep: str, encoding: str) -> DataFrame:
    """Spark's CSV reader with multiLine: a quoted field may span lines.

    A record with the wrong number of fields lands in the corrupt-record column (``malformed_record``).
    Spark decodes the bytes itself and puts U+FFFD where they are invalid, so here a record holding
    U+FFFD is flagged ``invalid_encoding`` (a U+FFFD that really is in the input is flagged too).
    """
    options = {"header": "true", "multiLine": "true", "sep": sep, "quote": '"', "escape": '"',
               "encoding": encoding.upper(), "mode": "PERMISSIVE"}
    names = spark.read.options(**options).csv(location).columns
    schema = T.StructType([T.StructField(name, T.StringType()) for name in names]
                          + [T.StructField("_corrupt_record", T.StringType())])
    df = spark.read.options(**options, columnNameOfCorruptRecord="_corrupt_record").schema(schema).csv(location)
    record = F.concat_ws(sep, *[F.coalesce(F.col(name), F.lit("")) for name in names])
    corrupt = F.col("_corrupt_record").isNotNull()
    replaced = F.coalesce(F.col("_corrupt_record"), record).contains("\ufffd")
    error = F.when(replaced, F.lit("invalid_encoding")).when(corrupt, F.lit("malformed_record"))
    detail = (F.when(replaced, F.lit(f"bytes not valid {encoding} (decoded to U+FFFD)"))
              .when(corrupt, F.lit(f"expected {len(names)} fields")))
    return df.select(
        *[F.when(error.isNull(), F.col(name)).alias(name) for name in names],
        F.when(corrupt, F.to_json(F.struct(F.col("_corrupt_record").alias("_line"))))
        .otherwise(F.to_json(F.struct(*[F.col(name) for name in names]))).alias("_raw"),
        F.col("_corrupt_record").alias("_raw_line"),
        F.input_file_name().alias("_source_file"),
        error.alias("_read_error"), detail.alias("_read_detail"),
    )


def _read_json_lines(spark: SparkSession, location: str, encoding: str, columns: Sequence[str]) -> DataFrame:
    """JSON lines: each line one object; a line that is not one (or repeats a key) is ``malformed_json``.

    Values come back as text (numbers as written, nested values as JSON), so typing happens in
    ingest. Every name in ``columns`` becomes a column (null where a line lacks the key).
    """
    lines = _text_lines(spark, location, encoding)
    keys = F.json_object_keys(F.col("_line"))
    repeated = F.size(keys) != F.size(F.array_distinct(keys))
    parsed = F.when(keys.isNotNull() & ~repeated, F.from_json(F.col("_line"), "map<string,string>"))
    lines = lines.select("*", keys.alias("_keys"), parsed.alias("_m"))
    error = (F.when(~F.col("_valid"), F.lit("invalid_encoding"))
             .when(F.col("_keys").isNull() | F.col("_m").isNull(), F.lit("malformed_json")))
    detail = (F.when(~F.col("_valid"), F.concat(F.lit(f"bytes not valid {encoding}{LINE_AS_HEX}"),
                                                 F.col("_bad_hex")))
              .when(F.col("_keys").isNull(), F.lit("not one JSON object"))
              .when(F.size(F.col("_keys")) != F.size(F.array_distinct(F.col("_keys"))),
                    F.lit("a key appears more than once"))
              .when(F.col("_m").isNull(), F.lit("not one JSON object")))
    return lines.select(
        *[F.when(error.isNull(), F.try_element_at(F.col("_m"), F.lit(name))).alias(name) for name in columns],
        F.when(error.isNull(), F.to_json(F.col("_m")))
        .otherwise(F.to_json(F.struct(F.col("_line").alias("_line")))).alias("_raw"),
        F.col("_line").alias("_raw_line"), "_source_file", error.alias("_read_error"),
        detail.alias("_read_detail"),
    )


def with_meta(df: DataFrame) -> DataFrame:
    """A typed frame (parquet, delta, a table, or built in code) with ``META_COLUMNS``: nothing to flag."""
    return df.select(
        "*",
        F.to_json(F.struct(*[F.col(f"`{name}`") for name in df.columns])).alias("_raw"),
        F.lit(None).cast("string").alias("_raw_line"),
        F.input_file_name().alias("_source_file"),
        F.lit(None).cast("string").alias("_read_error"),
        F.lit(None).cast("string").alias("_read_detail"),
    )


def read_raw(spark: SparkSession, location: str, fmt: str, *, csv_delimiter: str = ",",
             csv_multiline: bool = False, encoding: str = "utf-8", json_columns: Sequence[str] = ()) -> DataFrame:
    """Read the raw clickstream (csv, json lines, parquet, delta, or a catalog table) with ``META_COLUMNS``.

    ``json_columns``: the keys a JSON line is read for (the other keys stay in ``_raw``).
    """
    if fmt == "csv":
        if csv_multiline:
            return _read_csv_multiline(spark, location, csv_delimiter, encoding)
        return _read_csv_lines(spark, location, csv_delimiter, encoding)
    if fmt == "json":
        return _read_json_lines(spark, location, encoding, json_columns)
    if fmt == "table":
        return with_meta(spark.read.table(location))
    if fmt in ("parquet", "delta"):
        return with_meta(spark.read.format(fmt).load(location))
    raise ValueError(f"input.format must be csv, json, parquet, delta or table, got {fmt!r}")


def infer_format(location: str, has_delta_log: bool) -> str:
    """csv / json / parquet / delta / table from a location when input.format is not set."""
    lowered = location.lower().rstrip("/")
    for suffix, fmt in ((".csv", "csv"), (".csv.gz", "csv"), (".tsv", "csv"), (".json", "json"), (".jsonl", "json"),
                        (".json.gz", "json"), (".jsonl.gz", "json"), (".parquet", "parquet")):
        if lowered.endswith(suffix):
            return fmt
    if has_delta_log:
        return "delta"
    if "/" not in location and "." in location:
        return "table"
    raise ValueError(
        f"cannot infer input.format from {location!r}: set input.format to csv, json, parquet, delta or table"
    )
