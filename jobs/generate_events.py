"""Generate the sample clickstream (with planted segments, churners and email habits) and its ground truth
as parquet."""
from __future__ import annotations

from dataclasses import asdict

from jobs.common import StageContext, main_for, sample_root
from lib.runs import StageResult
from lib.sample_data import (SampleSpec, generate_events, planted_segment_items, planted_user_segments,
                             planted_users)


def run(ctx: StageContext) -> StageResult:
    if ctx.settings.sample.mode == "realistic":  # an invoice log with real-data skew (issue 13)
        from lib.sample_realistic import write_sample
        return write_sample(ctx.spark, ctx.settings.sample, sample_root(ctx.settings))
    spec = SampleSpec(**{key: value for key, value in asdict(ctx.settings.sample).items()
                         if key not in ("path", "mode")})
    root = sample_root(ctx.settings)
    generate_events(ctx.spark, spec).write.mode("overwrite").parquet(f"{root}/events")
    planted_user_segments(ctx.spark, spec).write.mode("overwrite").parquet(f"{root}/truth_user_segments")
    planted_segment_items(ctx.spark, spec).write.mode("overwrite").parquet(f"{root}/truth_segment_items")
    # Churn dates, the day churners stop opening, preferred email hours and weekdays: what the
    # score_customers and plan_sends tests measure recovery against.
    planted_users(ctx.spark, spec).write.mode("overwrite").parquet(f"{root}/truth_users")
    return StageResult(rows_in=0, rows_out=spec.events, message=f"sample written to {root}")


if __name__ == "__main__":
    main_for("generate_events")
