"""The whole pipeline where users run it: a standalone cluster, Spark Connect, catalog tables.

Each run is the real entry point on a tiny sample; the three run at the same time (they are
mostly driver-side latency). The standalone run is the reference the Connect run and the
catalog-mode run are compared with, table by table.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from functools import reduce
from pathlib import Path
from urllib.parse import quote

import httpx
import pyspark
import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs import run_pipeline
from jobs.stages import PIPELINE
from test_service import AUTH, serve  # the API on a real uvicorn server (tests/test_service.py)

pytestmark = pytest.mark.slow  # three whole pipeline runs: minutes

REPO_ROOT = Path(__file__).resolve().parents[1]
SPARK_HOME = Path(pyspark.__file__).resolve().parent
SAMPLE_EVENTS = 2000
# A hung run fails the test instead of CI's 90 minutes; the three runs at once on two cores took
# up to 891 s of setup (docs/tests.md), so the limit leaves them twice that.
RUN_TIMEOUT_SECONDS = 1800
CONNECT_PORT = 15002

# Small enough that each run is dominated by JVM start-up and Delta commits, big enough that
# every stage has real work (several users per planted segment, items per segment).
TINY = {
    "sample.users": "120",
    "sample.items": "40",
    "sample.events": str(SAMPLE_EVENTS),
    "sample.segments": "3",
    "sample.days": "5",
    "ingest.now": "2026-11-01T00:00:00+00:00",
    "spark.shuffle_partitions": "2",
}
# Cheaper settings for the model stages, applied only for keys conf/base.toml declares (the
# stages join the pipeline independently of these tests).
CHEAP_IF_DECLARED = {
    "segments.k": "3",
    "segments.max_iter": "10",
    "segments.sweep_ks": "[]",
    "segments.stability_check": "false",
    "scores.gbt_max_iter": "5",
    "recommend.top_n": "5",
    "recommend.k_values": "[5]",
    "recommend.tune_k": "5",
    "recommend.als.ranks": "[4]",
    "recommend.als.reg_params": "[0.1]",
    "recommend.als.alphas": "[1.0]",
    "recommend.als.max_iter": "3",
}


def _declared_keys() -> set[str]:
    def walk(node: dict, prefix: str) -> set[str]:
        keys = set()
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            keys |= walk(value, f"{dotted}.") if isinstance(value, dict) else {dotted}
        return keys

    return walk(tomllib.loads((REPO_ROOT / "conf" / "base.toml").read_text()), "")


def tiny_settings(**overrides: str) -> list[str]:
    """``--set`` arguments for a tiny, cheap run."""
    declared = _declared_keys()
    settings = {**TINY, **{k: v for k, v in CHEAP_IF_DECLARED.items() if k in declared}, **overrides}
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def wait_for_port_free(port: int, timeout_seconds: float) -> None:
    """A local Connect server always listens on 15002: wait for another one (another run on this
    machine) to end rather than fail."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"port {port} stayed taken for {timeout_seconds:.0f} s: the local Spark Connect "
                                "server of this test needs it")
        time.sleep(2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Submission:
    """One ./spark-submit.sh run in the background, its output in ``log``."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.args, self.log = args, log
        self.started, self.seconds = time.monotonic(), 0.0
        with log.open("w") as out:
            self.process = subprocess.Popen(["./spark-submit.sh", *args], cwd=REPO_ROOT, stdout=out,
                                            stderr=subprocess.STDOUT, env=env or dict(os.environ),
                                            start_new_session=True)

    def poll(self) -> bool:
        """True once the run has ended (its wall time is then in ``seconds``)."""
        if self.process.poll() is None:
            if time.monotonic() - self.started < RUN_TIMEOUT_SECONDS:
                return False
            _stop(self.process)
        self.seconds = self.seconds or time.monotonic() - self.started
        return True

    def check(self) -> None:
        """Fail with the log's tail unless the run succeeded."""
        tail = "".join(self.log.read_text().splitlines(keepends=True)[-60:])
        assert self.process.returncode == 0, \
            f"spark-submit {' '.join(self.args[:2])} ... failed ({self.process.returncode}):\n{tail}"


def wait_for(submissions: list[Submission]) -> None:
    while not all([submission.poll() for submission in submissions]):
        time.sleep(0.5)


# Every table the pipeline writes on the tiny sample (no k sweep is configured), from the registry.
# (nmf_k_sweep, products and user_identities are written only when sweep_ks, input.items or
# privacy.pseudonymize are configured.)
EXPECTED_TABLES = sorted({table.name for stage in PIPELINE for table in stage.writes}
                         - {"nmf_k_sweep", "products", "products_quarantine", "user_identities"}
                         | {"pipeline_runs", "data_quality"})


def delta_tables(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob("*/_delta_log"))


def read_path(spark: SparkSession, root: Path, table: str) -> DataFrame:
    return spark.read.format("delta").load(str(root / table))


def row_counts(read, tables: list[str]) -> dict[str, int]:
    """Rows per table, counted in one Spark job."""
    tagged = reduce(DataFrame.unionByName, [read(table).select(F.lit(table).alias("table")) for table in tables])
    counted = {row["table"]: row["count"] for row in tagged.groupBy("table").count().collect()}
    return {table: counted.get(table, 0) for table in tables}


def assert_pipeline_succeeded(runs: DataFrame) -> None:
    stages = [stage.name for stage in PIPELINE]
    rows = runs.select("run_id", "stage", "status", "message").collect()
    assert len({row["run_id"] for row in rows}) == 1, rows
    assert sorted(row["stage"] for row in rows) == sorted(["generate_events", *stages])
    assert [row for row in rows if row["status"] != "success"] == []


def segment_assignment(df: DataFrame) -> set[tuple]:
    return {(row["user_id"], row["segment_id"]) for row in df.select("user_id", "segment_id").collect()}


def interaction_scores(spark: SparkSession, read) -> dict[tuple[str, str], float]:
    """Interactions keyed by (user_id, item_id), so differently numbered indices still compare."""
    joined = (read("interactions").join(read("user_index"), "user_idx").join(read("item_index"), "item_idx")
              .select("user_id", "item_id", "score"))
    return {(row["user_id"], row["item_id"]): row["score"] for row in joined.collect()}


# ------------------------------------------------------------------ standalone cluster

def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _wait_for_worker(ui_port: int, processes: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for process, log in zip(processes, logs):
            assert process.poll() is None, f"{log.name} exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=5) as response:
                state = json.load(response)
            if state.get("aliveworkers", 0) >= 1:
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError("the standalone worker did not register with the master within 120 s")


@pytest.fixture(scope="module")
def executor_python(tmp_path_factory) -> Path:
    """The venv's interpreter without site processing, so this repository's editable install
    (a .pth hook) is invisible: executors can import ``lib`` only from ``--py-files dist/lib.zip``."""
    site_packages = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
    shim = tmp_path_factory.mktemp("executor") / "python"
    shim.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site_packages}" exec {sys.executable} -S "$@"\n'
    )
    shim.chmod(0o755)
    return shim


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of the cluster daemons: no repository, no venv, only Java and Spark."""
    venv_bin = str(Path(sys.executable).parent)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYSPARK", "PYTHON", "SPARK", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP="127.0.0.1", **extra)
    return env


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory):
    """A Spark standalone master and one worker (1 core, 1g) on 127.0.0.1; stopped afterwards."""
    base = tmp_path_factory.mktemp("standalone")
    master_port, master_ui, worker_port, worker_ui = (free_port() for _ in range(4))
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    env = _clean_env(SPARK_LOG_DIR=str(base / "logs"), SPARK_WORKER_DIR=str(base / "work"))
    commands = {
        "master": [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                   "--port", str(master_port), "--webui-port", str(master_ui)],
        "worker": [spark_class, "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{master_port}",
                   "--host", "127.0.0.1", "--port", str(worker_port), "--webui-port", str(worker_ui),
                   "--cores", "1", "--memory", "1536m", "--work-dir", str(base / "work")],
    }
    processes, logs = [], []
    try:
        for name, command in commands.items():
            log = base / f"{name}.log"
            with log.open("w") as out:
                processes.append(subprocess.Popen(command, cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
            logs.append(log)
        _wait_for_worker(master_ui, processes, logs)
        yield {"url": f"spark://127.0.0.1:{master_port}", "ui_port": master_ui, "work_dir": base / "work"}
    finally:
        for process in reversed(processes):
            _stop(process)


@pytest.fixture(scope="module")
def pipeline_runs(spark, standalone_cluster, executor_python, tmp_path_factory):
    """The whole pipeline three times at once: submitted to the standalone cluster, submitted over
    Spark Connect, and in catalog mode in this session (its catalog is the one to inspect).
    Yields each run's location; a failed catalog run is kept for its test to raise."""
    wait_for_port_free(CONNECT_PORT, timeout_seconds=600)
    roots = {name: tmp_path_factory.mktemp(name) for name in ("cluster", "connect", "catalog")}
    cluster = Submission([
        "--master", standalone_cluster["url"],
        "--conf", f"spark.pyspark.python={executor_python}",
        "--conf", f"spark.pyspark.driver.python={sys.executable}",
        "--conf", "spark.driver.host=127.0.0.1",
        "--conf", "spark.executor.memory=1g",
        "--conf", "spark.cores.max=1",
        "jobs/run_pipeline.py", "--set", f"output.root={roots['cluster'] / 'wh'}", *tiny_settings(),
    ], roots["cluster"] / "submit.log", env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"})
    connect = Submission(["--remote", "local[2]", "jobs/run_pipeline.py",
                          "--set", f"output.root={roots['connect'] / 'wh'}", *tiny_settings()],
                         roots["connect"] / "submit.log")

    schema = f"deploy_{os.getpid()}"
    spark.sql(f"CREATE SCHEMA spark_catalog.{schema} LOCATION '{roots['catalog'] / 'schema'}'")
    catalog_error, started = None, time.monotonic()
    try:
        run_pipeline.main([
            "--set", "output.root=", "--set", "output.catalog=spark_catalog", "--set", f"output.schema={schema}",
            "--set", f"sample.path={roots['catalog'] / 'sample'}",
            "--set", f"recommend.model_dir={roots['catalog'] / 'models'}", *tiny_settings(),
        ])
    except (Exception, SystemExit) as err:
        catalog_error = err
    catalog_seconds = time.monotonic() - started
    try:
        wait_for([cluster, connect])
        print(f"wall time: standalone cluster {cluster.seconds:.1f} s, Spark Connect {connect.seconds:.1f} s, "
              f"catalog mode (in the test session) {catalog_seconds:.1f} s, all three at once")
        cluster.check()
        yield {"cluster": roots["cluster"] / "wh", "connect_root": roots["connect"] / "wh", "connect": connect,
               "schema": schema, "schema_dir": roots["catalog"] / "schema", "catalog_error": catalog_error}
    finally:
        _stop(cluster.process)
        _stop(connect.process)
        spark.sql(f"DROP SCHEMA IF EXISTS spark_catalog.{schema} CASCADE")
        shutil.rmtree(roots["catalog"], ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_run(pipeline_runs) -> Path:
    return pipeline_runs["cluster"]


@pytest.fixture(scope="module")
def cluster_counts(spark, cluster_run) -> dict[str, int]:
    return row_counts(lambda table: read_path(spark, cluster_run, table), delta_tables(cluster_run))


def test_executor_python_cannot_import_the_repository_by_itself(executor_python, tmp_path):
    env = _clean_env()
    probe = lambda code: subprocess.run([str(executor_python), "-c", code], cwd=tmp_path, env=env,  # noqa: E731
                                        capture_output=True, text=True)
    assert probe("import numpy, pandas, pyarrow").returncode == 0
    blocked = probe("import lib")
    assert blocked.returncode != 0 and "No module named 'lib'" in blocked.stderr


def test_pipeline_on_a_standalone_cluster(spark, standalone_cluster, cluster_run, cluster_counts):
    assert sorted(cluster_counts) == EXPECTED_TABLES
    assert_pipeline_succeeded(read_path(spark, cluster_run, "pipeline_runs"))
    generated = read_path(spark, cluster_run, "pipeline_runs").where("stage = 'generate_events'").first()
    assert generated["counts"]["sample_events"] == SAMPLE_EVENTS  # plus the planted campaign's events
    assert cluster_counts["events"] == generated["rows_out"]
    interactions = read_path(spark, cluster_run, "interactions")
    assert interactions.agg(F.sum("n_events")).first()[0] == generated["rows_out"]
    assert cluster_counts["campaign_results"] > 0

    # The work ran in the worker's executor, which fetched lib.zip from the driver.
    with urllib.request.urlopen(f"http://127.0.0.1:{standalone_cluster['ui_port']}/json/", timeout=10) as response:
        state = json.load(response)
    apps = state["completedapps"] + state["activeapps"]
    assert [app["name"] for app in apps] == ["email-personalization-pipeline"]
    executor_dirs = list(standalone_cluster["work_dir"].glob(f"{apps[0]['id']}/*"))
    assert len(executor_dirs) == 1
    assert (executor_dirs[0] / "lib.zip").is_file()
    assert "Finished task" in (executor_dirs[0] / "stderr").read_text()


# ------------------------------------------------------------------ Spark Connect

def test_pipeline_over_spark_connect_matches_the_classic_run(spark, pipeline_runs, cluster_run, cluster_counts,
                                                             delta_rs_rows):
    pipeline_runs["connect"].check()
    log = pipeline_runs["connect"].log.read_text()
    assert "Spark session: Spark Connect" in log, log[-3000:]
    connect_run = pipeline_runs["connect_root"]
    read_classic = lambda table: read_path(spark, cluster_run, table)  # noqa: E731
    read_remote = lambda table: read_path(spark, connect_run, table)  # noqa: E731
    assert delta_tables(connect_run) == delta_tables(cluster_run)
    assert_pipeline_succeeded(read_remote("pipeline_runs"))
    assert row_counts(read_remote, delta_tables(connect_run)) == cluster_counts
    classic_scores, remote_scores = interaction_scores(spark, read_classic), interaction_scores(spark, read_remote)
    assert classic_scores.keys() == remote_scores.keys()
    assert all(remote_scores[key] == pytest.approx(score, rel=1e-9) for key, score in classic_scores.items())
    assert segment_assignment(read_remote("user_segments")) == segment_assignment(read_classic("user_segments"))

    # Every table opens with delta-rs too, with Spark's rows: no schema records `string collate
    # UTF8_BINARY`, which Connect's client used to send for StringType() casts (issue 27).
    assert delta_rs_rows(connect_run) == cluster_counts
    # So the API (delta-rs) started on that warehouse answers a profile with the segment's label.
    user = read_remote("user_segments").orderBy("user_id").first()
    label = read_remote("segment_profiles").where(F.col("segment_id") == user["segment_id"]).first()["label"]
    with serve(connect_run) as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        body = http.get(f"/v1/users/{quote(user['user_id'], safe='')}/profile").json()
    assert label and body["segment"]["segment_id"] == user["segment_id"] and body["segment"]["label"] == label, body
    assert body["missing_sources"] == [], body


# ------------------------------------------------------------------ catalog tables

def test_pipeline_in_catalog_mode(spark, pipeline_runs, cluster_run, cluster_counts):
    """``catalog.schema.table`` names (the Databricks path) against the session's own catalog."""
    if pipeline_runs["catalog_error"] is not None:
        raise pipeline_runs["catalog_error"]
    schema = f"spark_catalog.{pipeline_runs['schema']}"
    names = sorted(row["tableName"] for row in spark.sql(f"SHOW TABLES IN {schema}").collect()
                   if not row["isTemporary"])
    assert names == sorted(cluster_counts)
    assert_pipeline_succeeded(spark.read.table(f"{schema}.pipeline_runs"))
    for table in names:
        detail = spark.sql(f"DESCRIBE DETAIL {schema}.{table}").first()
        assert detail["format"] == "delta"
        assert detail["location"].rstrip("/").endswith(f"{pipeline_runs['schema_dir'].name}/{table}")
    assert row_counts(lambda table: spark.read.table(f"{schema}.{table}"), names) == cluster_counts
    assert (segment_assignment(spark.read.table(f"{schema}.user_segments"))
            == segment_assignment(read_path(spark, cluster_run, "user_segments")))
