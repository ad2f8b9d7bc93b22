"""Leakage-free evaluation splits of the events table.

Two questions, two splits:

- ``holdout_forward`` (the default, ``[recommend] split = "forward"``): the task an email faces. Fit on
  every event up to a moment T, judge on what the customers seen before T do in the next
  ``horizon_days`` (T, T + h]. T defaults to the latest event minus h.
- ``holdout_latest`` (``split = "per_user"``): each user's latest share of events, whenever they happened;
  it asks "what does this user do next" regardless of the calendar (and lets later users' events into
  an earlier user's training side).

Everything a model trains on (weights, decay, indices, popularity) must then be computed from the
``train`` side alone; ``relevant_items`` turns the held-out side into the evaluation's ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F


@dataclass(frozen=True)
class Split:
    """Training events, held-out events, and the training side's end (its latest event time)."""

    train: DataFrame
    held_out: DataFrame
    train_end: datetime


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def holdout_latest(
    events: DataFrame,
    fraction: float = 0.2,
    cutoff: datetime | None = None,
    user_col: str = "user_id",
    ts_col: str = "event_ts",
    tie_col: str = "event_id",
) -> Split:
    """Hold out each user's latest events: the latest ``floor(fraction * n_user_events)``, or, when
    ``cutoff`` is given, every event after it (then ``fraction`` is ignored).

    Ties in time are broken by ``tie_col`` (then the item) so the split is repeatable. Users with
    fewer than ``1 / fraction`` events keep all of them in training.
    """
    for column in (user_col, ts_col):
        if column not in events.columns:
            raise ValueError(f"events lack column {column}; has {', '.join(events.columns)}")
    if cutoff is not None:
        cutoff_ts = F.lit(_as_utc(cutoff)).cast("timestamp")
        train = events.where(F.col(ts_col) <= cutoff_ts)
        held_out = events.where(F.col(ts_col) > cutoff_ts)
    else:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"holdout fraction must lie in (0, 1), got {fraction}")
        ties = [F.col(tie_col).desc()] if tie_col in events.columns else []
        latest_first = Window.partitionBy(user_col).orderBy(F.col(ts_col).desc(), *ties, F.col("item_id").desc())
        marked = (
            events.withColumn("_recency", F.row_number().over(latest_first))
            .withColumn("_n_user", F.count(F.lit(1)).over(Window.partitionBy(user_col)))
            .withColumn("_held_out", F.col("_recency") <= F.floor(F.col("_n_user") * F.lit(fraction)))
        )
        train = marked.where(~F.col("_held_out")).drop("_recency", "_n_user", "_held_out")
        held_out = marked.where(F.col("_held_out")).drop("_recency", "_n_user", "_held_out")
    train_end = train.agg(F.max(ts_col)).first()[0]
    if train_end is None:
        raise ValueError("the training side of the split is empty: lower the holdout fraction or move the cutoff later")
    return Split(train=train, held_out=held_out, train_end=_as_utc(train_end))


def holdout_forward(
    events: DataFrame,
    horizon_days: float,
    cutoff: datetime | None = None,
    ts_col: str = "event_ts",
) -> Split:
    """Train on every event up to ``cutoff`` T (default: the latest event minus ``horizon_days``), hold out
    the events of (T, T + horizon_days]; later events are in neither side. ``train_end`` is T itself (not
    the last training event), the moment every list of the split is made as of.

    Ground truth then comes from ``relevant_items`` / ``purchase_truth``, which keep the users the
    training side knows: the customers seen before T.
    """
    if ts_col not in events.columns:
        raise ValueError(f"events lack column {ts_col}; has {', '.join(events.columns)}")
    if horizon_days <= 0:
        raise ValueError(f"the forward split's horizon_days must be > 0, got {horizon_days}")
    horizon = timedelta(days=horizon_days)
    if cutoff is None:
        latest = events.agg(F.max(ts_col)).first()[0]
        if latest is None:
            raise ValueError("events are empty: nothing to split")
        cutoff = _as_utc(latest) - horizon
    cutoff = _as_utc(cutoff)
    start, end = F.lit(cutoff).cast("timestamp"), F.lit(cutoff + horizon).cast("timestamp")
    train = events.where(F.col(ts_col) <= start)
    if train.limit(1).count() == 0:
        raise ValueError(f"the training side of the forward split is empty: no event at or before {cutoff.isoformat()} "
                         f"(recommend.split_cutoff / recommend.horizon_days)")
    held_out = events.where((F.col(ts_col) > start) & (F.col(ts_col) <= end))
    return Split(train=train, held_out=held_out, train_end=cutoff)


def forward_split_fits(events: DataFrame, horizon_days: float, ts_col: str = "event_ts") -> tuple[bool, int]:
    """Whether ``events`` reach back two horizons before the default forward cutoff (the latest event minus
    ``horizon_days``), as a forward split with its validation at T - h needs; and the days they span."""
    first, last = events.agg(F.min(ts_col), F.max(ts_col)).first()
    if first is None:
        return False, 0
    span = (last - first).total_seconds() / 86_400.0
    return span >= 2.0 * horizon_days, int(span)


def relevant_items(
    held_out: DataFrame,
    train_users: DataFrame,
    excluded: DataFrame | None = None,
    user_col: str = "user_id",
    item_col: str = "item_id",
) -> DataFrame:
    """Ground truth (user, item): distinct held-out items of users the training side knows.

    Items in ``excluded`` (user, item) are dropped, since the recommender is not allowed to show
    them; items the training side never saw stay in (every model misses them alike).
    """
    truth = held_out.select(user_col, item_col).distinct().join(train_users.select(user_col).distinct(), user_col)
    if excluded is not None:
        truth = truth.join(excluded.select(user_col, item_col), [user_col, item_col], "left_anti")
    return truth


def user_history_end(train: DataFrame, user_col: str = "user_id", ts_col: str = "event_ts") -> DataFrame:
    """(user, history_end): each user's latest training event, the moment their held-out events follow.

    With a per-user holdout (``holdout_latest`` by fraction) each user's next events start after their
    own history, not after the training side's global end; a recommender that depends on time since
    an event (buy again) is scored as of this moment.
    """
    return train.groupBy(user_col).agg(F.max(ts_col).alias("history_end"))


def purchase_truth(held_out: DataFrame, train_users: DataFrame, bought_before: DataFrame | None,
                   purchase_types: list[str] | tuple[str, ...]) -> DataFrame:
    """(user_id, item_id, is_new): the distinct items bought in held-out events by users the training side
    knows; ``is_new`` is false for items in ``bought_before`` (user_id, item_id), the user's training purchases."""
    truth = (held_out.where(F.col("event_type").isin(list(purchase_types))).select("user_id", "item_id").distinct()
             .join(train_users.select("user_id").distinct(), "user_id"))
    if bought_before is None:
        return truth.withColumn("is_new", F.lit(True))
    before = bought_before.select("user_id", "item_id").distinct().withColumn("_before", F.lit(True))
    return truth.join(before, ["user_id", "item_id"], "left").select(
        "user_id", "item_id", F.col("_before").isNull().alias("is_new"))
