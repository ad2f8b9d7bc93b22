"""The contact policy across campaigns: which sends count, which rule binds, and which campaign gets a
customer several want. Local Spark on a few hand-made rows, exact rows out."""
from __future__ import annotations

from datetime import date

import pytest

from lib.campaign.audience import AudienceInputs, programme_audience
from lib.campaign.contact_policy import over_policy, priority_order, send_history
from lib.platform.config import ConfigError
from lib.platform.settings import CampaignSettings, ContactPolicySettings
from jobs.common import load_settings

TODAY = date(2026, 10, 30)
NO_CAPS = ContactPolicySettings(max_sends=0, per_days=7, cooldown_days=0, arbitration="priority")


def test_sends_are_the_events_and_the_planned_sends_they_do_not_hold_yet(spark):
    events = spark.createDataFrame(
        [("u1", "email_send", date(2026, 10, 28)), ("u1", "view", date(2026, 10, 29)),
         ("u5", "email_send", date(2026, 10, 30)), ("u6", "email_send", date(2026, 10, 31))],
        "user_id string, event_type string, event_date date")
    planned = spark.createDataFrame(
        [("u1", "treatment", date(2026, 10, 28)),   # the events hold it (their last email_send day is later)
         ("u2", "treatment", date(2026, 10, 30)),   # today's own plan: replaced by this run, not counted
         ("u3", "holdout", date(2026, 10, 25)),     # never mailed: stands in for the send
         ("u4", "global_control", date(2026, 10, 29))],
        "user_id string, variant string, send_date date")
    rows = sorted(tuple(r) for r in send_history(events, planned, TODAY).collect())
    assert rows == [("u1", date(2026, 10, 28)), ("u3", date(2026, 10, 25)), ("u4", date(2026, 10, 29)),
                    ("u5", date(2026, 10, 30))]  # u6's send is after the run's day
    # Events that stop earlier leave a later treatment plan counted: the platform has not reported it yet.
    late = spark.createDataFrame([("u7", "treatment", date(2026, 10, 29))], "user_id string, variant string, "
                                 "send_date date")
    old_events = events.where("event_date <= '2026-10-28'")
    assert [tuple(r) for r in send_history(old_events, late, TODAY).where("user_id = 'u7'").collect()] == [
        ("u7", date(2026, 10, 29))]
    assert sorted(tuple(r) for r in send_history(None, planned, TODAY).collect()) == [
        ("u1", date(2026, 10, 28)), ("u3", date(2026, 10, 25)), ("u4", date(2026, 10, 29))]


def test_the_first_binding_rule_is_recorded_with_its_detail(spark):
    history = spark.createDataFrame(
        [("a", date(2026, 10, 28)), ("a", date(2026, 10, 30)),   # 2 in 10-28..10-30: max_sends
         ("b", date(2026, 10, 26)), ("b", date(2026, 10, 27)),   # outside the window, cooled down: free
         ("c", date(2026, 10, 29)),                               # 1 in the window, 1 day ago: cooldown
         ("d", date(2026, 10, 27)), ("d", date(2026, 10, 28))],  # 1 in the window, 2 days ago: free
        "user_id string, send_date date")
    policy = ContactPolicySettings(max_sends=2, per_days=3, cooldown_days=2, arbitration="priority")
    assert sorted(tuple(r) for r in over_policy(history, policy, TODAY).collect()) == [
        ("a", "max_sends", "2 sends in the 3 days to 2026-10-30"),
        ("c", "cooldown", "last send 2026-10-29, cooldown 2 days")]
    cooldown_only = ContactPolicySettings(max_sends=0, per_days=3, cooldown_days=2, arbitration="priority")
    assert sorted(r["user_id"] for r in over_policy(history, cooldown_only, TODAY).collect()) == ["a", "c"]


def _inputs(spark, users: str) -> AudienceInputs:
    """One blended list each; purchase_probability rises with the letter (f highest)."""
    recs = spark.createDataFrame([(u, 1, "i1", 1.0, "als", "blended") for u in users],
                                 "user_id string, rank int, item_id string, score double, source string, "
                                 "strategy string")
    scores = spark.createDataFrame([(u, date(2026, 10, 30), (i + 1) / 10) for i, u in enumerate(users)],
                                   "user_id string, as_of date, purchase_probability double")
    from lib.campaign.audience import latest_scores
    return AudienceInputs(recommendations=recs, scores=latest_scores(scores))


def test_a_customer_several_campaigns_want_goes_to_the_highest_priority_one(spark):
    campaigns = {"news": CampaignSettings(name="news", holdout_share=0.0),
                 "vip": CampaignSettings(name="vip", priority=5, max_audience=2, holdout_share=0.0,
                                         min_purchase_probability=0.3),
                 "also": CampaignSettings(name="also", holdout_share=0.0)}
    assert priority_order(campaigns) == ["vip", "also", "news"]  # ties by id
    suppressed = spark.createDataFrame([("b", None)], "user_id string, campaign_id string")
    over = spark.createDataFrame([("e", "cooldown", "last send 2026-10-29, cooldown 2 days")],
                                 "user_id string, rule string, detail string")
    audience, capped, _ = programme_audience(_inputs(spark, "abcdef"), campaigns, suppressed, "salt", 0.0, "r1",
                                             NO_CAPS, over)
    # vip wants c, d, f (e is capped) and takes its top two, f and d; c falls through to "also", which takes
    # the rest; news is left nobody. b is suppressed: in no campaign and not recorded as capped.
    assert sorted((r["campaign_id"], r["user_id"], r["variant"]) for r in audience.collect()) == [
        ("also", "a", "treatment"), ("also", "c", "treatment"), ("vip", "d", "treatment"), ("vip", "f", "treatment")]
    assert sorted((r["campaign_id"], r["user_id"], r["rule"], r["detail"]) for r in capped.collect()) == [
        ("also", "d", "arbitration", "vip"), ("also", "e", "cooldown", "last send 2026-10-29, cooldown 2 days"),
        ("also", "f", "arbitration", "vip"),
        ("news", "a", "arbitration", "also"), ("news", "c", "arbitration", "also"),
        ("news", "d", "arbitration", "vip"), ("news", "e", "cooldown", "last send 2026-10-29, cooldown 2 days"),
        ("news", "f", "arbitration", "vip"),
        ("vip", "e", "cooldown", "last send 2026-10-29, cooldown 2 days")]

    every = ContactPolicySettings(max_sends=0, per_days=7, cooldown_days=0, arbitration="none")
    audience, capped, _ = programme_audience(_inputs(spark, "abcdef"), campaigns, suppressed, "salt", 0.0, "r1",
                                             every)
    assert sorted((r["campaign_id"], r["user_id"]) for r in audience.collect()) == sorted(
        [(c, u) for c in ("news", "also") for u in "acdef"] + [("vip", "e"), ("vip", "f")])
    assert capped.count() == 0


def test_contact_policy_settings_name_their_key():
    policy = load_settings([], ["contact_policy.max_sends=3", "campaigns.winback.priority=2"])
    assert (policy.contact_policy.max_sends, policy.contact_policy.per_days) == (3, 7)
    assert policy.campaigns["winback"].priority == 2 and policy.campaigns["weekly_newsletter"].priority == 0
    for assignment, message in [("contact_policy.max_sends=-1", "'contact_policy.max_sends' must be >= 0"),
                                ("contact_policy.per_days=0", "'contact_policy.per_days' must be >= 1"),
                                ("contact_policy.cooldown_days=-2", "'contact_policy.cooldown_days' must be >= 0"),
                                ("contact_policy.arbitration=value", "'contact_policy.arbitration' must be one of"),
                                ("campaigns.winback.priority=high", "'campaigns.winback.priority' expects an int")]:
        with pytest.raises(ConfigError, match=message):
            load_settings([], [assignment])
