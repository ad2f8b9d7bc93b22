"""Interactions: weighted, time-decayed (user, item) scores, dense and stable integer indices, and the as-of
instant a stage works at (configured, else the latest event)."""
from __future__ import annotations

import logging
import random
import time
from datetime import datetime, timezone

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from lib.platform.catalog import INTERACTIONS, ITEM_INDEX, USER_INDEX, TableSpec
from lib.platform.storage import Tables, is_commit_conflict

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400.0


def score_events(
    events: DataFrame,
    weights: dict[str, float],
    half_life_days: float,
    as_of: datetime,
) -> DataFrame:
    """Aggregate events into (user_id, item_id, score, n_events, n_weighted_events, last_ts).

    Each event counts ``weights[event_type] * 0.5 ** (age_days / half_life_days)``, its age taken
    at ``as_of``. Events after ``as_of`` are left out (they have not happened yet at that date).
    ``n_events`` counts every event of the pair (it reconciles with the events table);
    ``n_weighted_events`` only those of a type with a positive weight (an email send is no taste).
    """
    if half_life_days <= 0:
        raise ValueError(f"interactions.half_life_days must be > 0, got {half_life_days}")
    weight = F.coalesce(
        F.element_at(F.create_map(*[F.lit(x) for pair in weights.items() for x in pair]), F.col("event_type")),
        F.lit(0.0),
    )
    age_days = (F.lit(as_of).cast("timestamp").cast("double") - F.col("event_ts").cast("double")) / SECONDS_PER_DAY
    decayed = weight * F.pow(F.lit(0.5), age_days / F.lit(half_life_days))
    return (
        events.where(F.col("event_ts") <= F.lit(as_of).cast("timestamp"))
        .groupBy("user_id", "item_id")
        .agg(
            F.sum(decayed).alias("score"),
            F.count(F.lit(1)).alias("n_events"),
            F.count(F.when(weight > 0, F.lit(1))).alias("n_weighted_events"),
            F.max("event_ts").alias("last_ts"),
        )
    )


def extend_index(
    ids: DataFrame,
    existing: DataFrame | None,
    id_col: str,
    idx_col: str,
    partitions: int = 8,
) -> DataFrame:
    """Rows (id, idx) for the ids in ``ids`` that ``existing`` lacks, numbered after its largest idx.

    Known ids keep their index; new ids get the next integers in id order, so the index stays dense
    and repeatable. Numbering is distributed: ids are range-partitioned and sorted, each partition
    numbers its rows locally, and only one count per partition is combined into offsets.
    """
    new_ids = ids.select(id_col).distinct()
    start = 0
    if existing is not None:
        new_ids = new_ids.join(existing.select(id_col), on=id_col, how="left_anti")
        start = existing.agg(F.coalesce(F.max(idx_col) + 1, F.lit(0))).first()[0]

    # monotonically_increasing_id packs (partition id << 33) + position inside the partition.
    # The numbering is materialized once: the per-partition counts and the rows must come from the
    # same evaluation, and range bounds sampled from ids that arrive out of a shuffle differ from one
    # evaluation to the next (which gave duplicate and missing indices).
    numbered = (
        new_ids.repartitionByRange(partitions, id_col)
        .sortWithinPartitions(id_col)
        .withColumn("_mono", F.monotonically_increasing_id())
        .withColumn("_part", F.shiftright("_mono", 33))
        .withColumn("_pos", F.col("_mono").bitwiseAND((1 << 33) - 1))
        .localCheckpoint(eager=True)
    )
    offsets = (
        numbered.groupBy("_part")
        .agg(F.count(F.lit(1)).alias("_size"))
        .withColumn(
            "_offset",
            F.coalesce(
                F.sum("_size").over(Window.orderBy("_part").rowsBetween(Window.unboundedPreceding, -1)),
                F.lit(0),
            ),
        )
    )
    return numbered.join(F.broadcast(offsets), "_part").select(
        id_col, (F.lit(start) + F.col("_offset") + F.col("_pos")).cast("int").alias(idx_col)
    )


def index_additions(
    scored: DataFrame,
    user_index: DataFrame | None,
    item_index: DataFrame | None,
    partitions: int = 8,
) -> tuple[DataFrame, DataFrame]:
    """New (user_id, user_idx) and (item_id, item_idx) rows for the ids of ``scored`` the indices lack."""
    return (extend_index(scored.select("user_id"), user_index, "user_id", "user_idx", partitions),
            extend_index(scored.select("item_id"), item_index, "item_id", "item_idx", partitions))


def grow_index(spark: SparkSession, tables: Tables, table: TableSpec, ids: DataFrame, id_col: str, idx_col: str,
               partitions: int = 8, attempts: int = 8) -> int:
    """Add the ``ids`` the index table lacks, numbered after its largest index; return how many.

    Safe against a concurrent writer: the insert is a MERGE that skips taken ids *and* taken
    indices, so two runs can never give one index twice; a run that lost the commit race, or whose
    numbers were taken, re-reads the index and numbers its remaining ids again.
    """
    added = 0
    for attempt in range(1, attempts + 1):
        existing = tables.read(spark, table) if tables.exists(spark, table) else None
        new_rows = extend_index(ids, existing, id_col, idx_col, partitions)
        wanted = new_rows.count()
        if wanted == 0:
            if existing is None:  # no ids at all: the (empty) index still exists for later stages
                tables.insert_new(spark, new_rows, table, [id_col])
            return added
        try:
            added += tables.insert_new(spark, new_rows, table, [id_col], also_unique=[idx_col], attempts=1)
        except Exception as err:  # noqa: BLE001 - only a lost commit race is retried
            if not is_commit_conflict(err) or attempt == attempts:
                raise
            log.warning("%s: a concurrent run extended the index first; renumbering (attempt %d)", table.name, attempt)
            time.sleep(0.2 * attempt * (1 + random.random()))
    raise RuntimeError(f"{table.name}: could not add new ids after {attempts} attempts against concurrent writers")


def to_matrix_entries(scored: DataFrame, user_index: DataFrame, item_index: DataFrame) -> DataFrame:
    """The ``interactions`` table: scores keyed by dense indices (user_idx, item_idx, score, n_events,
    n_weighted_events, last_ts)."""
    return (
        scored.join(user_index, "user_id")
        .join(item_index, "item_id")
        .select("user_idx", "item_idx", "score", "n_events", "n_weighted_events", "last_ts")
    )


def latest_event_time(events: DataFrame) -> datetime | None:
    """The time of the latest of ``events`` as a UTC instant (one scalar), None when there is none."""
    latest = events.agg(F.max("event_ts")).first()[0]
    if latest is None:
        return None
    return latest if latest.tzinfo else latest.replace(tzinfo=timezone.utc)


def resolve_as_of(configured: datetime | None, events: DataFrame, where: str = "events") -> datetime:
    """The instant a stage works as of: the configured one, else the latest event's time; an error naming
    ``where`` (the events table) when there is no event to take it from."""
    if configured is not None:
        return configured
    latest = latest_event_time(events)
    if latest is None:
        raise ValueError(f"table {where} is empty: ingest kept no event "
                         "(see events_quarantine and the ingest row of pipeline_runs)")
    return latest


def write_matrix_tables(spark: SparkSession, tables: Tables, events: DataFrame, weights: dict[str, float],
                        half_life_days: float, partitions: int = 2) -> datetime:
    """Score ``events`` as of their latest event and overwrite user_index, item_index and interactions.

    A from-scratch matrix (fixtures, benchmarks, a rebuild): indices numbered afresh, without the
    incremental, conflict-safe growth of the build_interactions stage. Returns the as-of instant.
    """
    as_of = resolve_as_of(None, events)
    scored = score_events(events, weights, half_life_days, as_of).persist()
    for table, rows in zip((USER_INDEX, ITEM_INDEX), index_additions(scored, None, None, partitions)):
        tables.overwrite(rows, table)
    tables.overwrite(to_matrix_entries(scored, tables.read(spark, USER_INDEX), tables.read(spark, ITEM_INDEX)),
                     INTERACTIONS)
    scored.unpersist()
    return as_of
