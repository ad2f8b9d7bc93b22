"""Build ``interactions`` (weighted, decayed user-item scores) and the stable ``user_index`` / ``item_index``."""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.common import main_for, tables_of
from lib.interactions import extend_index, score_events, to_matrix_entries, validate_weights
from lib.runs import StageResult

log = logging.getLogger("jobs.build_interactions")


def run(spark: SparkSession, config: dict[str, Any], run_id: str) -> StageResult:
    settings = config["interactions"]
    weights = settings["weights"]
    validate_weights(weights, config["ingest"]["event_types"])
    tables = tables_of(config)
    if not tables.exists(spark, "events"):
        raise ValueError(f"table {tables.location('events')} does not exist: run the ingest stage first")
    events = tables.read(spark, "events")

    if settings["as_of"]:
        as_of = datetime.fromisoformat(settings["as_of"])
        as_of = as_of if as_of.tzinfo else as_of.replace(tzinfo=timezone.utc)
    else:
        as_of = events.agg(F.max("event_ts")).first()[0]
        if as_of is None:
            raise ValueError("events is empty: nothing to build interactions from")
        as_of = as_of.replace(tzinfo=timezone.utc) if as_of.tzinfo is None else as_of
    log.info("scoring events as of %s, half-life %.1f days", as_of.isoformat(), settings["half_life_days"])

    scored = score_events(events, weights, settings["half_life_days"], as_of).persist()
    partitions = config["spark"]["shuffle_partitions"]
    for id_col, idx_col, table in (("user_id", "user_idx", "user_index"), ("item_id", "item_idx", "item_index")):
        existing = tables.read(spark, table) if tables.exists(spark, table) else None
        new_rows = extend_index(scored.select(id_col), existing, id_col, idx_col, partitions).persist()
        added = new_rows.count()
        if added or existing is None:
            tables.append(new_rows, table)
        new_rows.unpersist()
        log.info("%s: %d new ids appended", table, added)

    user_index, item_index = tables.read(spark, "user_index"), tables.read(spark, "item_index")
    tables.overwrite(to_matrix_entries(scored, user_index, item_index), "interactions")
    scored.unpersist()

    written = tables.read(spark, "interactions").agg(
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
    main_for("build_interactions", __doc__, run)
