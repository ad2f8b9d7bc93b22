"""Probability calibration and the validation metrics of a binary score (lib/scores/scoring.py).

Everything here returns small things to the driver: scalars, 10-row tables. Rankings use a window
over the validation users (one row per user), never a collect.
"""
from __future__ import annotations

from pyspark.ml.classification import LogisticRegression
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.regression import IsotonicRegression
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

EPS = 1e-6
BINS = 10


def _logit(col: str):
    p = F.least(F.greatest(F.col(col), F.lit(EPS)), F.lit(1 - EPS))
    return F.log(p / (1 - p))


class Calibrator:
    """A monotone map from a model's raw probability to a calibrated one: isotonic or Platt."""

    def __init__(self, method: str) -> None:
        if method not in ("isotonic", "platt"):
            raise ValueError(f"calibration must be isotonic or platt, got {method!r}")
        self.method = method
        self.model = None

    def fit(self, df: DataFrame, score_col: str, label_col: str) -> "Calibrator":
        if self.method == "isotonic":
            self.model = IsotonicRegression(featuresCol=score_col, labelCol=label_col,
                                            predictionCol="_calibrated").fit(df)
        else:
            prepared = VectorAssembler(inputCols=["_logit"], outputCol="_logit_vec").transform(
                df.withColumn("_logit", _logit(score_col)))
            self.model = LogisticRegression(featuresCol="_logit_vec", labelCol=label_col, regParam=0.0,
                                            probabilityCol="_p", rawPredictionCol="_raw",
                                            predictionCol="_pred").fit(prepared)
        return self

    def transform(self, df: DataFrame, score_col: str, out_col: str) -> DataFrame:
        """``df`` with ``out_col``, the calibrated probability in [0, 1]."""
        if self.model is None:
            raise ValueError("calibrator is not fitted")
        if self.method == "isotonic":
            out = self.model.transform(df).withColumnRenamed("_calibrated", out_col)
        else:
            from pyspark.ml.functions import vector_to_array

            prepared = VectorAssembler(inputCols=["_logit"], outputCol="_logit_vec").transform(
                df.withColumn("_logit", _logit(score_col)))
            out = (self.model.transform(prepared)
                   .withColumn(out_col, vector_to_array("_p")[1])
                   .drop("_logit", "_logit_vec", "_p", "_raw", "_pred"))
        return out.withColumn(out_col, F.least(F.greatest(F.col(out_col), F.lit(0.0)), F.lit(1.0)))


def cross_fitted(df: DataFrame, score_col: str, label_col: str, method: str, out_col: str,
                 fold_col: str = "_fold") -> DataFrame:
    """Out-of-fold calibrated probabilities: users are split in two by a hash of user_id; each half is
    calibrated by a calibrator fitted on the other half (honest Brier and reliability)."""
    with_fold = df.withColumn(fold_col, F.pmod(F.xxhash64("user_id"), F.lit(2)))
    parts = []
    for fold in (0, 1):
        fit_on = with_fold.where(F.col(fold_col) != fold)
        calibrator = Calibrator(method).fit(fit_on, score_col, label_col)
        parts.append(calibrator.transform(with_fold.where(F.col(fold_col) == fold), score_col, out_col))
    return parts[0].unionByName(parts[1]).drop(fold_col)


def ranking_metrics(df: DataFrame, score_col: str, label_col: str) -> dict[str, float]:
    """ROC-AUC, PR-AUC, base rate and the positive rate of each score decile over the base rate
    (``decile_lift_1`` is the top decile)."""
    metrics = {}
    for name, metric in (("roc_auc", "areaUnderROC"), ("pr_auc", "areaUnderPR")):
        metrics[name] = BinaryClassificationEvaluator(rawPredictionCol=score_col, labelCol=label_col,
                                                      metricName=metric).evaluate(df)
    order = Window.orderBy(F.col(score_col).desc(), F.xxhash64("user_id"))
    ranked = (df.select("user_id", score_col, label_col)
              .withColumn("_rank", F.row_number().over(order))
              .withColumn("_n", F.count(F.lit(1)).over(Window.partitionBy()))
              .withColumn("_decile", F.ceil(F.col("_rank") * BINS / F.col("_n")).cast("int")))
    stats = ranked.groupBy("_decile").agg(F.avg(label_col).alias("rate"), F.count(F.lit(1)).alias("n")).collect()
    total = sum(row["n"] for row in stats)
    base = sum(row["rate"] * row["n"] for row in stats) / total if total else float("nan")
    metrics["base_rate"] = base
    metrics["n"] = float(total)
    for row in stats:
        metrics[f"decile_lift_{row['_decile']}"] = row["rate"] / base if base else float("nan")
    metrics["top_decile_lift"] = metrics.get("decile_lift_1", float("nan"))
    return metrics


def probability_metrics(df: DataFrame, prob_col: str, label_col: str) -> tuple[float, list[tuple[int, float, float, int]]]:
    """Brier score and the reliability table: (bin, mean predicted, observed rate, users) per tenth of [0, 1]."""
    binned = df.withColumn("_bin", F.least(F.floor(F.col(prob_col) * BINS), F.lit(BINS - 1)).cast("int"))
    brier = df.agg(F.avg(F.pow(F.col(prob_col) - F.col(label_col), 2))).first()[0]
    rows = binned.groupBy("_bin").agg(F.avg(prob_col).alias("p"), F.avg(label_col).alias("y"),
                                      F.count(F.lit(1)).alias("n")).collect()
    table = sorted((row["_bin"], float(row["p"]), float(row["y"]), int(row["n"])) for row in rows)
    return float(brier), table
