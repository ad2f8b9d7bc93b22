"""A small, seeded repeat-purchase generator: staple items re-bought at item-specific intervals, plus
exploration purchases, in the events table's columns (every event a ``purchase``).

It exists to test replenishment ("buy it again") and blended lists, which the clickstream generator
(``lib.sample.planted``) cannot: there no user re-buys anything on a schedule. The shape follows what a
repeat-purchase retailer's invoice log shows:

- every item has a typical repurchase interval (``min_interval_days`` .. ``max_interval_days``);
- every user has 0 .. ``max_staples`` staples, drawn mostly from their segment's items, each re-bought
  about every interval (+- ``jitter`` of it); some staples start part-way through the period and
  some stop before its end (the user switched), so "most bought ever" is not "bought next";
- every user also makes exploration purchases of items of their segment (``in_segment_share``) or of
  any item, skewed towards popular ones: the new items a discovery list can learn from co-buyers;
- optionally ``postage_share`` of the purchases carry a ``POST`` line (a non-product line, as real
  invoice logs have), to test catalog exclusions.

Users differ in staples and exploration, so the share of repeat purchases differs per user.
Everything is column expressions over ``spark.range``; random draws are hashes of (seed, ids, salt),
so the output does not depend on partitioning.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

POSTAGE_ID = "POST"


@dataclass(frozen=True)
class RepeatSpec:
    """What to generate; every field has a small default fit for a test."""

    users: int = 1500
    items: int = 200
    days: int = 180
    segments: int = 5
    max_staples: int = 6
    min_interval_days: int = 7
    max_interval_days: int = 45
    jitter: float = 0.2
    staple_stop_share: float = 0.35     # staples the user stops buying part-way through
    staple_late_share: float = 0.3      # staples the user starts buying part-way through
    explore_mean: float = 10.0          # mean exploration purchases per user over the period
    in_segment_share: float = 0.8       # staples and explorations drawn from the user's segment's items
    postage_share: float = 0.0          # share of purchases with a POSTAGE_ID line beside them
    seed: int = 11
    end_date: str = "2026-10-31"

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 2 * self.segments or self.segments < 1 or self.days < 1:
            raise ValueError(f"RepeatSpec needs users >= 1, segments >= 1, items >= 2 * segments, days >= 1: {self}")
        if not 1 <= self.min_interval_days <= self.max_interval_days:
            raise ValueError("RepeatSpec needs 1 <= min_interval_days <= max_interval_days")
        for name in ("jitter", "staple_stop_share", "staple_late_share", "in_segment_share", "postage_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"RepeatSpec.{name} must be in [0, 1]")


def _uniform(seed: int, salt: str, *columns: Column) -> Column:
    """A deterministic draw in [0, 1) from a hash of the seed, a salt and the columns."""
    return (F.pmod(F.xxhash64(F.lit(seed), F.lit(salt), *columns), F.lit(1 << 30)) / float(1 << 30))


def _pick_item(spec: RepeatSpec, segment: Column, *keys: Column, salt: str) -> Column:
    """An item number: from ``segment``'s items (item % segments) with probability in_segment_share,
    else from all items; the position in the pool is skewed towards small numbers (popular items)."""
    per_segment = spec.items // spec.segments
    skew = lambda u: F.pow(u, F.lit(2.0))  # noqa: E731 - P(position) falls with position
    in_segment = _uniform(spec.seed, salt + "-in", *keys) < spec.in_segment_share
    position = F.floor(skew(_uniform(spec.seed, salt + "-pos", *keys)) * per_segment).cast("long")
    anywhere = F.floor(skew(_uniform(spec.seed, salt + "-any", *keys)) * spec.items).cast("long")
    return F.when(in_segment, segment + F.lit(spec.segments) * position).otherwise(anywhere)


def item_interval_days(spec: RepeatSpec, item: Column) -> Column:
    """The planted repurchase interval of item number ``item`` (days)."""
    span = spec.max_interval_days - spec.min_interval_days
    return F.lit(float(spec.min_interval_days)) + F.floor(_uniform(spec.seed, "interval", item) * (span + 1))


def generate_repeat_purchases(spark: SparkSession, spec: RepeatSpec = RepeatSpec(), partitions: int = 2) -> DataFrame:
    """Purchase events (event_id, user_id, item_id, event_type, event_ts, quantity, revenue,
    campaign_id, channel) over the ``spec.days`` days before ``spec.end_date``."""
    end = datetime.fromisoformat(spec.end_date).replace(tzinfo=timezone.utc)
    start_seconds = (end - timedelta(days=spec.days)).timestamp()
    seed, days = spec.seed, float(spec.days)
    users = spark.range(0, spec.users, numPartitions=partitions).select(
        F.col("id").alias("u"),
        F.pmod(F.xxhash64(F.lit(seed), F.lit("segment"), F.col("id")), F.lit(spec.segments)).alias("segment"),
        # Staple counts 0..max_staples and exploration counts vary per user: repeat shares differ.
        F.floor(_uniform(seed, "staples", F.col("id")) * (spec.max_staples + 1)).cast("int").alias("n_staples"),
        F.floor(F.lit(1.0) + _uniform(seed, "explore", F.col("id")) * (2.0 * spec.explore_mean - 1.0))
        .cast("int").alias("n_explore"),
    )

    # Staples: (user, item) with a first purchase, an optional stop, re-bought every interval.
    staples = (
        users.where(F.col("n_staples") > 0)
        .select("u", "segment", F.explode(F.sequence(F.lit(0), F.col("n_staples") - 1)).alias("s"))
        .withColumn("item", _pick_item(spec, F.col("segment"), F.col("u"), F.col("s"), salt="staple"))
        .dropDuplicates(["u", "item"])
        .withColumn("interval", item_interval_days(spec, F.col("item")))
        .withColumn("begin", F.when(_uniform(seed, "late", F.col("u"), F.col("item")) < spec.staple_late_share,
                                    _uniform(seed, "late-at", F.col("u"), F.col("item")) * days * 0.6)
                    .otherwise(F.lit(0.0)))
        .withColumn("stop", F.when(_uniform(seed, "stop", F.col("u"), F.col("item")) < spec.staple_stop_share,
                                   F.col("begin") + _uniform(seed, "stop-at", F.col("u"), F.col("item"))
                                   * (F.lit(days) - F.col("begin")))
                    .otherwise(F.lit(days)))
        .withColumn("first", F.col("begin") + _uniform(seed, "phase", F.col("u"), F.col("item")) * F.col("interval"))
    )
    max_repeats = int(spec.days / spec.min_interval_days) + 2
    staple_buys = (
        staples.select("u", "segment", "item", "interval", "first", "stop",
                       F.explode(F.sequence(F.lit(0), F.lit(max_repeats))).alias("k"))
        .withColumn("day", F.col("first") + F.col("k") * F.col("interval")
                    + (_uniform(seed, "jitter", F.col("u"), F.col("item"), F.col("k")) * 2.0 - 1.0)
                    * F.lit(spec.jitter) * F.col("interval"))
        .where((F.col("day") >= 0) & (F.col("day") < F.col("stop")))
        .select("u", "item", "day", F.lit("s").alias("kind"), "k")
    )

    explore_buys = (
        users.select("u", "segment", F.explode(F.sequence(F.lit(1), F.col("n_explore"))).alias("k"))
        .select("u", _pick_item(spec, F.col("segment"), F.col("u"), F.col("k"), salt="explore").alias("item"),
                (_uniform(seed, "explore-day", F.col("u"), F.col("k")) * days).alias("day"),
                F.lit("e").alias("kind"), "k")
    )
    buys = staple_buys.unionByName(explore_buys).withColumn(
        "item_id", F.format_string("i%05d", F.col("item")))
    if spec.postage_share > 0:
        postage = buys.where(_uniform(seed, "postage", F.col("u"), F.col("item"), F.col("day")) < spec.postage_share) \
            .withColumn("item_id", F.lit(POSTAGE_ID)).withColumn("kind", F.lit("p"))
        buys = buys.unionByName(postage)
    timestamp = F.timestamp_seconds(F.lit(start_seconds) + F.col("day") * 86_400.0)
    return buys.select(
        F.sha2(F.concat_ws("|", F.lit(seed), "u", "item_id", "kind", "k", "day"), 256).alias("event_id"),
        F.format_string("u%06d", F.col("u")).alias("user_id"),
        "item_id",
        F.lit("purchase").alias("event_type"),
        timestamp.alias("event_ts"),
        F.lit(1.0).alias("quantity"),
        F.lit(None).cast("double").alias("revenue"),
        F.lit(None).cast("string").alias("campaign_id"),
        F.lit(None).cast("string").alias("channel"),
    )
