"""Campaign audiences (build_audience): config typing, filters, suppressions that never leak, stable
variants, the cap, and clear errors for bad campaign input. Local Spark on tiny hand-made tables."""
from __future__ import annotations

import hashlib
import hmac
from datetime import date, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pyspark.sql import functions as F

from jobs.common import load_settings, run_stage
from lib import catalog as C
from lib.campaigns import CampaignInputError
from lib.config import ConfigError
from lib.exports import read_export
from lib.holdout import GLOBAL_KEY, bucket_of
from service import settings as service_settings
from service.app import create_app

pytestmark = pytest.mark.slow  # runs whole stages on generated data

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
    assert newsletter == set(USERS)  # no filter: everyone with recommendations
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
    active = [u for u, i in index.items() if i % 4 == 0]
    assert len(capped) == 50
    top = sorted(active, key=lambda u: -index[u])[:50]  # purchase_probability rises with the index
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


@pytest.mark.parametrize("pseudonymize", [False, True])
def test_suppressed_users_are_in_no_audience_no_control_group_and_no_export(tmp_path: Path, context, monkeypatch,
                                                                             pseudonymize):
    """Lists hold raw ids; with pseudonyms on the tables hold HMACs of them. Either way a suppressed customer
    is in no audience, export or holdout assignment, and the API serves them no personal content."""
    root = tmp_path / "wh"
    monkeypatch.setenv("EP_TEST_PSEUDONYM_KEY", KEY)
    base = [f"output.root={root}", "holdout.control_share=0.2", "campaigns.winback.churn_bands=[]",
            "campaigns.winback.holdout_share=0.3", f"privacy.pseudonymize={str(pseudonymize).lower()}",
            "privacy.key_env=EP_TEST_PSEUDONYM_KEY"]
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


def test_missing_scores_are_named_in_the_message(tmp_path: Path, context):
    ctx = context(f"output.root={tmp_path / 'wh'}", run_id="no-scores")
    seed_tables(ctx, USERS[:40], scores=False)
    result = run_stage(ctx, "build_audience")
    assert "customer_scores missing" in result.message
    assert "winback: no customer_scores, churn_bands / min_purchase_probability not applied" in result.message
    rows = ctx.tables.read(ctx.spark, C.CAMPAIGN_AUDIENCE)
    assert rows.where(F.col("purchase_probability").isNotNull()).count() == 0
    assert rows.where("campaign_id = 'weekly_newsletter'").count() == 40


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
