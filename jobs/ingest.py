"""Ingest the raw clickstream into the Delta tables ``events`` and ``events_quarantine``."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from jobs.common import StageContext, main_for, sample_root
from lib import catalog as C
from lib import ingest
from lib.runs import StageResult
from lib.storage import is_delta_path

log = logging.getLogger("jobs.ingest")


def input_location(ctx: StageContext) -> tuple[str, str]:
    """(location, format) of the raw clickstream; the generated sample when input.events is empty."""
    source = ctx.settings.input
    if not source.events:
        return f"{sample_root(ctx.settings)}/events", "parquet"
    fmt = source.format or ingest.infer_format(source.events, has_delta_log=is_delta_path(ctx.spark, source.events))
    return source.events, fmt


def run(ctx: StageContext) -> StageResult:
    settings = ctx.settings.ingest
    spark, tables = ctx.spark, ctx.tables
    location, fmt = input_location(ctx)
    now = settings.now_utc or datetime.now(timezone.utc)
    latest_allowed = now + timedelta(minutes=settings.future_skew_minutes)
    log.info("ingesting %s (%s); events after %s are quarantined", location, fmt, latest_allowed.isoformat())

    raw = ingest.read_raw(spark.read, location, fmt, settings.csv_delimiter)
    classified = ingest.classify(ingest.normalize(raw), list(settings.event_types), latest_allowed).persist()
    # One pass counts every outcome: rows per reason, valid rows under a null reason.
    per_reason = {row["reason"]: int(row["count"]) for row in classified.groupBy("reason").count().collect()}
    rows_in = sum(per_reason.values())
    reasons = {reason: count for reason, count in per_reason.items() if reason is not None}
    quarantined = sum(reasons.values())

    bad = ingest.quarantined_rows(classified, ctx.run_id)
    new_quarantined = tables.insert_new(spark, bad, C.EVENTS_QUARANTINE, ["raw_hash", "reason"])
    inserted = tables.insert_new(spark, ingest.valid_events(classified, ctx.run_id), C.EVENTS, ["event_id"])
    classified.unpersist()

    duplicates = rows_in - quarantined - inserted
    counts = {"quarantined": quarantined, "duplicates": duplicates, "quarantine_new_rows": new_quarantined}
    counts.update({f"reason.{reason}": count for reason, count in reasons.items()})
    return StageResult(rows_in=rows_in, rows_out=inserted, counts=counts,
                       message=f"{location} ({fmt}): {inserted} new events, {quarantined} quarantined, "
                               f"{duplicates} duplicates")


if __name__ == "__main__":
    main_for("ingest")
