"""Validate the optional product catalog (input.items) into products; problem rows go to products_quarantine.

Reads the catalog file or table only (nothing the pipeline writes). With input.items empty it writes
nothing and says so: the catalog is optional and recommend_items runs without it.
"""
from __future__ import annotations

import logging

from pyspark.sql import functions as F

from jobs.common import StageContext, main_for
from lib.ingest.products import infer_format, read_catalog, validate_products
from lib.platform import catalog as C
from lib.platform.runs import StageResult
from lib.platform.storage import is_delta_path

log = logging.getLogger("jobs.ingest_products")


def run(ctx: StageContext) -> StageResult:
    location = ctx.settings.input.items
    if not location:
        message = "input.items is empty: no product catalog, products not written (lists use only exclude_item_patterns)"
        log.info("%s", message)
        return StageResult(rows_in=0, rows_out=0, message=message)
    spark, tables = ctx.spark, ctx.tables
    fmt = ctx.settings.products.format or infer_format(location, "/" in location and is_delta_path(spark, location))
    raw = read_catalog(spark, location, fmt, columns=ctx.settings.products.columns)
    products, quarantine = validate_products(raw, location, ctx.run_id)
    products = products.localCheckpoint(eager=True)
    quarantine = quarantine.localCheckpoint(eager=True)
    counts = {f"quarantined_{row['reason']}": int(row["n"])
              for row in quarantine.groupBy("reason").agg(F.count(F.lit(1)).alias("n")).collect()}
    flags = products.agg(F.count(F.lit(1)).alias("items"),
                         F.sum((~F.col("available")).cast("long")).alias("unavailable"),
                         F.sum((~F.col("recommendable")).cast("long")).alias("not_recommendable")).first()
    rows_in = raw.count()
    tables.overwrite(products, C.PRODUCTS)
    tables.overwrite(quarantine, C.PRODUCTS_QUARANTINE)
    counts.update({"items": int(flags["items"]), "unavailable": int(flags["unavailable"] or 0),
                   "not_recommendable": int(flags["not_recommendable"] or 0)})
    quarantined = sum(v for k, v in counts.items() if k.startswith("quarantined_"))
    message = (f"{location} ({fmt}): {counts['items']} items, {quarantined} rows quarantined; "
               f"{counts['unavailable']} unavailable, {counts['not_recommendable']} not recommendable")
    return StageResult(rows_in=rows_in, rows_out=counts["items"], message=message, counts=counts)


if __name__ == "__main__":
    main_for("ingest_products")
