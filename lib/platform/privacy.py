"""Personal data: keyed pseudonyms for customer ids, and erasure of customers from every table.

Pseudonyms are HMAC-SHA256(key, user_id) in hex, computed by Spark column functions (no Python UDF;
the key-derived pads travel in the query plan like any literal). The key comes from an environment
variable (or a Databricks secret scope), never from config files or logs. The raw id
survives only in ``user_identities`` (user_key -> user_id), the one table to access-control.

Erasure (``forget``) deletes the customers from every catalog table that holds a ``user_id`` or a
``user_idx`` (and quarantined raw rows that quote them), from the saved models and the exports,
redacts run messages that quote them, VACUUMs every table that may hold a customer, then reads
every file left (``verify_erasure``) and fails naming any that still holds one. Each step is
recorded in ``erasure_requests`` so a rerun after a kill finishes the request. Tables with personal
columns are created without statistics on those columns (``TableSpec.personal``,
``Tables.create``), so ids never reach the transaction log.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import reduce
from typing import Callable
from urllib.parse import unquote

from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import MapType

from lib.campaign.exports import local_path
from lib.ingest.sources import clean_id
from lib.platform import catalog as C
from lib.platform.settings import PrivacySettings
from lib.platform.storage import Tables, with_retries

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


REDACTION = "[erased]"
# Columns holding a customer id as the whole value; the other personal columns are free text that
# may quote one (a raw input row, an error message).
ID_COLUMNS = ("user_id", "external_id", "user_key")
# The maps from stored ids to customers: erased last, so that a rerun after a kill still resolves
# the user_idx of the tables keyed by index and of the saved models.
_MAPS = (C.USER_INDEX, C.USER_IDENTITIES)
# Bookkeeping text that may quote an id (a refused row named in an error): redacted, not deleted.
_REDACTED = ((C.PIPELINE_RUNS, "message"), (C.DATA_QUALITY, "detail"))
# Free text searched by substring: only where the erasure removes every match (deleted rows,
# redacted text), so a short id that also occurs in unrelated text cannot fail the verification.
_SEARCHED_TEXT = {C.EVENTS_QUARANTINE.name: tuple(c for c in C.EVENTS_QUARANTINE.personal if c not in ID_COLUMNS),
                  **{table.name: (column,) for table, column in _REDACTED}}
_FILE = "_file"


class ErasureIncomplete(PrivacyError):
    """The verification found an erased customer in a file that should no longer hold them."""


@dataclass(frozen=True)
class ErasureTargets:
    """Files outside the tables that may hold customers.

    exports_root: local directory of the email-platform exports (``lib.campaign.exports`` layout);
    models_root: the saved ALS models, ``<models_root>/<run_id>/userFactors`` keyed by user_idx;
    report_roots: local directories of the stages' markdown reports."""

    exports_root: str | None = None
    models_root: str | None = None
    report_roots: tuple[str, ...] = ()


@dataclass(frozen=True)
class ErasureReport:
    """What the request erased over all its attempts so far, and what this attempt's verification found."""

    deleted: dict[str, int]          # rows per table
    redacted: dict[str, int]         # bookkeeping rows whose text quoted a customer, per table
    exports_removed: list[str]       # export directories (campaign/run) that held a customer
    models_rewritten: list[str]      # saved models whose user factors held a customer
    vacuumed: list[str]              # this attempt: every table that may hold customers
    files_checked: int               # this attempt's verification
    pending: list[str]               # older data files still holding them until the retention passes
    attempt: int


@dataclass(frozen=True)
class ErasureRequest:
    """One erasure request being worked on: its name, this run, the customers' ids in every form
    (``prepare_request``)."""

    name: str
    run_id: str
    ids: DataFrame        # raw_id, user_id (the id the tables hold)
    exact: DataFrame      # user_id: raw and stored ids, as whole values
    needles: DataFrame    # needle: raw and stored ids, also as JSON and CSV escape them
    indices: DataFrame | None  # user_idx of the customers, while user_index still has them


def _record(spark: SparkSession, tables: Tables, request: ErasureRequest, step: str,
            entries: list[tuple[str | None, int]]) -> None:
    """Append this attempt's progress to erasure_requests (names and counts, never an id)."""
    if not entries:
        return
    now = datetime.now(timezone.utc)
    rows = [(request.name, request.run_id, step, target, int(count), now) for target, count in entries]
    tables.append(spark.createDataFrame(rows, C.ERASURE_REQUESTS.schema), C.ERASURE_REQUESTS)


def _earlier_attempts(spark: SparkSession, tables: Tables, name: str) -> list[Row]:
    """Progress rows of the request's earlier attempts since it was last verified (a few per table)."""
    if not tables.exists(spark, C.ERASURE_REQUESTS):
        return []
    rows = tables.read(spark, C.ERASURE_REQUESTS).where(F.col("request") == name).collect()
    verified = max((r["at"] for r in rows if r["step"] == "verified"), default=None)
    return [r for r in rows if verified is None or r["at"] > verified]


def _merge_delete(spark: SparkSession, tables: Tables, table: C.TableSpec, source: DataFrame, condition: str) -> int:
    view = f"_forget_{table.name}"
    source.createOrReplaceTempView(view)
    statement = (f"MERGE INTO {tables.sql_name(table)} AS target USING {view} AS source ON {condition} "
                 "WHEN MATCHED THEN DELETE")
    result = with_retries(lambda: spark.sql(statement).collect(), f"erase from {table.name}")
    spark.catalog.dropTempView(view)
    return int(result[0]["num_deleted_rows"]) if result else 0


def _delete(spark: SparkSession, tables: Tables, table: C.TableSpec, request: ErasureRequest) -> int:
    """Delete the request's customers from one table (0 when it holds none of them)."""
    columns = set(table.columns)
    if table is C.EVENTS_QUARANTINE:  # raw rows: wherever an id appears in their text
        condition = " OR ".join(f"instr(target.{c}, source.needle) > 0" for c in _SEARCHED_TEXT[table.name])
        return _merge_delete(spark, tables, table, request.needles, condition)
    if table is C.USER_IDENTITIES:
        return _merge_delete(spark, tables, table, request.ids.select(F.col("raw_id").alias("user_id")),
                             "target.user_id = source.user_id")
    if "user_id" in columns:
        return _merge_delete(spark, tables, table, request.ids.select("user_id"), "target.user_id = source.user_id")
    if "user_idx" in columns and request.indices is not None:
        return _merge_delete(spark, tables, table, request.indices, "target.user_idx = source.user_idx")
    return 0


def _redact(spark: SparkSession, tables: Tables, table: C.TableSpec, column: str, needles: DataFrame) -> int:
    """Replace every id quoted in ``column`` by REDACTION; returns the rows changed."""
    # Rows are matched on every comparable column (the table has no key); a map cannot be compared.
    keys = [f.name for f in table.schema.fields if not isinstance(f.dataType, MapType)]
    longest_first = F.array_sort(F.collect_set("needle"), lambda a, b: F.length(b) - F.length(a))
    hits = (tables.read(spark, table).select(*keys)
            .join(F.broadcast(needles), F.instr(F.col(column), F.col("needle")) > 0)
            .groupBy(*keys).agg(longest_first.alias("_needles")))
    source = hits.select(*keys, F.aggregate("_needles", F.col(column), lambda text, needle: F.replace(
        text, needle, F.lit(REDACTION))).alias("_redacted")).localCheckpoint(eager=True)
    if source.isEmpty():
        return 0
    view = f"_redact_{table.name}"
    source.createOrReplaceTempView(view)
    condition = " AND ".join(f"target.`{k}` <=> source.`{k}`" for k in keys)
    statement = (f"MERGE INTO {tables.sql_name(table)} AS target USING {view} AS source ON {condition} "
                 f"WHEN MATCHED THEN UPDATE SET target.`{column}` = source._redacted")
    result = with_retries(lambda: spark.sql(statement).collect(), f"redact {table.name}.{column}")
    spark.catalog.dropTempView(view)
    return int(result[0]["num_updated_rows"]) if result else 0


def _optional(read: Callable[[], DataFrame]) -> DataFrame | None:
    """``read()``, or None when its path does not exist (no exports, no saved model yet)."""
    try:
        frame = read()
        frame.schema
    except AnalysisException as err:
        if "PATH_NOT_FOUND" in str(err) or "UNABLE_TO_INFER_SCHEMA" in str(err):
            return None
        raise
    return frame


def _model_factors(spark: SparkSession, models_root: str | None) -> DataFrame | None:
    """The user factors of every saved model, with the model's directory (``model``)."""
    if not models_root:
        return None
    factors = _optional(lambda: spark.read.parquet(f"{models_root}/*/userFactors"))
    if factors is None:
        return None
    return factors.withColumn("model", F.regexp_extract(F.input_file_name(), r"^(.*)/userFactors/[^/]+$", 1))


def _erase_from_models(spark: SparkSession, models_root: str | None, indices: DataFrame | None) -> dict[str, int]:
    """Rewrite each saved model's user factors without the customers; returns rows removed per model."""
    factors = _model_factors(spark, models_root)
    if factors is None or indices is None:
        return {}
    erased = F.broadcast(indices.select(F.col("user_idx").alias("id")))
    hits = factors.join(erased, "id").groupBy("model").count().collect()  # one row per model holding them
    for hit in hits:
        path = f"{hit['model']}/userFactors"
        # Materialised first: the overwrite deletes the files the kept rows are read from.
        kept = spark.read.parquet(path).join(erased, "id", "left_anti").localCheckpoint(eager=True)
        kept.write.mode("overwrite").parquet(path)
    return {hit["model"]: int(hit["count"]) for hit in hits}


def _export_files(spark: SparkSession, exports_root: str | None) -> DataFrame | None:
    """external_id and file of every CSV and JSON part file under the exports root."""
    if not exports_root or not local_path(exports_root).is_dir():
        return None
    frames = [_optional(lambda: spark.read.option("header", True).csv(f"{exports_root}/*/*/csv/part-*")),
              _optional(lambda: spark.read.json(f"{exports_root}/*/*/json/part-*"))]
    frames = [f.select(F.col("external_id").cast("string").alias("value"), F.input_file_name().alias(_FILE))
              for f in frames if f is not None and "external_id" in f.columns]
    return reduce(DataFrame.unionByName, frames) if frames else None


def _remove_exports(spark: SparkSession, exports_root: str | None, ids: DataFrame) -> list[str]:
    """Remove every export directory (campaign/run) whose files name a customer; returns them."""
    files = _export_files(spark, exports_root)
    if files is None:
        return []
    holding = _matching_files(files, ids, "value")
    root = local_path(exports_root)
    removed = sorted({"/".join(local_path(unquote(f)).relative_to(root).parts[:2]) for f in holding})
    for directory in removed:
        shutil.rmtree(root / directory)
    return removed


def _matching_files(values: DataFrame, ids: DataFrame, column: str) -> list[str]:
    """Files (``_FILE``) where ``column`` equals one of the ids (``user_id``): one row per file."""
    found = values.join(F.broadcast(ids.select(F.col("user_id").alias("_id"))), F.col(column) == F.col("_id"))
    return [r[0] for r in found.select(_FILE).distinct().collect()]


def _containing_files(values: DataFrame, needles: DataFrame, column: str) -> list[str]:
    """Files (``_FILE``) where the text ``column`` contains a needle: one row per file."""
    found = (values.select(F.col(column).alias("_text"), _FILE)
             .join(F.broadcast(needles), F.instr("_text", F.col("needle")) > 0))
    return [r[0] for r in found.select(_FILE).distinct().collect()]


def _list_files(spark: SparkSession, location: str) -> list[str]:
    """Every file under ``location``, recursively (Spark skips names starting with _ or .)."""
    files = _optional(lambda: spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(location))
    return [] if files is None else [r[0] for r in files.select("path").collect()]  # one row per file


def _table_files(spark: SparkSession, tables: Tables,
                 present: list[C.TableSpec]) -> dict[str, tuple[list[str], list[str]]]:
    """Per table: (its data files of every version still on disk, its transaction-log files)."""
    if tables.uses_catalog:
        found = {}
        for table in present:
            location = spark.sql(f"DESCRIBE DETAIL {tables.sql_name(table)}").first()["location"]
            found[table.name] = (_list_files(spark, location), _list_files(spark, f"{location}/_delta_log"))
        return found
    names = {t.name for t in present}
    found = {name: ([], []) for name in names}
    root = tables.root.rstrip("/")
    for path in _list_files(spark, root):  # the tables' directories: data files only (no _delta_log)
        table = _under(path, root)
        if table in names:
            found[table][0].append(path)
    for path in _list_files(spark, f"{root}/*/_delta_log"):
        table = _under(path, root)
        if table in names:
            found[table][1].append(path)
    return found


def _under(path: str, root: str) -> str:
    """The first directory of ``path`` below ``root`` (both as Spark writes them: URI or plain path)."""
    plain = lambda text: unquote(text).removeprefix("file://").removeprefix("file:")  # noqa: E731
    rest = plain(path).removeprefix(plain(root).rstrip("/") + "/")
    return rest.split("/", 1)[0]


def _data_traces(spark: SparkSession, table: C.TableSpec, files: list[str], request: ErasureRequest) -> list[str]:
    """Data files of ``table`` (any version) holding a customer: by id, by user_idx, or quoted in text."""
    parquet = [f for f in files if f.endswith(".parquet")]
    if not parquet:
        return []
    try:
        frames = [spark.read.option("mergeSchema", "true").parquet(*parquet)]
    except AnalysisException:  # versions with conflicting column types: one file at a time
        frames = [spark.read.parquet(f) for f in parquet]
    found: set[str] = set()
    for frame in frames:
        frame = frame.withColumn(_FILE, F.input_file_name())
        for column in (c for c in ID_COLUMNS if c in frame.columns):
            found.update(_matching_files(frame, request.exact, column))
        for column in (c for c in _SEARCHED_TEXT.get(table.name, ()) if c in frame.columns):
            found.update(_containing_files(frame, request.needles, column))
        if "user_idx" in frame.columns and request.indices is not None:
            found.update(_matching_files(frame, request.indices.select(F.col("user_idx").alias("user_id")), "user_idx"))
    return sorted(found)


def _log_traces(spark: SparkSession, log_files: list[str], request: ErasureRequest) -> list[str]:
    """Transaction-log files whose file statistics hold a customer (min/max of a personal column)."""
    texts = [f for f in log_files if not f.endswith(".parquet")]
    checkpoints = [f for f in log_files if f.endswith(".parquet")]
    frames = []
    if texts:  # JSON commits (and checksums): one action per line
        lines = spark.read.text(texts).withColumn(_FILE, F.input_file_name())
        frames += [lines.select(F.get_json_object("value", f"$.{action}.stats").alias("stats"), _FILE)
                   for action in ("add", "remove")]
    for path in checkpoints:  # checkpoint schemas differ between tables: one at a time
        checkpoint = spark.read.parquet(path)
        if "add" in checkpoint.columns and "stats" in checkpoint.schema["add"].dataType.fieldNames():
            frames.append(checkpoint.select(F.col("add.stats").alias("stats"), F.input_file_name().alias(_FILE)))
    found: set[str] = set()
    for frame in frames:
        frame = frame.where(F.col("stats").isNotNull())
        values = [F.get_json_object("stats", f"$.{bound}.{column}") for bound in ("minValues", "maxValues")
                  for column in C.PERSONAL_COLUMNS]
        stats = frame.select(F.explode(F.array(*values)).alias("value"), _FILE).where(F.col("value").isNotNull())
        # Delta truncates string statistics to a prefix: a prefix of an id is a trace too.
        prefix = F.expr("length(value) >= 8 AND startswith(needle, value)")
        found.update(r[0] for r in stats.join(F.broadcast(request.needles),
                                              (F.instr("value", F.col("needle")) > 0) | prefix)
                     .select(_FILE).distinct().collect())
    return sorted(found)


def _report_traces(spark: SparkSession, roots: tuple[str, ...], ids: DataFrame) -> list[str]:
    """Report files naming a customer as a whole word (markdown: cells, code spans, quotes)."""
    files = [f for root in roots for f in _list_files(spark, root)]
    if not files:
        return []
    words = (spark.read.text(files).select(F.explode(F.split("value", r"[\s|,;:`'\"()\[\]{}<>]+")).alias("word"),
                                           F.input_file_name().alias(_FILE)))
    return _matching_files(words, ids, "word")


def prepare_request(spark: SparkSession, tables: Tables, raw_ids: DataFrame, key: bytes | None, name: str,
                    run_id: str) -> ErasureRequest:
    """The request's ids as the tables hold them, as text may quote them, and their user_idx (while
    ``user_index`` still has them), materialised once for every step."""
    if "user_id" not in raw_ids.columns:
        raise PrivacyError(f"the erasure list needs a user_id column; it has {', '.join(raw_ids.columns)}")
    raw = raw_ids.select(clean_id(F.col("user_id")).alias("raw_id")).where("raw_id IS NOT NULL").distinct()
    # The ids the tables hold: pseudonyms when pseudonymisation is on, else the raw ids themselves.
    ids = raw.select("raw_id", (pseudonym(F.col("raw_id"), key) if key else F.col("raw_id")).alias("user_id"))
    ids = ids.localCheckpoint(eager=True)
    plain = ids.select(F.col("raw_id").alias("needle")).union(ids.select(F.col("user_id").alias("needle")))
    as_json = F.regexp_extract(F.to_json(F.struct(F.col("needle").alias("n"))), r'^\{"n":"(.*)"\}$', 1)
    needles = (plain.union(plain.select(as_json.alias("needle")))
               .union(plain.select(F.replace("needle", F.lit('"'), F.lit('""')).alias("needle")))  # CSV quoting
               .distinct().localCheckpoint(eager=True))
    indices = None
    if tables.exists(spark, C.USER_INDEX):  # resolve user_idx before the index rows go
        indices = (tables.read(spark, C.USER_INDEX).join(ids.select("user_id"), "user_id")
                   .select("user_idx").localCheckpoint(eager=True))
    exact = plain.select(F.col("needle").alias("user_id")).distinct().localCheckpoint(eager=True)
    return ErasureRequest(name, run_id, ids, exact, needles, indices)


def verify_erasure(spark: SparkSession, tables: Tables, request: ErasureRequest, targets: ErasureTargets,
                   retention_hours: float) -> tuple[int, list[str], list[str]]:
    """(files checked, files that must not hold the customers but do, older data files that still
    hold them only until the VACUUM retention has passed).

    Reads every data file under every table (all versions still on disk, not only the current
    snapshot), the statistics in every transaction-log file, the export files, the saved models'
    user factors and the report files."""
    present = [t for t in C.ALL_TABLES if tables.exists(spark, t)]
    files = _table_files(spark, tables, present)
    failures, pending = [], []
    checked = 0
    for table in present:
        data, log_files = files[table.name]
        checked += len(data) + len(log_files)
        failures += _log_traces(spark, log_files, request)
        held = _data_traces(spark, table, data, request)
        if held and retention_hours > 0:
            current = {name.rsplit("/", 1)[-1] for name in tables.read(spark, table).inputFiles()}
            pending += [f for f in held if f.rsplit("/", 1)[-1] not in current]
            held = [f for f in held if f.rsplit("/", 1)[-1] in current]
        failures += held
    exports = _export_files(spark, targets.exports_root)
    if exports is not None:
        failures += _matching_files(exports, request.exact, "value")
    factors = _model_factors(spark, targets.models_root)
    if factors is not None and request.indices is not None:
        models = factors.withColumn(_FILE, F.input_file_name())
        failures += _matching_files(models, request.indices.select(F.col("user_idx").alias("user_id")), "id")
    failures += _report_traces(spark, targets.report_roots, request.exact)
    return checked, failures, pending


def _vacuum(spark: SparkSession, tables: Tables, names: list[str], retention_hours: float) -> None:
    check = "spark.databricks.delta.retentionDurationCheck.enabled"
    if retention_hours < DELTA_DEFAULT_RETENTION_HOURS:
        # The operator asked for a shorter retention (erasure now rather than in a week): Delta's
        # guard against vacuuming files a running writer still needs is lifted for this call only.
        log.warning("VACUUM with %s h retention: make sure no other job writes these tables now", retention_hours)
        spark.conf.set(check, "false")
    try:
        for name in names:
            # Rows deleted through deletion vectors stay inside the current files until they are purged.
            spark.sql(f"REORG TABLE {tables.sql_name(C.BY_NAME[name])} APPLY (PURGE)")
            spark.sql(f"VACUUM {tables.sql_name(C.BY_NAME[name])} RETAIN {retention_hours} HOURS")
    finally:
        spark.conf.unset(check)


def holds_customers(table: C.TableSpec) -> bool:
    """True for a table that may hold a customer: a personal column or a user_idx."""
    return bool(table.personal) or "user_idx" in table.columns


def forget(spark: SparkSession, tables: Tables, raw_ids: DataFrame, key: bytes | None, retention_hours: float,
           request: str = "", run_id: str = "", targets: ErasureTargets = ErasureTargets()) -> ErasureReport:
    """Erase every trace of the customers in ``raw_ids`` (one column ``user_id``: the ids as the
    source system knows them) and verify that none is left; resumable.

    In order: delete them from every table (the id maps last), rewrite the saved models' user
    factors without them, redact ids quoted in ``pipeline_runs`` / ``data_quality`` text, remove
    export directories naming them, REORG and VACUUM every table that may hold a customer (whether
    or not this attempt deleted from it, so a rerun after a kill finishes the job), then read every
    file left (``verify_erasure``). Each step is recorded in ``erasure_requests`` under ``request``
    (the request's location, no id); counts add up over the attempts since the request was last
    verified. Raises ErasureIncomplete, naming the files, when a file still holds a customer."""
    work = prepare_request(spark, tables, raw_ids, key, request, run_id)
    _record(spark, tables, work, "requested", [(None, work.ids.count())])

    def delete(tables_in_order: list[C.TableSpec]) -> None:
        # A table with deletions is recorded at once (a rerun after a kill reports them); the
        # others, deleting nothing, share one record.
        untouched = []
        for table in tables_in_order:
            count = _delete(spark, tables, table, work)
            if count:
                _record(spark, tables, work, "deleted", [(table.name, count)])
            else:
                untouched.append((table.name, 0))
        _record(spark, tables, work, "deleted", untouched)

    present = [t for t in C.ALL_TABLES if holds_customers(t) and tables.exists(spark, t)]
    delete([t for t in present if t not in C.BOOKKEEPING and t not in _MAPS])
    _record(spark, tables, work, "model_rewritten",
            list(_erase_from_models(spark, targets.models_root, work.indices).items()))
    delete([t for t in _MAPS if t in present])
    _record(spark, tables, work, "redacted", [(table.name, _redact(spark, tables, table, column, work.needles))
                                              for table, column in _REDACTED if table in present])
    _record(spark, tables, work, "export_removed",
            [(directory, 1) for directory in _remove_exports(spark, targets.exports_root, work.exact)])
    vacuumed = [t.name for t in present]
    _vacuum(spark, tables, vacuumed, retention_hours)
    _record(spark, tables, work, "vacuumed", [(name, 0) for name in vacuumed])

    history = _earlier_attempts(spark, tables, request)  # this attempt and the unverified ones before it
    checked, failures, pending = verify_erasure(spark, tables, work, targets, retention_hours)
    attempt = sum(r["step"] == "requested" for r in history)
    if failures:
        _record(spark, tables, work, "verification_failed", [(f, 1) for f in failures])
        shown = "\n  ".join(failures[:20]) + (f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else "")
        raise ErasureIncomplete(f"erasure request {request or '(unnamed)'}: {len(failures)} file(s) still hold an "
                                f"erased customer after attempt {attempt}:\n  {shown}")
    if not pending:  # with a retention, older files still hold them: a later rerun completes the request
        _record(spark, tables, work, "verified", [(None, checked)])

    def totals(step: str) -> dict[str, int]:
        summed: dict[str, int] = {}
        for row in history:
            if row["step"] == step:
                summed[row["target"]] = summed.get(row["target"], 0) + int(row["rows"])
        return summed

    report = ErasureReport(totals("deleted"), totals("redacted"), sorted(totals("export_removed")),
                           sorted(totals("model_rewritten")), vacuumed, checked, pending, attempt)
    log.info("erasure %s, attempt %d: %s", request, attempt, report)
    return report


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
