"""Build ``interactions`` (weighted, decayed user-item scores) and the stable ``user_index`` / ``item_index``."""
from __future__ import annotations

import logging
from datetime import timezone

from pyspark.sql import functions as F

from jobs.common import StageContext, main_for
from lib import catalog as C
from lib.interactions import index_additions, score_events, to_matrix_entries
from lib.runs import StageResult

log = logging.getLogger("jobs.build_interactions")


def run(ctx: StageContext) -> StageResult:
    settings = ctx.settings.interactions
    spark, tables = ctx.spark, ctx.tables
    events = tables.require(spark, C.EVENTS, "ingest")

    as_of = settings.as_of_utc
    if as_of is None:
        latest = events.agg(F.max("event_ts")).first()[0]
        if latest is None:
            raise ValueError(f"table {tables.location(C.EVENTS)} is empty: ingest kept no event "
                             "(see events_quarantine and the ingest row of pipeline_runs)")
        as_of = latest if latest.tzinfo else latest.replace(tzinfo=timezone.utc)
    log.info("scoring events as of %s, half-life %.1f days", as_of.isoformat(), settings.half_life_days)

    scored = score_events(events, settings.weights, settings.half_life_days, as_of).persist()
    existing = [tables.read(spark, t) if tables.exists(spark, t) else None for t in (C.USER_INDEX, C.ITEM_INDEX)]
    additions = index_additions(scored, *existing, ctx.settings.spark.shuffle_partitions)
    for table, before, new_rows in zip((C.USER_INDEX, C.ITEM_INDEX), existing, additions):
        new_rows = new_rows.persist()
        added = new_rows.count()
        if added or before is None:
            tables.append(new_rows, table)
        new_rows.unpersist()
        log.info("%s: %d new ids appended", table.name, added)

    user_index, item_index = tables.read(spark, C.USER_INDEX), tables.read(spark, C.ITEM_INDEX)
    tables.overwrite(to_matrix_entries(scored, user_index, item_index), C.INTERACTIONS)
    scored.unpersist()

    written = tables.read(spark, C.INTERACTIONS).agg(
        F.count(F.lit(1)).alias("entries"), F.sum("n_events").alias("events_used"),
        F.countDistinct("user_idx").alias("users"), F.countDistinct("item_idx").alias("items"),
    ).first()
    rows_in = events.count()
    counts = {"users": int(written["users"]), "items": int(written["items"]),
              "events_used": int(written["events_used"] or 0),
              "events_after_as_of": rows_in - int(written["events_used"] or 0)}
    return StageResult(rows_in=rows_in, rows_out=int(written["entries"]), counts=counts,
                       message=f"as_of={as_of.isoformat()}")


if __name__ == "__main__":
    main_for("build_interactions")
