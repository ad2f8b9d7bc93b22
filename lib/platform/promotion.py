"""Promotion gates: a stage's new model replaces the one in use only when it beats its simplest baselines.

After a stage that fits a model has passed its data-quality gates, each of its promotion checks reads
the evidence the stage wrote for this run (``rec_metrics``, ``model_metrics``, ``segment_quality``)
and holds the shipped model to its baseline: value = the model's measure, threshold = the best
baseline's (or the configured floor). Every check becomes a ``data_quality`` row (gate ``promote_*``).
When one fails and ``promotion.action = "keep_previous"``, ``jobs.common.run_stage`` restores the
stage's shipped tables (``StageSpec.ships``) to their versions before the stage, keeps its evidence
tables, and records the stage as ``not_promoted`` with the reasons; later stages read the previous
champion's outputs. With no previous version to keep (a first run) the new outputs ship, with a warning.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable


from lib.platform import catalog as C
from lib.platform.quality import GateInput, Measurement
from lib.recommend.evaluation import SHIP_BASELINES

# Each shipped list and the trivial lists that could replace it (rec_metrics model names), measured by
# NDCG at the largest K evaluated: discover (the ALS list, new items) against popularity on new items;
# the buy-again and blended lists as shipped against the lists validation could ship instead, and the
# blended list (all next purchases, as popularity) also against the most bought items overall. A
# buy-again list is not held to popularity: it fills the email's "buy again" slot, which popular
# items the customer never bought cannot.
LIST_BASELINES: dict[str, tuple[str, ...]] = {
    "discover": ("popular_new",),
    "shipped_buy_again": SHIP_BASELINES["buy_again"],
    "shipped_blended": (*SHIP_BASELINES["blended"], "popular_all"),
}
PROMOTION_METRIC = "ndcg"
SCORE_TARGETS = ("churn", "purchase")
SCORE_METRIC = "roc_auc"
BASELINE_SUFFIX = "_baseline"


def list_checks(metrics: Iterable[tuple[str, int, str, float]]) -> list[Measurement]:
    """One check per shipped list measured in ``metrics`` (model, k, metric, value rows of one run): its
    NDCG at the largest K against the best of its baselines measured at that K. A list or baselines
    not measured (evaluation off, no held-out purchases) give no check."""
    ndcg: dict[tuple[str, int], float] = {(model, k): value for model, k, metric, value in metrics
                                          if metric == PROMOTION_METRIC and not math.isnan(value)}
    checks = []
    for model, baselines in LIST_BASELINES.items():
        ks = [k for name, k in ndcg if name == model]
        if not ks:
            continue
        k = max(ks)
        measured = {name: ndcg[(name, k)] for name in baselines if (name, k) in ndcg}
        if not measured:
            continue
        checks.append(_against_best(f"promote_{model}", ndcg[(model, k)], measured, f"{model} NDCG@{k}"))
    return checks


def _against_best(gate: str, value: float, baselines: dict[str, float], what: str) -> Measurement:
    """``value`` held to the best of ``baselines`` (name -> value); a tie ships the model."""
    best = max(baselines, key=baselines.get)
    return Measurement(gate, value, baselines[best], value >= baselines[best],
                       f"{what} against its best baseline {best}")


def score_checks(metrics: Iterable[tuple[str, str, str, float]], chosen: dict[str, str]) -> list[Measurement]:
    """Per target of ``SCORE_TARGETS`` scored this run: the shipped model's (``chosen[target]``) validation
    ROC-AUC against the best ``*_baseline``'s, from ``metrics`` (target, model, metric, value rows)."""
    auc = {(target, model): value for target, model, metric, value in metrics if metric == SCORE_METRIC}
    checks = []
    for target in SCORE_TARGETS:
        model = chosen.get(target)
        baselines = {m: v for (t, m), v in auc.items() if t == target and m.endswith(BASELINE_SUFFIX)}
        if model is None or (target, model) not in auc or not baselines:
            continue
        checks.append(_against_best(f"promote_{target}_score", auc[(target, model)], baselines,
                                    f"{target}: {model} validation ROC-AUC"))
    return checks


def segment_checks(stability_ari: float | None, minimum: float) -> list[Measurement]:
    """The segments' stability (ARI between two seeds, ``segment_quality``) against the configured floor;
    none when it was not measured (``segments.stability_check`` off)."""
    if stability_ari is None or math.isnan(stability_ari):
        return []
    return [Measurement("promote_segments_stability", stability_ari, minimum, stability_ari >= minimum,
                        "segments: ARI between the assignments of two seeds against promotion.min_segment_stability")]


def recommend_items_checks(ctx: GateInput) -> list[Measurement]:
    return list_checks(ctx.tables.run_rows(ctx.spark, C.REC_METRICS, ctx.run_id, "model", "k", "metric", "value"))


def score_customers_checks(ctx: GateInput) -> list[Measurement]:
    rows = ctx.tables.run_rows(ctx.spark, C.MODEL_METRICS, ctx.run_id, "target", "model", "metric", "value")
    # The shipped model of each target is the one the stage judged against the baselines.
    chosen = {target: model for target, model, metric, _ in rows if metric == "beats_baseline"}
    return score_checks(rows, chosen)


def segment_users_checks(ctx: GateInput) -> list[Measurement]:
    rows = ctx.tables.run_rows(ctx.spark, C.SEGMENT_QUALITY, ctx.run_id, "stability_ari")
    return segment_checks(rows[-1][0] if rows else None, ctx.settings.promotion.min_segment_stability)


PROMOTION_CHECKS: dict[str, Callable[[GateInput], list[Measurement]]] = {
    "segment_users": segment_users_checks,
    "recommend_items": recommend_items_checks,
    "score_customers": score_customers_checks,
}


def check_promotion(stage: str, ctx: GateInput) -> list[Measurement]:
    """Every promotion check of ``stage`` (none for a stage that fits no model)."""
    checks = PROMOTION_CHECKS.get(stage)
    return [] if checks is None else checks(ctx)


def losing_summary(checks: list[Measurement]) -> str:
    """The failed checks, one clause each: what lost, by how much, to what."""
    return "; ".join(f"{m.gate}: {m.value:.4f} < {m.threshold:.4f} ({m.detail})" for m in checks if not m.passed)
