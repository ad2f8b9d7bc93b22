"""The HTTP endpoints (FastAPI). Every answer comes from the in-memory snapshot; nothing reads disk.

    GET /v1/users/{user_id}/recommendations?n=10[&strategy=blended]
    GET /v1/users/{user_id}/profile
    GET /v1/items/{item_id}/similar?n=10   (customers who bought this also bought: item_similarities)
    GET /healthz                       (no auth: table versions, load state; no user data)

Errors are JSON ``{"error": ..., "detail": ...}``: 401 without a valid bearer token, 400 for a bad
``n`` / user id / strategy or a raw id the service cannot map to the warehouse's pseudonyms, 404 for
an unknown user when ``RECS_UNKNOWN_USER=404`` and for a suppressed one when ``RECS_SUPPRESSED_USER=404``.

A suppressed customer (``suppressed_users``, the global list) gets no personal content: the popular
list flagged ``fallback_reason: suppressed`` and an empty profile, or 404 ``no_personal_content``.
When the warehouse holds pseudonyms (``user_identities`` exists) a request's id is looked up as it is
when it is a pseudonym (64 lowercase hex characters, e.g. an export's external_id), else mapped with
the key named by ``RECS_PSEUDONYM_KEY_ENV``; without that key a raw id is refused (400).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service import settings as settings_mod
from service.settings import Settings
from service.store import (CUSTOMER_SCORES, ITEM_SIMILARITIES, PROFILE_SOURCES, RECOMMENDATIONS, SEGMENT_PROFILES,
                           SEND_TIMES, USER_SEGMENTS, Snapshot, Store, describe)

log = logging.getLogger("service")

NO_STORE = {"Cache-Control": "private, no-store"}
PSEUDONYM = re.compile(r"[0-9a-f]{64}")  # lib.platform.privacy.pseudonym: HMAC-SHA256 in lowercase hex


def _error(status: int, error: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """The app; ``uvicorn --factory service.app:create_app`` reads the settings from the environment."""
    settings = settings or settings_mod.from_env()
    store = store or Store(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not logging.getLogger().handlers:  # a --workers child process: uvicorn configured only its own loggers
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        started = time.perf_counter()
        store.poll()  # serve nothing before the first snapshot is in memory
        snap = store.current
        log.info("snapshot loaded in %.2f s: versions %s, missing %s", time.perf_counter() - started,
                 snap.versions, [t for t, v in snap.versions.items() if v is None])
        for table, error in snap.errors.items():
            log.warning("%s: %s", table, error)
        store.start()
        yield
        store.stop()

    app = FastAPI(title="email-personalization recommendations API", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.store = store
    expected = f"Bearer {settings.token}".encode() if settings.token else None

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        body = exc.detail if isinstance(exc.detail, dict) else {"error": "error", "detail": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return _error(422, "bad_request", detail)

    async def authorize(request: Request) -> None:
        if not settings.auth_required:
            return
        given = request.headers.get("authorization", "").encode()
        if expected is None or not hmac.compare_digest(given, expected):
            raise HTTPException(401, {"error": "unauthorized", "detail": "send 'Authorization: Bearer <token>'"},
                                headers={"WWW-Authenticate": 'Bearer realm="recommendations"'})

    def check_user_id(user_id: str) -> JSONResponse | None:
        if not user_id or len(user_id) > settings.max_user_id_length:
            return _error(400, "bad_user_id", f"user_id must have 1 to {settings.max_user_id_length} characters")
        return None

    def stored_id(user_id: str, snap: Snapshot) -> tuple[str, JSONResponse | None]:
        """The id as the tables hold it, or an error answer for a raw id on a pseudonymised warehouse."""
        if not snap.pseudonymised or PSEUDONYM.fullmatch(user_id):
            return user_id, None
        if settings.pseudonym_key is not None:
            return hmac.new(settings.pseudonym_key, user_id.encode(), hashlib.sha256).hexdigest(), None
        return user_id, _error(400, "pseudonymised_ids", "the warehouse holds pseudonymised customer ids: send the "
                                                          "pseudonym (an export's external_id), or set "
                                                          "RECS_PSEUDONYM_KEY_ENV so the service maps raw ids")

    def resolve(user_id: str, snap: Snapshot) -> tuple[str, bool, JSONResponse | None]:
        """(the id as the tables hold it, whether the customer is suppressed, an error answer or None)."""
        if (bad := check_user_id(user_id)) is not None:
            return user_id, False, bad
        key, bad = stored_id(user_id, snap)
        if bad is not None:
            return key, False, bad
        suppressed = snap.suppressed(key)
        if suppressed and settings.suppressed_user == "404":
            return key, True, _error(404, "no_personal_content", "this customer is suppressed: no personal content")
        return key, suppressed, None

    @app.get("/v1/users/{user_id:path}/recommendations", dependencies=[Depends(authorize)])
    async def recommendations(
        user_id: str = Path(description="the customer id, URL-encoded"),
        n: int | None = Query(None, description="list length, 1 .. RECS_MAX_N (default RECS_DEFAULT_N)"),
        strategy: str | None = Query(None, description="discover / buy_again / blended, when the table has them"),
    ):
        snap: Snapshot = store.current  # one snapshot for the whole request, whatever a reload does
        key, suppressed, bad = resolve(user_id, snap)
        if bad is not None:
            return bad
        if n is None:
            n = settings.default_n
        if not 1 <= n <= settings.max_n:
            return _error(400, "bad_n", f"n must be between 1 and {settings.max_n}")
        recs = snap.recommendations
        strategy_index = 0
        served_strategy = None
        if recs is not None and recs.strategies is not None:
            served_strategy = strategy or (settings.default_strategy if settings.default_strategy in recs.strategies
                                           else recs.strategies[0])
            if served_strategy not in recs.strategies:
                return _error(400, "bad_strategy", f"strategy must be one of {', '.join(recs.strategies)}")
            strategy_index = recs.strategies.index(served_strategy)
        elif strategy is not None:
            return _error(400, "bad_strategy", "this recommendations table has no strategy column")

        span = recs.rows_for(key, strategy_index) if recs is not None and not suppressed else None
        body = {"user_id": user_id, "strategy": served_strategy}
        if span is not None:
            start, end = span
            body.update(fallback=False, fallback_reason=None,
                        items=describe(snap.catalog, recs.items_json(start, end), n),
                        run_id=recs.run_ids.get(served_strategy), table_version=recs.version)
            return JSONResponse(body, headers=NO_STORE)
        reason = ("suppressed" if suppressed else "recommendations_missing" if recs is None
                  else "no_list_for_strategy" if recs.strategies is not None and key in recs.users
                  else "unknown_user")
        if settings.unknown_user == "404" and not suppressed:
            return _error(404, "unknown_user", f"no recommendations for this user ({reason})")
        popular = snap.popular
        body.update(fallback=True, fallback_reason=reason, fallback_basis=popular.basis,
                    items=describe(snap.catalog, popular.items_json(), n), run_id=None,
                    table_version=recs.version if recs is not None else None)
        return JSONResponse(body, headers=NO_STORE)

    @app.get("/v1/users/{user_id:path}/profile", dependencies=[Depends(authorize)])
    async def profile(user_id: str = Path(description="the customer id, URL-encoded")):
        snap: Snapshot = store.current
        key, suppressed, bad = resolve(user_id, snap)
        if bad is not None:
            return bad
        parts = {} if suppressed else snap.parts
        segment = None
        seg_row = parts[USER_SEGMENTS].row(key) if USER_SEGMENTS in parts else None
        if seg_row is not None:
            segment = {"segment_id": seg_row.get("segment_id"), "affinity": seg_row.get("affinity"),
                       "label": None, "size": None, "share": None}
            if SEGMENT_PROFILES in parts:
                segment.update(parts[SEGMENT_PROFILES].by_segment.get(seg_row.get("segment_id"), {}))
        scores = parts[CUSTOMER_SCORES].row(key) if CUSTOMER_SCORES in parts else None
        send = parts[SEND_TIMES].row(key) if SEND_TIMES in parts else None
        if send is not None and isinstance(send.get("hour_of_week_utc"), int):
            send["hour_of_day_utc"] = send["hour_of_week_utc"] % 24
        recs = parts.get(RECOMMENDATIONS)
        known = (seg_row is not None or scores is not None or send is not None
                 or (recs is not None and key in recs.users))
        if not known and not suppressed and settings.unknown_user == "404":
            return _error(404, "unknown_user", "no table has this user")
        body = {
            "user_id": user_id,
            "known": known,
            "fallback": not known,
            "suppressed": suppressed,
            "segment": segment,
            "churn_band": scores.get("churn_band") if scores else None,
            "scores": scores,
            "send_hour_of_week_utc": send.get("hour_of_week_utc") if send else None,
            "send_time": send,
            "missing_sources": snap.missing(PROFILE_SOURCES),
            "table_versions": {t: snap.versions.get(t) for t in PROFILE_SOURCES},
        }
        return JSONResponse(body, headers=NO_STORE)

    @app.get("/v1/items/{item_id:path}/similar", dependencies=[Depends(authorize)])
    async def similar_items(
        item_id: str = Path(description="the item id, URL-encoded"),
        n: int | None = Query(None, description="list length, 1 .. RECS_MAX_N (default RECS_DEFAULT_N)"),
    ):
        if n is None:
            n = settings.default_n
        if not 1 <= n <= settings.max_n:
            return _error(400, "bad_n", f"n must be between 1 and {settings.max_n}")
        if not item_id:
            return _error(400, "bad_item_id", "item_id must not be empty")
        snap: Snapshot = store.current
        similar = snap.parts.get(ITEM_SIMILARITIES)
        items = describe(snap.catalog, (similar.items_json(item_id) if similar is not None else None) or [], n)
        body = {"item_id": item_id, "method": similar.method if similar else None,
                "run_id": similar.run_id if similar else None, "table_version": similar.version if similar else None}
        if items:
            return JSONResponse({**body, "fallback": False, "fallback_reason": None, "items": items})
        # No similar items known: the popular list without the item itself, flagged, as for an unknown user.
        popular = [{**entry, "customers": None} for entry in snap.popular.items_json()
                   if entry["item_id"] != item_id]
        reason = "similarities_missing" if similar is None else "unknown_item"
        return JSONResponse({**body, "fallback": True, "fallback_reason": reason,
                             "fallback_basis": snap.popular.basis, "items": describe(snap.catalog, popular, n)})

    @app.get("/healthz")
    async def healthz():
        snap: Snapshot = store.current
        recs = snap.recommendations
        # A reload thread that died or hangs leaves the answers behind the tables: fail the probe.
        stale = settings.reload_seconds > 0 and time.time() - store.last_poll > 3 * settings.reload_seconds + 60
        return JSONResponse(status_code=503 if stale else 200, content={
            "status": "stale" if stale else "ok",
            "loaded_at": snap.loaded_at,
            "last_poll": store.last_poll,
            "reloads": store.reloads,
            "table_versions": snap.versions,
            "missing": [t for t, v in snap.versions.items() if v is None],
            "errors": snap.errors,
            "users": len(recs.users) if recs is not None else 0,
            "recommendation_rows": recs.rows if recs is not None else 0,
            "strategies": list(recs.strategies) if recs is not None and recs.strategies else None,
            "fallback_basis": snap.popular.basis,
            "pseudonymised_ids": snap.pseudonymised,
        })

    return app
