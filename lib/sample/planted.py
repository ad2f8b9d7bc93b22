"""A seeded, distributed generator of a realistic clickstream with planted customer segments.

Structure planted in the data, so later stages can be scored against it:
- ``segments`` customer segments; each user belongs to one and draws ``in_segment_share`` of their
  item picks from the segment's own items (Zipf-like popularity inside the group), the rest from a
  shared catalogue of general items;
- a funnel of event types (views >> clicks > carts > purchases) plus email opens and clicks;
- timestamps over ``days`` days with a weekly rhythm (busier weekends) and a daily one (lunch and
  evening peaks);
- ``churn_fraction`` of users stop being active on a day of their own.

With ``email_campaigns`` (the pipeline's default; off for direct ``SampleSpec`` callers, whose output
is unchanged) the email events follow a campaign calendar instead: ``email_send`` events (a
delivered message) go to every user alike, opens and clicks come from each user's planted email
engagement, at a planted preferred hour (UTC) and weekday for most users (``preferred_hour`` -1: none),
and planted churners stop opening ``EMAIL_LEAD_DAYS`` before they stop visiting and buying, while
sends go on to the end. ``planted_users`` returns all of it, one row per user.

Events are generated in blocks of ``BLOCK_EVENTS`` by ``mapInArrow`` with numpy, each block seeded
from (seed, block number), so the output depends only on the parameters, not on partitioning.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

BLOCK_EVENTS = 100_000
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "email_open", "email_click")
FUNNEL = np.array([0.70, 0.14, 0.06, 0.025, 0.05, 0.015])
# With email campaigns: the same funnel plus deliveries (an open rate of about 30%).
EMAIL_EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "email_send", "email_open", "email_click")
EMAIL_FUNNEL = np.array([0.58, 0.12, 0.05, 0.025, 0.16, 0.05, 0.015])
EMAIL_LEAD_DAYS = 14          # planted churners stop opening this many days before they go quiet
PREFERRED_HOUR_SHARE = 0.8    # users with a preferred email hour (the others open at any time)
PREFERRED_WEEKDAY_SHARE = 0.6
ON_HOUR_SHARE = 0.75          # a preferring user's opens at (or next to) that hour
ON_WEEKDAY_SHARE = 0.6
SEND_HOURS = np.array([8, 9, 10, 16])  # the marketer's campaign slots (UTC)
WEEKDAY_WEIGHTS = np.array([1.0, 0.95, 0.95, 1.0, 1.1, 1.35, 1.25])  # Monday first
HOUR_WEIGHTS = np.array(
    [0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.4, 0.7, 0.9, 1.0, 1.0, 1.2,
     1.5, 1.3, 1.0, 1.0, 1.0, 1.1, 1.3, 1.6, 1.8, 1.6, 1.0, 0.5]
)


def window_start_epoch(end_date: str, days: int) -> int:
    """Epoch seconds of the sample window's first instant: ``days`` before midnight UTC of ``end_date``."""
    end = datetime.combine(date.fromisoformat(end_date), datetime.min.time(), timezone.utc)
    return int(end.timestamp()) - days * 86_400


@dataclass(frozen=True)
class ClickstreamShape:
    """Size, window and planted-structure parameters every sample generator shares, validated once."""

    users: int
    items: int
    events: int
    segments: int
    seed: int
    days: int = 90
    end_date: str = "2026-10-31"
    in_segment_share: float = 0.85
    churn_fraction: float = 0.15

    def min_items(self) -> tuple[int, str]:
        """The fewest items this generator can plant, and why."""
        return 2 * self.segments, f"(twice the segments, {self.segments})"

    def __post_init__(self) -> None:
        if self.users < 1 or self.events < 1 or self.days < 1:
            raise ValueError("sample users, events and days must be positive")
        if not 1 <= self.segments:
            raise ValueError("sample segments must be at least 1")
        minimum, why = self.min_items()
        if self.items < minimum:
            raise ValueError(f"sample items ({self.items}) must be at least {minimum} {why}")
        if not 0.0 <= self.in_segment_share <= 1.0 or not 0.0 <= self.churn_fraction <= 1.0:
            raise ValueError("sample in_segment_share and churn_fraction must lie in [0, 1]")

    @property
    def start_epoch(self) -> int:
        return window_start_epoch(self.end_date, self.days)


@dataclass(frozen=True)
class SampleSpec(ClickstreamShape):
    """Parameters of the generated clickstream."""

    email_campaigns: bool = False

    @property
    def event_types(self) -> tuple[str, ...]:
        return EMAIL_EVENT_TYPES if self.email_campaigns else EVENT_TYPES


@dataclass(frozen=True)
class _Planted:
    user_segment: np.ndarray
    user_cdf: np.ndarray
    churn_day: np.ndarray  # -1 for users who never churn
    segment_items: list[np.ndarray]
    segment_cdfs: list[np.ndarray]
    general_items: np.ndarray
    general_cdf: np.ndarray
    price: np.ndarray
    preferred_hour: np.ndarray     # -1: no preferred email hour
    preferred_weekday: np.ndarray  # 0 = Monday; -1: none
    email_cdf: np.ndarray          # who opens: sqrt(activity) x a planted email engagement


def _zipf_cdf(size: int, exponent: float = 0.9) -> np.ndarray:
    weights = 1.0 / np.arange(1, size + 1) ** exponent
    return np.cumsum(weights) / weights.sum()


def _planted(spec: SampleSpec) -> _Planted:
    """The ground truth, recomputed identically in every task from the seed."""
    rng = np.random.default_rng([spec.seed, 0])
    user_segment = rng.integers(0, spec.segments, spec.users)
    activity = rng.lognormal(0.0, 1.0, spec.users)
    user_cdf = np.cumsum(activity) / activity.sum()
    churned = rng.random(spec.users) < spec.churn_fraction
    churn_day = np.where(churned, rng.integers(spec.days // 4, max(spec.days * 3 // 4, spec.days // 4 + 1), spec.users), -1)

    items = np.random.default_rng([spec.seed, 1]).permutation(spec.items)
    per_segment = spec.items // (spec.segments + 1)
    segment_items = [items[s * per_segment:(s + 1) * per_segment] for s in range(spec.segments)]
    general_items = items[spec.segments * per_segment:]
    price = np.round(np.random.default_rng([spec.seed, 2]).lognormal(3.0, 0.6, spec.items), 2)
    email_rng = np.random.default_rng([spec.seed, 3])  # its own stream: the draws above stay as they were
    preferred_hour = np.where(email_rng.random(spec.users) < PREFERRED_HOUR_SHARE,
                              email_rng.integers(7, 22, spec.users), -1)
    preferred_weekday = np.where(email_rng.random(spec.users) < PREFERRED_WEEKDAY_SHARE,
                                 email_rng.integers(0, 7, spec.users), -1)
    email_weight = np.sqrt(activity) * email_rng.lognormal(0.0, 0.5, spec.users)
    return _Planted(
        user_segment=user_segment,
        user_cdf=user_cdf,
        churn_day=churn_day,
        segment_items=segment_items,
        segment_cdfs=[_zipf_cdf(len(group)) for group in segment_items],
        general_items=general_items,
        general_cdf=_zipf_cdf(len(general_items)),
        price=price,
        preferred_hour=preferred_hour,
        preferred_weekday=preferred_weekday,
        email_cdf=np.cumsum(email_weight) / email_weight.sum(),
    )


def _draw(cdf: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, uniform, side="right"), len(cdf) - 1)


def _days_and_hours(start_epoch: int, days: int, churn_day: np.ndarray, rng: np.random.Generator, count: int,
                    weekday_weights: np.ndarray = WEEKDAY_WEIGHTS,
                    hour_weights: np.ndarray = HOUR_WEIGHTS) -> tuple[np.ndarray, np.ndarray]:
    """Each of ``count`` events' day (by ``weekday_weights``, Monday first; a churner's events fall on or
    before their churn day, ``churn_day`` per event, -1 for none) and hour of the day (by ``hour_weights``)."""
    start_weekday = datetime.fromtimestamp(start_epoch, timezone.utc).weekday()
    day_weights = weekday_weights[(start_weekday + np.arange(days)) % 7]
    day = _draw(np.cumsum(day_weights) / day_weights.sum(), rng.random(count))
    after_churn = (churn_day >= 0) & (day > churn_day)
    day[after_churn] = (rng.random(int(after_churn.sum())) * (churn_day[after_churn] + 1)).astype(np.int64)
    hour = _draw(np.cumsum(hour_weights) / hour_weights.sum(), rng.random(count))
    return day, hour


def _pick_items(spec: SampleSpec, planted: _Planted, rng: np.random.Generator, segments: np.ndarray) -> np.ndarray:
    """One item per row: from the row's segment's own items (in_segment_share) or the general ones."""
    items = np.empty(len(segments), dtype=np.int64)
    in_segment = rng.random(len(segments)) < spec.in_segment_share
    for segment in range(spec.segments):
        picks = in_segment & (segments == segment)
        group = planted.segment_items[segment]
        items[picks] = group[_draw(planted.segment_cdfs[segment], rng.random(int(picks.sum())))]
    general = ~in_segment
    items[general] = planted.general_items[_draw(planted.general_cdf, rng.random(int(general.sum())))]
    return items


def _email_timing(spec: SampleSpec, planted: _Planted, rng: np.random.Generator, users: np.ndarray,
                  type_code: np.ndarray, day: np.ndarray, hour: np.ndarray) -> None:
    """Campaign-calendar timing of the email rows, in place (see the module docstring)."""
    send = type_code == EMAIL_EVENT_TYPES.index("email_send")
    n_send = int(send.sum())
    day[send] = rng.integers(0, spec.days, n_send)  # sends go on after a customer churns
    hour[send] = SEND_HOURS[rng.integers(0, len(SEND_HOURS), n_send)]

    reaction = type_code >= EMAIL_EVENT_TYPES.index("email_open")
    stop = planted.churn_day[users] - EMAIL_LEAD_DAYS  # churners' last day of opening
    late = reaction & (planted.churn_day[users] >= 0) & (day > stop)
    day[late] = (rng.random(int(late.sum())) * (np.maximum(stop[late], 0) + 1)).astype(np.int64)

    start_weekday = datetime.fromtimestamp(spec.start_epoch, timezone.utc).weekday()
    weekday = planted.preferred_weekday[users]
    on_day = reaction & (weekday >= 0) & (rng.random(len(users)) < ON_WEEKDAY_SHARE)
    moved = day - (start_weekday + day - weekday) % 7  # the latest preferred weekday not after the day
    moved = np.where(moved < 0, moved + 7, moved)
    limit = np.where(planted.churn_day[users] >= 0, np.maximum(stop, 0), spec.days - 1)
    on_day &= moved <= limit
    day[on_day] = moved[on_day]

    preferred = planted.preferred_hour[users]
    on_hour = reaction & (preferred >= 0) & (rng.random(len(users)) < ON_HOUR_SHARE)
    jitter = rng.choice(np.array([-1, 0, 1]), size=len(users), p=[0.1, 0.8, 0.1])
    hour[on_hour] = (preferred[on_hour] + jitter[on_hour]) % 24


def _generate_block(spec: SampleSpec, planted: _Planted, block: int) -> pa.RecordBatch:
    first = block * BLOCK_EVENTS
    size = min(BLOCK_EVENTS, spec.events - first)
    rng = np.random.default_rng([spec.seed, 100, block])

    users = _draw(planted.user_cdf, rng.random(size))
    segments = planted.user_segment[users]
    items = _pick_items(spec, planted, rng, segments)

    funnel = EMAIL_FUNNEL if spec.email_campaigns else FUNNEL
    event_type = _draw(np.cumsum(funnel) / funnel.sum(), rng.random(size))
    if spec.email_campaigns:  # a stream of its own, after the draws shared with the plain sample
        email_rng = np.random.default_rng([spec.seed, 200, block])
        send = event_type == EMAIL_EVENT_TYPES.index("email_send")
        reaction = event_type >= EMAIL_EVENT_TYPES.index("email_open")
        users[send] = email_rng.integers(0, spec.users, int(send.sum()))  # every customer is mailed alike
        users[reaction] = _draw(planted.email_cdf, email_rng.random(int(reaction.sum())))
        email = send | reaction
        items[email] = _pick_items(spec, planted, email_rng, planted.user_segment[users[email]])

    day, hour = _days_and_hours(spec.start_epoch, spec.days, planted.churn_day[users], rng, size)
    if spec.email_campaigns:
        _email_timing(spec, planted, email_rng, users, event_type, day, hour)
    seconds = spec.start_epoch + day * 86_400 + hour * 3_600 + rng.integers(0, 3_600, size)

    types = spec.event_types
    purchase = event_type == types.index("purchase")
    quantity = np.where(purchase, 1 + rng.poisson(0.3, size), np.nan)
    revenue = np.where(purchase, np.round(quantity * planted.price[items], 2), np.nan)
    first_email = types.index("email_send") if spec.email_campaigns else types.index("email_open")
    channel_code = np.where(event_type >= first_email, 2, (rng.random(size) < 0.35).astype(np.int64))

    return pa.RecordBatch.from_arrays(
        [
            pa.array(np.arange(first, first + size, dtype=np.int64)),
            pa.array(users.astype(np.int64)),
            pa.array(items),
            pa.array(event_type.astype(np.int64)),
            pa.array(seconds.astype(np.int64)),
            pa.array(quantity, from_pandas=True),
            pa.array(revenue, from_pandas=True),
            pa.array(channel_code.astype(np.int64)),
        ],
        names=["event_num", "user_num", "item_num", "type_code", "epoch", "quantity", "revenue", "channel_code"],
    )


_BLOCK_SCHEMA = (
    "event_num long, user_num long, item_num long, type_code long, epoch long, "
    "quantity double, revenue double, channel_code long"
)


def generate_events(spark: SparkSession, spec: SampleSpec, partitions: int | None = None) -> DataFrame:
    """The sample clickstream in the input contract's columns (event_ts as a timestamp).

    Deterministic for a given ``spec``; ``partitions`` only changes how the work is spread.
    """
    blocks = -(-spec.events // BLOCK_EVENTS)
    partitions = partitions or min(blocks, 64)

    def generate(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        planted = _planted(spec)
        for batch in batches:
            for block in batch.column("id").to_pylist():
                yield _generate_block(spec, planted, block)

    raw = spark.range(0, blocks, 1, partitions).mapInArrow(generate, _BLOCK_SCHEMA)
    event_types = F.array(*[F.lit(name) for name in spec.event_types])
    channels = F.array(F.lit("web"), F.lit("app"), F.lit("email"))
    is_email = F.col("channel_code") == 2
    week = F.floor((F.col("epoch") - spec.start_epoch) / (7 * 86_400))
    return raw.select(
        F.format_string("ev-%d-%010d", F.lit(spec.seed), F.col("event_num")).alias("event_id"),
        F.format_string("u%07d", F.col("user_num")).alias("user_id"),
        F.format_string("i%06d", F.col("item_num")).alias("item_id"),
        F.element_at(event_types, F.col("type_code").cast("int") + 1).alias("event_type"),
        F.timestamp_seconds(F.col("epoch")).alias("event_ts"),
        F.col("quantity"),
        F.col("revenue"),
        F.when(is_email, F.format_string("cmp-w%02d", week)).alias("campaign_id"),
        F.element_at(channels, F.col("channel_code").cast("int") + 1).alias("channel"),
    )


def planted_segments_frame(spark: SparkSession, users: int, user_segment: Callable[[], np.ndarray]) -> DataFrame:
    """(user_id, segment_id) of users 0..users-1, ``user_segment()`` (the planted segment of each user number)
    evaluated in the tasks, so no per-user array travels from the driver."""

    def label(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        segment_of = user_segment()
        for batch in batches:
            ids = batch.column("id").to_numpy()
            yield pa.RecordBatch.from_arrays(
                [pa.array(ids), pa.array(segment_of[ids].astype(np.int64))], names=["user_num", "segment_id"])

    return (spark.range(0, users).mapInArrow(label, "user_num long, segment_id long")
            .select(F.format_string("u%07d", "user_num").alias("user_id"), F.col("segment_id").cast("int")))


def planted_user_segments(spark: SparkSession, spec: SampleSpec) -> DataFrame:
    """Ground truth: (user_id, segment_id) for every generated user, computed distributedly."""
    return planted_segments_frame(spark, spec.users, lambda: _planted(spec).user_segment)


def planted_segment_items(spark: SparkSession, spec: SampleSpec) -> DataFrame:
    """Ground truth: (segment_id, item_id, popularity_rank) of each segment's own items."""
    planted = _planted(spec)
    rows = [
        (segment, f"i{item:06d}", rank)
        for segment, group in enumerate(planted.segment_items)
        for rank, item in enumerate(group.tolist())
    ]
    return spark.createDataFrame(rows, "segment_id int, item_id string, popularity_rank int")


def planted_users(spark: SparkSession, spec: SampleSpec) -> DataFrame:
    """Ground truth per user, computed distributedly: segment, churn date (null: never churns), the day
    the churner's email opens stop (email_campaigns only), the preferred email hour (UTC) and weekday
    (0 = Monday; null: none; planted only with email_campaigns)."""

    def label(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        planted = _planted(spec)
        for batch in batches:
            ids = batch.column("id").to_numpy()
            churn = planted.churn_day[ids]
            yield pa.RecordBatch.from_arrays(
                [pa.array(ids), pa.array(planted.user_segment[ids].astype(np.int64)),
                 pa.array(churn.astype(np.int64)),
                 pa.array(planted.preferred_hour[ids].astype(np.int64)),
                 pa.array(planted.preferred_weekday[ids].astype(np.int64))],
                names=["user_num", "segment_id", "churn_day", "preferred_hour", "preferred_weekday"],
            )

    start = F.to_date(F.timestamp_seconds(F.lit(spec.start_epoch)))
    churned = F.col("churn_day") >= 0
    email = F.lit(spec.email_campaigns)
    return (
        spark.range(0, spec.users)
        .mapInArrow(label, "user_num long, segment_id long, churn_day long, preferred_hour long, "
                           "preferred_weekday long")
        .select(
            F.format_string("u%07d", "user_num").alias("user_id"),
            F.col("segment_id").cast("int"),
            churned.alias("churner"),
            F.when(churned, F.date_add(start, F.col("churn_day").cast("int"))).alias("churn_date"),
            F.when(churned & email, F.date_add(start, F.greatest(F.col("churn_day").cast("int") - EMAIL_LEAD_DAYS,
                                                                  F.lit(0)))).alias("email_stop_date"),
            F.when(email & (F.col("preferred_hour") >= 0), F.col("preferred_hour").cast("int")).alias("preferred_hour"),
            F.when(email & (F.col("preferred_weekday") >= 0),
                   F.col("preferred_weekday").cast("int")).alias("preferred_weekday"),
        )
    )
