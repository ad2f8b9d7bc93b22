"""Offline evaluation on a time split: ALS tuned on a validation split carved from the training
side, every strategy and baseline measured on the held-out events, and which list ships per
customer group.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Callable

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from lib.features.interactions import index_additions, score_events, to_matrix_entries
from lib.features.splits import (Split, forward_split_fits, holdout_forward, holdout_latest, purchase_truth,
                                 relevant_items, user_history_end)
from lib.platform.settings import (BUY_AGAIN_MODELS, RECOMMEND_SPLITS, RECOMMEND_STRATEGIES, InteractionsSettings,
                                   RecommendSettings, SegmentsSettings)
from lib.recommend.als import (AlsParams, Estimate, TuningResult, als_top_n, fit_als, top_n_blocks, tune_als,
                               user_hash_fraction)
from lib.recommend.baselines import popular_for, popular_top_n, purchase_popularity, segment_popular_for
from lib.recommend.buy_again import (BlendCalibration, BuyAgainParams, blend, buy_again_params, buy_again_top_n,
                                     choose_per_group, customer_groups, fit_ranker, global_repeat_share, hit_curve,
                                     most_bought_top_n, most_recent_top_n, purchase_occasions, ranker_top_n,
                                     repeat_propensity, ship_what_wins)
from lib.recommend.metrics import (evaluate, group_ranking_metrics, ranking_metrics, segment_usefulness,
                                   segment_usefulness_summary)
from lib.recommend.pairs import excluded_pairs, to_ids, to_indexed
from lib.recommend.topn import TopNBlocks, block_top_n
from lib.segments.assign import assign_segments, component_mass
from lib.segments.matrix import fit_segments, segment_matrix

log = logging.getLogger(__name__)


# The baselines a strategy's list must beat on a customer group's validation to ship there. A buy-again
# list holds items the customer bought, so only lists of those replace it; the blended list may be
# anything (segment_popular only where the evaluation has segments).
SHIP_BASELINES = {"buy_again": ("most_bought", "most_recent"),
                  "blended": ("most_bought", "most_recent", "segment_popular")}


METRIC_NAMES = ("precision", "recall", "map", "ndcg", "coverage", "users")


# Each ranking metric's sampling error over the evaluated users, written beside it as <metric>_se.
ERROR_NAMES = ("precision_se", "recall_se", "map_se", "ndcg_se")


# Seed offset of the tuning sample (lib.recommend.als.tune_als uses seed + 1 for its first stage).
TUNE_SEED_OFFSET = 2


@dataclass(frozen=True)
class EvaluationSettings:
    """How the offline evaluation splits, scores and measures: ``evaluation_settings`` builds it from the
    [recommend] and [interactions] settings, which check every value once (``lib.platform.settings``)."""

    weights: dict[str, float]
    half_life_days: float
    exclude_event_types: list[str]
    k_values: list[int]
    tune_k: int
    # forward: fit up to T, judge (T, T + buy_again.horizon_days]; per_user: each user's latest share.
    split: str = "forward"
    holdout_fraction: float = 0.2
    holdout_cutoff: datetime | None = None
    validation_fraction: float = 0.2
    # The strategy evaluation (buy again, discover, blended against their trivial baselines on held-out
    # purchases) runs when this names any strategy.
    strategies: tuple[str, ...] = ()
    purchase_event_types: tuple[str, ...] = ("purchase",)
    buy_again: BuyAgainParams = BuyAgainParams()
    buy_again_model: str = "logistic_regression"   # lib.platform.settings.BUY_AGAIN_MODELS
    blend_ranks: int = 0   # the blend is calibrated for ranks 1..max(k_values, blend_ranks) (the lists' length)
    top_n_blocks: TopNBlocks | None = None   # how ALS top-N lists are cut into blocks (None: the defaults)
    # Validation and offline metrics on a seeded sample of about this many users per evaluated set
    # (0: every user); the models still learn from every user.
    eval_sample_users: int = 0
    # The ALS candidates learn from, are validated on and calibrate the blend with the events of a seeded
    # sample of about this many users (0: every user): tuning then costs the same at any customer count.
    # The evaluated model and the final model still learn from every user.
    tune_sample_users: int = 0
    sample_seed: int = 42
    tune_stop_z: float = 0.0   # > 0: tuning stops a clearly worse candidate early (lib.recommend.als.tune_als)
    # A customer group with fewer validation users keeps the strategy's own list: no baseline ships on noise.
    ship_min_group_users: int = 30

    def __post_init__(self) -> None:
        # The [recommend] settings check every value; a frame built by hand (tests, benchmarks) must not run a
        # misspelt split or strategy as another one.
        unknown = sorted(set(self.strategies) - set(RECOMMEND_STRATEGIES))
        if self.split not in RECOMMEND_SPLITS or self.buy_again_model not in BUY_AGAIN_MODELS or unknown:
            raise ValueError(f"split must be one of {RECOMMEND_SPLITS}, buy_again_model one of {BUY_AGAIN_MODELS} "
                             f"and strategies among {RECOMMEND_STRATEGIES}; got {self.split!r}, "
                             f"{self.buy_again_model!r}, unknown strategies {unknown}")


def sample_users(rows: DataFrame, size: int, seed: int, user_col: str = "user_id",
                 purpose: str = "evaluation") -> DataFrame:
    """The rows of about ``size`` of the distinct users of ``rows``, drawn by a seeded hash of the user id.

    ``size`` 0, or no more users than that: every row. A user's draw depends on their id and the seed
    only, so a sample is the same every run and a bigger sample holds a smaller one.
    """
    if size <= 0:
        return rows
    users = rows.select(user_col).distinct().count()
    if users <= size:
        return rows
    fraction = size / users
    log.info("%s sample: about %d of %d users (%.3f)", purpose, size, users, fraction)
    return rows.where(user_hash_fraction(user_col, seed) < F.lit(fraction))


@dataclass
class TrainingSide:
    """Everything a model may learn from: computed from training events alone."""

    entries: DataFrame          # (user_idx, item_idx, score, n_events, last_ts)
    user_index: DataFrame
    item_index: DataFrame
    excluded: DataFrame         # (user_idx, item_idx)
    as_of: datetime


def training_side(train_events: DataFrame, settings: EvaluationSettings, as_of: datetime,
                  user_index: DataFrame | None = None, item_index: DataFrame | None = None,
                  exclude_items: DataFrame | None = None) -> TrainingSide:
    """Scores (decayed to ``as_of``), indices (unless given) and exclusions from ``train_events`` only.

    Items of ``exclude_items`` (item_id; never recommendable, e.g. postage) stay in the indices but not
    in ``entries``, so no model learns or ranks them.
    """
    scored = score_events(train_events, settings.weights, settings.half_life_days, as_of)
    if user_index is None or item_index is None:  # both from the training events
        user_index, item_index = index_additions(scored, None, None)
    user_index, item_index = user_index.cache(), item_index.cache()
    if exclude_items is not None:
        scored = scored.join(F.broadcast(exclude_items.select("item_id")), "item_id", "left_anti")
    entries = to_matrix_entries(scored, user_index, item_index).cache()
    excluded = to_indexed(excluded_pairs(train_events, settings.exclude_event_types), user_index, item_index).cache()
    return TrainingSide(entries, user_index, item_index, excluded, as_of)


class TrainingSideNmf:
    """The segments' NMF refitted on a training side, for the evaluation: the stored factors and segments
    saw the judged events, so scoring or grouping by them would leak. One fit per training side serves
    both its uses (the latest side's factors are kept, checkpointed, until another side or ``release``):

    - ``recommend(side, users, n)``: the ``nmf_score`` recommender, items ranked by W H';
    - ``segments(side)``: (user_id, segment_id) by the [segments] assignment rule, for ``segment_popular``.
    """

    def __init__(self, settings: SegmentsSettings, top_n_blocks: TopNBlocks | None = None) -> None:
        self.settings = settings
        self.top_n_blocks = top_n_blocks
        self._side: TrainingSide | None = None
        self._factors: tuple[DataFrame, DataFrame] | None = None

    def _fitted(self, side: TrainingSide) -> tuple[DataFrame, DataFrame]:
        """(W, H) of ``side``: (user_idx, factors) and (item_idx, factors)."""
        if self._side is not side:
            self.release()
            entries = segment_matrix(side.entries, self.settings)[0].persist()
            last = side.user_index.agg(F.max("user_idx").alias("user")).crossJoin(
                side.item_index.agg(F.max("item_idx").alias("item"))).first()
            n_rows, n_cols = last["user"] + 1, last["item"] + 1
            fit = fit_segments(entries, self.settings, n_rows, n_cols)
            log.info("NMF on the training side up to %s: k=%d, relative error %.4f after %d iterations",
                     side.as_of.isoformat(), self.settings.k, fit.rel_error, fit.iterations)
            # Checkpointed factors (small: k numbers per user and item) outlive the fit's cached blocks,
            # which would otherwise sit in memory through the ALS fits that follow.
            w = fit.w.select(F.col("row_idx").cast("int").alias("user_idx"), "factors").localCheckpoint(eager=True)
            h = fit.h.select(F.col("col_idx").cast("int").alias("item_idx"), "factors").localCheckpoint(eager=True)
            fit.release()
            entries.unpersist()
            self._side, self._factors = side, (w, h)
        return self._factors

    def recommend(self, side: TrainingSide, users: DataFrame, n: int) -> DataFrame:
        """(user_idx, item_idx, score, rank): each of ``users``' best ``n`` items by W H', exclusions removed."""
        w, h = self._fitted(side)
        return block_top_n(w, h, users, n, side.excluded, self.top_n_blocks).localCheckpoint(eager=True)

    def segments(self, side: TrainingSide) -> DataFrame:
        """(user_id, segment_id) of every user of the side with a non-zero row of W, small segments merged
        as the stage merges them (segments.min_segment_size)."""
        w, h = self._fitted(side)
        return assign_segments(w.join(side.user_index, "user_idx"), component_mass(h, self.settings.k),
                               "training_side", self.settings.assignment,
                               self.settings.min_share(self.settings.k)
                               ).select("user_id", "segment_id").localCheckpoint(eager=True)

    def release(self) -> None:
        """Forget the kept factors."""
        self._side = self._factors = None


def _truth(held_out: DataFrame, side: TrainingSide, excluded_ids: DataFrame) -> DataFrame:
    """(user_id, item_id) ground truth for users the training side knows."""
    return relevant_items(held_out, side.user_index, excluded_ids)


@dataclass
class EvaluationReport:
    """Metrics of each model on the held-out events, plus the ALS tuning trail."""

    best: AlsParams
    tuning: list[TuningResult]
    metrics: list[tuple[str, int, str, float]] = field(default_factory=list)  # (model, k, metric, value)
    notes: list[str] = field(default_factory=list)
    calibration: BlendCalibration | None = None  # the blend's per-rank hit rates, from the validation split
    # strategy -> customer group -> the list validation chose to ship (the strategy's own, or a baseline)
    shipped: dict[str, dict[str, str]] = field(default_factory=dict)
    # Per training-side segment at max K, k plus lib.recommend.metrics.SEGMENT_USEFULNESS_COLUMNS: how much better
    # segment_popular predicts its customers' next purchases than popular_all (empty without segments).
    segment_usefulness: list[dict] = field(default_factory=list)

    def value(self, model: str, k: int, metric: str) -> float:
        for row in self.metrics:
            if row[:3] == (model, k, metric):
                return row[3]
        raise KeyError((model, k, metric))


def _ndcg_at(recommended: DataFrame, truth: DataFrame, k: int) -> Estimate:
    values = ranking_metrics(recommended, truth, k, "user_idx", "item_idx")
    return Estimate(int(values["users"]), values["ndcg"], values["ndcg_se"])


def _measure(report: EvaluationReport, model: str, recommended_ids: DataFrame, truth: DataFrame,
             k_values: list[int], catalog_size: int) -> None:
    for k in sorted(k_values):
        values = evaluate(recommended_ids, truth, k, catalog_size)
        report.metrics.extend((model, k, name, float(values[name])) for name in METRIC_NAMES + ERROR_NAMES)
        log.info("evaluation %s @%d: %s", model, k, {name: round(values[name], 4) for name in METRIC_NAMES}
                 | {"ndcg_se": round(values["ndcg_se"], 4)})


def split_that_fits(events: DataFrame, settings: EvaluationSettings) -> tuple[EvaluationSettings, str | None]:
    """``settings`` with a split the events can carry, and a note when it changed. The forward split (at
    the default cutoff) needs two horizons of history, its validation fitting up to T - h; a shop with
    less is evaluated on the per-user split rather than failing the stage. An explicit cutoff is kept
    (a cutoff the events cannot carry is an error the split names)."""
    if settings.split != "forward" or settings.holdout_cutoff is not None:
        return settings, None
    fits, span_days = forward_split_fits(events, settings.buy_again.horizon_days)
    if fits:
        return settings, None
    note = (f"the events span {span_days} days, under the forward split's two horizons of "
            f"{settings.buy_again.horizon_days:g} days: evaluated on the per-user split instead")
    log.warning("%s", note)
    return replace(settings, split="per_user"), note


def outer_split(events: DataFrame, settings: EvaluationSettings) -> Split:
    """The test split: forward at T (the cutoff, or the latest event minus the horizon), or per user."""
    if settings.split == "forward":
        return holdout_forward(events, settings.buy_again.horizon_days, settings.holdout_cutoff)
    return holdout_latest(events, settings.holdout_fraction, settings.holdout_cutoff)


def validation_split(train_events: DataFrame, outer: Split, settings: EvaluationSettings) -> Split:
    """The validation split, carved from the test split's training side: forward at T - horizon (judged on
    (T - h, T]), or each user's latest ``validation_fraction`` of training events."""
    if settings.split == "forward":
        return holdout_forward(train_events, settings.buy_again.horizon_days,
                               outer.train_end - timedelta(days=settings.buy_again.horizon_days))
    return holdout_latest(train_events, settings.validation_fraction)


def lists_as_of(settings: EvaluationSettings, split: Split, train_events: DataFrame,
                occasions: DataFrame) -> tuple[DataFrame, Column]:
    """``occasions`` with ``history_end``, the moment each user's lists are made as of: the split's T (forward
    split or a cutoff), else the user's own latest training event (per-user split)."""
    if settings.split == "forward" or settings.holdout_cutoff is not None:
        return occasions.withColumn("history_end", F.lit(split.train_end).cast("timestamp")), F.col("history_end")
    return occasions.join(user_history_end(train_events), "user_id"), F.col("history_end")


def evaluate_offline(
    events: DataFrame,
    settings: EvaluationSettings,
    candidates: list[AlsParams],
    factor_recommender: Callable[[TrainingSide, DataFrame, int], DataFrame] | None = None,
    factor_model_name: str = "nmf_score",
    on_tuning_result: Callable[[TuningResult], None] | None = None,
    exclude_items: DataFrame | None = None,
    segmenter: Callable[[TrainingSide], DataFrame] | None = None,
) -> EvaluationReport:
    """Split (``outer_split``: forward by default), tune ALS on a validation split carved from the training
    side (``validation_split``), then compare tuned ALS, global popularity and (optionally) a factor
    recommender on the held-out events. ``factor_recommender(training_side, users, n)`` must itself fit
    only on the training side.

    With ``settings.strategies`` the same split also measures the three list strategies against their
    trivial baselines on the held-out purchases (``evaluate_strategies``). ``exclude_items`` (item_id):
    items no list may hold (the catalog's exclusions); they are left out of training and of every list.
    ``segmenter(training_side)`` -> (user_id, segment_id), fitted on that side only (e.g.
    ``TrainingSideNmf.segments``): with it, ``segment_popular`` is measured and may ship.
    """
    settings, split_note = split_that_fits(events, settings)
    split = outer_split(events, settings)
    train_events = split.train.cache()
    side = training_side(train_events, settings, split.train_end, exclude_items=exclude_items)
    excluded_ids = excluded_pairs(train_events, settings.exclude_event_types)
    sample = lambda rows: sample_users(rows, settings.eval_sample_users, settings.sample_seed)  # noqa: E731
    test_truth_ids = sample(_truth(split.held_out, side, excluded_ids)).cache()
    max_k = max(settings.k_values)
    catalog_size = side.item_index.count()
    log.info("offline evaluation: training side ends %s; %d held-out users; catalog %d items",
             split.train_end.isoformat(), test_truth_ids.select("user_id").distinct().count(), catalog_size)

    # Validation carved from the training side; it reuses the training side's indices (ids only). Its
    # own seed keeps the validation sample drawn inside it from being all of it.
    tune_events = sample_users(train_events, settings.tune_sample_users, settings.sample_seed + TUNE_SEED_OFFSET,
                               purpose="tuning")
    inner = validation_split(tune_events, split, settings)
    inner_side = training_side(inner.train, settings, inner.train_end, side.user_index, side.item_index,
                               exclude_items)
    inner_excluded_ids = excluded_pairs(inner.train, settings.exclude_event_types)
    validation_truth = to_indexed(sample(_truth(inner.held_out, inner_side, inner_excluded_ids)),
                                  side.user_index, side.item_index).cache()
    best_model: list = []
    best, tuning = tune_als(inner_side.entries, validation_truth, candidates, settings.tune_k, _ndcg_at,
                            inner_side.excluded, on_tuning_result, best_model, settings.top_n_blocks,
                            settings.tune_stop_z, settings.sample_seed)
    log.info("ALS tuning chose %s", best)
    report = EvaluationReport(best=best, tuning=tuning, notes=[split_note] if split_note else [])
    if settings.strategies:
        validate_strategies(report, settings, inner, inner_side, best_model[0], exclude_items, segmenter)

    test_users = test_truth_ids.select("user_id").distinct().join(side.user_index, "user_id").select("user_idx").cache()
    purchases = None
    list_users = test_users
    if settings.strategies:
        purchases = sample(purchase_truth(split.held_out, side.user_index, excluded_pairs(
            train_events, list(settings.purchase_event_types)), settings.purchase_event_types)).cache()
        list_users = test_users.unionByName(purchases.select("user_id").distinct().join(side.user_index, "user_id")
                                            .select("user_idx")).distinct().cache()

    model = fit_als(side.entries, best)
    als_all = to_ids(als_top_n(model, list_users, max_k, side.excluded, settings.top_n_blocks), side.user_index,
                     side.item_index) \
        .localCheckpoint(eager=True)
    als_recs = als_all.join(test_truth_ids.select("user_id").distinct(), "user_id")
    _measure(report, "als", als_recs, test_truth_ids, settings.k_values, catalog_size)

    popular = to_ids(popular_top_n(test_users, side.entries, max_k, side.excluded), side.user_index, side.item_index)
    _measure(report, "popular", popular, test_truth_ids, settings.k_values, catalog_size)

    if factor_recommender is not None:
        factor_recs = to_ids(factor_recommender(side, test_users, max_k), side.user_index, side.item_index)
        _measure(report, factor_model_name, factor_recs, test_truth_ids, settings.k_values, catalog_size)

    if purchases is not None:
        evaluate_strategies(report, settings, split, train_events, purchases, als_all, exclude_items, catalog_size,
                            None if segmenter is None else segmenter(side))
        purchases.unpersist()
        list_users.unpersist()

    for df in (train_events, test_truth_ids, validation_truth, test_users, side.entries, side.excluded,
               inner_side.entries, inner_side.excluded, side.user_index, side.item_index):
        df.unpersist()
    return report


def validate_strategies(report: EvaluationReport, settings: EvaluationSettings, inner: Split,
                        inner_side: TrainingSide, model, exclude_items: DataFrame | None,
                        segmenter: Callable[[TrainingSide], DataFrame] | None = None) -> None:
    """On the validation split (carved from the training side, so the held-out events stay unseen): the
    blend's per-rank hit rates of buy-again and discovery lists (``report.calibration``), and per customer
    group which list ships for buy_again and blended (``report.shipped``): the strategy's list unless a
    baseline of its ``SHIP_BASELINES`` (``segment_popular`` with the segments of ``segmenter(inner_side)``)
    scores a higher NDCG@tune_k there, in a group of at least ``ship_min_group_users`` validation users. The buy-again ranker of these lists is fitted one horizon before the
    validation moment, as the final one is before the lists' moment."""
    length = max(max(settings.k_values), settings.blend_ranks)
    types = settings.purchase_event_types
    # The indices are the test split's (up to T): validation judges only the customers seen before its own
    # moment, as the test split does, or every group would hold visitors the lists cannot know yet.
    seen = inner.train.select("user_id").distinct()
    purchases = sample_users(purchase_truth(inner.held_out, inner_side.user_index,
                                            excluded_pairs(inner.train, list(types)), types).join(seen, "user_id"),
                             settings.eval_sample_users, settings.sample_seed).select("user_id", "item_id").cache()
    users = purchases.select("user_id").distinct()
    occasions = purchase_occasions(inner.train, types).cache()
    propensity = repeat_propensity(occasions, settings.buy_again.prior_strength)
    user_propensity = propensity.join(users, "user_id").cache()
    mean_p = user_propensity.agg(F.avg("propensity")).first()[0]
    if mean_p is None or not 0.0 < mean_p < 1.0:
        report.notes.append("no validation purchases: the blend interleaves by propensity, uncalibrated; "
                            "every customer group gets the strategies' own lists")
        for df in (purchases, occasions, user_propensity):
            df.unpersist()
        return
    user_occasions, as_of = lists_as_of(settings, inner, inner.train, occasions)
    user_occasions = user_occasions.join(users, "user_id")
    ranker = fit_ranker(occasions, inner.train_end, settings.buy_again, settings.buy_again_model, settings.sample_seed)
    again = ranker_top_n(ranker, user_occasions, as_of, settings.buy_again, length, exclude_items) \
        .localCheckpoint(eager=True)
    user_idx = users.join(inner_side.user_index, "user_id").select("user_idx")
    discover = to_ids(als_top_n(model, user_idx, length, inner_side.excluded, settings.top_n_blocks),
                      inner_side.user_index, inner_side.item_index).withColumn("source", F.lit("als")) \
        .localCheckpoint(eager=True)
    report.calibration = BlendCalibration(hit_curve(again, purchases, length), hit_curve(discover, purchases, length),
                                          float(mean_p))
    log.info("blend calibration: %s", report.calibration)
    lists = {"buy_again": again,
             "blended": blend(again, discover, user_propensity, length, global_repeat_share(propensity),
                              report.calibration),
             "most_bought": most_bought_top_n(user_occasions, as_of, length, exclude_items),
             "most_recent": most_recent_top_n(user_occasions, as_of, length, exclude_items)}
    if segmenter is not None:
        lists["segment_popular"] = segment_popular_for(users, segmenter(inner_side), occasions, length, exclude_items)
    groups = customer_groups(user_occasions, as_of, users).cache()
    ndcg: dict[tuple[str, str], float] = {}
    group_users: dict[str, float] = {}
    for name, rows in lists.items():
        for group, values in group_ranking_metrics(rows, purchases, groups, settings.tune_k).items():
            ndcg[(name, group)] = values["ndcg"]
            group_users[group] = values["users"]
            report.notes.append(f"validation NDCG@{settings.tune_k} {name} on {group} customers: "
                                f"{values['ndcg']:.4f} (SE {values['ndcg_se']:.4f}, {values['users']:.0f} users)")
    for strategy in ("buy_again", "blended"):
        if strategy in settings.strategies:
            report.shipped[strategy] = choose_per_group(
                strategy, [name for name in SHIP_BASELINES[strategy] if name in lists], ndcg, group_users,
                settings.ship_min_group_users)
            report.notes.append(f"{strategy} ships per customer group: " + ", ".join(
                f"{group} -> {name}" for group, name in sorted(report.shipped[strategy].items())))
            log.info("%s", report.notes[-1])
    report.notes.append(ranker.note)
    for df in (purchases, occasions, user_propensity, groups):
        df.unpersist()


def evaluate_strategies(
    report: EvaluationReport,
    settings: EvaluationSettings,
    split: Split,
    train_events: DataFrame,
    purchases: DataFrame,
    discover: DataFrame,
    exclude_items: DataFrame | None,
    catalog_size: int,
    segments: DataFrame | None = None,
) -> None:
    """The three list strategies against their trivial baselines on the held-out purchases of one split.

    ``purchases`` (user_id, item_id, is_new): the held-out purchases (``lib.features.splits.purchase_truth``);
    ``discover`` (user_id, item_id, score, rank): the tuned ALS lists (purchases excluded) of these users.
    Appends to ``report.metrics``:

    - on all next purchases: ``buy_again`` (the configured ranker), ``buy_again_heuristic`` (the due-ness
      score), ``most_bought`` and ``most_recent`` (the trivial "your most bought / most recent items"),
      ``blended``, ``popular_all`` (the most bought items overall, nothing excluded), ``segment_popular``
      (the most bought items of the user's segment in ``segments`` (user_id, segment_id, fitted on the
      training side), when given; then also ``report.segment_usefulness``, segment_popular against
      popular_all per segment at max K), and
      ``shipped_buy_again`` / ``shipped_blended``: per customer group the list validation chose
      (``report.shipped``);
    - on next purchases of new items (not bought in training): ``discover`` and ``popular_new``
      (overall popularity minus the user's purchases).

    Lists are made as of the split's T (``lists_as_of``), or each user's own end of history (per-user split).
    """
    max_k = max(settings.k_values)
    truth_all = purchases.select("user_id", "item_id")
    truth_new = purchases.where(F.col("is_new")).select("user_id", "item_id")
    if truth_all.limit(1).count() == 0:
        report.notes.append("no held-out purchases: strategies not evaluated")
        log.info("%s", report.notes[-1])
        return
    users = truth_all.select("user_id").distinct()
    occasions = purchase_occasions(train_events, settings.purchase_event_types).cache()
    user_occasions, as_of = lists_as_of(settings, split, train_events, occasions)
    user_occasions = user_occasions.join(users, "user_id").cache()
    params = settings.buy_again
    ranker = fit_ranker(occasions, split.train_end, params, settings.buy_again_model, settings.sample_seed)
    report.notes.append(f"test: {ranker.note}")
    lists = {
        "buy_again": ranker_top_n(ranker, user_occasions, as_of, params, max_k, exclude_items)
        .localCheckpoint(eager=True),
        "buy_again_heuristic": buy_again_top_n(user_occasions, as_of, params, max_k, exclude_items),
        "most_bought": most_bought_top_n(user_occasions, as_of, max_k, exclude_items),
        "most_recent": most_recent_top_n(user_occasions, as_of, max_k, exclude_items),
    }
    popularity = purchase_popularity(occasions)
    propensity = repeat_propensity(occasions, params.prior_strength).cache()
    share = global_repeat_share(propensity)
    discover_users = discover.join(users, "user_id").withColumn("source", F.lit("als"))
    lists["blended"] = blend(lists["buy_again"], discover_users, propensity, max_k, share, report.calibration) \
        .localCheckpoint(eager=True)
    if segments is not None:
        lists["segment_popular"] = segment_popular_for(users, segments, occasions, max_k, exclude_items)
    groups = customer_groups(user_occasions, as_of, users).cache()
    for strategy, chosen in report.shipped.items():
        lists[f"shipped_{strategy}"] = ship_what_wins(lists, groups, chosen, strategy)
    lists["popular_all"] = popular_for(users, popularity, max_k, exclude_items=exclude_items)
    for name, rows in lists.items():
        _measure(report, name, rows, truth_all, settings.k_values, catalog_size)
    if segments is not None:
        report.segment_usefulness = [
            {"k": max_k, **row.asDict()}
            for row in segment_usefulness(lists["segment_popular"], lists["popular_all"], truth_all, segments,
                                          max_k).collect()]
        log.info("%s", segment_usefulness_summary(report.segment_usefulness, max_k))
    if truth_new.limit(1).count() == 0:
        report.notes.append("no held-out purchases of new items: discover not evaluated on purchases")
    else:
        new_users = truth_new.select("user_id").distinct()
        bought = occasions.select("user_id", "item_id").distinct()
        _measure(report, "discover", discover.join(new_users, "user_id"), truth_new, settings.k_values, catalog_size)
        _measure(report, "popular_new", popular_for(new_users, popularity, max_k,
                                                    bought.join(new_users, "user_id"), exclude_items),
                 truth_new, settings.k_values, catalog_size)
    report.notes.append(f"global repeat share of purchase occasions {share:.3f}")
    for df in (occasions, user_occasions, propensity, groups):
        df.unpersist()


def evaluation_settings(settings: RecommendSettings, interactions: InteractionsSettings) -> EvaluationSettings:
    """The offline evaluation's parameters from the [recommend] and [interactions] settings (validated there)."""
    return EvaluationSettings(
        weights=interactions.weights, half_life_days=interactions.half_life_days,
        exclude_event_types=list(settings.exclude_event_types), k_values=list(settings.k_values),
        tune_k=settings.tune_k, split=settings.split, holdout_fraction=settings.holdout_fraction,
        holdout_cutoff=settings.holdout_cutoff_utc, validation_fraction=settings.validation_fraction,
        strategies=tuple(settings.strategies), purchase_event_types=tuple(settings.purchase_event_types),
        buy_again=buy_again_params(settings), buy_again_model=settings.buy_again_model,
        blend_ranks=settings.top_n, top_n_blocks=top_n_blocks(settings.als),
        eval_sample_users=settings.eval_sample_users, tune_sample_users=settings.tune_sample_users,
        sample_seed=settings.als.seed, tune_stop_z=settings.tune_stop_z,
        ship_min_group_users=settings.ship_min_group_users,
    )
