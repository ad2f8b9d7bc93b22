"""Source mapping: a source's own shape (column names, event names, time unit or format) to the contract.

``[input]`` in the configuration describes the source (docs/ingest.md); the presets in
``conf/sources/`` describe common public dataset shapes. Everything here builds Columns from the
raw frame; nothing is collected.
"""
from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib.platform.settings import InputSettings

UNIT_FACTORS = {"s": 1.0, "ms": 1e3, "us": 1e6}
# Leading or trailing Unicode whitespace, separators, control and format characters (tab, NBSP,
# zero-width space, BOM, NUL, ...).
_EDGE_JUNK = r"^[\s\p{Z}\p{Cc}\p{Cf}]+|[\s\p{Z}\p{Cc}\p{Cf}]+$"
# Ids (docs/ingest.md, "Ids"): any whitespace or Unicode space / separator inside becomes a plain space,
# control and format characters are removed, so "u\u00a01" and "u 1", "u\u200b1" and "u1" are one id.
_ID_SPACE = r"[\s\p{Z}]"
_ID_INVISIBLE = r"[\p{Cc}\p{Cf}]"
_NUMBER = r"^[+-]?[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?$"
_FLOAT_INTEGER = r"^([+-]?[0-9]+)\.0+$"
# Epoch seconds Spark timestamps can hold (0001-01-01 .. 9999-12-31).
_MIN_SECONDS, _MAX_SECONDS = -62135596800.0, 253402300799.0


def clean(column: Column) -> Column:
    """Text trimmed of edge whitespace and control characters; null when nothing is left."""
    trimmed = F.regexp_replace(column.cast("string"), _EDGE_JUNK, "")
    return F.when(trimmed != "", trimmed)


def clean_id(column: Column) -> Column:
    """An id by the rule of docs/ingest.md ("Ids"), trimmed of plain spaces; null when nothing is left.
    Every input of customer or item ids (events, suppression lists, erasure requests, the catalog) uses it."""
    spaced = F.regexp_replace(column.cast("string"), _ID_SPACE, " ")
    text = F.trim(F.regexp_replace(spaced, _ID_INVISIBLE, ""))
    return F.when(text != "", text)


def given(column: Column) -> Column:
    """True when the input held any characters at all (even only whitespace)."""
    return F.coalesce(column.cast("string") != "", F.lit(False))


def column_of(raw: DataFrame, name: str) -> Column:
    """An input column by name, or a null string when the input lacks it."""
    return F.col(f"`{name}`") if name in raw.columns else F.lit(None).cast("string")


def type_of(raw: DataFrame, name: str) -> T.DataType:
    return raw.schema[name].dataType if name in raw.columns else T.StringType()


def id_text(raw: DataFrame, name: str, source: InputSettings) -> Column:
    """An id by ``clean_id``; with ``input.float_ids_as_int`` a float-looking integer ("17850.0") loses its ".0"."""
    column, data_type = column_of(raw, name), type_of(raw, name)
    if source.float_ids_as_int and isinstance(data_type, (T.FloatType, T.DoubleType, T.DecimalType)):
        whole = column == F.floor(column)
        return clean_id(F.when(whole, column.cast("decimal(38,0)").cast("string")).otherwise(column.cast("string")))
    text = clean_id(column)
    if source.float_ids_as_int:
        text = F.regexp_replace(text, _FLOAT_INTEGER, "$1")
    return text


def event_type_of(raw: DataFrame, source: InputSettings) -> tuple[Column, Column]:
    """(the event type after ``input.event_type_map``, lower-cased; the input's text of it)."""
    if source.event_type:
        fixed = F.lit(source.event_type.strip().lower())
        return fixed, fixed
    text = F.lower(clean(column_of(raw, source.source_names["event_type"])))
    if not source.event_type_map:
        return text, text
    pairs = []
    for key, value in sorted(source.event_type_map.items()):
        pairs += [F.lit(key.strip().lower()), F.lit(value.strip().lower())]
    return F.coalesce(F.create_map(*pairs)[text], text), text


def revenue_text(raw: DataFrame, source: InputSettings) -> Column:
    """Revenue as text: the input column, or the product of ``input.revenue_product``'s columns.

    A product is null when a factor is missing and the factors' text joined by '*' when one does
    not parse (so ingest quarantines it as unparseable_revenue).
    """
    if not source.revenue_product:
        return clean(column_of(raw, source.source_names["revenue"]))
    texts = [clean(column_of(raw, name)) for name in source.revenue_product]
    numbers = [text.try_cast("double") for text in texts]
    product = numbers[0]
    for number in numbers[1:]:
        product = product * number
    any_missing = F.greatest(*[text.isNull() for text in texts]) if len(texts) > 1 else texts[0].isNull()
    all_parse = F.least(*[n.isNotNull() for n in numbers]) if len(numbers) > 1 else numbers[0].isNotNull()
    return (F.when(any_missing, F.lit(None).cast("string"))
            .when(all_parse, product.cast("string"))
            .otherwise(F.concat_ws("*", *texts)))


def epoch_number(column: Column, data_type: T.DataType) -> Column:
    """The numeric value of an event time given as a number (typed or as text), else null."""
    if isinstance(data_type, (T.IntegralType, T.FloatType, T.DoubleType, T.DecimalType)):
        return column.cast("double")
    if isinstance(data_type, (T.TimestampType, T.TimestampNTZType, T.DateType)):
        return F.lit(None).cast("double")
    text = clean(column)
    return F.when(text.rlike(_NUMBER), text.try_cast("double"))


def event_seconds(raw: DataFrame, source: InputSettings) -> tuple[Column, Column, Column]:
    """(epoch seconds as a double, the epoch number when the input was numeric, the input's text).

    Typed timestamps are taken as they are; numbers are epoch values in ``input.timestamp_unit``;
    strings are parsed with ``input.timestamp_format`` when set (numbers still count as epoch
    values), else as ISO-8601 (an offset or zone is honoured, none means UTC).
    """
    name = source.source_names["event_ts"]
    column, data_type = column_of(raw, name), type_of(raw, name)
    text = clean(column)
    number = epoch_number(column, data_type)
    from_number = number / F.lit(UNIT_FACTORS[source.timestamp_unit])
    if isinstance(data_type, (T.TimestampType, T.TimestampNTZType, T.DateType)):
        return F.unix_micros(column.cast("timestamp")) / F.lit(1e6), number, text
    if isinstance(data_type, (T.IntegralType, T.FloatType, T.DoubleType, T.DecimalType)):
        return from_number, number, text
    if source.timestamp_format:
        parsed = F.try_to_timestamp(text, F.lit(source.timestamp_format))
    else:
        parsed = F.try_to_timestamp(text)
    from_text = F.unix_micros(parsed) / F.lit(1e6)
    if source.timestamp_format:
        return F.coalesce(from_text, from_number), number, text
    return F.coalesce(from_number, from_text), number, text


def timestamp_of(seconds: Column) -> Column:
    """A timestamp from epoch seconds, null outside what a timestamp can hold."""
    micros = F.round(seconds * F.lit(1e6)).cast("long")
    return F.when((seconds >= _MIN_SECONDS) & (seconds <= _MAX_SECONDS), F.timestamp_micros(micros))
