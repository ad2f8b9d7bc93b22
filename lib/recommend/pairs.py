"""Pairs a list must not hold (already bought, excluded event types) and the translation between
ids and the matrix's integer indices.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F


def excluded_pairs(events: DataFrame, event_types: list[str]) -> DataFrame:
    """(user_id, item_id) pairs the user may not be recommended again (e.g. already bought)."""
    if not event_types:
        return events.sparkSession.createDataFrame([], "user_id string, item_id string")
    return events.where(F.col("event_type").isin(event_types)).select("user_id", "item_id").distinct()


def to_indexed(pairs: DataFrame, user_index: DataFrame, item_index: DataFrame) -> DataFrame:
    """(user_id, item_id, ...) -> (user_idx, item_idx, ...), dropping ids the indices lack."""
    return pairs.join(user_index, "user_id").join(item_index, "item_id").drop("user_id", "item_id")


def to_ids(recommended: DataFrame, user_index: DataFrame, item_index: DataFrame) -> DataFrame:
    """(user_idx, item_idx, ...) -> (user_id, item_id, ...)."""
    return recommended.join(user_index, "user_idx").join(item_index, "item_idx").drop("user_idx", "item_idx")
