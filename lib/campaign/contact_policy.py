"""The contact policy: how often a customer may be mailed across campaigns, and which campaign gets a
customer several want.

Sends are counted by day. A customer's sends are the ingested ``email_send`` events plus the sends
earlier runs planned (``campaign_sends``) that the events do not hold yet: a treatment row dated after
the events' last ``email_send`` day (the email platform has not reported it back), and every holdout and
global-control row. Those two arms are never mailed; counting the send they stand in for caps them as
their treatment counterparts are capped, so the caps do not tilt a holdout read-out.

Rules, checked in this order (the first that binds is recorded):

- ``max_sends``: at most ``max_sends`` sends in any ``per_days`` days, today's included, so a customer
  with ``max_sends`` sends in the ``per_days - 1`` days before today or earlier today is capped;
- ``cooldown``: no send within ``cooldown_days`` days after the last one (last send day > today - cooldown).

Arbitration ``priority``: campaigns take customers in order of priority (highest first, ties by campaign
id); a campaign takes its audience (cut to its ``max_audience``) from the customers no earlier campaign
took, so one a higher campaign's cut left out falls through to the next. Each customer gets at most one
campaign per run. ``none``: every campaign a customer qualifies for.
"""
from __future__ import annotations

from datetime import date, timedelta

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.platform.settings import CampaignSettings, ContactPolicySettings

SEND_EVENT = "email_send"
CAPPED_COLUMNS = ("campaign_id", "user_id", "rule", "detail")


def caps_apply(policy: ContactPolicySettings) -> bool:
    """True when a rule reads the send history (a cap or a cooldown is set)."""
    return policy.max_sends > 0 or policy.cooldown_days > 0


def send_history(events: DataFrame | None, planned: DataFrame | None, today: date) -> DataFrame:
    """(user_id, send_date) of every send up to ``today``: ingested email_send events (today's included)
    and ``planned`` (campaign_sends) rows of days before today that the events do not hold (module
    docstring); a day's sends of several campaigns are several rows."""
    parts = []
    if events is not None:
        parts.append(events.where((F.col("event_type") == SEND_EVENT) & (F.col("event_date") <= F.lit(today)))
                     .select("user_id", F.col("event_date").alias("send_date")))
    if planned is not None:
        earlier = planned.where(F.col("send_date") < F.lit(today))
        if events is not None:
            reported = events.where(F.col("event_type") == SEND_EVENT).agg(F.max("event_date").alias("_reported"))
            earlier = (earlier.crossJoin(F.broadcast(reported))
                       .where((F.col("variant") != "treatment") | F.col("_reported").isNull()
                              | (F.col("send_date") > F.col("_reported"))))
        parts.append(earlier.select("user_id", "send_date"))
    if not parts:
        raise ValueError("send_history needs the events or the planned sends")
    history = parts[0]
    for part in parts[1:]:
        history = history.unionByName(part)
    return history.where(F.col("user_id").isNotNull())


def over_policy(history: DataFrame, policy: ContactPolicySettings, today: date) -> DataFrame:
    """(user_id, rule, detail): the customers a cap keeps out today, with the first rule that binds."""
    window_start = today - timedelta(days=policy.per_days - 1)
    per_user = history.groupBy("user_id").agg(
        F.sum((F.col("send_date") >= F.lit(window_start)).cast("int")).alias("_in_window"),
        F.max("send_date").alias("_last"))
    by_count = (F.col("_in_window") >= policy.max_sends) if policy.max_sends > 0 else F.lit(False)
    by_cooldown = ((F.col("_last") > F.lit(today - timedelta(days=policy.cooldown_days)))
                   if policy.cooldown_days > 0 else F.lit(False))
    rule = F.when(by_count, F.lit("max_sends")).when(by_cooldown, F.lit("cooldown"))
    detail = (F.when(by_count, F.format_string(f"%d sends in the {policy.per_days} days to {today}", "_in_window"))
              .when(by_cooldown, F.format_string(f"last send %s, cooldown {policy.cooldown_days} days",
                                                 F.col("_last").cast("string"))))
    return per_user.select("user_id", rule.alias("rule"), detail.alias("detail")).where(F.col("rule").isNotNull())


def priority_order(campaigns: dict[str, CampaignSettings]) -> list[str]:
    """Campaign ids in the order they take customers: highest priority first, ties by id."""
    return sorted(campaigns, key=lambda name: (-campaigns[name].priority, name))


def capped_rows(candidates: DataFrame, over: DataFrame, campaign_id: str) -> DataFrame:
    """The CAPPED_COLUMNS rows of one campaign's ``candidates`` (with user_id) that ``over`` keeps out."""
    return candidates.select("user_id").join(over, "user_id").select(F.lit(campaign_id).alias("campaign_id"),
                                                                      "user_id", "rule", "detail")


def taken_rows(candidates: DataFrame, taken: DataFrame, campaign_id: str) -> DataFrame:
    """The CAPPED_COLUMNS rows of one campaign's ``candidates`` that an earlier campaign took
    (``taken``: user_id, taken_by): rule arbitration, detail the campaign that has them."""
    return candidates.select("user_id").join(taken, "user_id").select(
        F.lit(campaign_id).alias("campaign_id"), "user_id", F.lit("arbitration").alias("rule"),
        F.col("taken_by").alias("detail"))
