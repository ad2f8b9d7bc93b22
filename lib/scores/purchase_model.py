"""The BG/NBD purchase process with Gamma-Gamma spend, fitted distributed (customer value fields).

The modified BG/NBD (Batislam, Denizel & Filiztekin 2007) is used: a customer may also drop out right
after the first order, so one order long ago reads as probably gone (plain BG/NBD says alive for sure).
An order is a distinct purchase day. Per buyer as of a date: ``x`` repeat orders (orders - 1), ``t_x``
days from the first to the last order, ``T`` days from the first order to the date, and the mean value
of the repeat orders (Fader, Hardie & Lee 2005: "Counting your customers the easy way"; "RFM and CLV").

Both likelihoods are sums over customers, so the fit never needs a customer's row: the summaries are
aggregated to distinct tuples with counts (days; weeks, or a seeded sample of customers, when there are
more than ``max_rows`` tuples), only that histogram reaches the driver, and scipy maximises the
weighted likelihood there. The fitted parameters are applied back with column expressions and, for
the hypergeometric function of the expected order count, a pandas UDF (per partition, distributed).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf
from scipy.optimize import minimize
from scipy.special import betaln, gammaln, hyp2f1

log = logging.getLogger(__name__)
LOG_BOUND = 12.0   # parameters live in [e^-12, e^12]: a boundary fit (no dropout seen) stays finite
WEEK = 7.0


@dataclass(frozen=True)
class PurchaseModel:
    """BG/NBD (r, alpha in days, a, b) and Gamma-Gamma (p, q, v) parameters, and what the fit saw."""
    r: float
    alpha: float
    a: float
    b: float
    p: float
    q: float
    v: float
    customers: int
    histogram_rows: int

    def mean_order_value(self) -> float:
        """The population's expected order value (Gamma-Gamma), the spend of a one-order customer."""
        return self.p * self.v / (self.q - 1.0) if self.q > 1.0 else float("nan")


def _weighted_histogram(df: DataFrame, time_cols: tuple[str, ...], other_cols: tuple[str, ...],
                        max_rows: int, seed: int) -> tuple[pd.DataFrame, int]:
    """Distinct tuples of ``df`` with a ``weight`` column, at most about ``max_rows`` of them: day
    resolution, else ``time_cols`` rounded to weeks, else a seeded sample of customers weighted back
    up. Returns (histogram, customers it stands for)."""
    customers = df.count()
    cols = (*other_cols, *time_cols)
    histogram = df.groupBy(*cols).agg(F.count(F.lit(1)).cast("double").alias("weight"))
    if histogram.count() > max_rows:
        weekly = df.select(*other_cols, *[(F.round(F.col(c) / WEEK) * WEEK).alias(c) for c in time_cols])
        histogram = weekly.groupBy(*cols).agg(F.count(F.lit(1)).cast("double").alias("weight"))
        rows = histogram.count()
        if rows > max_rows:
            fraction = max_rows / rows
            histogram = (weekly.sample(fraction=fraction, seed=seed).groupBy(*cols)
                         .agg((F.count(F.lit(1)) / F.lit(fraction)).alias("weight")))
            log.info("purchase model: %d tuples above %d, fitted on a %.3f sample of customers", rows, max_rows, fraction)
    # Sorted: the optimiser then sums the same numbers in the same order whatever Spark's row order, so
    # the same data always gives the same parameters to the last bit.
    return histogram.toPandas().sort_values(list(cols), kind="stable").reset_index(drop=True), customers


def bgnbd_negative_log_likelihood(log_params: np.ndarray, x: np.ndarray, t_x: np.ndarray, T: np.ndarray,
                                  weight: np.ndarray) -> float:
    """The mean (modified) BG/NBD negative log-likelihood per customer (weights: customers per tuple)."""
    r, alpha, a, b = np.exp(log_params)
    a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
    a2 = betaln(a, b + x + 1) - betaln(a, b)
    a3 = -(r + x) * np.log(alpha + T)
    a4 = np.log(a) - np.log(b + x) + (r + x) * (np.log(alpha + T) - np.log(alpha + t_x))
    return float(-(weight * (a1 + a2 + a3 + np.logaddexp(a4, 0.0))).sum() / weight.sum())


def gamma_gamma_negative_log_likelihood(log_params: np.ndarray, x: np.ndarray, m: np.ndarray,
                                        weight: np.ndarray) -> float:
    """The mean Gamma-Gamma negative log-likelihood of repeat buyers' mean order values ``m``."""
    p, q, v = np.exp(log_params)
    px = p * x
    ll = (gammaln(px + q) - gammaln(px) - gammaln(q) + q * np.log(v) + (px - 1) * np.log(m)
          + px * np.log(x) - (px + q) * np.log(x * m + v))
    return float(-(weight * ll).sum() / weight.sum())


def _maximise(nll, start: np.ndarray, args: tuple) -> np.ndarray:
    bounds = [(-LOG_BOUND, LOG_BOUND)] * len(start)
    result = minimize(nll, start, args=args, method="L-BFGS-B", bounds=bounds, options={"maxiter": 2000})
    polished = minimize(nll, result.x, args=args, method="Nelder-Mead", bounds=bounds,
                        options={"maxiter": 4000, "xatol": 1e-8, "fatol": 1e-12})
    best = polished if polished.fun <= result.fun else result
    return np.exp(best.x)


def fit_purchase_model(history: DataFrame, max_rows: int, seed: int) -> PurchaseModel:
    """Fit BG/NBD on (x, t_x, T) and Gamma-Gamma on the repeat buyers' (x, mean order value) of
    ``history`` (lib.features.customers.purchase_history rows); only the histograms are collected."""
    bg, customers = _weighted_histogram(
        history.select(F.col("repeat_orders").cast("double").alias("x"), F.col("t_x").cast("double").alias("t_x"),
                       F.col("T").cast("double").alias("T")), ("t_x", "T"), ("x",), max_rows, seed)
    if customers == 0:
        raise ValueError("purchase model: no customer with a purchase to fit on")
    # A day's bin can round t_x past T at week resolution; the likelihood needs t_x <= T.
    bg["t_x"] = np.minimum(bg["t_x"], bg["T"])
    r, alpha, a, b = _maximise(bgnbd_negative_log_likelihood, np.zeros(4),
                               (bg["x"].to_numpy(), bg["t_x"].to_numpy(), bg["T"].to_numpy(), bg["weight"].to_numpy()))
    # Mean order values on a 1% log grid: tuples stay few however many customers there are.
    repeat = history.where((F.col("repeat_orders") > 0) & (F.col("repeat_order_value") > 0)).select(
        F.col("repeat_orders").cast("double").alias("x"),
        F.exp(F.round(F.log("repeat_order_value"), 2)).alias("m"))
    gg, repeaters = _weighted_histogram(repeat, (), ("x", "m"), max_rows, seed)
    if repeaters == 0:
        p, q, v = 1.0, 2.0, 1.0   # nobody ordered twice: no spend model, predicted values use the plain mean
        log.warning("purchase model: no repeat buyer, Gamma-Gamma not fitted")
    else:
        p, q, v = _maximise(gamma_gamma_negative_log_likelihood, np.zeros(3),
                            (gg["x"].to_numpy(), gg["m"].to_numpy(), gg["weight"].to_numpy()))
    model = PurchaseModel(float(r), float(alpha), float(a), float(b), float(p), float(q), float(v),
                          customers, len(bg) + len(gg))
    log.info("purchase model: %s", model)
    return model


def _odds_of_dropout(model: PurchaseModel) -> Column:
    """P(gone) / P(alive) = a / (b + x) ((alpha + T) / (alpha + t_x))^(r + x)."""
    x, t_x, T = F.col("repeat_orders"), F.col("t_x"), F.col("T")
    return (F.lit(model.a) / (F.lit(model.b) + x)
            * F.pow((F.lit(model.alpha) + T) / (F.lit(model.alpha) + t_x), F.lit(model.r) + x))


def p_alive(model: PurchaseModel) -> Column:
    """P(still a customer at the date | history)."""
    return F.lit(1.0) / (F.lit(1.0) + _odds_of_dropout(model))


def p_purchase(model: PurchaseModel, days: int) -> Column:
    """P(at least one order in the next ``days``): alive, and the posterior Poisson rate (Gamma(r + x,
    alpha + T)) gives an order (the model drops a customer out only right after an order)."""
    x, T = F.col("repeat_orders"), F.col("T")
    none_if_alive = F.pow((F.lit(model.alpha) + T) / (F.lit(model.alpha) + T + F.lit(float(days))), F.lit(model.r) + x)
    return p_alive(model) * (F.lit(1.0) - none_if_alive)


def expected_orders(model: PurchaseModel, days: int) -> Column:
    """E[orders in the next ``days`` | history] (the modified BG/NBD's conditional expectation, Wagner &
    Hoppe 2008), with scipy's 2F1 per partition in a pandas UDF."""
    r, alpha, a, b, t = model.r, model.alpha, model.a, model.b, float(days)

    @pandas_udf("double")
    def conditional_expectation(x: pd.Series, t_x: pd.Series, T: pd.Series) -> pd.Series:
        x, t_x, T = x.to_numpy(float), t_x.to_numpy(float), T.to_numpy(float)
        z = t / (alpha + T + t)
        ratio = ((alpha + T) / (alpha + T + t)) ** (r + x)
        numerator = (a + b + x) / (a - 1) * (1 - ratio * hyp2f1(r + x, b + x + 1, a + b + x, z))
        odds = a / (b + x) * ((alpha + T) / (alpha + t_x)) ** (r + x)
        return pd.Series(numerator / (1 + odds))

    return conditional_expectation(F.col("repeat_orders").cast("double"), F.col("t_x").cast("double"),
                                   F.col("T").cast("double"))


def expected_order_value(model: PurchaseModel) -> Column:
    """E[order value | history] (Gamma-Gamma): the customer's repeat mean shrunk toward the population's
    by their number of repeat orders; a one-order customer gets the population's."""
    x, m = F.col("repeat_orders").cast("double"), F.col("repeat_order_value")
    px = F.lit(model.p) * x
    shrunk = (F.lit(model.p) * (F.lit(model.v) + x * m)) / (px + F.lit(model.q) - 1.0)
    return F.when((x > 0) & (m > 0), shrunk).otherwise(F.lit(model.mean_order_value()))


def expected_gap_days(model: PurchaseModel) -> Column:
    """The posterior mean of the days between orders, 1 / lambda with lambda ~ Gamma(r + x, alpha + T):
    the customer's own pace shrunk toward the population's, lengthened by a silence since the last order."""
    return (F.lit(model.alpha) + F.col("T")) / (F.lit(model.r) + F.col("repeat_orders") - 1.0)


def customer_value(history: DataFrame, model: PurchaseModel, as_of: date, horizon_days: int) -> DataFrame:
    """Per buyer: historic_clv, predicted_clv (orders x order value over ``horizon_days``), total_clv,
    p_alive, expected_orders, avg_days_between_orders (null below 2 orders), expected_next_order_date
    (the last order plus the shrunk gap, not before the day after ``as_of``; null below 2 orders)."""
    orders = expected_orders(model, horizon_days)
    predicted = F.col("expected_orders") * expected_order_value(model)
    next_day = F.date_add(F.lit(as_of.isoformat()).cast("date"), 1)
    gap = expected_gap_days(model)
    next_order = F.greatest(next_day, F.date_add("last_order_date", F.round(gap).cast("int")))
    return (history.withColumn("expected_orders", orders)
            .select("user_id", F.col("historic_revenue").alias("historic_clv"), predicted.alias("predicted_clv"),
                    (F.col("historic_revenue") + predicted).alias("total_clv"), p_alive(model).alias("p_alive"),
                    "expected_orders", F.col("mean_gap_days").alias("avg_days_between_orders"),
                    F.when(F.col("repeat_orders") > 0, next_order).alias("expected_next_order_date")))
