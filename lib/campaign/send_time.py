"""Best send time per user: the hour of week (UTC) with the most expected email reactions.

Evidence is each user's email opens and clicks (site visits count as a weaker signal, ``site_weight``)
in the ``lookback_days`` before the end of ``as_of``. Hour of day and weekday are estimated apart (a
user's 5 opens say much about an hour, little about 168 hour-of-week cells) and each is shrunk toward
the user's segment, itself shrunk toward everyone (Bayesian smoothing with Dirichlet pseudo-counts:
``prior_strength`` for a user, ``segment_prior_strength`` for a segment). The chosen hour of week
maximizes P(hour) x P(weekday) over the hours outside ``quiet_hours`` (local time of ``time_zone``).
Users with fewer than ``min_signals`` own email reactions get their segment's (or everyone's) best
hour: ``is_fallback``. ``confidence`` is the share of the estimate that is the user's own evidence.

Hours are computed from epoch seconds, so the session time zone never matters. Only 24 + 7 global
numbers and one row per segment are aggregated; per-user work stays distributed.
"""
from __future__ import annotations

from datetime import date, timedelta
from zoneinfo import ZoneInfo

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from lib.features.customers import SITE_TYPES, day_end
from lib.platform.settings import SendTimeSettings

HOURS, DAYS = 24, 7
EMAIL_REACTIONS = ("email_open", "email_click")


def epoch_hour(ts: Column) -> Column:
    return F.pmod(F.floor(ts.cast("long") / 3600), F.lit(HOURS)).cast("int")


def epoch_weekday(ts: Column) -> Column:
    """0 = Monday (1970-01-01 was a Thursday)."""
    return F.pmod(F.floor(ts.cast("long") / 86_400) + 3, F.lit(DAYS)).cast("int")


def local_hours_of_week(time_zone: str, as_of: date) -> list[tuple[int, int]]:
    """(local weekday, local hour) of each UTC hour of week, at the zone's UTC offset at the end of
    ``as_of`` (one offset for the whole week, so the local week is the UTC week shifted)."""
    offset = day_end(as_of).astimezone(ZoneInfo(time_zone)).utcoffset() or timedelta(0)
    shift = round(offset.total_seconds() / 3600)
    return [(((how + shift) % (DAYS * HOURS)) // HOURS, (how + shift) % HOURS) for how in range(DAYS * HOURS)]


def _dense(pairs: Column, size: int) -> Column:
    """An array of ``size`` doubles from an array of (k, w) structs (missing k: 0)."""
    as_map = F.map_from_entries(pairs)
    return F.transform(F.sequence(F.lit(0), F.lit(size - 1)), lambda i: F.coalesce(as_map[i], F.lit(0.0)))


def _shrink(counts: Column, total: Column, prior: Column, strength: float) -> Column:
    return F.transform(F.arrays_zip(counts.alias("c"), prior.alias("p")),
                       lambda z: (z["c"] + F.lit(strength) * z["p"]) / (total + F.lit(strength)))


def _best(hour_p: Column, day_p: Column, allowed: list[int]) -> Column:
    """The allowed hour of week with the largest P(hour) x P(weekday) (ties: the earliest)."""
    cells = F.transform(F.array(*[F.lit(how) for how in allowed]),
                        lambda how: F.struct((hour_p[how % HOURS] * day_p[F.floor(how / HOURS).cast("int")])
                                             .alias("p"), (-how).alias("neg")))
    return (-F.array_max(cells)["neg"]).cast("int")


def evidence(events: DataFrame, as_of: date, settings: SendTimeSettings) -> DataFrame:
    """(user_id, hour, weekday, weight, is_email) of the signals in the lookback window."""
    end = day_end(as_of)
    start = end - timedelta(days=settings.lookback_days)
    kind = F.col("event_type")
    weight = (F.when(kind == "email_open", 1.0).when(kind == "email_click", settings.click_weight)
              .when(kind.isin(*SITE_TYPES), settings.site_weight))
    window = (F.col("event_ts") >= F.lit(start.strftime("%Y-%m-%d %H:%M:%S")).cast("timestamp")) & \
             (F.col("event_ts") < F.lit(end.strftime("%Y-%m-%d %H:%M:%S")).cast("timestamp"))
    return (events.where(window).select("user_id", epoch_hour(F.col("event_ts")).alias("hour"),
                                        epoch_weekday(F.col("event_ts")).alias("weekday"), weight.alias("weight"),
                                        kind.isin(*EMAIL_REACTIONS).alias("is_email"))
            .where(F.col("weight") > 0))


def send_times(events: DataFrame, as_of: date, settings: SendTimeSettings, run_id: str,
               segments: DataFrame | None = None) -> DataFrame:
    """One send_times row per user with any event up to ``as_of`` (see the module docstring).
    ``segments``: (user_id, segment_id), e.g. user_segments; None: everyone shrinks to the global hour."""
    signals = evidence(events, as_of, settings)
    users = events.where(F.col("event_ts") < F.lit(day_end(as_of).strftime("%Y-%m-%d %H:%M:%S")).cast("timestamp")) \
        .select("user_id").distinct()
    if segments is not None:
        users = users.join(segments.select("user_id", "segment_id"), "user_id", "left")
    else:
        users = users.withColumn("segment_id", F.lit(None).cast("int"))

    totals_h = {r["hour"]: r["w"] for r in signals.groupBy("hour").agg(F.sum("weight").alias("w")).collect()}
    totals_d = {r["weekday"]: r["w"] for r in signals.groupBy("weekday").agg(F.sum("weight").alias("w")).collect()}
    global_h = [(totals_h.get(h, 0.0) + 1.0) / (sum(totals_h.values()) + HOURS) for h in range(HOURS)]
    global_d = [(totals_d.get(d, 0.0) + 1.0) / (sum(totals_d.values()) + DAYS) for d in range(DAYS)]
    g_h, g_d = F.array(*[F.lit(p) for p in global_h]), F.array(*[F.lit(p) for p in global_d])

    def profile(source: DataFrame, keys: list[str], prefix: str) -> DataFrame:
        """Weighted hour and weekday counts per key, as dense arrays, and their total."""
        by_hour = source.groupBy(*keys, "hour").agg(F.sum("weight").alias("w"))
        by_day = source.groupBy(*keys, "weekday").agg(F.sum("weight").alias("w"))
        hours = by_hour.groupBy(*keys).agg(_dense(F.collect_list(F.struct("hour", "w")), HOURS).alias(f"{prefix}_h"),
                                            F.sum("w").alias(f"{prefix}_total"))
        days = by_day.groupBy(*keys).agg(_dense(F.collect_list(F.struct("weekday", "w")), DAYS).alias(f"{prefix}_d"))
        return hours.join(days, keys)

    own = profile(signals, ["user_id"], "own").join(
        signals.groupBy("user_id").agg(F.sum(F.col("is_email").cast("long")).alias("n_signals")), "user_id")
    if segments is not None:
        seg = profile(signals.join(segments.select("user_id", "segment_id"), "user_id"), ["segment_id"], "seg")
        seg = seg.select("segment_id",
                         _shrink(F.col("seg_h"), F.col("seg_total"), g_h, settings.segment_prior_strength).alias("prior_h"),
                         _shrink(F.col("seg_d"), F.col("seg_total"), g_d, settings.segment_prior_strength).alias("prior_d"))
        users = users.join(F.broadcast(seg), "segment_id", "left")
    else:
        users = users.withColumn("prior_h", F.lit(None)).withColumn("prior_d", F.lit(None))
    rows = users.join(own, "user_id", "left").select(
        "user_id", "segment_id",
        F.coalesce("prior_h", g_h).alias("prior_h"), F.coalesce("prior_d", g_d).alias("prior_d"),
        F.coalesce("own_h", F.array_repeat(F.lit(0.0), HOURS)).alias("own_h"),
        F.coalesce("own_d", F.array_repeat(F.lit(0.0), DAYS)).alias("own_d"),
        F.coalesce("own_total", F.lit(0.0)).alias("own_total"),
        F.coalesce("n_signals", F.lit(0)).cast("long").alias("n_signals"))

    local = local_hours_of_week(settings.time_zone, as_of)
    quiet = set(settings.quiet_hours)
    allowed = [how for how, (_, hour) in enumerate(local) if hour not in quiet]
    post_h = _shrink(F.col("own_h"), F.col("own_total"), F.col("prior_h"), settings.prior_strength)
    post_d = _shrink(F.col("own_d"), F.col("own_total"), F.col("prior_d"), settings.prior_strength)
    fallback = F.col("n_signals") < settings.min_signals
    chosen = F.when(fallback, _best(F.col("prior_h"), F.col("prior_d"), allowed)) \
        .otherwise(_best(post_h, post_d, allowed))
    local_day = F.array(*[F.lit(d) for d, _ in local])
    local_hour = F.array(*[F.lit(h) for _, h in local])
    out = rows.select("user_id", "segment_id", "own_total", "n_signals", fallback.alias("is_fallback"),
                      chosen.alias("how"))
    return out.select(
        "user_id", F.col("how").alias("hour_of_week_utc"), F.floor(F.col("how") / HOURS).cast("int").alias("weekday_utc"),
        (F.col("how") % HOURS).cast("int").alias("hour_utc"), F.lit(settings.time_zone).alias("time_zone"),
        (local_day[F.col("how")] * HOURS + local_hour[F.col("how")]).alias("hour_of_week_local"),
        local_day[F.col("how")].alias("weekday_local"), local_hour[F.col("how")].alias("hour_local"),
        (F.col("own_total") / (F.col("own_total") + F.lit(settings.prior_strength))).alias("confidence"),
        "n_signals", "is_fallback", F.col("segment_id").cast("int").alias("segment_id"),
        F.lit(run_id).alias("run_id"))
