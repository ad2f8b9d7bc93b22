"""Lift read-out: per campaign of campaign_audience with email_send events, conversions and revenue of
treatment vs holdout in the window after the first send, with 95% intervals, into campaign_results
and a markdown report with a chart; per A/B/n test, its variants against the control into campaign_tests."""
from __future__ import annotations

import logging

from jobs.common import StageContext, main_for, report_directories
from lib.campaign.lift import ab_test_results, lift_results, outcome_rows, variant_totals, write_lift_report
from lib.platform import catalog as C
from lib.platform.runs import StageResult

log = logging.getLogger("jobs.campaign_report")



def run(ctx: StageContext) -> StageResult:
    spark, tables, run_id = ctx.spark, ctx.tables, ctx.run_id
    window = ctx.settings.campaign_report.conversion_window_days
    audience = tables.require(spark, C.CAMPAIGN_AUDIENCE, "build_audience")
    events = tables.require(spark, C.EVENTS, "ingest")
    outcomes = outcome_rows(audience, events, window)
    results = lift_results(variant_totals(outcomes), window, run_id)
    tables.overwrite(spark.createDataFrame(results, C.CAMPAIGN_RESULTS.schema) if results
                     else C.CAMPAIGN_RESULTS.empty(spark), C.CAMPAIGN_RESULTS)
    controls = {campaign: variants[0].name for campaign, variants in ctx.settings.ab_tests.items()}
    tests, test_notes = ab_test_results(outcomes, controls, window, run_id)
    tables.overwrite(spark.createDataFrame(tests, C.CAMPAIGN_TESTS.schema) if tests
                     else C.CAMPAIGN_TESTS.empty(spark), C.CAMPAIGN_TESTS)

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
    for r in tests:
        if not r["control"]:
            parts.append(f"{r['campaign_id']} test: {r['test_variant']} {r['difference']:+.4f} "
                         f"[{r['difference_low']:+.4f}, {r['difference_high']:+.4f}] vs control, "
                         f"P(best) {r['probability_best']:.2f}")
    notes += test_notes
    directory = report_directories(ctx)["campaigns"]
    if directory is not None:
        path = write_lift_report(directory, run_id, results, window, notes, tests)
        log.info("campaign report written to %s", path)
    counts = {f"{r['campaign_id']}.{r['variant']}.conversions": r["conversions"] for r in results}
    counts.update({f"{r['campaign_id']}.test.{r['test_variant']}.conversions": r["conversions"] for r in tests})
    message = "; ".join(parts + notes) or "no campaigns in campaign_audience"
    return StageResult(rows_in=None, rows_out=len(results) + len(tests), message=message, counts=counts)


if __name__ == "__main__":
    main_for("campaign_report")
