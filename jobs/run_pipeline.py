"""Run every stage in order under one run_id; each stage is recorded in ``pipeline_runs``.

With no arguments: generate the sample clickstream, then ingest it, build interactions, find
customer segments and recommend items, into Delta tables under warehouse/. On a local output root the
run ends with one HTML page of the whole run, <output.root>/reports/run_<run_id>.html.
"""
from __future__ import annotations

import logging

from jobs.common import report_directories, report_directory, run_stage, start_job
from jobs.stages import GENERATE_EVENTS, PIPELINE, StageSpec
from lib.platform.run_report import write_run_report
from lib.platform.settings import Settings

log = logging.getLogger("jobs.run_pipeline")


def pipeline_stages(settings: Settings) -> list[StageSpec]:
    """The registry's stages, with the sample generator first when no input is configured."""
    return ([] if settings.input.events else [GENERATE_EVENTS]) + list(PIPELINE)


def main(argv: list[str] | None = None) -> str:
    ctx = start_job("pipeline", __doc__, argv)
    stages = pipeline_stages(ctx.settings)
    log.info("pipeline run %s: stages %s", ctx.run_id, ", ".join(stage.name for stage in stages))
    for stage in stages:
        run_stage(ctx, stage.name)
    log.info("pipeline run %s: all %d stages succeeded; tables under %s", ctx.run_id, len(stages),
             ctx.tables.root or f"{ctx.tables.catalog}.{ctx.tables.schema}")
    directory = report_directory(ctx, "", "")  # <output.root>/reports; none for catalog tables
    if directory is not None:
        try:
            path = write_run_report(ctx.spark, ctx.tables, ctx.run_id, directory, report_directories(ctx))
            log.info("run report: %s", path.resolve().as_uri())
        except Exception:  # every stage succeeded and is recorded: a report that fails is no reason to rerun them
            log.warning("run report not written to %s", directory, exc_info=True)
    return ctx.run_id


if __name__ == "__main__":
    main()
