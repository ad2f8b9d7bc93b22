"""The segment_users stage on a tiny generated clickstream with planted segments."""
from __future__ import annotations


import numpy as np
import pytest
from pyspark.sql import functions as F
from sklearn.metrics import adjusted_rand_score

from jobs import segment_users
from jobs.common import report_directory
from lib.features.interactions import write_matrix_tables
from lib.platform import catalog as C
from lib.platform.config import ConfigError
from lib.sample.planted import SampleSpec, generate_events, planted_user_segments
from lib.segments.matrix import relative_error_from_tables

pytestmark = pytest.mark.slow  # runs whole stages on generated data

SPEC = SampleSpec(users=400, items=60, events=24_000, segments=4, seed=3)


@pytest.fixture(scope="module")
def segmented(spark, tmp_path_factory):
    """Interactions built from the sample by lib.features.interactions, then the stage run over them."""
    from jobs.common import StageContext, load_settings

    root = tmp_path_factory.mktemp("segments_wh")
    sets = [f"output.root={root}", f"segments.k={SPEC.segments}", "segments.max_iter=20",
            "segments.idf_items=true", "segments.sweep_ks=2,3", "segments.choose_k=true"]
    ctx = StageContext(spark, load_settings([], sets), "run-1")
    tables = ctx.tables
    events = generate_events(spark, SPEC, partitions=1)
    write_matrix_tables(spark, tables, events, ctx.settings.interactions.weights, 30.0)
    result = segment_users.run(ctx)
    return ctx, tables, result


def test_segments_recover_planted_labels(spark, segmented):
    _, tables, result = segmented
    found = tables.read(spark, C.USER_SEGMENTS)
    assert found.count() == found.select("user_id").distinct().count() == result.rows_out
    truth = planted_user_segments(spark, SPEC).withColumnRenamed("segment_id", "planted")
    labels = found.join(truth, "user_id").select("segment_id", "planted").toPandas()
    assert len(labels) == result.rows_out
    assert adjusted_rand_score(labels["planted"], labels["segment_id"]) >= 0.9
    affinity = found.agg(F.min("affinity"), F.max("affinity")).first()
    assert 0.0 < affinity[0] <= affinity[1] <= 1.0   # the assigned segment's share: under the relative rule
                                                    # not always the largest, so it may be below 1/k


def test_objective_recomputes_from_the_tables_alone(spark, segmented):
    _, tables, _ = segmented
    history = tables.read(spark, C.NMF_HISTORY).where("run_id = 'run-1'").orderBy("iteration").toPandas()
    assert list(history["iteration"]) == list(range(1, len(history) + 1))
    interactions = tables.read(spark, C.INTERACTIONS)
    users, items = tables.read(spark, C.NMF_USER_FACTORS), tables.read(spark, C.NMF_ITEM_FACTORS)
    assert relative_error_from_tables(interactions, users, items) == pytest.approx(
        history["rel_error"].iloc[-1], rel=1e-6)

    # Independently, densely, with the formula of docs/segments.md.
    u, i = users.toPandas().set_index("user_idx"), items.toPandas().set_index("item_idx")
    assert set(u["score_transform"]) == set(i["score_transform"]) == {"log1p(n_weighted_events)"}
    w = np.zeros((u.index.max() + 1, SPEC.segments))
    h = np.zeros((i.index.max() + 1, SPEC.segments))
    for idx, factors in u["factors"].items():
        w[idx] = factors
    for idx, factors in i["factors"].items():
        h[idx] = factors
    x = np.zeros((w.shape[0], h.shape[0]))
    for row in interactions.toPandas().itertuples():
        x[row.user_idx, row.item_idx] = (u.loc[row.user_idx, "row_scale"] * i.loc[row.item_idx, "item_weight"]
                                         * np.log1p(row.n_weighted_events))
    assert np.linalg.norm(x - w @ h.T) / np.linalg.norm(x) == pytest.approx(history["rel_error"].iloc[-1], rel=1e-6)


def test_profiles_report_and_sweep(spark, segmented):
    ctx, tables, _ = segmented
    profiles = tables.read(spark, C.SEGMENT_PROFILES).orderBy("segment_id").collect()
    assert [p["segment_id"] for p in profiles] == list(range(SPEC.segments))
    assert sum(p["size"] for p in profiles) == tables.read(spark, C.USER_SEGMENTS).count()
    assert sum(p["share"] for p in profiles) == pytest.approx(1.0)
    top_n = ctx.settings.segments.top_items
    for profile in profiles:
        weights = [item["weight"] for item in profile["top_items"]]
        assert 0 < len(weights) <= top_n and weights == sorted(weights, reverse=True)
        # Planted segments are distinct: the label names the three distinctive items, highest lift first.
        distinctive = profile["distinctive_items"]
        assert profile["distinct"] and all(item["lift"] >= 1.0 for item in distinctive)
        assert profile["label"] == " / ".join(item["item_id"] for item in distinctive[:3])
        assert profile["run_id"] == "run-1"

    # choose_k: 2, 3 and 4 each fitted from two seeds; the planted four are the largest usable k.
    sweep = tables.read(spark, C.NMF_K_SWEEP).orderBy("k").collect()
    assert [row["k"] for row in sweep] == [2, 3, 4] and [row["chosen"] for row in sweep] == [False, False, True]
    assert all(0 < row["rel_error"] < 1 and 0 < row["iterations"] <= 20 for row in sweep)
    four = sweep[2]
    assert four["stability_ari"] >= 0.8 and four["empty_segments"] == 0 and four["largest_share"] <= 2 / 4
    quality = tables.read(spark, C.SEGMENT_QUALITY).first()
    assert quality["k"] == SPEC.segments and quality["stability_ari"] == four["stability_ari"]

    report = report_directory(ctx, ctx.settings.segments.report_dir, "segments")
    text = (report / "segments.md").read_text()
    for name in ("segment_sizes.png", "convergence.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for profile in profiles:
        assert profile["label"] in text
    sweep_section = text.split("## Choosing the number of segments", 1)[1].split("##", 1)[0]
    for row in sweep:
        assert f"| {row['k']} | {row['rel_error']:.4f} | {row['iterations']} | {row['largest_share']:.1%} |" \
            in sweep_section
    assert f"| {four['stability_ari']:.3f} | 0 | **chosen** |" in sweep_section


def test_bad_settings_are_named(context):
    with pytest.raises(ConfigError, match="'segments.transform' must be one of none, log1p; got 'sqrt'"):
        context("segments.transform=sqrt")
    with pytest.raises(ConfigError, match="'segments.sweep_ks' expects a list of int, got 'x'"):
        context("segments.sweep_ks=[\"x\"]")
    with pytest.raises(ConfigError, match="'segments.sweep_ks' must hold integers >= 1"):
        context("segments.sweep_ks=2,0")
    with pytest.raises(ConfigError, match=r"'segments.min_segment_size' must be in \[0, 1\) \(a fraction of the equal"):
        context("segments.min_segment_size=1")
    with pytest.raises(ConfigError, match="'segments.choose_k' needs the candidate k in segments.sweep_ks"):
        context("segments.choose_k=true")
    assert context("segments.k=100").settings.segments.min_share(100) == pytest.approx(0.001)
    with pytest.raises(ConfigError, match="'segments.min_distinct_lift' must be >= 1"):
        context("segments.min_distinct_lift=0.5")
    with pytest.raises(ConfigError, match="'products.exclude_categories' holds an invalid regular expression"):
        context("products.exclude_categories=[\"(FUEL\"]")
