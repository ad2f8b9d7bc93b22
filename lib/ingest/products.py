"""The optional product catalog (``input.items``): validation into ``products``, and which items may be
recommended.

Catalog columns: ``item_id`` (required), ``name``, ``category``, ``price``, ``available``,
``recommendable`` (optional; an absent flag column means true for every row). CSV is read with
every column as text; parquet / delta / table columns may already be typed.

Validation (``validate_products``) never drops a row silently and never lets a doubtful product
into a list:

- a row without an item_id cannot describe anything: it goes to ``products_quarantine``
  (``missing_item_id``) and nowhere else;
- a row whose price is not a number (``bad_price``) or negative (``negative_price``), or whose
  available / recommendable is not a boolean (``bad_available``, ``bad_recommendable``) is
  quarantined with that reason AND still describes its item, conservatively: a bad price becomes
  null, a bad flag becomes false (not recommendable);
- every row of an item_id listed more than once is quarantined (``duplicate_item_id``) and the item
  gets one ``products`` row: a flag is true only when every copy says true, name / category / price
  only when every copy agrees.

So every usable item_id has exactly one ``products`` row, and every row with a problem is in
``products_quarantine`` with its reason. A missing item_id column stops the stage naming the
column and the file.

A catalog from the events (``catalog_from_events``): when the event file carries product attributes
on every line (``input.item_columns``: invoice lines' description and unit price, a clickstream's
category code and price), each item of the valid events gets one raw catalog row holding, per
attribute, its value on the item's latest event that gives one; items whose events give differing
values are counted per attribute. That row goes through the same validation; ``merge_catalogs``
lets a catalog file's row win over the derived one, and keeps items a nightly file no longer holds.

Which items may be recommended (``excluded_items`` / ``recommendable_items``): an item is excluded
when its catalog row says available = false or recommendable = false, or when its item_id matches
one of ``products.exclude_item_patterns`` (regular expressions matched against the whole id, e.g.
POST, DOT, M: postage, fees, manual adjustments, gift cards), or when its catalog category matches one
of ``products.exclude_categories`` (a grocer's fuel and coupon lines). Items the catalog does not list
are recommendable unless a pattern matches, so everything works without a catalog.
"""
from __future__ import annotations

from typing import Sequence

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib.ingest import readers
from lib.ingest.sources import clean_id

TRUE_TEXT = ("true", "t", "yes", "y", "1")
FALSE_TEXT = ("false", "f", "no", "n", "0")


class CatalogError(ValueError):
    """The product catalog cannot be read as a catalog (no item_id column, unknown format)."""


def infer_format(location: str, has_delta_log: bool) -> str:
    """csv / json / parquet / delta / table from a location when ``products.format`` is empty
    (the same rules as the clickstream's, ``lib.ingest.readers.infer_format``)."""
    try:
        return readers.infer_format(location, has_delta_log)
    except ValueError:
        raise CatalogError(f"cannot infer the format of input.items {location!r}: set products.format to csv, "
                           "json, parquet, delta or table") from None


def read_catalog(spark: SparkSession, location: str, fmt: str, csv_delimiter: str = ",",
                 columns: dict[str, str] | None = None) -> DataFrame:
    """The raw catalog with a ``_source_file`` column; CSV columns all text (parsed in validation).
    ``columns`` (file column -> catalog column, ``products.columns``) renames the file's columns."""
    if fmt == "csv":
        raw = (spark.read.option("header", "true").option("sep", csv_delimiter).option("inferSchema", "false")
               .option("mode", "PERMISSIVE").csv(location))
    elif fmt == "json":
        raw = spark.read.option("mode", "PERMISSIVE").json(location)
    elif fmt == "table":
        raw = spark.read.table(location)
    elif fmt in ("parquet", "delta"):
        raw = spark.read.format(fmt).load(location)
    else:
        raise CatalogError(f"products.format must be csv, json, parquet, delta or table, got {fmt!r}")
    missing = sorted(set(columns or {}) - set(raw.columns))
    if missing:
        raise CatalogError(f"input.items {location}: products.columns names {', '.join(missing)}, not in the "
                           f"catalog (columns: {', '.join(raw.columns)})")
    taken = sorted(set((columns or {}).values()) & (set(raw.columns) - set(columns or {})))
    if taken:
        raise CatalogError(f"input.items {location}: products.columns maps onto {', '.join(taken)}, which the "
                           "catalog already has (map that column too, or leave it)")
    raw = raw.withColumnsRenamed(columns or {})
    source = F.input_file_name() if fmt != "table" else F.lit(location)
    return raw.withColumn("_source_file", F.when(source != "", source).otherwise(F.lit(location)))


def _text(column: Column) -> Column:
    trimmed = F.trim(column.cast("string"))
    return F.when(trimmed != "", trimmed)


def _flag(raw: DataFrame, name: str) -> tuple[Column, Column]:
    """(the flag as a boolean: absent / blank = true, unreadable = false; True when unreadable)."""
    if name not in raw.columns:
        return F.lit(True), F.lit(False)
    if isinstance(raw.schema[name].dataType, T.BooleanType):
        return F.coalesce(F.col(name), F.lit(True)), F.lit(False)
    text = F.lower(_text(F.col(name)))
    readable = text.isNull() | text.isin(*TRUE_TEXT, *FALSE_TEXT)
    value = F.when(text.isNull(), F.lit(True)).when(text.isin(*TRUE_TEXT), F.lit(True)).otherwise(F.lit(False))
    return value, ~readable


def _price(raw: DataFrame) -> tuple[Column, Column, Column]:
    """(price as a double or null, True when given but not a number, True when negative)."""
    if "price" not in raw.columns:
        return F.lit(None).cast("double"), F.lit(False), F.lit(False)
    text = _text(F.col("price"))
    number = text.try_cast("double") if hasattr(text, "try_cast") else F.expr("try_cast(trim(price) AS double)")
    bad = text.isNotNull() & number.isNull()
    negative = number < 0
    return F.when(~bad & ~F.coalesce(negative, F.lit(False)), number), bad, F.coalesce(negative, F.lit(False))


def validate_products(raw: DataFrame, location: str, run_id: str) -> tuple[DataFrame, DataFrame]:
    """(products, quarantine) from a raw catalog (see the module doc for the rules).

    ``products``: item_id, name, category, price, available, recommendable, run_id (one row per item_id).
    ``quarantine``: raw (the row as JSON), reason, detail, source_file, run_id.
    """
    if "item_id" not in raw.columns:
        columns = ", ".join(c for c in raw.columns if c != "_source_file")
        raise CatalogError(f"input.items {location}: the catalog has no item_id column (columns: {columns})")
    data_columns = [c for c in raw.columns if c not in ("_source_file", "_corrupt_record")]
    available, bad_available = _flag(raw, "available")
    recommendable, bad_recommendable = _flag(raw, "recommendable")
    price, bad_price, negative_price = _price(raw)
    rows = raw.select(
        clean_id(F.col("item_id")).alias("item_id"),
        (_text(F.col("name")) if "name" in raw.columns else F.lit(None).cast("string")).alias("name"),
        (_text(F.col("category")) if "category" in raw.columns else F.lit(None).cast("string")).alias("category"),
        price.alias("price"), available.alias("available"), recommendable.alias("recommendable"),
        bad_price.alias("_bad_price"), negative_price.alias("_negative_price"),
        bad_available.alias("_bad_available"), bad_recommendable.alias("_bad_recommendable"),
        F.to_json(F.struct(*[F.col(f"`{c}`") for c in data_columns])).alias("_raw"),
        F.col("_source_file"),
        F.count(F.lit(1)).over(_by_id()).alias("_copies"),
    ).cache()

    reason = (F.when(F.col("item_id").isNull(), F.lit("missing_item_id"))
              .when(F.col("_copies") > 1, F.lit("duplicate_item_id"))
              .when(F.col("_bad_price"), F.lit("bad_price"))
              .when(F.col("_negative_price"), F.lit("negative_price"))
              .when(F.col("_bad_available"), F.lit("bad_available"))
              .when(F.col("_bad_recommendable"), F.lit("bad_recommendable")))
    detail = (F.when(F.col("item_id").isNull(), F.lit("item_id is missing or blank"))
              .when(F.col("_copies") > 1, F.format_string("item_id %s is listed %d times", "item_id", "_copies"))
              .when(F.col("_bad_price") | F.col("_negative_price"), F.lit("price must be a number >= 0"))
              .when(F.col("_bad_available"), F.lit("available must be true or false (yes/no, 1/0)"))
              .when(F.col("_bad_recommendable"), F.lit("recommendable must be true or false (yes/no, 1/0)")))
    quarantine = rows.withColumn("reason", reason).where(F.col("reason").isNotNull()).select(
        F.col("_raw").alias("raw"), "reason", detail.alias("detail"), F.col("_source_file").alias("source_file"),
        F.lit(run_id).alias("run_id"))

    def agreed(name: str) -> Column:
        return F.when(F.min(name).eqNullSafe(F.max(name)) & (F.count(name) == F.count(F.lit(1))), F.min(name))

    products = rows.where(F.col("item_id").isNotNull()).groupBy("item_id").agg(
        agreed("name").alias("name"), agreed("category").alias("category"), agreed("price").alias("price"),
        F.bool_and("available").alias("available"), F.bool_and("recommendable").alias("recommendable"),
    ).withColumn("run_id", F.lit(run_id))
    return products, quarantine


def catalog_from_events(events: DataFrame, attributes: Sequence[str]) -> DataFrame:
    """A raw catalog (item_id, one text column per attribute, ``_source_file``) from classified events
    (``lib.ingest.events.classify`` with the attribute columns kept): one row per item of the valid
    events, each attribute's value from the item's latest event that gives one (ties: the greatest
    value), and ``_conflicts_<attribute>`` true when the item's events give more than one value."""
    valid = events.where(F.col("reason").isNull() & F.col("item_id").isNotNull())
    aggregates = [F.min("source_file").alias("_source_file")]
    for name in attributes:
        value = _text(F.col(name))
        latest = F.max(F.when(value.isNotNull(), F.struct(F.col("event_ts").alias("ts"), value.alias("value"))))
        aggregates += [latest.getField("value").alias(name),
                       (F.count_distinct(value) > 1).alias(f"_conflicts_{name}")]
    return valid.groupBy("item_id").agg(*aggregates)


def merge_catalogs(preferred: DataFrame, fallback: DataFrame) -> DataFrame:
    """``preferred``'s rows, and ``fallback``'s rows for the item_ids ``preferred`` lacks (same columns)."""
    return preferred.unionByName(fallback.join(preferred.select("item_id"), "item_id", "left_anti"))


def _by_id():
    from pyspark.sql import Window

    return Window.partitionBy("item_id")


def _pattern_regex(patterns: Sequence[str]) -> str:
    """One Java regex matching an item_id that any pattern matches in full."""
    return "^(?:" + "|".join(f"(?:{p})" for p in patterns) + ")$"


def excluded_items(products: DataFrame | None, item_ids: DataFrame, patterns: Sequence[str],
                   categories: Sequence[str] = ()) -> DataFrame:
    """(item_id, reason): the items of ``item_ids`` (an item_id column) and of ``products`` never to
    recommend: ``pattern`` (item_id matches one of ``patterns`` in full), ``category`` (the catalog
    category, trimmed, matches one of ``categories`` in full), ``unavailable`` (available = false) or
    ``not_recommendable`` (recommendable = false); the first that applies.

    ``products`` may be None (no catalog): then only the patterns apply. Small: one row per excluded item.
    """
    ids = item_ids.select("item_id")
    if products is not None:
        ids = ids.unionByName(products.select("item_id"))
    ids = ids.distinct()
    pattern_hit = F.col("item_id").rlike(_pattern_regex(patterns)) if patterns else F.lit(False)
    if products is not None:
        flags = products.select("item_id", F.col("available").alias("_available"),
                                F.col("recommendable").alias("_recommendable"),
                                F.trim("category").alias("_category"))
        ids = ids.join(flags, "item_id", "left")
    else:
        ids = ids.withColumn("_available", F.lit(None).cast("boolean")) \
            .withColumn("_recommendable", F.lit(None).cast("boolean")) \
            .withColumn("_category", F.lit(None).cast("string"))
    category_hit = F.coalesce(F.col("_category").rlike(_pattern_regex(categories)), F.lit(False)) \
        if categories else F.lit(False)
    reason = (F.when(pattern_hit, F.lit("pattern"))
              .when(category_hit, F.lit("category"))
              .when(F.col("_available") == F.lit(False), F.lit("unavailable"))
              .when(F.col("_recommendable") == F.lit(False), F.lit("not_recommendable")))
    return ids.withColumn("reason", reason).where(F.col("reason").isNotNull()).select("item_id", "reason")


def recommendable_items(products: DataFrame | None, item_ids: DataFrame, patterns: Sequence[str],
                        categories: Sequence[str] = ()) -> DataFrame:
    """(item_id): the items of ``item_ids`` that may appear in a list (``excluded_items`` removed)."""
    excluded = excluded_items(products, item_ids, patterns, categories)
    return item_ids.select("item_id").distinct().join(excluded, "item_id", "left_anti")
