"""Campaign inputs: suppression lists and the checks of a campaign's settings against the data.

A suppression list (``input.suppressions``, or a campaign's own ``suppressions``) is a path (csv with
a header, json lines, parquet, a delta directory) or a catalog table with the columns ``user_id``
(required), ``reason`` (unsubscribed, bounced, complained, ...) and ``since``. Every listed user is
suppressed whatever the reason or date: a suppressed user is in no audience and no export.
"""
from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.utils import AnalysisException

from lib.readers import infer_format
from lib.settings import CampaignSettings
from lib.sources import clean, clean_id
from lib.storage import is_delta_path

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


def suppression_lists(spark: SparkSession, global_location: str,
                      campaigns: dict[str, CampaignSettings]) -> tuple[DataFrame, dict[str, DataFrame]]:
    """(the global list, each campaign's list: the global one plus its own) as (user_id, reason, since, source)."""
    empty = spark.createDataFrame([], SUPPRESSION_SCHEMA)
    common = read_suppressions(spark, global_location, "input.suppressions") if global_location else empty
    per_campaign = {}
    for name, campaign in campaigns.items():
        own = (read_suppressions(spark, campaign.suppressions, f"campaigns.{name}.suppressions")
               if campaign.suppressions else None)
        per_campaign[name] = common if own is None else common.unionByName(own)
    return common, per_campaign


def blank_suppressions(suppressions: DataFrame) -> int:
    """How many rows of a list carry no user id (they suppress nobody; reported, never dropped silently)."""
    return suppressions.where(F.col("user_id").isNull()).count()


def check_segments(campaigns: dict[str, CampaignSettings], known: set[int] | None) -> None:
    """Fail naming ``campaigns.<name>.segments`` when a campaign names a segment user_segments lacks
    (``known`` None: there is no user_segments table, so every named segment is unknown)."""
    for name, campaign in campaigns.items():
        unknown = sorted(set(campaign.segments) - (known or set()))
        if unknown:
            where = (f"user_segments has segments {', '.join(map(str, sorted(known)))}" if known
                     else "there is no user_segments table (run segment_users)")
            raise CampaignInputError(f"config key 'campaigns.{name}.segments' names unknown segment(s) "
                                     f"{', '.join(map(str, unknown))}: {where}")
