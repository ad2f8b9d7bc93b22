"""Plan sends: the best hour of week per customer (send_times) and the global control / campaign
holdout assignments (holdout_assignments), both overwritten each run. Assignments are a hash of
holdout.salt and the user id, so they never move between runs or re-ingests. A suppressed customer
has no assignment for a campaign that must not reach them (the current lists, written to
suppressed_users first)."""
from __future__ import annotations

import logging

from pyspark.sql import functions as F

from jobs.common import StageContext, main_for
from lib.campaign.campaigns import without_suppressed, write_suppressed_users
from lib.campaign.holdout import GLOBAL_KEY, holdout_assignments
from lib.campaign.send_time import send_times
from lib.features.interactions import resolve_as_of
from lib.platform import catalog as C
from lib.platform.runs import StageResult

log = logging.getLogger("jobs.plan_sends")


def run(ctx: StageContext) -> StageResult:
    spark, tables, run_id = ctx.spark, ctx.tables, ctx.run_id
    suppressed, _ = write_suppressed_users(spark, tables, ctx.settings, run_id)
    events = tables.require(spark, C.EVENTS, "ingest").persist()
    try:
        as_of = resolve_as_of(ctx.settings.scores.as_of_utc, events, tables.location(C.EVENTS)).date()
        segments = tables.read(spark, C.USER_SEGMENTS) if tables.exists(spark, C.USER_SEGMENTS) else None
        tables.overwrite(send_times(events, as_of, ctx.settings.send_time, run_id, segments), C.SEND_TIMES)
        users = events.select("user_id").distinct()
        campaigns = ctx.settings.holdout_shares
        assignments = holdout_assignments(users, campaigns, ctx.settings.holdout.salt,
                                          ctx.settings.holdout.control_share, run_id)
        tables.overwrite(without_suppressed(assignments, suppressed), C.HOLDOUT_ASSIGNMENTS)
    finally:
        events.unpersist()

    times = tables.read(spark, C.SEND_TIMES).agg(
        F.count(F.lit(1)).alias("users"), F.sum(F.col("is_fallback").cast("int")).alias("fallback")).first()
    variants = {(r["campaign_id"], r["variant"]): r["n"] for r in tables.read(spark, C.HOLDOUT_ASSIGNMENTS)
                .groupBy("campaign_id", "variant").agg(F.count(F.lit(1)).alias("n")).collect()}
    counts = {"users": times["users"], "fallback": times["fallback"] or 0,
              **{f"{campaign}.{variant}": n for (campaign, variant), n in sorted(variants.items())}}
    message = (f"as_of={as_of} send_times for {times['users']} users ({times['fallback'] or 0} fallback); "
               f"holdouts for {', '.join(sorted(campaigns) or [GLOBAL_KEY])}")
    return StageResult(rows_in=None, rows_out=times["users"] + sum(variants.values()), message=message,
                       counts=counts)


if __name__ == "__main__":
    main_for("plan_sends")
