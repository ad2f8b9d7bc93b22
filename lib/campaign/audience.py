"""Campaign audiences: who gets which campaign, with which products, in which variant.

For each campaign: everyone with a recommendation list, joined to their segment, latest scores (with
the customer-value columns), send hour and last activity; the campaign's filters (segments, churn
bands, minimum purchase probability, minimum predicted CLV, next order expected soon, activity);
minus every suppressed user; minus customers the contact policy keeps out (over a cap, or taken by a
campaign of higher priority: ``lib.campaign.contact_policy``, ``programme_audience``); cut to
``max_audience`` (highest purchase_probability first, ties by user id, so the cut is deterministic);
then split by ``lib.campaign.holdout.assign_variant`` (a hash of the salt and the user id) into
treatment, holdout and global_control; a campaign with an A/B/n test splits its treatment into the
test's variants by a hash of its own (``with_test_variants``). The same inputs give the same rows and
variants on every run.

Products: the first ``products`` items of the campaign's list (``CampaignSettings.list_name``: its strategy's
recommendations, or a triggered campaign's trigger items, ``lib.campaign.triggers``, which the job adds to the
recommendations as the list ``trigger:<campaign>``), each with the catalog's name, category and price. With a catalog (``products``), an item it does not list or marks unavailable /
not recommendable is never shown: the next item of the list moves up (``dropped_products`` says which
were passed over, for the manifest). The segment's label comes from ``segment_profiles``.

A missing optional input (no customer_scores, send_times, user_segments yet) leaves its columns
null; ``AudienceInputs.notes`` says which, for the stage's message. A score filter never passes a
customer whose value is null (unscored, ineligible, or a customer_scores table written before the
column existed), so without customer_scores a campaign with a score filter is empty, as one with an
activity filter is without events.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import reduce

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.campaign.contact_policy import CAPPED_COLUMNS, capped_rows, priority_order, taken_rows
from lib.campaign.holdout import assign_test_variant, assign_variant
from lib.platform import catalog as C
from lib.platform.settings import AbVariantSettings, CampaignSettings, ContactPolicySettings


# customer_scores' customer-value columns: carried into campaign_audience and its exports as the scores hold them.
CUSTOMER_VALUE_COLUMNS = ("historic_clv", "predicted_clv", "total_clv", "p_alive", "expected_orders",
                          "avg_days_between_orders", "expected_next_order_date")
SCORE_COLUMNS = ("churn_band", "purchase_probability") + CUSTOMER_VALUE_COLUMNS


def _null_score(column: str) -> F.Column:
    """A null of the column's customer_scores type (the catalog's), named as the column."""
    return F.lit(None).cast(C.CUSTOMER_SCORES.schema[column].dataType.simpleString()).alias(column)


@dataclass
class AudienceInputs:
    """The tables an audience is built from, already read (None: the table does not exist)."""

    recommendations: DataFrame                 # user_id, rank, item_id, score, source
    segments: DataFrame | None = None          # user_id, segment_id
    segment_labels: DataFrame | None = None    # segment_id, label
    products: DataFrame | None = None          # the catalog: item_id, name, category, price, available, recommendable
    scores: DataFrame | None = None            # latest_scores: user_id, as_of, SCORE_COLUMNS (one as_of)
    send_times: DataFrame | None = None        # user_id, hour_utc
    activity: DataFrame | None = None          # user_id, last_active_ts
    activity_reference: datetime | None = None  # "now" of active_within_days
    notes: list[str] = field(default_factory=list)


def latest_scores(customer_scores: DataFrame) -> DataFrame:
    """The rows of the latest as_of: (user_id, as_of, *SCORE_COLUMNS); ineligible rows keep nulls, and a
    column the table lacks (written before it existed) is null."""
    latest = customer_scores.agg(F.max("as_of").alias("_latest"))
    return (customer_scores.join(F.broadcast(latest), F.col("as_of") == F.col("_latest"))
            .select("user_id", "as_of",
                    *[c if c in customer_scores.columns else _null_score(c) for c in SCORE_COLUMNS]))


def last_activity(events: DataFrame) -> DataFrame:
    """(user_id, last_active_ts): a customer's latest event other than a delivered email."""
    return (events.where(F.col("event_type") != "email_send")
            .groupBy("user_id").agg(F.max("event_ts").alias("last_active_ts")))


def _listed(recommendations: DataFrame, strategy: str, catalog: DataFrame | None) -> DataFrame:
    """The rows of the ``strategy`` lists with the catalog's name, category and price, and ``_dropped``:
    why the item cannot be shown (missing_from_catalog / unavailable), null when it can."""
    rows = recommendations.where(F.col("strategy") == strategy).select("user_id", "rank", "item_id", "score", "source")
    if catalog is None:
        return rows.select("*", F.lit(None).cast("string").alias("name"), F.lit(None).cast("string").alias("category"),
                           F.lit(None).cast("double").alias("price"), F.lit(None).cast("string").alias("_dropped"))
    details = catalog.select("item_id", "name", "category", "price",
                             (F.col("available") & F.col("recommendable")).alias("_shown"))
    why = F.when(F.col("_shown").isNull(), F.lit("missing_from_catalog")).when(~F.col("_shown"), F.lit("unavailable"))
    return rows.join(details, "item_id", "left").withColumn("_dropped", why).drop("_shown")


def product_lists(recommendations: DataFrame, products: int, strategy: str,
                  catalog: DataFrame | None = None) -> DataFrame:
    """(user_id, products): the first ``products`` items of a user's ``strategy`` list that can be shown,
    ranked 1.. again, as array<struct<item_id, rank, score, source, name, category, price>>. Users
    with no item to show have no row."""
    rows = _listed(recommendations, strategy, catalog)
    if catalog is None:  # nothing gives way: the first ``products`` ranks are the list
        rows = rows.where(F.col("rank") <= products)
    ranked = F.array_sort(F.collect_list(F.struct("rank", "item_id", "score", "source", "name", "category", "price")))
    shown = F.slice(ranked, 1, products)
    return (rows.where(F.col("_dropped").isNull()).groupBy("user_id")
            .agg(F.transform(shown, lambda p, i: F.struct(
                p["item_id"].alias("item_id"), (i + 1).cast("int").alias("rank"), p["score"].alias("score"),
                p["source"].alias("source"), p["name"].alias("name"), p["category"].alias("category"),
                p["price"].alias("price"))).alias("products")))


def dropped_products(recommendations: DataFrame, products: int, strategy: str, catalog: DataFrame) -> DataFrame:
    """(user_id, item_id, reason): items within the first ``products`` of a user's ``strategy`` list that the
    catalog does not let through (missing_from_catalog, unavailable): the ones the next items replaced."""
    return (_listed(recommendations, strategy, catalog)
            .where((F.col("rank") <= products) & F.col("_dropped").isNotNull())
            .select("user_id", "item_id", F.col("_dropped").alias("reason")))


def products_passed_over(inputs: AudienceInputs, campaign: CampaignSettings, audience: DataFrame) -> dict[str, int]:
    """Reason -> how many products the catalog kept out of the campaign's treatment lists
    (``dropped_products`` of the treatment customers of ``audience``); empty without a catalog."""
    if inputs.products is None:
        return {}
    treated = audience.where((F.col("campaign_id") == campaign.name) & (F.col("variant") == "treatment"))
    passed = dropped_products(inputs.recommendations, campaign.products, campaign.list_name, inputs.products)
    counted = passed.join(treated.select("user_id"), "user_id", "left_semi").groupBy("reason").count()
    return {r["reason"]: int(r["count"]) for r in counted.collect()}  # at most two rows


def _joined(inputs: AudienceInputs, campaign: CampaignSettings) -> DataFrame:
    people = product_lists(inputs.recommendations, campaign.products, campaign.list_name, inputs.products)
    null_int = F.lit(None).cast("int")
    if inputs.segments is not None:
        people = people.join(inputs.segments.select("user_id", "segment_id"), "user_id", "left")
    else:
        people = people.withColumn("segment_id", null_int)
    if inputs.segment_labels is not None:
        labels = inputs.segment_labels.select("segment_id", F.col("label").alias("segment_label"))
        people = people.join(F.broadcast(labels), "segment_id", "left")
    else:
        people = people.withColumn("segment_label", F.lit(None).cast("string"))
    if inputs.scores is not None:
        people = people.join(inputs.scores.select("user_id", F.col("as_of").alias("_scores_as_of"), *SCORE_COLUMNS),
                             "user_id", "left")
    else:
        people = people.select("*", F.lit(None).cast("date").alias("_scores_as_of"), *map(_null_score, SCORE_COLUMNS))
    if inputs.send_times is not None:
        people = people.join(inputs.send_times.select("user_id", F.col("hour_utc").alias("_hour")), "user_id", "left")
    else:
        people = people.withColumn("_hour", null_int)
    people = people.withColumn("send_hour_utc", F.coalesce(F.col("_hour"), F.lit(campaign.send_hour_utc)))
    if campaign.active_within_days and inputs.activity is not None:
        people = people.join(inputs.activity, "user_id", "left")
    return people


def eligible(inputs: AudienceInputs, campaign: CampaignSettings) -> tuple[DataFrame, list[str]]:
    """Customers passing the campaign's filters (before suppressions, cap and split), and notes on
    filters that could not be applied for want of a table."""
    people, notes = _joined(inputs, campaign), []
    if campaign.segments:
        people = people.where(F.col("segment_id").isin(list(campaign.segments)))
    score_filters = [key for key, on in (("churn_bands", bool(campaign.churn_bands)),
                                         ("min_purchase_probability", campaign.min_purchase_probability > 0),
                                         ("min_predicted_clv", campaign.min_predicted_clv > 0),
                                         ("next_order_within_days", campaign.next_order_within_days > 0)) if on]
    if score_filters and inputs.scores is None:
        # Nobody is scored, so nobody passes: a winback must not mail everyone before scoring has run.
        notes.append(f"{campaign.name}: no customer_scores, {' / '.join(score_filters)} passes nobody")
        people = people.where(F.lit(False))
    elif score_filters:
        # A null never passes a comparison: unscored customers and null values are left out.
        if campaign.churn_bands:
            people = people.where(F.col("churn_band").isin(list(campaign.churn_bands)))
        if campaign.min_purchase_probability > 0:
            people = people.where(F.col("purchase_probability") >= campaign.min_purchase_probability)
        if campaign.min_predicted_clv > 0:
            people = people.where(F.col("predicted_clv") >= campaign.min_predicted_clv)
        if campaign.next_order_within_days:
            days_ahead = F.datediff("expected_next_order_date", "_scores_as_of")
            people = people.where(days_ahead.between(0, campaign.next_order_within_days))
    if campaign.active_within_days:
        if inputs.activity is None or inputs.activity_reference is None:
            notes.append(f"{campaign.name}: no events, active_within_days passes nobody")
            people = people.where(F.lit(False))
        else:
            since = inputs.activity_reference - timedelta(days=campaign.active_within_days)
            people = people.where(F.col("last_active_ts") >= F.lit(since))
    return people, notes


def _cut_and_split(people: DataFrame, campaign: CampaignSettings, salt: str, control_share: float,
                   run_id: str) -> DataFrame:
    """The campaign_audience rows of a campaign's remaining ``people``: cut to ``max_audience`` (highest
    purchase_probability first, ties by user id), each with its variant."""
    if campaign.max_audience:
        people = (people.orderBy(F.col("purchase_probability").desc_nulls_last(), F.col("user_id"))
                  .limit(campaign.max_audience))
    return people.select(
        F.lit(campaign.name).alias("campaign_id"),
        "user_id",
        assign_variant("user_id", campaign.name, salt, campaign.holdout_share, control_share).alias("variant"),
        F.lit(None).cast("string").alias("test_variant"), F.lit(None).cast("string").alias("content_key"),
        "segment_id", "segment_label", "products", "churn_band", "purchase_probability", "send_hour_utc", *CUSTOMER_VALUE_COLUMNS,
        F.lit(run_id).alias("run_id"),
    )


def for_campaign(suppressed: DataFrame, campaign_id: str) -> DataFrame:
    """The rows of ``suppressed_users`` that suppress ``campaign_id``: the global list's and its own."""
    return suppressed.where(F.col("campaign_id").isNull() | (F.col("campaign_id") == campaign_id))


def with_test_variants(rows: DataFrame, inputs: AudienceInputs, campaign: CampaignSettings,
                       variants: tuple[AbVariantSettings, ...], salt: str) -> DataFrame:
    """``rows`` (a campaign's audience) with each treatment customer's A/B/n ``test_variant``
    (``lib.campaign.holdout.assign_test_variant``) and its ``content_key``; a variant with its own
    strategy or number of products shows its own list, or the campaign's when the customer has none of
    that strategy (the test compares "this list where there is one"). Holdout and control rows: null."""
    if not variants:
        return rows
    treated = F.col("variant") == "treatment"
    arm = assign_test_variant("user_id", campaign.name, salt, [(v.name, v.share) for v in variants])
    rows = rows.withColumn("test_variant", F.when(treated, arm))
    content = F.lit(None).cast("string")
    for variant in variants:
        content = F.when(F.col("test_variant") == variant.name,
                         F.lit(variant.content_key or None).cast("string")).otherwise(content)
    rows = rows.withColumn("content_key", content)
    for variant in variants:
        strategy, products = variant.strategy or campaign.list_name, variant.products or campaign.products
        if (strategy, products) == (campaign.list_name, campaign.products):
            continue
        own = product_lists(inputs.recommendations, products, strategy, inputs.products)
        rows = (rows.join(own.select("user_id", F.col("products").alias("_own")), "user_id", "left")
                .withColumn("products", F.when((F.col("test_variant") == variant.name) & F.col("_own").isNotNull(),
                                               F.col("_own")).otherwise(F.col("products")))
                .drop("_own"))
    return rows


def _unblocked(people: DataFrame, suppressed: DataFrame) -> DataFrame:
    blocked = suppressed.select("user_id").where(F.col("user_id").isNotNull()).distinct()
    return people.join(blocked, "user_id", "left_anti")


def programme_audience(inputs: AudienceInputs, campaigns: dict[str, CampaignSettings], suppressed: DataFrame,
                       salt: str, control_share: float, run_id: str, policy: ContactPolicySettings,
                       over: DataFrame | None = None,
                       tests: dict[str, tuple[AbVariantSettings, ...]] | None = None,
                       ) -> tuple[DataFrame, DataFrame, list[str]]:
    """Every campaign's campaign_audience rows under the contact policy (lib.campaign.contact_policy),
    the capped_customers rows (CAPPED_COLUMNS and run_id) and notes for the message.

    ``suppressed``: suppressed_users (campaign_id null: every campaign). ``over``: ``over_policy`` of the
    send history (user_id, rule, detail), None when no cap applies. ``tests``: campaign id -> its A/B/n
    variants (``Settings.ab_tests``)."""
    arbitrate = policy.arbitration == "priority"
    names = priority_order(campaigns) if arbitrate else list(campaigns)
    audiences, capped, notes = [], [], []
    taken = None  # user_id, taken_by: customers an earlier campaign has
    for position, name in enumerate(names):
        campaign = campaigns[name]
        people, campaign_notes = eligible(inputs, campaign)
        notes += campaign_notes
        people = _unblocked(people, for_campaign(suppressed, name))
        if over is not None:
            capped.append(capped_rows(people, over, name))
            people = people.join(over.select("user_id"), "user_id", "left_anti")
        if taken is not None:
            capped.append(taken_rows(people, taken, name))
            people = people.join(taken.select("user_id"), "user_id", "left_anti")
        rows = with_test_variants(_cut_and_split(people, campaign, salt, control_share, run_id), inputs, campaign,
                                  (tests or {}).get(name, ()), salt)
        if arbitrate and position < len(names) - 1:
            rows = rows.localCheckpoint()  # later campaigns read it: computed once, not once per campaign
            took = rows.select("user_id", F.lit(name).alias("taken_by"))
            taken = took if taken is None else taken.unionByName(took)
        audiences.append(rows)
    audience = reduce(DataFrame.unionByName, audiences)
    spark = audience.sparkSession
    none = spark.createDataFrame([], ", ".join(f"{c} string" for c in CAPPED_COLUMNS))
    kept_out = reduce(DataFrame.unionByName, capped, none).withColumn("run_id", F.lit(run_id))
    return audience, kept_out, notes
