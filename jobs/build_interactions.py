"""Build ``interactions`` (weighted, decayed user-item scores) and the stable ``user_index`` / ``item_index``."""
from __future__ import annotations

import logging

from pyspark.sql import functions as F

from jobs.common import StageContext, main_for
from lib.features.interactions import grow_index, resolve_as_of, score_events, to_matrix_entries
from lib.platform import catalog as C
from lib.platform.runs import StageResult

log = logging.getLogger("jobs.build_interactions")


def run(ctx: StageContext) -> StageResult:
    settings = ctx.settings.interactions
    spark, tables = ctx.spark, ctx.tables
    tables.require(spark, C.EVENTS, "ingest")
    # One snapshot of events for the whole stage: a concurrent ingest must not change what is counted.
    events = tables.read(spark, C.EVENTS, tables.version(spark, C.EVENTS))

    as_of = resolve_as_of(settings.as_of_utc, events, tables.location(C.EVENTS))
    log.info("scoring events as of %s, half-life %.1f days", as_of.isoformat(), settings.half_life_days)

    scored = score_events(events, settings.weights, settings.half_life_days, as_of).persist()
    partitions = ctx.settings.spark.shuffle_partitions
    for table, id_col, idx_col in ((C.USER_INDEX, "user_id", "user_idx"), (C.ITEM_INDEX, "item_id", "item_idx")):
        added = grow_index(spark, tables, table, scored.select(id_col), id_col, idx_col, partitions)
        log.info("%s: %d new ids added", table.name, added)

    user_index, item_index = tables.read(spark, C.USER_INDEX), tables.read(spark, C.ITEM_INDEX)
    tables.overwrite(to_matrix_entries(scored, user_index, item_index), C.INTERACTIONS)
    scored.unpersist()

    written = tables.read(spark, C.INTERACTIONS).agg(
        F.count(F.lit(1)).alias("entries"), F.sum("n_events").alias("events_used"),
        F.countDistinct("user_idx").alias("users"), F.countDistinct("item_idx").alias("items"),
    ).first()
    snapshot = events.agg(F.count(F.lit(1)).alias("rows"),
                          F.sum(F.when(F.col("event_ts") <= F.lit(as_of), 1).otherwise(0)).alias("until_as_of")).first()
    rows_in, used = int(snapshot["rows"]), int(written["events_used"] or 0)
    if used != int(snapshot["until_as_of"] or 0):  # every event up to as_of lands in exactly one entry
        raise ValueError(f"interactions count {used} events but events holds {snapshot['until_as_of']} up to "
                         f"{as_of.isoformat()}: ids are missing from user_index / item_index")
    counts = {"users": int(written["users"]), "items": int(written["items"]), "events_used": used,
              "events_after_as_of": rows_in - used}
    return StageResult(rows_in=rows_in, rows_out=int(written["entries"]), counts=counts,
                       message=f"as_of={as_of.isoformat()}")


if __name__ == "__main__":
    main_for("build_interactions")
