"""The purchase model (modified BG/NBD + Gamma-Gamma): the distributed histogram fit against a reference
implementation, hand-computed customers, and the scores' eligibility and churn definitions on few rows."""
from __future__ import annotations

from datetime import date, datetime, timedelta

import numpy as np
import pytest
from pyspark.sql import functions as F

from jobs.common import BASE_CONFIG
from lib.features.customers import purchase_history
from lib.platform.config import parse_toml
from lib.platform.settings import ScoresSettings
from lib.scores.purchase_model import PurchaseModel, customer_value, fit_purchase_model
from lib.scores.scoring import CutoffFrames, score_customers

AS_OF = date(2024, 6, 30)
WINDOWS = (7, 30, 90)
SCHEMA = "event_id string, user_id string, item_id string, event_type string, event_ts timestamp, revenue double"
# lifetimes 0.11.3 (ModifiedBetaGeoFitter, GammaGammaFitter; numpy 2.4, scipy 1.17, pandas 3.1, in a scratch
# environment) on the orders of ``bgnbd_orders()`` summarised by its summary_data_from_transaction_data (freq "D").
REFERENCE = {"r": 1.1293728441074367, "alpha": 27.472598505678054, "a": 0.5326159443398925, "b": 1.8670123084220893,
             "p": 2.926895941387965, "q": 4.219229084130932, "v": 87.37875672323788}
# Its conditional_probability_alive, conditional_expected_number_of_purchases_up_to_time(90) and
# conditional_expected_average_profit for four customers.
REFERENCE_CUSTOMERS = {"c000": (0.672002, 0.866676, 46.575622), "c003": (0.254066, 0.112068, 79.444029),
                       "c004": (0.335690, 1.849703, 43.002962), "c007": (0.836672, 2.838100, 47.173572)}


def bgnbd_orders(customers: int = 150, seed: int = 7) -> list[tuple[str, date, float]]:
    """(user_id, day, revenue) orders drawn from a BG/NBD process (r=0.8, alpha=20 days, a=1.5, b=6) with
    Gamma-Gamma spend, first orders spread over the 200 days before AS_OF."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(customers):
        rate, drop = rng.gamma(0.8, 1 / 20.0), rng.beta(1.5, 6.0)
        scale = rng.gamma(6.0, 1 / 40.0)
        day = int(rng.integers(0, 200))
        while day <= 200:
            rows.append((f"c{i:03d}", AS_OF - timedelta(days=200 - day),
                         round(float(rng.gamma(3.0, 1 / scale) / 3.0 * 10), 2)))
            if rng.random() < drop:
                break
            day += max(1, int(np.ceil(rng.exponential(1 / rate))))
    return rows


def _events(spark, rows):
    """Purchase events at noon of each (user, day, revenue), plus (user, day, None) rows as views."""
    return spark.createDataFrame(
        [(f"e{n}", user, "i1", "purchase" if revenue is not None else "view",
          datetime(day.year, day.month, day.day, 12), revenue) for n, (user, day, revenue) in enumerate(rows)], SCHEMA)


def test_the_distributed_fit_matches_the_reference_implementation(spark):
    history = purchase_history(_events(spark, bgnbd_orders()), AS_OF, WINDOWS)
    model = fit_purchase_model(history, max_rows=50_000, seed=1)
    assert model.customers == 150
    fitted = {name: getattr(model, name) for name in REFERENCE}
    assert fitted == pytest.approx(REFERENCE, rel=2e-3)
    value = {r["user_id"]: r for r in customer_value(history, model, AS_OF, 90)
             .where(F.col("user_id").isin(*REFERENCE_CUSTOMERS)).collect()}
    for user, (alive, orders, order_value) in REFERENCE_CUSTOMERS.items():
        row = value[user]
        assert (row["p_alive"], row["expected_orders"], row["predicted_clv"] / row["expected_orders"]) == \
            pytest.approx((alive, orders, order_value), rel=3e-3), user


def test_a_capped_histogram_still_fits_close_to_the_full_one(spark):
    """Above max_rows the tuples are rounded to weeks (and sampled): fewer rows reach the driver, about
    the same parameters come back."""
    history = purchase_history(_events(spark, bgnbd_orders()), AS_OF, WINDOWS)
    model = fit_purchase_model(history, max_rows=100, seed=1)
    assert model.histogram_rows <= 2 * 100 * 1.5   # each of the two histograms near its cap
    assert model.r == pytest.approx(REFERENCE["r"], rel=0.3)
    assert model.alpha == pytest.approx(REFERENCE["alpha"], rel=0.3)


def test_hand_computed_customers(spark):
    """Orders every 30 days: the next about 30 days after the last; one order long ago: probably gone."""
    model = PurchaseModel(**REFERENCE, customers=0, histogram_rows=0)
    steady = [("steady", AS_OF - timedelta(days=10 + 30 * k), 20.0) for k in range(11)]
    rows = steady + [("once_long_ago", AS_OF - timedelta(days=300), 50.0), ("once_lately", AS_OF - timedelta(days=3), 50.0)]
    history = purchase_history(_events(spark, rows), AS_OF, WINDOWS)
    value = {r["user_id"]: r for r in customer_value(history, model, AS_OF, 365).collect()}
    assert value["steady"]["avg_days_between_orders"] == 30.0
    assert value["steady"]["historic_clv"] == 220.0
    last = AS_OF - timedelta(days=10)
    assert abs((value["steady"]["expected_next_order_date"] - last).days - 30) <= 4
    assert value["steady"]["p_alive"] > 0.8
    gone = value["once_long_ago"]
    assert gone["p_alive"] < 0.25 < value["once_lately"]["p_alive"]
    assert gone["expected_orders"] < value["once_lately"]["expected_orders"] < value["steady"]["expected_orders"]
    assert gone["avg_days_between_orders"] is None and gone["expected_next_order_date"] is None
    assert gone["total_clv"] == pytest.approx(gone["historic_clv"] + gone["predicted_clv"])


def _settings(**overrides) -> ScoresSettings:
    section = parse_toml(BASE_CONFIG.read_text(), "base")["scores"]
    values = {**section, "horizon_days": 14, "churn_horizon_days": 30, "value_validation_days": 30,
              "models": ("bgnbd",), "min_buyers": 5, "min_positives": 1, **overrides}
    return ScoresSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


ORDERS = bgnbd_orders(customers=80, seed=3)
# Views, no purchase: not scored. Views of every third buyer 2 days before AS_OF: active, perhaps no order.
VIEWS = [("browser", AS_OF - timedelta(days=5), None)] + [(f"c{i:03d}", AS_OF - timedelta(days=2), None)
                                                          for i in range(0, 80, 3)]


@pytest.mark.slow  # the whole scoring with every baseline and the value check: about 40 s
def test_every_buyer_is_scored_and_the_rest_get_a_reason(spark):
    # One horizon for every target and the value check: the cutoffs (and purchase-model fits) are shared.
    settings = _settings(churn_definition="no_order", churn_horizon_days=14, value_validation_days=14)
    outcome = score_customers(_events(spark, ORDERS + VIEWS), AS_OF, settings)
    assert outcome.eligible, outcome.reason
    rows = {r["user_id"]: r for r in outcome.scores.collect()}
    outcome.scores.unpersist()
    assert (rows["browser"]["eligible"], rows["browser"]["reason_code"]) == (False, "no_purchase_yet")
    assert rows["browser"]["p_alive"] is None and rows["browser"]["historic_clv"] is None
    buyers = {u for u, _, _ in ORDERS}
    assert {u for u, r in rows.items() if r["eligible"]} == buyers
    assert all(r["reason_code"] is None and 0 <= r["churn_probability"] <= 1 and r["p_alive"] is not None
               for u, r in rows.items() if u in buyers)
    metrics = {(t, m, metric) for t, m, metric, b, v in outcome.metrics}
    for baseline in ("recency_baseline", "frequency_baseline", "rfm_baseline", "bgnbd_baseline"):
        assert ("churn", baseline, "roc_auc") in metrics and ("purchase", baseline, "roc_auc") in metrics
    assert ("clv", "predicted_clv", "spearman") in metrics and ("clv", "historic_spend_baseline", "spearman") in metrics
    assert ("next_order", "last_order_plus_mean_gap_baseline", "mae_days") in metrics


@pytest.mark.parametrize("definition, horizon, counts", [
    ("no_site_activity", 14, lambda revenue: True),            # a visit keeps a buyer
    ("no_order", 30, lambda revenue: revenue is not None),     # only an order does, over churn_horizon_days
])
def test_the_churn_definition_switches_the_label(spark, definition, horizon, counts):
    settings = _settings(churn_definition=definition)
    cutoff = AS_OF - timedelta(days=horizon)
    rows = CutoffFrames(_events(spark, ORDERS + VIEWS), settings, None, 0).labelled(cutoff, "churn")
    churners = {r["user_id"] for r in rows.where("churn = 1.0").select("user_id").collect()}
    bought = {u for u, d, _ in ORDERS if d <= cutoff}
    stayed = {u for u, d, r in ORDERS + VIEWS if cutoff < d <= cutoff + timedelta(days=horizon) and counts(r)}
    assert churners == bought - stayed and rows.count() == len(bought)
