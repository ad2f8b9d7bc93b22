"""Console-script entry points of the installed wheel, one per registered stage (Databricks
``python_wheel_task``), plus the whole pipeline.

Each runs the same code as ``spark-submit jobs/<stage>.py`` and returns None: a console script exits
with whatever its function returns, and a StageResult or run id would read as a failure.
pyproject.toml's ``[project.scripts]`` names ``jobs.entrypoints:<stage>`` for every stage in
``jobs.stages.ALL_STAGES`` (a test holds them equal).
"""
from __future__ import annotations

from typing import Callable

from jobs.common import main_for
from jobs.stages import ALL_STAGES


def pipeline() -> None:
    """Every stage in order under one run id (jobs/run_pipeline.py)."""
    from jobs import run_pipeline

    run_pipeline.main()


def _entry(name: str) -> Callable[[], None]:
    def entry() -> None:
        main_for(name)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"The {name} stage (jobs/{name}.py)."
    return entry


for _stage in ALL_STAGES:
    globals()[_stage.name] = _entry(_stage.name)
