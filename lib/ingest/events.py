"""Ingest: normalize a raw clickstream to the input contract and sort every record into one outcome.

Each input record ends as exactly one of: a new event (``events``), a quarantined row with a reason
(``events_quarantine``), or an exact duplicate (same event_id, same payload) of a row kept in this
batch or already stored. ``count_outcomes`` counts them and ``check_reconciliation`` holds them
against the reader's own record count, so ``rows_in = rows_out + quarantined + duplicates`` is a
check that fails the stage, not an identity. Reasons and the source mapping: docs/ingest.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from lib.ingest import sources
from lib.ingest.readers import LINE_AS_HEX, META_COLUMNS, READ_REASONS, InputContractError
from lib.platform.settings import InputSettings

REQUIRED_COLUMNS = ("user_id", "item_id", "event_type", "event_ts")

EVENT_COLUMNS = (
    "event_id", "user_id", "item_id", "event_type", "event_ts",
    "quantity", "revenue", "campaign_id", "channel", "event_date",
)
# What "the same event" means for duplicates and event_id conflicts: every event column but the id.
PAYLOAD_COLUMNS = ("user_id", "item_id", "event_type", "event_ts", "quantity", "revenue", "campaign_id", "channel")

# Every quarantine reason, in the order they are checked (a row gets the first that applies).
QUARANTINE_REASONS = (
    *READ_REASONS,  # invalid_encoding, malformed_record, malformed_json (lib.ingest.readers)
    "missing_user_id",
    "blank_user_id",
    "missing_item_id",
    "blank_item_id",
    "missing_event_type",
    "unknown_event_type",
    "missing_event_ts",
    "unparseable_event_ts",
    "timestamp_unit_mismatch",
    "too_early_event_ts",
    "future_event_ts",
    "unparseable_quantity",
    "non_finite_quantity",
    "negative_quantity",
    "unparseable_revenue",
    "non_finite_revenue",
    "negative_revenue",
    "event_id_conflict",  # decided after the row checks, against stored events and the batch (resolve)
)


class IngestError(RuntimeError):
    """Ingest refused to write: the counts do not reconcile, or too much of the input was quarantined."""


@dataclass(frozen=True)
class Rules:
    """The checks' parameters: accepted event types and the plausible event-time window."""

    event_types: tuple[str, ...]
    latest: datetime
    earliest: datetime | None = None
    timestamp_unit: str = "s"

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.earliest.timestamp() if self.earliest else -math.inf), self.latest.timestamp()


def normalize(raw: DataFrame, source: InputSettings, keep: dict[str, str] | None = None) -> DataFrame:
    """Contract columns, cleaned and typed, beside the raw record and what the checks need.

    A value that does not parse becomes null next to its text (``*_text``), so ``classify`` can tell
    missing from unparseable; ``*_given`` tells an id that held only whitespace from an absent one.
    ``keep`` (input column -> name) carries further input columns along as text, e.g. the product
    attributes of ``input.item_columns``.
    """
    names, keep = source.source_names, keep or {}
    needed = [c for c in REQUIRED_COLUMNS if not (c == "event_type" and source.event_type)]
    lacking = [names[c] for c in needed if names[c] not in raw.columns]
    lacking += [name for name in [*source.revenue_product, *keep] if name not in raw.columns]
    if lacking:
        found = ", ".join(c for c in raw.columns if c not in META_COLUMNS) or "none"
        raise InputContractError(f"input lacks required column(s) {', '.join(lacking)}; found {found} "
                                 "(input.columns maps input names to contract names; input.item_columns "
                                 "names product attribute columns)")
    event_type, event_type_text = sources.event_type_of(raw, source)
    seconds, number, ts_text = sources.event_seconds(raw, source)
    quantity_text = sources.clean(sources.column_of(raw, names["quantity"]))
    revenue_text = sources.revenue_text(raw, source)
    return raw.select(
        F.col("_raw").alias("raw"), F.col("_raw_line").alias("raw_line"), F.col("_source_file").alias("source_file"),
        F.col("_read_error").alias("read_error"), F.col("_read_detail").alias("read_detail"),
        sources.id_text(raw, names["event_id"], source).alias("event_id"),
        sources.id_text(raw, names["user_id"], source).alias("user_id"),
        sources.given(sources.column_of(raw, names["user_id"])).alias("user_id_given"),
        sources.id_text(raw, names["item_id"], source).alias("item_id"),
        sources.given(sources.column_of(raw, names["item_id"])).alias("item_id_given"),
        event_type.alias("event_type"), event_type_text.alias("event_type_text"),
        sources.timestamp_of(seconds).alias("event_ts"), seconds.alias("event_ts_seconds"),
        number.alias("event_ts_number"), ts_text.alias("event_ts_text"),
        quantity_text.try_cast("double").alias("quantity"), quantity_text.alias("quantity_text"),
        revenue_text.try_cast("double").alias("revenue"), revenue_text.alias("revenue_text"),
        sources.clean(sources.column_of(raw, names["campaign_id"])).alias("campaign_id"),
        sources.clean(sources.column_of(raw, names["channel"])).alias("channel"),
        *[F.col(f"`{column}`").cast("string").alias(name) for column, name in keep.items()],
    )


def _unit_mismatch(rules: Rules) -> tuple[Column, Column]:
    """(the epoch number is implausible in the configured unit but plausible in another, detail)."""
    low, high = rules.bounds
    number = F.col("event_ts_number")

    def plausible(seconds: Column) -> Column:
        return (seconds >= F.lit(low)) & (seconds <= F.lit(high))

    configured = number / F.lit(sources.UNIT_FACTORS[rules.timestamp_unit])
    detail = F.lit(None).cast("string")
    for unit, factor in reversed(list(sources.UNIT_FACTORS.items())):
        if unit == rules.timestamp_unit:
            continue
        as_unit = number / F.lit(factor)
        text = F.concat(F.lit("epoch "), F.col("event_ts_text"), F.lit(f" is implausible in input.timestamp_unit "
                        f"'{rules.timestamp_unit}'; read as '{unit}' it is "),
                        F.date_format(sources.timestamp_of(as_unit), "yyyy-MM-dd HH:mm:ss"))
        detail = F.when(plausible(as_unit), text).otherwise(detail)
    return number.isNotNull() & ~plausible(configured) & detail.isNotNull(), detail


def quarantine_checks(rules: Rules) -> list[tuple[Column, str, Column | None]]:
    """(condition, reason, detail) per row check, in QUARANTINE_REASONS order (without the read and id checks)."""
    low, high = rules.bounds
    seconds = F.col("event_ts_seconds")
    mismatch, mismatch_detail = _unit_mismatch(rules)

    def amount(name: str) -> list[tuple[Column, str, Column | None]]:
        value, text = F.col(name), F.col(f"{name}_text")
        return [
            (text.isNotNull() & value.isNull(), f"unparseable_{name}", None),
            (F.isnan(value) | (F.abs(value) == F.lit(math.inf)), f"non_finite_{name}", None),
            (value < 0, f"negative_{name}", None),
        ]

    return [
        (F.col("user_id").isNull() & ~F.col("user_id_given"), "missing_user_id", None),
        (F.col("user_id").isNull(), "blank_user_id", F.lit("only whitespace or control characters")),
        (F.col("item_id").isNull() & ~F.col("item_id_given"), "missing_item_id", None),
        (F.col("item_id").isNull(), "blank_item_id", F.lit("only whitespace or control characters")),
        (F.col("event_type").isNull(), "missing_event_type", None),
        (~F.col("event_type").isin(list(rules.event_types)), "unknown_event_type",
         F.concat(F.lit("event type '"), F.col("event_type_text"),
                  F.lit("' is neither in input.event_type_map nor in ingest.event_types"))),
        (F.col("event_ts_text").isNull(), "missing_event_ts", None),
        (seconds.isNull(), "unparseable_event_ts", None),
        (mismatch, "timestamp_unit_mismatch", mismatch_detail),
        (seconds < F.lit(low), "too_early_event_ts",
         F.lit(f"before ingest.earliest_event_ts {rules.earliest.isoformat() if rules.earliest else ''}")),
        (seconds > F.lit(high), "future_event_ts", F.lit(f"after now + ingest.future_skew_minutes "
                                                          f"({rules.latest.isoformat()})")),
        *amount("quantity"),
        *amount("revenue"),
    ]


def row_hash(*columns: Column) -> Column:
    """A deterministic SHA-256 of the given columns; nulls hash differently from empty strings."""
    return F.sha2(F.concat_ws("\u0001", *[F.coalesce(c.cast("string"), F.lit("\u0000")) for c in columns]), 256)


def payload_hash() -> Column:
    """A hash of an event's payload (``PAYLOAD_COLUMNS``), the same for a batch row and a stored event."""
    return row_hash(*[F.unix_micros(F.col(c)) if c == "event_ts" else F.col(c) for c in PAYLOAD_COLUMNS])


def classify(normalized: DataFrame, rules: Rules) -> DataFrame:
    """Add ``reason`` and ``detail`` (null when valid) and fill a missing ``event_id`` with a hash of the event."""
    reason = F.col("read_error")
    detail = F.col("read_detail")
    checks = quarantine_checks(rules)
    chain_reason, chain_detail = F.lit(None).cast("string"), F.lit(None).cast("string")
    for condition, name, why in reversed(checks):
        chain_reason = F.when(condition, F.lit(name)).otherwise(chain_reason)
        chain_detail = F.when(condition, why if why is not None else F.lit(None).cast("string")).otherwise(chain_detail)
    event_hash = row_hash(  # unchanged since the first release: generated ids stay stable across versions
        F.col("user_id"), F.col("item_id"), F.col("event_type"),
        F.date_format(F.col("event_ts"), "yyyy-MM-dd'T'HH:mm:ss.SSSSSS"),
        F.col("quantity"), F.col("revenue"), F.col("campaign_id"), F.col("channel"),
    )
    return normalized.select(
        "*",
        F.coalesce(reason, chain_reason).alias("reason"),
        F.when(reason.isNotNull(), detail).otherwise(chain_detail).alias("detail"),
    ).withColumn("event_id", F.coalesce(F.col("event_id"), event_hash))


def pseudonymize_raw(batch: DataFrame, user_field: str) -> DataFrame:
    """The raw text of a batch whose ``user_id`` already holds pseudonyms, without the raw ids.

    ``raw``: the record's JSON with the value of ``user_field`` (the input's user id column) replaced
    by the pseudonym, every value as text. ``raw_line``: null (``raw`` holds every field of the line).
    A line that could not be read into fields (a read error: no id can be told apart in it) keeps only
    its SHA-256, as ``{"_line_sha256": ...}``, and its detail loses the line's bytes.
    """
    fields = F.from_json(F.col("raw"), "map<string,string>")
    pseudonymized = F.transform_values(fields, lambda name, value: F.when(
        (name == F.lit(user_field)) & F.col("user_id").isNotNull(), F.col("user_id")).otherwise(value))
    unread = F.col("read_error").isNotNull() | fields.isNull()
    hashed = F.to_json(F.struct(F.sha2(F.coalesce(F.col("raw_line"), F.col("raw")), 256).alias("_line_sha256")))
    return batch.withColumns({
        "raw": F.when(unread, hashed).otherwise(F.to_json(pseudonymized)),
        "raw_line": F.lit(None).cast("string"),
        "detail": F.when(unread, F.substring_index(F.col("detail"), LINE_AS_HEX, 1)).otherwise(F.col("detail")),
    })


def resolve(classified: DataFrame, stored: DataFrame | None) -> DataFrame:
    """Mark exact duplicates (``duplicate``: 'stored' or 'batch') and quarantine event_id conflicts.

    A valid row whose event_id is stored is a duplicate when its payload equals the stored one and
    an ``event_id_conflict`` otherwise (the stored event wins). Among valid rows of the batch that
    share a new event_id, the one with the earliest event_ts wins (ties: the lowest payload hash);
    rows with its payload are duplicates, rows with another payload conflicts.
    """
    valid = F.col("reason").isNull()
    df = classified.withColumn("payload_hash", F.when(valid, payload_hash())).withColumn("_valid", valid)
    if stored is not None:
        ids = df.where(valid).select("event_id").distinct()
        known = (stored.join(ids, "event_id", "left_semi").select("event_id", payload_hash().alias("h"))
                 .groupBy("event_id").agg(F.collect_set("h").alias("stored_hashes")))
        df = df.join(known, "event_id", "left")
    else:
        df = df.withColumn("stored_hashes", F.lit(None).cast("array<string>"))
    window = Window.partitionBy("event_id", "_valid").orderBy("event_ts", "payload_hash")
    df = df.withColumn("_rank", F.row_number().over(window)).withColumn("_winner", F.first("payload_hash").over(window))
    is_stored = F.col("stored_hashes").isNotNull()
    conflict = valid & F.when(is_stored, ~F.array_contains(F.col("stored_hashes"), F.col("payload_hash"))) \
        .otherwise(F.col("payload_hash") != F.col("_winner"))
    conflict_detail = F.when(is_stored, F.lit("event_id already stored with another payload (the stored event wins)")) \
        .otherwise(F.lit("event_id repeated in the batch with another payload (the earliest event_ts wins)"))
    duplicate = F.when(valid & ~conflict & is_stored, F.lit("stored")) \
        .when(valid & ~conflict & (F.col("_rank") > 1), F.lit("batch"))
    return df.select(
        *[c for c in classified.columns if c not in ("reason", "detail")],
        F.when(conflict, F.lit("event_id_conflict")).otherwise(F.col("reason")).alias("reason"),
        F.when(conflict, conflict_detail).otherwise(F.col("detail")).alias("detail"),
        duplicate.alias("duplicate"),
    )


@dataclass
class Outcome:
    """Counts of every outcome of one batch, and a sample raw record per quarantine reason."""

    new: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)  # 'stored' / 'batch' -> rows
    reasons: dict[str, int] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)

    @property
    def quarantined(self) -> int:
        return sum(self.reasons.values())

    @property
    def duplicate_total(self) -> int:
        return sum(self.duplicates.values())

    @property
    def total(self) -> int:
        return self.new + self.quarantined + self.duplicate_total


def count_outcomes(resolved: DataFrame) -> Outcome:
    """One aggregation: rows per (reason, duplicate) with a sample raw record (a handful of rows reach the driver)."""
    rows = resolved.groupBy("reason", "duplicate").agg(
        F.count(F.lit(1)).alias("n"), F.min(F.coalesce("raw_line", "raw")).alias("sample")).collect()
    outcome = Outcome()
    for row in rows:
        if row["reason"] is not None:
            outcome.reasons[row["reason"]] = int(row["n"])
            outcome.samples[row["reason"]] = row["sample"]
        elif row["duplicate"] is not None:
            outcome.duplicates[row["duplicate"]] = int(row["n"])
        else:
            outcome.new = int(row["n"])
    return outcome


def check_reconciliation(rows_in: int, outcome: Outcome) -> None:
    """Fail unless the reader's record count equals new + quarantined + duplicates."""
    if rows_in != outcome.total:
        raise IngestError(
            f"counts do not reconcile: the reader saw {rows_in} records but ingest sorted {outcome.total} "
            f"({outcome.new} new, {outcome.quarantined} quarantined, {outcome.duplicate_total} duplicates); "
            "nothing was written")


def check_inserted(inserted: int, outcome: Outcome) -> None:
    """Fail when the MERGE inserted another number of events than were new (a concurrent writer)."""
    if inserted != outcome.new:
        raise IngestError(f"counts do not reconcile: {outcome.new} new events but the events MERGE inserted "
                          f"{inserted} (another writer changed the table during this run?)")


def check_quarantine_share(rows_in: int, outcome: Outcome, max_share: float, top: int = 3) -> None:
    """Fail (before anything is written) when more than ``max_share`` of the records were quarantined."""
    if rows_in == 0 or outcome.quarantined / rows_in <= max_share:
        return
    ranked = sorted(outcome.reasons.items(), key=lambda item: (-item[1], item[0]))[:top]
    lines = [f"  {reason}: {count} rows, e.g. {outcome.samples.get(reason, '')[:300]}" for reason, count in ranked]
    raise IngestError(
        f"{outcome.quarantined} of {rows_in} input records ({outcome.quarantined / rows_in:.1%}) were quarantined, "
        f"more than ingest.max_quarantine_share {max_share}; nothing was written. Top reasons:\n" + "\n".join(lines)
        + "\nCheck the input's shape against [input] (docs/ingest.md, conf/sources/).")


def valid_events(resolved: DataFrame, run_id: str) -> DataFrame:
    """The new events in the ``events`` table's columns (one row per event_id by ``resolve``)."""
    return (
        resolved.where(F.col("reason").isNull() & F.col("duplicate").isNull())
        .withColumn("event_date", F.to_date("event_ts"))
        .select(*EVENT_COLUMNS, F.lit(run_id).alias("ingest_run_id"))
    )


def quarantined_rows(resolved: DataFrame, run_id: str) -> DataFrame:
    """The rows that failed a check, in the ``events_quarantine`` table's columns."""
    return resolved.where(F.col("reason").isNotNull()).select(
        "raw",
        F.sha2(F.col("raw"), 256).alias("raw_hash"),
        "reason",
        F.lit(run_id).alias("ingest_run_id"),
        "detail",
        "raw_line",
        "source_file",
    )
