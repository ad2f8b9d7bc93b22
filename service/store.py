"""Delta tables -> one immutable in-memory snapshot, rebuilt in the background when a table changes.

Reads go through delta-rs (``deltalake``): no Spark, no JVM. Each table is read at one explicit
version, turned into a compact layout and dropped:

* ``recommendations``: rows sorted by (strategy, user, rank) into flat numpy columns (item code
  int32, score float32, rank int32, source code int8); a user's list is ``offsets[s, u] ..
  offsets[s, u + 1]``; user ids map to ``u`` through one dict, item and source ids are
  dictionary-coded. About 13 bytes per row plus the user dict (docs/service.md has the measurement).
* ``user_segments`` / ``customer_scores`` / ``send_times``: one row per user (the latest run, the
  highest affinity / the latest ``as_of``), kept as Arrow arrays addressed through a user dict.
* ``segment_profiles``: a small dict segment_id -> label, size, share.
* ``suppressed_users``: the set of ids of the global suppression list (no personal content for them).
* ``user_identities``: only whether it exists (the warehouse then holds pseudonyms); never read.
* the popular fallback: the items used by the most distinct users in ``interactions`` (the same
  definition as the pipeline's ``popular`` source), or, without ``interactions`` / ``item_index``,
  the items that appear in the most users' recommendation lists.

A ``Snapshot`` is never changed after it is built. ``Store.poll`` looks up every table's latest
version, rebuilds only the parts whose version moved (reusing the others), then replaces
``Store.current`` in one reference assignment: a request reads ``store.current`` once and keeps that
snapshot to its end, so requests in flight during a reload finish on the old data.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
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
SUPPRESSED_USERS = "suppressed_users"
USER_IDENTITIES = "user_identities"
TABLES = (RECOMMENDATIONS, USER_SEGMENTS, SEGMENT_PROFILES, CUSTOMER_SCORES, SEND_TIMES, INTERACTIONS, ITEM_INDEX,
          SUPPRESSED_USERS)
PROFILE_SOURCES = (USER_SEGMENTS, SEGMENT_PROFILES, CUSTOMER_SCORES, SEND_TIMES)

# customer_scores columns the profile serves, when the table has them (DESIGN.md's contract).
SCORE_COLUMNS = ("as_of", "churn_band", "churn_probability", "churn_percentile", "purchase_probability",
                 "expected_revenue", "engagement_score", "eligible", "reason_code", "model_version", "run_id")
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


def _strings(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    return arr


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
    return Keyed(version, users, {c: rows.column(c).combine_chunks() for c in rows.column_names if c != "user_id"})


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
    """The fallback list for users without recommendations, best first (at most max_n items)."""

    basis: str  # "interactions" | "recommendations" | "none"
    items: list[str]
    scores: list[float]
    versions: tuple

    def items_json(self, n: int) -> list[dict]:
        return [{"rank": i + 1, "item_id": item, "score": score, "source": "popular"}
                for i, (item, score) in enumerate(zip(self.items[:n], self.scores[:n]))]


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
}


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

    def suppressed(self, user_id: str) -> bool:
        part = self.parts.get(SUPPRESSED_USERS)
        return part is not None and user_id in part.users

    def missing(self, tables: tuple[str, ...]) -> list[str]:
        return [t for t in tables if t not in self.parts]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the numpy / Arrow arrays per part (the user dicts are Python objects on top)."""
        return {t: p.array_bytes() for t, p in self.parts.items() if hasattr(p, "array_bytes")}


EMPTY = Snapshot(parts={}, versions={t: None for t in TABLES}, popular=Popular("none", [], [], ()), loaded_at=0.0)


class Store:
    """Holds the current snapshot; ``poll()`` swaps in a new one when any table's version moved."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.current: Snapshot = EMPTY
        self.reloads = 0
        self.last_poll: float = 0.0
        self._failed: dict[str, tuple[int, str]] = {}  # table -> (version, error) that could not be served
        self._lock = threading.Lock()  # one poll at a time (the background thread, or a test)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- loading -------------------------------------------------------------------------------

    def poll(self) -> bool:
        """Rebuild the parts whose table version changed; swap the snapshot; True when it changed."""
        with self._lock:
            old = self.current
            handles: dict[str, DeltaTable | None] = {}
            errors: dict[str, str] = {}
            for table in TABLES:
                try:
                    handles[table] = _open_latest(self.settings.table_uri(table))
                except Exception as exc:  # unreadable log, permissions, ...: keep serving what we have
                    errors[table] = f"{type(exc).__name__}: {exc}"
                    handles[table] = None
            try:
                pseudonymised = _open_latest(self.settings.table_uri(USER_IDENTITIES)) is not None
            except Exception as exc:
                errors[USER_IDENTITIES] = f"{type(exc).__name__}: {exc}"
                pseudonymised = old.pseudonymised
            self.last_poll = time.time()

            parts = dict(old.parts)
            served = dict(old.versions)
            for table, loader in LOADERS.items():
                dt = handles[table]
                if dt is None:
                    if table in old.parts:
                        # A table that vanishes after it was served keeps its last version (an
                        # operator's rewrite in progress must not blank every profile); /healthz says so.
                        errors.setdefault(table, "table vanished; serving the version loaded before")
                    elif table not in errors:
                        served[table] = None
                    continue
                version = dt.version()
                if table in old.parts and old.versions.get(table) == version:
                    continue
                failed = self._failed.get(table)
                if failed is not None and failed[0] == version:
                    errors[table] = failed[1]  # do not retry a version that could not be served
                    continue
                started = time.perf_counter()
                try:
                    parts[table] = loader(dt, version)
                    served[table] = version
                    self._failed.pop(table, None)
                    log.info("loaded %s version %s in %.2f s", table, version, time.perf_counter() - started)
                except Exception as exc:
                    message = f"version {version}: {type(exc).__name__}: {exc}"
                    errors[table] = message
                    self._failed[table] = (version, message)
                    log.error("cannot serve %s %s (still serving version %s)", table, message,
                              old.versions.get(table))
            for table in (INTERACTIONS, ITEM_INDEX):
                served[table] = handles[table].version() if handles[table] is not None else None

            popular = self._popular(old, parts, handles, served, errors)
            if (served == old.versions and errors == old.errors and popular is old.popular
                    and pseudonymised == old.pseudonymised and old is not EMPTY):
                return False
            self.current = Snapshot(parts=parts, versions=served, popular=popular, loaded_at=time.time(),
                                    errors=errors, pseudonymised=pseudonymised)
            self.reloads += 1
            del old, parts, handles
            _return_freed_memory()
            return True

    def _popular(self, old: Snapshot, parts: dict, handles: dict, served: dict, errors: dict) -> Popular:
        n = self.settings.max_n
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
