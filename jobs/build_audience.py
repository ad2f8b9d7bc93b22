"""Campaign audiences into campaign_audience under the contact policy (who was kept out, and why, into
capped_customers; the day's planned sends into campaign_sends), and per campaign an email-platform export (CSV and JSON
lines of the treatment rows, a manifest written last) under exports.dir/<campaign_id>/<run_id>/,
published (readable) only once the run's success is recorded, removed when the run fails."""
from __future__ import annotations

import logging
from datetime import date, datetime, timezone
from functools import reduce

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.common import StageContext, exports_root, main_for
from lib.campaign.ab_test import minimum_detectable_effect
from lib.campaign.audience import (CUSTOMER_VALUE_COLUMNS, AudienceInputs, last_activity, latest_scores,
                                   products_passed_over, programme_audience)
from lib.campaign.campaigns import check_segments, write_suppressed_users
from lib.campaign.contact_policy import caps_apply, over_policy, send_history
from lib.campaign.exports import ProductContent, discard_exports, export_directory, publish_exports, write_export
from lib.campaign.triggers import CATALOG_TRIGGERS, answered, catalog_loads, compared_loads, triggered_items
from lib.features.interactions import latest_event_time
from lib.platform import catalog as C
from lib.platform.runs import StageResult
from lib.platform.settings import CampaignSettings

log = logging.getLogger("jobs.build_audience")


def read_inputs(ctx: StageContext) -> tuple[AudienceInputs, DataFrame | None]:
    """The audience's inputs, and the events (None: no events table) for the contact policy."""
    spark, tables = ctx.spark, ctx.tables
    inputs = AudienceInputs(recommendations=tables.require(spark, C.RECOMMENDATIONS, "recommend_items"))
    if "strategy" not in inputs.recommendations.columns:
        raise ValueError(f"{tables.location(C.RECOMMENDATIONS)} lacks column strategy (written before strategies "
                         "existed): re-run recommend_items")
    optional = ((C.USER_SEGMENTS, "segment_users", "no segment ids"),
                (C.SEGMENT_PROFILES, "segment_users", "no segment labels"),
                (C.PRODUCTS, "ingest_products", "products carry no name, category or price; none is passed over"),
                (C.CUSTOMER_SCORES, "score_customers", "no churn_band / purchase_probability, no score filters"),
                (C.SEND_TIMES, "plan_sends", "every send_hour_utc is the campaign's send_hour_utc"))
    found = {}
    for table, producer, consequence in optional:
        if tables.exists(spark, table):
            found[table.name] = tables.read(spark, table)
        else:
            inputs.notes.append(f"{table.name} missing (run {producer}): {consequence}")
    inputs.segments = found.get(C.USER_SEGMENTS.name)
    inputs.segment_labels = found.get(C.SEGMENT_PROFILES.name)
    inputs.products = found.get(C.PRODUCTS.name)
    if C.CUSTOMER_SCORES.name in found:
        scores = found[C.CUSTOMER_SCORES.name]
        lacking = [c for c in CUSTOMER_VALUE_COLUMNS if c not in scores.columns]
        if lacking:  # an older warehouse: read as nulls, so their filters pass nobody until score_customers runs
            inputs.notes.append(f"customer_scores lacks {', '.join(lacking)} (written before they existed; run "
                                "score_customers): null in the audience and exports, their filters pass nobody")
        inputs.scores = latest_scores(scores)
    inputs.send_times = found.get(C.SEND_TIMES.name)
    events = tables.read(spark, C.EVENTS) if tables.exists(spark, C.EVENTS) else None
    if events is not None:
        inputs.activity = last_activity(events)
        inputs.activity_reference = ctx.settings.scores.as_of_utc or latest_event_time(events)
    return inputs, events


def send_day(inputs: AudienceInputs) -> date:
    """The run's day, of its planned sends and of the caps: scores.as_of when set, else the latest event's
    day (what active_within_days measures from); today's date without events."""
    return (inputs.activity_reference or datetime.now(timezone.utc)).astimezone(timezone.utc).date()


def trigger_lists(ctx: StageContext, campaigns: dict[str, CampaignSettings], inputs: AudienceInputs, events: DataFrame | None,
                  today: date) -> tuple[DataFrame | None, list[str]]:
    """Every triggered campaign's items (``lib.campaign.triggers.triggered_items``, the list
    ``trigger:<campaign>``, with campaign_id; computed once) and notes; None without a triggered campaign or events. Earlier
    days' campaign_sends say which trigger events were already answered."""
    triggered = {name: c for name, c in campaigns.items() if c.trigger}
    if not triggered:
        return None, []
    if events is None or inputs.activity_reference is None:
        return None, [f"{name}: no events, its trigger finds nobody" for name in triggered]
    spark, tables = ctx.spark, ctx.tables
    notes, catalog = [], None
    if any(c.trigger in CATALOG_TRIGGERS for c in triggered.values()):
        catalog = catalog_change(ctx)
        if catalog is None:
            notes += [f"{name}: {c.trigger} needs two loads of the catalog (ingest_products), found fewer"
                      for name, c in triggered.items() if c.trigger in CATALOG_TRIGGERS]
            triggered = {name: c for name, c in triggered.items() if c.trigger not in CATALOG_TRIGGERS}
            if not triggered:
                return None, notes
    sent = tables.read(spark, C.CAMPAIGN_SENDS) if tables.exists(spark, C.CAMPAIGN_SENDS) else None
    parts = []
    for name, campaign in triggered.items():
        items = triggered_items(events, campaign.trigger, campaign.list_name, inputs.activity_reference,
                                campaign.trigger_after_hours, campaign.trigger_within_hours,
                                campaign.trigger_min_views, answered(sent, events, name, today), catalog)
        parts.append(items.withColumn("campaign_id", F.lit(name)))
    return reduce(DataFrame.unionByName, parts).localCheckpoint(), notes


def catalog_change(ctx: StageContext) -> tuple[DataFrame, DataFrame, datetime] | None:
    """The catalog load in force at the last successful build_audience run before the latest load (else the
    load before the latest), the latest load (``products``' Delta history, ``lib.campaign.triggers``'
    ``catalog_loads`` and ``compared_loads``) and the latest load's commit time; None without two to compare."""
    spark, tables = ctx.spark, ctx.tables
    if not tables.exists(spark, C.PRODUCTS):
        return None
    commits = (spark.sql(f"DESCRIBE HISTORY {tables.sql_name(C.PRODUCTS)}")
               .select("version", "timestamp", "operation", "userMetadata", "operationParameters").collect())
    history = []  # one row per commit of the catalog
    for r in commits:
        restored_to = (r["operationParameters"] or {}).get("version") if r["operation"] == "RESTORE" else None
        history.append((r["version"], r["timestamp"], r["operation"], r["userMetadata"] or "",
                        int(restored_to) if restored_to and restored_to.isdigit() else None))
    loads = catalog_loads(history)
    if not loads:
        return None
    since = None
    if tables.exists(spark, C.PIPELINE_RUNS):  # the last build_audience before the latest load
        since = (tables.read(spark, C.PIPELINE_RUNS)
                 .where((F.col("stage") == "build_audience") & (F.col("status") == "success")
                        & (F.col("run_id") != ctx.run_id) & (F.col("started_at") < F.lit(loads[-1][1])))
                 .agg(F.max("started_at")).first()[0])
    compared = compared_loads(loads, since)
    if compared is None:
        return None
    baseline, latest, committed = compared
    return tables.read(spark, C.PRODUCTS, baseline), tables.read(spark, C.PRODUCTS, latest), committed


def planned_tests(audience: DataFrame, tests: dict[str, tuple]) -> dict[str, dict]:
    """Campaign id -> its A/B/n test before the send: each variant's recipients and content_key, the
    baseline (the treatment's mean purchase_probability, a proxy of its conversion rate) and the minimum
    detectable effect (``lib.campaign.ab_test.minimum_detectable_effect``, the smallest arm's size)."""
    if not tests:
        return {}
    per_variant = (audience.where(F.col("test_variant").isNotNull())
                   .groupBy("campaign_id", "test_variant")
                   .agg(F.count(F.lit(1)).alias("recipients"), F.sum("purchase_probability").alias("_p"),
                        F.count("purchase_probability").alias("_scored"))
                   .collect())  # campaigns x variants rows
    planned = {}
    for name, variants in tests.items():
        rows = {r["test_variant"]: r for r in per_variant if r["campaign_id"] == name}
        if not rows:
            continue
        scored = sum(r["_scored"] for r in rows.values())
        baseline = sum(r["_p"] or 0.0 for r in rows.values()) / scored if scored else None
        smallest = min(r["recipients"] for r in rows.values())
        effect = (minimum_detectable_effect(smallest, baseline, len(variants))
                  if baseline is not None and 0 < baseline < 1 and len(variants) >= 2 else None)
        planned[name] = {"control": variants[0].name, "baseline": baseline, "minimum_detectable_effect": effect,
                         "variants": {v.name: {"share": v.share, "content_key": v.content_key or None,
                                               "recipients": rows[v.name]["recipients"] if v.name in rows else 0}
                                      for v in variants}}
    return planned


def run(ctx: StageContext) -> StageResult:
    settings = ctx.settings
    spark, tables, run_id = ctx.spark, ctx.tables, ctx.run_id
    campaigns = settings.enabled_campaigns
    started = datetime.now(timezone.utc)
    inputs, events = read_inputs(ctx)
    today, policy = send_day(inputs), settings.contact_policy
    known = None
    if inputs.segments is not None:
        known = {r[0] for r in inputs.segments.select("segment_id").distinct().collect()}  # k rows
    check_segments(campaigns, known)
    suppressed, blank = write_suppressed_users(spark, tables, settings, run_id)

    if not campaigns:
        tables.overwrite(C.CAMPAIGN_AUDIENCE.empty(spark), C.CAMPAIGN_AUDIENCE)
        tables.overwrite(C.CAPPED_CUSTOMERS.empty(spark), C.CAPPED_CUSTOMERS)
        return StageResult(rows_out=0, message="no enabled campaigns ([campaigns.<name>] with enabled = true)")
    over, notes = None, list(inputs.notes)
    if caps_apply(policy):
        planned = tables.read(spark, C.CAMPAIGN_SENDS) if tables.exists(spark, C.CAMPAIGN_SENDS) else None
        if events is None and planned is None:
            notes.append("contact_policy: no events and no campaign_sends yet, no send to cap by")
        else:
            over = over_policy(send_history(events, planned, today), policy, today)
    triggered, trigger_notes = trigger_lists(ctx, campaigns, inputs, events, today)
    notes += trigger_notes
    if triggered is not None:
        inputs.recommendations = inputs.recommendations.unionByName(triggered.drop("campaign_id", "trigger_ts"),
                                                                    allowMissingColumns=True)
    frame, capped, campaign_notes = programme_audience(inputs, campaigns, suppressed, settings.holdout.salt,
                                                       settings.holdout.control_share, run_id, policy, over,
                                                       settings.ab_tests)
    notes += campaign_notes
    tables.overwrite(frame, C.CAMPAIGN_AUDIENCE)
    tables.overwrite(capped, C.CAPPED_CUSTOMERS)
    audience = tables.read(spark, C.CAMPAIGN_AUDIENCE)
    # A re-run of the day replaces its plan: the caps count each day's sends once.
    sends = audience.select(F.lit(today).alias("send_date"), "campaign_id", "user_id", "variant", "run_id",
                            F.lit(None).cast("timestamp").alias("trigger_ts"))
    if triggered is not None:  # the event each triggered send answers: a later run sends it only for a later one
        causes = triggered.select("campaign_id", "user_id", "trigger_ts").distinct()
        sends = sends.drop("trigger_ts").join(causes, ["campaign_id", "user_id"], "left")
    tables.replace_where(sends, C.CAMPAIGN_SENDS, f"send_date = DATE'{today.isoformat()}'")

    sizes = {(r["campaign_id"], r["variant"]): r["count"]
             for r in audience.groupBy("campaign_id", "variant").count().collect()}  # campaigns x 3 rows
    kept_out = {(r["campaign_id"], r["rule"]): r["count"]
                for r in tables.read(spark, C.CAPPED_CUSTOMERS).groupBy("campaign_id", "rule").count().collect()}
    counts = {f"{c}.{v}": n for (c, v), n in sorted(sizes.items())}
    counts.update({f"{c}.capped.{rule}": n for (c, rule), n in sorted(kept_out.items())})
    tests = planned_tests(audience, settings.ab_tests)
    for name, test in tests.items():
        counts.update({f"{name}.test.{variant}": v["recipients"] for variant, v in test["variants"].items()})
        effect = test["minimum_detectable_effect"]
        arms = " / ".join(f"{variant}: {arm['recipients']}" for variant, arm in test["variants"].items())
        notes.append(f"{name} test: {arms}"
                     + (f", baseline {test['baseline']:.4f}: smallest difference found with 80% power "
                        f"{effect:+.4f}" if effect is not None else ", no purchase_probability: no detectable effect"))
    if blank:
        counts["suppressions.blank_user_id"] = blank
        notes.append(f"suppression lists: {blank} row(s) without a user_id suppress nobody")

    dropped = {name: products_passed_over(inputs, campaign, audience) for name, campaign in campaigns.items()}
    counts.update({f"{name}.products_dropped.{reason}": n for name, by_reason in dropped.items()
                   for reason, n in by_reason.items()})
    root = exports_root(ctx)
    if root is None:
        notes.append("exports skipped: catalog tables and no exports.dir")
    else:
        content = ProductContent(settings.exports.currency, settings.exports.image_url_template,
                                 settings.exports.link_template)
        for name in campaigns:
            directory = export_directory(root, name, run_id)
            manifest = write_export(spark, audience.where(F.col("campaign_id") == name), directory,
                                    settings.exports.formats, settings.exports.max_rows_per_file, name, run_id,
                                    started, publish=False, content=content, products_dropped=dropped[name],
                                    capped={rule: n for (c, rule), n in kept_out.items() if c == name},
                                    ab_test=tests.get(name))
            counts[f"{name}.exported"] = manifest["rows"]
            log.info("export of %s: %d rows, %s", name, manifest["rows"], directory)
    summary = ", ".join(f"{c}: " + "/".join(str(sizes.get((c, v), 0)) for v in ("treatment", "holdout", "global_control"))
                        for c in campaigns)
    message = f"audiences (treatment/holdout/global_control) {summary}" + (f"; exports under {root}" if root else "")
    if notes:
        message += "; " + "; ".join(notes)
    return StageResult(rows_out=sum(sizes.values()), message=message, counts=counts)


def publish(ctx: StageContext) -> None:
    """Make this run's exports readable (jobs.common.run_stage calls it after recording the success)."""
    root = exports_root(ctx)
    for directory in publish_exports(root, ctx.run_id) if root else []:
        log.info("export published: %s", directory)


def discard(ctx: StageContext) -> None:
    """Remove this failed run's exports (jobs.common.run_stage calls it after the rollback)."""
    root = exports_root(ctx)
    for directory in discard_exports(root, ctx.run_id) if root else []:
        log.warning("export of the failed run removed: %s", directory)


if __name__ == "__main__":
    main_for("build_audience")
