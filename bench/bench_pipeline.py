"""Benchmark: the whole pipeline, every stage, on generated clickstreams of several sizes (local[2]).

    .venv/bin/python bench/bench_pipeline.py [--events 1000000 10000000] [--forget 1000]

Each size runs in its own Python process and JVM (one after the other, never at once): generate the
sample, then every stage of ``jobs.stages.PIPELINE`` through ``run_stage`` (the bookkeeping a real
run has), optionally followed by ``forget_users`` for ``--forget`` random customers (the GDPR erasure
time). Per stage: wall seconds, the stage's own seconds in ``pipeline_runs`` and the peak resident
memory of the whole process tree (driver JVM and Python workers, read from /proc). Results go to
``bench/out/pipeline/<events>.json``, a table in docs/benchmarks.md and the plot
docs/pipeline_benchmark.png. Not a test: the figures depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

OUT = REPO / "bench" / "out" / "pipeline"
DOCS = REPO / "docs" / "benchmarks.md"
PLOT = REPO / "docs" / "pipeline_benchmark.png"
SECTION = "## The whole pipeline (bench/bench_pipeline.py)"

log = logging.getLogger("bench.pipeline")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants."""
    tree, pending, total = _children(), [root], 0
    page = os.sysconf("SC_PAGE_SIZE")
    while pending:
        pid = pending.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except OSError:
            pass
        pending.extend(tree.get(pid, []))
    return total


class PeakMemory:
    """Samples the process tree's RSS twice a second; ``peak(label)`` is the maximum while ``label`` ran."""

    def __init__(self) -> None:
        self.label, self.peaks = "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            rss = tree_rss_bytes(os.getpid())
            self.peaks[self.label] = max(self.peaks.get(self.label, 0), rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def sizes_for(events: int) -> dict[str, int]:
    """Users and items grow with the events (the 10M point is the earlier benchmarks' 200k x 20k)."""
    return {"users": max(1000, events // 50), "items": max(200, events // 500),
            "partitions": max(4, min(64, events // 500_000))}


def run_one(events: int, forget: int, out: Path, from_stage: str = "", event_log: str = "") -> dict:
    """Every stage on ``events`` generated events in this process; returns the figures. With
    ``from_stage``, the stages before it are not run again: their seconds are the ones an earlier
    run of this script recorded in the same warehouse's pipeline_runs (no peak memory for them)."""
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    date = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    from jobs.common import StageContext, apply_runtime_settings, load_settings, run_stage
    from jobs.run_pipeline import pipeline_stages
    from lib.platform.session import local_session

    shape = sizes_for(events)
    root = out / f"wh-{events}"
    if not from_stage:
        subprocess.run(["rm", "-rf", str(root)], check=True)
    memory = PeakMemory()
    confs = {"spark.driver.memory": "14g",  # the [spark] settings are applied below, as a job applies them
             "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{REPO}/conf/log4j2.properties"}
    if event_log:  # Spark's own record of every job and SQL execution, for bench/profile_event_log.py
        Path(event_log).mkdir(parents=True, exist_ok=True)
        confs |= {"spark.eventLog.enabled": "true", "spark.eventLog.dir": Path(event_log).resolve().as_uri()}
    spark = local_session("bench-pipeline", "local[2]", confs)
    settings = load_settings([], [
        f"output.root={root}", f"spark.shuffle_partitions={shape['partitions']}", f"sample.events={events}",
        f"sample.users={shape['users']}", f"sample.items={shape['items']}", "sample.segments=10",
        f"privacy.erasure_request={root}/erasure_request.parquet"])
    apply_runtime_settings(spark, settings)
    ctx = StageContext(spark, settings, "bench")
    stages, started_all = [], time.perf_counter()
    names = [stage.name for stage in pipeline_stages(settings)]
    # forget_users is not a pipeline stage: resuming there re-runs only the erasure.
    skipped = set(names[:names.index(from_stage)] if from_stage in names else names) if from_stage else set()
    for stage in pipeline_stages(settings):
        if stage.name in skipped:
            stages.append({"stage": stage.name, "wall_seconds": None, "from_earlier_run": True})
            continue
        memory.label = stage.name
        started = time.perf_counter()
        run_stage(ctx, stage.name)
        stages.append({"stage": stage.name, "wall_seconds": round(time.perf_counter() - started, 1)})
        log.info("%s events: %s %.1f s", f"{events:,}", stage.name, stages[-1]["wall_seconds"])
    total = time.perf_counter() - started_all
    if forget:
        # The request is written by Spark from the stored events: nothing per user on the driver.
        (spark.read.format("delta").load(str(root / "events")).select("user_id").distinct()
         .orderBy("user_id").limit(forget).write.mode("overwrite").parquet(f"{root}/erasure_request.parquet"))
        memory.label = "forget_users"
        started = time.perf_counter()
        run_stage(ctx, "forget_users")
        stages.append({"stage": "forget_users", "wall_seconds": round(time.perf_counter() - started, 1)})
    recorded = {row["stage"]: row["seconds"] for row in spark.read.format("delta").load(str(root / "pipeline_runs"))
                .where("status = 'success'").selectExpr(
                    "stage", "cast(finished_at as double) - cast(started_at as double) as seconds").collect()}
    spark.stop()
    memory.stop()
    for row in stages:
        row["stage_seconds"] = round(recorded.get(row["stage"], float("nan")), 1)
        if row["wall_seconds"] is None:
            row["wall_seconds"] = row["stage_seconds"]
            total += row["wall_seconds"]
        row["peak_rss_gb"] = round(memory.peaks.get(row["stage"], 0) / 1e9, 2)
    return {"events": events, **shape, "date": date, "load_average": load, "total_wall_seconds": round(total, 1), "stages": stages,
            "peak_rss_gb": round(max(memory.peaks.values()) / 1e9, 2)}


def markdown(results: list[dict]) -> str:
    names = [row["stage"] for row in results[0]["stages"]]
    runs = "; ".join(f"{r['events']:,} events: {r['date']}, load average {r['load_average']}" for r in results)
    lines = [f"\nlocal[2]; wall seconds per stage (bookkeeping included), peak RSS of the driver JVM and "
             f"Python workers. Runs ({runs}, the load average at each run's start).\n",
             "| stage | " + " | ".join(f"{r['events']:,} events s" for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    for name in names:
        cells = [next((f"{s['wall_seconds']:.0f}" for s in r["stages"] if s["stage"] == name), "-") for r in results]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **pipeline total** | " + " | ".join(f"**{r['total_wall_seconds']:.0f}**" for r in results) + " |")
    lines.append("| peak RSS GB | " + " | ".join(f"{r['peak_rss_gb']:.1f}" for r in results) + " |")
    lines.append("| users x items | " + " | ".join(f"{r['users']:,} x {r['items']:,}" for r in results) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [r["events"] for r in results]
    fig, ax = plt.subplots(figsize=(8, 5))
    names = [row["stage"] for row in results[0]["stages"]]
    colors = plt.get_cmap("tab20").colors  # more stages than the default cycle's 10 colours
    for number, name in enumerate(names):
        seconds = [next((s["wall_seconds"] for s in r["stages"] if s["stage"] == name), None) for r in results]
        ax.plot(events, seconds, marker="o", label=name, color=colors[(2 * number) % 20 + (2 * number) // 20])
    ax.plot(events, [r["total_wall_seconds"] for r in results], marker="s", color="black", linewidth=2,
            label="pipeline total")
    if len(events) > 1:  # time growing as fast as the events, from the smallest run's total
        ax.plot(events, [results[0]["total_wall_seconds"] * e / events[0] for e in events], linestyle=":",
                color="grey", label="linear in events")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("events")
    ax.set_ylabel("wall seconds")
    ax.set_title("Pipeline seconds per stage against events (local[2], 2 cores)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--forget", type=int, default=1000, help="customers erased after the pipeline; 0: none")
    parser.add_argument("--reuse", action="store_true",
                        help="take a size's figures from an earlier run's bench/out/pipeline/<events>.json when present")
    parser.add_argument("--from-stage", default="",
                        help="resume a size's run at this stage on its existing warehouse (earlier stages' seconds "
                             "from its pipeline_runs)")
    parser.add_argument("--event-log", default="",
                        help="write Spark's event log under this directory (summarise it with bench/profile_event_log.py)")
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    if args.single:
        result = run_one(args.single, args.forget, OUT, args.from_stage, args.event_log)
        (OUT / f"{args.single}.json").write_text(json.dumps(result, indent=1))
        return
    results = []
    for events in args.events:  # one process (and JVM) per size, one after the other
        if not (args.reuse and (OUT / f"{events}.json").exists()):
            subprocess.run([sys.executable, __file__, "--single", str(events), "--forget", str(args.forget),
                            "--from-stage", args.from_stage, "--event-log", args.event_log], check=True)
        results.append(json.loads((OUT / f"{events}.json").read_text()))
        print(json.dumps(results[-1]), flush=True)
    table = markdown(results)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if SECTION not in text:
        text += f"\n{SECTION}\n\nPlot: [pipeline_benchmark.png](pipeline_benchmark.png).\n"
    DOCS.write_text(text + table)
    plot(results, PLOT)
    print(table)


if __name__ == "__main__":
    main()
