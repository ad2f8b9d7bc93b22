"""Triggered audiences on a few events each: who is triggered, with which items in which order, and when not."""
from __future__ import annotations

from datetime import date, datetime

import pytest

from jobs.common import load_settings
from lib.campaign.triggers import TRIGGER_ITEM_COLUMNS, answered, catalog_loads, compared_loads, triggered_items
from lib.platform.config import ConfigError

NOW = datetime(2026, 10, 31, 12, 0)


def load_settings_with(*sets: str):
    return load_settings([], list(sets))


def events(spark, rows):
    return spark.createDataFrame([(u, i, t, datetime.fromisoformat(ts)) for u, i, t, ts in rows],
                                 "user_id string, item_id string, event_type string, event_ts timestamp")


def lists(frame) -> dict[str, list[tuple]]:
    """user -> [(rank, item, score)] and the user's trigger_ts, from triggered_items' rows."""
    assert tuple(frame.columns) == TRIGGER_ITEM_COLUMNS
    out: dict[str, list] = {}
    for row in frame.orderBy("user_id", "rank").collect():
        out.setdefault(row["user_id"], []).append((row["rank"], row["item_id"], row["score"], row["trigger_ts"]))
    return out


def test_an_abandoned_cart_triggers_once_and_a_purchase_closes_it(spark):
    df = events(spark, [
        ("u1", "i1", "add_to_cart", "2026-10-30T10:00"), ("u1", "i2", "add_to_cart", "2026-10-31T06:00"),
        ("u2", "i1", "add_to_cart", "2026-10-30T10:00"), ("u2", "i9", "purchase", "2026-10-30T12:00"),  # bought
        ("u3", "i1", "purchase", "2026-10-29T00:00"), ("u3", "i3", "add_to_cart", "2026-10-31T10:00"),  # 2 h: too fresh
        ("u4", "i1", "add_to_cart", "2026-10-25T00:00"),  # older than 72 h
        ("u5", "i1", "add_to_cart", "2026-10-28T00:00"), ("u5", "i1", "purchase", "2026-10-29T00:00"),
        ("u5", "i4", "add_to_cart", "2026-10-30T20:00"), ("u5", "i4", "add_to_cart", "2026-10-30T21:00"),
        ("u6", "i1", "add_to_cart", "2026-10-31T13:00"),  # after now: not seen yet
    ])
    got = lists(triggered_items(df, "abandoned_cart", "trigger:cart", NOW, 4, 72))
    assert got == {
        "u1": [(1, "i2", 1.0, datetime(2026, 10, 31, 6)), (2, "i1", 1.0, datetime(2026, 10, 31, 6))],
        "u5": [(1, "i4", 2.0, datetime(2026, 10, 30, 21))],  # only what was added after the last purchase
    }
    rows = triggered_items(df, "abandoned_cart", "trigger:cart", NOW, 4, 72).collect()
    assert {(r["source"], r["strategy"]) for r in rows} == {("abandoned_cart", "trigger:cart")}

    # An earlier send answered u5's cart and an older one of u1's: the same cart never sends twice, a changed one does.
    already = spark.createDataFrame([("u5", datetime(2026, 10, 30, 21)), ("u1", datetime(2026, 10, 30, 10))],
                                    "user_id string, trigger_ts timestamp")
    assert set(lists(triggered_items(df, "abandoned_cart", "trigger:cart", NOW, 4, 72, already=already))) == {"u1"}


def test_browse_abandonment_needs_repeated_views_and_no_cart_since(spark):
    df = events(spark, [
        *[("u6", "i1", "view", f"2026-10-30T0{h}:00") for h in (1, 2, 3)], ("u6", "i2", "view", "2026-10-30T04:00"),
        ("u6", "i3", "view", "2026-10-30T05:00"), ("u6", "i3", "view", "2026-10-30T06:00"),  # fewer views, later
        ("u7", "i1", "view", "2026-10-30T01:00"), ("u7", "i1", "view", "2026-10-30T02:00"),
        ("u7", "i1", "add_to_cart", "2026-10-30T03:00"),  # carted after looking: not abandoned browsing
        ("u8", "i1", "view", "2026-10-31T09:00"), ("u8", "i1", "view", "2026-10-31T11:00"),  # still browsing (1 h ago)
        ("u9", "i1", "add_to_cart", "2026-10-20T00:00"),  # an old cart, before the views
        ("u9", "i1", "view", "2026-10-30T01:00"), ("u9", "i1", "view", "2026-10-30T05:00"),
        ("u10", "i1", "view", "2026-10-20T01:00"), ("u10", "i1", "view", "2026-10-30T05:00"),  # one view in 72 h
    ])
    assert lists(triggered_items(df, "browse_abandonment", "trigger:browse", NOW, 4, 72, min_views=2)) == {
        "u6": [(1, "i1", 3.0, datetime(2026, 10, 30, 6)), (2, "i3", 2.0, datetime(2026, 10, 30, 6))],  # i2: one view
        "u9": [(1, "i1", 2.0, datetime(2026, 10, 30, 5))],
    }


def test_replenishment_is_due_after_the_customers_own_interval(spark):
    df = events(spark, [
        ("u10", "i1", "purchase", "2026-10-01T00:00"), ("u10", "i1", "purchase", "2026-10-15T00:00"),  # due 10-29
        ("u10", "i2", "purchase", "2026-10-10T00:00"), ("u10", "i2", "purchase", "2026-10-20T00:00"),  # due 10-30
        ("u11", "i1", "purchase", "2026-10-01T00:00"), ("u11", "i1", "purchase", "2026-10-25T00:00"),  # due 11-18
        ("u12", "i1", "purchase", "2026-10-01T00:00"),  # once: no interval
        ("u13", "i1", "purchase", "2026-10-01T00:00"), ("u13", "i1", "purchase", "2026-10-01T09:00"),  # one day
        ("u14", "i1", "purchase", "2026-09-01T00:00"), ("u14", "i1", "purchase", "2026-09-15T00:00"),  # due 09-29: lapsed
    ])
    assert lists(triggered_items(df, "replenishment_due", "trigger:refill", NOW, 4, 72)) == {
        "u10": [(1, "i1", 2.0, datetime(2026, 10, 30)), (2, "i2", 2.0, datetime(2026, 10, 30))],  # soonest due first
    }


def test_back_in_stock_and_price_drop_compare_two_catalog_loads(spark):
    catalog = "item_id string, available boolean, price double"
    before = spark.createDataFrame([("i1", False, 10.0), ("i2", True, 20.0), ("i3", True, 30.0), ("i4", False, 5.0)],
                                   catalog)
    after = spark.createDataFrame([("i1", True, 10.0), ("i2", True, 15.0), ("i3", True, 30.0), ("i4", False, 4.0)],
                                  catalog)
    loaded = datetime(2026, 10, 31, 3)
    df = events(spark, [
        ("u1", "i1", "view", "2026-10-30T10:00"), ("u1", "i2", "add_to_cart", "2026-10-30T11:00"),
        ("u2", "i1", "view", "2026-10-30T10:00"), ("u2", "i1", "purchase", "2026-10-30T12:00"),  # bought it anyway
        ("u3", "i3", "view", "2026-10-30T10:00"),  # unchanged item
        ("u4", "i1", "view", "2026-10-20T10:00"),  # looked too long ago
        ("u5", "i4", "view", "2026-10-30T10:00"),  # cheaper, still unavailable: a price drop all the same
    ])
    back = triggered_items(df, "back_in_stock", "trigger:back", NOW, 0, 72, catalog=(before, after, loaded))
    assert lists(back) == {"u1": [(1, "i1", 1.0, loaded)]}
    drop = triggered_items(df, "price_drop", "trigger:drop", NOW, 0, 72, catalog=(before, after, loaded))
    assert lists(drop) == {"u1": [(1, "i2", 0.25, loaded)], "u5": [(1, "i4", pytest.approx(0.2), loaded)]}
    with pytest.raises(ValueError, match="price_drop needs the previous and the latest catalog load"):
        triggered_items(df, "price_drop", "trigger:drop", NOW, 0, 72)


def test_catalog_loads_are_runs_of_data_writes_and_a_restore_undoes_them():
    at = [datetime(2026, 10, day) for day in range(1, 10)]
    history = [(0, at[0], "WRITE", "r1:ingest_products", None), (1, at[1], "SET TBLPROPERTIES", "", None),
               (2, at[2], "WRITE", "r2:ingest_products", None), (3, at[3], "WRITE", "r2:ingest_products", None)]
    assert catalog_loads(history[:1]) == [(0, at[0])] and compared_loads(catalog_loads(history[:1]), None) is None
    assert catalog_loads(history) == [(0, at[0]), (3, at[3])]  # one run's two commits are one load
    three = history + [(4, at[4], "CREATE OR REPLACE TABLE AS SELECT", "r3:ingest_products", None)]
    assert compared_loads(catalog_loads(three), None) == (3, 4, at[4])
    # The last build_audience ran between the first and the second load: both later loads are compared with it.
    assert compared_loads(catalog_loads(three), datetime(2026, 10, 2)) == (0, 4, at[4])
    assert compared_loads(catalog_loads(three), datetime(2026, 10, 6)) is None  # nothing loaded since
    assert catalog_loads(three + [(5, at[5], "RESTORE", "", 3)]) == [(0, at[0]), (3, at[3])]
    assert catalog_loads(three + [(5, at[5], "RESTORE", "", None)]) == []  # restored to a time: start again
    untagged = [(0, at[0], "WRITE", "", None), (1, at[1], "WRITE", "", None)]
    assert compared_loads(catalog_loads(untagged), None) == (0, 1, at[1])  # untagged: a load each


def test_a_campaign_answered_its_recorded_triggers_and_whatever_its_sends_followed(spark):
    sends = spark.createDataFrame([
        (date(2026, 10, 29), "cart", "u1", datetime(2026, 10, 28, 20)),
        (date(2026, 10, 31), "cart", "u2", datetime(2026, 10, 30, 20)),  # today's plan: a re-run replaces it
        (date(2026, 10, 29), "other", "u3", datetime(2026, 10, 28, 20)),
    ], "send_date date, campaign_id string, user_id string, trigger_ts timestamp")
    df = spark.createDataFrame([
        ("u4", "i1", "email_send", datetime(2026, 10, 31, 8), "cart"), ("u5", "i1", "email_send", datetime(2026, 10, 31, 8), "news"),
        ("u6", "i1", "view", datetime(2026, 10, 31, 8), "cart")],
        "user_id string, item_id string, event_type string, event_ts timestamp, campaign_id string")
    got = {(r["user_id"], r["trigger_ts"]) for r in answered(sends, df, "cart", date(2026, 10, 31)).collect()}
    assert got == {("u1", datetime(2026, 10, 28, 20)), ("u4", datetime(2026, 10, 31, 8))}
    assert {r["user_id"] for r in answered(None, df, "cart", date(2026, 10, 31)).collect()} == {"u4"}


def test_trigger_settings_name_their_key():
    cart = load_settings_with("campaigns.cart.trigger=browse_abandonment", "campaigns.cart.priority=20")
    assert cart.campaigns["cart"].list_name == "trigger:cart"
    assert cart.campaigns["weekly_newsletter"].list_name == "blended"
    shipped = cart.campaigns["abandoned_cart"]  # off until enabled
    assert (shipped.enabled, shipped.trigger, shipped.priority) == (False, "abandoned_cart", 20)
    for assignment, message in [
        ("campaigns.cart.trigger=wishlist", "'campaigns.cart.trigger' must be one of abandoned_cart"),
        ("campaigns.cart.trigger_after_hours=80", "'campaigns.cart.trigger_after_hours' must be below"),
        ("campaigns.cart.trigger_min_views=0", "'campaigns.cart.trigger_min_views'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_settings_with(assignment)
    with pytest.raises(ConfigError, match="'campaigns.cart.trigger' abandoned_cart reads add_to_cart and purchase"):
        load_settings_with("campaigns.cart.trigger=abandoned_cart",  # the shipped one, off, is not checked
                           'ingest.event_types=["view", "purchase", "email_send", "email_open", "email_click"]')
