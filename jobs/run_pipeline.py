"""Run every stage in order under one run_id; each stage is recorded in ``pipeline_runs``.

With no arguments: generate the sample clickstream, then ingest it and build interactions into
Delta tables under warehouse/.
"""
from __future__ import annotations

import logging

from jobs import build_interactions, generate_events, ingest
from jobs import recommend_items, segment_users
from jobs.common import get_session, load_config, new_run_id, parse_args, run_stage, setup_logging, tables_of
from lib.config import ConfigError

log = logging.getLogger("jobs.run_pipeline")

# (stage name, stage function); later stages join as they land.
STAGES = [
    ("ingest", ingest.run),
    ("build_interactions", build_interactions.run),
    ("segment_users", segment_users.run),
    ("recommend_items", recommend_items.run),
]


def main(argv: list[str] | None = None) -> str:
    setup_logging()
    args = parse_args(__doc__, argv)
    try:
        config = load_config(args.conf, args.sets)
    except ConfigError as err:
        log.error("%s", err)
        raise SystemExit(2) from None
    spark = get_session("email-personalization-pipeline", config)
    tables_of(config).ensure_schema(spark)
    run_id = args.run_id or new_run_id()
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
