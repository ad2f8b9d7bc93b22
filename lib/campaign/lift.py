"""Campaign lift: how much more the mailed group bought than its holdout.

For a campaign with ``email_send`` events carrying its campaign_id, the send start is its first send;
a customer of the audience converts with a purchase in ``[send start, send start + window_days)``
and brings that window's revenue. Treatment and holdout come from the same audience by a hash, so
their difference is the campaign's effect (intention to treat: every treatment customer counts,
mailed or not; ``sent`` says how many were). Per campaign:

- absolute lift = conversion rate of treatment - of holdout, 95% CI from the unpooled normal
  approximation (Wald) of two independent proportions;
- relative lift = treatment rate / holdout rate - 1, 95% CI by the delta method on the log ratio;
- revenue lift = revenue per recipient of treatment - of holdout, 95% Welch CI from per-customer
  sums and sums of squares.

A campaign with an A/B/n test is also read out per test variant of its treatment (``ab_test_results``,
statistics in ``lib.campaign.ab_test``): each variant's rate, its difference to the control variant with
a multiple-comparison-corrected interval, and its probability of being best.

Spark aggregates one row per campaign, variant and test variant; the statistics are plain Python on
those rows.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # batch jobs have no display
import matplotlib.pyplot as plt  # noqa: E402
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.campaign.ab_test import proportion_diff_ci, variant_read_out

Z95 = 1.959963984540054


def outcome_rows(audience: DataFrame, events: DataFrame, window_days: int) -> list[dict[str, Any]]:
    """Per campaign (with sends), variant and A/B/n test_variant (null outside a test): recipients, sent,
    conversions, revenue, revenue_sq, send_start. ``variant_totals`` sums them per variant."""
    if "test_variant" not in audience.columns:  # an audience written before A/B/n tests existed
        audience = audience.withColumn("test_variant", F.lit(None).cast("string"))
    sends = events.where((F.col("event_type") == "email_send") & F.col("campaign_id").isNotNull())
    starts = sends.groupBy("campaign_id").agg(F.min("event_ts").alias("send_start"))
    sent = sends.select("campaign_id", "user_id").distinct().withColumn("_sent", F.lit(1))
    members = (audience.select("campaign_id", "user_id", "variant", "test_variant")
               .join(F.broadcast(starts), "campaign_id")
               .withColumn("send_end", F.col("send_start") + F.expr(f"INTERVAL {int(window_days)} DAYS")))
    purchases = events.where(F.col("event_type") == "purchase").select(
        "user_id", "event_ts", F.coalesce(F.col("revenue"), F.lit(0.0)).alias("revenue"))
    bought = (members.join(purchases, "user_id")
              .where((F.col("event_ts") >= F.col("send_start")) & (F.col("event_ts") < F.col("send_end")))
              .groupBy("campaign_id", "user_id").agg(F.sum("revenue").alias("_revenue")))
    per_user = (members.join(bought, ["campaign_id", "user_id"], "left")
                .join(sent, ["campaign_id", "user_id"], "left")
                .select("campaign_id", "variant", "test_variant", "send_start",
                        F.col("_revenue").isNotNull().alias("_converted"),
                        F.coalesce("_revenue", F.lit(0.0)).alias("_revenue"), F.coalesce("_sent", F.lit(0)).alias("_sent")))
    totals = per_user.groupBy("campaign_id", "variant", "test_variant", "send_start").agg(
        F.count(F.lit(1)).alias("recipients"), F.sum("_sent").alias("sent"),
        F.sum(F.col("_converted").cast("long")).alias("conversions"), F.sum("_revenue").alias("revenue"),
        F.sum(F.col("_revenue") * F.col("_revenue")).alias("revenue_sq"))
    # campaigns x (3 + test variants) rows
    return [row.asDict() for row in totals.orderBy("campaign_id", "variant", "test_variant").collect()]


def variant_totals(outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``outcome_rows`` summed over test_variant: one row per campaign and variant."""
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for o in outcomes:
        key = (o["campaign_id"], o["variant"])
        if key not in totals:
            totals[key] = {"campaign_id": o["campaign_id"], "variant": o["variant"], "send_start": o["send_start"],
                           "recipients": 0, "sent": 0, "conversions": 0, "revenue": 0.0, "revenue_sq": 0.0}
        for column in ("recipients", "sent", "conversions", "revenue", "revenue_sq"):
            totals[key][column] += o[column]
    return [totals[key] for key in sorted(totals)]


def ab_test_results(outcomes: list[dict[str, Any]], controls: dict[str, str], window_days: int,
                 run_id: str) -> tuple[list[dict[str, Any]], list[str]]:
    """campaign_tests rows (``lib.campaign.ab_test.variant_read_out`` of each tested campaign's treatment
    variants, against ``controls[campaign]``) and notes on tests that cannot be read out."""
    rows, notes = [], []
    by_campaign: dict[str, dict[str, dict[str, Any]]] = {}
    for o in outcomes:
        if o["variant"] == "treatment" and o["test_variant"] is not None:
            by_campaign.setdefault(o["campaign_id"], {})[o["test_variant"]] = o
    for campaign, arms in sorted(by_campaign.items()):
        control = controls.get(campaign)
        if control not in arms or len(arms) < 2:
            notes.append(f"{campaign}: test variants {', '.join(sorted(arms))} in the audience, control "
                         f"{control or '(none configured)'}: no A/B read-out")
            continue
        counts = {name: (o["conversions"], o["recipients"]) for name, o in arms.items()}
        for row in variant_read_out(counts, control):
            o = arms[row["variant"]]
            rows.append({"campaign_id": campaign, "test_variant": row["variant"], "control": row["variant"] == control,
                         "recipients": o["recipients"], "conversions": o["conversions"],
                         "conversion_rate": row["rate"], "rate_low": row["rate_low"], "rate_high": row["rate_high"],
                         "difference": row["difference"], "difference_low": row["difference_low"],
                         "difference_high": row["difference_high"], "probability_best": row["probability_best"],
                         "revenue_per_recipient": float(o["revenue"]) / o["recipients"] if o["recipients"] else None,
                         "send_start": o["send_start"], "window_days": window_days, "run_id": run_id})
    return rows, notes


def relative_lift_ci(c1: int, n1: int, c0: int, n0: int, z: float = Z95) -> tuple[float, float, float]:
    """(p1 / p0 - 1, low, high) by the delta method on log(p1 / p0); NaN when a group has no conversion."""
    if c1 == 0 or c0 == 0:
        return math.nan, math.nan, math.nan
    p1, p0 = c1 / n1, c0 / n0
    se = math.sqrt((1 - p1) / c1 + (1 - p0) / c0)
    ratio = math.log(p1 / p0)
    return p1 / p0 - 1, math.exp(ratio - z * se) - 1, math.exp(ratio + z * se) - 1


def mean_diff_ci(s1: float, q1: float, n1: int, s0: float, q0: float, n0: int,
                 z: float = Z95) -> tuple[float, float, float]:
    """(mean1 - mean0, low, high) from sums and sums of squares (Welch, normal quantile)."""
    def moments(total: float, squares: float, n: int) -> tuple[float, float]:
        mean = total / n
        variance = max(squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
        return mean, variance
    m1, v1 = moments(s1, q1, n1)
    m0, v0 = moments(s0, q0, n0)
    se = math.sqrt(v1 / n1 + v0 / n0)
    return m1 - m0, m1 - m0 - z * se, m1 - m0 + z * se


def _clean(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def lift_results(outcomes: list[dict[str, Any]], window_days: int, run_id: str) -> list[dict[str, Any]]:
    """campaign_results rows: one per campaign and variant; the lift columns on the treatment row
    (null elsewhere, and null when the campaign has no holdout or no treatment)."""
    rows = []
    by_campaign: dict[str, dict[str, dict[str, Any]]] = {}
    for outcome in outcomes:
        by_campaign.setdefault(outcome["campaign_id"], {})[outcome["variant"]] = outcome
    for campaign, variants in sorted(by_campaign.items()):
        treated, held = variants.get("treatment"), variants.get("holdout")
        for variant, o in sorted(variants.items()):
            n = o["recipients"]
            row = {"campaign_id": campaign, "variant": variant, "recipients": n, "sent": o["sent"],
                   "conversions": o["conversions"], "conversion_rate": o["conversions"] / n if n else None,
                   "revenue": float(o["revenue"]), "revenue_per_recipient": float(o["revenue"]) / n if n else None,
                   "send_start": o["send_start"], "window_days": window_days, "run_id": run_id}
            stats = dict.fromkeys(("lift", "ci_low", "ci_high", "relative_lift", "relative_ci_low",
                                   "relative_ci_high", "revenue_lift", "revenue_ci_low", "revenue_ci_high"))
            if variant == "treatment" and treated and held and treated["recipients"] and held["recipients"]:
                c1, n1, c0, n0 = treated["conversions"], treated["recipients"], held["conversions"], held["recipients"]
                stats["lift"], stats["ci_low"], stats["ci_high"] = proportion_diff_ci(c1, n1, c0, n0)
                rel = relative_lift_ci(c1, n1, c0, n0)
                stats["relative_lift"], stats["relative_ci_low"], stats["relative_ci_high"] = map(_clean, rel)
                rev = mean_diff_ci(treated["revenue"], treated["revenue_sq"], n1, held["revenue"], held["revenue_sq"], n0)
                stats["revenue_lift"], stats["revenue_ci_low"], stats["revenue_ci_high"] = rev
            rows.append({**row, **stats})
    return rows


def _plot_tests(tests: list[dict[str, Any]], path: Path) -> None:
    """Each tested campaign's variants: conversion rate with its 95% Wilson interval, the control grey."""
    campaigns = sorted({r["campaign_id"] for r in tests})
    fig, axes = plt.subplots(1, len(campaigns), figsize=(3.5 * len(campaigns), 3.2), squeeze=False)
    for ax, campaign in zip(axes[0], campaigns):
        rows = [r for r in tests if r["campaign_id"] == campaign]
        rates = [r["conversion_rate"] for r in rows]
        errors = [[r["conversion_rate"] - r["rate_low"] for r in rows],
                  [r["rate_high"] - r["conversion_rate"] for r in rows]]
        ax.bar([r["test_variant"] for r in rows], rates, yerr=errors, capsize=3,
               color=["#bbbbbb" if r["control"] else "#4477aa" for r in rows])
        ax.set_title(f"{campaign}: A/B/n test")
        ax.set_ylabel("conversion rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_lift_report(directory: str | Path, run_id: str, results: list[dict[str, Any]], window_days: int,
                      notes: list[str], tests: list[dict[str, Any]] = ()) -> Path:
    """campaigns.md and lift.png (conversion rate per variant with 95% intervals, per campaign); with A/B/n
    tests (``ab_test_results`` rows), their table and tests.png."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    campaigns = sorted({r["campaign_id"] for r in results})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = {"treatment": "#4477aa", "holdout": "#bbbbbb", "global_control": "#ee6677"}
    width = 0.27
    for offset, variant in enumerate(("treatment", "holdout", "global_control")):
        xs, ys, errs = [], [], []
        for i, campaign in enumerate(campaigns):
            row = next((r for r in results if r["campaign_id"] == campaign and r["variant"] == variant), None)
            if row and row["recipients"]:
                p, n = row["conversion_rate"], row["recipients"]
                xs.append(i + (offset - 1) * width)
                ys.append(p)
                errs.append(Z95 * math.sqrt(p * (1 - p) / n))
        if xs:
            ax.bar(xs, ys, width, yerr=errs, capsize=3, label=variant, color=colors[variant])
    ax.set_xticks(range(len(campaigns)), campaigns)
    ax.set_ylabel(f"conversion rate ({window_days} d)")
    ax.set_title("Conversion by variant (95% intervals)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lift.png", dpi=100)
    plt.close(fig)

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.2%}"

    lines = [f"# Campaign lift (run {run_id})", "",
             f"A conversion is a purchase within {window_days} days of the campaign's first email_send; "
             "treatment and holdout are split by a hash of the user id, so their difference is the campaign's "
             "effect. Intervals are 95%.", "", "![conversion by variant](lift.png)", "",
             "| campaign | variant | recipients | sent | conversions | rate | revenue / recipient | lift (abs) "
             "| 95% CI | lift (rel) | 95% CI | revenue lift / recipient | 95% CI |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---|"]
    for r in results:
        lift = r["lift"] is not None
        lines.append(
            f"| {r['campaign_id']} | {r['variant']} | {r['recipients']} | {r['sent']} | {r['conversions']} | "
            f"{(r['conversion_rate'] or 0):.2%} | {(r['revenue_per_recipient'] or 0):.2f} | "
            + (f"{pct(r['lift'])} | [{pct(r['ci_low'])}, {pct(r['ci_high'])}] | {pct(r['relative_lift'])} | "
               f"[{pct(r['relative_ci_low'])}, {pct(r['relative_ci_high'])}] | {r['revenue_lift']:+.2f} | "
               f"[{r['revenue_ci_low']:+.2f}, {r['revenue_ci_high']:+.2f}] |" if lift else "| | | | | |"))
    if tests:
        _plot_tests(list(tests), out / "tests.png")
        lines += ["", "## A/B/n tests", "",
                  "Each variant splits a campaign's treatment by a hash of its own. Rates carry 95% Wilson intervals; "
                  "a difference to the control carries a Bonferroni-corrected interval (all of a test's intervals "
                  "hold together at 95%); P(best) is the share of posterior draws (Beta, uniform prior) in which "
                  "the variant converts best.", "", "![A/B/n variants](tests.png)", "",
                  "| campaign | variant | recipients | conversions | rate | 95% interval | vs control | corrected "
                  "interval | P(best) |", "|---|---|---:|---:|---:|---|---:|---|---:|"]
        for r in tests:
            versus = ("control | |" if r["control"] else
                      f"{pct(r['difference'])} | [{pct(r['difference_low'])}, {pct(r['difference_high'])}] |")
            lines.append(f"| {r['campaign_id']} | {r['test_variant']} | {r['recipients']} | {r['conversions']} | "
                         f"{r['conversion_rate']:.2%} | [{r['rate_low']:.2%}, {r['rate_high']:.2%}] | {versus} "
                         f"{r['probability_best']:.2f} |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    path = out / "campaigns.md"
    path.write_text("\n".join(lines) + "\n")
    return path
