"""Customer scores: churn and purchase probability in the next horizon, expected revenue, email engagement.

Time-based, never random rows. With horizon h and the scored date ``as_of``:
- train: features as of ``as_of - 2h``, labels from the h days after it;
- validation: features as of ``as_of - h``, labels from the h days after it (up to ``as_of``);
- scoring: features as of ``as_of`` (its labels are the future).
Churn is no site activity in h days, or (``scores.churn_definition = no_order``) no order in
``scores.churn_horizon_days``, with its own pair of windows. Customers with a purchase up to a date
are the population (others: ``no_purchase_yet``); the BG/NBD purchase model (lib/scores/purchase_model.py)
is fitted at every cutoff and gives both features and a candidate. Each candidate (MLlib logistic
regression, gradient-boosted trees with class weights through weightCol; the purchase model's
probability of the target) is fitted on train and the best validation PR-AUC is kept; its probabilities
are calibrated on the validation window (isotonic or Platt; metrics use cross-fitted halves). The
baselines it must beat are recency, frequency, an RFM logistic regression fitted on train and the
purchase model. Customer value (CLV, p_alive, expected orders, next order date) comes from the purchase
model at ``as_of`` and is validated on the ``value_validation_days`` before it. Below the configured
minimums nothing is fitted: every row is ineligible with a reason_code and no probability.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Callable

from pyspark.ml import Model, Pipeline, PipelineModel
from pyspark.ml.classification import GBTClassifier, LogisticRegression
from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from lib.features.customers import (customer_features, events_until, feature_names, labelled, labels, purchase_history,
                                    purchase_history_names)
from lib.platform.settings import ScoresSettings
from lib.scores.calibration import Calibrator, cross_fitted, probability_metrics, ranking_metrics
from lib.scores.purchase_model import PurchaseModel, customer_value, fit_purchase_model, p_alive, p_purchase

log = logging.getLogger(__name__)
TARGETS = ("churn", "purchase")
BGNBD_COLUMN = "_bgnbd"   # the purchase model's probability of the target, per cutoff
# customer_scores' model columns: null for a customer who is not eligible.
SCORE_COLUMNS = (("churn_probability", "double"), ("purchase_probability", "double"), ("expected_revenue", "double"),
                 ("historic_clv", "double"), ("predicted_clv", "double"), ("total_clv", "double"),
                 ("p_alive", "double"), ("expected_orders", "double"), ("avg_days_between_orders", "double"),
                 ("expected_next_order_date", "date"))
PURCHASE_SUMMARY = ("user_id", "repeat_orders", "t_x", "T", "repeat_order_value", "historic_revenue",
                    "mean_gap_days", "last_order_date")
REVENUE_SHRINK = 3.0     # purchases of pseudo-evidence at the global order value
ENGAGEMENT_SHRINK = 5.0  # sends of pseudo-evidence at the global reaction rate


@dataclass
class ScoreOutcome:
    scores: DataFrame                      # user_id + the customer_scores columns but as_of / run_id
    metrics: list[tuple[str, str, str, int | None, float]] = field(default_factory=list)  # target, model, metric, bin, value
    chosen: dict[str, str] = field(default_factory=dict)
    models: dict[str, tuple[PipelineModel, Model]] = field(default_factory=dict)  # target: (chosen, calibrator)
    eligible: bool = False
    reason: str = ""
    counts: dict[str, int] = field(default_factory=dict)


def check_eligibility(events: DataFrame, as_of: date, settings: ScoresSettings) -> tuple[str, dict[str, int]]:
    """The first dataset-level reason not to fit ('' when fine) and the counts behind it."""
    h = max(settings.target_horizon(t) for t in TARGETS)
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


Scorer = Callable[[DataFrame], DataFrame]
CONSTANT_TOLERANCE = 1e-6   # relative spread below which a feature counts as constant on the training window


def informative_features(train: DataFrame, names: list[str]) -> list[str]:
    """``names`` without the features that are constant on ``train`` (standard deviation at most
    CONSTANT_TOLERANCE x max(1, |mean|)). Standardising such a feature divides by almost zero, so
    the slightest change in later windows becomes a huge input that saturates every probability."""
    stats = train.select(*[F.struct(F.stddev_pop(c).alias("sd"), F.avg(c).alias("mean")).alias(c)
                           for c in names]).first()
    return [c for c in names
            if (stats[c]["sd"] or 0.0) > CONSTANT_TOLERANCE * max(1.0, abs(stats[c]["mean"] or 0.0))]


def _candidate(name: str, train: DataFrame, names: list[str], target: str,
               settings: ScoresSettings) -> tuple[Scorer, PipelineModel | None]:
    """A fitted candidate: a function adding ``_score`` (higher: more likely ``target``) and its Spark
    model (None for the purchase model's own probability)."""
    if name == "bgnbd":   # the purchase model needs no training on labels: it was fitted at each cutoff
        return (lambda df: df.withColumn("_score", F.col(BGNBD_COLUMN))), None
    model = _estimator(name, names, target, settings).fit(train)
    return (lambda df: _raw_score(model, df)), model


def baseline_scores(target: str, settings: ScoresSettings, windows: tuple[int, ...]) -> dict[str, F.Column]:
    """The simple rules a model must beat: recency (of a visit for churn as no site activity, else of
    an order), frequency (purchase days in the longest window) and the purchase model's probability."""
    sign = 1.0 if target == "churn" else -1.0
    visit = target == "churn" and settings.churn_definition == "no_site_activity"
    recency = F.col("site_recency_days" if visit else "purchase_recency_days")
    return {"recency_baseline": recency if target == "churn" else -recency,
            "frequency_baseline": F.lit(-sign) * F.col(f"purchase_days_{max(windows)}d"),
            "bgnbd_baseline": F.col(BGNBD_COLUMN)}


def _record(outcome: "ScoreOutcome", target: str, model: str, metrics: dict[str, float]) -> None:
    outcome.metrics += [(target, model, metric, None, value) for metric, value in sorted(metrics.items())
                        if not metric.startswith("decile_lift_")]
    outcome.metrics += [(target, model, "decile_lift", int(metric.rsplit("_", 1)[1]), value)
                        for metric, value in metrics.items() if metric.startswith("decile_lift_")]


def fit_target(target: str, train: DataFrame, valid: DataFrame, scoring: DataFrame, names: list[str],
               settings: ScoresSettings, outcome: "ScoreOutcome") -> DataFrame:
    """Fit the candidates for one target, keep the best validation PR-AUC, calibrate; return scoring with
    ``<target>_probability`` (validation metrics of every candidate and baseline appended to ``outcome``)."""
    weighted, pos, neg = _class_weights(train, target)
    windows = tuple(settings.windows_days)
    names = informative_features(train, names)
    if not names:
        raise ValueError(f"{target}: every feature is constant on the training window; nothing to learn from")
    best, best_pr, best_scorer, best_model = "", -1.0, None, None
    for name in settings.models:
        scorer, model = _candidate(name, weighted, names, target, settings)
        scored = scorer(valid).persist()
        metrics = ranking_metrics(scored, "_score", target)
        scored.unpersist()
        _record(outcome, target, name, {m: v for m, v in metrics.items() if not m.startswith("decile_lift_")})
        log.info("%s %s: validation ROC-AUC %.4f PR-AUC %.4f", target, name, metrics["roc_auc"], metrics["pr_auc"])
        if metrics["pr_auc"] > best_pr:
            best, best_pr, best_scorer, best_model = name, metrics["pr_auc"], scorer, model
    outcome.chosen[target] = best

    valid_scored = best_scorer(valid).persist()
    chosen = ranking_metrics(valid_scored, "_score", target)
    honest = cross_fitted(valid_scored, "_score", target, settings.calibration, "_p")
    brier, table = probability_metrics(honest, "_p", target)
    model_name = f"{best}+{settings.calibration}"
    _record(outcome, target, model_name, chosen)
    outcome.metrics.append((target, model_name, "brier", None, brier))
    for b, p, y, n in table:
        outcome.metrics += [(target, model_name, "reliability_predicted", b, p),
                            (target, model_name, "reliability_observed", b, y),
                            (target, model_name, "reliability_users", b, float(n))]
    baselines = {name: ranking_metrics(valid.withColumn("_score", rule), "_score", target)
                 for name, rule in baseline_scores(target, settings, windows).items()}
    # Recency, frequency and spend in a logistic regression, fitted on the training window like the models.
    rfm = LogisticRegression(featuresCol="_rfm", labelCol=target, weightCol="_weight", probabilityCol="_prob",
                             rawPredictionCol="_raw", predictionCol="_pred")
    assemble = VectorAssembler(inputCols=rfm_features(windows), outputCol="_rfm")
    rfm_model = rfm.fit(assemble.transform(weighted))
    baselines["rfm_baseline"] = ranking_metrics(
        rfm_model.transform(assemble.transform(valid)).withColumn("_score", vector_to_array("_prob")[1]),
        "_score", target)
    for name, metrics in sorted(baselines.items()):
        _record(outcome, target, name, metrics)
    best_baseline = max(baselines, key=lambda n: baselines[n]["roc_auc"])
    beats = chosen["roc_auc"] >= baselines[best_baseline]["roc_auc"]
    outcome.metrics += [(target, model_name, "train_positives", None, float(pos)),
                        (target, model_name, "train_negatives", None, float(neg)),
                        (target, model_name, "beats_baseline", None, float(beats))]
    if not beats:
        log.warning("%s: %s does not beat %s on validation (ROC-AUC %.4f vs %.4f)", target, model_name,
                    best_baseline, chosen["roc_auc"], baselines[best_baseline]["roc_auc"])
    calibrator = Calibrator(settings.calibration).fit(valid_scored, "_score", target)
    if best_model is not None:
        outcome.models[target] = (best_model, calibrator.model)
    result = calibrator.transform(best_scorer(scoring), "_score", f"{target}_probability")
    valid_scored.unpersist()
    return result.drop("_score")


def rfm_features(windows: tuple[int, ...]) -> list[str]:
    """The RFM baseline's inputs: days since the last order, purchase days and spend in the longest window."""
    return ["purchase_recency_days", f"purchase_days_{max(windows)}d", f"revenue_{max(windows)}d"]


def _positives(df: DataFrame, target: str) -> tuple[int, int]:
    row = df.agg(F.sum(target).alias("pos"), F.count(F.lit(1)).alias("n")).first()
    return int(row["pos"] or 0), int(row["n"]) - int(row["pos"] or 0)


class CutoffFrames:
    """Model rows as of a cutoff (customer features, purchase history and the purchase model fitted at
    that cutoff), built once per cutoff however many targets use it."""

    def __init__(self, events: DataFrame, settings: ScoresSettings, affinities: DataFrame | None, k: int) -> None:
        self.events, self.settings, self.affinities, self.k = events, settings, affinities, k
        self.windows = tuple(settings.windows_days)
        self.cache: dict[date, tuple[DataFrame, PurchaseModel]] = {}
        self.histories: list[DataFrame] = []

    def at(self, cutoff: date) -> tuple[DataFrame, PurchaseModel]:
        """(buyers' rows with every model feature, the purchase model)."""
        if cutoff not in self.cache:
            features = customer_features(self.events, cutoff, self.windows, self.affinities, self.k)
            history = purchase_history(self.events, cutoff, self.windows).persist()
            self.histories.append(history)
            model = fit_purchase_model(history, self.settings.purchase_model_max_rows, self.settings.seed)
            buyers = (features.join(history, "user_id")
                      .withColumn("bgnbd_p_alive", p_alive(model))
                      .withColumn("bgnbd_rate", F.col("bgnbd_p_alive") * (F.lit(model.r) + F.col("repeat_orders"))
                                  / (F.lit(model.alpha) + F.col("T"))))
            self.cache[cutoff] = (buyers, model)
        return self.cache[cutoff]

    def labelled(self, cutoff: date, target: str) -> DataFrame:
        """Buyers as of ``cutoff`` with the target's label (1.0 / 0.0) and its purchase-model score."""
        buyers, model = self.at(cutoff)
        h = self.settings.target_horizon(target)
        rows = labelled(buyers, labels(self.events, cutoff, h))
        buy = p_purchase(model, h)
        if target == "purchase":
            return rows.withColumn(BGNBD_COLUMN, buy)
        if self.settings.churn_definition == "no_order":
            rows = rows.withColumn("churn", F.lit(1.0) - F.col("purchase"))
        return rows.withColumn(BGNBD_COLUMN, F.lit(1.0) - buy)

    def unpersist(self) -> None:
        for history in self.histories:
            history.unpersist()


def score_customers(events: DataFrame, as_of: date, settings: ScoresSettings,
                    affinities: DataFrame | None = None, k: int = 0) -> ScoreOutcome:
    """Scores for every user with an event up to ``as_of`` (see the module docstring)."""
    windows = tuple(settings.windows_days)
    k = k if affinities is not None else 0
    names = feature_names(windows, k) + purchase_history_names(windows) + ["bgnbd_p_alive", "bgnbd_rate"]
    frames = CutoffFrames(events, settings, affinities, k)
    longest = max(windows)
    reason, counts = check_eligibility(events, as_of, settings)
    outcome = ScoreOutcome(scores=None, counts=dict(counts))  # type: ignore[arg-type]
    current = customer_features(events, as_of, windows, affinities, k).persist()
    engagement = _engagement(current, longest)
    sets: dict[str, tuple[DataFrame, DataFrame]] = {}
    if not reason:
        for target in TARGETS:
            h = settings.target_horizon(target)
            pair = tuple(frames.labelled(as_of - timedelta(days=n * h), target).persist() for n in (2, 1))
            sets[target] = pair  # type: ignore[assignment]
            for side, frame in zip(("train", "valid"), pair):
                pos, neg = _positives(frame, target)
                outcome.counts[f"{side}_{target}_positives"] = pos
                outcome.counts[f"{side}_{target}_negatives"] = neg
                if min(pos, neg) < settings.min_positives:
                    reason = reason or "too_few_positives"
    if reason:
        outcome.reason = reason
        outcome.scores = engagement.select(
            "user_id", *[F.lit(None).cast(kind).alias(c) for c, kind in SCORE_COLUMNS],
            "engagement_score", F.lit(False).alias("eligible"), F.lit(reason).alias("reason_code"))
        _release(sets, frames)
        return outcome

    scoring, model = frames.at(as_of)
    for target in TARGETS:
        h = settings.target_horizon(target)
        buy = p_purchase(model, h)
        scoring = fit_target(target, *sets[target],
                             scoring.withColumn(BGNBD_COLUMN, buy if target == "purchase" else F.lit(1.0) - buy),
                             names, settings, outcome).drop(BGNBD_COLUMN)
    order_value = _order_value(sets["purchase"][1], longest)
    value = customer_value(scoring.select(*PURCHASE_SUMMARY), model, as_of, settings.clv_horizon_days)
    scored = scoring.select("user_id", "churn_probability", "purchase_probability",
                            (F.col("purchase_probability") * _conditional_revenue(longest, *order_value))
                            .alias("expected_revenue")).join(value, "user_id")
    outcome.metrics += value_metrics(frames, as_of, settings)
    outcome.eligible = True
    outcome.scores = (engagement.join(scored, "user_id", "left").select(
        "user_id", *[c for c, _ in SCORE_COLUMNS], "engagement_score",
        F.col("churn_probability").isNotNull().alias("eligible"),
        F.when(F.col("churn_probability").isNull(), F.lit("no_purchase_yet")).alias("reason_code")))
    outcome.scores = outcome.scores.persist()   # the caller unpersists it once written
    outcome.scores.count()   # materialised before the cutoffs' cached rows go
    _release(sets, frames)
    return outcome


def _release(sets: dict[str, tuple[DataFrame, DataFrame]], frames: CutoffFrames) -> None:
    for train, valid in sets.values():
        train.unpersist()
        valid.unpersist()
    frames.unpersist()


def _average_rank(column: str) -> F.Column:
    """Rank with ties sharing their average rank (Spearman's convention)."""
    return (F.rank().over(Window.orderBy(column)).cast("double")
            + (F.count(F.lit(1)).over(Window.partitionBy(column)) - 1) / 2.0)


def value_metrics(frames: CutoffFrames, as_of: date, settings: ScoresSettings) -> list[tuple[str, str, str, int | None, float]]:
    """Customer value validated on the ``value_validation_days`` before ``as_of``: the purchase model
    fitted at the start of that window against what buyers then spent (Spearman, top-decile revenue
    capture, beside historic spend) and when they next ordered (mean absolute error in days, beside the
    last order plus the customer's average gap)."""
    days = settings.value_validation_days
    cutoff = as_of - timedelta(days=days)
    if events_until(frames.events, cutoff).where(F.col("event_type") == "purchase").limit(1).count() == 0:
        # A shop younger than the window has no earlier buyer to fit on: the scores stand, unvalidated.
        log.warning("customer value not validated: no purchase before %s (scores.value_validation_days = %d)",
                    cutoff, days)
        return []
    buyers, model = frames.at(cutoff)
    value = customer_value(buyers.select(*PURCHASE_SUMMARY), model, cutoff, days)
    outcome = labels(frames.events, cutoff, days).select("user_id", "revenue_next")
    first_next = (events_until(frames.events, as_of).where(
        (F.col("event_type") == "purchase") & (F.to_date("event_ts") > F.lit(cutoff.isoformat()).cast("date")))
        .groupBy("user_id").agg(F.min(F.to_date("event_ts")).alias("next_order_date")))
    rows = (value.join(buyers.select("user_id", "last_order_date"), "user_id")
            .join(outcome, "user_id", "left").join(first_next, "user_id", "left")
            .fillna(0.0, ["revenue_next"])).persist()
    metrics: list[tuple[str, str, str, int | None, float]] = []
    for name, column in (("predicted_clv", "predicted_clv"), ("total_clv", "total_clv"),
                         ("historic_spend_baseline", "historic_clv")):
        ranked = rows.select(_average_rank(column).alias("_score_rank"), _average_rank("revenue_next").alias("_y_rank"))
        spearman = ranked.agg(F.corr("_score_rank", "_y_rank")).first()[0]
        order = Window.orderBy(F.col(column).desc(), F.xxhash64("user_id"))
        capture = (rows.withColumn("_row", F.row_number().over(order))
                   .withColumn("_n", F.count(F.lit(1)).over(Window.partitionBy()))
                   .agg(F.try_divide(F.sum(F.when(F.col("_row") <= F.ceil(F.col("_n") / 10.0), F.col("revenue_next"))),
                                     F.sum("revenue_next"))).first()[0])
        metrics += [("clv", name, "spearman", None, float(spearman if spearman is not None else float("nan"))),
                    ("clv", name, "top_decile_revenue_share", None, float(capture if capture is not None else float("nan")))]
    came_back = rows.where(F.col("next_order_date").isNotNull() & F.col("avg_days_between_orders").isNotNull())
    naive = F.date_add("last_order_date", F.round("avg_days_between_orders").cast("int"))
    errors = came_back.agg(
        F.avg(F.abs(F.datediff("expected_next_order_date", "next_order_date"))).alias("model"),
        F.avg(F.abs(F.datediff(naive, "next_order_date"))).alias("naive"),
        F.avg(F.abs(F.datediff(F.greatest(naive, F.date_add(F.lit(cutoff.isoformat()).cast("date"), 1)),
                               "next_order_date"))).alias("naive_clipped"),
        F.count(F.lit(1)).alias("n")).first()
    for name, key in (("bgnbd_gap", "model"), ("last_order_plus_mean_gap_baseline", "naive"),
                      ("last_order_plus_mean_gap_clipped_baseline", "naive_clipped")):
        metrics += [("next_order", name, "mae_days", None, float(errors[key] if errors[key] is not None else float("nan"))),
                    ("next_order", name, "n", None, float(errors["n"]))]
    rows.unpersist()
    for target, name, metric, _, v in metrics:
        log.info("%s %s %s: %.4f", target, name, metric, v)
    return metrics


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
        "purchase_probability", "expected_revenue", *[c for c, _ in SCORE_COLUMNS[3:]], "engagement_score",
        "eligible", "reason_code", F.lit(model_version).alias("model_version"), F.lit(run_id).alias("run_id"))


SEGMENT_OUTCOME_MEANS = ("churn_probability", "purchase_probability", "expected_revenue", "historic_clv",
                         "engagement_score")


def segment_outcomes(scores: DataFrame, user_segments: DataFrame) -> DataFrame:
    """(segment_id, customers, eligible, and the mean of each ``SEGMENT_OUTCOME_MEANS`` score): how the
    segments differ in churn, buying, value and email engagement. ``scores``: one as_of's
    ``customer_scores`` rows; means are over the eligible customers (null when a segment has none);
    customers without a segment are left out. One row per segment with a scored customer."""
    eligible = F.col("eligible")
    return (scores.join(user_segments.select("user_id", "segment_id"), "user_id")
            .groupBy("segment_id")
            .agg(F.count(F.lit(1)).alias("customers"), F.sum(eligible.cast("long")).alias("eligible"),
                 *[F.avg(F.when(eligible, F.col(name))).alias(name) for name in SEGMENT_OUTCOME_MEANS])
            .orderBy("segment_id"))
