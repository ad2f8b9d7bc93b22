"""Triggered audiences: customers whom an event of their own makes due for a flow email, with the items it is about.

A campaign with ``trigger`` set mails the customers its trigger finds in the ingested events up to ``now`` (the
run's clock: ``scores.as_of``, else the latest event), showing the trigger's items instead of a recommendation
list; everything else (filters, suppressions, contact policy, holdout, exports) is a campaign's. The windows:
``after_hours`` (the trigger event is at least this old: the customer had time to buy) and ``within_hours`` (and
at most this old: a week-old cart is not worth a reminder).

- ``abandoned_cart``: the customer's latest add_to_cart is in the window and no purchase of theirs followed it.
  Items: everything added since their last purchase, latest first. Any purchase after the add closes the cart
  (what the email platforms' abandoned-checkout flows do: an order exits the flow).
- ``browse_abandonment``: an item viewed at least ``min_views`` times in the last ``within_hours``, its latest view
  in the window, and no add_to_cart or purchase of it since the first of those views. Items: most viewed first.
- ``replenishment_due``: an item the customer bought on at least two days, due again (last purchase + their mean
  time between purchases of it) in the last ``within_hours``, and not bought since. Items: soonest due first.
- ``back_in_stock`` / ``price_drop``: between the catalog load in force at the previous build_audience run and the
  latest one (``products``' Delta history, ``compared_loads``), an item went from unavailable to available / its
  price went down, and the customer viewed or carted it in the last ``within_hours`` without buying it since.
  Items: the latest looked at first; a price drop's score is the share taken off.

``trigger_ts`` is the event that triggered (the latest add, the latest view, the due time; for a catalog change
the latest load's commit time). It is recorded with the send (``campaign_sends.trigger_ts``), and a customer is
triggered again only by a later event than the campaign answered (``answered``: recorded sends, and its ingested
email_send events): the same cart is not mailed twice, a cart changed since is.
"""
from __future__ import annotations

from datetime import date, datetime, timedelta

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from lib.campaign.contact_policy import SEND_EVENT
from lib.platform.settings import TRIGGERS

# The columns of a trigger's items: recommendations' columns (so campaign lists read them alike) and trigger_ts.
TRIGGER_ITEM_COLUMNS = ("user_id", "item_id", "rank", "score", "source", "strategy", "trigger_ts")


def _abandoned_cart(events: DataFrame, after: datetime, since: datetime) -> DataFrame:
    last_purchase = (events.where(F.col("event_type") == "purchase").groupBy("user_id")
                     .agg(F.max("event_ts").alias("_last_purchase")))
    open_lines = (events.where(F.col("event_type") == "add_to_cart")
                  .join(last_purchase, "user_id", "left")
                  .where(F.col("_last_purchase").isNull() | (F.col("event_ts") > F.col("_last_purchase"))))
    items = open_lines.groupBy("user_id", "item_id").agg(F.max("event_ts").alias("_order"),
                                                         F.count(F.lit(1)).cast("double").alias("score"))
    latest = F.max("_order").over(Window.partitionBy("user_id"))
    return (items.withColumn("trigger_ts", latest)
            .where((F.col("trigger_ts") <= F.lit(after)) & (F.col("trigger_ts") >= F.lit(since))))


def _browse_abandonment(events: DataFrame, after: datetime, since: datetime, min_views: int) -> DataFrame:
    views = (events.where((F.col("event_type") == "view") & (F.col("event_ts") >= F.lit(since)))
             .groupBy("user_id", "item_id")
             .agg(F.count(F.lit(1)).alias("_views"), F.min("event_ts").alias("_first"), F.max("event_ts").alias("_last")))
    acted = (events.where(F.col("event_type").isin("add_to_cart", "purchase"))
             .groupBy("user_id", "item_id").agg(F.max("event_ts").alias("_acted")))
    browsed = (views.join(acted, ["user_id", "item_id"], "left")
               .where((F.col("_views") >= min_views) & (F.col("_last") <= F.lit(after))
                      & (F.col("_acted").isNull() | (F.col("_acted") < F.col("_first")))))
    return browsed.select("user_id", "item_id", F.col("_views").cast("double").alias("score"),
                          F.struct("_views", "_last").alias("_order"),  # most viewed first, then the latest
                          F.max("_last").over(Window.partitionBy("user_id")).alias("trigger_ts"))


def _replenishment_due(events: DataFrame, now: datetime, since: datetime) -> DataFrame:
    bought = (events.where(F.col("event_type") == "purchase")
              .groupBy("user_id", "item_id")
              .agg(F.countDistinct(F.to_date("event_ts")).alias("_days"), F.min("event_ts").alias("_first"),
                   F.max("event_ts").alias("_last")))
    seconds = F.unix_timestamp("_last") - F.unix_timestamp("_first")
    due = F.timestamp_seconds(F.unix_timestamp("_last") + seconds / (F.col("_days") - 1))
    items = (bought.where(F.col("_days") >= 2).withColumn("_due", due)
             .where((F.col("_due") > F.lit(since)) & (F.col("_due") <= F.lit(now))))
    return items.select("user_id", "item_id", F.col("_days").cast("double").alias("score"),
                        (-F.unix_timestamp("_due")).alias("_order"),  # soonest due first
                        F.max("_due").over(Window.partitionBy("user_id")).alias("trigger_ts"))


CATALOG_TRIGGERS = ("back_in_stock", "price_drop")


def _catalog_change(events: DataFrame, trigger: str, since: datetime, before: DataFrame, after: DataFrame,
                    changed_at: datetime) -> DataFrame:
    was = before.select("item_id", F.col("available").alias("_was"), F.col("price").alias("_was_price"))
    now = after.select("item_id", F.col("available").alias("_now"), F.col("price").alias("_now_price"))
    joined = now.join(was, "item_id")
    if trigger == "back_in_stock":
        changed = joined.where(~F.col("_was") & F.col("_now")).select("item_id", F.lit(1.0).alias("score"))
    else:
        changed = joined.where(F.col("_now_price") < F.col("_was_price")).select(
            "item_id", ((F.col("_was_price") - F.col("_now_price")) / F.col("_was_price")).alias("score"))
    looked = (events.where(F.col("event_type").isin("view", "add_to_cart") & (F.col("event_ts") >= F.lit(since)))
              .groupBy("user_id", "item_id").agg(F.max("event_ts").alias("_order")))
    bought = (events.where(F.col("event_type") == "purchase").groupBy("user_id", "item_id")
              .agg(F.max("event_ts").alias("_bought")))
    return (looked.join(F.broadcast(changed), "item_id").join(bought, ["user_id", "item_id"], "left")
            .where(F.col("_bought").isNull() | (F.col("_bought") < F.col("_order")))
            .withColumn("trigger_ts", F.lit(changed_at)))


# Delta operations that change a table's rows (others, such as SET TBLPROPERTIES or OPTIMIZE, are not a load).
_DATA_WRITES = ("WRITE", "CREATE TABLE AS SELECT", "REPLACE TABLE AS SELECT", "CREATE OR REPLACE TABLE AS SELECT",
                "CREATE TABLE", "REPLACE TABLE", "CREATE OR REPLACE TABLE", "TRUNCATE", "MERGE", "UPDATE", "DELETE",
                "STREAMING UPDATE")


def catalog_loads(history: list[tuple[int, datetime, str, str, int | None]]) -> list[tuple[int, datetime]]:
    """(version, commit time) of each catalog load in a products table's Delta ``history`` rows (version, commit
    time, operation, userMetadata, the version a RESTORE went back to: None when it went back to a time), oldest
    first. One run's commits (tagged alike by jobs.common.run_stage) are one load, its latest commit standing for
    it; a RESTORE undoes the loads after its version (all of them, for a time)."""
    loads: list[tuple[int, datetime, str]] = []
    for version, committed, operation, tag, restored_to in sorted(history):
        if operation == "RESTORE":
            loads = [load for load in loads if restored_to is not None and load[0] <= restored_to]
        elif operation in _DATA_WRITES:
            if loads and tag and loads[-1][2] == tag:
                loads[-1] = (version, committed, tag)  # the same run's later commit
            else:
                loads.append((version, committed, tag))
    return [(version, committed) for version, committed, _ in loads]


def compared_loads(loads: list[tuple[int, datetime]], since: datetime | None) -> tuple[int, int, datetime] | None:
    """(baseline version, latest version, the latest load's commit time) of ``catalog_loads``: the baseline is
    the load in force at ``since`` (the start of the last build_audience run before the latest load, so loads in
    between are not missed and a re-run compares as the first run did), else the load before the latest. None
    without a baseline or when nothing was loaded after it."""
    if since is None:
        baseline = loads[-2] if len(loads) >= 2 else None
    else:
        earlier = [load for load in loads if load[1] <= since]
        baseline = earlier[-1] if earlier else None
    if baseline is None or baseline[0] == loads[-1][0]:
        return None
    return baseline[0], loads[-1][0], loads[-1][1]


def answered(sends: DataFrame | None, events: DataFrame, campaign: str, today: date) -> DataFrame:
    """(user_id, trigger_ts) a campaign has answered: the trigger events its sends of days before ``today``
    recorded (``campaign_sends``; today's rows are the day's plan, which a re-run replaces) and the times of its
    ingested email_send events (a trigger event before a send of the campaign was answered by it, whatever
    a re-run later planned)."""
    mailed = (events.where((F.col("event_type") == SEND_EVENT) & (F.col("campaign_id") == campaign))
              .select("user_id", F.col("event_ts").alias("trigger_ts")))
    if sends is None or "trigger_ts" not in sends.columns:  # none yet, or written before triggers existed
        return mailed
    recorded = sends.where((F.col("campaign_id") == campaign) & (F.col("send_date") < F.lit(today)))
    return recorded.select("user_id", "trigger_ts").unionByName(mailed)


def triggered_items(events: DataFrame, trigger: str, list_name: str, now: datetime, after_hours: int,
                    within_hours: int, min_views: int = 2, already: DataFrame | None = None,
                    catalog: tuple[DataFrame, DataFrame, datetime] | None = None) -> DataFrame:
    """Per triggered customer, the trigger's items (``TRIGGER_ITEM_COLUMNS``; ``strategy`` = ``list_name``,
    ``source`` = the trigger, ``rank`` 1.. in the trigger's order, ``score`` the adds / views / purchase days
    behind the item) from ``events`` up to ``now``. ``already``: (user_id, trigger_ts) the campaign answered
    (``answered``); a customer whose trigger_ts is not later than their latest is left out. ``catalog``:
    (baseline products, latest products, the latest load's commit time), which the catalog triggers need."""
    if trigger not in TRIGGERS:
        raise ValueError(f"unknown trigger '{trigger}': one of {', '.join(TRIGGERS)}")
    seen = events.where(F.col("event_ts") <= F.lit(now)).select("user_id", "item_id", "event_type", "event_ts")
    after, since = now - timedelta(hours=after_hours), now - timedelta(hours=within_hours)
    if trigger == "abandoned_cart":
        items = _abandoned_cart(seen, after, since)
    elif trigger == "browse_abandonment":
        items = _browse_abandonment(seen, after, since, min_views)
    elif trigger == "replenishment_due":
        items = _replenishment_due(seen, now, since)
    elif catalog is None:
        raise ValueError(f"{trigger} needs the previous and the latest catalog load")
    else:
        items = _catalog_change(seen, trigger, since, *catalog)
    if already is not None:
        sent = already.where(F.col("trigger_ts").isNotNull()).groupBy("user_id").agg(F.max("trigger_ts").alias("_sent"))
        items = items.join(sent, "user_id", "left").where(F.col("_sent").isNull() | (F.col("trigger_ts") > F.col("_sent")))
    rank = F.row_number().over(Window.partitionBy("user_id").orderBy(F.col("_order").desc(), F.col("item_id")))
    return items.select("user_id", "item_id", rank.alias("rank"), "score", F.lit(trigger).alias("source"),
                        F.lit(list_name).alias("strategy"), "trigger_ts")
