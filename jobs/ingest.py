"""Ingest the raw clickstream into the Delta tables ``events`` and ``events_quarantine``.

Reads with the strict readers, maps the source's shape to the contract, checks every row, then
counts every outcome and checks them against the reader's record count and
``ingest.max_quarantine_share`` before writing anything (docs/ingest.md).
"""
from __future__ import annotations

import logging

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.common import StageContext, ingest_rules, main_for, read_events_input
from lib.ingest import events as ingest
from lib.platform import catalog as C
from lib.platform.privacy import pseudonymize_events, stage_key
from lib.platform.runs import StageResult

log = logging.getLogger("jobs.ingest")


def without_own_inserts(ctx: StageContext, batch_new: DataFrame) -> DataFrame:
    """The stored events less the ones this run's MERGE inserted (``batch_new``'s event_ids that carry
    this run's id): what the batch must be resolved against after a concurrent writer's commit."""
    stored = ctx.tables.read(ctx.spark, C.EVENTS)
    ours = (stored.where(F.col("ingest_run_id") == F.lit(ctx.run_id)).select("event_id")
            .join(batch_new.select("event_id"), "event_id", "left_semi"))
    return stored.join(ours, "event_id", "left_anti")


def run(ctx: StageContext) -> StageResult:
    source, settings = ctx.settings.input, ctx.settings.ingest
    spark, tables = ctx.spark, ctx.tables
    # Fails before reading anything when pseudonymisation is on and the key is missing.
    key = stage_key(ctx.settings.privacy)
    raw, location, fmt = read_events_input(ctx)
    rules = ingest_rules(ctx.settings)
    log.info("ingesting %s (%s); event times outside %s .. %s are quarantined", location, fmt,
             rules.earliest, rules.latest.isoformat())
    rows_in = raw.count()  # the reader's own record count, independent of the sorting below
    stored = tables.read(spark, C.EVENTS) if tables.exists(spark, C.EVENTS) else None
    classified = ingest.classify(ingest.normalize(raw, source), rules)
    identities = None
    if key is not None:  # stored events hold pseudonyms: compare and store the batch's the same way
        classified, identities = pseudonymize_events(classified, key)
        # Quarantined rows, and refusal messages quoting them, must not keep the raw ids either.
        classified = ingest.pseudonymize_raw(classified, source.source_names["user_id"])
    resolved = ingest.resolve(classified, stored).persist()
    try:
        outcome = ingest.count_outcomes(resolved)
        ingest.check_reconciliation(rows_in, outcome)
        ingest.check_quarantine_share(rows_in, outcome, settings.max_quarantine_share)
        if identities is not None:
            tables.insert_new(spark, identities.withColumn("first_seen_run_id", F.lit(ctx.run_id)),
                              C.USER_IDENTITIES, ["user_key"])
        inserted = tables.insert_new(spark, ingest.valid_events(resolved, ctx.run_id), C.EVENTS, ["event_id"])
        if inserted != outcome.new:
            # A concurrent ingest stored some of this batch's new event_ids between our read and our
            # MERGE: sort the batch again against the events as stored now, less the ones this run added.
            log.warning("events MERGE inserted %d of %d new events: another writer stored the others; "
                        "resolving the batch again", inserted, outcome.new)
            settled = ingest.resolve(classified, without_own_inserts(ctx, ingest.valid_events(resolved, ctx.run_id)))
            settled = settled.persist()
            outcome = ingest.count_outcomes(settled)  # materializes settled while the first resolve is cached
            resolved.unpersist()
            resolved = settled
            ingest.check_reconciliation(rows_in, outcome)
        ingest.check_inserted(inserted, outcome)
        # After the events, so event_id conflicts found against a concurrent run's events are quarantined too.
        new_quarantined = tables.insert_new(spark, ingest.quarantined_rows(resolved, ctx.run_id),
                                            C.EVENTS_QUARANTINE, ["raw_hash", "reason"])
    finally:
        resolved.unpersist()

    counts = {"quarantined": outcome.quarantined, "duplicates": outcome.duplicate_total,
              "duplicates.stored": outcome.duplicates.get("stored", 0),
              "duplicates.batch": outcome.duplicates.get("batch", 0), "quarantine_new_rows": new_quarantined}
    counts.update({f"reason.{reason}": count for reason, count in outcome.reasons.items()})
    return StageResult(rows_in=rows_in, rows_out=inserted, counts=counts,
                       message=f"{location} ({fmt}): {inserted} new events, {outcome.quarantined} quarantined, "
                               f"{outcome.duplicate_total} duplicates")


if __name__ == "__main__":
    main_for("ingest")
