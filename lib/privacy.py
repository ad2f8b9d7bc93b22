"""Personal data: keyed pseudonyms for customer ids, and erasure of customers from every table.

Pseudonyms are HMAC-SHA256(key, user_id) in hex, computed by Spark column functions (no Python UDF;
the key-derived pads travel in the query plan like any literal). The key comes from an environment
variable (or a Databricks secret scope), never from config files or logs. The raw id
survives only in ``user_identities`` (user_key -> user_id), the one table to access-control.

Erasure (``forget``) deletes the customers from every catalog table that holds a ``user_id`` or a
``user_idx`` (and quarantined raw rows that contain the raw id), then VACUUMs the touched tables so
no data file on disk still holds them. Tables with personal columns are created without statistics
on those columns (``TableSpec.personal``, ``Tables.create``), so ids never reach the transaction log.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from lib import catalog as C
from lib.settings import PrivacySettings
from lib.sources import clean_id
from lib.storage import Tables, with_retries

log = logging.getLogger(__name__)
_BLOCK = 64  # SHA-256 block size in bytes
DELTA_DEFAULT_RETENTION_HOURS = 168.0


class PrivacyError(RuntimeError):
    """Pseudonymisation is on but its key is missing, or an erasure request is malformed."""


def load_key(env_var: str, secret_scope: str = "", secret_key: str = "") -> bytes:
    """The pseudonym key: a Databricks secret when a scope is configured, else the environment variable."""
    if secret_scope:
        try:
            from pyspark.dbutils import DBUtils  # only on Databricks
            from pyspark.sql import SparkSession as _Session

            value = DBUtils(_Session.getActiveSession()).secrets.get(scope=secret_scope, key=secret_key)
        except ImportError as err:
            raise PrivacyError(f"privacy.secret_scope is set ({secret_scope!r}) but Databricks secrets are not "
                               "available here; use the environment variable instead") from err
    else:
        value = os.environ.get(env_var, "")
    if len(value) < 16:
        raise PrivacyError(f"privacy.pseudonymize is on: set the environment variable {env_var} (or "
                           "privacy.secret_scope) to a secret of at least 16 characters")
    return value.encode()


def stage_key(privacy: PrivacySettings) -> bytes | None:
    """The pseudonym key when ``privacy.pseudonymize`` is on (failing, naming the variable, when it is
    missing), else None: the ids the tables hold are then the raw ids."""
    return load_key(privacy.key_env, privacy.secret_scope, privacy.secret_key) if privacy.pseudonymize else None


def _pads(key: bytes) -> tuple[bytes, bytes]:
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def pseudonym(column: Column, key: bytes) -> Column:
    """HMAC-SHA256(key, column) as 64 hex characters (null stays null)."""
    inner_pad, outer_pad = _pads(key)
    inner = F.unhex(F.sha2(F.concat(F.lit(inner_pad), F.encode(column, "UTF-8")), 256))
    return F.when(column.isNotNull(), F.sha2(F.concat(F.lit(outer_pad), inner), 256))


def pseudonymize_events(events: DataFrame, key: bytes) -> tuple[DataFrame, DataFrame]:
    """(events with user_id replaced by its pseudonym, identities (user_key, user_id) of these events)."""
    keyed = events.withColumn("_user_key", pseudonym(F.col("user_id"), key))
    identities = keyed.where(F.col("user_id").isNotNull()).select(F.col("_user_key").alias("user_key"),
                                                                  "user_id").distinct()
    return keyed.withColumn("user_id", F.col("_user_key")).drop("_user_key"), identities


def as_stored(frame: DataFrame, key: bytes | None, identities: DataFrame | None = None) -> DataFrame:
    """``frame`` with its ``user_id`` (an id as the source system knows it) as the tables store it: its
    pseudonym when ``key`` is given, else unchanged. An id that already is a stored pseudonym (a
    ``user_key`` of ``identities``: e.g. an export's external_id sent back by the email platform) stays."""
    if key is None:
        return frame
    mapped = pseudonym(F.col("user_id"), key)
    if identities is None:
        return frame.withColumn("user_id", mapped)
    known = identities.select(F.col("user_key").alias("_known")).distinct()
    return (frame.join(known, F.col("user_id") == F.col("_known"), "left")
            .withColumn("user_id", F.coalesce(F.col("_known"), mapped)).drop("_known"))


@dataclass(frozen=True)
class ErasureReport:
    """Rows deleted per table and the tables vacuumed."""

    deleted: dict[str, int]
    vacuumed: list[str]


def _merge_delete(spark: SparkSession, tables: Tables, table: C.TableSpec, source: DataFrame, condition: str) -> int:
    view = f"_forget_{table.name}"
    source.createOrReplaceTempView(view)
    statement = (f"MERGE INTO {tables.sql_name(table)} AS target USING {view} AS source ON {condition} "
                 "WHEN MATCHED THEN DELETE")
    result = with_retries(lambda: spark.sql(statement).collect(), f"erase from {table.name}")
    spark.catalog.dropTempView(view)
    return int(result[0]["num_deleted_rows"]) if result else 0


def forget(spark: SparkSession, tables: Tables, raw_ids: DataFrame, key: bytes | None,
           retention_hours: float) -> ErasureReport:
    """Delete every trace of the customers in ``raw_ids`` (one column ``user_id``: the ids as the
    source system knows them), then VACUUM the touched tables with ``retention_hours``."""
    if "user_id" not in raw_ids.columns:
        raise PrivacyError(f"the erasure list needs a user_id column; it has {', '.join(raw_ids.columns)}")
    raw = raw_ids.select(clean_id(F.col("user_id")).alias("raw_id")).where("raw_id IS NOT NULL").distinct()
    # The ids the tables hold: pseudonyms when pseudonymisation is on, else the raw ids themselves.
    stored = raw.select("raw_id", (pseudonym(F.col("raw_id"), key) if key else F.col("raw_id")).alias("user_id"))
    stored = stored.localCheckpoint(eager=True)
    present = [t for t in C.ALL_TABLES if t not in C.BOOKKEEPING and tables.exists(spark, t)]
    indices = None
    if tables.exists(spark, C.USER_INDEX):  # resolve user_idx before the index rows go
        indices = (tables.read(spark, C.USER_INDEX).join(stored.select("user_id"), "user_id")
                   .select("user_idx").localCheckpoint(eager=True))
    deleted: dict[str, int] = {}
    for table in present:
        columns = set(table.columns)
        if table is C.EVENTS_QUARANTINE:  # raw rows: wherever the raw or stored id appears in the text
            ids = stored.select(F.col("raw_id").alias("needle")).union(stored.select(F.col("user_id").alias("needle")))
            deleted[table.name] = _merge_delete(spark, tables, table, ids.distinct(), "instr(target.raw, source.needle) > 0")
        elif table is C.USER_IDENTITIES:
            deleted[table.name] = _merge_delete(spark, tables, table, stored.select(F.col("raw_id").alias("user_id")),
                                                "target.user_id = source.user_id")
        elif "user_id" in columns:
            deleted[table.name] = _merge_delete(spark, tables, table, stored.select("user_id"),
                                                "target.user_id = source.user_id")
        elif "user_idx" in columns and indices is not None:
            deleted[table.name] = _merge_delete(spark, tables, table, indices, "target.user_idx = source.user_idx")
    touched = [name for name, count in deleted.items() if count]
    check = "spark.databricks.delta.retentionDurationCheck.enabled"
    if retention_hours < DELTA_DEFAULT_RETENTION_HOURS:
        # The operator asked for a shorter retention (erasure now rather than in a week): Delta's
        # guard against vacuuming files a running writer still needs is lifted for this call only.
        log.warning("VACUUM with %s h retention: make sure no other job writes these tables now", retention_hours)
        spark.conf.set(check, "false")
    try:
        for name in touched:
            spark.sql(f"VACUUM {tables.sql_name(C.BY_NAME[name])} RETAIN {retention_hours} HOURS")
    finally:
        spark.conf.unset(check)
    log.info("erasure: deleted %s; vacuumed %s (retention %s h)", deleted, touched, retention_hours)
    return ErasureReport(deleted, touched)


def read_erasure_request(spark: SparkSession, location: str) -> DataFrame:
    """The ids to erase from a csv (with header), json lines, parquet or Delta path, or a catalog table."""
    lowered = location.lower().rstrip("/")
    if lowered.endswith(".csv"):
        ids = spark.read.option("header", "true").csv(location)
    elif lowered.endswith((".json", ".jsonl")):
        ids = spark.read.json(location)
    elif lowered.endswith(".parquet"):
        ids = spark.read.parquet(location)
    elif "/" not in location and "." in location:
        ids = spark.read.table(location)
    else:
        ids = spark.read.format("delta").load(location)
    if "user_id" not in ids.columns:
        raise PrivacyError(f"erasure request {location} has no user_id column (found {', '.join(ids.columns)})")
    return ids.select("user_id")
