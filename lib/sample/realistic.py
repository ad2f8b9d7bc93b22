"""A seeded, distributed generator of a retailer's invoice log that looks like real data (``sample.mode =
"realistic"``), with customer segments planted underneath so their recovery can still be measured.

What real invoice logs have and the planted generator (lib.sample.planted) does not:
- **a long tail**: item popularity follows a Zipf law over the whole catalogue, so a few hundred items
  make most of the lines and most items are rare;
- **best sellers nearly everyone buys**: ``HERO_ITEMS`` products that appear in a large share of all
  orders whatever the customer's segment;
- **heavy and light customers**: a customer's number of orders is log-normal with a wide spread, so
  many customers have one or two orders and a few have hundreds;
- **repeat purchases of staples**: each customer re-buys a few staple items of their own, often in
  dozens;
- **non-product lines**: postage (``POST``, ``DOT``, carriage ``C2``) on most orders of the customers
  who pay it, manual adjustments (``M``), bank charges; they are invoice lines like any other;
- **unequal segments**: planted segment sizes fall from about a third to a tenth of the customers.

Every row is a ``purchase`` (an invoice line) with a quantity and revenue; the lines of one order
share its timestamp. The output has the columns of ``lib.sample.planted.generate_events``.

Lines are generated in blocks of ``BLOCK_EVENTS`` by ``mapInArrow`` with numpy, each block seeded from
(seed, block number): the output depends only on the spec, not on partitioning. Per-customer draws
(segment, activity, staples, postage) are recomputed from the seed inside each task, never on the driver.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lib.sample.planted import ClickstreamShape, _days_and_hours, _draw, _zipf_cdf, planted_segments_frame

BLOCK_EVENTS = 100_000
# Non-product invoice codes, as a retailer's log has them (named after the UCI Online Retail codes).
NON_PRODUCT_ITEMS = ("POST", "DOT", "C2", "M", "BANK CHARGES")
HERO_ITEMS = 3                 # best sellers nearly every customer buys
HERO_SHARE = 0.16              # share of product lines that are a best seller
STAPLE_SHARE = 0.22            # share of product lines that re-buy one of the customer's staples
STAPLES_PER_USER = 3
POSTAGE_USERS = 0.3            # customers who pay postage (a POST or DOT line on most orders)
POSTAGE_ON_ORDER = 0.85
MANUAL_ON_ORDER = 0.03         # an M (manual adjustment) line
CARRIAGE_ON_ORDER = 0.01       # C2
BANK_CHARGES_ON_ORDER = 0.004
MEAN_BASKET = 8.0              # product lines per order (1 + Poisson)
ACTIVITY_SIGMA = 1.4           # log-normal spread of customers' order rates: heavy and light users
LOYALTY_BETA = (1.2, 1.8)      # customers' loyalty to their segment varies: mean 0.4 x sample.in_segment_share
TAIL_EXPONENT = 1.05           # Zipf exponent of the catalogue-wide popularity
QUANTITIES = np.array([1, 2, 3, 4, 6, 8, 12, 24, 48])
QUANTITY_WEIGHTS = np.array([0.30, 0.18, 0.08, 0.10, 0.10, 0.04, 0.14, 0.05, 0.01])
HOUR_WEIGHTS = np.array([0, 0, 0, 0, 0, 0, 0.1, 0.5, 1.0, 1.3, 1.4, 1.5,
                         1.6, 1.5, 1.3, 1.1, 0.8, 0.5, 0.3, 0.2, 0.1, 0, 0, 0])  # shop hours
WEEKDAY_WEIGHTS = np.array([1.2, 1.1, 1.2, 1.3, 1.0, 0.2, 0.8])  # Monday first


@dataclass(frozen=True)
class RealisticSpec(ClickstreamShape):
    """Parameters of the realistic invoice log; ``items`` counts products (non-product codes come on top)."""

    def min_items(self) -> tuple[int, str]:
        return (HERO_ITEMS + 2 * (self.segments + 1),
                f"in realistic mode ({HERO_ITEMS} best sellers and two items per segment and general)")


@dataclass(frozen=True)
class _Planted:
    user_segment: np.ndarray
    user_cdf: np.ndarray
    loyalty: np.ndarray         # share of the customer's catalogue picks from their segment's items
    churn_day: np.ndarray       # -1: never churns
    postage_code: np.ndarray    # -1: no postage, else the index of POST or DOT in NON_PRODUCT_ITEMS
    staples: np.ndarray         # users x STAPLES_PER_USER product numbers
    heroes: np.ndarray
    segment_items: list[np.ndarray]
    segment_cdfs: list[np.ndarray]
    tail_items: np.ndarray      # every product, most popular first
    tail_cdf: np.ndarray
    price: np.ndarray


def segment_proportions(segments: int) -> np.ndarray:
    """Planted segment sizes: falling from about a third of the customers (for 5) to a tenth."""
    weights = 1.0 / (1.0 + 0.5 * np.arange(segments))
    return weights / weights.sum()


def _planted(spec: RealisticSpec) -> _Planted:
    """The ground truth, recomputed identically in every task from the seed."""
    rng = np.random.default_rng([spec.seed, 10])
    user_segment = _draw(np.cumsum(segment_proportions(spec.segments)), rng.random(spec.users))
    activity = rng.lognormal(0.0, ACTIVITY_SIGMA, spec.users)
    user_cdf = np.cumsum(activity) / activity.sum()
    churned = rng.random(spec.users) < spec.churn_fraction
    churn_day = np.where(churned, rng.integers(spec.days // 4, max(spec.days * 3 // 4, spec.days // 4 + 1),
                                               spec.users), -1)
    loyalty = spec.in_segment_share * rng.beta(*LOYALTY_BETA, spec.users)
    postage = rng.random(spec.users) < POSTAGE_USERS
    postage_code = np.where(postage, np.where(rng.random(spec.users) < 0.8, 0, 1), -1)

    items = np.random.default_rng([spec.seed, 11]).permutation(spec.items)
    heroes = items[:HERO_ITEMS]
    rest = items[HERO_ITEMS:]
    per_segment = len(rest) // (spec.segments + 1)
    segment_items = [rest[s * per_segment:(s + 1) * per_segment] for s in range(spec.segments)]
    segment_exponent = 0.9
    segment_cdfs = [_zipf_cdf(len(group), segment_exponent) for group in segment_items]
    tail_items = np.random.default_rng([spec.seed, 12]).permutation(rest)

    # Staples: mostly popular items of the customer's own segment, some from the whole catalogue.
    staple_rng = np.random.default_rng([spec.seed, 13])
    staples = np.empty((spec.users, STAPLES_PER_USER), dtype=np.int64)
    own = staple_rng.random((spec.users, STAPLES_PER_USER)) < 0.7
    for segment in range(spec.segments):
        rows = user_segment == segment
        picks = segment_items[segment][_draw(segment_cdfs[segment], staple_rng.random((int(rows.sum()), STAPLES_PER_USER)))]
        staples[rows] = picks
    tail_cdf = _zipf_cdf(len(tail_items), TAIL_EXPONENT)
    general = tail_items[_draw(tail_cdf, staple_rng.random((spec.users, STAPLES_PER_USER)))]
    staples = np.where(own, staples, general)
    price = np.round(np.random.default_rng([spec.seed, 14]).lognormal(1.0, 0.8, spec.items), 2)
    return _Planted(user_segment=user_segment, user_cdf=user_cdf, loyalty=loyalty, churn_day=churn_day, postage_code=postage_code,
                    staples=staples, heroes=heroes, segment_items=segment_items, segment_cdfs=segment_cdfs,
                    tail_items=tail_items, tail_cdf=tail_cdf, price=price)


def _orders(spec: RealisticSpec, planted: _Planted, rng: np.random.Generator, count: int):
    """``count`` orders: (user, product basket size, second since the start)."""
    users = _draw(planted.user_cdf, rng.random(count))
    basket = 1 + rng.poisson(MEAN_BASKET - 1, count)
    day, hour = _days_and_hours(spec.start_epoch, spec.days, planted.churn_day[users], rng, count,
                                WEEKDAY_WEIGHTS, HOUR_WEIGHTS)
    seconds = day * 86_400 + hour * 3_600 + rng.integers(0, 3_600, count)
    return users, basket, seconds


def _generate_block(spec: RealisticSpec, planted: _Planted, block: int) -> dict[str, np.ndarray]:
    """One block's invoice lines as numpy columns (item_num < 0: the non-product code -item_num - 1)."""
    first = block * BLOCK_EVENTS
    size = min(BLOCK_EVENTS, spec.events - first)
    rng = np.random.default_rng([spec.seed, 200, block])
    mean_lines = MEAN_BASKET + POSTAGE_USERS * POSTAGE_ON_ORDER + MANUAL_ON_ORDER
    count = int(size / mean_lines * 1.5) + 16  # a Poisson total this far above its mean never happens
    users, basket, seconds = _orders(spec, planted, rng, count)

    postage = (planted.postage_code[users] >= 0) & (rng.random(count) < POSTAGE_ON_ORDER)
    extra = np.full((count, 4), -1, dtype=np.int64)  # non-product codes per order, -1: none
    extra[postage, 0] = planted.postage_code[users[postage]]
    extra[rng.random(count) < MANUAL_ON_ORDER, 1] = NON_PRODUCT_ITEMS.index("M")
    extra[rng.random(count) < CARRIAGE_ON_ORDER, 2] = NON_PRODUCT_ITEMS.index("C2")
    extra[rng.random(count) < BANK_CHARGES_ON_ORDER, 3] = NON_PRODUCT_ITEMS.index("BANK CHARGES")
    lines_per_order = basket + (extra >= 0).sum(axis=1)
    total = np.cumsum(lines_per_order)
    if total[-1] < size:
        raise RuntimeError(f"realistic sample block {block}: {total[-1]} lines drawn, {size} needed")
    needed = int(np.searchsorted(total, size)) + 1
    users, basket, seconds, extra = users[:needed], basket[:needed], seconds[:needed], extra[:needed]

    order = np.repeat(np.arange(needed), basket)  # product lines
    line_users = users[order]
    segments = planted.user_segment[line_users]
    items = np.empty(len(order), dtype=np.int64)
    kind = rng.random(len(order))
    hero = kind < HERO_SHARE
    staple = (kind >= HERO_SHARE) & (kind < HERO_SHARE + STAPLE_SHARE)
    rest = kind >= HERO_SHARE + STAPLE_SHARE
    in_segment = rest & (rng.random(len(order)) < planted.loyalty[line_users])
    tail = rest & ~in_segment
    items[hero] = planted.heroes[_draw(_zipf_cdf(HERO_ITEMS, 0.5), rng.random(int(hero.sum())))]
    items[staple] = planted.staples[line_users[staple], rng.integers(0, STAPLES_PER_USER, int(staple.sum()))]
    for segment in range(spec.segments):
        picks = in_segment & (segments == segment)
        items[picks] = planted.segment_items[segment][
            _draw(planted.segment_cdfs[segment], rng.random(int(picks.sum())))]
    items[tail] = planted.tail_items[_draw(planted.tail_cdf, rng.random(int(tail.sum())))]
    quantity = QUANTITIES[_draw(np.cumsum(QUANTITY_WEIGHTS), rng.random(len(order)))].astype(np.float64)
    quantity[staple] *= 2  # staples go by the dozen
    revenue = np.round(quantity * planted.price[items], 2)

    extra_order, extra_slot = np.nonzero(extra >= 0)
    codes = extra[extra_order, extra_slot]
    extra_quantity = np.ones(len(codes))
    extra_price = np.where(np.isin(codes, [0, 1]), np.where(codes == 0, 18.0, 40.0),
                           np.round(rng.lognormal(1.5, 1.0, len(codes)), 2))

    all_orders = np.concatenate([order, extra_order])
    position = np.argsort(all_orders, kind="stable")  # an order's lines together, non-product lines last
    item_num = np.concatenate([items, -codes - 1])[position]
    all_orders = all_orders[position]
    rows = slice(0, size)
    return {
        "line_num": np.arange(first, first + size, dtype=np.int64),
        "user_num": users[all_orders][rows].astype(np.int64),
        "item_num": item_num[rows],
        "epoch": (spec.start_epoch + seconds[all_orders])[rows].astype(np.int64),
        "order_num": (all_orders[rows] + block * 10_000_000).astype(np.int64),
        "quantity": np.concatenate([quantity, extra_quantity])[position][rows],
        "revenue": np.concatenate([revenue, extra_price])[position][rows],
    }


_BLOCK_SCHEMA = "line_num long, user_num long, item_num long, epoch long, order_num long, quantity double, revenue double"


def item_id_column(item_num: F.Column) -> F.Column:
    """Product numbers as i000042, negative numbers as their non-product code."""
    codes = F.array(*[F.lit(code) for code in NON_PRODUCT_ITEMS])
    return F.when(item_num >= 0, F.format_string("i%06d", item_num)).otherwise(
        F.element_at(codes, (-item_num).cast("int")))


def generate_events(spark: SparkSession, spec: RealisticSpec, partitions: int | None = None) -> DataFrame:
    """The invoice log in the columns of ``lib.sample.planted.generate_events`` (every row a purchase line)."""
    blocks = -(-spec.events // BLOCK_EVENTS)
    partitions = partitions or min(blocks, 64)

    def generate(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        planted = _planted(spec)
        for batch in batches:
            for block in batch.column("id").to_pylist():
                columns = _generate_block(spec, planted, block)
                yield pa.RecordBatch.from_arrays([pa.array(v) for v in columns.values()], names=list(columns))

    raw = spark.range(0, blocks, 1, partitions).mapInArrow(generate, _BLOCK_SCHEMA)
    return raw.select(
        F.format_string("rl-%d-%010d", F.lit(spec.seed), F.col("line_num")).alias("event_id"),
        F.format_string("u%07d", F.col("user_num")).alias("user_id"),
        item_id_column(F.col("item_num")).alias("item_id"),
        F.lit("purchase").alias("event_type"),
        F.timestamp_seconds(F.col("epoch")).alias("event_ts"),
        F.col("quantity"),
        F.col("revenue"),
        F.lit(None).cast("string").alias("campaign_id"),
        F.lit("web").alias("channel"),
    )


def planted_user_segments(spark: SparkSession, spec: RealisticSpec) -> DataFrame:
    """Ground truth: (user_id, segment_id) for every generated customer, computed in tasks."""
    return planted_segments_frame(spark, spec.users, lambda: _planted(spec).user_segment)


def planted_segment_items(spark: SparkSession, spec: RealisticSpec) -> DataFrame:
    """Ground truth: (segment_id, item_id, popularity_rank) of each segment's own items (as lib.sample.planted)."""
    planted = _planted(spec)
    rows = [(segment, f"i{item:06d}", rank) for segment, group in enumerate(planted.segment_items)
            for rank, item in enumerate(group.tolist())]
    return spark.createDataFrame(rows, "segment_id int, item_id string, popularity_rank int")


def planted_items(spark: SparkSession, spec: RealisticSpec) -> DataFrame:
    """Every item id with its planted kind: best_seller, segment (with segment_id), general or non_product."""
    planted = _planted(spec)
    rows = [(f"i{item:06d}", "best_seller", None) for item in planted.heroes.tolist()]
    rows += [(f"i{item:06d}", "segment", segment) for segment, group in enumerate(planted.segment_items)
             for item in group.tolist()]
    own = {f"i{item:06d}" for item in planted.heroes.tolist()} | {row[0] for row in rows}
    rows += [(f"i{item:06d}", "general", None) for item in range(spec.items) if f"i{item:06d}" not in own]
    rows += [(code, "non_product", None) for code in NON_PRODUCT_ITEMS]
    return spark.createDataFrame(rows, "item_id string, kind string, segment_id int")


def spec_from_settings(sample) -> RealisticSpec:
    """The spec from the [sample] settings (``email_campaigns`` does not apply: an invoice log has no emails)."""
    return RealisticSpec(users=sample.users, items=sample.items, events=sample.events, segments=sample.segments,
                         seed=sample.seed, days=sample.days, end_date=sample.end_date,
                         in_segment_share=sample.in_segment_share, churn_fraction=sample.churn_fraction)


def write_sample(spark: SparkSession, sample, root: str):
    """Write the realistic invoice log to ``<root>/events`` and its planted truth beside it
    (truth_user_segments, truth_segment_items as the planted generator writes them, and truth_items
    with each item's kind); the generate_events stage's result."""
    from lib.platform.runs import StageResult

    spec = spec_from_settings(sample)
    generate_events(spark, spec).write.mode("overwrite").parquet(f"{root}/events")
    planted_user_segments(spark, spec).write.mode("overwrite").parquet(f"{root}/truth_user_segments")
    planted_segment_items(spark, spec).write.mode("overwrite").parquet(f"{root}/truth_segment_items")
    planted_items(spark, spec).write.mode("overwrite").parquet(f"{root}/truth_items")
    return StageResult(rows_in=0, rows_out=spec.events, message=f"realistic sample written to {root}")
