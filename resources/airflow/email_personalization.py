"""Airflow DAGs of the suite: the pipeline's stages as tasks, on a Spark cluster or as the Databricks job.

Copy this file into Airflow's dags folder (Airflow 3 with the apache-spark and databricks providers:
``pip install ".[airflow]"``). Both DAGs are paused when created; unpause the one for where Spark runs:

- ``email_personalization_spark``: one ``SparkSubmitOperator`` per stage on the Airflow connection
  ``spark_default`` (its host is the master: ``spark://host:7077``, ``yarn``, ``k8s://...``), submitted
  as ``./spark-submit.sh`` submits (Delta package and settings, ``lib`` for the executors). The Airflow
  worker needs this repository at ``params.project_dir`` (the driver runs there in client mode) and
  Spark's ``spark-submit``; the executors a Python with the project's dependencies at ``params.python``.
- ``email_personalization_databricks``: one ``DatabricksRunNowOperator`` that runs the Asset Bundle's job
  (``resources/email_personalization_job.yml``: one task per stage on a job cluster) through the
  connection ``databricks_default`` and waits for it, passing the job's parameters.

Every task of one DAG run records the same run id in ``pipeline_runs``; a retried task reruns its stage,
which ``jobs.common.run_stage`` makes safe. The stages and their order are the Databricks job's;
``tests/test_airflow.py`` parses this file with Airflow and holds both equal to ``jobs/stages.py``.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.providers.databricks.operators.databricks import DatabricksRunNowOperator
from airflow.sdk import DAG, Param

# Each stage and the stages whose tables it reads (jobs/stages.py; the Databricks job's depends_on).
STAGES: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "ingest_products": (),
    "build_interactions": ("ingest",),
    "segment_users": ("build_interactions", "ingest_products"),
    "recommend_items": ("segment_users", "ingest_products"),
    "score_customers": ("segment_users",),
    "plan_sends": ("segment_users",),
    "build_audience": ("recommend_items", "score_customers", "plan_sends"),
    "campaign_report": ("build_audience",),
}
SCHEDULE = "0 5 * * *"          # daily at 05:00 UTC, as the Databricks job's Quartz "0 0 5 * * ?"
DELTA_PACKAGE = "io.delta:delta-spark_4.2_2.13:4.4.0"   # lib.platform.session.DELTA_PACKAGE
SPARK_CONF = {                                           # lib.platform.session.DELTA_CONF and BATCH_CONF
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.showConsoleProgress": "false",
    "spark.pyspark.python": "{{ params.python }}",
    # Heaps before the JVM starts, as spark-submit.sh passes [spark] driver_memory / executor_memory.
    "spark.driver.memory": "{{ params.driver_memory }}",
    "spark.executor.memory": "{{ params.executor_memory }}",
}
# Airflow's run ids hold ':' and '+', which Hadoop paths (the run's saved model) refuse.
RUN_ID = "airflow-{{ run_id | replace(':', '') | replace('+', '_') }}"
# Both DAGs: the schedule, one run at a time, paused until a team enables the one it uses.
DAG_ARGS = {"schedule": SCHEDULE, "start_date": datetime(2026, 1, 1), "catchup": False, "max_active_runs": 1,
            "is_paused_upon_creation": True, "tags": ["email-personalization"],
            "default_args": {"owner": "data-engineering", "retries": 1, "retry_delay": timedelta(minutes=5)}}


def _chain(tasks: dict) -> None:
    for stage, upstream in STAGES.items():
        for name in upstream:
            tasks[name] >> tasks[stage]


with DAG(
    dag_id="email_personalization_spark",
    description="email personalization: every stage as a spark-submit on a cluster",
    **DAG_ARGS,
    params={
        "project_dir": Param("/opt/email-personalization", type="string",
                             description="this repository on the Airflow worker (jobs/, lib/, conf/)"),
        "python": Param("python3", type="string",
                        description="the executors' Python, with numpy, pandas, pyarrow, scipy"),
        "py_files": Param("", type="string",
                          description="archive of lib for executors that lack it, e.g. the wheel of "
                                      "`python -m pip wheel --no-deps --wheel-dir dist .`; empty: installed"),
        "driver_memory": Param("4g", type="string", description="the driver's heap ([spark] driver_memory)"),
        "executor_memory": Param("2g", type="string", description="each executor's heap ([spark] executor_memory)"),
        "conf_file": Param("conf/base.toml", type="string", description="environment file over conf/base.toml"),
        "output_root": Param("", type="string", description="output.root: shared storage every node sees"),
        "events": Param("", type="string", description="input.events: the clickstream export"),
    },
) as spark_dag:
    _chain({
        stage: SparkSubmitOperator(
            task_id=stage,
            conn_id="spark_default",
            name=f"email-personalization-{stage}",
            application=f"{{{{ params.project_dir }}}}/jobs/{stage}.py",
            application_args=["--conf", "{{ params.conf_file }}", "--set", "output.root={{ params.output_root }}",
                              "--set", "input.events={{ params.events }}", "--run-id", RUN_ID],
            packages=DELTA_PACKAGE,
            conf=SPARK_CONF,
            py_files="{{ params.py_files or '' }}",
            env_vars={"PYTHONPATH": "{{ params.project_dir }}"},
        )
        for stage in STAGES
    })


with DAG(
    dag_id="email_personalization_databricks",
    description="email personalization: the Asset Bundle's job, run and awaited",
    **DAG_ARGS,
    params={
        "catalog": Param("main", type="string"),
        "schema": Param("email_personalization", type="string"),
        "events_table": Param("main.raw.clickstream", type="string"),
        "model_dir": Param("/Volumes/main/email_personalization/models/als", type="string"),
    },
) as databricks_dag:
    DatabricksRunNowOperator(
        task_id="email_personalization",
        databricks_conn_id="databricks_default",
        job_name="email-personalization",
        job_parameters={name: f"{{{{ params.{name} }}}}" for name in ("catalog", "schema", "events_table", "model_dir")},
    )
