"""What every job shares: argument parsing, configuration, the session, stage bookkeeping."""
from __future__ import annotations

import argparse
import logging
import posixpath
import sys
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession

from jobs.stages import BY_NAME, StageSpec
from lib.ingest import readers
from lib.ingest.events import Rules
from lib.platform import catalog as C
from lib.platform.config import ConfigError, parse_toml, resolve
from lib.platform.promotion import check_promotion, losing_summary
from lib.platform.quality import (GateInput, Measurement, check_gates, drift_rows, measure_drift, quality_rows,
                                  raise_on_drift, raise_on_failure)
from lib.platform.runs import NOT_PROMOTED, StageResult, run_record
from lib.platform.settings import OutputSettings, Settings
from lib.platform.storage import COMMIT_METADATA_CONF, Tables, is_delta_path
from lib.platform.tracking import track_stage

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO_ROOT / "conf" / "base.toml"
log = logging.getLogger("jobs")
# Characters of a failed stage's error kept in its pipeline_runs message (lib.platform.runs keeps 4,000 in all).
ERROR_TEXT_LIMIT = 3000


@dataclass(frozen=True)
class StageContext:
    """What a stage's ``run(ctx)`` gets: the session, validated settings, the tables, the run id."""

    spark: SparkSession
    settings: Settings
    run_id: str

    @property
    def tables(self) -> Tables:
        return tables_of(self.settings.output)


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--conf", action="append", default=[], metavar="FILE",
                        help="TOML environment file(s) over conf/base.toml, e.g. conf/local.toml")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                        help="override one config key, e.g. --set interactions.half_life_days=14")
    parser.add_argument("--run-id", default="", help="run id to record (default: a new one)")
    return parser


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    return _parser(description).parse_args(argv)


def load_config(conf_files: list[str], sets: list[str]) -> dict:
    """conf/base.toml, then each --conf file, then each --set; a bad key stops the job here."""
    base = parse_toml(BASE_CONFIG.read_text(), str(BASE_CONFIG))
    overlays = []
    for name in conf_files:
        path = Path(name)
        if not path.is_file() and not path.is_absolute() and (REPO_ROOT / name).is_file():
            path = REPO_ROOT / name  # e.g. conf/databricks.toml shipped inside the installed wheel
        if not path.is_file():
            raise ConfigError(f"config file not found: {name}")
        overlays.append(parse_toml(path.read_text(), name))
    return resolve(base, overlays, sets)


def load_settings(conf_files: list[str], sets: list[str]) -> Settings:
    """The layered config as typed settings, every range and cross-key check done."""
    return Settings.from_config(load_config(conf_files, sets))


def submit_options(job_args: list[str]) -> list[str]:
    """The spark-submit options (heap sizes) the settings of a job's --conf / --set arguments ask for.

    spark-submit.sh calls it before the JVM starts. A config that does not validate gives none: the
    job then stops on it with the same error, naming the key.
    """
    args, _ = _parser("submit options").parse_known_args(job_args)
    try:
        return load_settings(args.conf, args.sets).spark.submit_options()
    except ConfigError:
        return []


def tables_of(output: OutputSettings) -> Tables:
    root = output.root
    if root and not output.catalog and not Path(root).is_absolute() and "://" not in root:
        root = str((Path.cwd() / root).resolve())
    return Tables(root=root, catalog=output.catalog, schema=output.schema)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]


def apply_runtime_settings(spark: SparkSession, settings: Settings) -> None:
    """The ``[spark]`` section's runtime SQL settings (a job's, and a benchmark's that builds its own session)."""
    for key, value in settings.spark.runtime_conf().items():
        spark.conf.set(key, value)


def get_session(app_name: str, settings: Settings) -> SparkSession:
    """The session spark-submit (or SPARK_REMOTE) prepared, with the job's runtime settings."""
    spark = SparkSession.builder.appName(app_name).getOrCreate()
    apply_runtime_settings(spark, settings)
    kind = "Spark Connect" if type(spark).__module__.startswith("pyspark.sql.connect") else "classic"
    log.info("Spark session: %s, Spark %s", kind, spark.version)
    return spark


def run_stage(ctx: StageContext, name: str) -> StageResult:
    """Run one registered stage all-or-nothing, recorded in ``pipeline_runs``.

    A ``running`` row is written first (a killed run stays visible as one), then the stage runs with
    every Delta commit tagged ``<run_id>:<stage>``, then its data-quality gates and drift checks
    (``data_quality`` and ``drift`` rows, kept whatever happens). When the stage, a gate or a drift
    check (with drift.action = fail) fails, every table the registry says it writes is restored to the
    version it had before (only where all newer commits carry this run's tag), the row becomes
    ``failed`` with the error, the stage's ``discard`` removes what it wrote outside Delta, and the
    error is re-raised. After the ``success`` row is written, the stage's ``publish`` makes its files
    outside Delta (exports) readable: a run that fails or is killed before that never has a readable
    export. A stage whose model loses to a baseline (``lib.platform.promotion``) ends ``not_promoted``
    with its shipped tables restored (``promote``); later stages then read the previous run's.
    """
    stage = BY_NAME[name]
    spark, tables = ctx.spark, ctx.tables
    tag = f"{ctx.run_id}:{name}"
    started = datetime.now(timezone.utc)
    log.info("stage %s: started (run %s)", name, ctx.run_id)
    versions_before = {table.name: tables.version(spark, table) for table in stage.writes}
    tables.append(run_record(spark, ctx.run_id, name, "running", started, None, StageResult()), C.PIPELINE_RUNS)
    spark.conf.set(COMMIT_METADATA_CONF, tag)
    try:
        result = stage.run(ctx)
        gate_input = GateInput(spark, tables, ctx.settings, result, versions_before, ctx.run_id)
        measurements = check_gates(name, gate_input)
        drifts = measure_drift(name, gate_input)
        checks = check_promotion(name, gate_input)
        if measurements or checks:
            tables.append(quality_rows(spark, ctx.run_id, name, measurements + checks), C.DATA_QUALITY)
        if drifts:
            tables.append(drift_rows(spark, ctx.run_id, name, drifts), C.DRIFT)
        raise_on_failure(name, measurements)
        raise_on_drift(name, drifts)
        spark.conf.unset(COMMIT_METADATA_CONF)
        status, note = promote(ctx, stage, checks, versions_before, tag)
        result.message = note + result.message
    except Exception as err:
        finished = datetime.now(timezone.utc)
        message = f"{type(err).__name__}: {err}"
        log.error("stage %s: failed after %.1f s: %s", name, (finished - started).total_seconds(), message)
        if "java.lang.OutOfMemoryError" in message:
            log.error("stage %s ran out of JVM heap: raise spark.driver_memory (local mode: all the heap there "
                      "is) or spark.executor_memory (a cluster); docs/deploy.md", name)
        # A JVM error carries its whole stack trace: cut it so the rollback note survives the record's limit.
        if len(message) > ERROR_TEXT_LIMIT:
            message = message[:ERROR_TEXT_LIMIT] + " ..."
        try:
            spark.conf.unset(COMMIT_METADATA_CONF)
            message += rollback(ctx, stage, versions_before, tag)
            _finish(ctx, name, "failed", started, finished, StageResult(message=message))
            if stage.discard is not None:
                stage.discard(ctx)
        except Exception:  # the original error matters more than a failed rollback or bookkeeping write
            log.error("could not roll back or record the failure:\n%s", traceback.format_exc())
        raise
    finally:
        spark.conf.unset(COMMIT_METADATA_CONF)
    finished = datetime.now(timezone.utc)
    _finish(ctx, name, status, started, finished, result)
    if stage.publish is not None:
        stage.publish(ctx)
    try:
        track_stage(spark, ctx.settings, tables, ctx.run_id, name, status, started, finished, result.counts,
                    {m.gate: m.value for m in checks}, (*stage.reads, *stage.writes), report_directories(ctx),
                    result.models, champion=bool(checks) and all(m.passed for m in checks))
    except Exception:  # the stage is done and recorded: tracking is a copy of what its tables hold
        log.warning("stage %s: not tracked in MLflow", name, exc_info=True)
    log.info("stage %s: %s in %.1f s, rows_in=%s rows_out=%s %s %s", name, status,
             (finished - started).total_seconds(), result.rows_in, result.rows_out, result.counts, result.message)
    return result


def promote(ctx: StageContext, stage: StageSpec, checks: list[Measurement], versions_before: dict[str, int | None],
            tag: str) -> tuple[str, str]:
    """(status, note for the run's message) after the stage's promotion checks: ``success`` when none
    failed; else, with ``promotion.action = keep_previous`` and a previous model to keep, the stage's
    shipped tables are restored and the status is ``not_promoted``; otherwise the new model ships
    with a warning."""
    losing = losing_summary(checks)
    if not losing:
        return "success", ""
    if ctx.settings.promotion.action == "warn":
        log.warning("stage %s: shipped although it loses to a baseline (promotion.action = warn): %s",
                    stage.name, losing)
        return "success", f"shipped although it loses to a baseline (promotion.action = warn): {losing}; "
    if versions_before[stage.ships[0].name] is None:
        log.warning("stage %s: shipped although it loses to a baseline, no previous %s to keep: %s",
                    stage.name, stage.ships[0].name, losing)
        return "success", f"shipped although it loses to a baseline, no previous model to keep: {losing}; "
    restored = rollback(ctx, stage, versions_before, tag, stage.ships)
    log.warning("stage %s: not promoted, the previous outputs stay: %s", stage.name, losing)
    return NOT_PROMOTED, f"not promoted, {restored.removeprefix('; ')} to the previous run's: {losing}; "


def _finish(ctx: StageContext, name: str, status: str, started: datetime, finished: datetime,
            result: StageResult) -> None:
    """Replace this attempt's ``running`` row with its outcome."""
    row = run_record(ctx.spark, ctx.run_id, name, status, started, finished, result)
    # Run and stage as literals let Delta skip every file but the running row's (by their min/max statistics).
    literal = lambda text: "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"  # noqa: E731
    ctx.tables.upsert(ctx.spark, row, C.PIPELINE_RUNS,
                      f"target.run_id = {literal(ctx.run_id)} AND target.stage = {literal(name)} "
                      "AND target.started_at = source.started_at AND target.status = 'running'")


def rollback(ctx: StageContext, stage: StageSpec, versions_before: dict[str, int | None], tag: str,
             tables: tuple[C.TableSpec, ...] | None = None) -> str:
    """Restore the stage's tables (``tables``, default every one it writes) to ``versions_before``;
    returns a note for the run's message."""
    restored, kept = [], []
    for table in stage.writes if tables is None else tables:
        commits = ctx.tables.commits_since(ctx.spark, table, versions_before[table.name])
        if not commits:
            continue
        if all(metadata == tag for _, metadata in commits):
            ctx.tables.restore(ctx.spark, table, versions_before[table.name])
            restored.append(table.name)
        else:  # another run committed too: restoring would undo its work
            kept.append(table.name)
    if restored:
        log.warning("stage %s: restored %s to their previous versions", stage.name, ", ".join(restored))
    if kept:
        log.warning("stage %s: %s also hold another run's commits and were NOT restored",
                    stage.name, ", ".join(kept))
    return ((f"; restored {', '.join(restored)}" if restored else "")
            + (f"; not restored (concurrent commits): {', '.join(kept)}" if kept else ""))


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("py4j").setLevel(logging.WARNING)


def start_job(name: str, description: str, argv: list[str] | None = None) -> StageContext:
    """Logging, command line, settings (a bad key exits with status 2), session: the stage context."""
    setup_logging()
    args = parse_args(description, argv)
    try:
        settings = load_settings(args.conf, args.sets)
        settings.check_directories()
    except ConfigError as err:
        log.error("%s", err)
        raise SystemExit(2) from None
    spark = get_session(f"email-personalization-{name}", settings)
    tables_of(settings.output).ensure_schema(spark)
    return StageContext(spark, settings, args.run_id or new_run_id())


def main_for(name: str, argv: list[str] | None = None) -> StageResult:
    """Entry point of a single-stage job: settings, session, the registered stage under bookkeeping."""

    ctx = start_job(name, BY_NAME[name].summary, argv)
    return run_stage(ctx, name)


def local_root(ctx: StageContext) -> Path | None:
    """output.root as a local directory (a plain path or file:), None for catalog tables or a remote root:
    where reports and export files go when no directory is configured for them."""
    tables = ctx.tables
    if tables.uses_catalog or not tables.root or "://" in tables.root and not tables.root.startswith("file:"):
        return None
    return Path(tables.root.removeprefix("file:"))


def report_directory(ctx: StageContext, configured: str, name: str) -> Path | None:
    """Where a stage's markdown report goes: the configured directory, else <output.root>/reports/<name>
    on a local root; None (no report) for catalog tables or a remote root without a configured one."""
    if configured:
        return Path(configured)
    root = local_root(ctx)
    return None if root is None else root / "reports" / name


def report_directories(ctx: StageContext) -> dict[str, Path | None]:
    """Each stage report's directory by report name (``report_directory``): where the stages write them,
    the run report finds their plots and an erasure looks for customers."""
    settings = ctx.settings
    configured = {"segments": settings.segments.report_dir, "recommendations": "",
                  "scores": settings.scores.report_dir, "campaigns": settings.campaign_report.report_dir}
    return {name: report_directory(ctx, directory, name) for name, directory in configured.items()}


def exports_root(ctx: StageContext) -> str | None:
    """exports.dir, else <output.root>/exports on a local root; None for catalog tables without a dir."""
    if ctx.settings.exports.dir:
        return str(Path(ctx.settings.exports.dir.removeprefix("file:")).resolve())
    root = local_root(ctx)
    return None if root is None else str(root / "exports")


def models_root(ctx: StageContext) -> str:
    """Where recommend_items saves each run's ALS model (<models_root>/<run_id>)."""
    return (ctx.settings.recommend.model_dir or f"{ctx.tables.root.rstrip('/')}/models/als").rstrip("/")


def score_models_root(ctx: StageContext) -> str:
    """Where score_customers saves each run's chosen models: ``scores`` beside the ALS models' directory
    (<root>/models/scores/<run_id>/<target>/{classifier,calibrator})."""
    return f"{posixpath.dirname(models_root(ctx))}/scores"


def read_matrix(ctx: StageContext) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(interactions, user_index, item_index) as build_interactions wrote them, or fail naming the missing one."""
    return tuple(ctx.tables.require(ctx.spark, table, "build_interactions")  # type: ignore[return-value]
                 for table in (C.INTERACTIONS, C.USER_INDEX, C.ITEM_INDEX))


def sample_root(settings: Settings) -> str:
    """Where the generated sample lands: sample.path, or <output.root>/sample."""
    if settings.sample.path:
        path = settings.sample.path
        return path if "://" in path else str(Path(path).resolve())
    tables = tables_of(settings.output)
    if tables.uses_catalog or not tables.root:
        raise ConfigError("config key 'sample.path' must be set: the sample needs a directory when tables "
                          "live in a catalog")
    return f"{tables.root}/sample"


def read_events_input(ctx: StageContext) -> tuple[DataFrame, str, str]:
    """(raw records, location, format) of the raw clickstream as the strict readers give it (with every
    column the source mapping names); the generated sample when input.events is empty."""
    source, settings = ctx.settings.input, ctx.settings.ingest
    if source.events:
        location = source.events
        fmt = source.format or readers.infer_format(location, has_delta_log=is_delta_path(ctx.spark, location))
    else:
        location, fmt = f"{sample_root(ctx.settings)}/events", "parquet"
    columns = {*source.source_names.values(), *source.revenue_product, *source.item_columns}
    raw = readers.read_raw(ctx.spark, location, fmt, csv_delimiter=settings.csv_delimiter,
                           csv_multiline=settings.csv_multiline, encoding=settings.encoding,
                           json_columns=sorted(columns))
    return raw, location, fmt


def ingest_rules(settings: Settings) -> Rules:
    """The ingest checks' parameters from [ingest] and [input] (the plausible event-time window is
    anchored at ingest.now, else now)."""
    ingest = settings.ingest
    now = ingest.now_utc or datetime.now(timezone.utc)
    return Rules(event_types=ingest.event_types, latest=now + timedelta(minutes=ingest.future_skew_minutes),
                 earliest=ingest.earliest_utc, timestamp_unit=settings.input.timestamp_unit)
