"""Benchmark: generate N events (default 10M) and ingest them into Delta on local[2].

    .venv/bin/python bench/bench_generate_ingest.py [--events 10000000] [--out bench/out/gen_ingest]

Prints and appends a markdown row to docs/benchmarks.md. Not a test: figures depend on the machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from jobs.common import StageContext, load_settings, run_stage  # noqa: E402
from lib.platform.session import local_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "gen_ingest"))
    parser.add_argument("--conditions", default="quiet machine", help="noted beside the figures")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)

    spark = local_session("bench-generate-ingest", "local[2]", {
        "spark.driver.memory": "8g", "spark.sql.shuffle.partitions": "16",
        "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{REPO}/conf/log4j2.properties"})
    settings = load_settings([], [
        f"output.root={out}", "spark.shuffle_partitions=16", f"sample.events={args.events}",
        f"sample.users={args.users}", f"sample.items={args.items}", "sample.segments=10"])
    timings = {}
    ctx = StageContext(spark, settings, "bench")
    for name, stage in (("generate", "generate_events"), ("ingest", "ingest"), ("interactions", "build_interactions")):
        started = time.perf_counter()
        result = run_stage(ctx, stage)
        timings[name] = (time.perf_counter() - started, result)
        print(f"{name}: {timings[name][0]:.1f} s  rows_in={result.rows_in} rows_out={result.rows_out}", flush=True)

    row = (f"| {datetime.now(timezone.utc):%Y-%m-%d} | {args.events:,} | {args.users:,} | {args.items:,} | "
           f"{timings['generate'][0]:.0f} | {timings['ingest'][0]:.0f} | {timings['interactions'][0]:.0f} | "
           f"{timings['interactions'][1].rows_out:,} | {args.conditions} |")
    docs = REPO / "docs" / "benchmarks.md"
    if not docs.exists():
        docs.write_text("# Benchmarks: generate, ingest, interactions (local[2], 2 cores)\n\n"
                        "`bench/bench_generate_ingest.py`; seconds of wall time per stage, each a real Delta write.\n\n"
                        "| date | events | users | items | generate s | ingest s | interactions s | matrix non-zeros | conditions |\n"
                        "|---|---|---|---|---|---|---|---|---|\n")
    with docs.open("a") as handle:
        handle.write(row + "\n")
    print(row)
    spark.stop()


if __name__ == "__main__":
    main()
