"""What every job shares: argument parsing, configuration files, the session, stage bookkeeping."""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pyspark.sql import SparkSession

from lib.config import ConfigError, parse_toml, resolve
from lib.runs import StageResult, run_record
from lib.storage import Tables

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO_ROOT / "conf" / "base.toml"
log = logging.getLogger("jobs")

Stage = Callable[[SparkSession, dict[str, Any], str], StageResult]


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--conf", action="append", default=[], metavar="FILE",
                        help="TOML environment file(s) over conf/base.toml, e.g. conf/local.toml")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                        help="override one config key, e.g. --set interactions.half_life_days=14")
    parser.add_argument("--run-id", default="", help="run id to record (default: a new one)")
    return parser.parse_args(argv)


def load_config(conf_files: list[str], sets: list[str]) -> dict[str, Any]:
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


def tables_of(config: dict[str, Any]) -> Tables:
    out = config["output"]
    root = out["root"]
    if root and not out["catalog"] and not Path(root).is_absolute() and "://" not in root:
        root = str((Path.cwd() / root).resolve())
    return Tables(root=root, catalog=out["catalog"], schema=out["schema"])


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]


def get_session(app_name: str, config: dict[str, Any]) -> SparkSession:
    """The session spark-submit (or SPARK_REMOTE) prepared, with the job's runtime settings."""
    spark = SparkSession.builder.appName(app_name).getOrCreate()
    spark.conf.set("spark.sql.shuffle.partitions", str(config["spark"]["shuffle_partitions"]))
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    for key, value in config["spark"]["conf"].items():
        spark.conf.set(key, str(value))
    kind = "Spark Connect" if type(spark).__module__.startswith("pyspark.sql.connect") else "classic"
    log.info("Spark session: %s, Spark %s", kind, spark.version)
    return spark


def run_stage(spark: SparkSession, config: dict[str, Any], run_id: str, name: str, stage: Stage) -> StageResult:
    """Run one stage and record it in ``pipeline_runs`` as success or failure (then re-raise)."""
    tables = tables_of(config)
    started = datetime.now(timezone.utc)
    log.info("stage %s: started (run %s)", name, run_id)
    try:
        result = stage(spark, config, run_id)
    except Exception as err:
        finished = datetime.now(timezone.utc)
        message = f"{type(err).__name__}: {err}"
        log.error("stage %s: failed after %.1f s: %s", name, (finished - started).total_seconds(), message)
        try:
            tables.append(run_record(spark, run_id, name, "failed", started, finished,
                                     StageResult(message=message)), "pipeline_runs")
        except Exception:  # the original error matters more than a failed bookkeeping write
            log.error("could not record the failure in pipeline_runs:\n%s", traceback.format_exc())
        raise
    finished = datetime.now(timezone.utc)
    tables.append(run_record(spark, run_id, name, "success", started, finished, result), "pipeline_runs")
    log.info("stage %s: done in %.1f s, rows_in=%s rows_out=%s %s %s", name,
             (finished - started).total_seconds(), result.rows_in, result.rows_out, result.counts, result.message)
    return result


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("py4j").setLevel(logging.WARNING)


def start_job(name: str, description: str, argv: list[str] | None = None) -> tuple[SparkSession, dict[str, Any], str]:
    """Logging, command line, configuration (a bad key exits with status 2), session: (spark, config, run_id)."""
    setup_logging()
    args = parse_args(description, argv)
    try:
        config = load_config(args.conf, args.sets)
    except ConfigError as err:
        log.error("%s", err)
        raise SystemExit(2) from None
    spark = get_session(f"email-personalization-{name}", config)
    tables_of(config).ensure_schema(spark)
    return spark, config, args.run_id or new_run_id()


def main_for(name: str, description: str, stage: Stage, argv: list[str] | None = None) -> StageResult:
    """Entry point of a single-stage job: config, session, the stage under bookkeeping."""
    spark, config, run_id = start_job(name, description, argv)
    return run_stage(spark, config, run_id, name, stage)
