"""The recommendations API (service/) answering from a real uvicorn server on 127.0.0.1.

Tables are written with deltalake (delta-rs) by the tests themselves, so no Spark is needed except in
the last two tests, which check that tables written by delta-spark are served too (protocol
compatibility) and that a stage run_stage rolls back is never served (run them under the Spark lock
like the rest of the suite).
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
import uvicorn
from deltalake import CommitProperties, DeltaTable, write_deltalake

from service import settings as settings_mod
from service.app import create_app
from service.store import CUSTOMER_VALUE_COLUMNS, PRODUCER, Store

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write(warehouse: Path, table: str, columns: dict, mode: str = "overwrite") -> None:
    write_deltalake(str(warehouse / table), pa.table(columns), mode=mode)


def recs_columns(rows: list[tuple]) -> dict:
    """rows: (user_id, rank, item_id, score, source[, strategy])."""
    cols = {
        "user_id": [r[0] for r in rows],
        "rank": pa.array([r[1] for r in rows], pa.int32()),
        "item_id": [r[2] for r in rows],
        "score": [r[3] for r in rows],
        "source": [r[4] for r in rows],
        "run_id": ["run-1"] * len(rows),
    }
    if rows and len(rows[0]) > 5:
        cols["strategy"] = [r[5] for r in rows]
    return cols


@contextlib.contextmanager
def serve(warehouse: Path, **env: str):
    """A real uvicorn server for the app on a free 127.0.0.1 port, in a thread; yields (base URL, store)."""
    environ = {"RECS_WAREHOUSE": str(warehouse), "RECS_API_TOKEN": TOKEN, "RECS_RELOAD_SECONDS": "0", **env}
    settings = settings_mod.from_env(environ)
    store = Store(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings, store), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", store
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture()
def warehouse(tmp_path: Path) -> Path:
    wh = tmp_path / "warehouse"
    # u1's list arrives in two files with its ranks out of order: the API must sort by rank.
    write(wh, "recommendations", recs_columns([
        ("u1", 3, "i3", 0.5, "als"), ("u1", 1, "i1", 0.9, "als"), ("u2", 1, "i2", 0.7, "segment_popular"),
        ("a/b c", 1, "i9", 0.4, "popular"),
    ]))
    write(wh, "recommendations", recs_columns([("u1", 2, "i2", 0.75, "als"), ("u1", 4, "i4", 0.25, "als")]),
          mode="append")
    write(wh, "user_segments", {"user_id": ["u1", "u2"], "segment_id": pa.array([0, 1], pa.int32()),
                                "affinity": [0.8, 0.55], "run_id": ["run-1", "run-1"]})
    write(wh, "segment_profiles", {"segment_id": pa.array([0, 1], pa.int32()), "size": [10, 20],
                                   "share": [0.33, 0.67], "label": ["sports", "garden"], "run_id": ["run-1"] * 2})
    # interactions: i7 is used by 3 users, i5 by 2, i6 by 2 (tie: i5 before i6), i8 by 1.
    item_ids = {0: "i5", 1: "i6", 2: "i7", 3: "i8"}
    pairs = [(0, 2), (1, 2), (2, 2), (0, 0), (1, 0), (2, 1), (3, 1), (3, 3)]
    write(wh, "interactions", {"user_idx": pa.array([u for u, _ in pairs], pa.int32()),
                               "item_idx": pa.array([i for _, i in pairs], pa.int32()),
                               "score": [1.0] * len(pairs)})
    write(wh, "item_index", {"item_id": list(item_ids.values()), "item_idx": pa.array(list(item_ids), pa.int32())})
    return wh


def test_similar_items_of_an_item_best_first_else_the_flagged_popular_list(warehouse):
    with serve(warehouse) as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        missing = http.get("/v1/items/i7/similar?n=2").json()  # no item_similarities yet: popular, not i7 itself
        assert missing["fallback"] is True and missing["fallback_reason"] == "similarities_missing"
        assert [i["item_id"] for i in missing["items"]] == ["i5", "i6"] and missing["items"][0]["rank"] == 1
    write(warehouse, "item_similarities", {
        "run_id": ["run-1"] * 4, "item_id": ["i5", "i5", "i5", "x/y"], "rank": pa.array([2, 1, 3, 1], pa.int32()),
        "similar_item_id": ["i7", "i6", "i8", "i5"], "score": [0.5, 0.75, 0.25, 1.0],
        "customers": pa.array([2, 3, 1, 2], pa.int64()), "method": ["jaccard"] * 4})
    with serve(warehouse, RECS_MAX_N="3", RECS_DEFAULT_N="3") as (url, store), \
            httpx.Client(base_url=url, headers=AUTH) as http:
        body = http.get("/v1/items/i5/similar?n=2").json()
        assert body["fallback"] is False and body["method"] == "jaccard" and body["run_id"] == "run-1"
        assert [(i["rank"], i["item_id"], i["score"], i["customers"]) for i in body["items"]] == [
            (1, "i6", 0.75, 3), (2, "i7", 0.5, 2)]
        assert [i["item_id"] for i in http.get("/v1/items/x%2Fy/similar").json()["items"]] == ["i5"]
        assert body["items"][0]["source"] == "similar"
        unknown = http.get("/v1/items/nope/similar?n=3").json()
        assert unknown["fallback_reason"] == "unknown_item" and [i["item_id"] for i in unknown["items"]] == [
            "i7", "i5", "i6"]
        # The same fields as a similar list; n = RECS_MAX_N items even when the item itself is left out.
        assert unknown["items"][0] == {"rank": 1, "item_id": "i7", "score": 3.0, "source": "popular",
                                       "customers": None, "name": None, "category": None, "price": None}
        assert [i["item_id"] for i in http.get("/v1/items/i7/similar?n=3").json()["items"]] == ["i5", "i6", "i8"]
        assert http.get("/v1/items/i5/similar?n=4").json()["error"] == "bad_n"
        assert http.get("/v1/items/i5/similar", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/healthz").json()["table_versions"]["item_similarities"] == 0

        # A similarities table that vanishes keeps its last version and never holds the lists back.
        shutil.rmtree(warehouse / "item_similarities")
        write(warehouse, "recommendations", recs_columns([("u1", 1, "i8", 0.6, "als")]))
        store.poll()
        assert [i["item_id"] for i in http.get("/v1/users/u1/recommendations").json()["items"]] == ["i8"]
        assert http.get("/v1/items/i5/similar?n=1").json()["items"][0]["item_id"] == "i6"
        assert "item_similarities" in http.get("/healthz").json()["errors"]


def test_list_items_carry_the_catalogs_details_and_hidden_items_give_way(warehouse):
    """With products, every list (a customer's, the popular fallback, similar items) shows each item's
    name, category and price, and an item the catalog now marks unavailable or not recommendable is
    left out, the next one moving up: the catalog changes daily, the lists nightly."""
    with serve(warehouse) as (url, store), httpx.Client(base_url=url, headers=AUTH) as http:
        before = http.get("/v1/users/u1/recommendations?n=3").json()["items"]
        assert [(i["item_id"], i["name"], i["price"]) for i in before] == [("i1", None, None), ("i2", None, None),
                                                                          ("i3", None, None)]
        write(warehouse, "products", {
            "item_id": ["i1", "i2", "i3", "i7", "i5"], "name": ["Mug", "Plate", None, "Vase", "Lamp"],
            "category": ["kitchen", "kitchen", "kitchen", "home", "home"],
            "price": [4.5, 3.0, float("nan"), 12.0, 20.0],
            "available": [True, False, True, True, True], "recommendable": [True, True, True, None, False],
            "run_id": ["run-1"] * 5})
        store.poll()
        items = http.get("/v1/users/u1/recommendations?n=3").json()["items"]
        assert items == [
            {"rank": 1, "item_id": "i1", "score": 0.9, "source": "als", "name": "Mug", "category": "kitchen", "price": 4.5},
            {"rank": 2, "item_id": "i3", "score": 0.5, "source": "als", "name": None, "category": "kitchen", "price": None},
            {"rank": 3, "item_id": "i4", "score": 0.25, "source": "als", "name": None, "category": None, "price": None}]
        popular = http.get("/v1/users/nobody/recommendations?n=3").json()["items"]  # i7, i5, i6, i8 less i5
        assert [(i["rank"], i["item_id"], i["name"]) for i in popular] == [(1, "i7", "Vase"), (2, "i6", None),
                                                                          (3, "i8", None)]
        assert http.get("/healthz").json()["table_versions"]["products"] == 0


def test_auth_is_refused_without_or_with_a_wrong_token(warehouse):
    with serve(warehouse) as (url, _), httpx.Client(base_url=url) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            for path in ("/v1/users/u1/recommendations", "/v1/users/u1/profile", "/v1/users/u1/recommendations?n=x"):
                r = http.get(path, headers=headers)
                assert r.status_code == 401, (headers, path, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert "i1" not in r.text
        assert http.get("/v1/users/u1/recommendations", headers=AUTH).status_code == 200
        health = http.get("/healthz")  # liveness needs no token and carries no user data
        assert health.status_code == 200 and health.json()["table_versions"]["recommendations"] == 1


def test_recommendations_of_a_known_user_in_rank_order_with_bounded_n(warehouse):
    with serve(warehouse, RECS_MAX_N="3", RECS_DEFAULT_N="3") as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        body = http.get("/v1/users/u1/recommendations").json()
        assert body["fallback"] is False and body["user_id"] == "u1" and body["strategy"] is None
        assert [(i["rank"], i["item_id"], i["score"], i["source"]) for i in body["items"]] == [
            (1, "i1", 0.9, "als"), (2, "i2", 0.75, "als"), (3, "i3", 0.5, "als")]  # RECS_DEFAULT_N items of 4
        assert body["run_id"] == "run-1" and body["table_version"] == 1
        assert [i["item_id"] for i in http.get("/v1/users/u1/recommendations?n=2").json()["items"]] == ["i1", "i2"]
        assert http.get("/v1/users/u2/recommendations?n=1").json()["items"][0]["source"] == "segment_popular"
        # a user id with a slash and a space, URL-encoded
        assert http.get("/v1/users/a%2Fb%20c/recommendations").json()["items"][0]["item_id"] == "i9"
        for n, status in (("4", 400), ("0", 400), ("-1", 400), ("abc", 422)):
            r = http.get(f"/v1/users/u1/recommendations?n={n}")
            assert r.status_code == status, (n, r.text)
            assert r.json()["error"] in ("bad_n", "bad_request")
        r = http.get("/v1/users/u1/recommendations?strategy=discover")  # this table has no strategy column
        assert r.status_code == 400 and r.json()["error"] == "bad_strategy"


def test_unknown_user_gets_the_flagged_popular_fallback(warehouse, tmp_path):
    with serve(warehouse) as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        body = http.get("/v1/users/nobody/recommendations?n=3").json()
        assert body["fallback"] is True and body["fallback_reason"] == "unknown_user"
        assert body["fallback_basis"] == "interactions"
        # items used by the most distinct users in interactions; ties by item_id
        assert [(i["item_id"], i["score"], i["rank"]) for i in body["items"]] == [
            ("i7", 3.0, 1), ("i5", 2.0, 2), ("i6", 2.0, 3)]
        profile = http.get("/v1/users/nobody/profile").json()
        assert profile["known"] is False and profile["fallback"] is True and profile["segment"] is None

    # Without interactions / item_index: the items in the most users' lists.
    bare = tmp_path / "bare"
    write(bare, "recommendations", recs_columns([("u1", 1, "x", 1.0, "als"), ("u1", 2, "y", 0.5, "als"),
                                                 ("u2", 1, "y", 1.0, "als"), ("u3", 1, "y", 1.0, "als"),
                                                 ("u3", 2, "z", 0.2, "als")]))
    with serve(bare) as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        body = http.get("/v1/users/nobody/recommendations").json()
        assert body["fallback"] is True and body["fallback_basis"] == "recommendations"
        assert [i["item_id"] for i in body["items"]] == ["y", "x", "z"]


def test_unknown_user_is_404_when_configured(warehouse):
    with serve(warehouse, RECS_UNKNOWN_USER="404") as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        for path in ("/v1/users/nobody/recommendations", "/v1/users/nobody/profile"):
            r = http.get(path)
            assert r.status_code == 404 and r.json()["error"] == "unknown_user", path
        assert http.get("/v1/users/u1/recommendations").status_code == 200
        assert http.get("/v1/users/u1/profile").status_code == 200


def test_a_suppressed_customer_gets_no_personal_content(warehouse):
    # u2 is on the global list; u1 only opted out of one campaign, which is not the API's concern.
    write(warehouse, "suppressed_users", {"user_id": ["u2", "u1"], "campaign_id": [None, "winback"],
                                          "reason": ["unsubscribed", "unsubscribed"]})
    with serve(warehouse) as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        body = http.get("/v1/users/u2/recommendations?n=3").json()
        assert body["fallback"] is True and body["fallback_reason"] == "suppressed"
        assert [i["item_id"] for i in body["items"]] == ["i7", "i5", "i6"] and body["run_id"] is None  # not u2's i2
        profile = http.get("/v1/users/u2/profile").json()
        assert profile["suppressed"] is True and profile["known"] is False
        assert profile["segment"] is None and profile["scores"] is None and "garden" not in str(profile)
        assert http.get("/v1/users/u1/recommendations").json()["fallback"] is False
        assert http.get("/v1/users/u1/profile").json()["suppressed"] is False
    with serve(warehouse, RECS_SUPPRESSED_USER="404") as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        for path in ("/v1/users/u2/recommendations", "/v1/users/u2/profile"):
            r = http.get(path)
            assert r.status_code == 404 and r.json()["error"] == "no_personal_content", path
        assert http.get("/v1/users/u1/recommendations").status_code == 200
    with pytest.raises(settings_mod.SettingsError, match="RECS_SUPPRESSED_USER='204' must be 'fallback' or '404'"):
        settings_mod.from_env({"RECS_WAREHOUSE": str(warehouse), "RECS_API_TOKEN": TOKEN, "RECS_SUPPRESSED_USER": "204"})


def test_a_raw_id_on_a_pseudonymised_warehouse_is_mapped_with_the_key_or_refused(tmp_path):
    key = "service-key-0123456789"
    alice = hmac.new(key.encode(), "alice".encode(), hashlib.sha256).hexdigest()
    wh = tmp_path / "wh"
    write(wh, "recommendations", recs_columns([(alice, 1, "i1", 0.9, "als")]))
    write(wh, "user_identities", {"user_key": [alice], "user_id": ["alice"]})
    with serve(wh) as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        r = http.get("/v1/users/alice/recommendations")
        assert r.status_code == 400 and r.json()["error"] == "pseudonymised_ids", r.text
        assert "RECS_PSEUDONYM_KEY_ENV" in r.json()["detail"]
        assert http.get("/v1/users/alice/profile").status_code == 400
        body = http.get(f"/v1/users/{alice}/recommendations").json()  # the pseudonym, as an export carries it
        assert body["fallback"] is False and body["items"][0]["item_id"] == "i1"
        assert http.get("/healthz").json()["pseudonymised_ids"] is True
    with serve(wh, RECS_PSEUDONYM_KEY_ENV="EP_SERVICE_KEY", EP_SERVICE_KEY=key) as (url, _), \
            httpx.Client(base_url=url, headers=AUTH) as http:
        body = http.get("/v1/users/alice/recommendations").json()
        assert body["fallback"] is False and body["user_id"] == "alice" and body["items"][0]["item_id"] == "i1"
        assert http.get("/v1/users/alice/profile").json()["known"] is True
        assert http.get("/v1/users/bob/recommendations").json()["fallback_reason"] == "unknown_user"
    with pytest.raises(settings_mod.SettingsError, match="EP_SERVICE_KEY must hold the pipeline's pseudonym key"):
        settings_mod.from_env({"RECS_WAREHOUSE": str(wh), "RECS_API_TOKEN": TOKEN,
                               "RECS_PSEUDONYM_KEY_ENV": "EP_SERVICE_KEY", "EP_SERVICE_KEY": "short"})


def test_too_long_user_id_is_rejected(warehouse):
    with serve(warehouse, RECS_MAX_USER_ID_LENGTH="8") as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        for endpoint in ("recommendations", "profile"):
            r = http.get(f"/v1/users/{'x' * 9}/{endpoint}")
            assert r.status_code == 400 and r.json()["error"] == "bad_user_id", endpoint
            assert http.get(f"/v1/users/{'x' * 8}/{endpoint}").status_code == 200  # unknown: fallback
        assert http.get("/v1/users/%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9/profile").status_code == 200
        assert http.get("/v1/users//recommendations").status_code == 400


def test_profile_with_missing_tables_has_null_fields_and_names_them(warehouse):
    with serve(warehouse) as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        r = http.get("/v1/users/u2/profile")
        assert r.status_code == 200
        body = r.json()
        assert body["known"] is True and body["fallback"] is False
        assert body["segment"] == {"segment_id": 1, "affinity": 0.55, "label": "garden", "size": 20, "share": 0.67}
        assert body["churn_band"] is None and body["scores"] is None
        assert body["send_hour_of_week_utc"] is None and body["send_time"] is None
        assert body["missing_sources"] == ["customer_scores", "send_times"]
        assert body["table_versions"]["customer_scores"] is None

    empty = warehouse.parent / "empty"
    empty.mkdir()
    with serve(empty) as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        r = http.get("/v1/users/u1/profile")
        assert r.status_code == 200 and r.json()["missing_sources"] == [
            "user_segments", "segment_profiles", "customer_scores", "send_times"]
        r = http.get("/v1/users/u1/recommendations")
        assert r.status_code == 200 and r.json()["fallback_reason"] == "recommendations_missing"
        assert r.json()["items"] == []


def test_profile_scores_carry_customer_value_null_safe_also_from_an_older_table(warehouse):
    """Before the customer-value columns existed (an older warehouse) the profile has them as JSON nulls;
    once a newer write adds them (schema merge, like the pipeline's), the latest as_of's values are served."""
    from lib.platform import catalog as C
    from lib.campaign.audience import CUSTOMER_VALUE_COLUMNS as PIPELINE_VALUE_COLUMNS

    assert tuple(CUSTOMER_VALUE_COLUMNS) == PIPELINE_VALUE_COLUMNS
    assert CUSTOMER_VALUE_COLUMNS == {
        c: pa.date32() if C.CUSTOMER_SCORES.schema[c].dataType.simpleString() == "date" else pa.float64()
        for c in PIPELINE_VALUE_COLUMNS}
    write_deltalake(str(warehouse / "customer_scores"), pa.table({
        "user_id": ["u1", "u2"], "as_of": pa.array([19000, 19000], pa.date32()), "churn_band": ["low", "high"],
        "run_id": ["r1", "r1"]}), partition_by=["as_of"])
    with serve(warehouse) as (url, store), httpx.Client(base_url=url, headers=AUTH) as http:
        scores = http.get("/v1/users/u1/profile").json()["scores"]
        assert scores["churn_band"] == "low" and {c: scores[c] for c in CUSTOMER_VALUE_COLUMNS} == dict.fromkeys(
            CUSTOMER_VALUE_COLUMNS)

        # The next scores: u1 with every value, u2 ineligible (nulls); a later as_of, in new files.
        write_deltalake(str(warehouse / "customer_scores"), pa.table({
            "user_id": ["u1", "u2"], "as_of": pa.array([19010, 19010], pa.date32()), "churn_band": ["medium", None],
            "run_id": ["r2", "r2"], "historic_clv": [120.5, None], "predicted_clv": [80.25, None],
            "total_clv": [200.75, None], "p_alive": [0.9, None], "expected_orders": [3.5, None],
            "avg_days_between_orders": [14.0, None],
            "expected_next_order_date": pa.array([19015, None], pa.date32())}),
            partition_by=["as_of"], mode="append", schema_mode="merge")
        store.poll()
        scores = http.get("/v1/users/u1/profile").json()["scores"]
        assert scores["as_of"] == "2022-01-18" and {c: scores[c] for c in CUSTOMER_VALUE_COLUMNS} == {
            "historic_clv": 120.5, "predicted_clv": 80.25, "total_clv": 200.75, "p_alive": 0.9, "expected_orders": 3.5,
            "avg_days_between_orders": 14.0, "expected_next_order_date": "2022-01-23"}
        ineligible = http.get("/v1/users/u2/profile").json()["scores"]
        assert ineligible["as_of"] == "2022-01-18" and all(ineligible[c] is None for c in CUSTOMER_VALUE_COLUMNS)


def test_reload_serves_a_new_table_version_without_failing_requests(warehouse):
    with serve(warehouse, RECS_RELOAD_SECONDS="0.2") as (url, store), httpx.Client(base_url=url, headers=AUTH) as http:
        before = store.current
        assert [i["item_id"] for i in http.get("/v1/users/u1/recommendations?n=1").json()["items"]] == ["i1"]

        statuses: list[int] = []
        failures: list[str] = []
        stop = threading.Event()

        def hammer():
            with httpx.Client(base_url=url, headers=AUTH) as client:
                while not stop.is_set():
                    try:
                        for path in ("/v1/users/u1/recommendations", "/v1/users/u1/profile"):
                            r = client.get(path)
                            statuses.append(r.status_code)
                            if r.status_code != 200:
                                failures.append(f"{path}: {r.status_code} {r.text}")
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            # A new run: overwrite recommendations, and a customer_scores table appears (two as_of per user).
            write(warehouse, "recommendations", recs_columns([("u1", 1, "new1", 0.8, "als"),
                                                             ("u1", 2, "new2", 0.6, "als")]))
            # partitioned by as_of, like the score_customers stage writes it
            write_deltalake(str(warehouse / "customer_scores"), pa.table({
                "user_id": ["u1", "u1"], "as_of": pa.array([19000, 19010], pa.date32()),
                "churn_probability": [0.2, 0.7], "churn_band": ["low", "high"],
                "purchase_probability": [0.5, 0.1], "run_id": ["r1", "r2"]}), partition_by=["as_of"])
            deadline = time.monotonic() + 20
            while True:
                recs = http.get("/v1/users/u1/recommendations").json()
                profile = http.get("/v1/users/u1/profile").json()
                if recs["table_version"] == 2 and profile["churn_band"] is not None:
                    break
                assert time.monotonic() < deadline, f"reload not seen: {recs} {profile}"
                time.sleep(0.1)
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert failures == []
        assert len(statuses) > 20 and set(statuses) == {200}
        assert [(i["rank"], i["item_id"]) for i in recs["items"]] == [(1, "new1"), (2, "new2")]
        # the latest as_of wins
        assert profile["churn_band"] == "high" and profile["scores"]["as_of"] == "2022-01-18"
        assert profile["scores"]["churn_probability"] == 0.7 and "customer_scores" not in profile["missing_sources"]
        # the snapshot requests held before the reload is untouched (requests in flight finish on it)
        assert before.versions["recommendations"] == 1
        start, end = before.recommendations.rows_for("u1", 0)
        assert [i["item_id"] for i in before.recommendations.items_json(start, end)] == ["i1", "i2", "i3", "i4"]
        assert store.current.versions["recommendations"] == 2 and store.current.versions["customer_scores"] == 0
        # a table that cannot be served keeps the last good version and says why
        write_deltalake(str(warehouse / "user_segments"), pa.table({"user_id": ["u1"], "other": [1]}),
                        mode="overwrite", schema_mode="overwrite")
        deadline = time.monotonic() + 20
        while "user_segments" not in http.get("/healthz").json()["errors"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert http.get("/v1/users/u1/profile").json()["segment"]["segment_id"] == 0


def test_strategy_parameter_when_the_table_has_the_column(tmp_path):
    wh = tmp_path / "wh"
    write(wh, "recommendations", recs_columns([
        ("u1", 1, "d1", 0.9, "als", "discover"), ("u1", 1, "b1", 0.8, "als", "buy_again"),
        ("u1", 2, "b2", 0.7, "als", "buy_again"), ("u1", 1, "m1", 0.6, "als", "blended"),
        ("u2", 1, "d2", 0.5, "als", "discover"), ("u2", 1, "m2", 0.4, "als", "blended"),
    ]))
    with serve(wh) as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        body = http.get("/v1/users/u1/recommendations").json()
        assert body["strategy"] == "blended" and [i["item_id"] for i in body["items"]] == ["m1"]
        body = http.get("/v1/users/u1/recommendations?strategy=buy_again").json()
        assert [i["item_id"] for i in body["items"]] == ["b1", "b2"] and body["fallback"] is False
        # u2 has no buy_again list: flagged fallback, saying why
        body = http.get("/v1/users/u2/recommendations?strategy=buy_again").json()
        assert body["fallback"] is True and body["fallback_reason"] == "no_list_for_strategy"
        r = http.get("/v1/users/u1/recommendations?strategy=nope")
        assert r.status_code == 400 and "blended, buy_again, discover" in r.json()["detail"]
        assert http.get("/healthz").json()["strategies"] == ["blended", "buy_again", "discover"]


def test_settings_are_checked_at_start_naming_the_variable(tmp_path):
    with pytest.raises(settings_mod.SettingsError, match="RECS_API_TOKEN is not set"):
        settings_mod.from_env({"RECS_WAREHOUSE": str(tmp_path)})
    with pytest.raises(settings_mod.SettingsError, match="MY_TOKEN is not set"):
        settings_mod.from_env({"RECS_WAREHOUSE": str(tmp_path), "RECS_TOKEN_ENV": "MY_TOKEN", "RECS_API_TOKEN": "x"})
    assert settings_mod.from_env({"RECS_WAREHOUSE": str(tmp_path), "RECS_ALLOW_NO_AUTH": "1"}).auth_required is False
    for name, value in (("RECS_MAX_N", "lots"), ("RECS_UNKNOWN_USER", "ignore"), ("RECS_RELOAD_SECONDS", "-1"),
                        ("RECS_RELOAD_SECONDS", "inf"), ("RECS_RELOAD_SECONDS", "nan"), ("RECS_RELOAD_SECONDS", "86401"),
                        ("RECS_MAX_USER_ID_LENGTH", "0"), ("RECS_WAREHOUSE", str(tmp_path / "nowhere"))):
        with pytest.raises(settings_mod.SettingsError, match=name):
            settings_mod.from_env({"RECS_WAREHOUSE": str(tmp_path), "RECS_API_TOKEN": TOKEN, name: value})
    with pytest.raises(settings_mod.SettingsError, match="RECS_RELOAD_SECONDS='inf' must be a number of seconds in "
                                                         "\\[0, 86400\\]"):
        settings_mod.from_env({"RECS_WAREHOUSE": str(tmp_path), "RECS_API_TOKEN": TOKEN, "RECS_RELOAD_SECONDS": "inf"})
    with pytest.raises(settings_mod.SettingsError, match="MY_TOKEN holds 1 characters, fewer than 16"):
        settings_mod.from_env({"RECS_WAREHOUSE": str(tmp_path), "RECS_TOKEN_ENV": "MY_TOKEN", "MY_TOKEN": "x"})

    env = {k: v for k, v in os.environ.items() if not k.startswith("RECS_")}
    result = subprocess.run([str(REPO_ROOT / "service" / "serve.sh"), "--warehouse", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "RECS_API_TOKEN is not set" in result.stderr


def test_healthz_fails_when_reloads_fall_behind(warehouse):
    """A reload thread that died or hangs stops moving last_poll: the probe says so instead of ok."""
    with serve(warehouse, RECS_RELOAD_SECONDS="30") as (url, store), httpx.Client(base_url=url) as http:
        assert http.get("/healthz").json()["status"] == "ok"
        store.last_poll = time.time() - (3 * 30 + 61)
        stale = http.get("/healthz")
        assert (stale.status_code, stale.json()["status"]) == (503, "stale")
        store.poll()
        assert http.get("/healthz").status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_start_command_serves_the_warehouse(warehouse):
    port = _free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RECS_")}, "RECS_API_TOKEN": TOKEN}
    proc = subprocess.Popen([str(REPO_ROOT / "service" / "serve.sh"), "--warehouse", str(warehouse),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as http:
            while True:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    r = http.get("/v1/users/u1/recommendations?n=1")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "serve.sh did not answer"
                    time.sleep(0.2)
            assert r.status_code == 200 and r.json()["items"][0]["item_id"] == "i1"
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


def test_serves_a_table_written_by_delta_spark(spark, tmp_path):
    """delta-rs reads what delta-spark 4.4 writes (the pipeline's writer): an overwrite, then the latest version."""
    wh = tmp_path / "wh"
    schema = "user_id string, rank int, item_id string, score double, source string, run_id string"
    spark.createDataFrame([("s1", 1, "old", 1.0, "als", "r1")], schema).write.format("delta").save(
        str(wh / "recommendations"))
    spark.createDataFrame([("s1", 2, "b", 0.5, "als", "r2"), ("s1", 1, "a", 0.9, "als", "r2"),
                           ("s2", 1, "c", 0.1, "popular", "r2")], schema) \
        .write.format("delta").mode("overwrite").save(str(wh / "recommendations"))
    spark.createDataFrame([("s1", 3, 0.9, "r2")], "user_id string, segment_id int, affinity double, run_id string") \
        .write.format("delta").save(str(wh / "user_segments"))
    with serve(wh) as (url, _), httpx.Client(base_url=url, headers=AUTH) as http:
        body = http.get("/v1/users/s1/recommendations").json()
        assert body["table_version"] == 1 and body["run_id"] == "r2"
        assert [(i["rank"], i["item_id"]) for i in body["items"]] == [(1, "a"), (2, "b")]
        assert http.get("/v1/users/s1/profile").json()["segment"]["segment_id"] == 3


def tagged(warehouse: Path, table: str, columns: dict, tag: str) -> int:
    """Overwrite ``table`` in one commit tagged like jobs.common.run_stage tags it; return the new version."""
    write_deltalake(str(warehouse / table), pa.table(columns), mode="overwrite",
                    commit_properties=CommitProperties(custom_metadata={"userMetadata": tag}))
    return DeltaTable(str(warehouse / table)).version()


def record_runs(warehouse: Path, attempts: list[tuple[str, str, str]]) -> None:
    """pipeline_runs holding these (run_id, stage, status) attempts, started in this order."""
    start = datetime(2026, 12, 1, tzinfo=timezone.utc)
    started = [start + timedelta(minutes=i) for i in range(len(attempts))]
    write(warehouse, "pipeline_runs", {
        "run_id": [a[0] for a in attempts], "stage": [a[1] for a in attempts], "status": [a[2] for a in attempts],
        "started_at": pa.array(started, pa.timestamp("us", "UTC"))})


def segment_run(warehouse: Path, run: str, segments: dict[str, int]) -> dict[str, int]:
    """segment_users' two tables as one run writes them (labels name the run); return their versions."""
    tag = f"{run}:segment_users"
    ids = sorted(set(segments.values()))
    return {
        "user_segments": tagged(warehouse, "user_segments", {
            "user_id": list(segments), "segment_id": pa.array(list(segments.values()), pa.int32()),
            "affinity": [0.9] * len(segments), "run_id": [run] * len(segments)}, tag),
        "segment_profiles": tagged(warehouse, "segment_profiles", {
            "segment_id": pa.array(ids, pa.int32()), "size": [1] * len(ids), "share": [1 / len(ids)] * len(ids),
            "label": [f"{run}-{i}" for i in ids], "run_id": [run] * len(ids)}, tag),
    }


def test_each_served_table_switches_with_the_stage_that_writes_it():
    from jobs.stages import ALL_STAGES
    writers: dict[str, set[str]] = {}
    for stage in ALL_STAGES:
        for table in stage.writes:
            writers.setdefault(table.name, set()).add(stage.name)
    staged = {table: producer for table, producer in PRODUCER.items() if producer is not None}
    assert {table: writers[table] for table in staged} == {table: {producer} for table, producer in staged.items()}
    # A table without a producer is written by several stages and served at its latest version.
    assert all(len(writers[table]) > 1 for table, producer in PRODUCER.items() if producer is None)


def test_a_running_failed_or_killed_run_is_never_served_and_a_stage_switches_whole(tmp_path):
    """A segment_users run that fails its gate while the service polls (issue 19, case 4), then a killed
    one: every answer pairs user_segments and segment_profiles of one successful run."""
    wh = tmp_path / "wh"
    first = segment_run(wh, "r1", {"u1": 0, "u2": 1})
    runs = [("r1", "segment_users", "success")]
    record_runs(wh, runs)
    allowed = {(0, "r1-0"), (1, "r1-1")}
    answers: list[tuple] = []
    stop = threading.Event()
    with serve(wh, RECS_RELOAD_SECONDS="0.02") as (url, store), httpx.Client(base_url=url, headers=AUTH) as http:
        def hammer():
            with httpx.Client(base_url=url, headers=AUTH) as client:
                while not stop.is_set():
                    for user in ("u1", "u2", "u3"):
                        segment = client.get(f"/v1/users/{user}/profile").json()["segment"]
                        answers.append((user, segment and (segment["segment_id"], segment["label"])))

        def served() -> dict:
            store.poll()  # besides the reload thread: this state is certainly seen
            return {t: v for t, v in http.get("/healthz").json()["table_versions"].items() if t in first}

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            assert served() == first
            reloads = store.reloads
            # r2 runs: it overwrites user_segments (new segment ids), then segment_profiles, then fails its gate.
            runs.append(("r2", "segment_users", "running"))
            record_runs(wh, runs)
            segment_run(wh, "r2", {"u1": 5, "u2": 6, "u3": 7})
            assert served() == first
            # The rollback: both tables RESTOREd (untagged commits, as run_stage makes them), the row failed.
            for table, version in first.items():
                DeltaTable(str(wh / table)).restore(version)
            runs[-1] = ("r2", "segment_users", "failed")
            record_runs(wh, runs)
            assert served() == first
            assert store.reloads == reloads  # the rolled-back run changed nothing that is served

            # r3 is killed after its first write: pipeline_runs says running for ever.
            runs.append(("r3", "segment_users", "running"))
            record_runs(wh, runs)
            tagged(wh, "user_segments", {"user_id": ["u1"], "segment_id": pa.array([9], pa.int32()),
                                         "affinity": [1.0], "run_id": ["r3"]}, "r3:segment_users")
            assert served() == first

            # r4 succeeds: both tables switch to it at once.
            runs.append(("r4", "segment_users", "running"))
            record_runs(wh, runs)
            fourth = segment_run(wh, "r4", {"u1": 2, "u2": 3, "u3": 3})
            assert served() == first
            runs[-1] = ("r4", "segment_users", "success")
            record_runs(wh, runs)
            assert served() == fourth
            allowed |= {(2, "r4-2"), (3, "r4-3")}
            time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert http.get("/v1/users/u3/profile").json()["segment"]["label"] == "r4-3"
    assert len(answers) > 50
    mixed = {a for a in answers if a[1] is not None and a[1] not in allowed}
    assert not mixed  # no answer from r2 or r3, no segment without its run's label
    assert {a for a in answers if a[0] == "u3"} <= {("u3", None), ("u3", (3, "r4-3"))}


@pytest.mark.slow  # two run_stage runs with their bookkeeping and rollback
def test_a_stage_that_run_stage_rolls_back_is_never_served(context, monkeypatch, tmp_path):
    """What delta-spark and run_stage really write (commit tags, RESTORE, the pipeline_runs MERGE): the
    service polls while a segment_users run is in flight and after its gate failed, and serves the last
    successful run throughout."""
    from jobs import segment_users
    from jobs.common import run_stage
    from lib.platform import catalog as C
    from lib.platform.quality import DataQualityError
    from lib.platform.runs import StageResult

    wh = tmp_path / "wh"
    settings = settings_mod.from_env({"RECS_WAREHOUSE": str(wh), "RECS_ALLOW_NO_AUTH": "1", "RECS_RELOAD_SECONDS": "0"},
                                     check_warehouse=False)
    store = Store(settings)
    seen_in_flight = []

    def fake_run(shares: list[float]):
        def run(ctx):
            spark = ctx.spark
            users = [(f"u{i}", i, 0.9, ctx.run_id) for i in range(len(shares))]
            ctx.tables.overwrite(spark.createDataFrame(users, C.USER_SEGMENTS.schema), C.USER_SEGMENTS)
            profiles = [(i, 1, share, [], [], True, f"{ctx.run_id}-{i}", ctx.run_id) for i, share in enumerate(shares)]
            ctx.tables.overwrite(spark.createDataFrame(profiles, C.SEGMENT_PROFILES.schema), C.SEGMENT_PROFILES)
            store.poll()
            seen_in_flight.append(dict(store.current.versions))
            return StageResult()
        return run

    ctx = context(f"output.root={wh}", run_id="good")
    monkeypatch.setattr(segment_users, "run", fake_run([0.5, 0.5]))
    run_stage(ctx, "segment_users")
    store.poll()
    good = {t: store.current.versions[t] for t in ("user_segments", "segment_profiles")}
    assert good["user_segments"] is not None
    assert store.current.parts["segment_profiles"].by_segment[1]["label"] == "good-1"

    monkeypatch.setattr(segment_users, "run", fake_run([0.97, 0.01, 0.01, 0.01]))  # fails largest_segment_share
    with pytest.raises(DataQualityError):
        run_stage(replace(ctx, run_id="bad"), "segment_users")
    store.poll()
    assert {t: seen_in_flight[-1][t] for t in good} == good  # in flight: not served
    assert {t: store.current.versions[t] for t in good} == good  # rolled back: nothing moved
    assert store.current.parts["user_segments"].row("u3") is None
    assert DeltaTable(str(wh / "user_segments")).version() > good["user_segments"] + 1  # written, then restored
