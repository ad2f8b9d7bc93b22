"""Delta tables -> one immutable in-memory snapshot, rebuilt in the background when a table changes.

Reads go through delta-rs (``deltalake``): no Spark, no JVM. Each table is read at one explicit
version, turned into a compact layout and dropped:

* ``recommendations``: rows sorted by (strategy, user, rank) into flat numpy columns (item code
  int32, score float32, rank int32, source code int8); a user's list is ``offsets[s, u] ..
  offsets[s, u + 1]``; user ids map to ``u`` through one dict, item and source ids are
  dictionary-coded. About 13 bytes per row plus the user dict (docs/service.md has the measurement).
* ``user_segments`` / ``customer_scores`` / ``send_times``: one row per user (the latest run, the
  highest affinity / the latest ``as_of``), kept as Arrow arrays addressed through a user dict;
  ``customer_scores`` always has the customer-value columns (null ones when the table predates them).
* ``segment_profiles``: a small dict segment_id -> label, size, share.
* ``item_similarities``: rows sorted by (item, rank) into flat numpy columns like ``recommendations``
  (similar item code int32, score float32, customers int64); an item's list is ``offsets[i] ..
  offsets[i + 1]``.
* ``products``: per item its name, category and price for the lists' items, and the items the catalog
  marks unavailable or not recommendable (left out of every list served, the next item moving up).
* ``suppressed_users``: the set of ids of the global suppression list (no personal content for them).
* ``user_identities``: only whether it exists (the warehouse then holds pseudonyms); never read.
* the popular fallback: the items used by the most distinct users in ``interactions`` (the same
  definition as the pipeline's ``popular`` source), or, without ``interactions`` / ``item_index``,
  the items that appear in the most users' recommendation lists.

Which version of a table is served: the pipeline tags every Delta commit of a stage with
``<run_id>:<stage>`` (commitInfo ``userMetadata``) and records each stage attempt in ``pipeline_runs``
(running / success / failed). A table is served at its latest version that holds no commit of an
attempt of its own stage (``PRODUCER``) that has not succeeded: a run still running, failed or
killed is never served, and a stage's tables (user_segments with segment_profiles, interactions with
item_index) switch together once its success is recorded. A RESTORE commit counts as the version it
brought back, so a rolled-back run changes nothing that is served. Without ``pipeline_runs`` (tables
written by other tools) every table is served at its latest version.

A ``Snapshot`` is never changed after it is built. ``Store.poll`` picks every table's version as
above, rebuilds only the parts whose version moved (reusing the others), then replaces
``Store.current`` in one reference assignment: a request reads ``store.current`` once and keeps that
snapshot to its end, so requests in flight during a reload finish on the old data.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from service.settings import Settings

log = logging.getLogger("service.store")

RECOMMENDATIONS = "recommendations"
USER_SEGMENTS = "user_segments"
SEGMENT_PROFILES = "segment_profiles"
CUSTOMER_SCORES = "customer_scores"
SEND_TIMES = "send_times"
INTERACTIONS = "interactions"
ITEM_INDEX = "item_index"
PIPELINE_RUNS = "pipeline_runs"
SUPPRESSED_USERS = "suppressed_users"
USER_IDENTITIES = "user_identities"
ITEM_SIMILARITIES = "item_similarities"
PRODUCTS = "products"
TABLES = (RECOMMENDATIONS, USER_SEGMENTS, SEGMENT_PROFILES, CUSTOMER_SCORES, SEND_TIMES, INTERACTIONS, ITEM_INDEX,
          SUPPRESSED_USERS, ITEM_SIMILARITIES, PRODUCTS)
# The stage that writes (and on failure restores) each served table, as jobs/stages.py registers it
# (tests/test_service.py holds the two equal): the tables of one stage switch together. None: served at
# its latest version whichever stage wrote it (a suppression applies as soon as it is written).
PRODUCER = {RECOMMENDATIONS: "recommend_items", USER_SEGMENTS: "segment_users", SEGMENT_PROFILES: "segment_users",
            CUSTOMER_SCORES: "score_customers", SEND_TIMES: "plan_sends", INTERACTIONS: "build_interactions",
            ITEM_INDEX: "build_interactions", SUPPRESSED_USERS: None, ITEM_SIMILARITIES: "recommend_items",
            PRODUCTS: "ingest_products"}
PROFILE_SOURCES = (USER_SEGMENTS, SEGMENT_PROFILES, CUSTOMER_SCORES, SEND_TIMES)
# Tables that switch on their own although their stage writes others too: a problem with an optional
# table (gone, unreadable) must not hold its stage's lists back.
SWITCH_ALONE = frozenset({ITEM_SIMILARITIES, PRODUCTS})


def switch_group(table: str) -> str | None:
    """The key of the tables that switch with ``table``: its producing stage, or itself (SWITCH_ALONE)."""
    return table if table in SWITCH_ALONE else PRODUCER[table]

# customer_scores' customer-value columns (lib.campaign.audience.CUSTOMER_VALUE_COLUMNS, tests/test_service.py holds them
# equal) with their Arrow types: always in a profile's scores, null when the table was written before they existed.
CUSTOMER_VALUE_COLUMNS = {"historic_clv": pa.float64(), "predicted_clv": pa.float64(), "total_clv": pa.float64(),
                          "p_alive": pa.float64(), "expected_orders": pa.float64(),
                          "avg_days_between_orders": pa.float64(), "expected_next_order_date": pa.date32()}
# customer_scores columns the profile serves, when the table has them (DESIGN.md's contract).
SCORE_COLUMNS = ("as_of", "churn_band", "churn_probability", "churn_percentile", "purchase_probability",
                 "expected_revenue", "engagement_score", *CUSTOMER_VALUE_COLUMNS, "eligible", "reason_code",
                 "model_version", "run_id")
SEND_TIME_COLUMNS = ("hour_of_week_utc", "weekday_utc", "hour_utc", "time_zone", "hour_of_week_local", "weekday_local",
                     "hour_local", "confidence", "n_signals", "is_fallback", "segment_id", "run_id")


class TableError(ValueError):
    """A table exists but cannot be served (a required column is missing, ...)."""


# ---------------------------------------------------------------------------------------------
# helpers


def _open_latest(uri: str) -> DeltaTable | None:
    """The table at its latest version, or None when there is no Delta table at ``uri``."""
    try:
        return DeltaTable(uri)
    except TableNotFoundError:
        return None


def _columns(dt: DeltaTable) -> set[str]:
    return {f.name for f in dt.schema().fields}


def _read(dt: DeltaTable, wanted: tuple[str, ...], required: tuple[str, ...], table: str) -> pa.Table:
    names = _columns(dt)
    missing = [c for c in required if c not in names]
    if missing:
        raise TableError(f"{table} has no column {', '.join(missing)} (has {', '.join(sorted(names))})")
    cols = [c for c in wanted if c in names]
    return dt.to_pyarrow_table(columns=cols)


def _encode(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list]:
    """Dictionary-code a column: (int codes as numpy, distinct values in first-seen order)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_large_string(arr.type) or pa.types.is_string_view(arr.type):
        arr = arr.cast(pa.string())
    encoded = pc.dictionary_encode(arr)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    return codes, encoded.dictionary.to_pylist()


def _latest_run(table: pa.Table, group: str | None = None) -> pa.Table:
    """Rows of the greatest run_id (per ``group`` value when given); tables without run_id as they are."""
    if "run_id" not in table.column_names or table.num_rows == 0:
        return table
    runs = table.column("run_id")
    if group is None:
        bounds = pc.min_max(runs)
        if not bounds["max"].is_valid or bounds["min"] == bounds["max"]:
            return table  # one run (the usual overwrite): no copy
        return table.filter(pc.equal(runs, bounds["max"]))
    keep = np.zeros(table.num_rows, dtype=bool)
    groups = table.column(group)
    for value in pc.unique(groups).to_pylist():
        in_group = pc.equal(groups, value).to_numpy(zero_copy_only=False)
        latest = pc.max(runs.filter(pa.array(in_group)))
        if latest.is_valid:
            keep |= in_group & pc.equal(runs, latest).fill_null(False).to_numpy(zero_copy_only=False)
        else:
            keep |= in_group
    return table.filter(pa.array(keep))


def _one_row_per_user(table: pa.Table, prefer: list[tuple[str, str]]) -> tuple[dict[str, int], pa.Table]:
    """Keep one row per user_id (the first by ``prefer`` sort keys); return (user -> row, rows)."""
    table = table.filter(pc.is_valid(table.column("user_id")))
    codes, users = _encode(table.column("user_id"))
    keys = pa.table({"_u": codes, **{f"_k{i}": table.column(c) for i, (c, _) in enumerate(prefer)}})
    order = pc.sort_indices(keys, sort_keys=[("_u", "ascending")] + [(f"_k{i}", o) for i, (_, o) in enumerate(prefer)]).to_numpy()
    sorted_codes = codes[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_codes[1:] != sorted_codes[:-1]
    rows = order[first]
    kept = table.take(pa.array(rows)).combine_chunks()
    index = {users[c]: i for i, c in enumerate(sorted_codes[first].tolist())}
    return index, kept


def _py(value: Any) -> Any:
    """An Arrow scalar's value as JSON can carry it."""
    v = value.as_py()
    if isinstance(v, float) and v != v:  # NaN
        return None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if type(v).__name__ == "Decimal":
        return float(v)
    return v


def _short_float(v: np.floating) -> float | None:
    """A float32 as the shortest decimal that reads back the same (0.83, not 0.8299999833106995)."""
    return None if v != v else float(str(v))


# ---------------------------------------------------------------------------------------------
# parts


@dataclass(frozen=True)
class Recommendations:
    version: int
    users: dict[str, int]
    strategies: tuple[str, ...] | None  # None: the table has no strategy column
    offsets: np.ndarray                  # (len(strategies) or 1, n_users + 1) int64 row offsets
    ranks: np.ndarray                    # int32
    item_codes: np.ndarray               # int32 into items
    items: list[str]
    scores: np.ndarray                   # float32
    source_codes: np.ndarray             # int8 into sources (-1: null)
    sources: list[str | None]
    run_ids: dict[str | None, str | None]

    @property
    def rows(self) -> int:
        return int(len(self.ranks))

    def array_bytes(self) -> int:
        return int(self.offsets.nbytes + self.ranks.nbytes + self.item_codes.nbytes + self.scores.nbytes
                   + self.source_codes.nbytes)

    def rows_for(self, user_id: str, strategy_index: int) -> tuple[int, int] | None:
        u = self.users.get(user_id)
        if u is None:
            return None
        start, end = int(self.offsets[strategy_index, u]), int(self.offsets[strategy_index, u + 1])
        return (start, end) if end > start else None

    def items_json(self, start: int, end: int) -> list[dict]:
        items, sources = self.items, self.sources
        return [
            {"rank": int(r), "item_id": items[c], "score": _short_float(s), "source": sources[k] if k >= 0 else None}
            for r, c, s, k in zip(self.ranks[start:end].tolist(), self.item_codes[start:end].tolist(),
                                  self.scores[start:end], self.source_codes[start:end].tolist())
        ]


def load_recommendations(dt: DeltaTable, version: int) -> Recommendations:
    table = _read(dt, ("user_id", "rank", "item_id", "score", "source", "run_id", "strategy"),
                  ("user_id", "rank", "item_id"), RECOMMENDATIONS)
    has_strategy = "strategy" in table.column_names
    valid = pc.and_(pc.is_valid(table.column("user_id")), pc.is_valid(table.column("item_id")))
    if has_strategy:
        valid = pc.and_(valid, pc.is_valid(table.column("strategy")))
    table = table.filter(valid)
    table = _latest_run(table, "strategy" if has_strategy else None)
    n = table.num_rows

    user_codes, users = _encode(table.column("user_id"))
    if has_strategy:
        strategy_codes, strategy_values = _encode(table.column("strategy"))
        # Stable, readable order of strategies (codes follow first appearance in the files).
        ordered = sorted(strategy_values)
        remap = np.array([ordered.index(v) for v in strategy_values], dtype=np.int64)
        strategy_codes = remap[strategy_codes] if n else strategy_codes
        strategies: tuple[str, ...] | None = tuple(ordered)
    else:
        strategy_codes = np.zeros(n, dtype=np.int64)
        strategies = None
    n_strategies = len(strategies) if strategies else 1
    ranks = table.column("rank").combine_chunks().fill_null(np.iinfo(np.int32).max).to_numpy(zero_copy_only=False)
    order = np.lexsort((ranks, user_codes, strategy_codes)) if n else np.zeros(0, dtype=np.int64)

    offsets = np.zeros((n_strategies, len(users) + 1), dtype=np.int64)
    base = 0
    for s in range(n_strategies):
        counts = np.bincount(user_codes[strategy_codes == s], minlength=len(users))
        offsets[s, 0] = base
        offsets[s, 1:] = base + np.cumsum(counts)
        base += int(counts.sum())

    item_codes, items = _encode(table.column("item_id"))
    if "score" in table.column_names:
        scores = table.column("score").combine_chunks().cast(pa.float32()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    else:
        scores = np.full(n, np.nan, dtype=np.float32)
    if "source" in table.column_names:
        src_arr = table.column("source").combine_chunks()
        src_codes, sources = _encode(src_arr.fill_null("\x00"))
        sources = [None if s == "\x00" else s for s in sources]
        if len(sources) > 127:
            raise TableError(f"recommendations has {len(sources)} distinct sources (at most 127 are served)")
    else:
        src_codes, sources = np.full(n, -1, dtype=np.int64), []

    run_ids: dict[str | None, str | None] = {}
    if "run_id" in table.column_names and n:
        runs = table.column("run_id").combine_chunks()
        for s in range(n_strategies):
            mask = pa.array(strategy_codes == s)
            latest = pc.max(runs.filter(mask))
            run_ids[strategies[s] if strategies else None] = latest.as_py() if latest.is_valid else None

    return Recommendations(
        version=version,
        users={u: i for i, u in enumerate(users)},
        strategies=strategies,
        offsets=offsets,
        ranks=ranks[order].astype(np.int32),
        item_codes=item_codes[order].astype(np.int32),
        items=items,
        scores=scores[order].astype(np.float32),
        source_codes=src_codes[order].astype(np.int8),
        sources=sources,
        run_ids=run_ids,
    )


@dataclass(frozen=True)
class Similarities:
    """Each item's similar items, best first (``item_similarities`` of the latest run)."""

    version: int
    items: dict[str, int]                # item_id -> row of offsets
    offsets: np.ndarray                  # (n_items + 1,) int64
    ranks: np.ndarray                    # int32
    similar_codes: np.ndarray            # int32 into similar
    similar: list[str]
    scores: np.ndarray                   # float32
    customers: np.ndarray                # int64 (-1: unknown)
    method: str | None
    run_id: str | None

    def items_json(self, item_id: str) -> list[dict] | None:
        """The item's whole list (``similar_top_k`` long at most), best first; None for an unknown item."""
        i = self.items.get(item_id)
        if i is None:
            return None
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return [{"rank": int(r), "item_id": self.similar[c], "score": _short_float(s),
                 "customers": int(k) if k >= 0 else None, "source": "similar"}
                for r, c, s, k in zip(self.ranks[start:end].tolist(), self.similar_codes[start:end].tolist(),
                                      self.scores[start:end], self.customers[start:end].tolist())]


def load_item_similarities(dt: DeltaTable, version: int) -> Similarities:
    table = _read(dt, ("run_id", "item_id", "rank", "similar_item_id", "score", "customers", "method"),
                  ("item_id", "rank", "similar_item_id"), ITEM_SIMILARITIES)
    table = table.filter(pc.and_(pc.is_valid(table.column("item_id")), pc.is_valid(table.column("similar_item_id"))))
    table = _latest_run(table)
    n = table.num_rows
    item_codes, items = _encode(table.column("item_id"))
    ranks = table.column("rank").combine_chunks().fill_null(np.iinfo(np.int32).max).to_numpy(zero_copy_only=False)
    order = np.lexsort((ranks, item_codes)) if n else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(item_codes, minlength=len(items))) if n else 0
    similar_codes, similar = _encode(table.column("similar_item_id"))

    def numbers(name: str, kind, missing) -> np.ndarray:
        if name not in table.column_names:
            return np.full(n, missing, dtype=kind)
        return table.column(name).combine_chunks().cast(pa.from_numpy_dtype(kind)).fill_null(missing) \
            .to_numpy(zero_copy_only=False)

    first = (lambda name: table.column(name)[0].as_py() if name in table.column_names and n else None)
    return Similarities(version, {item: i for i, item in enumerate(items)}, offsets, ranks[order].astype(np.int32),
                        similar_codes[order].astype(np.int32), similar,
                        numbers("score", np.float32, np.nan)[order], numbers("customers", np.int64, -1)[order],
                        first("method"), first("run_id"))


@dataclass(frozen=True)
class Keyed:
    """One row per user: Arrow arrays addressed through ``users`` (user_id -> row)."""

    version: int
    users: dict[str, int]
    columns: dict[str, pa.Array]

    def row(self, user_id: str) -> dict[str, Any] | None:
        i = self.users.get(user_id)
        if i is None:
            return None
        return {name: _py(col[i]) for name, col in self.columns.items()}

    def array_bytes(self) -> int:
        return int(sum(c.nbytes for c in self.columns.values()))


def load_user_segments(dt: DeltaTable, version: int) -> Keyed:
    table = _latest_run(_read(dt, ("user_id", "segment_id", "affinity", "run_id"), ("user_id", "segment_id"),
                              USER_SEGMENTS))
    prefer = [("affinity", "descending")] if "affinity" in table.column_names else []
    users, rows = _one_row_per_user(table, prefer)
    return Keyed(version, users, {c: rows.column(c).combine_chunks() for c in rows.column_names if c != "user_id"})


def load_customer_scores(dt: DeltaTable, version: int) -> Keyed:
    table = _read(dt, ("user_id",) + SCORE_COLUMNS, ("user_id", "as_of"), CUSTOMER_SCORES)
    prefer = [("as_of", "descending")] + ([("run_id", "descending")] if "run_id" in table.column_names else [])
    users, rows = _one_row_per_user(table, prefer)
    columns = {c: rows.column(c).combine_chunks() for c in rows.column_names if c != "user_id"}
    for name, kind in CUSTOMER_VALUE_COLUMNS.items():  # an older table: the same answer's shape, values null
        columns.setdefault(name, pa.nulls(rows.num_rows, kind))
    return Keyed(version, users, columns)


def load_send_times(dt: DeltaTable, version: int) -> Keyed:
    table = _read(dt, ("user_id",) + SEND_TIME_COLUMNS, ("user_id", "hour_of_week_utc"), SEND_TIMES)
    prefer = [("run_id", "descending")] if "run_id" in table.column_names else []
    users, rows = _one_row_per_user(table, prefer)
    return Keyed(version, users, {c: rows.column(c).combine_chunks() for c in rows.column_names if c != "user_id"})


@dataclass(frozen=True)
class SegmentProfiles:
    version: int
    by_segment: dict[Any, dict[str, Any]]


def load_segment_profiles(dt: DeltaTable, version: int) -> SegmentProfiles:
    table = _latest_run(_read(dt, ("segment_id", "label", "size", "share", "run_id"), ("segment_id",),
                              SEGMENT_PROFILES))
    keep = [c for c in ("label", "size", "share") if c in table.column_names]
    by_segment = {}
    for row in table.select(["segment_id"] + keep).to_pylist():
        by_segment[row.pop("segment_id")] = row
    return SegmentProfiles(version, by_segment)


# The product details every served list item carries (null without a catalog or for an item it lacks).
ITEM_DETAILS = ("name", "category", "price")


@dataclass(frozen=True)
class Catalog:
    """Product details of the catalog (``products``) and the items it says never to show."""

    version: int
    details: dict[str, dict[str, Any]]   # item_id -> name, category, price
    hidden: frozenset[str]               # available = false or recommendable = false


def describe(catalog: Catalog | None, entries: list[dict], n: int) -> list[dict]:
    """The first ``n`` of ``entries`` (list items, best first) that the catalog does not hide, ranked
    1..n again (a hidden item's successor moves up), each with ``ITEM_DETAILS`` (null where unknown)."""
    blank = dict.fromkeys(ITEM_DETAILS)
    if catalog is not None:
        entries = [entry for entry in entries if entry["item_id"] not in catalog.hidden]
    details = catalog.details if catalog is not None else {}
    return [{**entry, "rank": rank, **details.get(entry["item_id"], blank)}
            for rank, entry in enumerate(entries[:n], start=1)]


def load_products(dt: DeltaTable, version: int) -> Catalog:
    table = _read(dt, ("item_id", *ITEM_DETAILS, "available", "recommendable"), ("item_id",), PRODUCTS)
    table = table.filter(pc.is_valid(table.column("item_id")))
    shown = [table.column(flag).combine_chunks().fill_null(True) if flag in table.column_names
             else pa.array([True] * table.num_rows) for flag in ("available", "recommendable")]
    hidden = table.filter(pc.invert(pc.and_(*shown))).column("item_id").to_pylist()
    columns = {name: (table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows)
               for name in ITEM_DETAILS}
    nan_free = {name: [None if isinstance(v, float) and v != v else v for v in values]
                for name, values in columns.items()}
    details = {item: {name: nan_free[name][i] for name in ITEM_DETAILS}
               for i, item in enumerate(table.column("item_id").to_pylist())}
    return Catalog(version, details, frozenset(hidden))


@dataclass(frozen=True)
class Suppressed:
    version: int
    users: frozenset[str]


def load_suppressed_users(dt: DeltaTable, version: int) -> Suppressed:
    """The ids of the global list (campaign_id null): a campaign's own opt-out is not the API's concern."""
    table = _read(dt, ("user_id", "campaign_id"), ("user_id",), SUPPRESSED_USERS)
    if "campaign_id" in table.column_names:
        table = table.filter(pc.is_null(table.column("campaign_id")))
    return Suppressed(version, frozenset(table.column("user_id").drop_null().to_pylist()))


@dataclass(frozen=True)
class Popular:
    """The fallback list for users without recommendations, best first (at most max_n + 1 items)."""

    basis: str  # "interactions" | "recommendations" | "none"
    items: list[str]
    scores: list[float]
    versions: tuple

    def items_json(self) -> list[dict]:
        return [{"rank": i + 1, "item_id": item, "score": score, "source": "popular"}
                for i, (item, score) in enumerate(zip(self.items, self.scores))]


def _top(items: list[str], counts: np.ndarray, n: int) -> tuple[list[str], list[float]]:
    # Most counted first, ties by item_id: a stable answer across reloads of the same data.
    order = sorted(range(len(items)), key=lambda i: (-counts[i], items[i]))[:n]
    return [items[i] for i in order], [float(counts[i]) for i in order]


def popular_from_interactions(interactions: DeltaTable, item_index: DeltaTable, n: int, versions: tuple) -> Popular:
    entries = _read(interactions, ("item_idx",), ("item_idx",), INTERACTIONS)
    index = _read(item_index, ("item_idx", "item_id"), ("item_idx", "item_id"), ITEM_INDEX)
    idx = entries.column("item_idx").combine_chunks().drop_null().to_numpy(zero_copy_only=False).astype(np.int64)
    # interactions holds one row per (user, item) with an interaction, so rows per item = distinct users.
    counts = np.bincount(idx) if len(idx) else np.zeros(0, dtype=np.int64)
    known = index.filter(pc.is_valid(index.column("item_idx")))
    item_idx = known.column("item_idx").to_numpy().astype(np.int64)
    item_ids = known.column("item_id").to_pylist()
    per_item = np.array([counts[i] if 0 <= i < len(counts) else 0 for i in item_idx], dtype=np.int64)
    used = per_item > 0
    items, scores = _top([x for x, u in zip(item_ids, used) if u], per_item[used], n)
    return Popular("interactions", items, scores, versions)


def popular_from_recommendations(recs: Recommendations | None, n: int, versions: tuple) -> Popular:
    if recs is None or recs.rows == 0:
        return Popular("none", [], [], versions)
    # Lists a user appears in, per item (a list holds an item once): the items most often recommended.
    counts = np.bincount(recs.item_codes, minlength=len(recs.items))
    items, scores = _top(recs.items, counts, n)
    return Popular("recommendations", items, scores, versions)


def _return_freed_memory() -> None:
    """Give the memory of the Arrow tables read during a load back to the OS (Arrow's pool and glibc keep
    freed pages otherwise, so the resident set would stay at the load's peak)."""
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


LOADERS = {
    RECOMMENDATIONS: load_recommendations,
    USER_SEGMENTS: load_user_segments,
    SEGMENT_PROFILES: load_segment_profiles,
    CUSTOMER_SCORES: load_customer_scores,
    SEND_TIMES: load_send_times,
    SUPPRESSED_USERS: load_suppressed_users,
    ITEM_SIMILARITIES: load_item_similarities,
    PRODUCTS: load_products,
}


# ---------------------------------------------------------------------------------------------
# which version is served


def read_stage_status(dt: DeltaTable) -> dict[tuple[str, str], str]:
    """(run_id, stage) -> status of that stage's latest attempt in ``pipeline_runs`` (a rerun under the
    same run id is a new attempt: while it runs, the run's commits count as unfinished)."""
    table = _read(dt, ("run_id", "stage", "status", "started_at"), ("run_id", "stage", "status", "started_at"),
                  PIPELINE_RUNS)
    table = table.sort_by([("started_at", "ascending")])
    return {(run, stage): status for run, stage, status in zip(table.column("run_id").to_pylist(),
                                                              table.column("stage").to_pylist(),
                                                              table.column("status").to_pylist())}


@dataclass(frozen=True)
class Commit:
    """What the service needs of one Delta commit."""

    run_id: str | None       # from the ``<run_id>:<stage>`` tag, None when untagged
    stage: str | None
    restored_to: int | None  # a RESTORE: the version whose content it brought back


def _commit(info: dict[str, Any]) -> Commit:
    run_id = stage = restored_to = None
    tag = info.get("userMetadata")
    if isinstance(tag, str) and ":" in tag:
        run_id, stage = tag.rsplit(":", 1)  # a run id given on the command line may hold a colon
    if info.get("operation") == "RESTORE":
        try:
            restored_to = int((info.get("operationParameters") or {})["version"])
        except (KeyError, TypeError, ValueError):  # restored to a timestamp: content unknown, a new version
            restored_to = None
    return Commit(run_id, stage, restored_to)


class History:
    """A table's commits, read from its log once each (delta-rs ``history``) and kept between polls."""

    def __init__(self) -> None:
        self.commits: dict[int, Commit] = {}
        self.latest = -1

    def update(self, dt: DeltaTable) -> None:
        latest = dt.version()
        if latest < self.latest:  # the table was removed and created again
            self.commits, self.latest = {}, -1
        if latest > self.latest:
            for info in dt.history(limit=latest - self.latest):
                self.commits[int(info["version"])] = _commit(info)
            self.latest = latest

    def servable(self, producer: str | None, status: dict[tuple[str, str], str] | None) -> int | None:
        """The latest version that holds no commit of an attempt of ``producer`` that has not succeeded
        (None: no such version). ``status`` None (no ``pipeline_runs``) or no producer: the latest version."""
        if status is None or producer is None:
            return self.latest
        unfinished_at: dict[int, bool] = {}
        unfinished = False
        for version in sorted(self.commits):
            commit = self.commits[version]
            if commit.restored_to is not None:
                # Versions older than the log kept are long published: count them as clean.
                unfinished = unfinished_at.get(commit.restored_to, False)
            elif commit.stage == producer:
                # A successful attempt's commit is what its run left; until the run is recorded as a
                # success (and forever when it failed unrestored or was killed) the table holds its work.
                unfinished = status.get((commit.run_id, producer)) != "success"
            unfinished_at[version] = unfinished
        clean = [v for v, dirty in unfinished_at.items() if not dirty]
        return max(clean) if clean else None

    def same_content(self, version: int | None) -> int | None:
        """The version a RESTORE chain leads back to (``version`` itself when it is no RESTORE)."""
        seen = set()
        while version is not None and version not in seen:
            seen.add(version)
            commit = self.commits.get(version)
            if commit is None or commit.restored_to is None:
                return version
            version = commit.restored_to
        return version


# ---------------------------------------------------------------------------------------------
# snapshot and store


@dataclass(frozen=True)
class Snapshot:
    parts: dict[str, Any]              # table -> loaded part; absent when the table is missing
    versions: dict[str, int | None]    # table -> version served (None: missing)
    popular: Popular
    loaded_at: float
    errors: dict[str, str] = field(default_factory=dict)
    pseudonymised: bool = False        # user_identities exists: the tables hold pseudonyms, not raw ids

    @property
    def recommendations(self) -> Recommendations | None:
        return self.parts.get(RECOMMENDATIONS)

    @property
    def catalog(self) -> Catalog | None:
        return self.parts.get(PRODUCTS)

    def suppressed(self, user_id: str) -> bool:
        part = self.parts.get(SUPPRESSED_USERS)
        return part is not None and user_id in part.users

    def missing(self, tables: tuple[str, ...]) -> list[str]:
        return [t for t in tables if t not in self.parts]


EMPTY = Snapshot(parts={}, versions={t: None for t in TABLES}, popular=Popular("none", [], [], ()), loaded_at=0.0)


class Store:
    """Holds the current snapshot; ``poll()`` swaps in a new one when any table's version moved."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.current: Snapshot = EMPTY
        self.reloads = 0
        self.last_poll: float = 0.0
        self._failed: dict[str, tuple[int, str]] = {}  # table -> (version, error) that could not be served
        self._histories: dict[str, History] = {}
        self._status: tuple[int, dict[tuple[str, str], str]] | None = None  # pipeline_runs (version, status)
        self._lock = threading.Lock()  # one poll at a time (the background thread, or a test)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- loading -------------------------------------------------------------------------------

    def poll(self) -> bool:
        """Rebuild the parts whose served version changed; swap the snapshot; True when it changed."""
        with self._lock:
            old = self.current
            errors: dict[str, str] = {}
            # pipeline_runs first: a run it shows as a success has made every commit it will make, so the
            # table logs read next hold all of them (a stage's tables never switch half-way).
            status = self._stage_status(errors)
            self.last_poll = time.time()
            if errors:  # which versions are servable is unknown: keep serving what we have
                if errors == old.errors:
                    return False
                self.current = replace(old, errors=errors)
                self.reloads += 1
                return True
            handles: dict[str, DeltaTable | None] = {}
            unfinished: set[str] = set()  # tables whose every version holds an unfinished run's work
            for table in TABLES:
                handles[table] = None
                try:
                    dt = _open_latest(self.settings.table_uri(table))
                    if dt is None:
                        self._histories.pop(table, None)
                        continue
                    history = self._histories.setdefault(table, History())
                    history.update(dt)
                    version = history.servable(PRODUCER[table], status)
                    if version is None:
                        unfinished.add(table)
                        continue
                    if version != dt.version():
                        dt.load_as_version(version)
                    handles[table] = dt
                except Exception as exc:  # unreadable log, permissions, ...: keep serving what we have
                    errors[table] = f"{type(exc).__name__}: {exc}"
            try:
                pseudonymised = _open_latest(self.settings.table_uri(USER_IDENTITIES)) is not None
            except Exception as exc:
                errors[USER_IDENTITIES] = f"{type(exc).__name__}: {exc}"
                pseudonymised = old.pseudonymised

            parts = dict(old.parts)
            served = dict(old.versions)
            for key in dict.fromkeys(switch_group(t) for t in LOADERS):
                group = [t for t in LOADERS if switch_group(t) == key]
                stage = PRODUCER[group[0]]
                changed = {}
                for table in group:
                    dt = handles[table]
                    if dt is None:
                        if table in old.parts or table in errors:
                            if table not in errors and table not in unfinished:
                                # A table that vanishes after it was served keeps its last version (an
                                # operator's rewrite in progress must not blank every profile); /healthz says so.
                                errors[table] = "table vanished; serving the version loaded before"
                        else:
                            served[table] = None
                        continue
                    if table in old.parts and self._same(table, old.versions.get(table), dt.version()):
                        continue
                    changed[table] = dt
                if changed and not any(t in errors for t in group):
                    self._load_together(stage, changed, parts, served, errors)

            # The popular fallback's two tables switch together too.
            if not (unfinished | set(errors)) & {INTERACTIONS, ITEM_INDEX}:
                for table in (INTERACTIONS, ITEM_INDEX):
                    dt = handles[table]
                    if dt is None or not self._same(table, old.versions.get(table), dt.version()):
                        served[table] = dt.version() if dt is not None else None
                popular = self._popular(old, parts, handles, served, errors)
            elif old.popular.basis == "interactions":
                popular = old.popular
            else:
                popular = self._popular(old, parts, {**handles, INTERACTIONS: None}, served, errors)
            if (served == old.versions and errors == old.errors and popular is old.popular
                    and pseudonymised == old.pseudonymised and old is not EMPTY):
                return False
            self.current = Snapshot(parts=parts, versions=served, popular=popular, loaded_at=time.time(),
                                    errors=errors, pseudonymised=pseudonymised)
            self.reloads += 1
            del old, parts, handles
            _return_freed_memory()
            return True

    def _stage_status(self, errors: dict[str, str]) -> dict[tuple[str, str], str] | None:
        """``pipeline_runs`` as (run_id, stage) -> status, read again only when its version moved; None
        without the table. An unreadable table is an error under ``pipeline_runs``."""
        try:
            dt = _open_latest(self.settings.table_uri(PIPELINE_RUNS))
            if dt is None:
                self._status = None
                return None
            if self._status is None or self._status[0] != dt.version():
                self._status = (dt.version(), read_stage_status(dt))
            return self._status[1]
        except Exception as exc:
            errors[PIPELINE_RUNS] = f"{type(exc).__name__}: {exc}"
            return None

    def _same(self, table: str, served: int | None, version: int) -> bool:
        """True when ``version`` has the content of the ``served`` one (equal, or a RESTORE back to it)."""
        if served is None:
            return False
        history = self._histories.get(table)
        if history is None:
            return served == version
        return history.same_content(served) == history.same_content(version)

    def _load_together(self, stage: str, changed: dict[str, DeltaTable], parts: dict, served: dict,
                       errors: dict) -> None:
        """Load the changed tables of one stage into ``parts`` / ``served``, all or none: when one cannot
        be served (the reason goes to ``errors``), every table of the stage keeps its previous version."""
        for table, dt in changed.items():
            failed = self._failed.get(table)
            if failed is not None and failed[0] == dt.version():
                errors[table] = failed[1]  # do not retry a version that could not be served
                return
        loaded = {}
        for table, dt in changed.items():
            version = dt.version()
            started = time.perf_counter()
            try:
                loaded[table] = LOADERS[table](dt, version)
            except Exception as exc:
                message = f"version {version}: {type(exc).__name__}: {exc}"
                errors[table] = message
                self._failed[table] = (version, message)
                log.error("cannot serve %s %s; %s keeps serving versions %s", table, message, stage,
                          {t: served.get(t) for t in changed})
                return
            log.info("loaded %s version %s (stage %s) in %.2f s", table, version, stage,
                     time.perf_counter() - started)
        for table, part in loaded.items():
            parts[table] = part
            served[table] = part.version
            self._failed.pop(table, None)

    def _popular(self, old: Snapshot, parts: dict, handles: dict, served: dict, errors: dict) -> Popular:
        n = self.settings.max_n + 1  # one spare: the similar-items fallback leaves out the item asked about
        inter, index = handles[INTERACTIONS], handles[ITEM_INDEX]
        if inter is not None and index is not None:
            key = ("interactions", served[INTERACTIONS], served[ITEM_INDEX])
            if old.popular.versions == key:
                return old.popular
            try:
                return popular_from_interactions(inter, index, n, key)
            except Exception as exc:
                errors[INTERACTIONS] = f"popular fallback: {type(exc).__name__}: {exc}"
                log.error("popular fallback from interactions failed, using recommendations: %s", exc)
        key = ("recommendations", served[RECOMMENDATIONS])
        if old.popular.versions == key:
            return old.popular
        return popular_from_recommendations(parts.get(RECOMMENDATIONS), n, key)

    # -- background reload ---------------------------------------------------------------------

    def start(self) -> None:
        if self.settings.reload_seconds <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="delta-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reload_seconds):
            try:
                if self.poll():
                    log.info("serving versions %s", self.current.versions)
            except Exception:  # never let the reload thread die; the next poll tries again
                log.exception("reload failed; still serving versions %s", self.current.versions)
