"""Typed settings: one frozen dataclass per config section, built and validated once at job start.

``lib.platform.config`` merges conf/base.toml, environment overlays and ``--set`` into a dict whose keys and
types are already checked; ``Settings.from_config`` turns that dict into these dataclasses and runs
every range and cross-key check (each integer within ``INT_RANGES``, each float finite, then each
section's own rules), so a bad value fails before any stage reads or writes, naming its key. What
depends on the data (``segments.k`` against the matrix, ``recommend.top_n`` against the items) or on
the filesystem (``check_directories``) is checked by the job before its first write, with the same
messages. Stages and lib functions take the section they need, never the raw dict.

A section's fields mirror its TOML table one to one (a test holds them equal): a key added to
conf/base.toml needs a field here, and the other way round.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from lib.platform.config import ConfigError


def parse_utc(text: str, key: str) -> datetime | None:
    """An ISO-8601 date or time as an aware UTC datetime (naive means UTC); '' gives None."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"config key '{key}' expects an ISO-8601 date or time, got {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def require(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")


def one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


def usable_directory(location: str, key: str) -> None:
    """A local directory setting must name a directory this process may write, or one it may create
    under the nearest existing parent; checked at job start, or the first write fails as a Java error
    that names neither the key nor the path. Remote locations (s3://, dbfs:/, ...) are not checked."""
    if not location or re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", location) and not location.startswith("file:"):
        return
    path = Path(location.removeprefix("file:")).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        problem = f"{existing} is a file, not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable by this user"
    else:
        return
    raise ConfigError(f"config key '{key}' = {location!r} is not a usable directory: {problem}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """``cls(**values)``, recursing into nested section dataclasses; keys must match fields exactly."""
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    missing = sorted(names - set(values))
    if unknown or missing:  # conf/base.toml and this module disagree: a developer's error
        raise ConfigError(f"section '{prefix}' does not match its settings class {cls.__name__}: "
                          f"unknown {unknown}, missing {missing}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}.{name}")
        elif get_origin(hint) is dict and dataclasses.is_dataclass(get_args(hint)[1]):  # [campaigns.<name>]
            key = f"{prefix}.{name}".removeprefix("config.")
            kwargs[name] = {entry: _build_entry(get_args(hint)[1], entry, table, f"{key}.{entry}")
                            for entry, table in value.items()}
        elif isinstance(value, list):
            kwargs[name] = _typed_items(value, hint, f"{prefix}.{name}".removeprefix("config."))
        elif isinstance(value, dict):
            kwargs[name] = dict(value)
        else:
            kwargs[name] = value
        if not dataclasses.is_dataclass(hint):
            key = f"{prefix}.{name}".removeprefix("config.")
            _check_number(kwargs[name], key, key)
    return cls(**kwargs)


def _typed_scalar(value: Any, hint: Any, key: str) -> Any:
    """A scalar of type ``hint`` (bool, int, float, str); a string from ``--set`` is parsed."""
    if hint in (int, float) and isinstance(value, str):
        try:
            value = hint(value.strip())
        except ValueError:
            pass
    if hint is bool and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint in (bool, int, float, str) and (not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))):
        raise ConfigError(f"config key '{key}' expects a {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build_entry(cls: type, name: str, values: Any, key: str) -> Any:
    """One entry of a table of tables (``[campaigns.<name>]``): ``cls(name=name, **values)``, keys not
    given take the field's default; an unknown key or a wrong type fails naming ``<key>.<field>``."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{key}' must be a table, got {values!r}")
    hints = get_type_hints(cls)
    settable = {f.name for f in fields(cls)} - {"name"}
    unknown = sorted(set(values) - settable)
    if unknown:
        raise ConfigError(f"unknown config key '{key}.{unknown[0]}' (known: {', '.join(sorted(settable))})")
    kwargs: dict[str, Any] = {"name": name}
    for field_name, value in values.items():
        hint = hints[field_name]
        if isinstance(value, list):
            kwargs[field_name] = _typed_items(value, hint, f"{key}.{field_name}")
        elif get_origin(hint) is tuple:
            raise ConfigError(f"config key '{key}.{field_name}' expects a list, got {value!r}")
        else:
            kwargs[field_name] = _typed_scalar(value, hint, f"{key}.{field_name}")
        _check_number(kwargs[field_name], f"{key}.{field_name}", f"{key.split('.')[0]}.*.{field_name}")
    return cls(**kwargs)


def _typed_items(values: list, hint: Any, key: str) -> tuple:
    """A list as a tuple whose items have the element type ``tuple[T, ...]`` names (ints widen to floats)."""
    args = get_args(hint) if get_origin(hint) is tuple else ()
    item_type = args[0] if args else None
    items = []
    for value in values:
        if item_type in (int, float) and isinstance(value, str):  # `--set key=1,2` on a list without a typed default
            try:
                value = item_type(value.strip())
            except ValueError:
                pass
        if item_type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if item_type in (int, float, str) and (not isinstance(value, item_type) or isinstance(value, bool)):
            raise ConfigError(f"config key '{key}' expects a list of {item_type.__name__}, got {value!r}")
        items.append(value)
    return tuple(items)


INT32_MAX = 2**31 - 1
SEED_MAX = 2**31 - 2  # a stage also seeds with seed + 1; numpy and Spark both take it

# Every integer key's accepted range, inclusive; a list key's range holds for each item and a
# campaign key is ``campaigns.*.<key>``. Checked while the settings are built, before any stage, so a
# typo (an extra zero, a pasted id) fails naming its key instead of overflowing a Spark int, a numpy
# seed or the driver's memory. The upper bounds sit far above any real use; a test holds that every
# integer key has a range here.
INT_RANGES: dict[str, tuple[int, int]] = {
    "sample.users": (1, 1_000_000_000),
    "sample.items": (1, 100_000_000),
    "sample.events": (1, 10_000_000_000),
    "sample.segments": (1, 1000),
    "sample.seed": (0, SEED_MAX),
    "sample.days": (1, 36_500),
    "ingest.future_skew_minutes": (0, 525_600),         # a year
    "recommend.top_n": (1, 1000),                       # more is no email; the lists are built in memory per user block
    "recommend.min_history": (1, 1_000_000),
    "recommend.k_values": (1, 1000),
    "recommend.tune_k": (1, 1000),
    "recommend.buy_again_min_gaps": (1, 1_000_000),
    "recommend.eval_sample_users": (0, INT32_MAX),
    "recommend.ship_min_group_users": (1, INT32_MAX),
    "recommend.tune_sample_users": (0, INT32_MAX),
    "recommend.similar_top_k": (0, 1000),
    "recommend.similar_min_customers": (1, INT32_MAX),
    "recommend.similar_max_items": (2, 100_000),          # a customer adds up to max_items^2 pairs
    "recommend.als.ranks": (1, 1000),
    "recommend.als.max_candidates": (1, 1000),
    "recommend.als.max_iter": (1, 10_000),
    "recommend.als.seed": (0, SEED_MAX),
    "recommend.als.checkpoint_interval": (-1, 10_000),  # -1: never; 0 is refused below
    "recommend.als.num_blocks": (0, 100_000),
    "segments.k": (1, 1000),                            # k x k Grams and k segments live on the driver
    "segments.max_iter": (1, 100_000),
    "segments.seed": (0, SEED_MAX),
    "segments.inner_passes": (1, 1000),
    "segments.sketch_power_iterations": (0, 100),
    "segments.row_blocks": (0, 100_000),
    "segments.parallelism": (0, 100_000),
    "segments.col_blocks": (0, 100_000),
    "segments.block_nnz": (1, INT32_MAX),
    "segments.checkpoint_interval": (1, 100_000),
    "segments.top_items": (1, 1000),
    "segments.sweep_ks": (1, 1000),
    "segments.sweep_max_iter": (1, 100_000),
    "scores.horizon_days": (1, 3650),
    "scores.windows_days": (1, 3650),
    "scores.min_buyers": (1, INT32_MAX),
    "scores.min_history_days": (1, 3650),
    "scores.min_positives": (1, INT32_MAX),
    "scores.gbt_max_iter": (1, 10_000),
    "scores.gbt_max_depth": (1, 30),                    # Spark's own limit
    "scores.seed": (0, SEED_MAX),
    "scores.churn_horizon_days": (1, 3650),
    "scores.clv_horizon_days": (1, 3650),
    "scores.value_validation_days": (1, 3650),
    "scores.purchase_model_max_rows": (100, INT32_MAX),
    "send_time.lookback_days": (1, 3650),
    "send_time.min_signals": (1, 1_000_000),
    "send_time.quiet_hours": (0, 23),
    "drift.bins": (2, 100),                             # quantile bins of a numeric column's PSI
    "campaigns.*.segments": (0, 999),                   # segment ids: 0 .. segments.k - 1
    "campaigns.*.active_within_days": (0, 3650),
    "campaigns.*.next_order_within_days": (0, 3650),
    "campaigns.*.products": (1, 1000),
    "campaigns.*.max_audience": (0, INT32_MAX),
    "campaigns.*.send_hour_utc": (0, 23),
    "campaigns.*.priority": (-1000, 1000),
    "campaigns.*.trigger_after_hours": (0, 8760),
    "campaigns.*.trigger_within_hours": (1, 8760),
    "campaigns.*.trigger_min_views": (1, 1000),
    "ab_variants.*.products": (0, 1000),                # 0: the campaign's number
    "contact_policy.max_sends": (0, 1000),              # 0: no cap
    "contact_policy.per_days": (1, 365),
    "contact_policy.cooldown_days": (0, 365),           # 0: no cooldown
    "exports.max_rows_per_file": (1, INT32_MAX),
    "campaign_report.conversion_window_days": (1, 365),
    "spark.shuffle_partitions": (1, 100_000),
    "spark.delta_snapshot_partitions": (0, 100_000),
    "spark.file_listing_parallelism": (0, 100_000),
}


def _check_number(value: Any, key: str, rule: str) -> None:
    """A float (alone, in a list or a map) must be finite; an int (alone or in a list; a map such as
    spark.conf is free-form) within ``INT_RANGES[rule]``. ``key`` is the key as written, ``rule`` its entry."""
    items = list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, tuple) else [value]
    many = not (isinstance(value, (int, float)) and not isinstance(value, bool))
    for item in items:
        if isinstance(item, float):
            require(math.isfinite(item), key, f"must {'hold finite numbers' if many else 'be a finite number'}, "
                                              f"got {list(items) if many else item}")
        elif isinstance(item, int) and not isinstance(item, bool) and not isinstance(value, dict):
            if rule not in INT_RANGES:  # a developer's error, like a section that does not match its class
                raise ConfigError(f"integer key '{key}' has no range in lib.platform.settings.INT_RANGES")
            low, high = INT_RANGES[rule]
            shown = list(items) if many else item
            require(item >= low, key, f"must {'hold integers' if many else 'be'} >= {low}, got {shown}")
            require(item <= high, key, f"must {'hold integers' if many else 'be'} <= {high}, got {shown}")


def column_map_targets(columns: dict[str, str], allowed: tuple[str, ...], key: str, kind: str,
                       source: str) -> list[str]:
    """The targets of a source column -> column map, each one of ``allowed`` and none twice."""
    targets = list(columns.values())
    unknown = sorted(set(targets) - set(allowed))
    require(not unknown, key, f"maps to {', '.join(unknown)}, not {kind} columns ({', '.join(allowed)})")
    twice = sorted({name for name in targets if targets.count(name) > 1})
    require(not twice, key, f"maps several {source} columns to {', '.join(twice)}")
    return targets


# The catalog's columns: what ``products.columns`` may map a catalog file's column to.
CATALOG_COLUMNS = ("item_id", "name", "category", "price", "available", "recommendable")
# The input contract's columns: what ``input.columns`` may map a source column to.
CONTRACT_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "event_ts", "quantity", "revenue",
                    "campaign_id", "channel")
# The product attributes an event file may carry on every line: what ``input.item_columns`` may map to.
ITEM_ATTRIBUTE_COLUMNS = ("name", "category", "price")


@dataclass(frozen=True)
class InputSettings:
    events: str
    format: str
    timestamp_unit: str
    timestamp_format: str
    float_ids_as_int: bool
    event_type: str
    revenue_product: tuple[str, ...]
    columns: dict[str, str]
    event_type_map: dict[str, str]
    suppressions: str
    items: str
    item_columns: dict[str, str]

    def __post_init__(self) -> None:
        one_of(self.format, ("", "csv", "json", "parquet", "delta", "table"), "input.format")
        column_map_targets(self.item_columns, ITEM_ATTRIBUTE_COLUMNS, "input.item_columns", "product attribute",
                           "input")
        one_of(self.timestamp_unit, ("s", "ms", "us"), "input.timestamp_unit")
        targets = column_map_targets(self.columns, CONTRACT_COLUMNS, "input.columns", "contract", "input")
        require(not (self.event_type and "event_type" in targets), "input.event_type",
                "is set, so no input column may map to event_type (input.columns)")
        require(all(isinstance(name, str) and name for name in self.revenue_product), "input.revenue_product",
                "must hold input column names")
        require(not (self.revenue_product and "revenue" in targets), "input.revenue_product",
                "is set, so no input column may map to revenue (input.columns)")
        empty = sorted(key for key, value in self.event_type_map.items() if not value.strip())
        require(not empty, "input.event_type_map", f"maps {', '.join(empty)} to an empty event type")

    @property
    def source_names(self) -> dict[str, str]:
        """Contract column -> the input column it comes from (itself when not renamed)."""
        names = {name: name for name in CONTRACT_COLUMNS}
        names.update({target: source for source, target in self.columns.items()})
        return names


@dataclass(frozen=True)
class OutputSettings:
    root: str
    catalog: str
    schema: str

    def __post_init__(self) -> None:
        require(bool(self.root) or bool(self.catalog and self.schema), "output.root",
                "must be set, or output.catalog and output.schema")


@dataclass(frozen=True)
class SampleSettings:
    path: str
    mode: str
    users: int
    items: int
    events: int
    segments: int
    seed: int
    days: int
    end_date: str
    in_segment_share: float
    churn_fraction: float
    email_campaigns: bool

    def __post_init__(self) -> None:
        require(self.items >= 2 * self.segments, "sample.items", f"must be >= twice sample.segments ({self.segments})")
        one_of(self.mode, ("planted", "realistic"), "sample.mode")
        if self.mode == "realistic":  # lib.sample.realistic: 3 best sellers, 2+ items per segment and general
            require(self.items >= 3 + 2 * (self.segments + 1), "sample.items",
                    f"must be >= {3 + 2 * (self.segments + 1)} in realistic mode (sample.segments = {self.segments})")
        require(0.0 <= self.in_segment_share <= 1.0, "sample.in_segment_share", "must be in [0, 1]")
        require(0.0 <= self.churn_fraction < 1.0, "sample.churn_fraction", "must be in [0, 1)")
        parse_utc(self.end_date, "sample.end_date")


@dataclass(frozen=True)
class IngestSettings:
    event_types: tuple[str, ...]
    future_skew_minutes: int
    now: str
    csv_delimiter: str
    csv_multiline: bool
    encoding: str
    earliest_event_ts: str
    max_quarantine_share: float

    def __post_init__(self) -> None:
        require(len(self.event_types) > 0, "ingest.event_types", "must name at least one event type")
        require(len(set(self.event_types)) == len(self.event_types), "ingest.event_types", "has duplicates")
        require(len(self.csv_delimiter) == 1 and self.csv_delimiter not in '"\r\n', "ingest.csv_delimiter",
                "must be one character other than a quote or a line break")
        one_of(self.encoding, ("utf-8", "iso-8859-1", "us-ascii"), "ingest.encoding")
        require(0.0 <= self.max_quarantine_share <= 1.0, "ingest.max_quarantine_share", "must be in [0, 1]")
        parse_utc(self.now, "ingest.now")
        earliest = parse_utc(self.earliest_event_ts, "ingest.earliest_event_ts")
        now = parse_utc(self.now, "ingest.now")
        require(earliest is None or now is None or earliest < now, "ingest.earliest_event_ts",
                "must be before ingest.now")

    @property
    def now_utc(self) -> datetime | None:
        return parse_utc(self.now, "ingest.now")

    @property
    def earliest_utc(self) -> datetime | None:
        return parse_utc(self.earliest_event_ts, "ingest.earliest_event_ts")


@dataclass(frozen=True)
class InteractionsSettings:
    half_life_days: float
    as_of: str
    weights: dict[str, float]

    def __post_init__(self) -> None:
        require(self.half_life_days > 0, "interactions.half_life_days", f"must be > 0, got {self.half_life_days}")
        negative = sorted(name for name, weight in self.weights.items() if weight < 0)
        require(not negative, "interactions.weights", f"must be >= 0; negative for {', '.join(negative)}")
        parse_utc(self.as_of, "interactions.as_of")

    @property
    def as_of_utc(self) -> datetime | None:
        return parse_utc(self.as_of, "interactions.as_of")


# Every top-N user block holds the Python task's scores chunk (lib.recommend.topn.TopNBlocks.chunk_elements float32).
TOP_N_SCORES_CHUNK_MB = 8.0


@dataclass(frozen=True)
class AlsSettings:
    ranks: tuple[int, ...]
    reg_params: tuple[float, ...]
    alphas: tuple[float, ...]
    search: str
    max_candidates: int
    max_iter: int
    seed: int
    checkpoint_interval: int
    num_blocks: int
    top_n_user_block_mb: float
    top_n_item_block_mb: float
    top_n_broadcast_mb: float

    def __post_init__(self) -> None:
        for key in ("ranks", "reg_params", "alphas"):
            require(len(getattr(self, key)) > 0, f"recommend.als.{key}", "must hold at least one value")
        require(min(self.reg_params) >= 0, "recommend.als.reg_params", "must hold values >= 0")
        require(min(self.alphas) >= 0, "recommend.als.alphas", "must hold values >= 0")
        one_of(self.search, ("grid", "random"), "recommend.als.search")
        require(self.checkpoint_interval != 0, "recommend.als.checkpoint_interval",
                "must be >= 1, or -1 for never (Spark refuses 0)")
        require(self.top_n_user_block_mb > TOP_N_SCORES_CHUNK_MB, "recommend.als.top_n_user_block_mb",
                f"must be > {TOP_N_SCORES_CHUNK_MB:g} (the scores chunk every block holds), got {self.top_n_user_block_mb}")
        require(self.top_n_item_block_mb > 0, "recommend.als.top_n_item_block_mb", "must be > 0")
        require(self.top_n_broadcast_mb >= 0, "recommend.als.top_n_broadcast_mb", "must be >= 0")


@dataclass(frozen=True)
class RecommendSettings:
    top_n: int
    exclude_event_types: tuple[str, ...]
    min_history: int
    k_values: tuple[int, ...]
    tune_k: int
    split: str
    horizon_days: float
    holdout_fraction: float
    holdout_cutoff: str
    validation_fraction: float
    evaluate: bool
    model_dir: str
    strategies: tuple[str, ...]
    purchase_event_types: tuple[str, ...]
    buy_again_model: str
    buy_again_overdue_decay: float
    buy_again_min_gaps: int
    blend_prior_strength: float
    eval_sample_users: int
    tune_sample_users: int
    tune_stop_z: float
    ship_min_group_users: int
    similar_top_k: int
    similarity: str
    similar_min_customers: int
    similar_max_items: int
    als: AlsSettings

    def __post_init__(self) -> None:
        require(len(self.k_values) > 0, "recommend.k_values", "must hold at least one K")
        one_of(self.split, RECOMMEND_SPLITS, "recommend.split")
        one_of(self.buy_again_model, BUY_AGAIN_MODELS, "recommend.buy_again_model")
        require(self.horizon_days > 0, "recommend.horizon_days", "must be > 0")
        require(0.0 < self.holdout_fraction < 1.0, "recommend.holdout_fraction", "must be in (0, 1)")
        require(0.0 < self.validation_fraction < 1.0, "recommend.validation_fraction", "must be in (0, 1)")
        parse_utc(self.holdout_cutoff, "recommend.holdout_cutoff")
        unknown = sorted(set(self.strategies) - set(RECOMMEND_STRATEGIES))
        require(len(self.strategies) > 0 and not unknown, "recommend.strategies",
                f"must name some of {', '.join(RECOMMEND_STRATEGIES)}; got {list(self.strategies)}")
        require(len(self.purchase_event_types) > 0, "recommend.purchase_event_types", "must name an event type")
        require(self.buy_again_overdue_decay > 0, "recommend.buy_again_overdue_decay", "must be > 0")
        require(self.blend_prior_strength >= 0, "recommend.blend_prior_strength", "must be >= 0")
        require(self.tune_stop_z >= 0, "recommend.tune_stop_z", "must be >= 0 (0: never stop a candidate early)")
        one_of(self.similarity, ITEM_SIMILARITIES, "recommend.similarity")

    @property
    def holdout_cutoff_utc(self) -> datetime | None:
        return parse_utc(self.holdout_cutoff, "recommend.holdout_cutoff")

    def check_against_items(self, recommendable: int, indexed: int) -> None:
        """Before the stage's first write: a list cannot hold more items than may be recommended."""
        require(self.top_n <= recommendable, "recommend.top_n",
                f"must be <= the {recommendable} items that may be recommended ({indexed} in item_index less "
                f"{indexed - recommendable} excluded by products.exclude_item_patterns or the catalog), "
                f"got {self.top_n}")


@dataclass(frozen=True)
class ProductsSettings:
    format: str
    exclude_item_patterns: tuple[str, ...]
    exclude_categories: tuple[str, ...]
    columns: dict[str, str]

    def __post_init__(self) -> None:
        import re

        one_of(self.format, ("", "csv", "json", "parquet", "delta", "table"), "products.format")
        column_map_targets(self.columns, CATALOG_COLUMNS, "products.columns", "catalog", "catalog file")
        for key in ("exclude_item_patterns", "exclude_categories"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ConfigError(f"config key 'products.{key}' holds an invalid regular "
                                      f"expression {pattern!r}: {err}") from None
                require(bool(pattern), f"products.{key}", "must not hold an empty pattern")


# The [recommend] choices, named once here and used by lib.recommend.
RECOMMEND_SPLITS = ("forward", "per_user")
RECOMMEND_STRATEGIES = ("discover", "buy_again", "blended")
BUY_AGAIN_MODELS = ("logistic_regression", "gbt", "heuristic")
ITEM_SIMILARITIES = ("jaccard", "lift", "als_cosine")
# The interactions column the segments factorize: the time-decayed score, or an undecayed event count
# (a year of baskets with a 30-day half-life is mostly its last two months: docs/segments.md, findings).
SEGMENT_VALUE_COLUMNS = ("score", "n_events", "n_weighted_events")
# How a user's segment is picked from their segment weights W[u, l] * sum_i H[l, i]: "dominant" (the
# largest weight) or "relative" (the largest share over the average customer's share of that segment).
SEGMENT_ASSIGNMENTS = ("relative", "dominant")


@dataclass(frozen=True)
class SegmentsSettings:
    k: int
    solver: str
    max_iter: int
    tol: float
    init: str
    sketch_power_iterations: int
    seed: int
    inner_passes: int
    l1_w: float
    l2_w: float
    l1_h: float
    l2_h: float
    row_blocks: int
    parallelism: int
    col_blocks: int
    block_nnz: int
    broadcast_limit_mb: float
    checkpoint_interval: int
    transform: str
    value_column: str
    assignment: str
    idf_items: bool
    row_normalize: bool
    popular_share_cap: float
    min_segment_size: float
    distinct_min_support: float
    min_distinct_lift: float
    stability_check: bool
    top_items: int
    sweep_ks: tuple[int, ...]
    sweep_max_iter: int
    choose_k: bool
    report_dir: str

    def __post_init__(self) -> None:
        one_of(self.solver, ("hals", "mu"), "segments.solver")
        one_of(self.init, ("sketch_svd", "random_columns", "random"), "segments.init")
        one_of(self.transform, ("none", "log1p"), "segments.transform")
        one_of(self.value_column, SEGMENT_VALUE_COLUMNS, "segments.value_column")
        one_of(self.assignment, SEGMENT_ASSIGNMENTS, "segments.assignment")
        require(self.tol >= 0, "segments.tol", "must be >= 0")
        for key in ("l1_w", "l2_w", "l1_h", "l2_h"):
            require(getattr(self, key) >= 0, f"segments.{key}", "must be >= 0")
        require(self.broadcast_limit_mb > 0, "segments.broadcast_limit_mb", "must be > 0")
        require(0.0 < self.popular_share_cap <= 1.0, "segments.popular_share_cap",
                f"must be in (0, 1] (1: off), got {self.popular_share_cap}")
        require(0.0 <= self.min_segment_size < 1.0, "segments.min_segment_size",
                f"must be in [0, 1) (a fraction of the equal share 1 / k; 0: keep every segment), "
                f"got {self.min_segment_size}")
        require(not self.choose_k or bool(self.sweep_ks), "segments.choose_k",
                "needs the candidate k in segments.sweep_ks (e.g. [3, 4, 5, 6, 8])")
        require(0.0 < self.distinct_min_support <= 1.0, "segments.distinct_min_support",
                f"must be in (0, 1], got {self.distinct_min_support}")
        require(self.min_distinct_lift >= 1.0, "segments.min_distinct_lift",
                f"must be >= 1 (1: every segment with a distinctive item counts as distinct), got {self.min_distinct_lift}")

    def min_share(self, k: int) -> float:
        """The share of the assigned customers under which one of k segments is merged."""
        return self.min_segment_size / k

    def k_candidates(self) -> tuple[int, ...]:
        """The k the stage chooses among: ``k`` and, with ``choose_k``, every k of ``sweep_ks``."""
        return tuple(sorted({self.k, *self.sweep_ks})) if self.choose_k else (self.k,)

    def check_against_matrix(self, users: int, items: int) -> None:
        """Before the stage's first write: NMF of a users x items matrix has at most min(users, items)
        meaningful components; more leave empty segments that fail late (DIVIDE_BY_ZERO) after tables
        were written. ``users`` and ``items`` count the rows and columns with a non-zero entry."""
        limit = min(users, items)
        shape = f"the matrix has {users} users and {items} items with interactions"
        require(self.k <= limit, "segments.k", f"must be <= {limit}: {shape}; got {self.k}")
        require(all(k <= limit for k in self.sweep_ks), "segments.sweep_ks",
                f"must hold integers <= {limit}: {shape}; got {list(self.sweep_ks)}")


SCORE_MODELS = ("logistic_regression", "gbt", "bgnbd")
CHURN_DEFINITIONS = ("no_site_activity", "no_order")


@dataclass(frozen=True)
class ScoresSettings:
    as_of: str
    horizon_days: int
    churn_definition: str
    churn_horizon_days: int
    windows_days: tuple[int, ...]
    churn_band_medium: float
    churn_band_high: float
    min_buyers: int
    min_history_days: int
    min_positives: int
    models: tuple[str, ...]
    calibration: str
    gbt_max_iter: int
    gbt_max_depth: int
    lr_reg_param: float
    seed: int
    clv_horizon_days: int
    value_validation_days: int
    purchase_model_max_rows: int
    report_dir: str

    def __post_init__(self) -> None:
        parse_utc(self.as_of, "scores.as_of")
        one_of(self.churn_definition, CHURN_DEFINITIONS, "scores.churn_definition")
        require(len(self.windows_days) > 0, "scores.windows_days", "must hold at least one window")
        require(len(set(self.windows_days)) == len(self.windows_days), "scores.windows_days", "has duplicates")
        require(0.0 < self.churn_band_medium < 1.0, "scores.churn_band_medium",
                f"must be in (0, 1), got {self.churn_band_medium}")
        require(0.0 < self.churn_band_high < 1.0, "scores.churn_band_high",
                f"must be in (0, 1), got {self.churn_band_high}")
        require(self.churn_band_medium < self.churn_band_high, "scores.churn_band_high",
                f"must be above scores.churn_band_medium ({self.churn_band_medium}): the bands would overlap, "
                f"got {self.churn_band_high}")
        require(len(self.models) > 0, "scores.models", "must name at least one model")
        for name in self.models:
            one_of(name, SCORE_MODELS, "scores.models")
        one_of(self.calibration, ("isotonic", "platt"), "scores.calibration")
        require(self.lr_reg_param >= 0, "scores.lr_reg_param", "must be >= 0")

    @property
    def as_of_utc(self) -> datetime | None:
        return parse_utc(self.as_of, "scores.as_of")

    def target_horizon(self, target: str) -> int:
        """Days after the cutoff a target's outcome is read from: churn as "no order" has its own horizon."""
        if target == "churn" and self.churn_definition == "no_order":
            return self.churn_horizon_days
        return self.horizon_days


@dataclass(frozen=True)
class SendTimeSettings:
    lookback_days: int
    min_signals: int
    prior_strength: float
    segment_prior_strength: float
    click_weight: float
    site_weight: float
    time_zone: str
    quiet_hours: tuple[int, ...]

    def __post_init__(self) -> None:
        for key in ("prior_strength", "segment_prior_strength"):
            require(getattr(self, key) > 0, f"send_time.{key}", f"must be > 0, got {getattr(self, key)}")
        for key in ("click_weight", "site_weight"):
            require(getattr(self, key) >= 0, f"send_time.{key}", f"must be >= 0, got {getattr(self, key)}")
        try:
            import zoneinfo
            zoneinfo.ZoneInfo(self.time_zone)
        except (ValueError, KeyError, zoneinfo.ZoneInfoNotFoundError):
            raise ConfigError(f"config key 'send_time.time_zone' must be an IANA time zone, got {self.time_zone!r}") \
                from None
        require(len(set(self.quiet_hours)) < 24, "send_time.quiet_hours", "must leave at least one hour to send")


@dataclass(frozen=True)
class HoldoutSettings:
    salt: str
    control_share: float

    def __post_init__(self) -> None:
        require(bool(self.salt), "holdout.salt", "must not be empty")
        require(0.0 <= self.control_share < 1.0, "holdout.control_share", f"must be in [0, 1), got {self.control_share}")


ARBITRATIONS = ("priority", "none")


@dataclass(frozen=True)
class ContactPolicySettings:
    """How often a customer may be mailed, across campaigns (lib.campaign.contact_policy)."""

    max_sends: int       # 0: no cap; else at most this many sends in any per_days days, today's included
    per_days: int
    cooldown_days: int   # 0: none; else no send within this many days after the last one
    arbitration: str     # "priority": one campaign per customer and run; "none": every campaign it qualifies for

    def __post_init__(self) -> None:
        one_of(self.arbitration, ARBITRATIONS, "contact_policy.arbitration")


CHURN_BANDS = ("low", "medium", "high")
# What can trigger a campaign (lib.campaign.triggers); "" is a scheduled campaign.
TRIGGERS = ("abandoned_cart", "browse_abandonment", "replenishment_due", "back_in_stock", "price_drop")
TRIGGER_EVENT_TYPES = {"abandoned_cart": ("add_to_cart", "purchase"), "browse_abandonment": ("view",),
                       "replenishment_due": ("purchase",), "back_in_stock": ("view",), "price_drop": ("view",)}
EXPORT_FORMATS = ("csv", "json")


@dataclass(frozen=True)
class CampaignSettings:
    """One ``[campaigns.<name>]`` table (the name is the campaign id); keys left out take these defaults.
    The single home of per-campaign settings, holdout share included (plan_sends and build_audience)."""

    name: str
    enabled: bool = True
    segments: tuple[int, ...] = ()             # empty: every segment
    churn_bands: tuple[str, ...] = ()          # empty: every band (and customers without a score)
    min_purchase_probability: float = 0.0      # > 0: customers without a purchase_probability are left out
    min_predicted_clv: float = 0.0             # > 0: customers without a predicted_clv are left out
    next_order_within_days: int = 0            # > 0: next order expected within this many days of the scores' as_of
    active_within_days: int = 0                # 0: no activity filter
    products: int = 4                          # products per person (<= recommend.top_n)
    strategy: str = "blended"                  # which recommendations list: discover | buy_again | blended
    holdout_share: float = 0.1                 # of the audience outside the global control
    max_audience: int = 0                      # 0: no cap; else the highest purchase_probability first
    suppressions: str = ""                     # extra suppression list (path or table) on top of input.suppressions
    send_hour_utc: int = 9                     # hour for customers without a send_times row
    priority: int = 0                          # contact_policy.arbitration = "priority": the highest wins a customer
    trigger: str = ""                          # "": scheduled; else one of TRIGGERS (lib.campaign.triggers)
    trigger_after_hours: int = 4               # a trigger event at least this old (the customer had time to buy)
    trigger_within_hours: int = 72             # and at most this old (replenishment: due within this many hours)
    trigger_min_views: int = 2                 # browse_abandonment: views of an item in the window

    def __post_init__(self) -> None:
        key = f"campaigns.{self.name}"
        require(bool(re.fullmatch(r"[A-Za-z0-9_-]+", self.name)) and self.name != "global", key,
                "must be named by letters, digits, '_' or '-' (and not 'global', the global control's key)")
        for band in self.churn_bands:
            one_of(band, CHURN_BANDS, f"{key}.churn_bands")
        require(0.0 <= self.min_purchase_probability <= 1.0, f"{key}.min_purchase_probability",
                f"must be in [0, 1], got {self.min_purchase_probability}")
        require(self.min_predicted_clv >= 0.0, f"{key}.min_predicted_clv",
                f"must be >= 0 (0: no filter), got {self.min_predicted_clv}")
        one_of(self.strategy, ("discover", "buy_again", "blended"), f"{key}.strategy")
        if self.trigger:
            one_of(self.trigger, TRIGGERS, f"{key}.trigger")
        require(self.trigger_after_hours < self.trigger_within_hours, f"{key}.trigger_after_hours",
                f"must be below trigger_within_hours ({self.trigger_within_hours}), got {self.trigger_after_hours}")
        require(0.0 <= self.holdout_share < 1.0, f"{key}.holdout_share", f"must be in [0, 1), got {self.holdout_share}")

    @property
    def list_name(self) -> str:
        """The list its customers' products come from: its trigger's items, else its recommendation strategy."""
        return f"trigger:{self.name}" if self.trigger else self.strategy


@dataclass(frozen=True)
class AbVariantSettings:
    """One ``[ab_variants.<id>]`` table: a variant of a campaign's A/B/n test (the id names it)."""

    name: str
    campaign: str = ""         # the campaign whose treatment customers the test splits
    share: float = 0.0         # of the campaign's treatment; a campaign's shares add up to 1
    control: bool = False      # the variant the others are compared with (default: the first id)
    strategy: str = ""         # "": the campaign's list
    products: int = 0          # 0: the campaign's number
    content_key: str = ""      # passed through to the export (a subject line's or template's key)

    def __post_init__(self) -> None:
        key = f"ab_variants.{self.name}"
        require(bool(re.fullmatch(r"[A-Za-z0-9_-]+", self.name)), key, "must be named by letters, digits, '_' or '-'")
        require(bool(self.campaign), f"{key}.campaign", "must name the campaign it tests")
        require(0.0 < self.share <= 1.0, f"{key}.share", f"must be in (0, 1], got {self.share}")
        if self.strategy:
            one_of(self.strategy, ("discover", "buy_again", "blended"), f"{key}.strategy")


@dataclass(frozen=True)
class ExportsSettings:
    dir: str
    max_rows_per_file: int
    formats: tuple[str, ...]
    currency: str
    image_url_template: str
    link_template: str

    def __post_init__(self) -> None:
        import re

        require(len(self.formats) > 0, "exports.formats", "must name at least one format")
        require(not self.currency or re.fullmatch(r"[A-Z]{3}", self.currency) is not None, "exports.currency",
                f"must be an ISO 4217 code such as EUR or USD, or empty; got {self.currency!r}")
        for key in ("image_url_template", "link_template"):
            template = getattr(self, key)
            require(not template or "{item_id}" in template, f"exports.{key}",
                    f"must hold {{item_id}} (replaced by each product's id), or be empty; got {template!r}")
        for fmt in self.formats:
            one_of(fmt, EXPORT_FORMATS, "exports.formats")
        require("://" not in self.dir or self.dir.startswith("file:"), "exports.dir",
                f"must be a local or mounted path (/dbfs, /Volumes): the manifest is written with plain file I/O, "
                f"got {self.dir!r}")


@dataclass(frozen=True)
class CampaignReportSettings:
    conversion_window_days: int
    report_dir: str


@dataclass(frozen=True)
class PrivacySettings:
    pseudonymize: bool
    key_env: str
    secret_scope: str
    secret_key: str
    erasure_request: str
    vacuum_retention_hours: float

    def __post_init__(self) -> None:
        require(bool(self.key_env), "privacy.key_env", "must name an environment variable")
        require(not self.secret_scope or bool(self.secret_key), "privacy.secret_key",
                "must be set when privacy.secret_scope is")
        require(self.vacuum_retention_hours >= 0, "privacy.vacuum_retention_hours", "must be >= 0")


@dataclass(frozen=True)
class QualitySettings:
    enabled: bool
    max_row_drop: float
    max_segment_share: float
    min_recommended_user_share: float

    def __post_init__(self) -> None:
        for key in ("max_row_drop", "max_segment_share", "min_recommended_user_share"):
            require(0.0 <= getattr(self, key) <= 1.0, f"quality.{key}", f"must be in [0, 1], got {getattr(self, key)}")


DRIFT_ACTIONS = ("warn", "fail")


@dataclass(frozen=True)
class DriftSettings:
    enabled: bool
    bins: int
    psi_warn: float
    psi_fail: float
    action: str

    def __post_init__(self) -> None:
        require(self.psi_warn > 0, "drift.psi_warn", f"must be > 0, got {self.psi_warn}")
        require(self.psi_fail >= self.psi_warn, "drift.psi_fail",
                f"must be >= drift.psi_warn ({self.psi_warn}), got {self.psi_fail}")
        one_of(self.action, DRIFT_ACTIONS, "drift.action")


PROMOTION_ACTIONS = ("keep_previous", "warn")


@dataclass(frozen=True)
class PromotionSettings:
    action: str
    min_segment_stability: float

    def __post_init__(self) -> None:
        one_of(self.action, PROMOTION_ACTIONS, "promotion.action")
        require(0.0 <= self.min_segment_stability <= 1.0, "promotion.min_segment_stability",
                f"must be in [0, 1], got {self.min_segment_stability}")


@dataclass(frozen=True)
class TrackingSettings:
    enabled: bool
    tracking_uri: str
    experiment: str
    registry_uri: str
    registry_prefix: str

    def __post_init__(self) -> None:
        require(bool(self.experiment.strip()), "tracking.experiment", "must name an MLflow experiment")
        require(bool(re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", self.registry_prefix)),
                "tracking.registry_prefix", "must be dot-separated names (letters, digits, '_' or '-'), "
                f"e.g. \"email_personalization\" or \"main.email_personalization\", got {self.registry_prefix!r}")


# A JVM heap size as spark-submit takes it: digits and a unit (k, m, g, t), e.g. "2g" or "1536m".
MEMORY_SIZE = re.compile(r"(\d+)([kmgt])", re.IGNORECASE)
MEMORY_UNIT_MB = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
MIN_JVM_MEMORY_MB = 512  # below it Spark refuses to start (its 300 MB reserve times 1.5)


def memory_mb(value: str, key: str) -> float:
    """Megabytes of a JVM heap size such as "2g" or "1536m", or a ConfigError naming ``key``."""
    match = MEMORY_SIZE.fullmatch(value)
    require(match is not None, key, f"must be a size such as \"2g\" or \"1536m\" (digits and k, m, g or t), "
                                    f"got {value!r}")
    return int(match.group(1)) * MEMORY_UNIT_MB[match.group(2).lower()]


@dataclass(frozen=True)
class SparkSettings:
    shuffle_partitions: int
    delta_snapshot_partitions: int
    file_listing_parallelism: int
    driver_memory: str
    executor_memory: str
    conf: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("driver_memory", "executor_memory"):
            value = getattr(self, key)
            if value:  # empty: the cluster's (or Spark's) own setting
                require(memory_mb(value, f"spark.{key}") >= MIN_JVM_MEMORY_MB, f"spark.{key}",
                        f"must be at least {MIN_JVM_MEMORY_MB}m, got {value!r}")

    def runtime_conf(self) -> dict[str, str]:
        """The runtime Spark SQL settings of this section (0 leaves Spark's or Delta's own default)."""
        conf = {"spark.sql.shuffle.partitions": str(self.shuffle_partitions), "spark.sql.session.timeZone": "UTC"}
        if self.delta_snapshot_partitions:
            conf["spark.databricks.delta.snapshotPartitions"] = str(self.delta_snapshot_partitions)
        if self.file_listing_parallelism:
            conf["spark.sql.sources.parallelPartitionDiscovery.parallelism"] = str(self.file_listing_parallelism)
        return {**conf, **{key: str(value) for key, value in self.conf.items()}}

    def submit_options(self) -> list[str]:
        """The spark-submit options these settings ask for (the heap sizes must reach the JVM before it starts)."""
        options = []
        if self.driver_memory:
            options += ["--driver-memory", self.driver_memory]
        if self.executor_memory:
            options += ["--executor-memory", self.executor_memory]
        return options


@dataclass(frozen=True)
class Settings:
    """Every section of the configuration, validated, with the cross-section checks."""

    input: InputSettings
    output: OutputSettings
    sample: SampleSettings
    ingest: IngestSettings
    interactions: InteractionsSettings
    recommend: RecommendSettings
    products: ProductsSettings
    segments: SegmentsSettings
    scores: ScoresSettings
    send_time: SendTimeSettings
    holdout: HoldoutSettings
    quality: QualitySettings
    drift: DriftSettings
    promotion: PromotionSettings
    tracking: TrackingSettings
    campaigns: dict[str, CampaignSettings]
    contact_policy: ContactPolicySettings
    ab_variants: dict[str, AbVariantSettings]
    exports: ExportsSettings
    campaign_report: CampaignReportSettings
    privacy: PrivacySettings
    spark: SparkSettings

    def __post_init__(self) -> None:
        event_types = set(self.ingest.event_types)
        missing = [name for name in self.ingest.event_types if name not in self.interactions.weights]
        require(not missing, "interactions.weights", f"lacks a weight for event type(s) {', '.join(missing)} "
                                                     "(ingest.event_types)")
        unknown = sorted(set(self.recommend.exclude_event_types) - event_types)
        require(not unknown, "recommend.exclude_event_types",
                f"names event type(s) {', '.join(unknown)} that ingest.event_types lacks "
                f"({', '.join(self.ingest.event_types)})")
        unknown = sorted(set(self.recommend.purchase_event_types) - event_types)
        require(not unknown, "recommend.purchase_event_types",
                f"names event type(s) {', '.join(unknown)} that ingest.event_types lacks")
        require("email_send" in event_types or not self.sample.email_campaigns, "ingest.event_types",
                "must include email_send when sample.email_campaigns generates it")
        require(not (self.output.catalog and self.output.schema) or bool(self.recommend.model_dir),
                "recommend.model_dir", "must be set when tables are catalog tables (output.catalog)")
        for name, campaign in self.campaigns.items():
            require(campaign.products <= self.recommend.top_n, f"campaigns.{name}.products",
                    f"must be <= recommend.top_n ({self.recommend.top_n}), got {campaign.products}")
            require(bool(campaign.trigger) or campaign.strategy in self.recommend.strategies,
                    f"campaigns.{name}.strategy", f"names {campaign.strategy!r}, a list recommend.strategies does "
                    f"not write ({', '.join(self.recommend.strategies)})")
            needs = TRIGGER_EVENT_TYPES.get(campaign.trigger, ()) if campaign.enabled else ()
            require(set(needs) <= event_types, f"campaigns.{name}.trigger",
                    f"{campaign.trigger} reads {' and '.join(needs)} events, which ingest.event_types lacks")
        for campaign, variants in self.ab_tests.items():
            key = f"ab_variants.{variants[0].name}"
            require(campaign in self.campaigns, f"{key}.campaign",
                    f"names {campaign!r}, which is not a campaign ({', '.join(self.campaigns)})")
            require(len(variants) >= 2, f"{key}.campaign", f"{campaign!r} has one variant; a test needs two or more")
            total = sum(v.share for v in variants)
            require(abs(total - 1.0) < 1e-9, f"{key}.share",
                    f"the shares of {campaign!r}'s variants must add up to 1, got {total:g}")
            require(sum(v.control for v in variants) <= 1, f"{key}.control",
                    f"{campaign!r} has more than one control variant")
            for variant in variants:
                vkey = f"ab_variants.{variant.name}"
                require(not variant.strategy or variant.strategy in self.recommend.strategies, f"{vkey}.strategy",
                        f"names {variant.strategy!r}, a list recommend.strategies does not write")
                require(variant.products <= self.recommend.top_n, f"{vkey}.products",
                        f"must be <= recommend.top_n ({self.recommend.top_n}), got {variant.products}")

    @property
    def ab_tests(self) -> dict[str, tuple[AbVariantSettings, ...]]:
        """Campaign id -> its test's variants, the control first (the declared one, else the first id)."""
        tests: dict[str, list[AbVariantSettings]] = {}
        for variant in sorted(self.ab_variants.values(), key=lambda v: v.name):
            tests.setdefault(variant.campaign, []).append(variant)
        return {campaign: tuple(sorted(variants, key=lambda v: not v.control))  # stable: ids stay in order
                for campaign, variants in tests.items()}

    @property
    def enabled_campaigns(self) -> dict[str, CampaignSettings]:
        """The campaigns to build, by id (``[campaigns.<name>]`` with enabled = true)."""
        return {name: campaign for name, campaign in self.campaigns.items() if campaign.enabled}

    @property
    def holdout_shares(self) -> dict[str, float]:
        """Campaign id -> holdout share of the enabled campaigns (for lib.campaign.holdout.holdout_assignments)."""
        return {name: campaign.holdout_share for name, campaign in self.enabled_campaigns.items()}

    def check_directories(self) -> None:
        """Every local directory the job may write (``usable_directory``); the filesystem is read, so
        jobs call it at start rather than every settings build."""
        if not (self.output.catalog and self.output.schema):
            usable_directory(self.output.root, "output.root")
        for key, location in (("sample.path", self.sample.path), ("recommend.model_dir", self.recommend.model_dir),
                              ("segments.report_dir", self.segments.report_dir),
                              ("scores.report_dir", self.scores.report_dir), ("exports.dir", self.exports.dir),
                              ("campaign_report.report_dir", self.campaign_report.report_dir)):
            usable_directory(location, key)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Settings":
        """Typed, validated settings from a resolved config dict (see ``lib.platform.config.resolve``)."""
        return _build(cls, config, "config")


def section_keys(cls: type = Settings, prefix: str = "") -> set[str]:
    """Every dotted key the settings classes define (for checking them against conf/base.toml)."""
    keys = set()
    hints = get_type_hints(cls)
    for f in fields(cls):
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= section_keys(hints[f.name], dotted + ".")
        else:
            keys.add(dotted)
    return keys
