"""Console-script entry points of the installed wheel, one per job (Databricks ``python_wheel_task``).

Each runs the same code as ``spark-submit jobs/<job>.py`` and returns None: a console script exits
with whatever its function returns, and a StageResult or run id would read as a failure.
"""
from __future__ import annotations

import importlib

from jobs.common import main_for


def _run_job(name: str) -> None:
    job = importlib.import_module(f"jobs.{name}")
    main_for(name, job.__doc__ or name, job.run)


def pipeline() -> None:
    """Every stage in order under one run id (jobs/run_pipeline.py)."""
    from jobs import run_pipeline

    run_pipeline.main()


def generate_events() -> None:
    _run_job("generate_events")


def ingest() -> None:
    _run_job("ingest")


def build_interactions() -> None:
    _run_job("build_interactions")


def segment_users() -> None:
    _run_job("segment_users")


def recommend_items() -> None:
    _run_job("recommend_items")
