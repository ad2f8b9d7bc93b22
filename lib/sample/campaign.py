"""A planted email campaign with a known effect, for the sample clickstream and the lift tests.

Given customers and a campaign: the variant of each customer is ``lib.campaign.holdout.assign_variant`` (the
same hash as build_audience); treatment customers get one ``email_send`` event carrying the campaign
id at ``send_ts``; every customer outside the global control buys the planted item within the window
with probability ``base_rate``, treatment customers with ``base_rate + lift``. So the campaign's true
absolute lift in conversion is ``lift`` among customers with no other purchase in the window (on the
sample, whose customers also buy on their own, the measured lift is ``lift x (1 - organic rate)``).

Every draw is a hash of (seed, campaign, user id): the events depend only on the arguments.
"""
from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.campaign.holdout import assign_variant
from lib.platform.settings import Settings

PLANTED_BASE_RATE = 0.04   # the sample's planted campaign (see sample_campaign_events)
PLANTED_LIFT = 0.08
PLANTED_ITEM = "i000000"
PLANTED_PRICE = 25.0
EVENT_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "event_ts", "quantity", "revenue", "campaign_id",
                 "channel")


def _uniform(seed: int, campaign_id: str, stream: str) -> F.Column:
    """A uniform [0, 1) number per user from a hash (independent per stream)."""
    bits = F.xxhash64(F.lit(seed), F.lit(campaign_id), F.lit(stream), F.col("user_id"))
    return (F.pmod(bits, F.lit(1 << 30)) / float(1 << 30)).cast("double")


def planted_campaign_events(users: DataFrame, campaign_id: str, *, salt: str, control_share: float,
                            holdout_share: float, send_ts: datetime, base_rate: float, lift: float,
                            window_days: int, item_id: str = PLANTED_ITEM, price: float = PLANTED_PRICE,
                            seed: int = 7) -> DataFrame:
    """email_send events (treatment) and purchases (base rate, plus ``lift`` for treatment) in the
    events input contract's columns. ``users``: a frame with user_id (duplicates dropped)."""
    if not (0.0 <= base_rate and 0.0 <= lift and base_rate + lift <= 1.0):
        raise ValueError(f"planted campaign rates must satisfy 0 <= base_rate, 0 <= lift, base_rate + lift <= 1; "
                         f"got {base_rate}, {lift}")
    people = users.select("user_id").where(F.col("user_id").isNotNull()).distinct().select(
        "user_id", assign_variant("user_id", campaign_id, salt, holdout_share, control_share).alias("variant"))
    start = F.lit(send_ts.astimezone(timezone.utc)).cast("timestamp")
    treated = F.col("variant") == "treatment"
    sends = people.where(treated).select(
        F.concat_ws("-", F.lit("planted"), F.lit(campaign_id), F.col("user_id"), F.lit("send")).alias("event_id"),
        "user_id", F.lit(item_id).alias("item_id"), F.lit("email_send").alias("event_type"),
        start.alias("event_ts"), F.lit(None).cast("double").alias("quantity"),
        F.lit(None).cast("double").alias("revenue"), F.lit(campaign_id).alias("campaign_id"),
        F.lit("email").alias("channel"))
    rate = F.lit(base_rate) + F.when(treated, F.lit(lift)).otherwise(F.lit(0.0))
    # A purchase between 1 hour after the send and 1 hour before the window closes.
    offset = (F.lit(3600) + _uniform(seed, campaign_id, "when") * (window_days * 86_400 - 7200)).cast("long")
    buys = people.where((F.col("variant") != "global_control") & (_uniform(seed, campaign_id, "buy") < rate)).select(
        F.concat_ws("-", F.lit("planted"), F.lit(campaign_id), F.col("user_id"), F.lit("buy")).alias("event_id"),
        "user_id", F.lit(item_id).alias("item_id"), F.lit("purchase").alias("event_type"),
        F.timestamp_seconds(F.unix_timestamp(start) + offset).alias("event_ts"), F.lit(1.0).alias("quantity"),
        F.lit(float(price)).alias("revenue"), F.lit(None).cast("string").alias("campaign_id"),
        F.lit("web").alias("channel"))
    return sends.unionByName(buys).select(*EVENT_COLUMNS)


def sample_campaign_events(users: DataFrame, settings: Settings) -> DataFrame:
    """The sample's planted campaign: the first enabled ``[campaigns.<name>]``, sent at 09:00 UTC
    ``campaign_report.conversion_window_days + 1`` days before ``sample.end_date`` (so its window lies
    inside the sample), at PLANTED_BASE_RATE and PLANTED_LIFT. Empty when no campaign is enabled."""
    campaigns = settings.enabled_campaigns
    window = settings.campaign_report.conversion_window_days
    if not campaigns:
        return users.sparkSession.createDataFrame(
            [], "event_id string, user_id string, item_id string, event_type string, event_ts timestamp, "
                "quantity double, revenue double, campaign_id string, channel string")
    name, campaign = next(iter(campaigns.items()))
    end = date.fromisoformat(settings.sample.end_date)
    send_ts = datetime.combine(end - timedelta(days=window + 1), time(9), timezone.utc)
    return planted_campaign_events(users, name, salt=settings.holdout.salt,
                                   control_share=settings.holdout.control_share,
                                   holdout_share=campaign.holdout_share, send_ts=send_ts,
                                   base_rate=PLANTED_BASE_RATE, lift=PLANTED_LIFT, window_days=window,
                                   seed=settings.sample.seed)
