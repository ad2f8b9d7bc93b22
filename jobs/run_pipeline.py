"""Run every stage in order under one run_id; each stage is recorded in ``pipeline_runs``.

With no arguments: generate the sample clickstream, then ingest it, build interactions, find
customer segments and recommend items, into Delta tables under warehouse/.
"""
from __future__ import annotations

import logging

from jobs.common import run_stage, start_job
from jobs.stages import GENERATE_EVENTS, PIPELINE, StageSpec
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
    return ctx.run_id


if __name__ == "__main__":
    main()
