"""Where a pipeline run's seconds go, from Spark's own event log: per stage, the top-level SQL executions
grouped by what they are (a Delta write, a MERGE, a Delta log snapshot, a localCheckpoint, an action
at a line of lib/ or jobs/).

    .venv/bin/python bench/profile_event_log.py EVENT_LOG_DIR WAREHOUSE [--top 12]

EVENT_LOG_DIR: the ``spark.eventLog.dir`` of the run (``bench/bench_pipeline.py --event-log DIR``, or
``./spark-submit.sh --conf spark.eventLog.enabled=true --conf spark.eventLog.dir=file:///DIR ...``);
its rolled, zstd-compressed files are read with the ``zstd`` command. WAREHOUSE: the run's
``output.root``; each stage's window is its row in ``pipeline_runs`` (read with delta-rs, no JVM).

Only top-level executions count (Delta's nested ones run inside them), so the seconds add up to the
time Spark was busy; what is left of a stage's window is driver-side Python and planning.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
from pathlib import Path

SITE = re.compile(r"/((?:lib|jobs)/[\w/]+\.py):(\d+)")


def read_events(directory: Path):
    """Every JSON event of the application logs under ``directory`` (plain or .zstd, rolled or not)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and not p.name.startswith("appstatus"))
    for path in sorted(files, key=lambda p: (str(p.parent), int(m.group(1)) if (m := re.search(r"events_(\d+)_", p.name)) else 0)):
        raw = subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout \
            if path.suffix == ".zstd" else path.read_bytes()
        for line in raw.decode().splitlines():
            if line:
                yield json.loads(line)


def top_level_executions(events) -> list[dict]:
    """(start ms, end ms, description, details) of every SQL execution that is not nested in another,
    and of every Spark job outside any SQL execution (MLlib's training loops run as such jobs)."""
    runs: dict[int, dict] = {}
    jobs: dict[int, dict] = {}
    for event in events:
        kind = event["Event"]
        if kind == "SparkListenerJobStart" and not event.get("Properties", {}).get("spark.sql.execution.id"):
            properties = event.get("Properties", {})
            jobs[event["Job ID"]] = {"start": event["Submission Time"], "root": None, "details": "",
                                     "desc": "job " + properties.get("callSite.short", "")}
        elif kind == "SparkListenerJobEnd" and event["Job ID"] in jobs:
            jobs[event["Job ID"]]["end"] = event["Completion Time"]
        elif kind.endswith("SparkListenerSQLExecutionStart"):
            runs[event["executionId"]] = {"start": event["time"], "desc": event.get("description", ""),
                                          "details": event.get("details", ""),
                                          "plan": event.get("physicalPlanDescription", "")[:3000],
                                          "root": event.get("rootExecutionId", event["executionId"])}
        elif kind.endswith("SparkListenerSQLExecutionEnd") and event["executionId"] in runs:
            runs[event["executionId"]]["end"] = event["time"]
    return ([run for key, run in runs.items() if run["root"] == key and "end" in run]
            + [job for job in jobs.values() if "end" in job])


def category(run: dict) -> str:
    """What an execution is: a Delta operation by name, else the Python line that asked for it."""
    desc = run["desc"]
    if desc.startswith("job "):  # outside SQL: MLlib (ALS, LogisticRegression, GBT) and RDD work
        return "MLlib / RDD " + desc
    for name, label in (("MERGE", "Delta MERGE"), ("Compute snapshot", "Delta log snapshot"),
                        ("Filtering files", "Delta file skipping"), ("localCheckpoint", "localCheckpoint")):
        if name in desc:
            return label
    if re.match(r"(save|parquet|csv|json|saveAsTable|insertInto) at ", desc):
        return "write (and the plan it computes)"
    if desc.startswith("sql at"):  # the statement's command is the plan's first operator
        command = re.search(r"(?:Execute |\+- |^)\s*(\w+)", run["plan"].split("== Physical Plan ==")[-1].strip())
        return f"spark.sql {command.group(1) if command else '?'}"
    site = SITE.search(desc) or SITE.search(run["details"])
    return f"{desc.split(' at ')[0]} at {site.group(1)}:{site.group(2)}" if site else desc.split(" at ")[0][:50]


def stage_windows(warehouse: str) -> list[tuple[str, float, float]]:
    """(stage, start ms, end ms) of the latest run in ``pipeline_runs``, in start order."""
    from deltalake import DeltaTable

    runs = DeltaTable(f"{warehouse}/pipeline_runs").to_pandas()
    runs = runs[runs["finished_at"].notna()]
    latest = runs.sort_values("started_at").groupby("stage").tail(1).sort_values("started_at")
    return [(row.stage, row.started_at.timestamp() * 1000, row.finished_at.timestamp() * 1000)
            for row in latest.itertuples()]


def profile(executions: list[dict], windows: list[tuple[str, float, float]]) -> dict[str, dict]:
    """Per stage: window seconds, busy seconds, executions, and (seconds, count) per category."""
    result: dict[str, dict] = {}
    # A stage's bookkeeping (its final pipeline_runs MERGE) runs after its finished_at: each stage owns
    # the executions up to the next stage's start.
    for number, (stage, start, end) in enumerate(windows):
        until = windows[number + 1][1] if number + 1 < len(windows) else end + 30_000
        inside = [run for run in executions if start <= run["start"] < until]
        groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        for run in inside:
            group = groups[category(run)]
            group[0] += (run["end"] - run["start"]) / 1000
            group[1] += 1
        result[stage] = {"window_s": (end - start) / 1000, "until_next_s": (until - start) / 1000, "busy_s": sum(g[0] for g in groups.values()),
                         "executions": len(inside), "groups": dict(groups)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("event_log")
    parser.add_argument("warehouse")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    stages = profile(top_level_executions(read_events(Path(args.event_log))), stage_windows(args.warehouse))
    print("| stage | stage s (pipeline_runs) | s to the next stage | Spark busy s | top-level executions | largest parts (s, count) |")
    print("|---|---:|---:|---:|---:|---|")
    for stage, row in stages.items():
        parts = sorted(row["groups"].items(), key=lambda item: -item[1][0])[:args.top]
        text = "; ".join(f"{name} {seconds:.1f} s ({count})" for name, (seconds, count) in parts)
        print(f"| {stage} | {row['window_s']:.1f} | {row['until_next_s']:.1f} | {row['busy_s']:.1f} | {row['executions']} | {text} |")
    total = collections.defaultdict(lambda: [0.0, 0])
    for row in stages.values():
        for name, (seconds, count) in row["groups"].items():
            kind = name if not SITE.search("/" + name.split(" at ")[-1]) else "actions at lib/ and jobs/ lines"
            total[kind][0] += seconds
            total[kind][1] += count
    print("\n| kind, all stages | s | executions |\n|---|---:|---:|")
    for name, (seconds, count) in sorted(total.items(), key=lambda item: -item[1][0]):
        print(f"| {name} | {seconds:.1f} | {count} |")


if __name__ == "__main__":
    main()
