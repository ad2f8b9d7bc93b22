"""Generate the sample clickstream (with planted segments, churners and email habits) and its ground truth
as parquet."""
from __future__ import annotations

from dataclasses import asdict

from jobs.common import StageContext, main_for, sample_root
from lib.platform.runs import StageResult
from lib.sample.campaign import sample_campaign_events
from lib.sample.planted import SampleSpec, generate_events, planted_segment_items, planted_user_segments, planted_users


def run(ctx: StageContext) -> StageResult:
    if ctx.settings.sample.mode == "realistic":  # an invoice log with real-data skew (issue 13)
        from lib.sample.realistic import write_sample
        return write_sample(ctx.spark, ctx.settings.sample, sample_root(ctx.settings))
    spec = SampleSpec(**{key: value for key, value in asdict(ctx.settings.sample).items()
                         if key not in ("path", "mode")})
    root = sample_root(ctx.settings)
    events = generate_events(ctx.spark, spec)
    if spec.email_campaigns:
        # The first enabled campaign, sent with a known lift, so campaign_report has a send to measure.
        users = planted_users(ctx.spark, spec).select("user_id")
        events = events.unionByName(sample_campaign_events(users, ctx.settings))
    events.write.mode("overwrite").parquet(f"{root}/events")
    planted_user_segments(ctx.spark, spec).write.mode("overwrite").parquet(f"{root}/truth_user_segments")
    planted_segment_items(ctx.spark, spec).write.mode("overwrite").parquet(f"{root}/truth_segment_items")
    # Churn dates, the day churners stop opening, preferred email hours and weekdays: what the
    # score_customers and plan_sends tests measure recovery against.
    planted_users(ctx.spark, spec).write.mode("overwrite").parquet(f"{root}/truth_users")
    written = ctx.spark.read.parquet(f"{root}/events").count()  # the sample plus the planted campaign
    return StageResult(rows_in=0, rows_out=written, message=f"sample written to {root}",
                       counts={"sample_events": spec.events, "campaign_events": written - spec.events})


if __name__ == "__main__":
    main_for("generate_events")
