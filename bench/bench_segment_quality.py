"""Segment quality on the realistic invoice log, before and after the issue-13 defaults (not a test).

Generates the realistic sample (lib.sample.realistic) at a few thousand customers, builds the
interactions with lib.features.interactions, runs the segment_users stage once per variant of the settings,
and prints the segment_quality row of each run, with the agreement (ARI) of its segments with the
planted ones, as the markdown table docs/segments.md shows.

    .venv/bin/python bench/bench_segment_quality.py [--users 3000 --items 400 --events 300000]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers need this interpreter's numpy

# Issue 13's variants were measured with the matrix and assignment of their time; issue 21 changed both
# and added the merging of small segments.
ISSUE_13 = ["segments.value_column=score", "segments.assignment=dominant", "segments.sketch_power_iterations=0",
            "segments.min_segment_size=0"]
VARIANTS = {  # name -> --set pairs over conf/base.toml
    "before (no damping, non-product lines in)": [*ISSUE_13, "segments.popular_share_cap=1.0",
                                                  "products.exclude_item_patterns=[]"],
    "before + idf_items": [*ISSUE_13, "segments.popular_share_cap=1.0", "products.exclude_item_patterns=[]",
                           "segments.idf_items=true"],
    "non-product lines out only": [*ISSUE_13, "segments.popular_share_cap=1.0"],
    "issue 13's defaults (lines out, popular_share_cap 0.05)": ISSUE_13,
    "issue 13's defaults + idf_items": [*ISSUE_13, "segments.idf_items=true"],
    "defaults now": [],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--segments", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--variants", default="", help="comma-separated indices of VARIANTS (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from pyspark.sql import functions as F
    from sklearn.metrics import adjusted_rand_score

    from jobs import segment_users
    from jobs.common import StageContext, load_settings
    from lib.platform import catalog as C
    from lib.sample import realistic as R
    from lib.features.interactions import write_matrix_tables
    from lib.platform.session import local_session

    spark = local_session("bench-segment-quality", master="local[2]",
                          conf={"spark.sql.shuffle.partitions": "4", "spark.driver.memory": "3g"})
    spec = R.RealisticSpec(args.users, args.items, args.events, args.segments, args.seed)
    root = tempfile.mkdtemp(prefix="segq-")
    base = [f"output.root={root}", f"segments.k={args.segments}"]
    ctx = StageContext(spark, load_settings([], base), "prep")
    tables = ctx.tables
    events = R.generate_events(spark, spec)
    write_matrix_tables(spark, tables, events, ctx.settings.interactions.weights, 30.0, partitions=4)
    truth = R.planted_user_segments(spark, spec).withColumnRenamed("segment_id", "planted")

    chosen = list(VARIANTS.items())
    if args.variants:
        chosen = [chosen[int(i)] for i in args.variants.split(",")]
    print(f"realistic sample: {args.users} customers, {args.items} products, {args.events} lines, "
          f"k = {args.segments}, seed {args.seed}")
    print("| settings | largest share | size entropy | stability ARI | top-item lift min / median | "
          "distinctive-item lift min | segments merged | ARI vs planted | non-product lines in top items | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for number, (name, sets) in enumerate(chosen):
        run_id = f"v{number}"
        started = time.time()
        run_ctx = StageContext(spark, load_settings([], base + sets), run_id)
        segment_users.run(run_ctx)
        seconds = time.time() - started
        q = tables.read(spark, C.SEGMENT_QUALITY).where(F.col("run_id") == run_id).first()
        labels = tables.read(spark, C.USER_SEGMENTS).join(truth, "user_id").select("segment_id", "planted").toPandas()
        planted = adjusted_rand_score(labels["planted"], labels["segment_id"])
        non_product = sum(item["item_id"] in R.NON_PRODUCT_ITEMS
                          for p in tables.read(spark, C.SEGMENT_PROFILES).collect() for item in p["top_items"])
        print(f"| {name} | {q['largest_share']:.1%} | {q['size_entropy']:.3f} | {q['stability_ari']:.3f} | "
              f"{q['min_top_lift']:.2f} / {q['median_top_lift']:.2f} | {q['min_distinct_lift']:.2f} | "
              f"{q['empty_segments']} | {planted:.3f} | {non_product} | {seconds:.0f} |",
              flush=True)
        labels_text = " · ".join(f"{p['segment_id']}: {p['label']} ({p['share']:.0%})"
                                 for p in tables.read(spark, C.SEGMENT_PROFILES).orderBy("segment_id").collect())
        print(f"<!-- {name}: {labels_text} -->", flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
