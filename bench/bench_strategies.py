"""The three list strategies against their trivial baselines on generated repeat-purchase data
(lib.sample.repeat), written as docs/recommendations_strategies.md + .png (not a test).

    .venv/bin/python bench/bench_strategies.py [--users 3000] [--out docs]

Same evaluation as the recommend_items stage (lib.recommend.evaluation.evaluate_offline with strategies), one
ALS candidate, the default buy-again settings except the horizon (28 days, about the held-out window).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lib.platform.session import local_session
from lib.recommend.als import AlsParams
from lib.recommend.buy_again import BuyAgainParams
from lib.recommend.evaluation import EvaluationSettings, evaluate_offline
from lib.recommend.metrics import write_strategy_report
from lib.sample.repeat import RepeatSpec, generate_repeat_purchases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", default=str(REPO_ROOT / "docs"))
    args = parser.parse_args()
    spark = local_session("bench-strategies", master="local[2]", conf={"spark.sql.shuffle.partitions": "4"})
    spec = RepeatSpec(users=args.users, items=args.items, days=180, max_staples=12, explore_mean=10, seed=args.seed)
    events = generate_repeat_purchases(spark, spec, partitions=4).cache()
    started = time.perf_counter()
    settings = EvaluationSettings({"purchase": 8.0}, 30.0, ["purchase"], [10], 10,
                                  strategies=("discover", "buy_again", "blended"),
                                  buy_again=BuyAgainParams(horizon_days=28.0), blend_ranks=20)
    report = evaluate_offline(events, settings, [AlsParams(32, 0.1, 10.0, max_iter=10, num_blocks=4)])
    seconds = time.perf_counter() - started
    notes = [*report.notes, f"{events.count()} purchase events of {args.users} users, {args.items} items "
             f"(RepeatSpec seed {args.seed}); evaluation {seconds:.0f} s on local[2]",
             f"blend calibration: buy again {[round(v, 3) for v in report.calibration.again[:5]]}..., "
             f"discover {[round(v, 3) for v in report.calibration.discover[:5]]}..., "
             f"mean propensity {report.calibration.mean_propensity:.3f}" if report.calibration else "no calibration"]
    path = write_strategy_report(Path(args.out) / "_strategies_tmp", "bench", report.metrics, notes)
    out = Path(args.out)
    (out / "recommendations_strategies.png").write_bytes((path.parent / "strategies.png").read_bytes())
    text = path.read_text().replace("](strategies.png)", "](recommendations_strategies.png)")
    (out / "recommendations_strategies.md").write_text(text)
    for leftover in path.parent.iterdir():
        leftover.unlink()
    path.parent.rmdir()
    print(text)


if __name__ == "__main__":
    main()
