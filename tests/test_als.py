"""ALS: top-N with exclusions, candidate grids, and the offline comparison with popularity."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from pyspark.sql import functions as F

from lib.recommend.als import AlsParams, Estimate, als_top_n, candidate_grid, fit_als, mllib_top_n, tune_als
from lib.recommend.evaluation import EvaluationSettings, evaluate_offline
from lib.recommend.metrics import ranking_metrics
from lib.recommend.topn import TopNBlocks, block_top_n, exclusion_tiers
from lib.sample.planted import SampleSpec, generate_events

WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0, "email_open": 0.5, "email_click": 2.0}


@pytest.mark.slow  # a whole stage or model fit: over 9 s
def test_top_n_excludes_items_and_fills_every_list(spark):
    # Two taste groups: users 0-9 use items 0-4, users 10-19 use items 5-9, each a different subset.
    rows = [(u, i, 1.0 + (u + i) % 3) for u in range(20) for i in range(10)
            if (i < 5) == (u < 10) and (u + i) % 4 != 0]
    ratings = spark.createDataFrame(rows, "user_idx int, item_idx int, score double")
    model = fit_als(ratings, AlsParams(rank=4, reg_param=0.05, alpha=5.0, max_iter=8, num_blocks=2,
                                       checkpoint_interval=-1))
    # user 0 has bought 7 of the 10 items: only 3 are left, so a long exclusion tier is exercised.
    exclude = spark.createDataFrame([(0, i) for i in range(7)] + [(12, 5)], "user_idx int, item_idx int")
    recs = als_top_n(model, spark.createDataFrame([(0,), (3,), (12,)], "user_idx int"), 3, exclude).cache()

    per_user = {row["user_idx"]: row["items"] for row in
                recs.groupBy("user_idx").agg(F.sort_array(F.collect_list(F.struct("rank", "item_idx"))).alias("items")).collect()}
    assert set(per_user) == {0, 3, 12}
    assert [entry["item_idx"] for entry in per_user[0]] and {e["item_idx"] for e in per_user[0]} == {7, 8, 9}
    assert all([e["rank"] for e in items] == [1, 2, 3] for items in per_user.values())
    assert 5 not in {e["item_idx"] for e in per_user[12]}
    # A group-B user's best unseen items come from group B: the factors learned the planted split.
    assert {e["item_idx"] for e in per_user[12]} <= set(range(5, 10))
    # The blockwise lists are MLlib's own (recommendForUserSubset per exclusion tier).
    reference = mllib_top_n(model, spark.createDataFrame([(0,), (3,), (12,)], "user_idx int"), 3, exclude)
    assert sorted(recs.select("user_idx", "item_idx", "rank").collect()) == \
        sorted(reference.select("user_idx", "item_idx", "rank").collect())
    recs.unpersist()


def test_candidate_grid_and_tiers():
    grid = candidate_grid([8, 16], [0.01, 0.1], [1.0, 10.0, 40.0], 10, 1, -1)
    assert len(grid) == 12 and len({(p.rank, p.reg_param, p.alpha) for p in grid}) == 12
    sampled = candidate_grid([8, 16], [0.01, 0.1], [1.0, 10.0, 40.0], 10, 1, -1, "random", 5)
    assert len(sampled) == 5 and set(sampled) <= set(grid)
    assert sampled == candidate_grid([8, 16], [0.01, 0.1], [1.0, 10.0, 40.0], 10, 1, -1, "random", 5)
    with pytest.raises(ValueError, match="grid' or 'random"):
        candidate_grid([8], [0.1], [1.0], 10, 1, -1, "bayes")
    with pytest.raises(ValueError, match="rank"):
        AlsParams(rank=0, reg_param=0.1, alpha=1.0)
    assert exclusion_tiers(10, 0) == [10]
    assert exclusion_tiers(10, 41) == [10, 40, 160]


@pytest.mark.slow  # a whole stage or model fit: over 9 s
def test_tuned_als_beats_popularity_on_planted_preferences(spark):
    spec = SampleSpec(users=500, items=120, events=30_000, segments=4, seed=11)
    events = generate_events(spark, spec, partitions=2).cache()
    settings = EvaluationSettings(WEIGHTS, 30.0, ["purchase"], [10], 10)
    candidates = candidate_grid([8], [0.01, 0.1], [1.0], max_iter=6, seed=3, checkpoint_interval=-1, num_blocks=2)
    seen = []
    report = evaluate_offline(events, settings, candidates, on_tuning_result=seen.append)

    assert len(seen) == len(report.tuning) == 2
    assert report.best == max(report.tuning, key=lambda result: result.value).params
    als, popular = report.value("als", 10, "ndcg"), report.value("popular", 10, "ndcg")
    assert als >= 1.5 * popular, (als, popular)
    assert report.value("als", 10, "users") == report.value("popular", 10, "users") > 100
    assert report.value("als", 10, "coverage") > report.value("popular", 10, "coverage")

    # Tuning on a sample of the users (the candidates learn from and are validated on about 150 of the
    # 500): fewer validation users, the same evaluation of the chosen model on every held-out user.
    sampled = evaluate_offline(events, EvaluationSettings(WEIGHTS, 30.0, ["purchase"], [10], 10, tune_sample_users=150),
                               candidates)
    assert all(0 < result.users < 0.5 * min(r.users for r in report.tuning) for result in sampled.tuning), \
        [(r.users, s.users) for r, s in zip(report.tuning, sampled.tuning)]
    assert sampled.value("als", 10, "users") == report.value("als", 10, "users")
    assert sampled.value("als", 10, "ndcg") >= 1.5 * sampled.value("popular", 10, "ndcg")
    events.unpersist()


def _factors(spark, key: str, rows: dict[int, list[float]]):
    return spark.createDataFrame([(idx, [float(v) for v in factors]) for idx, factors in rows.items()],
                                 f"{key} int, factors array<float>")


def test_blockwise_top_n_exact_rows_exclusions_and_ties(spark):
    items = _factors(spark, "item_idx", {0: [1, 0], 1: [1, 0], 2: [0, 1], 3: [2, 0], 4: [0, 2], 5: [1, 1], 6: [0, 0]})
    users = _factors(spark, "user_idx", {0: [1, 0], 1: [0, 1], 2: [1, 1], 3: [1, 0], 4: [1, 0]})
    exclude = spark.createDataFrame([(0, 3), (2, 4), (3, 0), (3, 1), (3, 3), (3, 5), (3, 6), (4, 0), (9, 2)],
                                    "user_idx int, item_idx int")
    wanted = spark.createDataFrame([(0,), (1,), (2,), (3,), (5,)], "user_idx int")  # 4 not asked, 5 has no factors
    expected = [
        (0, 0, 1.0, 1), (0, 1, 1.0, 2), (0, 5, 1.0, 3),   # item 3 (score 2) excluded; ties by item_idx
        (1, 4, 2.0, 1), (1, 2, 1.0, 2), (1, 5, 1.0, 3),
        (2, 3, 2.0, 1), (2, 5, 2.0, 2), (2, 0, 1.0, 3),   # item 4 (score 2) excluded
        (3, 2, 0.0, 1), (3, 4, 0.0, 2),                   # only two items left: a short list
    ]
    # One block of everything, and two users per block with item blocks of ~two items (a merge pass).
    # 4 wanted users with factors, 7 of their pairs (longest 5): 460 bytes; 512 leave 284 a block, so 2 blocks.
    for blocks in (TopNBlocks(), TopNBlocks(user_block_mb=512 / 2**20, item_block_mb=16 / 2**20, chunk_elements=3)):
        rows = block_top_n(users, items, wanted, 3, exclude, blocks).collect()
        got = sorted((r["user_idx"], r["item_idx"], r["score"], r["rank"]) for r in rows)
        assert got == sorted(expected), blocks


def test_user_blocks_are_sized_by_their_bytes():
    grocer = TopNBlocks()  # 16 MB, 8 of them the scores chunk
    # 2,442 users x rank 64 with 600,000 purchased pairs, at most 3,000 for one household:
    assert grocer.block_bytes(2442, 64, 600_000) == 2442 * (48 + 256) + 600_000 * 32 + 8 * 2**20 == 28_330_976
    # 19,942,368 bytes of users and pairs into the 8,292,304 left after the chunk and the longest list.
    assert grocer.user_blocks(2442, 64, 600_000, 3000) == 3
    small = TopNBlocks(user_block_mb=8192 / 2**20, chunk_elements=1024)   # 8 KB, 4 KB of them the chunk
    assert small.block_bytes(10, 2, 100) == 10 * 56 + 100 * 32 + 4096 == 7856
    assert small.user_blocks(10, 2, 100, 30) == 2          # 3,760 bytes into 8,192 - (56 + 960 + 4,096)
    assert small.user_blocks(10, 2, 0, 0) == 1
    assert small.user_blocks(0, 2, 0, 0) == 1
    tight = TopNBlocks(user_block_mb=5113 / 2**20, chunk_elements=1024)   # 1 byte left beside the longest list
    assert tight.user_blocks(10, 2, 100, 30) == 10         # never more blocks than users
    assert TopNBlocks(user_block_mb=5000 / 2**20, chunk_elements=1024).user_blocks(10, 2, 100, 30) == 10
    with pytest.raises(ValueError, match="user_block_mb must exceed the scores chunk"):
        TopNBlocks(user_block_mb=4096 / 2**20, chunk_elements=1024)


def test_blockwise_top_n_equals_brute_force_numpy(spark, caplog):
    rng = np.random.default_rng(5)
    n_users, n_items, rank, n = 40, 90, 4, 7
    user_f = rng.integers(-3, 4, (n_users, rank)).astype(np.float32)   # small integers: exact float32 sums, ties
    item_f = rng.integers(-3, 4, (n_items, rank)).astype(np.float32)
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, n_users, 900), rng.integers(0, n_items, 900))}
    users = _factors(spark, "user_idx", {u: user_f[u].tolist() for u in range(n_users)})
    items = _factors(spark, "item_idx", {i: item_f[i].tolist() for i in range(n_items)})
    exclude = spark.createDataFrame(sorted(pairs), "user_idx int, item_idx int")
    scores = user_f.astype(np.float64) @ item_f.astype(np.float64).T
    expected = []
    for u in range(n_users):
        ranked = sorted((-scores[u, i], i) for i in range(n_items) if (u, i) not in pairs)[:n]
        expected += [(u, i, -s, r) for r, (s, i) in enumerate(ranked, start=1)]
    longest = max(sum(1 for u, _ in pairs if u == user) for user in range(n_users))
    small = TopNBlocks(user_block_mb=7000 / 2**20, item_block_mb=rank * 4 * 25 / 2**20, chunk_elements=200)
    for blocks, user_blocks in ((TopNBlocks(), 1), (small, small.user_blocks(n_users, rank, len(pairs), longest))):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lib.recommend.topn"):
            got = sorted((r["user_idx"], r["item_idx"], r["score"], r["rank"])
                         for r in block_top_n(users, items, users.select("user_idx"), n, exclude, blocks).collect())
        assert got == sorted(expected), blocks
        # The block count comes from the exact users, pairs and longest list of the wanted users.
        assert f"{n_users} users with {len(pairs)} exclusion pairs (longest list {longest}) in {user_blocks} user block(s)" \
            in caplog.text
    assert user_blocks > 3


def test_estimates_pool_exactly():
    values = np.random.default_rng(3).random(50)
    part = lambda v: Estimate(len(v), float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))))  # noqa: E731
    pooled = part(values[:13]).combine(part(values[13:]))
    assert pooled.users == 50
    assert pooled.mean == pytest.approx(values.mean(), abs=1e-12)
    assert pooled.se == pytest.approx(values.std(ddof=1) / np.sqrt(50), abs=1e-12)
    assert pooled.lower(2.0) < pooled.mean < pooled.upper(2.0)


@pytest.mark.slow  # a whole stage or model fit: over 9 s
def test_tuning_stops_a_clearly_worse_candidate_after_its_first_stage(spark):
    # Two taste groups of 20 items; each user trains on 8 items of their group and is validated on 3 others.
    rng = np.random.default_rng(8)
    train_rows, truth_rows = [], []
    for user in range(240):
        group = np.arange(20) + (20 if user % 2 else 0)
        picked = rng.permutation(group)[:11]
        train_rows += [(user, int(item), 1.0 + float(rng.integers(0, 3))) for item in picked[:8]]
        truth_rows += [(user, int(item)) for item in picked[8:]]
    train = spark.createDataFrame(train_rows, "user_idx int, item_idx int, score double").cache()
    truth = spark.createDataFrame(truth_rows, "user_idx int, item_idx int").cache()
    exclude = train.select("user_idx", "item_idx")

    def ndcg(recommended, relevant, k):
        values = ranking_metrics(recommended, relevant, k, "user_idx", "item_idx")
        return Estimate(int(values["users"]), values["ndcg"], values["ndcg_se"])

    good = AlsParams(rank=4, reg_param=0.05, alpha=5.0, max_iter=6, num_blocks=2, checkpoint_interval=-1)
    bad = AlsParams(rank=1, reg_param=50.0, alpha=0.0, max_iter=1, num_blocks=2, checkpoint_interval=-1, seed=1)
    _, plain = tune_als(train, truth, [good, bad], 5, ndcg, exclude)
    assert not any(r.stopped_early for r in plain) and all(r.users == 240 and r.se > 0 for r in plain)
    assert plain[0].value > plain[1].value + 4 * (plain[0].se + plain[1].se)

    best, staged = tune_als(train, truth, [bad, good, bad], 5, ndcg, exclude, stop_z=2.0, seed=5)
    assert best == good
    # The first candidate and a promising one are measured on every user; pooling the two stages gives
    # exactly the all-user mean.
    assert not staged[0].stopped_early and not staged[1].stopped_early and staged[1].users == 240
    assert staged[1].value == pytest.approx(plain[0].value, abs=1e-12)
    assert staged[1].se == pytest.approx(plain[0].se, abs=1e-12)
    # The last one is clearly worse than the best on its first quarter and stops there.
    assert staged[2].stopped_early and 0 < staged[2].users < 120
    train.unpersist()
    truth.unpersist()
