"""Buy it again: repeat-purchase scores from each user's own purchases, and the blend with discovery.

A repeat-purchase retailer's customers come back for the same items: on a real invoice log about half
of a returning customer's next purchases are items they bought before, which a discovery list (items
not bought yet) cannot contain. Email platforms therefore send two blocks, "buy it again"
(replenishment) and "recommended for you"; this module scores the first and mixes both per user.

Everything works on purchase *occasions*: distinct (user_id, item_id, day), so two lines of one
item on one invoice count once. For each (user, item) with an occasion before ``as_of``:

- ``n`` occasions, ``since`` days from the last one to ``as_of``;
- ``interval``: the item's median days between consecutive occasions of the same user, across users
  (``item_intervals``; items with fewer than ``min_gaps`` such gaps use the median over all items);
- ``repeat_rate``: the share of the item's buyers who bought it on more than one occasion;
- score = ``staple`` x ``due``, where
  ``staple = (n - 1 + repeat_rate) / n`` (one occasion: the item's repeat rate; many: close to 1) and
  ``due = min(1, (since + horizon) / interval) x exp(-max(0, since / interval - 1) / overdue_decay)``
  (an item comes due within the ``horizon`` days a list is for, and fades when it is long overdue:
  the user has probably switched).

The trivial baseline ("your most bought items") ranks by ``n`` alone (then recency).

A user's repeat propensity is the share of their occasions that re-bought an item bought on an
earlier occasion, shrunk to the global share with ``prior_strength`` pseudo-occasions; the blended
list interleaves the buy-again and discovery lists in proportion to it (``blend``).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

SECONDS_PER_DAY = 86_400.0
DEFAULT_INTERVAL_DAYS = 30.0  # only when nobody ever re-bought anything


@dataclass(frozen=True)
class BuyAgainParams:
    """How buy-again lists are scored and blended (``[recommend] buy_again_*`` and ``blend_*``)."""

    horizon_days: float = 14.0
    overdue_decay: float = 1.0
    min_gaps: int = 5
    prior_strength: float = 10.0

    def __post_init__(self) -> None:
        if self.horizon_days <= 0 or self.overdue_decay <= 0 or self.min_gaps < 1 or self.prior_strength < 0:
            raise ValueError(f"buy-again parameters out of range: {self}")


def purchase_occasions(events: DataFrame, purchase_types: list[str] | tuple[str, ...]) -> DataFrame:
    """(user_id, item_id, day, ts): one row per user, item and calendar day (UTC) with a purchase."""
    return (
        events.where(F.col("event_type").isin(list(purchase_types)))
        .groupBy("user_id", "item_id", F.to_date("event_ts").alias("day"))
        .agg(F.max("event_ts").alias("ts"))
    )


def _gap_days() -> Column:
    previous = F.lag("ts").over(Window.partitionBy("user_id", "item_id").orderBy("ts"))
    return (F.col("ts").cast("double") - previous.cast("double")) / SECONDS_PER_DAY


def item_intervals(occasions: DataFrame, min_gaps: int) -> DataFrame:
    """(item_id, interval_days, repeat_rate, n_gaps): each item's median repurchase gap and repeat rate.

    The median is over every gap between consecutive occasions of one user, across users; items with
    fewer than ``min_gaps`` gaps get the median gap of all items. ``repeat_rate`` is the share of the
    item's buyers with more than one occasion.
    """
    gaps = occasions.withColumn("gap", _gap_days())
    per_item = gaps.groupBy("item_id").agg(
        F.percentile_approx("gap", 0.5, 1000).alias("median_gap"),
        F.count("gap").alias("n_gaps"),
        F.countDistinct("user_id").alias("buyers"),
        F.countDistinct(F.when(F.col("gap").isNotNull(), F.col("user_id"))).alias("repeat_buyers"),
    )
    overall = gaps.agg(F.percentile_approx("gap", 0.5, 1000).alias("global_gap"))
    return per_item.crossJoin(F.broadcast(overall)).select(
        "item_id",
        F.greatest(
            F.when(F.col("n_gaps") >= min_gaps, F.col("median_gap"))
            .otherwise(F.coalesce(F.col("global_gap"), F.lit(DEFAULT_INTERVAL_DAYS))),
            F.lit(1.0),
        ).cast("double").alias("interval_days"),
        (F.col("repeat_buyers") / F.col("buyers")).cast("double").alias("repeat_rate"),
        "n_gaps",
    )


def user_item_history(occasions: DataFrame) -> DataFrame:
    """(user_id, item_id, n_occasions, last_ts)."""
    return occasions.groupBy("user_id", "item_id").agg(
        F.count(F.lit(1)).alias("n_occasions"), F.max("ts").alias("last_ts"))


def _as_of_column(as_of: datetime | Column) -> Column:
    return as_of if isinstance(as_of, Column) else F.lit(as_of).cast("timestamp")


def buy_again_scores(
    occasions: DataFrame,
    as_of: datetime | Column,
    params: BuyAgainParams,
    intervals: DataFrame | None = None,
) -> DataFrame:
    """(user_id, item_id, score, n_occasions, last_ts) for every item a user bought before ``as_of``.

    ``as_of`` is a moment, or a Column (e.g. each user's own end of history, ``user_as_of``) of
    ``occasions``. ``intervals`` default to ``item_intervals`` of the same occasions.
    """
    cutoff = _as_of_column(as_of)
    past = occasions.where(F.col("ts") <= cutoff)
    intervals = item_intervals(past, params.min_gaps) if intervals is None else intervals
    history = past.groupBy("user_id", "item_id").agg(
        F.count(F.lit(1)).alias("n_occasions"), F.max("ts").alias("last_ts"), F.max(cutoff).alias("_as_of"))
    since = F.greatest((F.col("_as_of").cast("double") - F.col("last_ts").cast("double")) / SECONDS_PER_DAY,
                       F.lit(0.0))
    interval = F.col("interval_days")
    n = F.col("n_occasions").cast("double")
    staple = (n - 1.0 + F.col("repeat_rate")) / n
    due = (F.least(F.lit(1.0), (since + F.lit(params.horizon_days)) / interval)
           * F.exp(-F.greatest(since / interval - 1.0, F.lit(0.0)) / F.lit(params.overdue_decay)))
    return (history.join(intervals.select("item_id", "interval_days", "repeat_rate"), "item_id", "left")
            .fillna({"interval_days": DEFAULT_INTERVAL_DAYS, "repeat_rate": 0.0})
            .select("user_id", "item_id", (staple * due).alias("score"), "n_occasions", "last_ts"))


def top_n(scored: DataFrame, n: int, order: list[Column], exclude_items: DataFrame | None = None,
          exclude_pairs: DataFrame | None = None) -> DataFrame:
    """(user_id, item_id, score, rank): each user's first ``n`` rows of ``scored`` by ``order``,
    after dropping ``exclude_items`` (item_id) and ``exclude_pairs`` (user_id, item_id)."""
    if n < 1:
        raise ValueError(f"top-N needs n >= 1, got {n}")
    if exclude_items is not None:
        scored = scored.join(F.broadcast(exclude_items.select("item_id")), "item_id", "left_anti")
    if exclude_pairs is not None:
        scored = scored.join(exclude_pairs.select("user_id", "item_id"), ["user_id", "item_id"], "left_anti")
    window = Window.partitionBy("user_id").orderBy(*order, F.col("item_id"))
    return (scored.withColumn("rank", F.row_number().over(window)).where(F.col("rank") <= n)
            .select("user_id", "item_id", F.col("score").cast("double").alias("score"), "rank"))


def buy_again_top_n(occasions: DataFrame, as_of: datetime | Column, params: BuyAgainParams, n: int,
                    exclude_items: DataFrame | None = None, intervals: DataFrame | None = None) -> DataFrame:
    """(user_id, item_id, score, rank): the buy-again list (best score, then most occasions, most recent)."""
    scored = buy_again_scores(occasions, as_of, params, intervals)
    return top_n(scored, n, [F.col("score").desc(), F.col("n_occasions").desc(), F.col("last_ts").desc()],
                 exclude_items)


def most_bought_top_n(occasions: DataFrame, as_of: datetime | Column, n: int,
                      exclude_items: DataFrame | None = None) -> DataFrame:
    """The trivial baseline "your most bought items": (user_id, item_id, score = occasions, rank)."""
    history = user_item_history(occasions.where(F.col("ts") <= _as_of_column(as_of)))
    scored = history.withColumn("score", F.col("n_occasions").cast("double"))
    return top_n(scored, n, [F.col("n_occasions").desc(), F.col("last_ts").desc()], exclude_items)


def repeat_propensity(occasions: DataFrame, prior_strength: float) -> DataFrame:
    """(user_id, occasions, repeats, propensity): the share of a user's purchase occasions that re-bought
    an item of an earlier occasion, shrunk towards the global share by ``prior_strength`` occasions."""
    first = Window.partitionBy("user_id", "item_id").orderBy("ts")
    marked = occasions.withColumn("_repeat", (F.row_number().over(first) > 1).cast("long"))
    per_user = marked.groupBy("user_id").agg(F.count(F.lit(1)).alias("occasions"), F.sum("_repeat").alias("repeats"))
    overall = per_user.agg((F.sum("repeats") / F.sum("occasions")).alias("_global"))
    return per_user.crossJoin(F.broadcast(overall)).select(
        "user_id", "occasions", "repeats",
        ((F.col("repeats") + F.lit(prior_strength) * F.coalesce(F.col("_global"), F.lit(0.0)))
         / (F.col("occasions") + F.lit(prior_strength))).alias("propensity"),
    )


def global_repeat_share(propensity: DataFrame) -> float:
    """The share of all purchase occasions that were repeats (a scalar)."""
    row = propensity.agg(F.sum("repeats").alias("r"), F.sum("occasions").alias("o")).first()
    return float(row["r"] / row["o"]) if row["o"] else 0.0


@dataclass(frozen=True)
class BlendCalibration:
    """Per-rank hit rates of the two lists on a validation split, and the validation users' mean propensity.

    ``again[i]`` / ``discover[i]``: the share of validation users with an item at rank i + 1 of that list
    who then bought it (made non-increasing). Small: one number per rank.
    """

    again: tuple[float, ...]
    discover: tuple[float, ...]
    mean_propensity: float

    def __post_init__(self) -> None:
        if not self.again or not self.discover or not 0.0 < self.mean_propensity < 1.0:
            raise ValueError(f"a blend calibration needs both hit curves and a mean propensity in (0, 1): {self}")


def hit_curve(lists: DataFrame, truth: DataFrame, length: int) -> tuple[float, ...]:
    """Per rank 1..``length`` of ``lists`` (user_id, item_id, rank): hits / users with an item at that rank,
    made non-increasing (a later rank never rates above an earlier one; ranks nobody reached get the last rate)."""
    marked = lists.where(F.col("rank") <= length).join(
        truth.select("user_id", "item_id").distinct().withColumn("_hit", F.lit(1)), ["user_id", "item_id"], "left")
    rows = {r["rank"]: (r["hits"], r["users"]) for r in marked.groupBy("rank").agg(
        F.count("_hit").alias("hits"), F.count(F.lit(1)).alias("users")).collect()}
    curve: list[float] = []
    for rank in range(1, length + 1):
        hits, users = rows.get(rank, (0, 0))
        rate = hits / users if users else (curve[-1] if curve else 0.0)
        curve.append(min(rate, curve[-1]) if curve else rate)
    return tuple(curve)


def blend(buy_again: DataFrame, discover: DataFrame, propensity: DataFrame, n: int,
          default_propensity: float, calibration: BlendCalibration | None = None) -> DataFrame:
    """(user_id, item_id, score, rank, source): the two lists merged per user by the user's repeat
    propensity p (users missing from ``propensity`` get ``default_propensity``, the global share).

    With a ``calibration`` (measured on a validation split) each item's score is its estimated chance
    of being bought: the buy-again item at rank i scores ``again[i] x p / mean_p`` and the discovery
    item at rank j ``discover[j] x (1 - p) / (1 - mean_p)``; the list is the best ``n``. So a discovery
    item displaces a buy-again item only where its measured hit rate, scaled to this user, is higher
    (and fills the list when the user has few past items). Without one the lists are interleaved in
    proportion: the buy-again item at rank i sits at (i - 1/2) / p, the discovery item at rank j at
    (j - 1/2) / (1 - p) (score = 1 / place), so any prefix holds about p buy-again items.
    An item in both lists keeps its better score; each row keeps the ``source`` it came from.
    """
    if n < 1:
        raise ValueError(f"top-N needs n >= 1, got {n}")
    tiny = 1e-9
    again = buy_again.select("user_id", "item_id", "rank",
                             (F.col("source") if "source" in buy_again.columns else F.lit("buy_again")).alias("source"),
                             F.lit(True).alias("_again"))
    other = discover.select("user_id", "item_id", "rank", "source", F.lit(False).alias("_again"))
    both = again.unionByName(other).join(propensity.select("user_id", "propensity"), "user_id", "left")
    p = F.coalesce(F.col("propensity"), F.lit(default_propensity))
    if calibration is None:
        share = F.when(F.col("_again"), p).otherwise(F.lit(1.0) - p)
        score = F.greatest(share, F.lit(tiny)) / (F.col("rank") - 0.5)
    else:
        def rate(curve: tuple[float, ...]) -> Column:
            # Ranks past the curve keep its last rate, shaded by rank so the list order stays intact.
            at = F.element_at(F.array(*[F.lit(float(v)) for v in curve]),
                              F.least(F.col("rank"), F.lit(len(curve))).cast("int"))
            return at * F.pow(F.lit(0.999), F.col("rank"))
        mean_p = calibration.mean_propensity
        score = F.when(F.col("_again"), rate(calibration.again) * p / mean_p) \
            .otherwise(rate(calibration.discover) * (F.lit(1.0) - p) / (1.0 - mean_p))
    scored = both.withColumn("_score", score)
    best = Window.partitionBy("user_id", "item_id").orderBy(F.col("_score").desc(), F.col("_again").desc())
    deduped = scored.withColumn("_k", F.row_number().over(best)).where(F.col("_k") == 1)
    order = Window.partitionBy("user_id").orderBy(F.col("_score").desc(), F.col("_again").desc(), "item_id")
    return (deduped.withColumn("rank", F.row_number().over(order)).where(F.col("rank") <= n)
            .select("user_id", "item_id", F.col("_score").alias("score"), "rank", "source"))
