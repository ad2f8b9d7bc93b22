"""Holdout and control groups: a deterministic hash of (salt, user id), never a random draw.

``bucket = first 60 bits of SHA-256("<salt>:<key>:<user_id>") mod 10000``. The global control bucket
hashes the key ``global``; a campaign's holdout bucket hashes the campaign id, so two campaigns'
holdouts are independent of each other and of the global control. An assignment depends only on the
salt and the ids: it is stable across runs, re-ingests and partitioning, and anyone can recompute it
outside Spark (``bucket_of``). An A/B/n test's variant hashes ``<campaign id>:ab`` (``ab_key``), so it
is independent of the holdout and the global control too.
"""
from __future__ import annotations

import hashlib

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

BUCKETS = 10_000
GLOBAL_KEY = "global"
VARIANTS = ("treatment", "holdout", "global_control")


def bucket_col(user_id_col: Column | str, key: Column | str, salt: str) -> Column:
    """The bucket (0..9999) of each user for ``key`` (a campaign id, or GLOBAL_KEY; a column or a string)."""
    user = F.col(user_id_col) if isinstance(user_id_col, str) else user_id_col
    digest = F.sha2(F.concat_ws(":", F.lit(salt), F.lit(key) if isinstance(key, str) else key, user), 256)
    return F.pmod(F.conv(F.substring(digest, 1, 15), 16, 10).cast("long"), F.lit(BUCKETS)).cast("int")


def bucket_of(user_id: str, key: str, salt: str) -> int:
    """The same bucket in plain Python (for services and audits)."""
    digest = hashlib.sha256(f"{salt}:{key}:{user_id}".encode()).hexdigest()
    return int(digest[:15], 16) % BUCKETS


def _threshold(share: float, name: str) -> int:
    if not 0.0 <= share < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {share}")
    return int(round(share * BUCKETS))


def assign_variant(user_id_col: Column | str, campaign_id: str, salt: str, holdout_share: float,
                   control_share: float) -> Column:
    """``global_control`` (never mailed by any campaign, ``control_share`` of all users), else
    ``holdout`` (``holdout_share`` of the rest, per campaign), else ``treatment``."""
    control = _threshold(control_share, "control_share")
    holdout = _threshold(holdout_share, "holdout_share")
    return (F.when(bucket_col(user_id_col, GLOBAL_KEY, salt) < control, F.lit("global_control"))
            .when(bucket_col(user_id_col, campaign_id, salt) < holdout, F.lit("holdout"))
            .otherwise(F.lit("treatment")))


def ab_key(campaign_id: str) -> str:
    """The hash key of a campaign's A/B/n split."""
    return f"{campaign_id}:ab"


def assign_test_variant(user_id_col: Column | str, campaign_id: str, salt: str,
                        shares: list[tuple[str, float]]) -> Column:
    """The A/B/n variant of each user: ``shares`` (variant id, share; adding up to 1) cut the buckets of
    ``ab_key(campaign_id)`` in order, the last variant taking what rounding leaves."""
    bucket = bucket_col(user_id_col, ab_key(campaign_id), salt)
    cuts, bound = [], 0.0
    for name, share in shares[:-1]:
        bound += share
        cuts.append((name, int(round(bound * BUCKETS))))
    chosen = F.lit(shares[-1][0])
    for name, cut in reversed(cuts):  # built backwards, so the first range a bucket falls in wins
        chosen = F.when(bucket < cut, F.lit(name)).otherwise(chosen)
    return chosen


def holdout_assignments(users: DataFrame, campaigns: dict[str, float], salt: str, control_share: float,
                        run_id: str) -> DataFrame:
    """One row per (user, campaign) of ``campaigns`` (campaign id -> holdout share): the variant and
    both buckets; without campaigns one row per user under ``GLOBAL_KEY`` (global_control or treatment).
    ``users`` needs a ``user_id`` column (duplicates are dropped)."""
    users = users.select("user_id").where(F.col("user_id").isNotNull()).distinct()
    if GLOBAL_KEY in campaigns:
        raise ValueError(f"campaign id {GLOBAL_KEY!r} is reserved for the global control")
    # No campaign: one row per user under the global key, so the global control is still recorded.
    campaigns = campaigns or {GLOBAL_KEY: 0.0}
    listed = F.explode(F.array(*[F.struct(F.lit(c).alias("campaign_id"), F.lit(float(s)).alias("share"))
                                 for c, s in campaigns.items()]))
    rows = users.select("user_id", listed.alias("c")).select("user_id", "c.campaign_id", "c.share")
    variant = F.lit(None).cast("string")
    for campaign, share in campaigns.items():
        variant = F.when(F.col("campaign_id") == campaign,
                         assign_variant("user_id", campaign, salt, share, control_share)).otherwise(variant)
    return rows.select(
        "user_id", "campaign_id",
        bucket_col("user_id", GLOBAL_KEY, salt).alias("control_bucket"),
        bucket_col("user_id", F.col("campaign_id"), salt).alias("campaign_bucket"),
        variant.alias("variant"),
        F.lit(run_id).alias("run_id"),
    )
