"""The customer-score report: validation metrics against the recency baseline, a lift chart and a
reliability plot (matplotlib, Agg), from the small metric rows only."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # batch jobs have no display
import matplotlib.pyplot as plt  # noqa: E402

HEADLINE = ("roc_auc", "pr_auc", "base_rate", "top_decile_lift", "brier")
VALUE_TARGETS = ("clv", "next_order")


def write_score_report(directory: str | Path, run_id: str, as_of: str,
                       metrics: list[tuple[str, str, str, int | None, float]], chosen: dict[str, str],
                       calibration: str, message: str = "", segments: list[dict] = ()) -> Path:
    """scores.md, lift.png and reliability.png in ``directory``; returns the markdown path.
    ``metrics``: (target, model, metric, bin, value) rows as written to model_metrics; ``segments``: the
    run's ``segment_outcomes`` rows (segment_id, customers, eligible and the mean scores)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Customer scores (run {run_id}, as of {as_of})", ""]
    if not chosen:
        lines += [f"No model was fitted: {message}. Every customer is written with eligible = false.", ""]
        (out / "scores.md").write_text("\n".join(lines))
        return out / "scores.md"
    lines += ["Validation window: features as of one horizon before the scored date, outcomes in the horizon "
              "after it (a time-based split). The best baseline is the one to beat.", ""]
    fig_lift, axes_lift = plt.subplots(1, len(chosen), figsize=(6 * len(chosen), 3.5), squeeze=False)
    fig_rel, axes_rel = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 4), squeeze=False)
    for i, (target, best) in enumerate(sorted(chosen.items())):
        model = f"{best}+{calibration}"
        rows = [m for m in metrics if m[0] == target]
        models = sorted({m[1] for m in rows if m[3] is None and m[2] in HEADLINE})
        lines += [f"## {target}", "", f"Chosen: **{model}** (best validation PR-AUC); the *_baseline rows are "
                  "recency, frequency, RFM logistic regression and the purchase model's probability.", "",
                  "| model | " + " | ".join(HEADLINE) + " |", "|---|" + "---:|" * len(HEADLINE)]
        for name in models:
            values = {m[2]: m[4] for m in rows if m[1] == name and m[3] is None}
            lines.append(f"| {name} | " + " | ".join(f"{values[k]:.4f}" if k in values else "" for k in HEADLINE) + " |")
        lines.append("")
        ax = axes_lift[0][i]
        for name, color in ((model, "#4477aa"), ("recency_baseline", "#bbbbbb")):
            lift = sorted((m[3], m[4]) for m in rows if m[1] == name and m[2] == "decile_lift")
            ax.bar([d + (0.2 if color == "#bbbbbb" else -0.2) for d, _ in lift], [v for _, v in lift], width=0.4,
                   color=color, label=name)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xlabel("score decile (1 = highest)")
        ax.set_ylabel("positive rate / base rate")
        ax.set_title(f"{target}: lift by decile")
        ax.legend(fontsize=8)
        ax = axes_rel[0][i]
        predicted = {m[3]: m[4] for m in rows if m[1] == model and m[2] == "reliability_predicted"}
        observed = {m[3]: m[4] for m in rows if m[1] == model and m[2] == "reliability_observed"}
        bins = sorted(predicted)
        ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1)
        ax.plot([predicted[b] for b in bins], [observed[b] for b in bins], marker="o", color="#aa3377")
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed rate")
        ax.set_title(f"{target}: reliability ({calibration})")
    for fig, name in ((fig_lift, "lift.png"), (fig_rel, "reliability.png")):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
    value = [m for m in metrics if m[0] in VALUE_TARGETS and m[3] is None]
    if value:
        lines += ["## Customer value", "", "Purchase model fitted at the start of the value validation window, "
                  "measured on it, beside historic spend and the last order plus the average gap.", "",
                  "| target | model | metric | value |", "|---|---|---|---:|"]
        lines += [f"| {t} | {name} | {metric} | {v:.4f} |" for t, name, metric, _, v in value]
        lines.append("")
    if segments:
        lines += ["## Segments", "", "Mean scores of each segment's eligible customers: which segments are about "
                  "to lapse, buy, spend and open emails.", "",
                  "| segment | customers | eligible | churn probability | purchase probability | expected revenue | "
                  "historic CLV | engagement |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {row['segment_id']} | {row['customers']} | {row['eligible']} | "
                  + " | ".join("" if row[name] is None else f"{row[name]:.3f}"
                               for name in ("churn_probability", "purchase_probability", "expected_revenue",
                                            "historic_clv", "engagement_score")) + " |" for row in segments]
        lines.append("")
    lines += ["## Lift", "", "![lift](lift.png)", "", "## Reliability", "",
              "Cross-fitted on two halves of the validation users: points on the diagonal are calibrated.", "",
              "![reliability](reliability.png)", ""]
    (out / "scores.md").write_text("\n".join(lines))
    return out / "scores.md"
