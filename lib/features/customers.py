"""Customer features as of a date, from events up to the end of that date only.

``customer_features(events, as_of, windows)`` is a pure function of the events with
``event_ts < as_of + 1 day``: rewriting or adding any later event changes nothing (a test holds it).
Recency, frequency and monetary value over each window, browse and cart behaviour, email
send / open / click counts, smoothed rates and recency, and optionally the user's NMF segment
affinities. ``labels`` are what happened in the ``horizon`` days after a cutoff: the training
targets of lib/scores/scoring.py.
"""
from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

SITE_TYPES = ("view", "click", "add_to_cart", "purchase")
SECONDS_PER_DAY = 86_400.0
OPEN_PRIOR = (0.3, 1.0)    # smoothed open rate: (opens + 0.3) / (sends + 1)
CLICK_PRIOR = (0.05, 1.0)  # smoothed click rate: (clicks + 0.05) / (sends + 1)


def day_end(day: date) -> datetime:
    """The first instant after ``day`` (UTC): features see events strictly before it."""
    return datetime.combine(day + timedelta(days=1), time.min, timezone.utc)


def _ts(moment: datetime) -> Column:
    return F.lit(moment.strftime("%Y-%m-%d %H:%M:%S")).cast("timestamp")


def events_until(events: DataFrame, as_of: date) -> DataFrame:
    """Events up to the end of ``as_of`` with their age in days at that instant."""
    end = _ts(day_end(as_of))
    return (events.where(F.col("event_ts") < end)
            .withColumn("age_days", (end.cast("double") - F.col("event_ts").cast("double")) / SECONDS_PER_DAY))


def _count(cond: Column) -> Column:
    return F.sum(F.when(cond, 1.0).otherwise(0.0))


RECENCIES = ("site_recency_days", "purchase_recency_days", "open_recency_days", "send_recency_days")


def feature_names(windows: tuple[int, ...], k: int = 0) -> list[str]:
    names = ["tenure_days", *RECENCIES, *[f"log_{c}" for c in RECENCIES], "has_purchase", "has_open"]
    for w in windows:
        names += [f"{name}_{w}d" for name in ("site_events", "active_days", "views", "carts", "purchases",
                                              "revenue", "sends", "opens", "email_clicks", "open_rate",
                                              "click_rate", "cart_conversion")]
    names += [f"segment_affinity_{s}" for s in range(k)]
    return names


def customer_features(events: DataFrame, as_of: date, windows: tuple[int, ...],
                      affinities: DataFrame | None = None, k: int = 0) -> DataFrame:
    """One row per user with any event up to ``as_of``: ``user_id`` and the ``feature_names`` columns
    (no nulls). ``affinities``: (user_id, affinities array<double> of length k, summing to 1)."""
    seen = events_until(events, as_of)
    age, kind = F.col("age_days"), F.col("event_type")
    site = kind.isin(*SITE_TYPES)
    cap = float(max(windows) * 2)  # "never" reads as twice the longest window
    aggs = [
        F.max(age).alias("tenure_days"),
        F.min(F.when(site, age)).alias("site_recency_days"),
        F.min(F.when(kind == "purchase", age)).alias("purchase_recency_days"),
        F.min(F.when(kind == "email_open", age)).alias("open_recency_days"),
        F.min(F.when(kind == "email_send", age)).alias("send_recency_days"),
    ]
    for w in windows:
        inside = age <= float(w)
        aggs += [
            _count(inside & site).alias(f"site_events_{w}d"),
            # size(collect_set) rather than countDistinct: distinct aggregates make Spark expand every
            # event into one row per distinct expression before the shuffle (4 rows each with 3 windows).
            F.size(F.collect_set(F.when(inside & site, F.floor(age)))).cast("double").alias(f"active_days_{w}d"),
            _count(inside & (kind == "view")).alias(f"views_{w}d"),
            _count(inside & (kind == "add_to_cart")).alias(f"carts_{w}d"),
            _count(inside & (kind == "purchase")).alias(f"purchases_{w}d"),
            F.sum(F.when(inside & (kind == "purchase"), F.coalesce("revenue", F.lit(0.0))).otherwise(0.0))
            .alias(f"revenue_{w}d"),
            _count(inside & (kind == "email_send")).alias(f"sends_{w}d"),
            _count(inside & (kind == "email_open")).alias(f"opens_{w}d"),
            _count(inside & (kind == "email_click")).alias(f"email_clicks_{w}d"),
        ]
    base = seen.groupBy("user_id").agg(*aggs)
    derived = [
        F.col("tenure_days"),
        *[F.coalesce(F.col(c), F.lit(cap)).alias(c) for c in RECENCIES],
        # Risk rises steeply over the first days of absence, then flattens: a linear model needs the log
        # beside the days (on the clickstream sample it lifts churn ROC-AUC from 0.965 to 0.978).
        *[F.log1p(F.coalesce(F.col(c), F.lit(cap))).alias(f"log_{c}") for c in RECENCIES],
        F.col("purchase_recency_days").isNotNull().cast("double").alias("has_purchase"),
        F.col("open_recency_days").isNotNull().cast("double").alias("has_open"),
    ]
    for w in windows:
        sends = F.col(f"sends_{w}d")
        derived += [F.col(f"{name}_{w}d") for name in ("site_events", "active_days", "views", "carts", "purchases",
                                                      "revenue", "sends", "opens", "email_clicks")]
        derived += [
            ((F.col(f"opens_{w}d") + OPEN_PRIOR[0]) / (sends + OPEN_PRIOR[1])).alias(f"open_rate_{w}d"),
            ((F.col(f"email_clicks_{w}d") + CLICK_PRIOR[0]) / (sends + CLICK_PRIOR[1])).alias(f"click_rate_{w}d"),
            (F.col(f"purchases_{w}d") / (F.col(f"carts_{w}d") + 1.0)).alias(f"cart_conversion_{w}d"),
        ]
    features = base.select("user_id", *derived)
    if affinities is not None and k > 0:
        shares = affinities.select("user_id", *[F.col("affinities")[s].alias(f"segment_affinity_{s}")
                                                for s in range(k)])
        features = features.join(shares, "user_id", "left").fillna(0.0, [f"segment_affinity_{s}" for s in range(k)])
    return features.select("user_id", *feature_names(windows, k if affinities is not None else 0))


def labels(events: DataFrame, cutoff: date, horizon_days: int) -> DataFrame:
    """What each user did in the ``horizon_days`` after the end of ``cutoff``: ``churned`` (no site
    activity), ``purchased`` (any purchase) and ``revenue_next``; users without events there are
    included by the caller's left join (they churned and did not buy)."""
    start = day_end(cutoff)
    end = start + timedelta(days=horizon_days)
    window = events.where((F.col("event_ts") >= _ts(start)) & (F.col("event_ts") < _ts(end)))
    site = F.col("event_type").isin(*SITE_TYPES)
    return window.groupBy("user_id").agg(
        F.max(site.cast("int")).alias("site_active"),
        F.max((F.col("event_type") == "purchase").cast("int")).alias("bought"),
        F.sum(F.when(F.col("event_type") == "purchase", F.coalesce("revenue", F.lit(0.0))).otherwise(0.0))
        .alias("revenue_next"),
    )


def labelled(features: DataFrame, outcome: DataFrame) -> DataFrame:
    """``features`` with label columns churn (1.0: no site activity in the window), purchase, revenue_next."""
    joined = features.join(outcome, "user_id", "left")
    return joined.select(
        *features.columns,
        F.when(F.coalesce("site_active", F.lit(0)) == 1, 0.0).otherwise(1.0).alias("churn"),
        F.coalesce(F.col("bought").cast("double"), F.lit(0.0)).alias("purchase"),
        F.coalesce("revenue_next", F.lit(0.0)).alias("revenue_next"),
    )


def segment_affinities(user_factors: DataFrame) -> DataFrame:
    """(user_id, affinities): each user's NMF factor row scaled to sum 1 (zeros stay zeros)."""
    total = F.aggregate("factors", F.lit(0.0), lambda acc, x: acc + x)
    return user_factors.select(
        "user_id",
        F.when(total > 0, F.transform("factors", lambda x: x / total))
        .otherwise(F.transform("factors", lambda x: x * 0.0)).alias("affinities"))


def purchase_history_names(windows: tuple[int, ...]) -> list[str]:
    """The model features of ``purchase_history`` (orders are distinct purchase days)."""
    return ["orders", "order_tenure_days", "mean_gap_days_or_cap", "last_gap_days_or_cap", "historic_revenue",
            *[f"purchase_days_{w}d" for w in windows]]


def purchase_history(events: DataFrame, as_of: date, windows: tuple[int, ...]) -> DataFrame:
    """One row per customer with a purchase up to the end of ``as_of``: orders (distinct purchase days),
    first / last order date, the purchase model's summary (repeat_orders = orders - 1, t_x = days from
    the first to the last order, T = days from the first order to ``as_of``, repeat_order_value = the
    mean revenue of the orders after the first), historic_revenue, mean_gap_days and last_gap_days
    (null below 2 orders) and the ``purchase_history_names`` features (gaps capped at twice the
    longest window where missing)."""
    bought = events_until(events, as_of).where(F.col("event_type") == "purchase")
    daily = bought.groupBy("user_id", F.to_date("event_ts").alias("day")).agg(
        F.sum(F.coalesce("revenue", F.lit(0.0))).alias("day_revenue"))
    reference = F.lit(as_of.isoformat()).cast("date")
    per_user = daily.groupBy("user_id").agg(
        F.count(F.lit(1)).alias("orders"), F.min("day").alias("first_order_date"),
        F.max("day").alias("last_order_date"), F.sum("day_revenue").alias("historic_revenue"),
        F.min_by("day_revenue", "day").alias("first_order_revenue"),
        # The second-to-last order: the last gap says whether the pace is changing.
        F.try_element_at(F.sort_array(F.collect_list("day"), asc=False), F.lit(2)).alias("previous_order_date"),
        *[F.sum(F.when(F.datediff(reference, "day") < w, 1.0).otherwise(0.0)).alias(f"purchase_days_{w}d")
          for w in windows])
    repeat = F.col("orders") - 1
    span = F.datediff("last_order_date", "first_order_date").cast("double")
    cap = float(max(windows) * 2)
    history = per_user.select(
        "user_id", F.col("orders").cast("double").alias("orders"), "first_order_date", "last_order_date",
        repeat.cast("double").alias("repeat_orders"), span.alias("t_x"),
        F.datediff(reference, "first_order_date").cast("double").alias("T"),
        F.when(repeat > 0, (F.col("historic_revenue") - F.col("first_order_revenue")) / repeat)
        .alias("repeat_order_value"),
        "historic_revenue",
        F.when(repeat > 0, span / repeat).alias("mean_gap_days"),
        F.datediff("last_order_date", "previous_order_date").cast("double").alias("last_gap_days"),
        *[f"purchase_days_{w}d" for w in windows])
    return history.select(
        "*", F.col("T").alias("order_tenure_days"),
        F.coalesce("mean_gap_days", F.lit(cap)).alias("mean_gap_days_or_cap"),
        F.coalesce("last_gap_days", F.lit(cap)).alias("last_gap_days_or_cap"))
