"""Campaign inputs: suppression lists and the checks of a campaign's settings against the data.

A suppression list (``input.suppressions``, or a campaign's own ``suppressions``) is a path (csv with
a header, json lines, parquet, a delta directory) or a catalog table with the columns ``user_id``
(required), ``reason`` (unsubscribed, bounced, complained, ...) and ``since``. Every listed user is
suppressed whatever the reason or date: a suppressed user is in no audience, no holdout assignment
and no export, and the recommendations API serves the global list's customers no personal content.
The lists hold ids as the source system knows them; they are mapped like ingest maps event ids
(pseudonyms when ``privacy.pseudonymize`` is on) into ``suppressed_users``, which the stages and the
API apply (docs/privacy.md).
"""
from __future__ import annotations

from functools import reduce

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.utils import AnalysisException

from lib.ingest.readers import infer_format
from lib.ingest.sources import clean, clean_id
from lib.platform import catalog as C
from lib.platform.privacy import as_stored, stage_key
from lib.platform.settings import CampaignSettings, Settings
from lib.platform.storage import Tables, is_delta_path

SUPPRESSION_SCHEMA = "user_id string, reason string, since timestamp, source string"


class CampaignInputError(ValueError):
    """A campaign's input or setting does not fit the data; the message names the key, column or file."""


def read_suppressions(spark: SparkSession, location: str, key: str) -> DataFrame:
    """The suppression list at ``location`` as (user_id, reason, since, source), ids cleaned like ingest's.

    Fails naming ``key`` and the location when it cannot be read or lacks ``user_id``. Rows without a
    user id suppress nobody: count them with ``blank_suppressions``."""
    try:
        fmt = infer_format(location, has_delta_log=is_delta_path(spark, location))
    except ValueError as err:
        raise CampaignInputError(f"config key '{key}': {err}") from None
    try:
        if fmt == "csv":
            raw = spark.read.option("header", True).csv(location)
        elif fmt == "json":
            raw = spark.read.json(location)
        elif fmt == "table":
            raw = spark.read.table(location)
        else:
            raw = spark.read.format(fmt).load(location)
        columns = {name.strip().lower(): name for name in raw.columns}
    except AnalysisException as err:
        raise CampaignInputError(f"config key '{key}': cannot read suppressions {location!r} ({fmt}): "
                                 f"{str(err).splitlines()[0]}") from None
    if "user_id" not in columns:
        raise CampaignInputError(f"config key '{key}': suppressions {location!r} lack column user_id "
                                 f"(columns: {', '.join(raw.columns) or 'none'})")

    def column(name: str, cast: str) -> F.Column:
        return F.col(f"`{columns[name]}`").cast(cast) if name in columns else F.lit(None).cast(cast)

    since = F.col(f"`{columns['since']}`").try_cast("timestamp") if "since" in columns else F.lit(None)
    return raw.select(
        clean_id(column("user_id", "string")).alias("user_id"),
        F.lower(clean(column("reason", "string"))).alias("reason"),
        since.cast("timestamp").alias("since"),
        F.lit(location).alias("source"),
    )


def suppression_rows(spark: SparkSession, global_location: str,
                     campaigns: dict[str, CampaignSettings]) -> DataFrame:
    """Every list's rows as (user_id, reason, since, source, campaign_id) with the ids as listed:
    ``campaign_id`` null for the global list (it suppresses every campaign), else the campaign's name."""
    lists = [read_suppressions(spark, global_location, "input.suppressions")
             .withColumn("campaign_id", F.lit(None).cast("string"))] if global_location else []
    lists += [read_suppressions(spark, campaign.suppressions, f"campaigns.{name}.suppressions")
              .withColumn("campaign_id", F.lit(name)) for name, campaign in campaigns.items() if campaign.suppressions]
    empty = spark.createDataFrame([], f"{SUPPRESSION_SCHEMA}, campaign_id string")
    return reduce(DataFrame.unionByName, lists, empty)


def suppressed_users(rows: DataFrame, key: bytes | None, identities: DataFrame | None, run_id: str) -> DataFrame:
    """The ``suppressed_users`` rows of ``suppression_rows``: ids mapped as ingest maps event ids
    (``lib.platform.privacy.as_stored``), rows without an id dropped (``blank_suppressions`` counts them)."""
    listed = rows.where(F.col("user_id").isNotNull())
    return as_stored(listed, key, identities).withColumn("run_id", F.lit(run_id)).distinct()


def without_suppressed(rows: DataFrame, suppressed: DataFrame) -> DataFrame:
    """``rows`` (with user_id and campaign_id) less those whose user the campaign must not reach."""
    everywhere = suppressed.where(F.col("campaign_id").isNull()).select("user_id").distinct()
    own = suppressed.where(F.col("campaign_id").isNotNull()).select("user_id", "campaign_id").distinct()
    return rows.join(everywhere, "user_id", "left_anti").join(own, ["user_id", "campaign_id"], "left_anti")


def write_suppressed_users(spark: SparkSession, tables: Tables, settings: Settings,
                           run_id: str) -> tuple[DataFrame, int]:
    """Overwrite ``suppressed_users`` from the enabled campaigns' lists as they are now; return the table
    as written and how many list rows carry no user id. Fails naming the key variable when
    pseudonymisation is on without one."""
    key = stage_key(settings.privacy)
    rows = suppression_rows(spark, settings.input.suppressions, settings.enabled_campaigns)
    identities = tables.read(spark, C.USER_IDENTITIES) if key and tables.exists(spark, C.USER_IDENTITIES) else None
    tables.overwrite(suppressed_users(rows, key, identities, run_id), C.SUPPRESSED_USERS)
    return tables.read(spark, C.SUPPRESSED_USERS), blank_suppressions(rows)


def blank_suppressions(suppressions: DataFrame) -> int:
    """How many rows of the lists carry no user id (they suppress nobody; reported, never dropped silently)."""
    return suppressions.where(F.col("user_id").isNull()).count()


def check_segments(campaigns: dict[str, CampaignSettings], known: set[int] | None) -> None:
    """Fail naming ``campaigns.<name>.segments`` when a campaign names a segment user_segments lacks
    (``known`` None: there is no user_segments table, so every named segment is unknown)."""
    for name, campaign in campaigns.items():
        unknown = sorted(set(campaign.segments) - (known or set()))
        if unknown:
            where = (f"user_segments has segments {', '.join(map(str, sorted(known)))} (a segment too small "
                     "to mail is merged: segment_profiles labels it '(empty: merged or unused)')" if known
                     else "there is no user_segments table (run segment_users)")
            raise CampaignInputError(f"config key 'campaigns.{name}.segments' names unknown segment(s) "
                                     f"{', '.join(map(str, unknown))}: {where}")
