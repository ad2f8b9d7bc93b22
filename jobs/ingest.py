"""Ingest the raw clickstream into the Delta tables ``events`` and ``events_quarantine``."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from pyspark.sql import SparkSession

from jobs.common import main_for, tables_of
from jobs.generate_events import sample_root
from lib import ingest
from lib.runs import StageResult
from lib.storage import is_delta_path

log = logging.getLogger("jobs.ingest")


def input_location(config: dict[str, Any]) -> tuple[str, str]:
    """(location, format) of the raw clickstream; the generated sample when input.events is empty."""
    location = config["input"]["events"] or f"{sample_root(config)}/events"
    fmt = config["input"]["format"] or ("parquet" if not config["input"]["events"] else "")
    return location, fmt


def run(spark: SparkSession, config: dict[str, Any], run_id: str) -> StageResult:
    settings = config["ingest"]
    tables = tables_of(config)
    location, fmt = input_location(config)
    if not fmt:
        fmt = ingest.infer_format(location, has_delta_log=is_delta_path(spark, location))
    now = datetime.fromisoformat(settings["now"]) if settings["now"] else datetime.now(timezone.utc)
    latest_allowed = now + timedelta(minutes=settings["future_skew_minutes"])
    log.info("ingesting %s (%s); events after %s are quarantined", location, fmt, latest_allowed.isoformat())

    raw = ingest.read_raw(spark.read, location, fmt, settings["csv_delimiter"])
    classified = ingest.classify(ingest.normalize(raw), settings["event_types"], latest_allowed).persist()
    # One pass counts every outcome: rows per reason, valid rows under a null reason.
    per_reason = {row["reason"]: int(row["count"]) for row in classified.groupBy("reason").count().collect()}
    rows_in = sum(per_reason.values())
    reasons = {reason: count for reason, count in per_reason.items() if reason is not None}
    quarantined = sum(reasons.values())

    bad = ingest.quarantined_rows(classified, run_id)
    new_quarantined = tables.insert_new(spark, bad, "events_quarantine", ["raw_hash", "reason"])
    inserted = tables.insert_new(
        spark, ingest.valid_events(classified, run_id), "events", ["event_id"], partition_by=["event_date"]
    )
    classified.unpersist()

    duplicates = rows_in - quarantined - inserted
    counts = {"quarantined": quarantined, "duplicates": duplicates, "quarantine_new_rows": new_quarantined}
    counts.update({f"reason.{reason}": count for reason, count in reasons.items()})
    return StageResult(rows_in=rows_in, rows_out=inserted, counts=counts,
                       message=f"{location} ({fmt}): {inserted} new events, {quarantined} quarantined, "
                               f"{duplicates} duplicates")


if __name__ == "__main__":
    main_for("ingest", __doc__, run)
