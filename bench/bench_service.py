"""Benchmark of the recommendations API (service/) on this machine, loopback only.

    flock /tmp/spark.lock .venv/bin/python bench/bench_service.py [--rows 1000000 4000000] [--seconds 20]

1. Writes synthetic warehouses with deltalake (10 recommendations per user, 50k items): one per size
   in ``--rows`` with only ``recommendations``, and the largest again with the profile tables
   (user_segments, segment_profiles, customer_scores, send_times) for every user.
2. Memory: starts the server (``python -m service``, one process) on each recommendations-only
   warehouse, waits until it answers, reads its resident set (VmRSS); the slope between sizes is
   the memory per million recommendation rows. It also loads the table in this process and counts
   the snapshot's own bytes (numpy arrays + the user dict and its strings).
3. Load: against the full warehouse, 50 concurrent keep-alive HTTP/1.1 clients (raw asyncio streams:
   a light client, because it shares the 2 cores with the server) for each scenario, bounded by
   ``--seconds`` and ``--max-requests``: known users' recommendations, profiles, unknown users
   (fallback), and recommendations while a new table version is written and reloaded; and, when
   Debian's wrk is installed, known users' recommendations again from wrk (a C client).
Prints a markdown table and writes bench/out/service.json. Every address is 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOKEN = "bench-token-0123456789"
N_ITEMS = 50_000
PER_USER = 10
CONTENT_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.I)


def users_of(n_users: int) -> pa.Array:
    return pa.array(np.char.add("u", np.char.zfill(np.arange(n_users).astype(str), 8)))


def write_recommendations(path: Path, n_rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_users = n_rows // PER_USER
    items = pa.array(np.char.add("i", np.char.zfill(np.arange(N_ITEMS).astype(str), 6)))
    codes = pa.array(rng.integers(0, N_ITEMS, n_rows).astype(np.int32))
    user_codes = pa.array(np.repeat(np.arange(n_users, dtype=np.int32), PER_USER))
    table = pa.table({
        "user_id": pa.DictionaryArray.from_arrays(user_codes, users_of(n_users)).cast(pa.string()),
        "rank": pa.array(np.tile(np.arange(1, PER_USER + 1, dtype=np.int32), n_users)),
        "item_id": pa.DictionaryArray.from_arrays(codes, items).cast(pa.string()),
        "score": pa.array(np.sort(rng.random(n_rows))[::-1]),
        "source": pa.array(np.where(rng.random(n_rows) < 0.9, "als", "segment_popular")),
        "run_id": pa.array([f"bench-{seed}"] * n_rows),
    })
    write_deltalake(str(path), table, mode="overwrite")


def write_profiles(root: Path, n_users: int) -> None:
    rng = np.random.default_rng(1)
    users = users_of(n_users)
    write_deltalake(str(root / "user_segments"), pa.table({
        "user_id": users, "segment_id": pa.array(rng.integers(0, 8, n_users).astype(np.int32)),
        "affinity": pa.array(rng.random(n_users)), "run_id": pa.array(["bench"] * n_users)}), mode="overwrite")
    write_deltalake(str(root / "segment_profiles"), pa.table({
        "segment_id": pa.array(np.arange(8, dtype=np.int32)), "size": pa.array(np.full(8, n_users // 8)),
        "share": pa.array(np.full(8, 0.125)), "label": pa.array([f"segment {i}" for i in range(8)]),
        "run_id": pa.array(["bench"] * 8)}), mode="overwrite")
    bands = np.array(["low", "medium", "high"])
    write_deltalake(str(root / "customer_scores"), pa.table({
        "user_id": users, "as_of": pa.array(np.full(n_users, 20_000, dtype=np.int32)).cast(pa.date32()),
        "churn_probability": pa.array(rng.random(n_users)), "churn_band": pa.array(bands[rng.integers(0, 3, n_users)]),
        "purchase_probability": pa.array(rng.random(n_users)), "run_id": pa.array(["bench"] * n_users)}),
        mode="overwrite")
    write_deltalake(str(root / "send_times"), pa.table({
        "user_id": users, "hour_of_week_utc": pa.array(rng.integers(0, 168, n_users).astype(np.int32)),
        "confidence": pa.array(rng.random(n_users)), "n_signals": pa.array(rng.integers(0, 50, n_users).astype(np.int32)),
        "is_fallback": pa.array(rng.random(n_users) < 0.2), "run_id": pa.array(["bench"] * n_users)}),
        mode="overwrite")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(warehouse: Path, reload_seconds: float = 0) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RECS_")},
           "RECS_API_TOKEN": TOKEN, "RECS_RELOAD_SECONDS": str(reload_seconds), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "service", "--warehouse", str(warehouse), "--port", str(port),
                             "--log-level", "warning"], env=env, cwd=REPO)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc, port, time.perf_counter() - started
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def structural_bytes(table_path: Path) -> dict:
    """The snapshot's own bytes for the recommendations table, counted in this process."""
    from service.store import load_recommendations

    dt = DeltaTable(str(table_path))
    part = load_recommendations(dt, dt.version())
    dict_bytes = sys.getsizeof(part.users) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in part.users.items())
    items_bytes = sys.getsizeof(part.items) + sum(sys.getsizeof(x) for x in part.items)
    return {"rows": part.rows, "users": len(part.users), "array_bytes": part.array_bytes(),
            "user_dict_bytes": dict_bytes, "item_list_bytes": items_bytes}


async def load(port: int, paths: list[str], clients: int, seconds: float, max_requests: int,
               during=None) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    issued = 0
    deadline = time.perf_counter() + seconds
    header = f"Host: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    rng = random.Random(7)

    async def client():
        nonlocal issued
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                request = f"GET {rng.choice(paths)} HTTP/1.1\r\n{header}".encode()
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                body = await reader.readexactly(int(CONTENT_LENGTH.search(head).group(1)))
                latencies.append(time.perf_counter() - t0)
                status = int(head[9:12])
                statuses[status] = statuses.get(status, 0) + 1
                if status != 200 and len(errors) < 5:
                    errors.append(body[:200].decode())
        except (OSError, asyncio.IncompleteReadError) as exc:
            errors.append(repr(exc))
        finally:
            writer.close()

    started = time.perf_counter()
    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    side = asyncio.create_task(during()) if during else None
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    extra = await side if side else None
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "seconds": round(elapsed, 2), "rps": round(len(latencies) / elapsed),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "max_ms": round(float(lat.max()), 1), "statuses": statuses, "errors": errors, "during": extra}


WRK_SCRIPT = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
math.randomseed(7)
request = function()
  return wrk.format("GET", paths[math.random(#paths)], {["Authorization"] = "Bearer %s"})
end
"""


def wrk_load(port: int, paths: list[str], clients: int, seconds: float, workdir: Path) -> dict | None:
    """The same load from wrk (a C client, lighter than Python) when it is installed (Debian: wrk)."""
    if shutil.which("wrk") is None:
        return None
    (workdir / "paths.txt").write_text("\n".join(paths) + "\n")
    (workdir / "wrk.lua").write_text(WRK_SCRIPT % (workdir / "paths.txt", TOKEN))
    out = subprocess.run(["wrk", "-t2", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "-s",
                          str(workdir / "wrk.lua"), f"http://127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=seconds + 60).stdout

    def ms(label: str) -> float:
        value = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        number, unit = float(value.group(1)), value.group(2)
        return round(number / 1000 if unit == "us" else number * 1000 if unit == "s" else number, 2)

    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": requests, "rps": round(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))),
            "p50_ms": ms("50%"), "p99_ms": ms("99%"), "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "errors": re.findall(r"Socket errors:.*", out)}


def main() -> None:
    if sys.argv[1:2] == ["--write-only"]:  # the reload scenario's writer process
        write_recommendations(Path(sys.argv[2]), int(sys.argv[3]), seed=2)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "service"))
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result: dict = {"uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                    "clients": args.clients, "memory": [], "load": {}}
    print(result["uptime_before"], flush=True)

    empty = out / "empty"
    empty.mkdir()
    proc, _, ready = start_server(empty)
    result["rss_empty_mb"] = round(rss_mb(proc.pid), 1)
    stop_server(proc)
    for rows in args.rows:
        wh = out / f"recs_{rows}"
        t0 = time.perf_counter()
        write_recommendations(wh / "recommendations", rows, seed=1)
        write_s = time.perf_counter() - t0
        proc, _, ready = start_server(wh)
        rss = rss_mb(proc.pid)
        stop_server(proc)
        entry = {"rows": rows, "write_s": round(write_s, 1), "ready_s": round(ready, 1), "rss_mb": round(rss, 1),
                 **structural_bytes(wh / "recommendations")}
        result["memory"].append(entry)
        print(entry, flush=True)
    if len(result["memory"]) > 1:
        a, b = result["memory"][0], result["memory"][-1]
        per_m = (b["rss_mb"] - a["rss_mb"]) / ((b["rows"] - a["rows"]) / 1e6)
        # per row: the arrays and the user dict (10 rows per user); the item vocabulary is per catalog
        own = (b["array_bytes"] + b["user_dict_bytes"]) / b["rows"] * 1e6 / 2**20
        result["rss_mb_per_million_rows"] = round(per_m, 1)
        result["snapshot_mb_per_million_rows"] = round(own, 1)
        print(f"RSS slope {per_m:.1f} MB per million rows; snapshot's arrays + user dict {own:.1f} MB per million rows", flush=True)

    rows = args.rows[-1]
    n_users = rows // PER_USER
    full = out / f"recs_{rows}"
    write_profiles(full, n_users)
    proc, port, ready = start_server(full, reload_seconds=1)
    result["full_warehouse"] = {"rows": rows, "users": n_users, "ready_s": round(ready, 1),
                                "rss_mb": round(rss_mb(proc.pid), 1)}
    try:
        known = [f"/v1/users/u{i:08d}/recommendations?n=10" for i in random.Random(1).sample(range(n_users), min(5000, n_users))]
        profiles = [p.replace("/recommendations?n=10", "/profile") for p in known]
        unknown = [f"/v1/users/x{i:08d}/recommendations?n=10" for i in range(5000)]
        asyncio.run(load(port, known[:200], args.clients, 2, 5000))  # warm-up
        for name, paths in (("recommendations", known), ("profile", profiles), ("unknown_user_fallback", unknown)):
            r = asyncio.run(load(port, paths, args.clients, args.seconds, args.max_requests))
            result["load"][name] = r
            print(name, r, flush=True)

        r = wrk_load(port, known, args.clients, args.seconds, out)
        if r is not None:
            result["load"]["recommendations_wrk"] = r
            print("recommendations_wrk", r, flush=True)

        async def new_version():
            await asyncio.sleep(2)
            t0 = time.perf_counter()
            # in another process: a writer in this one would stall the client's event loop, not the server's
            writer_proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--write-only", str(full / "recommendations"), str(rows), cwd=REPO)
            assert await writer_proc.wait() == 0
            written = time.perf_counter() - t0
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            while True:  # until the server serves the new version
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                body = json.loads(await reader.readexactly(int(CONTENT_LENGTH.search(head).group(1))))
                if body["table_versions"]["recommendations"] == 1:
                    break
                await asyncio.sleep(0.1)
            writer.close()
            return {"write_s": round(written, 1), "served_after_s": round(time.perf_counter() - t0, 1)}

        r = asyncio.run(load(port, known, args.clients, args.seconds, args.max_requests, during=new_version))
        result["load"]["recommendations_during_reload"] = r
        print("recommendations_during_reload", r, flush=True)
        result["full_warehouse"]["rss_after_reload_mb"] = round(rss_mb(proc.pid), 1)
    finally:
        stop_server(proc)
    result["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(result["uptime_after"])
    (out.parent / "service.json").write_text(json.dumps(result, indent=2))

    print("\n| scenario | requests | RPS | p50 ms | p99 ms | max ms | non-200 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in result["load"].items():
        if "statuses" in r:
            bad = sum(v for k, v in r["statuses"].items() if k != 200) + len(r["errors"])
        else:
            bad = r["non_2xx"] + len(r["errors"])
        print(f"| {name} | {r['requests']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r.get('max_ms', '')} | {bad} |")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
