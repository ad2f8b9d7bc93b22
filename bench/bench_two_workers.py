"""Check a claim of docs/scale.md on a real standalone cluster: two workers of one core each on this machine.

    .venv/bin/python bench/bench_two_workers.py [--events 2000000]

Starts a Spark standalone master and two workers (1 core, 3 GB each), submits generate_events,
ingest and build_interactions with ``./spark-submit.sh --master spark://...`` (executors import
``lib`` from the shipped lib.zip), then runs the same three stages on ``local[2]`` for the same
events, and prints each stage's seconds from ``pipeline_runs`` side by side. The claim checked: the
event stages' throughput per core measured on local[2] carries over to executors in other JVMs
(the same seconds within noise), so the per-core figures of docs/scale.md can size a cluster.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pyspark
from bench_pipeline import sizes_for   # the same customers and items per event count as the pipeline benchmark
from run_presets import stage_rows

REPO = Path(__file__).resolve().parents[1]
SPARK_HOME = Path(pyspark.__file__).resolve().parent
OUT = REPO / "bench" / "out" / "two_workers"
STAGES = ("generate_events", "ingest", "build_interactions")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_cluster(base: Path, workers: int) -> tuple[str, list[subprocess.Popen]]:
    """A master and ``workers`` one-core workers on 127.0.0.1; returns the master URL and processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK", "SPARK"))}
    env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP="127.0.0.1", SPARK_LOG_DIR=str(base / "logs"))
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    port, ui = free_port(), free_port()
    commands = [[spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                 "--webui-port", str(ui)]]
    commands += [[spark_class, "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}", "--host",
                  "127.0.0.1", "--cores", "1", "--memory", "3g", "--webui-port", str(free_port()),
                  "--work-dir", str(base / f"work{n}")] for n in range(workers)]
    processes = []
    for n, command in enumerate(commands):
        log = (base / f"daemon{n}.log").open("w")
        processes.append(subprocess.Popen(command, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        if n == 0:
            time.sleep(3)  # the master first, so the workers find it
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=5) as response:
                if json.load(response).get("aliveworkers", 0) >= workers:
                    return f"spark://127.0.0.1:{port}", processes
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{workers} workers did not register within 120 s (logs in {base})")


def run_stages(master_args: list[str], root: Path, events: int) -> dict[str, float]:
    """Each stage as its own submitted job; seconds per successful stage from pipeline_runs (delta-rs)."""
    shape = sizes_for(events)
    sets = [f"output.root={root}", f"sample.events={events}", f"sample.users={shape['users']}",
            f"sample.items={shape['items']}", "sample.segments=10", "spark.shuffle_partitions=8"]
    for stage in STAGES:
        args = ["./spark-submit.sh", *master_args, f"jobs/{stage}.py", "--run-id", "check"]
        args += [part for value in sets for part in ("--set", value)]
        subprocess.run(args, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {row["stage"]: row["seconds"] for row in stage_rows(root, "check") if row["status"] == "success"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2_000_000)
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    url, processes = start_cluster(OUT, workers=2)
    try:
        cluster = run_stages(["--master", url, "--conf", "spark.executor.memory=2g",
                              "--conf", "spark.driver.host=127.0.0.1"], OUT / "cluster", args.events)
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=60)
    local = run_stages(["--master", "local[2]"], OUT / "local", args.events)
    print(f"load average at the start: {load}; {args.events:,} events")
    print("| stage | local[2] s | standalone, 2 workers x 1 core s | ratio |\n|---|---:|---:|---:|")
    for stage in STAGES:
        print(f"| {stage} | {local[stage]:.1f} | {cluster[stage]:.1f} | {cluster[stage] / local[stage]:.2f} |")


if __name__ == "__main__":
    main()
