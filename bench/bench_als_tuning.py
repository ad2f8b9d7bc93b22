"""Benchmark: ALS tuning and offline evaluation on every user vs on a seeded sample with early stopping
(not a test).

One generated clickstream (lib.sample.planted, planted segments), the recommend_items stage's offline
evaluation (lib.recommend.evaluation.evaluate_offline: time split, ALS candidates tuned on a validation split,
the chosen one against popularity on the held-out events) run twice on the same events:

- ``all``: every user evaluated, every candidate measured on every validation user (the previous
  behaviour: eval_sample_users = 0, tune_stop_z = 0);
- ``sample``: validation and metrics on a seeded sample of ``--sample`` users, a candidate stopped
  after its first quarter of the validation users when clearly worse (``--stop-z``).

It records seconds, each candidate's validation NDCG@10 with its standard error (and whether it was
stopped), the chosen candidate and the test metrics with their standard errors, in
docs/als_tuning_benchmark.md.

    .venv/bin/python bench/bench_als_tuning.py [--users 60000] [--sample 20000] [--out docs/als_tuning_benchmark.md]
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one BLAS thread per Spark task

from lib.platform.session import local_session
from lib.recommend.als import TuningResult, candidate_grid
from lib.recommend.evaluation import EvaluationSettings, evaluate_offline
from lib.recommend.topn import TopNBlocks
from lib.sample.planted import SampleSpec, generate_events

log = logging.getLogger("bench_als_tuning")
WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0, "email_open": 0.5, "email_click": 2.0}


def _row(report, model: str, metric: str) -> str:
    return f"{report.value(model, 10, metric):.4f} ± {report.value(model, 10, metric + '_se'):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=60_000)
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--events-per-user", type=int, default=30)
    parser.add_argument("--sample", type=int, default=20_000)
    parser.add_argument("--stop-z", type=float, default=2.0)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "als_tuning_benchmark.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    log.info("load at start: %s", load)
    spark = local_session("bench-als-tuning", "local[2]", {"spark.driver.memory": "6g",
                                                           "spark.sql.shuffle.partitions": "8"})
    spec = SampleSpec(users=args.users, items=args.items, events=args.users * args.events_per_user, segments=8,
                      seed=7)
    events = generate_events(spark, spec, partitions=8).cache()
    n_events = events.count()
    # The job's default grid, drawn at random as the job does (search = random, max_candidates).
    candidates = candidate_grid([16, 32, 64], [0.01, 0.1], [1.0, 10.0], max_iter=10, seed=42, checkpoint_interval=-1,
                                search="random", max_candidates=args.candidates, num_blocks=8)
    runs = []
    for name, sample, stop_z in (("all", 0, 0.0), ("sample", args.sample, args.stop_z)):
        settings = EvaluationSettings(WEIGHTS, 30.0, ["purchase"], [10], 10, top_n_blocks=TopNBlocks(),
                                      eval_sample_users=sample, sample_seed=42, tune_stop_z=stop_z)
        tuning: list[TuningResult] = []
        started = time.perf_counter()
        report = evaluate_offline(events, settings, candidates, on_tuning_result=tuning.append)
        seconds = time.perf_counter() - started
        log.info("%s: %.1f s, chose %s", name, seconds, report.best)
        runs.append((name, sample, stop_z, seconds, report, tuning))

    lines = [
        "# ALS tuning and evaluation: every user vs a seeded sample with early stopping",
        "",
        "Produced by `bench/bench_als_tuning.py` (one run, this 2-core machine, local[2]). Generated clickstream",
        f"(lib.sample.planted, 8 planted segments): {args.users:,} users, {args.items:,} items, {n_events:,} events.",
        "`lib.recommend.evaluation.evaluate_offline` as the recommend_items stage runs it: 20% of each user's latest events",
        "held out, ALS tuned on a validation split of the rest, the chosen candidate against popularity on",
        f"the held-out events. {len(candidates)} candidates drawn from the default grid (seed 42), 10 iterations.",
        "Metrics are means over the evaluated users ± their standard error.",
        "",
        f"Load average at the start of the run (`uptime`): {load}",
        "",
        "| run | eval_sample_users | tune_stop_z | seconds | chosen (rank, reg, alpha) | test users | ALS NDCG@10 | popular NDCG@10 | ALS recall@10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, sample, stop_z, seconds, report, _ in runs:
        best = report.best
        lines.append(f"| {name} | {sample} | {stop_z:g} | {seconds:.0f} | ({best.rank}, {best.reg_param:g}, {best.alpha:g}) "
                     f"| {int(report.value('als', 10, 'users')):,} | {_row(report, 'als', 'ndcg')} "
                     f"| {_row(report, 'popular', 'ndcg')} | {_row(report, 'als', 'recall')} |")
    lines += ["", "Validation NDCG@10 of each candidate (in the order tried):", "",
              "| run | candidate (rank, reg, alpha) | validation users | NDCG@10 ± SE | stopped early | seconds (fit + evaluation) |",
              "|---|---|---|---|---|---|"]
    for name, _, _, _, _, tuning in runs:
        for result in tuning:
            p = result.params
            lines.append(f"| {name} | ({p.rank}, {p.reg_param:g}, {p.alpha:g}) | {result.users:,} "
                         f"| {result.value:.4f} ± {result.se:.4f} | {'yes' if result.stopped_early else 'no'} "
                         f"| {result.seconds:.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    log.info("load at the end: %s", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
