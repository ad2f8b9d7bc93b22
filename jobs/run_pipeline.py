"""Run every stage in order under one run_id; each stage is recorded in ``pipeline_runs``.

With no arguments: generate the sample clickstream, then ingest it, build interactions, find
customer segments and recommend items, into Delta tables under warehouse/.
"""
from __future__ import annotations

import logging

from jobs import build_interactions, generate_events, ingest
from jobs import recommend_items, segment_users
from jobs.common import run_stage, start_job, tables_of

log = logging.getLogger("jobs.run_pipeline")

# (stage name, stage function); later stages join as they land.
STAGES = [
    ("ingest", ingest.run),
    ("build_interactions", build_interactions.run),
    ("segment_users", segment_users.run),
    ("recommend_items", recommend_items.run),
]


def main(argv: list[str] | None = None) -> str:
    spark, config, run_id = start_job("pipeline", __doc__, argv)
    stages = list(STAGES)
    if not config["input"]["events"]:
        stages.insert(0, ("generate_events", generate_events.run))
    log.info("pipeline run %s: stages %s", run_id, ", ".join(name for name, _ in stages))
    for name, stage in stages:
        run_stage(spark, config, run_id, name, stage)
    log.info("pipeline run %s: all %d stages succeeded; tables in %s", run_id, len(stages),
             tables_of(config).location("<table>"))
    return run_id


if __name__ == "__main__":
    main()
