"""Every model of a warehouse's latest run beside its baselines, as markdown (docs/baselines.md).

    .venv/bin/python bench/baseline_table.py --warehouse /path/to/output.root [--k 10]

Reads ``rec_metrics`` (the lists on recommend_items' split) and ``model_metrics`` (the scores and the
customer-value fields on score_customers' validation windows) of the latest run of each with delta-rs,
no Spark: the tables are small (one row per model and metric).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd
from deltalake import DeltaTable


def latest_run(table: Path) -> pd.DataFrame:
    """The rows of the table's latest run_id (run ids sort by their start time)."""
    rows = DeltaTable(str(table)).to_pandas()
    return rows[rows["run_id"] == rows["run_id"].max()]


def list_table(metrics: pd.DataFrame, k: int) -> str:
    """NDCG, precision and recall at ``k`` (with NDCG's standard error) per list, best first."""
    at_k = metrics[metrics["k"] == k].pivot_table(index="model", columns="metric", values="value")
    at_k = at_k.sort_values("ndcg", ascending=False)
    lines = [f"| list (run {metrics['run_id'].iloc[0]}) | NDCG@{k} (SE) | precision@{k} | recall@{k} | users |",
             "|---|---:|---:|---:|---:|"]
    for model, row in at_k.iterrows():
        lines.append(f"| {model} | {row['ndcg']:.4f} ({row.get('ndcg_se', float('nan')):.4f}) | "
                     f"{row['precision']:.4f} | {row['recall']:.4f} | {int(row['users'])} |")
    return "\n".join(lines)


def auc_standard_error(auc: float, positives: float, negatives: float) -> float:
    """ROC-AUC's standard error from the AUC and the class counts (Hanley & McNeil 1982)."""
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    variance = (auc * (1.0 - auc) + (positives - 1.0) * (q1 - auc * auc)
                + (negatives - 1.0) * (q2 - auc * auc)) / (positives * negatives)
    return math.sqrt(max(variance, 0.0))


def score_table(metrics: pd.DataFrame) -> str:
    """Per target (churn, purchase) and model: ROC-AUC (SE) and PR-AUC on the validation window; then the
    customer-value metrics (targets ``clv`` and ``next_order``) per model."""
    whole = metrics[metrics["bin"].isna()].pivot_table(index=["target", "model"], columns="metric", values="value")
    lines = [f"| target | model (run {metrics['run_id'].iloc[0]}) | ROC-AUC (SE) | PR-AUC | base rate | customers |",
             "|---|---|---:|---:|---:|---:|"]
    for (target, model), row in whole.iterrows():
        if target in ("churn", "purchase") and not pd.isna(row.get("roc_auc")):
            positives = row["base_rate"] * row["n"]
            se = auc_standard_error(row["roc_auc"], positives, row["n"] - positives)
            lines.append(f"| {target} | {model} | {row['roc_auc']:.3f} ({se:.3f}) | {row['pr_auc']:.3f} | "
                         f"{row['base_rate']:.3f} | {int(row['n'])} |")
    lines += ["", "| target | model | metric | value |", "|---|---|---|---:|"]
    for (target, model), row in whole.iterrows():
        if target not in ("churn", "purchase"):
            lines += [f"| {target} | {model} | {metric} | {value:.4f} |"
                      for metric, value in row.items() if not pd.isna(value)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", type=Path, required=True, help="the pipeline's output.root")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    for name, render in (("rec_metrics", lambda m: list_table(m, args.k)), ("model_metrics", score_table)):
        table = args.warehouse / name
        print(f"## {name}\n")
        print(render(latest_run(table)) if table.exists() else f"({table} absent)")
        print()


if __name__ == "__main__":
    main()
