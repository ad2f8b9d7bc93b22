"""Each source preset end to end: a generated file in the preset's native shape through the whole pipeline.

    flock /tmp/spark.lock .venv/bin/python bench/run_presets.py [--out bench/out/presets] [--preset NAME ...]

For each preset in conf/sources/ (retailrocket, rees46, invoice_lines) this writes a csv in that
source's own shape, derived from lib.sample.planted.generate_events and shifted to the public dataset's
own era: its native column names, event names, timestamp unit or format and id style (epoch
milliseconds and numeric visitor ids; `2019-10-01 00:00:00 UTC`, cart / remove_from_cart and a price on
every row; `12/1/2010 8:26`, CustomerID `17850.0`, postage lines, cancellations and lines without a
customer). Then it runs

    ./spark-submit.sh jobs/run_pipeline.py --conf conf/sources/<preset>.toml --set input.events=<file>
        --set output.root=<dir> <cheap model settings>

as a subprocess (no conversion script in between) and reports per preset the exit code, every stage's
status and seconds from pipeline_runs (read with delta-rs, no second JVM), and the events ingested and
quarantined. Prints a markdown table (docs/ingest.md keeps the last one). Not a test: the seconds
depend on the machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from lib.platform.runs import NOT_PROMOTED  # noqa: E402

PRESETS = ("retailrocket", "rees46", "invoice_lines")
# Where each public dataset's window ends: the generated window (ending sample.end_date) is moved there.
ERA_END = {"retailrocket": date(2015, 9, 18), "rees46": date(2019, 10, 31), "invoice_lines": date(2011, 12, 9)}
# The later stages at their smallest useful size (as tests/test_pipeline.py runs them).
CHEAP = ["spark.shuffle_partitions=2", "segments.k=3", "segments.max_iter=10", "segments.stability_check=false",
         "recommend.als.ranks=8", "recommend.als.max_candidates=1", "recommend.als.max_iter=5",
         "scores.models=logistic_regression"]


def generated(users: int, items: int, events: int):
    """The generated clickstream as pandas (a few thousand rows), from one short local Spark session."""
    from lib.sample.planted import SampleSpec, generate_events
    from lib.platform.session import local_session

    spec = SampleSpec(users=users, items=items, events=events, segments=3, seed=11)
    spark = local_session("bench-presets-generate", "local[2]", {
        "spark.sql.shuffle.partitions": "2", "spark.sql.session.timeZone": "UTC",
        "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{REPO}/conf/log4j2.properties"})
    try:
        frame = generate_events(spark, spec, partitions=2).orderBy("event_ts", "event_id").toPandas()
    finally:
        spark.stop()
    frame["event_ts"] = [ts.to_pydatetime().replace(tzinfo=timezone.utc) for ts in frame["event_ts"]]
    return frame, date.fromisoformat(spec.end_date)


def _shifted(frame, end: date, preset: str):
    """Rows moved to the dataset's era; email events dropped (none of the three shapes has them)."""
    offset = datetime.combine(ERA_END[preset], datetime.min.time()) - datetime.combine(end, datetime.min.time())
    site = frame[frame["event_type"].isin(["view", "click", "add_to_cart", "purchase"])].copy()
    site["event_ts"] = [ts + offset for ts in site["event_ts"]]
    site["user_num"] = [int(u[1:]) for u in site["user_id"]]
    site["item_num"] = [int(i[1:]) for i in site["item_id"]]
    return site


def _price(item: int) -> float:
    return round(0.85 + (item * 37 % 97) * 0.41, 2)


def write_retailrocket(frame, end: date, path: Path) -> int:
    """timestamp,visitorid,event,itemid,transactionid: epoch ms, view / addtocart / transaction."""
    names = {"view": "view", "click": "view", "add_to_cart": "addtocart", "purchase": "transaction"}
    rows, transaction = [], 4000
    for r in _shifted(frame, end, "retailrocket").itertuples():
        event = names[r.event_type]
        transaction += event == "transaction"
        rows.append([int(r.event_ts.timestamp() * 1000), 257000 + r.user_num, event, 100000 + r.item_num,
                     transaction if event == "transaction" else ""])
    return _write(path, ["timestamp", "visitorid", "event", "itemid", "transactionid"], rows)


def write_rees46(frame, end: date, path: Path) -> int:
    """event_time,event_type,product_id,...,price,user_id,user_session: `2019-10-01 00:00:00 UTC`,
    view / cart / remove_from_cart / purchase, the item's price on every row."""
    names = {"view": "view", "click": "view", "add_to_cart": "cart", "purchase": "purchase"}
    brands = ("shiseido", "aqua", "samsung", "lucente", "", "apple", "xiaomi")
    categories = ("appliances.environment.water_heater", "", "electronics.smartphone", "furniture.bathroom.bath")
    rows = []
    for r in _shifted(frame, end, "rees46").itertuples():
        product = 3900000 + r.item_num
        common = [product, 2053013552326770000 + r.item_num % 7, categories[r.item_num % 4], brands[r.item_num % 7],
                  f"{_price(r.item_num):.2f}", 541000000 + r.user_num]
        session = f"{r.user_num:08x}-{r.event_ts:%m%d}-4e00-8c23-{r.item_num:012x}"
        rows.append([f"{r.event_ts:%Y-%m-%d %H:%M:%S} UTC", names[r.event_type], *common, session])
        if r.event_type == "add_to_cart" and r.Index % 4 == 0:  # some carts are emptied again
            later = r.event_ts + timedelta(minutes=2)
            rows.append([f"{later:%Y-%m-%d %H:%M:%S} UTC", "remove_from_cart", *common, session])
    return _write(path, ["event_time", "event_type", "product_id", "category_id", "category_code", "brand", "price",
                         "user_id", "user_session"], rows)


def write_invoice_lines(frame, end: date, path: Path) -> int:
    """InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country: every click, cart
    and purchase of the sample as a purchase line; `12/1/2010 8:26`; CustomerID `17850.0`; some postage
    lines, cancellations (C-invoices, negative Quantity) and lines without a CustomerID."""
    site = _shifted(frame, end, "invoice_lines")
    site = site[site["event_type"] != "view"]
    rows, invoices = [], {}
    for r in site.itertuples():
        key = (r.user_num, r.event_ts.date(), r.event_ts.hour)
        invoice = invoices.setdefault(key, 536365 + len(invoices))
        stock = f"{20000 + r.item_num}" + ("A" if r.item_num % 9 == 0 else "")
        name = f"ITEM {r.item_num}, {'LARGE' if r.item_num % 2 else 'SMALL'}"
        when = f"{r.event_ts.month}/{r.event_ts.day}/{r.event_ts.year} {r.event_ts.hour}:{r.event_ts.minute:02d}"
        quantity = 1 + (r.Index * 7) % 12
        customer = "" if r.Index % 50 == 0 else f"{12346 + r.user_num}.0"
        rows.append([invoice, stock, name, quantity, when, f"{_price(r.item_num):.2f}", customer, "United Kingdom"])
        if r.Index % 40 == 0:  # a postage line on some invoices
            rows.append([invoice, "POST", "POSTAGE", 1, when, "18.00", customer, "United Kingdom"])
        if r.Index % 70 == 1:  # a cancellation of the line
            rows.append([f"C{invoice}", stock, name, -quantity, when, f"{_price(r.item_num):.2f}", customer,
                         "United Kingdom"])
    return _write(path, ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice",
                         "CustomerID", "Country"], rows)


def _write(path: Path, header: list[str], rows: list[list]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return len(rows)


WRITERS = {"retailrocket": write_retailrocket, "rees46": write_rees46, "invoice_lines": write_invoice_lines}


def run_pipeline(preset: str, events: Path, root: Path, log: Path, extra: list[str]) -> tuple[int, float]:
    command = ["./spark-submit.sh", "jobs/run_pipeline.py", "--conf", f"conf/sources/{preset}.toml",
               "--set", f"input.events={events}", "--set", f"output.root={root}", "--run-id", f"preset-{preset}"]
    for pair in CHEAP + extra:
        command += ["--set", pair]
    started = time.monotonic()
    with log.open("w") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    return code, time.monotonic() - started


def stage_rows(root: Path, run_id: str) -> list[dict]:
    """pipeline_runs of the run, read with delta-rs: stage, status, seconds, rows, counts."""
    from deltalake import DeltaTable

    if not (root / "pipeline_runs" / "_delta_log").is_dir():
        return []
    rows = DeltaTable(str(root / "pipeline_runs")).to_pyarrow_table().to_pylist()
    out = []
    for row in sorted((r for r in rows if r["run_id"] == run_id), key=lambda r: r["started_at"]):
        seconds = (row["finished_at"] - row["started_at"]).total_seconds() if row["finished_at"] else None
        out.append({"stage": row["stage"], "status": row["status"], "seconds": seconds, "rows_in": row["rows_in"],
                    "rows_out": row["rows_out"], "counts": dict(row["counts"] or []), "message": row["message"]})
    return out


def outputs(root: Path) -> dict:
    """What a marketer gets, read with delta-rs: users with a list, customers scored (eligible), audience rows."""
    from deltalake import DeltaTable

    def table(name: str):
        path = root / name
        return DeltaTable(str(path)).to_pyarrow_table() if (path / "_delta_log").is_dir() else None

    recommendations, scores, audience = table("recommendations"), table("customer_scores"), table("campaign_audience")
    return {
        "users_with_lists": len(set(recommendations["user_id"].to_pylist())) if recommendations is not None else 0,
        "scored": scores.num_rows if scores is not None else 0,
        "eligible": sum(bool(e) for e in scores["eligible"].to_pylist()) if scores is not None else 0,
        "audience": audience.num_rows if audience is not None else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "presets"))
    parser.add_argument("--preset", action="append", choices=PRESETS, help="default: all three")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--items", type=int, default=80)
    parser.add_argument("--events", type=int, default=9000, help="generated events (email events are dropped)")
    parser.add_argument("--set", action="append", default=[], dest="sets", help="extra key=value for every run")
    parser.add_argument("--report-only", action="store_true", help="print the table of the last run in --out again")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if args.report_only:
        runs = json.loads((out / "runs.json").read_text())
        print(markdown([(p, rows, code, seconds, stage_rows(out / p / "warehouse", f"preset-{p}"))
                        for p, rows, code, seconds in runs], out))
        return
    shutil.rmtree(out, ignore_errors=True)
    frame, end = generated(args.users, args.items, args.events)

    results = []
    for preset in args.preset or PRESETS:
        events = out / preset / "input" / ("events.csv" if preset != "invoice_lines" else "online_retail.csv")
        rows = WRITERS[preset](frame, end, events)
        root = out / preset / "warehouse"
        code, seconds = run_pipeline(preset, events, root, out / preset / "pipeline.log", args.sets)
        stages = stage_rows(root, f"preset-{preset}")
        results.append((preset, rows, code, seconds, stages))
        failed = [s for s in stages if s["status"] not in ("success", NOT_PROMOTED)]
        print(f"{preset}: {rows} rows, exit {code}, {seconds:.0f} s" +
              (f"; failed: {failed[0]['stage']}: {failed[0]['message'][:500]}" if failed else ""), flush=True)

    (out / "runs.json").write_text(json.dumps([r[:4] for r in results]))
    print()
    print(markdown(results, out))


def markdown(results, out: Path) -> str:
    lines = ["| preset | input rows | exit | ingested | quarantined (reasons) | stages: status, seconds | total s "
             "| users with lists | scored (eligible) | audience rows |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    for preset, rows, code, seconds, stages in results:
        made = outputs(out / preset / "warehouse")
        ingest = next((s for s in stages if s["stage"] == "ingest"), None)
        ingested = ingest["rows_out"] if ingest else "-"
        if ingest:
            reasons = ", ".join(f"{k.removeprefix('reason.')} {v}" for k, v in sorted(ingest["counts"].items())
                                if k.startswith("reason."))
            quarantined = f"{ingest['counts'].get('quarantined', 0)}" + (f" ({reasons})" if reasons else "")
        else:
            quarantined = "-"
        per_stage = "; ".join(f"{s['stage']} {s['status'] if s['status'] != 'success' else 'ok'} "
                              f"{s['seconds']:.0f}" if s["seconds"] is not None else f"{s['stage']} {s['status']}"
                              for s in stages)
        lines.append(f"| `{preset}` | {rows} | {code} | {ingested} | {quarantined} | {per_stage} | {seconds:.0f} "
                     f"| {made['users_with_lists']} | {made['scored']} ({made['eligible']}) | {made['audience']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
