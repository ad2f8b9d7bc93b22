"""The Airflow DAGs (resources/airflow/): parsed by Airflow itself, one task per stage in the Databricks
job's order, and each task's spark-submit a submission of its stage that the jobs accept.

Airflow runs in a child process (its import configures logging and a home directory of its own): it
parses the file as a scheduler would, renders each task's templates for a sample run and builds the
command line its SparkSubmitHook would run, and prints what the test checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.common import load_settings, parse_args
from jobs.stages import PIPELINE
from lib.platform.session import BATCH_CONF, DELTA_CONF, DELTA_PACKAGE
from test_bundle import JOB_KEY, load_bundle

REPO_ROOT = Path(__file__).resolve().parents[1]
DAG_FOLDER = REPO_ROOT / "resources" / "airflow"
SCHEDULED_RUN = "scheduled__2026-12-07T05:00:00+00:00"

PARSE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag

params = json.loads(sys.argv[2])
bag = DagBag(dag_folder=sys.argv[1], safe_mode=False)
out = {"errors": {str(k): str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    tasks = {}
    for task in dag.tasks:
        context = {"params": {**dag.params, **params}, "run_id": sys.argv[3]}
        for field in task.template_fields:
            setattr(task, field, task.render_template(getattr(task, field), context))
        entry = {"operator": type(task).__name__, "upstream": sorted(task.upstream_task_ids),
                 "retries": task.retries}
        if entry["operator"] == "SparkSubmitOperator":
            entry["command"] = task._get_hook()._build_spark_submit_command(task.application)
            entry["env"] = task.env_vars
        else:
            entry["job_name"] = task.job_name
            entry["job_parameters"] = task.job_parameters
        tasks[task.task_id] = entry
    out["dags"][dag_id] = {"paused": dag.is_paused_upon_creation, "schedule": str(dag.schedule),
                           "params": sorted(dag.params), "tasks": tasks}
print("DAGS " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def dags(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("airflow_home")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"})}
    params = {"project_dir": str(REPO_ROOT), "output_root": str(home / "wh"), "events": str(home / "events.csv"),
              "python": sys.executable}
    done = subprocess.run([sys.executable, "-c", PARSE, str(DAG_FOLDER), json.dumps(params), SCHEDULED_RUN],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("DAGS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("DAGS "))


def test_the_dags_parse_paused_on_the_databricks_jobs_schedule(dags):
    assert dags["errors"] == {}
    assert set(dags["dags"]) == {"email_personalization_spark", "email_personalization_databricks"}
    assert all(dag["paused"] for dag in dags["dags"].values())
    # The Databricks job's Quartz "0 0 5 * * ?" (seconds first) as a five-field cron.
    quartz = load_bundle()["resources"]["jobs"][JOB_KEY]["schedule"]["quartz_cron_expression"].split()
    assert {dag["schedule"] for dag in dags["dags"].values()} == {" ".join([*quartz[1:5], "*"])}


def test_spark_tasks_are_the_stages_in_the_databricks_jobs_order(dags):
    tasks = dags["dags"]["email_personalization_spark"]["tasks"]
    job = load_bundle()["resources"]["jobs"][JOB_KEY]
    assert set(tasks) == {stage.name for stage in PIPELINE}
    assert {name: task["upstream"] for name, task in tasks.items()} == {
        task["task_key"]: sorted(dep["task_key"] for dep in task.get("depends_on", [])) for task in job["tasks"]}
    assert all(task["operator"] == "SparkSubmitOperator" and task["retries"] == 1 for task in tasks.values())


def test_each_spark_task_submits_its_stage_as_the_wrapper_does(dags):
    """The command line: Delta and the batch settings as ./spark-submit.sh adds them, the stage's own job
    file, its arguments a valid configuration, and one run id for the whole DAG run."""
    run_ids = set()
    for name, task in dags["dags"]["email_personalization_spark"]["tasks"].items():
        command = task["command"]
        application = next(i for i, arg in enumerate(command) if arg.endswith(".py"))
        options, job_args = command[1:application], command[application + 1:]
        assert command[0] == "spark-submit" and Path(command[application]) == REPO_ROOT / "jobs" / f"{name}.py"
        pairs = dict(zip(options[::2], options[1::2]))
        assert pairs["--master"] == "local[2]" and pairs["--packages"] == DELTA_PACKAGE
        args = parse_args(name, job_args)
        settings = load_settings(args.conf, args.sets)
        assert settings.output.root.endswith("/wh") and settings.input.events.endswith("events.csv")
        confs = dict(value.split("=", 1) for flag, value in zip(options[::2], options[1::2]) if flag == "--conf")
        assert confs == {**DELTA_CONF, **BATCH_CONF, "spark.pyspark.python": sys.executable,
                         "spark.driver.memory": settings.spark.driver_memory,      # the defaults' heaps
                         "spark.executor.memory": settings.spark.executor_memory}
        assert task["env"] == {"PYTHONPATH": str(REPO_ROOT)}     # the driver imports jobs and lib from there
        run_ids.add(args.run_id)
    assert run_ids == {"airflow-scheduled__2026-12-07T050000_0000"}     # no ':' or '+' in a Hadoop path


def test_the_databricks_task_runs_the_bundles_job_with_its_parameters(dags):
    (task,) = dags["dags"]["email_personalization_databricks"]["tasks"].values()
    job = load_bundle()["resources"]["jobs"][JOB_KEY]
    assert task["operator"] == "DatabricksRunNowOperator" and task["job_name"] == job["name"]
    assert task["job_parameters"] == {p["name"]: p["default"] for p in job["parameters"]}
