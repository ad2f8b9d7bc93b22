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

The trivial baselines: "your most bought items" ranks by ``n`` alone (then recency), "your most recent
items" by the last occasion (then ``n``).

The learned ranker (``fit_ranker`` / ``ranker_top_n``) scores the same candidates, every item a customer
bought before the lists' moment, with a classifier of "bought again within the next ``horizon_days``":
features per pair (``pair_features``: occasions, recency, occasions in the last 30 / 90 days, recency
against the item's repurchase interval, quantity, the heuristic score above, the item's repeat rate and
buyers, the customer's orders) labelled by the window just before the moment it is applied at, so it
learns from the latest behaviour and never from the days it is judged on.

A user's repeat propensity is the share of their occasions that re-bought an item bought on an
earlier occasion, shrunk to the global share with ``prior_strength`` pseudo-occasions; the blended
list interleaves the buy-again and discovery lists in proportion to it (``blend``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import GBTClassifier, LogisticRegression
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from lib.platform.settings import BUY_AGAIN_MODELS, RecommendSettings

log = logging.getLogger(__name__)

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
    """(user_id, item_id, day, ts, quantity): one row per user, item and calendar day (UTC) with a purchase;
    ``quantity`` sums the day's quantities (a missing quantity counts 1)."""
    quantity = F.coalesce(F.col("quantity").cast("double"), F.lit(1.0)) if "quantity" in events.columns \
        else F.lit(1.0)
    return (
        events.where(F.col("event_type").isin(list(purchase_types)))
        .groupBy("user_id", "item_id", F.to_date("event_ts").alias("day"))
        .agg(F.max("event_ts").alias("ts"), F.sum(quantity).alias("quantity"))
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


def most_recent_top_n(occasions: DataFrame, as_of: datetime | Column, n: int,
                      exclude_items: DataFrame | None = None) -> DataFrame:
    """The trivial baseline "your most recent items": (user_id, item_id, score = occasions, rank), latest first."""
    history = user_item_history(occasions.where(F.col("ts") <= _as_of_column(as_of)))
    scored = history.withColumn("score", F.col("n_occasions").cast("double"))
    return top_n(scored, n, [F.col("last_ts").desc(), F.col("n_occasions").desc()], exclude_items)


# ----------------------------------------------------------------------------------------------
# The learned buy-again ranker
# ----------------------------------------------------------------------------------------------

RANKER_FEATURES = ("log_occasions", "order_share", "occasions_30d", "occasions_90d", "log_days_since",
                   "log_due", "abs_log_due", "heuristic", "log_quantity", "item_repeat_rate", "log_item_buyers",
                   "log_user_orders", "log_user_days_since")


def pair_features(occasions: DataFrame, as_of: datetime | Column, params: BuyAgainParams) -> DataFrame:
    """(user_id, item_id, n_occasions, last_ts, *RANKER_FEATURES) for every item each user bought up to
    ``as_of`` (a moment, or a Column of ``occasions`` such as each user's own end of history).

    Item statistics (repurchase interval, repeat rate, buyers) come from the same past occasions only.
    """
    cutoff = _as_of_column(as_of)
    past = occasions.where(F.col("ts") <= cutoff).withColumn("_as_of", cutoff)
    intervals = item_intervals(past, params.min_gaps)
    buyers = past.groupBy("item_id").agg(F.countDistinct("user_id").alias("item_buyers"))
    heuristic = buy_again_scores(past, F.col("_as_of"), params, intervals).select(
        "user_id", "item_id", F.col("score").alias("heuristic"))
    age_days = (F.col("_as_of").cast("double") - F.col("ts").cast("double")) / SECONDS_PER_DAY
    pairs = past.groupBy("user_id", "item_id").agg(
        F.count(F.lit(1)).alias("n_occasions"), F.max("ts").alias("last_ts"), F.max("_as_of").alias("_as_of"),
        F.sum(F.when(age_days <= 30, 1).otherwise(0)).cast("double").alias("occasions_30d"),
        F.sum(F.when(age_days <= 90, 1).otherwise(0)).cast("double").alias("occasions_90d"),
        F.avg("quantity").alias("_quantity"))
    users = past.groupBy("user_id").agg(F.countDistinct("day").alias("user_orders"), F.max("ts").alias("_user_last"))
    since = F.greatest((F.col("_as_of").cast("double") - F.col("last_ts").cast("double")) / SECONDS_PER_DAY,
                       F.lit(0.0))
    user_since = F.greatest((F.col("_as_of").cast("double") - F.col("_user_last").cast("double")) / SECONDS_PER_DAY,
                            F.lit(0.0))
    log_due = F.log((since + 1.0) / F.col("interval_days"))
    return (pairs.join(users, "user_id").join(intervals.select("item_id", "interval_days", "repeat_rate"), "item_id")
            .join(buyers, "item_id").join(heuristic, ["user_id", "item_id"])
            .select("user_id", "item_id", "n_occasions", "last_ts",
                    F.log1p(F.col("n_occasions").cast("double")).alias("log_occasions"),
                    (F.col("n_occasions") / F.col("user_orders")).cast("double").alias("order_share"),
                    "occasions_30d", "occasions_90d",
                    F.log1p(since).alias("log_days_since"),
                    log_due.alias("log_due"), F.abs(log_due).alias("abs_log_due"),
                    F.col("heuristic").cast("double").alias("heuristic"),
                    F.log1p(F.greatest(F.col("_quantity"), F.lit(0.0))).alias("log_quantity"),
                    F.col("repeat_rate").alias("item_repeat_rate"),
                    F.log1p(F.col("item_buyers").cast("double")).alias("log_item_buyers"),
                    F.log1p(F.col("user_orders").cast("double")).alias("log_user_orders"),
                    F.log1p(user_since).alias("log_user_days_since")))


def labelled_pairs(occasions: DataFrame, cutoff: datetime, params: BuyAgainParams) -> DataFrame:
    """``pair_features`` as of ``cutoff`` with ``label`` 1.0 when the user bought the item again in
    (cutoff, cutoff + horizon_days], else 0.0."""
    end = cutoff + timedelta(days=params.horizon_days)
    bought = (occasions.where((F.col("ts") > F.lit(cutoff).cast("timestamp")) & (F.col("ts") <= F.lit(end).cast("timestamp")))
              .select("user_id", "item_id").distinct().withColumn("label", F.lit(1.0)))
    return pair_features(occasions, cutoff, params).join(bought, ["user_id", "item_id"], "left").fillna(0.0, ["label"])


@dataclass(frozen=True)
class BuyAgainRanker:
    """A fitted buy-again classifier (``model`` None: the heuristic score ranks), and how it came to be."""

    kind: str
    model: PipelineModel | None
    note: str


def fit_ranker(occasions: DataFrame, as_of: datetime, params: BuyAgainParams, kind: str = "logistic_regression",
               seed: int = 42) -> BuyAgainRanker:
    """A ``kind`` classifier for lists made as of ``as_of``: fitted on the pairs as of ``as_of - horizon_days``,
    labelled by (as_of - horizon_days, as_of], so it never sees anything after ``as_of``.

    Falls back to the heuristic (``model`` None, said in ``note``) when that window holds no repeat
    purchase or no pair that was not re-bought: there is nothing to learn from.
    """
    if kind not in BUY_AGAIN_MODELS:
        raise ValueError(f"buy-again model must be one of {', '.join(BUY_AGAIN_MODELS)}, got {kind!r}")
    if kind == "heuristic":
        return BuyAgainRanker(kind, None, "buy-again lists ranked by the heuristic due-ness score")
    cutoff = as_of - timedelta(days=params.horizon_days)
    rows = labelled_pairs(occasions, cutoff, params).cache()
    counts = {r["label"]: r["count"] for r in rows.groupBy("label").count().collect()}
    positives, negatives = int(counts.get(1.0, 0)), int(counts.get(0.0, 0))
    window = f"({cutoff.date().isoformat()}, {as_of.date().isoformat()}]"
    if not positives or not negatives:
        rows.unpersist()
        return BuyAgainRanker("heuristic", None, f"buy-again ranker not fitted: the window {window} holds "
                                                 f"{positives} repeat and {negatives} other pairs; heuristic used")
    assemble = VectorAssembler(inputCols=list(RANKER_FEATURES), outputCol="_features", handleInvalid="keep")
    if kind == "gbt":
        classifier = GBTClassifier(featuresCol="_features", labelCol="label", maxIter=30, maxDepth=5, seed=seed)
    else:
        classifier = LogisticRegression(featuresCol="_features", labelCol="label", maxIter=100, regParam=1e-4)
    model = Pipeline(stages=[assemble, classifier]).fit(rows)
    rows.unpersist()
    note = (f"buy-again ranker ({kind}) fitted on {positives + negatives} pairs of {window}, "
            f"{positives / (positives + negatives):.3f} re-bought")
    log.info("%s", note)
    return BuyAgainRanker(kind, model, note)


def ranker_top_n(ranker: BuyAgainRanker, occasions: DataFrame, as_of: datetime | Column, params: BuyAgainParams,
                 n: int, exclude_items: DataFrame | None = None) -> DataFrame:
    """(user_id, item_id, score, rank): each user's past items ranked by the ranker's probability of being
    bought again (then occasions, recency); without a model, ``buy_again_top_n``."""
    if ranker.model is None:
        return buy_again_top_n(occasions, as_of, params, n, exclude_items)
    scored = ranker.model.transform(pair_features(occasions, as_of, params)).select(
        "user_id", "item_id", "n_occasions", "last_ts", vector_to_array("probability")[1].alias("score"))
    return top_n(scored, n, [F.col("score").desc(), F.col("n_occasions").desc(), F.col("last_ts").desc()],
                 exclude_items)


# ----------------------------------------------------------------------------------------------
# Ship what wins: per customer group, the list that won validation
# ----------------------------------------------------------------------------------------------

# Customers by purchase history as of the lists' moment: no order yet (a visitor), one order (day with a
# purchase) or more. Few on purpose: each group's choice is measured on its own validation users.
CUSTOMER_GROUPS = ("no_order", "one_order", "repeat")


def customer_groups(occasions: DataFrame, as_of: datetime | Column, users: DataFrame | None = None) -> DataFrame:
    """(user_id, customer_group) for every user with a purchase occasion up to ``as_of``, and every user of
    ``users`` (user_id) without one (``no_order``)."""
    past = occasions.where(F.col("ts") <= _as_of_column(as_of))
    orders = past.groupBy("user_id").agg(F.countDistinct("day").alias("_orders"))
    if users is not None:
        orders = orders.join(users.select("user_id").distinct(), "user_id", "full")
    return orders.select("user_id", F.when(F.col("_orders").isNull(), F.lit(CUSTOMER_GROUPS[0]))
                         .when(F.col("_orders") <= 1, F.lit(CUSTOMER_GROUPS[1]))
                         .otherwise(F.lit(CUSTOMER_GROUPS[2])).alias("customer_group"))


def choose_per_group(model: str, baselines: tuple[str, ...] | list[str], ndcg: dict[tuple[str, str], float],
                     users: dict[str, float] | None = None, min_users: int = 1) -> dict[str, str]:
    """group -> the list to ship: ``model`` unless a baseline scored a strictly higher validation NDCG in
    that group (``ndcg``: (list, group) -> value; a group without ``model``'s value keeps ``model``, and
    so does a group with fewer than ``min_users`` validation users in ``users``: group -> count)."""
    chosen = {}
    for group in CUSTOMER_GROUPS:
        if (model, group) not in ndcg or (users is not None and users.get(group, 0) < min_users):
            chosen[group] = model
            continue
        # max keeps the first of equals: a tie ships the model.
        chosen[group] = max([model, *baselines], key=lambda name: ndcg.get((name, group), -1.0))
    return chosen


def ship_what_wins(lists: dict[str, DataFrame], groups: DataFrame, chosen: dict[str, str], model: str) -> DataFrame:
    """(user_id, item_id, score, rank, source): for each customer group the ``chosen`` list of ``lists``
    (name -> (user_id, item_id, score, rank[, source])) for that group's users (``groups``: user_id,
    customer_group); users in no group keep ``model``'s list. A list without a ``source`` column is
    recorded under its own name (e.g. ``most_bought``)."""
    def with_source(name: str) -> DataFrame:
        if name not in lists:
            raise ValueError(f"no list named {name} to ship; has {', '.join(sorted(lists))}")
        rows = lists[name]
        source = F.col("source") if "source" in rows.columns else F.lit(name)
        return rows.select("user_id", "item_id", "score", "rank", source.alias("source"))

    parts = [with_source(model).join(groups.select("user_id"), "user_id", "left_anti")]
    for group, name in sorted(chosen.items()):
        members = groups.where(F.col("customer_group") == F.lit(group)).select("user_id")
        parts.append(with_source(name).join(members, "user_id"))
    union = parts[0]
    for part in parts[1:]:
        union = union.unionByName(part)
    return union


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


def buy_again_params(settings: RecommendSettings) -> BuyAgainParams:
    """The buy-again and blend parameters of the [recommend] settings."""
    return BuyAgainParams(settings.horizon_days, settings.buy_again_overdue_decay,
                          settings.buy_again_min_gaps, settings.blend_prior_strength)
