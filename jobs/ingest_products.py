"""Validate the product catalog into products; problem rows go to products_quarantine.

The catalog comes from input.items (a catalog file or table), from the product attributes the event
file carries on every line (input.item_columns), or both: a catalog file's row wins over the one derived
from the events. With input.items empty, items derived in earlier runs that this event file no longer
holds keep their rows (a nightly file holds only the day's items). With neither set it writes nothing
and says so: the catalog is optional and recommend_items runs without it.
"""
from __future__ import annotations

import logging

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.common import StageContext, ingest_rules, main_for, read_events_input
from lib.ingest import events as ingest
from lib.ingest.products import (catalog_from_events, infer_format, merge_catalogs, read_catalog,
                                 validate_products)
from lib.platform import catalog as C
from lib.platform.runs import StageResult
from lib.platform.storage import is_delta_path

log = logging.getLogger("jobs.ingest_products")


def from_catalog_file(ctx: StageContext) -> tuple[DataFrame, DataFrame, int, str]:
    """(products, quarantine, rows read, description) of the catalog at input.items."""
    location = ctx.settings.input.items
    fmt = ctx.settings.products.format or infer_format(location, "/" in location and is_delta_path(ctx.spark, location))
    raw = read_catalog(ctx.spark, location, fmt, columns=ctx.settings.products.columns)
    products, quarantine = validate_products(raw, location, ctx.run_id)
    return products, quarantine, raw.count(), f"{location} ({fmt})"


def from_events(ctx: StageContext) -> tuple[DataFrame, DataFrame, dict[str, int], str]:
    """(products, quarantine, counts, description) derived from the event file's input.item_columns."""
    item_columns = ctx.settings.input.item_columns
    raw, location, fmt = read_events_input(ctx)
    classified = ingest.classify(ingest.normalize(raw, ctx.settings.input, keep=item_columns),
                                 ingest_rules(ctx.settings))
    attributes = list(item_columns.values())
    derived = catalog_from_events(classified, attributes).localCheckpoint(eager=True)
    flags = [f"_conflicts_{name}" for name in attributes]
    totals = derived.agg(F.count(F.lit(1)).alias("items"),
                         *[F.sum(F.col(flag).cast("long")).alias(flag) for flag in flags]).first()
    counts = {"items_from_events": int(totals["items"])}
    counts.update({f"attribute_conflicts.{name}": int(totals[f"_conflicts_{name}"] or 0) for name in attributes})
    products, quarantine = validate_products(derived.drop(*flags), location, ctx.run_id)
    return products, quarantine, counts, f"{', '.join(attributes)} of {location} ({fmt})"


def run(ctx: StageContext) -> StageResult:
    source = ctx.settings.input
    if not source.items and not source.item_columns:
        message = ("input.items and input.item_columns are empty: no product catalog, products not written "
                   "(lists use only exclude_item_patterns)")
        log.info("%s", message)
        return StageResult(rows_in=0, rows_out=0, message=message)
    spark, tables = ctx.spark, ctx.tables
    counts: dict[str, int] = {}
    parts, rows_in, described = [], 0, []
    if source.items:
        products, quarantine, rows, description = from_catalog_file(ctx)
        parts.append((products, quarantine))
        rows_in += rows
        described.append(description)
    if source.item_columns:
        products, quarantine, derived_counts, description = from_events(ctx)
        parts.append((products, quarantine))
        rows_in += derived_counts["items_from_events"]
        counts.update(derived_counts)
        described.append(description)
    products, quarantine = parts[0]
    for more_products, more_quarantine in parts[1:]:
        products = merge_catalogs(products, more_products)
        quarantine = quarantine.unionByName(more_quarantine)
    products = products.withColumn("_kept", F.lit(False))
    if not source.items and tables.exists(spark, C.PRODUCTS):  # a nightly file forgets no item
        products = merge_catalogs(products, tables.read(spark, C.PRODUCTS).withColumn("_kept", F.lit(True)))
    products = products.localCheckpoint(eager=True)
    quarantine = quarantine.localCheckpoint(eager=True)
    counts.update({f"quarantined_{row['reason']}": int(row["n"])
                   for row in quarantine.groupBy("reason").agg(F.count(F.lit(1)).alias("n")).collect()})
    flags = products.agg(F.count(F.lit(1)).alias("items"),
                         F.sum((~F.col("available")).cast("long")).alias("unavailable"),
                         F.sum((~F.col("recommendable")).cast("long")).alias("not_recommendable"),
                         F.sum(F.col("_kept").cast("long")).alias("kept")).first()
    if not source.items:
        counts["items_kept_from_earlier_runs"] = int(flags["kept"] or 0)
    products = products.drop("_kept")
    tables.overwrite(products, C.PRODUCTS)
    tables.overwrite(quarantine, C.PRODUCTS_QUARANTINE)
    counts.update({"items": int(flags["items"]), "unavailable": int(flags["unavailable"] or 0),
                   "not_recommendable": int(flags["not_recommendable"] or 0)})
    quarantined = sum(v for k, v in counts.items() if k.startswith("quarantined_"))
    message = (f"{'; '.join(described)}: {counts['items']} items, {quarantined} rows quarantined; "
               f"{counts['unavailable']} unavailable, {counts['not_recommendable']} not recommendable")
    return StageResult(rows_in=rows_in, rows_out=counts["items"], message=message, counts=counts)


if __name__ == "__main__":
    main_for("ingest_products")
