"""Lift read-out: per campaign of campaign_audience with email_send events, conversions and revenue of
treatment vs holdout in the window after the first send, with 95% intervals, into campaign_results
and a markdown report with a chart."""
from __future__ import annotations

import logging

from jobs.common import StageContext, main_for, report_directories
from lib.campaign.lift import lift_results, outcome_rows, write_lift_report
from lib.platform import catalog as C
from lib.platform.runs import StageResult

log = logging.getLogger("jobs.campaign_report")



def run(ctx: StageContext) -> StageResult:
    spark, tables, run_id = ctx.spark, ctx.tables, ctx.run_id
    window = ctx.settings.campaign_report.conversion_window_days
    audience = tables.require(spark, C.CAMPAIGN_AUDIENCE, "build_audience")
    events = tables.require(spark, C.EVENTS, "ingest")
    outcomes = outcome_rows(audience, events, window)
    results = lift_results(outcomes, window, run_id)
    tables.overwrite(spark.createDataFrame(results, C.CAMPAIGN_RESULTS.schema) if results
                     else C.CAMPAIGN_RESULTS.empty(spark), C.CAMPAIGN_RESULTS)

    audience_campaigns = sorted(r[0] for r in audience.select("campaign_id").distinct().collect())  # few rows
    measured = sorted({r["campaign_id"] for r in results})
    unsent = [c for c in audience_campaigns if c not in measured]
    notes = [f"{c}: no email_send events carry this campaign_id yet, nothing to measure" for c in unsent]
    parts = []
    for r in results:
        if r["variant"] == "treatment" and r["lift"] is not None:
            parts.append(f"{r['campaign_id']}: lift {r['lift']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] "
                         f"({r['conversions']}/{r['recipients']} treated)")
        elif r["variant"] == "treatment":
            notes.append(f"{r['campaign_id']}: no holdout, no lift")
    directory = report_directories(ctx)["campaigns"]
    if directory is not None:
        path = write_lift_report(directory, run_id, results, window, notes)
        log.info("campaign report written to %s", path)
    counts = {f"{r['campaign_id']}.{r['variant']}.conversions": r["conversions"] for r in results}
    message = "; ".join(parts + notes) or "no campaigns in campaign_audience"
    return StageResult(rows_in=None, rows_out=len(results), message=message, counts=counts)


if __name__ == "__main__":
    main_for("campaign_report")
