"""MLflow tracking: one MLflow run per pipeline run, a nested run per model stage with its settings, the
metrics it measured, its promotion outcome, the Delta versions it read and wrote, and its reports.

Only what the stage already wrote to its evidence tables for this run is logged (``STAGE_METRICS``),
so MLflow and Delta agree by construction. Tracking never fails a stage: ``jobs.common.run_stage`` logs
a warning when it cannot track. It needs ``mlflow`` (the lean ``mlflow-skinny`` of the ``tracking``
extra; Databricks runtimes bring their own) and ``[tracking]``: ``tracking_uri`` empty means a SQLite
store at ``<output.root>/mlflow.db`` on a local root and no tracking elsewhere; on Databricks set
``tracking_uri = "databricks"`` and an ``experiment`` path of the workspace.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pyspark
from pyspark.sql import SparkSession

from lib.campaign.exports import local_path
from lib.platform import catalog as C
from lib.platform.runs import SavedModel
from lib.platform.settings import Settings
from lib.platform.storage import Tables

if TYPE_CHECKING:
    from mlflow.models import Model

log = logging.getLogger("lib.platform.tracking")

# MLflow refuses other characters in metric and parameter names (e.g. the '+' of "gbt+isotonic").
_NAME = re.compile(r"[^\w\-. /:]")
PARAM_LIMIT = 500  # characters of a parameter value kept (MLflow's own limit is larger)


def metric_name(*parts: Any) -> str:
    """``parts`` joined by dots, every character MLflow refuses replaced by '_'."""
    return _NAME.sub("_", ".".join(str(part) for part in parts))


def flat_params(section: Any, prefix: str = "") -> dict[str, str]:
    """A settings section (a dataclass, nested ones included) as dotted parameter names -> text."""
    params = {}
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        name = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            params.update(flat_params(value, name + "."))
        else:
            params[name] = str(value)[:PARAM_LIMIT]
    return params


def recommend_metrics(spark: SparkSession, tables: Tables, run_id: str) -> dict[str, float]:
    """rec_metrics as ``<model>.<metric>.at_<k>``, and the chosen ALS candidate's validation metric."""
    rows = tables.run_rows(spark, C.REC_METRICS, run_id, "model", "k", "metric", "value")
    metrics = {metric_name(model, metric, f"at_{k}"): value for model, k, metric, value in rows}
    tuning = tables.run_rows(spark, C.ALS_TUNING, run_id, "candidate", "metric", "k", "value", "chosen")
    for candidate, metric, k, value, chosen in tuning:
        metrics[metric_name("als_tuning", f"candidate_{candidate}", metric, f"at_{k}")] = value
        if chosen:
            metrics[metric_name("als_tuning", "chosen", metric, f"at_{k}")] = value
    return metrics


def score_metrics(spark: SparkSession, tables: Tables, run_id: str) -> dict[str, float]:
    """model_metrics' single values (not the binned reliability and lift tables) as ``<target>.<model>.<metric>``."""
    rows = tables.run_rows(spark, C.MODEL_METRICS, run_id, "target", "model", "metric", "bin", "value")
    return {metric_name(target, model, metric): value for target, model, metric, bin_, value in rows if bin_ is None}


SEGMENT_QUALITY_NUMBERS = ("k", "users", "assigned_share", "largest_share", "size_entropy", "stability_ari",
                           "min_top_lift", "median_top_lift", "excluded_items", "capped_items", "min_distinct_lift",
                           "distinct_share", "empty_segments")


def segment_metrics(spark: SparkSession, tables: Tables, run_id: str) -> dict[str, float]:
    """segment_quality's numbers as ``segment_quality.<column>``."""
    rows = tables.run_rows(spark, C.SEGMENT_QUALITY, run_id, *SEGMENT_QUALITY_NUMBERS)
    return {} if not rows else {metric_name("segment_quality", name): value
                                for name, value in zip(SEGMENT_QUALITY_NUMBERS, rows[-1])}


# The stages tracked: the settings section of their model, what they measured, their report's name
# (jobs.common.report_directories).
STAGE_METRICS: dict[str, tuple[str, Callable[[SparkSession, Tables, str], dict[str, float]], str]] = {
    "segment_users": ("segments", segment_metrics, "segments"),
    "recommend_items": ("recommend", recommend_metrics, "recommendations"),
    "score_customers": ("scores", score_metrics, "scores"),
}


def _local_root(tables: Tables) -> Path | None:
    root = tables.root
    if tables.uses_catalog or not root or "://" in root and not root.startswith("file:"):
        return None
    return Path(root.removeprefix("file:")).resolve()


def local_artifact_root(tables: Tables) -> Path | None:
    """Where the experiment created under a local output.root keeps its artifacts (the stage reports'
    copies; an erasure checks them like the reports)."""
    root = _local_root(tables)
    return None if root is None else root / "mlflow-artifacts"


def tracking_uri(settings: Settings, tables: Tables) -> str | None:
    """``tracking.tracking_uri``, else a SQLite store under a local output.root, else None (no tracking)."""
    if settings.tracking.tracking_uri:
        return settings.tracking.tracking_uri
    root = _local_root(tables)
    return None if root is None else f"sqlite:///{root}/mlflow.db"


def _experiment_id(client, settings: Settings, tables: Tables) -> str:
    """The experiment's id, created on first use; with the default store its artifacts go to
    <output.root>/mlflow-artifacts (MLflow's own default is ./mlruns of whatever directory the job ran in)."""
    experiment = client.get_experiment_by_name(settings.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None if settings.tracking.tracking_uri else local_artifact_root(tables)  # a server has its own
    return client.create_experiment(settings.tracking.experiment,
                                    artifact_location=None if artifacts is None else artifacts.as_uri())


def _pipeline_run(client, experiment_id: str, run_id: str) -> str:
    """The MLflow run of pipeline run ``run_id`` (created by its first tracked stage)."""
    found = client.search_runs([experiment_id], max_results=1,
                               filter_string=f"tags.pipeline_run_id = '{run_id}' AND tags.kind = 'pipeline_run'")
    if found:
        return found[0].info.run_id
    return client.create_run(experiment_id, run_name=run_id,
                             tags={"pipeline_run_id": run_id, "kind": "pipeline_run"}).info.run_id


# Models whose files hold customers (ALS user factors): registered where the stage saved them, one copy,
# the one an erasure rewrites (lib.platform.privacy), never copied into the artifact store.
PERSONAL_MODELS = frozenset({"als"})
CHAMPION = "champion"


def local_dir(location: str) -> Path | None:
    """The directory ``location`` names on this machine, or None (a remote URI, or no directory there)."""
    if "://" in location and not location.startswith("file:"):
        return None
    path = local_path(location)
    return path if path.is_dir() else None


def _mlmodel(run_id: str, artifact_path: str | None, flavor: str, model_data: str, model_class: str,
             inputs: tuple[tuple[str, str], ...], output: tuple[str, str], **metadata: str) -> "Model":
    """MLmodel metadata of a Spark model, with its signature: the ``inputs`` and one ``output`` column,
    each (name, MLflow type)."""
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import ColSpec, Schema
    signature = ModelSignature(inputs=Schema([ColSpec(kind, name) for name, kind in inputs]),
                               outputs=Schema([ColSpec(output[1], output[0])]))
    model = Model(artifact_path=artifact_path, run_id=run_id, signature=signature, metadata=metadata or None)
    model.add_flavor(flavor, pyspark_version=pyspark.__version__, model_data=model_data, model_class=model_class)
    return model


def log_models(client, settings: Settings, stage_run: str, pipeline_run: str, models: dict[str, SavedModel],
               champion: bool) -> dict[str, str]:
    """Log each saved Spark model of a stage as an MLflow model and register it as a new version of
    ``<tracking.registry_prefix>.<name>``, aliased ``champion`` when ``champion`` (its stage passed every
    promotion gate); returns name -> version.

    A scoring model (no customer in it) is copied into the stage run's artifacts at ``models/<name>``:
    the ``spark`` flavor (``sparkml/``: the chosen classifier's PipelineModel, loadable with
    ``mlflow.spark.load_model`` or ``PipelineModel.load``) and its calibrator (``calibrator/``).
    A model in PERSONAL_MODELS gets its MLmodel file (flavor ``spark_als``: ``ALSModel.load`` of the
    directory) written beside its files and is registered at the directory it was saved to."""
    from mlflow.exceptions import MlflowException

    versions = {}
    artifact_uri = client.get_run(stage_run).info.artifact_uri
    for name, saved in sorted(models.items()):
        location = saved.path
        directory = local_dir(location)
        if name in PERSONAL_MODELS:
            if directory is not None:
                _mlmodel(stage_run, None, "spark_als", ".", "pyspark.ml.recommendation.ALSModel",
                         tuple((column, "integer") for column in saved.inputs),
                         ("prediction", "float")).save(str(directory / "MLmodel"))
            source = directory.resolve().as_uri() if directory is not None else location
        elif directory is None:
            log.warning("model %s not logged to MLflow: %s is not a local directory", name, location)
            continue
        else:
            with tempfile.TemporaryDirectory() as staging:
                shutil.copytree(directory / "classifier", Path(staging) / "sparkml")
                shutil.copytree(directory / "calibrator", Path(staging) / "calibrator")
                _mlmodel(stage_run, f"models/{name}", "spark", "sparkml", "pyspark.ml.pipeline.PipelineModel",
                         tuple((column, "double") for column in saved.inputs), ("probability", "double"),
                         calibrator="calibrator",
                         calibrator_input="the classifier's probability of class 1"
                         ).save(str(Path(staging) / "MLmodel"))
                client.log_artifacts(stage_run, staging, f"models/{name}")
            source = f"{artifact_uri}/models/{name}"
        registered = f"{settings.tracking.registry_prefix}.{name}"
        try:
            client.create_registered_model(registered)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(registered, source, run_id=stage_run, tags={
            "pipeline_run_id": pipeline_run, "promoted": str(champion).lower()}).version
        if champion:
            client.set_registered_model_alias(registered, CHAMPION, version)
        versions[name] = str(version)
        log.info("model %s registered as %s version %s%s", name, registered, version,
                 f", alias {CHAMPION}" if champion else f" (not {CHAMPION}: it did not pass its promotion gates)")
    return versions


def track_stage(spark: SparkSession, settings: Settings, tables: Tables, run_id: str, stage: str, status: str,
                started: datetime, finished: datetime, counts: dict[str, int], promotion: dict[str, float],
                touched: tuple[C.TableSpec, ...], report_dirs: dict[str, Path | None],
                models: dict[str, SavedModel] | None = None, champion: bool = False) -> str | None:
    """Log ``stage`` of pipeline run ``run_id`` as a nested MLflow run (with its promotion gates' values
    by gate, the Delta versions of the ``touched`` tables, those it read and wrote, the files of its
    report written since it started, and its saved ``models`` registered by ``log_models``);
    returns the MLflow run id, or None when the stage is not tracked (not a model stage, tracking off,
    or no store for this output)."""
    uri = tracking_uri(settings, tables)
    if stage not in STAGE_METRICS or not settings.tracking.enabled or uri is None:
        return None
    try:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError:
        log.warning("stage %s not tracked: tracking.enabled, but mlflow is not installed (pip install "
                    "'.[tracking]', or tracking.enabled = false)", stage)
        return None

    section, measured, report = STAGE_METRICS[stage]
    client = MlflowClient(tracking_uri=uri, registry_uri=settings.tracking.registry_uri or None)
    experiment_id = _experiment_id(client, settings, tables)
    parent = _pipeline_run(client, experiment_id, run_id)
    run = client.create_run(experiment_id, run_name=stage, start_time=int(started.timestamp() * 1000), tags={
        "mlflow.parentRunId": parent, "pipeline_run_id": run_id, "kind": "stage", "stage": stage, "status": status})
    at = int(finished.timestamp() * 1000)
    values = {**measured(spark, tables, run_id),
              "seconds": (finished - started).total_seconds(),
              **{metric_name("count", key): float(value) for key, value in counts.items()},
              **{metric_name("promotion", gate): value for gate, value in promotion.items()}}
    metrics = [Metric(key, float(value), at, 0) for key, value in sorted(values.items())
               if value is not None and not math.isnan(float(value))]
    params = [Param(key, value)
              for key, value in sorted(flat_params(getattr(settings, section), section + ".").items())]
    versions = {table.name: tables.version(spark, table) for table in touched}
    tags = [RunTag(metric_name("delta_version", name), str(version)) for name, version in sorted(versions.items())
            if version is not None]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limits: 1000 metrics, 100 params or tags
        client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000])
    for start in range(0, max(len(params), len(tags)), 100):
        client.log_batch(run.info.run_id, params=params[start:start + 100], tags=tags[start:start + 100])
    report_dir = report_dirs.get(report)
    if report_dir is not None and report_dir.is_dir():
        for path in sorted(report_dir.iterdir()):
            if path.is_file() and path.stat().st_mtime >= started.timestamp() - 1:
                client.log_artifact(run.info.run_id, str(path))
    versions = log_models(client, settings, run.info.run_id, run_id, models or {}, champion)
    for name, version in versions.items():
        client.set_tag(run.info.run_id, metric_name("model_version", name), version)
    client.set_terminated(run.info.run_id, "FINISHED", end_time=at)
    client.set_terminated(parent, "FINISHED", end_time=at)
    log.info("stage %s tracked in MLflow: run %s (%d metrics, %d params, models %s) at %s", stage,
             run.info.run_id, len(metrics), len(params), versions or "none", uri)
    return run.info.run_id
