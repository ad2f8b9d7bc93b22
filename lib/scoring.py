"""Customer scores: churn and purchase probability in the next horizon, expected revenue, email engagement.

Time-based, never random rows. With horizon h and the scored date ``as_of``:
- train: features as of ``as_of - 2h``, labels from the h days after it;
- validation: features as of ``as_of - h``, labels from the h days after it (up to ``as_of``);
- scoring: features as of ``as_of`` (its labels are the future).
Each candidate (MLlib logistic regression, gradient-boosted trees; class weights through weightCol)
is fitted on train and the best validation PR-AUC is kept; its probabilities are calibrated on the
validation window (isotonic or Platt; metrics use cross-fitted halves). A recency-only rule is the
baseline it must beat. Below the configured minimums nothing is fitted: every row is ineligible
with a reason_code and no probability.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, timedelta

from pyspark.ml import Pipeline
from pyspark.ml.classification import GBTClassifier, LogisticRegression
from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.calibration import Calibrator, cross_fitted, probability_metrics, ranking_metrics
from lib.features import customer_features, events_until, feature_names, labelled, labels
from lib.settings import ScoresSettings

log = logging.getLogger(__name__)
TARGETS = ("churn", "purchase")
BASELINE = "recency_baseline"
REVENUE_SHRINK = 3.0     # purchases of pseudo-evidence at the global order value
ENGAGEMENT_SHRINK = 5.0  # sends of pseudo-evidence at the global reaction rate


@dataclass
class ScoreOutcome:
    scores: DataFrame                      # user_id + the customer_scores columns but as_of / run_id
    metrics: list[tuple[str, str, str, int | None, float]] = field(default_factory=list)  # target, model, metric, bin, value
    chosen: dict[str, str] = field(default_factory=dict)
    eligible: bool = False
    reason: str = ""
    counts: dict[str, int] = field(default_factory=dict)


def check_eligibility(events: DataFrame, as_of: date, settings: ScoresSettings) -> tuple[str, dict[str, int]]:
    """The first dataset-level reason not to fit ('' when fine) and the counts behind it."""
    h = settings.horizon_days
    train_cutoff = as_of - timedelta(days=2 * h)
    seen = events_until(events, as_of)
    stats = seen.agg(F.min("event_ts").alias("first"),
                     F.countDistinct(F.when((F.col("event_type") == "purchase")
                                            & (F.col("age_days") >= 2.0 * h), F.col("user_id"))).alias("buyers")).first()
    if stats["first"] is None:
        return "insufficient_history", {"history_days": 0, "buyers": 0}
    history = (train_cutoff - stats["first"].date()).days + 1
    counts = {"history_days": history, "buyers": int(stats["buyers"])}
    if history < settings.min_history_days:
        return "insufficient_history", counts
    if stats["buyers"] < settings.min_buyers:
        return "too_few_buyers", counts
    return "", counts


def _population(features: DataFrame, windows: tuple[int, ...]) -> DataFrame:
    """Users with site activity in the longest window: the ones churn and purchase are predicted for."""
    return features.where(F.col(f"site_events_{max(windows)}d") > 0)


def _class_weights(df: DataFrame, label: str) -> tuple[DataFrame, int, int]:
    row = df.agg(F.sum(label).alias("pos"), F.count(F.lit(1)).alias("n")).first()
    pos, n = int(row["pos"] or 0), int(row["n"])
    neg = n - pos
    w_pos = n / (2.0 * pos) if pos else 1.0
    w_neg = n / (2.0 * neg) if neg else 1.0
    return df.withColumn("_weight", F.when(F.col(label) == 1.0, w_pos).otherwise(w_neg)), pos, neg


def _estimator(name: str, names: list[str], label: str, settings: ScoresSettings) -> Pipeline:
    assemble = VectorAssembler(inputCols=names, outputCol="_fvec")
    if name == "logistic_regression":
        stages = [assemble, StandardScaler(inputCol="_fvec", outputCol="_svec", withMean=True, withStd=True),
                  LogisticRegression(featuresCol="_svec", labelCol=label, weightCol="_weight",
                                     regParam=settings.lr_reg_param, maxIter=100,
                                     probabilityCol="_prob", rawPredictionCol="_raw", predictionCol="_pred")]
    else:
        stages = [assemble, GBTClassifier(featuresCol="_fvec", labelCol=label, weightCol="_weight",
                                          maxIter=settings.gbt_max_iter, maxDepth=settings.gbt_max_depth,
                                          seed=settings.seed, predictionCol="_pred")
                  .setProbabilityCol("_prob").setRawPredictionCol("_raw")]
    return Pipeline(stages=stages)


def _raw_score(model, df: DataFrame) -> DataFrame:
    out = model.transform(df).withColumn("_score", vector_to_array("_prob")[1])
    return out.drop(*[c for c in ("_fvec", "_svec", "_prob", "_raw", "_pred") if c in out.columns])


def baseline_score(target: str) -> F.Column:
    """The recency-only rule: long since the last visit -> churn; a recent purchase -> buys again."""
    return F.col("site_recency_days") if target == "churn" else -F.col("purchase_recency_days")


def fit_target(target: str, train: DataFrame, valid: DataFrame, scoring: DataFrame, names: list[str],
               settings: ScoresSettings, outcome: ScoreOutcome) -> DataFrame:
    """Fit the candidates for one target, keep the best, calibrate; return scoring with ``<target>_probability``
    (and validation metrics appended to ``outcome``)."""
    weighted, pos, neg = _class_weights(train, target)
    best, best_pr, best_model = "", -1.0, None
    for name in settings.models:
        model = _estimator(name, names, target, settings).fit(weighted)
        scored = _raw_score(model, valid).persist()
        metrics = ranking_metrics(scored, "_score", target)
        scored.unpersist()
        outcome.metrics += [(target, name, metric, None, value) for metric, value in sorted(metrics.items())
                            if not metric.startswith("decile_lift_")]
        log.info("%s %s: validation ROC-AUC %.4f PR-AUC %.4f", target, name, metrics["roc_auc"], metrics["pr_auc"])
        if metrics["pr_auc"] > best_pr:
            best, best_pr, best_model = name, metrics["pr_auc"], model
    outcome.chosen[target] = best

    valid_scored = _raw_score(best_model, valid).persist()
    chosen = ranking_metrics(valid_scored, "_score", target)
    honest = cross_fitted(valid_scored, "_score", target, settings.calibration, "_p")
    brier, table = probability_metrics(honest, "_p", target)
    model_name = f"{best}+{settings.calibration}"
    outcome.metrics += [(target, model_name, metric, None, value) for metric, value in sorted(chosen.items())
                        if not metric.startswith("decile_lift_")]
    outcome.metrics += [(target, model_name, "decile_lift", int(metric.rsplit("_", 1)[1]), value)
                        for metric, value in chosen.items() if metric.startswith("decile_lift_")]
    outcome.metrics.append((target, model_name, "brier", None, brier))
    for b, p, y, n in table:
        outcome.metrics += [(target, model_name, "reliability_predicted", b, p),
                            (target, model_name, "reliability_observed", b, y),
                            (target, model_name, "reliability_users", b, float(n))]
    base = ranking_metrics(valid.withColumn("_score", baseline_score(target)), "_score", target)
    outcome.metrics += [(target, BASELINE, metric, None, value) for metric, value in sorted(base.items())
                        if not metric.startswith("decile_lift_")]
    outcome.metrics += [(target, BASELINE, "decile_lift", int(metric.rsplit("_", 1)[1]), value)
                        for metric, value in base.items() if metric.startswith("decile_lift_")]
    beats = chosen["roc_auc"] > base["roc_auc"] and chosen["pr_auc"] > base["pr_auc"]
    outcome.metrics += [(target, model_name, "train_positives", None, float(pos)),
                        (target, model_name, "train_negatives", None, float(neg)),
                        (target, model_name, "beats_baseline", None, float(beats))]
    if not beats:
        log.warning("%s: %s does not beat the recency baseline on validation (ROC-AUC %.4f vs %.4f)",
                    target, model_name, chosen["roc_auc"], base["roc_auc"])
    calibrator = Calibrator(settings.calibration).fit(valid_scored, "_score", target)
    result = calibrator.transform(_raw_score(best_model, scoring), "_score", f"{target}_probability")
    valid_scored.unpersist()
    return result.drop("_score")


def _positives(df: DataFrame) -> dict[str, tuple[int, int]]:
    row = df.agg(*[F.sum(t).alias(t) for t in TARGETS], F.count(F.lit(1)).alias("n")).first()
    return {t: (int(row[t] or 0), int(row["n"]) - int(row[t] or 0)) for t in TARGETS}


def score_customers(events: DataFrame, as_of: date, settings: ScoresSettings,
                    affinities: DataFrame | None = None, k: int = 0) -> ScoreOutcome:
    """Scores for every user with an event up to ``as_of`` (see the module docstring)."""
    windows, h = tuple(settings.windows_days), settings.horizon_days
    k = k if affinities is not None else 0
    names = feature_names(windows, k)
    current = customer_features(events, as_of, windows, affinities, k).persist()
    longest = max(windows)
    engagement = _engagement(current, longest)
    reason, counts = check_eligibility(events, as_of, settings)
    outcome = ScoreOutcome(scores=None, counts=dict(counts))  # type: ignore[arg-type]
    if not reason:
        cut_valid, cut_train = as_of - timedelta(days=h), as_of - timedelta(days=2 * h)
        train = _population(labelled(customer_features(events, cut_train, windows, affinities, k),
                                     labels(events, cut_train, h)), windows).persist()
        valid = _population(labelled(customer_features(events, cut_valid, windows, affinities, k),
                                     labels(events, cut_valid, h)), windows).persist()
        positives = {"train": _positives(train), "valid": _positives(valid)}
        for side, per_target in positives.items():
            for target, (pos, neg) in per_target.items():
                outcome.counts[f"{side}_{target}_positives"] = pos
                outcome.counts[f"{side}_{target}_negatives"] = neg
        if min(min(pair) for per_target in positives.values() for pair in per_target.values()) < settings.min_positives:
            reason = "too_few_positives"
    if reason:
        outcome.reason = reason
        outcome.scores = engagement.select(
            "user_id", *[F.lit(None).cast("double").alias(c) for c in
                         ("churn_probability", "purchase_probability", "expected_revenue")],
            "engagement_score", F.lit(False).alias("eligible"), F.lit(reason).alias("reason_code"))
        return outcome

    population = _population(current, windows)
    scored = population
    for target in TARGETS:
        scored = fit_target(target, train, valid, scored, names, settings, outcome)
    order_value = _order_value(valid, longest)
    scored = scored.select("user_id", "churn_probability", "purchase_probability",
                           (F.col("purchase_probability") * _conditional_revenue(longest, *order_value))
                           .alias("expected_revenue"))
    outcome.eligible = True
    outcome.scores = (engagement.join(scored, "user_id", "left").select(
        "user_id", "churn_probability", "purchase_probability", "expected_revenue", "engagement_score",
        F.col("churn_probability").isNotNull().alias("eligible"),
        F.when(F.col("churn_probability").isNull(), F.lit("no_site_activity")).alias("reason_code")))
    train.unpersist()
    valid.unpersist()
    return outcome


def _order_value(valid: DataFrame, longest: int) -> tuple[float, float]:
    """(global revenue per purchase in the history, global revenue per buyer of a label window)."""
    row = valid.agg(F.try_divide(F.sum(f"revenue_{longest}d"), F.sum(f"purchases_{longest}d")).alias("aov"),
                    F.avg(F.when(F.col("purchase") == 1.0, F.col("revenue_next"))).alias("per_buyer")).first()
    return float(row["aov"] or 0.0), float(row["per_buyer"] or 0.0)


def _conditional_revenue(longest: int, aov: float, per_buyer: float) -> F.Column:
    """A buyer's expected revenue in a horizon: the global revenue per buying customer, scaled by the
    user's own order value shrunk toward the global one."""
    n, revenue = F.col(f"purchases_{longest}d"), F.col(f"revenue_{longest}d")
    own = (revenue + F.lit(REVENUE_SHRINK * aov)) / (n + F.lit(REVENUE_SHRINK))
    return F.lit(per_buyer) * (own / F.lit(aov) if aov > 0 else F.lit(1.0))


def _engagement(features: DataFrame, longest: int) -> DataFrame:
    """(user_id, engagement_score): reactions (opens + clicks) per delivered email over the longest window,
    shrunk toward everyone's rate, capped at 1; null for users never mailed."""
    sends, reactions = F.col(f"sends_{longest}d"), F.col(f"opens_{longest}d") + F.col(f"email_clicks_{longest}d")
    # try_divide: a clickstream without email events (most source presets) has no sends at all.
    overall = features.agg(F.try_divide(F.sum(reactions), F.sum(sends))).first()[0] or 0.0
    score = F.least(F.lit(1.0), (reactions + F.lit(ENGAGEMENT_SHRINK * overall)) / (sends + F.lit(ENGAGEMENT_SHRINK)))
    return features.select("user_id", F.when(sends > 0, score).alias("engagement_score"),
                           *[c for c in features.columns if c != "user_id"])


def finalize_scores(scores: DataFrame, as_of: date, settings: ScoresSettings, model_version: str,
                    run_id: str) -> DataFrame:
    """customer_scores rows: the band from the configured thresholds and the percentile of churn risk
    among eligible users (0-100, from approximate quantiles: only 99 cut points reach the driver)."""
    cuts = scores.where("eligible").approxQuantile("churn_probability", [q / 100 for q in range(1, 100)], 0.001)
    percentile = (F.aggregate(F.array(*[F.lit(float(c)) for c in cuts]), F.lit(0),
                              lambda acc, c: acc + F.when(c < F.col("churn_probability"), 1).otherwise(0))
                  * 100.0 / 99.0) if cuts else F.lit(None)
    p = F.col("churn_probability")
    band = (F.when(p.isNull(), None).when(p >= settings.churn_band_high, "high")
            .when(p >= settings.churn_band_medium, "medium").otherwise("low"))
    return scores.select(
        "user_id", F.lit(as_of.isoformat()).cast("date").alias("as_of"), "churn_probability",
        band.alias("churn_band"), F.when(p.isNotNull(), percentile).cast("double").alias("churn_percentile"),
        "purchase_probability", "expected_revenue", "engagement_score", "eligible", "reason_code",
        F.lit(model_version).alias("model_version"), F.lit(run_id).alias("run_id"))
