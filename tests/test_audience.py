"""Campaign audiences (build_audience): config typing, filters, suppressions that never leak, stable
variants, the cap, and clear errors for bad campaign input. Local Spark on tiny hand-made tables."""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace
from datetime import date, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pyspark.sql import functions as F

from jobs.build_audience import read_inputs
from jobs.common import load_settings, run_stage
from lib.campaign.audience import (CUSTOMER_VALUE_COLUMNS, AudienceInputs, dropped_products, programme_audience,
                                   eligible, latest_scores, products_passed_over)
from lib.campaign.campaigns import CampaignInputError
from lib.campaign.exports import read_export
from lib.campaign.holdout import GLOBAL_KEY, ab_key, bucket_of
from lib.platform import catalog as C
from lib.platform.config import ConfigError
from lib.platform.settings import AbVariantSettings, CampaignSettings, ContactPolicySettings
from service import settings as service_settings
from service.app import create_app


USERS = [f"u{i:04d}" for i in range(400)]
SALT = "ep-holdout-1"  # conf/base.toml's holdout.salt
KEY = "audience-test-key-0123456789"


def write(ctx, spec, rows):
    """An input table as its stage would leave it (a plain Delta write: these are the inputs under test)."""
    frame = spec.conform(ctx.spark.createDataFrame(rows, spec.schema))
    frame.write.format("delta").mode("overwrite").partitionBy(*spec.partition_by).save(ctx.tables.location(spec))


def seed_tables(ctx, users=USERS, scores=True):
    """recommendations (5 per user and strategy), user_segments (4 segments), customer_scores (two as_of dates, the
    latest counts), send_times (every other user), events (activity)."""
    write(ctx, C.RECOMMENDATIONS, [{"user_id": u, "rank": r, "item_id": f"{prefix}{(i + r) % 50:03d}", "score": 1.0 / r,
                                    "source": "als", "run_id": "r0", "strategy": strategy}
                                   for i, u in enumerate(users) for r in range(1, 6)
                                   for prefix, strategy in (("i", "blended"), ("d", "discover"))])
    write(ctx, C.USER_SEGMENTS, [{"user_id": u, "segment_id": i % 4, "affinity": 0.9, "run_id": "r0"}
                                 for i, u in enumerate(users)])
    if scores:
        bands = ("low", "medium", "high")
        rows = [{"user_id": u, "as_of": date(2026, 10, 1), "churn_band": "high", "purchase_probability": 0.99,
                 "eligible": True} for u in users]
        rows += [{"user_id": u, "as_of": date(2026, 10, 31), "churn_band": bands[i % 3],
                  "purchase_probability": (i + 0.5) / len(users), "eligible": True} for i, u in enumerate(users)]
        write(ctx, C.CUSTOMER_SCORES, rows)
    write(ctx, C.SEND_TIMES, [{"user_id": u, "hour_utc": i % 24, "hour_of_week_utc": i % 168}
                              for i, u in enumerate(users) if i % 2 == 0])
    write(ctx, C.EVENTS, [{"event_id": f"e{i}", "user_id": u, "item_id": "i001", "event_type": "view",
                           "event_ts": datetime(2026, 10, 30 if i % 4 == 0 else 1), "event_date": date(2026, 10, 1)}
                          for i, u in enumerate(users)]
          + [{"event_id": f"s{i}", "user_id": u, "item_id": "i001", "event_type": "email_send",
              "event_ts": datetime(2026, 10, 30), "event_date": date(2026, 10, 30)} for i, u in enumerate(users)])


def audience_rows(ctx):
    return {(r["campaign_id"], r["user_id"]): r for r in ctx.tables.read(ctx.spark, C.CAMPAIGN_AUDIENCE).collect()}


def expected_variant(user: str, campaign: str, holdout: float, control: float) -> str:
    if bucket_of(user, GLOBAL_KEY, SALT) < round(control * 10_000):
        return "global_control"
    return "holdout" if bucket_of(user, campaign, SALT) < round(holdout * 10_000) else "treatment"


def test_campaign_tables_are_typed_and_bad_values_name_their_key():
    settings = load_settings([], ["campaigns.promo.segments=1,2", "campaigns.promo.holdout_share=0.3"])
    promo = settings.campaigns["promo"]
    assert (promo.segments, promo.holdout_share, promo.products) == ((1, 2), 0.3, 4)  # unset keys: defaults
    assert (promo.min_predicted_clv, promo.next_order_within_days) == (0.0, 0)  # no value filters
    vip = load_settings([], ["campaigns.vip.min_predicted_clv=250", "campaigns.vip.next_order_within_days=14"])
    assert (vip.campaigns["vip"].min_predicted_clv, vip.campaigns["vip"].next_order_within_days) == (250.0, 14)
    assert settings.holdout_shares["promo"] == 0.3 and "winback" in settings.holdout_shares
    assert "winback" not in load_settings([], ["campaigns.winback.enabled=false"]).holdout_shares
    for assignment, message in [
        ("campaigns.promo.holdout_share=-0.1", "'campaigns.promo.holdout_share' must be in \\[0, 1\\)"),
        ("campaigns.weekly_newsletter.holdout_share=-0.5", "'campaigns.weekly_newsletter.holdout_share' must be"),
        ("campaigns.promo.colour=red", "unknown config key 'campaigns.promo.colour'"),
        ("campaigns.promo.products=abc", "'campaigns.promo.products' expects an int"),
        ("campaigns.promo.strategy=popular", "'campaigns.promo.strategy' must be one of discover, buy_again"),
        ("recommend.strategies=discover", "'campaigns.weekly_newsletter.strategy' names 'blended', a list"),
        ("campaigns.promo.churn_bands=hot", "'campaigns.promo.churn_bands' must be one of low, medium, high"),
        ("campaigns.promo.min_predicted_clv=-5", "'campaigns.promo.min_predicted_clv' must be >= 0"),
        ("campaigns.promo.min_predicted_clv=lots", "'campaigns.promo.min_predicted_clv' expects a float"),
        ("campaigns.promo.min_predicted_clv=nan", "'campaigns.promo.min_predicted_clv' must be a finite number"),
        ("campaigns.promo.next_order_within_days=-1", "'campaigns.promo.next_order_within_days' must be >= 0"),
        ("campaigns.promo.next_order_within_days=2.5", "'campaigns.promo.next_order_within_days' expects an int"),
        ("campaigns.promo.products=99", "'campaigns.promo.products' must be <= recommend.top_n"),
        ("campaigns.global.products=2", "'campaigns.global' must be named"),
        ("exports.formats=xml", "'exports.formats' must be one of csv, json"),
        ("exports.max_rows_per_file=0", "'exports.max_rows_per_file' must be >= 1"),
        ("campaign_report.conversion_window_days=0", "'campaign_report.conversion_window_days' must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_settings([], [assignment])


def test_an_environment_file_adds_a_campaign_typed_by_its_siblings(tmp_path: Path):
    env = tmp_path / "env.toml"
    env.write_text('[campaigns.spring]\nsegments = [2]\nmax_audience = 500\n\n[campaigns.winback]\nenabled = false\n')
    settings = load_settings([str(env)], ["campaigns.spring.holdout_share=0.25"])
    assert list(settings.enabled_campaigns) == ["weekly_newsletter", "spring"]
    spring = settings.campaigns["spring"]
    assert (spring.segments, spring.max_audience, spring.holdout_share, spring.send_hour_utc) == ((2,), 500, 0.25, 9)
    env.write_text('[campaigns.spring]\nmax_audience = "many"\n')
    with pytest.raises(ConfigError, match="'campaigns.spring.max_audience' expects an int"):
        load_settings([str(env)], [])
    env.write_text('[campaigns]\nspring = 3\n')
    with pytest.raises(ConfigError, match="'campaigns.spring' is a table"):
        load_settings([str(env)], [])


@pytest.mark.slow  # whole build_audience runs
def test_audience_filters_cap_and_stable_variants(tmp_path: Path, context):
    sets = [f"output.root={tmp_path / 'wh'}", "holdout.control_share=0.1",
            "campaigns.weekly_newsletter.products=3",
            "campaigns.winback.churn_bands=high", "campaigns.winback.segments=0,1",
            "campaigns.winback.min_purchase_probability=0.5",
            "campaigns.capped.max_audience=50", "campaigns.capped.active_within_days=5",
            "campaigns.capped.strategy=discover"]
    ctx = context(*sets, run_id="run-1")
    seed_tables(ctx)
    run_stage(ctx, "build_audience")
    rows = audience_rows(ctx)
    index = {u: i for i, u in enumerate(USERS)}

    newsletter = {u for c, u in rows if c == "weekly_newsletter"}
    taken = {u for c, u in rows if c != "weekly_newsletter"}
    # No filter, lowest priority: everyone with recommendations whom winback (10) and capped (0, id first) left.
    assert newsletter == set(USERS) - taken and len(taken) > 50
    assert len(rows) == len(USERS)  # one campaign each
    sample = rows[("weekly_newsletter", "u0004")]
    assert [p["rank"] for p in sample["products"]] == [1, 2, 3]
    assert [p["item_id"] for p in sample["products"]] == ["i005", "i006", "i007"]
    assert (sample["segment_id"], sample["churn_band"], sample["send_hour_utc"]) == (0, "medium", 4)
    assert rows[("weekly_newsletter", "u0001")]["send_hour_utc"] == 9  # no send_times row: the campaign's hour
    assert rows[("weekly_newsletter", "u0004")]["purchase_probability"] == pytest.approx(4.5 / 400)  # latest as_of

    winback = {u for c, u in rows if c == "winback"}
    # segment i % 4 in (0, 1), band high (i % 3 == 2), purchase_probability (i + 0.5) / 400 >= 0.5
    assert winback == {u for u, i in index.items() if i % 4 in (0, 1) and i % 3 == 2 and i >= 200}
    assert winback

    capped = [rows[k] for k in rows if k[0] == "capped"]
    active = [u for u, i in index.items() if i % 4 == 0 and u not in winback]  # winback took the others first
    assert len(capped) == 50
    top = sorted(active, key=lambda u: -index[u])[:50]  # purchase_probability rises with the index
    # Those winback took are recorded against capped with the rule and the campaign that has them.
    kept_out = {(r["campaign_id"], r["user_id"]): (r["rule"], r["detail"])
                for r in ctx.tables.read(ctx.spark, C.CAPPED_CUSTOMERS).collect()}
    assert {u for (c, u), why in kept_out.items() if c == "capped"} == {
        u for u, i in index.items() if i % 4 == 0 and u in winback}
    assert {why for why in kept_out.values()} == {("arbitration", "winback"), ("arbitration", "capped")}
    assert {u for (c, u) in kept_out if c == "weekly_newsletter"} == taken
    assert {r["user_id"] for r in capped} == set(top)
    assert all(p["item_id"].startswith("d") for r in capped for p in r["products"])  # the discover list

    for (campaign, user), row in rows.items():
        share = ctx.settings.campaigns[campaign].holdout_share
        assert row["variant"] == expected_variant(user, campaign, share, 0.1), (campaign, user)
    variants = {v: sum(1 for (c, _), r in rows.items() if c == "weekly_newsletter" and r["variant"] == v)
                for v in ("treatment", "holdout", "global_control")}
    assert all(n > 0 for n in variants.values()), variants

    again = context(*sets, run_id="run-2")
    run_stage(again, "build_audience")
    rerun = audience_rows(again)
    strip = lambda r: {k: v for k, v in r.asDict(recursive=True).items() if k != "run_id"}  # noqa: E731
    assert rerun.keys() == rows.keys()
    assert all(strip(rerun[k]) == strip(rows[k]) for k in rows)
    assert {r["run_id"] for r in rerun.values()} == {"run-2"}

    # With a catalog and segment labels: the exports are email-ready, and i006, now unavailable, gives way.
    write(ctx, C.PRODUCTS, [{"item_id": f"{prefix}{n:03d}", "name": f"{prefix.upper()} product {n}", "price": n + 0.5,
                             "available": f"{prefix}{n:03d}" != "i006", "recommendable": True}
                            for prefix in "id" for n in range(50)])
    write(ctx, C.SEGMENT_PROFILES, [{"segment_id": s, "label": f"segment {s}", "run_id": "r0"} for s in range(4)])
    # Two customers left a cart the day before (both already active, so no activity filter changes): the shipped
    # abandoned_cart flow, turned on, takes them first (priority 20) and shows what they left.
    carts = {"u0008": ["i010", "i011"], "u0012": ["i020"]}
    cart_time = datetime(2026, 10, 29, 12)
    C.EVENTS.conform(ctx.spark.createDataFrame(
        [{"event_id": f"c{u}{item}", "user_id": u, "item_id": item, "event_type": "add_to_cart",
          "event_ts": cart_time.replace(minute=n), "event_date": cart_time.date()}
         for u, items in carts.items() for n, item in enumerate(items)], C.EVENTS.schema)) \
        .write.format("delta").mode("append").partitionBy(*C.EVENTS.partition_by).save(ctx.tables.location(C.EVENTS))
    content = ("exports.currency=GBP", "exports.link_template=https://shop.example/p/{item_id}",
               "campaigns.abandoned_cart.enabled=true")
    catalogued = context(*sets, *content, run_id="run-3")
    result = run_stage(catalogued, "build_audience")
    rows = audience_rows(catalogued)
    flow = {u: [(p["rank"], p["item_id"], p["source"], p["name"]) for p in r["products"]]
            for (c, u), r in rows.items() if c == "abandoned_cart"}
    assert flow == {"u0008": [(1, "i011", "abandoned_cart", "I product 11"), (2, "i010", "abandoned_cart", "I product 10")],
                    "u0012": [(1, "i020", "abandoned_cart", "I product 20")]}  # the latest add first
    taken |= set(carts)
    sample = rows[("weekly_newsletter", "u0004")]  # its list: i005, i006, i007, i008, i009
    assert [(p["rank"], p["item_id"], p["name"], p["price"]) for p in sample["products"]] == [
        (1, "i005", "I product 5", 5.5), (2, "i007", "I product 7", 7.5), (3, "i008", "I product 8", 8.5)]
    assert sample["segment_label"] == "segment 0"
    # i006 is in the first three of the users i with i % 50 in (3, 4, 5): passed over once for each treated one.
    treated = [u for (c, u), r in rows.items() if c == "weekly_newsletter" and r["variant"] == "treatment"]
    passed = sum(1 for u in treated if index[u] % 50 in (3, 4, 5))
    assert passed > 0 and result.counts["weekly_newsletter.products_dropped.unavailable"] == passed
    export = read_export(tmp_path / "wh" / "exports" / "weekly_newsletter" / "run-3")
    assert export.manifest["products_dropped"] == {"unavailable": passed}
    user = next(u for u in sorted(treated) if index[u] % 50 == 4)  # u0004's list: i005, i006, i007, ...
    record = next(r for r in export.records("json") if r["external_id"] == user)["payload"]
    assert record["products"][1] == {"item_id": "i007", "rank": 2, "score": pytest.approx(1 / 3), "source": "als",
                                     "name": "I product 7", "category": None, "price": 7.5, "currency": "GBP",
                                     "image_url": None, "link": "https://shop.example/p/i007"}
    assert record["segment_label"] == f"segment {index[user] % 4}"
    assert export.manifest["capped"] == {"arbitration": len(taken)}

    # One day later under a cap of 2 sends a week: the seeded email_send events of 10-30 reach everyone and
    # hold run-3's treatment sends (not counted twice); its holdout and control rows stand in for a send
    # more, so exactly those customers reach the cap.
    sends = ctx.tables.read(ctx.spark, C.CAMPAIGN_SENDS).collect()
    planned = {(r["user_id"], r["variant"]) for r in sends}
    assert {u for u, _ in planned} == set(USERS) and len(planned) == len(USERS)  # run-3 replaced runs 1-2's day
    # Each flow send records the cart it answers, so the same cart is never mailed again (run-4 below).
    assert {(r["user_id"], r["trigger_ts"]) for r in sends if r["trigger_ts"] is not None} == {
        ("u0008", cart_time.replace(minute=1)), ("u0012", cart_time)}
    # Overnight the catalog is loaded again with i001 cheaper: a price-drop flow takes who looked at it lately.
    write(ctx, C.PRODUCTS, [{"item_id": f"{prefix}{n:03d}", "name": f"{prefix.upper()} product {n}",
                             "price": 1.0 if f"{prefix}{n:03d}" == "i001" else n + 0.5,
                             "available": f"{prefix}{n:03d}" != "i006", "recommendable": True}
                            for prefix in "id" for n in range(50)])
    next_day = context(*sets, *content, "scores.as_of=2026-10-31T12:00:00", "contact_policy.max_sends=2",
                       "campaigns.drop.trigger=price_drop", "campaigns.drop.priority=30", run_id="run-4")
    result = run_stage(next_day, "build_audience")
    unmailed = {u for u, variant in planned if variant != "treatment"}
    after = audience_rows(next_day)
    assert unmailed and {u for (_, u) in after} == set(USERS) - unmailed
    # Viewed i001 on 10-30 (i % 4 == 0; the others on 10-01, outside 72 hours), and not kept out by the cap.
    assert {u for (c, u) in after if c == "drop"} == {u for u, i in index.items() if i % 4 == 0} - unmailed
    assert {(p["item_id"], p["source"], round(p["score"], 9)) for (c, _), r in after.items() if c == "drop"
            for p in r["products"]} == {("i001", "price_drop", round(1 / 3, 9))}  # a third off
    assert "abandoned_cart" not in {c for (c, _) in after}  # the carts, 24 h older, were answered
    capped_now = [(r["user_id"], r["rule"], r["detail"]) for r in  # a row per campaign that wanted the customer
                  next_day.tables.read(next_day.spark, C.CAPPED_CUSTOMERS).where("rule != 'arbitration'").collect()]
    assert {u for u, _, _ in capped_now} == unmailed
    assert {(rule, detail) for _, rule, detail in capped_now} == {("max_sends", "2 sends in the 7 days to 2026-10-31")}
    assert sum(n for key, n in result.counts.items() if key.endswith(".capped.max_sends")) == len(capped_now)


@pytest.mark.slow  # build_audience and plan_sends runs, then the API
@pytest.mark.parametrize("pseudonymize", [False, True])
def test_suppressed_users_are_in_no_audience_no_control_group_and_no_export(tmp_path: Path, context, monkeypatch,
                                                                             pseudonymize):
    """Lists hold raw ids; with pseudonyms on the tables hold HMACs of them. Either way a suppressed customer
    is in no audience, export or holdout assignment, and the API serves them no personal content."""
    root = tmp_path / "wh"
    monkeypatch.setenv("EP_TEST_PSEUDONYM_KEY", KEY)
    base = [f"output.root={root}", "holdout.control_share=0.2", "campaigns.winback.churn_bands=[]",
            "campaigns.winback.holdout_share=0.3", f"privacy.pseudonymize={str(pseudonymize).lower()}",
            "privacy.key_env=EP_TEST_PSEUDONYM_KEY",
            "contact_policy.arbitration=none"]  # both campaigns want everyone: a winback opt-out stays in the other
    stored = {u: hmac.new(KEY.encode(), u.encode(), hashlib.sha256).hexdigest() if pseudonymize else u for u in USERS}
    raw_of = {s: u for u, s in stored.items()}
    ctx = context(*base, run_id="open")
    seed_tables(ctx, [stored[u] for u in USERS])
    if pseudonymize:
        write(ctx, C.USER_IDENTITIES, [{"user_key": stored[u], "user_id": u} for u in USERS])
    run_stage(ctx, "build_audience")
    before = audience_rows(ctx)
    # Suppress users of every variant of both campaigns, plus one campaign-specific opt-out.
    picked = set()
    for campaign in ("weekly_newsletter", "winback"):
        for variant in ("treatment", "holdout", "global_control"):
            members = sorted(u for (c, u), r in before.items() if c == campaign and r["variant"] == variant)
            assert members, (campaign, variant)
            picked |= set(members[:7])
    # The lists name raw ids; one customer is listed by the id an export carries (their pseudonym).
    listed = sorted(raw_of[u] for u in picked)
    listed[0] = stored[listed[0]]
    lines = ["user_id,reason,since"] + [f"{u},{['unsubscribed', 'bounced', 'complained'][i % 3]},2026-09-01"
                                        for i, u in enumerate(listed)]
    lines.append(",bounced,2026-09-01")  # no user id: suppresses nobody, counted
    suppressions = tmp_path / "suppressions.csv"
    suppressions.write_text("\n".join(lines) + "\n")
    only_winback = tmp_path / "winback_optout.json"
    optout = next(u for (c, u), r in before.items() if c == "winback" and u not in picked)
    only_winback.write_text(f'{{"user_id": " {raw_of[optout]} ", "reason": "unsubscribed"}}\n')

    ctx = context(*base, f"input.suppressions={suppressions}", f"campaigns.winback.suppressions={only_winback}",
                  run_id="closed")
    result = run_stage(ctx, "build_audience")
    after = audience_rows(ctx)
    leaked = {(c, u, r["variant"]) for (c, u), r in after.items() if u in picked}
    assert not leaked
    assert ("winback", optout) not in after and ("weekly_newsletter", optout) in after
    assert set(after) == {k for k in before if k[1] not in picked and k != ("winback", optout)}
    assert result.counts["suppressions.blank_user_id"] == 1
    table = {(r["user_id"], r["campaign_id"]) for r in ctx.tables.read(ctx.spark, C.SUPPRESSED_USERS).collect()}
    assert table == {(u, None) for u in picked} | {(optout, "winback")}  # stored ids only, never a raw one

    exported = set()
    for campaign in ("weekly_newsletter", "winback"):
        export = read_export(root / "exports" / campaign / "closed")
        for fmt in ("csv", "json"):
            ids = [r["external_id"] for r in export.records(fmt)]
            exported |= set(ids)
            treated = {u for (c, u), r in after.items() if c == campaign and r["variant"] == "treatment"}
            assert sorted(ids) == sorted(treated)  # treatment only, every one of them
    assert not exported & picked and optout in exported

    run_stage(ctx, "plan_sends")
    assigned = {(r["user_id"], r["campaign_id"]) for r in ctx.tables.read(ctx.spark, C.HOLDOUT_ASSIGNMENTS).collect()}
    assert assigned == {(stored[u], c) for u in USERS for c in ("weekly_newsletter", "winback")
                        if stored[u] not in picked and (stored[u], c) != (optout, "winback")}

    environ = {"RECS_WAREHOUSE": str(root), "RECS_ALLOW_NO_AUTH": "1", "RECS_RELOAD_SECONDS": "0",
               "RECS_PSEUDONYM_KEY_ENV": "EP_TEST_PSEUDONYM_KEY" if pseudonymize else "", "EP_TEST_PSEUDONYM_KEY": KEY}
    with TestClient(create_app(service_settings.from_env(environ))) as api:
        for user in sorted(picked)[:5]:  # asked by the raw id the website knows (mapped with the key)
            body = api.get(f"/v1/users/{raw_of[user]}/recommendations").json()
            assert body["fallback"] is True and body["fallback_reason"] == "suppressed", body
            assert api.get(f"/v1/users/{raw_of[user]}/profile").json()["segment"] is None
        served = api.get(f"/v1/users/{raw_of[optout]}/recommendations").json()
        assert served["fallback"] is False and served["items"]


@pytest.mark.slow  # a build_audience run
def test_missing_scores_are_named_in_the_message(tmp_path: Path, context):
    ctx = context(f"output.root={tmp_path / 'wh'}", run_id="no-scores")
    seed_tables(ctx, USERS[:40], scores=False)
    result = run_stage(ctx, "build_audience")
    assert "customer_scores missing" in result.message
    assert "winback: no customer_scores, churn_bands passes nobody" in result.message
    rows = ctx.tables.read(ctx.spark, C.CAMPAIGN_AUDIENCE)
    assert rows.where(F.col("purchase_probability").isNotNull()).count() == 0
    assert rows.where("campaign_id = 'weekly_newsletter'").count() == 40


@pytest.mark.slow  # build_audience runs
def test_bad_campaign_input_fails_naming_the_key_or_column(tmp_path: Path, context):
    ctx = context(f"output.root={tmp_path / 'wh'}", "campaigns.winback.segments=0,7", run_id="bad")
    seed_tables(ctx, USERS[:30])
    with pytest.raises(CampaignInputError, match="'campaigns.winback.segments' names unknown segment.s. 7: "
                                                 "user_segments has segments 0, 1, 2, 3"):
        run_stage(ctx, "build_audience")
    no_ids = tmp_path / "no_ids.csv"
    no_ids.write_text("customer,reason\nu0001,bounced\n")
    ctx = context(f"output.root={tmp_path / 'wh'}", f"input.suppressions={no_ids}", run_id="bad2")
    with pytest.raises(CampaignInputError, match="'input.suppressions'.*lack column user_id .columns: customer, reason"):
        run_stage(ctx, "build_audience")
    ctx = context(f"output.root={tmp_path / 'wh'}", f"input.suppressions={tmp_path / 'absent.csv'}", run_id="bad3")
    with pytest.raises(CampaignInputError, match="'input.suppressions': cannot read suppressions"):
        run_stage(ctx, "build_audience")


# customer_scores at as_of 2026-10-31 (the latest; 2026-10-01 is older): (user, predicted_clv,
# expected_next_order_date). The as_of is day 0 of next_order_within_days.
AS_OF, OLDER = date(2026, 10, 31), date(2026, 10, 1)
VALUE_ROWS = [("a", 150.0, date(2026, 11, 3)),    # passes both filters below
              ("b", 100.0, date(2026, 11, 7)),    # both at their bound: 100 >= 100, 7 days ahead
              ("c", 99.99, date(2026, 11, 1)),    # predicted_clv just under
              ("d", 500.0, date(2026, 11, 8)),    # 8 days ahead
              ("e", 500.0, None),                 # no expected date (fewer than 2 orders)
              ("f", None, date(2026, 11, 2)),     # ineligible: null predicted_clv
              ("g", 500.0, date(2026, 10, 30))]   # expected before the as_of (overdue)


def value_scores(spark):
    """customer_scores rows with the customer-value columns; h is only scored at the older as_of."""
    rows = [{"user_id": u, "as_of": AS_OF, "predicted_clv": clv, "historic_clv": 40.0,
             "total_clv": None if clv is None else 40.0 + clv, "p_alive": 0.8, "expected_orders": 2.5,
             "avg_days_between_orders": 12.5, "expected_next_order_date": nxt, "churn_band": "low",
             "purchase_probability": 0.5, "eligible": clv is not None} for u, clv, nxt in VALUE_ROWS]
    rows.append({"user_id": "h", "as_of": OLDER, "predicted_clv": 900.0, "expected_next_order_date": date(2026, 11, 2)})
    return C.CUSTOMER_SCORES.conform(spark.createDataFrame(rows, C.CUSTOMER_SCORES.schema))


def campaign_alone(inputs, campaign, variants=()):
    """One campaign's audience rows: no suppression, no contact policy, salt SALT, no global control."""
    nobody = inputs.recommendations.sparkSession.createDataFrame([], "user_id string, campaign_id string")
    policy = ContactPolicySettings(max_sends=0, per_days=7, cooldown_days=0, arbitration="none")
    rows, _, _ = programme_audience(inputs, {campaign.name: campaign}, nobody, SALT, 0.0, "r9", policy,
                                    tests={campaign.name: variants})
    return rows


def one_list_each(spark, users):
    return spark.createDataFrame([(u, 1, "i1", 1.0, "als", "blended") for u in users], "user_id string, rank int, "
                                 "item_id string, score double, source string, strategy string")


def test_an_ab_test_splits_the_treatment_and_shows_each_variant_its_own_list(spark):
    users = [f"u{i:03d}" for i in range(300)]
    lists = [(u, r, f"{prefix}{r}", 1.0 / r, "als", strategy) for i, u in enumerate(users) for r in (1, 2, 3)
             for prefix, strategy in (("i", "blended"), ("d", "discover")) if strategy == "blended" or i >= 10]
    recommendations = spark.createDataFrame(lists, "user_id string, rank int, item_id string, score double, "
                                                   "source string, strategy string")
    campaign = CampaignSettings(name="spring", products=2, holdout_share=0.2)
    variants = (AbVariantSettings(name="a", campaign="spring", share=0.5, control=True, content_key="subject_a"),
                AbVariantSettings(name="b", campaign="spring", share=0.5, strategy="discover", products=3,
                                  content_key="subject_b"))
    rows = campaign_alone(AudienceInputs(recommendations=recommendations), campaign, variants)
    seen = set()
    for row in rows.collect():
        items = [p["item_id"] for p in row["products"]]
        if row["variant"] != "treatment":  # the holdout is in no test variant and sees the campaign's list
            assert (row["test_variant"], row["content_key"], items) == (None, None, ["i1", "i2"])
            continue
        arm = "a" if bucket_of(row["user_id"], ab_key("spring"), SALT) < 5000 else "b"
        has_discover = int(row["user_id"][1:]) >= 10
        expected = ["d1", "d2", "d3"] if arm == "b" and has_discover else ["i1", "i2"]  # else the campaign's list
        assert (row["test_variant"], row["content_key"], items) == (arm, f"subject_{arm}", expected), row["user_id"]
        seen.add((arm, has_discover))
    assert {("a", True), ("b", True), ("b", False)} <= seen


def test_value_filters_pass_exact_customers_and_never_a_null(spark):
    inputs = AudienceInputs(recommendations=one_list_each(spark, "abcdefgh"), scores=latest_scores(value_scores(spark)))

    def passing(**filters) -> set[str]:
        people, notes = eligible(inputs, CampaignSettings(name="vip", **filters))
        assert notes == []
        return {r["user_id"] for r in people.select("user_id").collect()}

    assert passing() == set("abcdefgh")
    assert passing(min_predicted_clv=100.0) == {"a", "b", "d", "e", "g"}  # not c (under), f (null), h (older as_of)
    assert passing(next_order_within_days=7) == {"a", "b", "c", "f"}     # not d (8 days), e (null), g (overdue)
    assert passing(min_predicted_clv=100.0, next_order_within_days=7) == {"a", "b"}

    no_scores = replace(inputs, scores=None)
    people, notes = eligible(no_scores, CampaignSettings(name="vip", churn_bands=("low",), next_order_within_days=7))
    assert people.count() == 0  # nobody is scored, so nobody passes (a winback must not mail everyone)
    assert notes == ["vip: no customer_scores, churn_bands / next_order_within_days passes nobody"]


def test_the_audience_carries_the_latest_customer_value_or_nulls(spark):
    inputs = AudienceInputs(recommendations=one_list_each(spark, "abfh"), scores=latest_scores(value_scores(spark)))
    rows = campaign_alone(inputs, CampaignSettings(name="vip"))
    got = {r["user_id"]: tuple(r[c] for c in CUSTOMER_VALUE_COLUMNS) for r in rows.collect()}
    assert got == {"a": (40.0, 150.0, 190.0, 0.8, 2.5, 12.5, date(2026, 11, 3)),
                   "b": (40.0, 100.0, 140.0, 0.8, 2.5, 12.5, date(2026, 11, 7)),
                   "f": (40.0, None, None, 0.8, 2.5, 12.5, date(2026, 11, 2)),
                   "h": (None,) * 7}  # scored only at the older as_of
    assert rows.columns == C.CAMPAIGN_AUDIENCE.columns


def test_products_the_catalog_lacks_or_hides_give_way_and_carry_its_details(spark):
    """a's list: i1 unavailable, i2 not in the catalog, i3 and i4 shown; b's list: only hidden items."""
    recommendations = spark.createDataFrame(
        [("a", rank, item, 1.0 / rank, "als", "blended") for rank, item in enumerate(["i1", "i2", "i3", "i4", "i5"], 1)]
        + [("b", 1, "i1", 1.0, "als", "blended"), ("a", 1, "i9", 1.0, "als", "discover")],
        "user_id string, rank int, item_id string, score double, source string, strategy string")
    catalog = spark.createDataFrame(
        [("i1", "Mug", "kitchen", 4.5, False, True), ("i3", "Bowl", None, 2.0, True, True),
         ("i4", "Vase", "home", None, True, True), ("i5", "Lamp", "home", 20.0, True, False)],
        "item_id string, name string, category string, price double, available boolean, recommendable boolean")
    segments = spark.createDataFrame([("a", 2)], "user_id string, segment_id int")
    labels = spark.createDataFrame([(2, "home & kitchen")], "segment_id int, label string")
    inputs = AudienceInputs(recommendations=recommendations, segments=segments, segment_labels=labels,
                            products=catalog)
    campaign = CampaignSettings(name="vip", products=3, strategy="blended", holdout_share=0.0)
    rows = campaign_alone(inputs, campaign)
    got = {r["user_id"]: r for r in rows.collect()}
    # The manifest's count: a's two passed-over products (b, with nothing to show, is in no audience).
    assert products_passed_over(inputs, campaign, rows) == {"unavailable": 1, "missing_from_catalog": 1}
    assert set(got) == {"a"}  # nothing of b's list may be shown
    assert [tuple(p) for p in got["a"]["products"]] == [("i3", 1, 1 / 3, "als", "Bowl", None, 2.0),
                                                        ("i4", 2, 0.25, "als", "Vase", "home", None)]
    assert (got["a"]["segment_id"], got["a"]["segment_label"]) == (2, "home & kitchen")
    passed = {tuple(r) for r in dropped_products(recommendations, 3, "blended", catalog).collect()}
    assert passed == {("a", "i1", "unavailable"), ("a", "i2", "missing_from_catalog"), ("b", "i1", "unavailable")}
    # Without a catalog nothing gives way and the details are null.
    rows = campaign_alone(replace(inputs, products=None, segment_labels=None), campaign)
    lists = {r["user_id"]: [(p["item_id"], p["rank"], p["name"]) for p in r["products"]] for r in rows.collect()}
    assert lists == {"a": [("i1", 1, None), ("i2", 2, None), ("i3", 3, None)], "b": [("i1", 1, None)]}
    assert rows.where("segment_label is not null").count() == 0


def test_an_older_customer_scores_reads_as_nulls_and_its_next_write_adds_the_columns(tmp_path: Path, context):
    """A warehouse written before the customer-value columns: build_audience reads them as nulls (and says so),
    and the next score_customers write (Tables.replace_where, like the stage's) adds them to the table."""
    from deltalake import DeltaTable

    ctx = context(f"output.root={tmp_path / 'wh'}", run_id="upgrade")
    older = C.TableSpec(C.CUSTOMER_SCORES.name, ", ".join(f"{f.name} {f.dataType.simpleString()}"
                                                          for f in C.CUSTOMER_SCORES.schema.fields
                                                          if f.name not in CUSTOMER_VALUE_COLUMNS),
                        "customer_scores before the customer-value columns", C.CUSTOMER_SCORES.partition_by)
    write(ctx, older, [{"user_id": "a", "as_of": OLDER, "churn_band": "low", "eligible": True}])
    write(ctx, C.RECOMMENDATIONS, [{"user_id": "a", "rank": 1, "item_id": "i1", "strategy": "blended"}])

    inputs, _ = read_inputs(ctx)
    assert any(n.startswith("customer_scores lacks historic_clv, predicted_clv") for n in inputs.notes), inputs.notes
    assert [tuple(r) for r in inputs.scores.select(*CUSTOMER_VALUE_COLUMNS).collect()] == [(None,) * 7]
    people, _ = eligible(inputs, CampaignSettings(name="vip", min_predicted_clv=1.0))
    assert people.count() == 0  # null never passes

    ctx.tables.replace_where(value_scores(ctx.spark).where(F.col("user_id") == "a"), C.CUSTOMER_SCORES,
                             f"as_of = DATE'{AS_OF.isoformat()}'")
    table = ctx.tables.read(ctx.spark, C.CUSTOMER_SCORES)
    assert set(CUSTOMER_VALUE_COLUMNS) <= set(table.columns)
    assert {(r["as_of"], r["predicted_clv"]) for r in table.collect()} == {(OLDER, None), (AS_OF, 150.0)}
    arrow = DeltaTable(ctx.tables.location(C.CUSTOMER_SCORES)).to_pyarrow_table(columns=["as_of", "predicted_clv"])
    assert sorted(zip(*arrow.to_pydict().values())) == [(OLDER, None), (AS_OF, 150.0)]  # what the API reads
    assert not any(n.startswith("customer_scores lacks") for n in read_inputs(ctx)[0].notes)
