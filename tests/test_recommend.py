"""Final recommendation lists: cold-start routing, exclusions, ranks; factor-score top-N."""
from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from lib.recommend.baselines import popular_top_n, segment_popular_for, segment_popular_top_n
from lib.recommend.evaluation import sample_users
from lib.recommend.lists import final_recommendations, list_counts, shipped_notes
from lib.recommend.similar import factor_similarities, item_similarities
from lib.recommend.topn import block_top_n


def _entries(spark):
    # Segment 1: users 0, 1 use items 0, 4, 6; segment 2: users 2, 3, 6, 7 use items 1, 2, 5, 7.
    # Cold users: 4 (segment 1) used item 0 only; 5 (no segment) used item 1 only.
    rows = ([(u, i, 1.0) for u in (0, 1) for i in (0, 4, 6)] + [(u, i, 1.0) for u in (2, 3, 6, 7) for i in (1, 2, 5, 7)]
            + [(4, 0, 1.0), (5, 1, 1.0)])
    return spark.createDataFrame(rows, "user_idx int, item_idx int, score double")


def test_cold_start_routing_exclusions_and_ranks(spark):
    entries = _entries(spark)
    user_index = spark.createDataFrame([(f"u{u}", u) for u in range(8)], "user_id string, user_idx int")
    item_index = spark.createDataFrame([(f"i{i}", i) for i in range(8)], "item_id string, item_idx int")
    excluded = spark.createDataFrame([(0, 1), (4, 0)], "user_idx int, item_idx int")
    # Two runs of user_segments: the latest (r2) wins, and within it the highest affinity.
    segments = spark.createDataFrame(
        [("u0", 1, 0.9, "r2"), ("u1", 1, 0.8, "r2"), ("u4", 1, 0.7, "r2"), ("u4", 2, 0.1, "r2"),
         ("u2", 2, 0.9, "r2"), ("u3", 2, 0.9, "r2"), ("u6", 2, 0.9, "r2"), ("u7", 2, 0.9, "r2"),
         ("u4", 2, 0.9, "r1")],
        "user_id string, segment_id int, affinity double, run_id string")

    def model_top_n(users, n, exclude):
        return popular_top_n(users, entries, n, exclude)

    recs = final_recommendations(model_top_n, entries, user_index, item_index, excluded, n=2,
                                 min_history=2, segments=segments).cache()
    sources = {row["user_id"]: row["source"] for row in recs.select("user_id", "source").distinct().collect()}
    assert sources == {**{f"u{u}": "als" for u in (0, 1, 2, 3, 6, 7)}, "u4": "segment_popular", "u5": "popular"}
    lists = {row["user_id"]: [e["item_id"] for e in row["items"]] for row in recs.groupBy("user_id").agg(
        F.sort_array(F.collect_list(F.struct("rank", "item_id"))).alias("items")).collect()}
    assert lists["u4"] == ["i4", "i6"]   # segment 1's items; i0 was bought; global favourites not used
    assert lists["u5"] == ["i1", "i2"]   # global popularity (i1 in 5 histories, then ties by id)
    assert lists["u0"] == ["i2", "i5"]   # u0 bought i1, the global favourite
    ranks = recs.groupBy("user_id").agg(F.sort_array(F.collect_list("rank")).alias("ranks")).collect()
    assert all(row["ranks"] == [1, 2] for row in ranks)
    recs.unpersist()

    without_segments = final_recommendations(model_top_n, entries, user_index, item_index, excluded, n=2,
                                             min_history=2)
    assert {row["source"] for row in without_segments.where("user_id IN ('u4', 'u5')").collect()} == {"popular"}


def test_segment_popularity_counts_all_members(spark):
    entries = _entries(spark)
    members = spark.createDataFrame([(0, 1), (1, 1), (4, 1)], "user_idx int, segment_id int")
    only_cold = spark.createDataFrame([(4, 1)], "user_idx int, segment_id int")
    recs = segment_popular_top_n(only_cold, entries, 2, members=members).orderBy("rank").collect()
    # Among members 0, 1, 4: item 0 has 3 users, items 4 and 6 have 2 (ties by item id).
    assert [row["item_idx"] for row in recs] == [0, 4]


def test_segment_popular_baseline_lists_what_each_segment_bought(spark):
    # Segment 1 (a, b) bought apples and pears, segment 2 (c, d) milk; e has no segment; segment 3 (f)
    # bought nothing.
    occasions = spark.createDataFrame(
        [("a", "apple"), ("b", "apple"), ("b", "pear"), ("c", "milk"), ("d", "milk"), ("d", "bread"), ("c", "fee")],
        "user_id string, item_id string")
    members = spark.createDataFrame([("a", 1), ("b", 1), ("c", 2), ("d", 2), ("f", 3)], "user_id string, segment_id int")
    users = spark.createDataFrame([("a",), ("c",), ("e",), ("f",)], "user_id string")
    fee = spark.createDataFrame([("fee",)], "item_id string")
    rows = segment_popular_for(users, members, occasions, 2, exclude_items=fee).collect()
    lists = {u: [r["item_id"] for r in sorted((r for r in rows if r["user_id"] == u), key=lambda r: r["rank"])]
             for u in ("a", "c", "e", "f")}
    # Within a segment by distinct buyers (ties by id); e and f get the most bought items overall.
    assert lists == {"a": ["apple", "pear"], "c": ["milk", "bread"], "e": ["apple", "milk"], "f": ["apple", "milk"]}


def test_nmf_factors_rank_by_their_dot_product(spark):
    users = spark.createDataFrame([([1.0, 0.0], 0), ([0.0, 2.0], 1)], "factors array<double>, user_idx int")
    items = spark.createDataFrame([(0, [3.0, 1.0]), (1, [1.0, 5.0]), (2, [2.0, 2.0])], "item_idx int, factors array<double>")
    exclude = spark.createDataFrame([(1, 1)], "user_idx int, item_idx int")
    recs = block_top_n(users, items, users.select("user_idx"), 2, exclude).orderBy("user_idx", "rank").collect()
    assert [(row["user_idx"], row["item_idx"], row["score"]) for row in recs] == [
        (0, 0, 3.0), (0, 2, 2.0), (1, 2, 4.0), (1, 0, 2.0)]


def test_evaluation_sample_is_seeded_sized_and_nested(spark):
    rows = spark.createDataFrame([(f"u{u}", i) for u in range(2000) for i in range(2)], "user_id string, item int")
    users = lambda df: {r["user_id"] for r in df.select("user_id").distinct().collect()}  # noqa: E731
    assert sample_users(rows, 0, 1) is rows and sample_users(rows, 5000, 1) is rows   # 0 or too few: everyone
    small, large = users(sample_users(rows, 300, 1)), users(sample_users(rows, 900, 1))
    assert 200 < len(small) < 400 and 750 < len(large) < 1050
    assert small <= large                                      # one hash per user: samples nest
    assert users(sample_users(rows, 300, 1)) == small          # and repeat
    assert users(sample_users(rows, 300, 2)) != small          # another seed, another sample
    # A sampled user keeps every row.
    assert sample_users(rows, 300, 1).count() == 2 * len(small)


def test_list_counts_say_which_list_each_customer_got_in_one_aggregation(spark):
    rows = [("a", "discover", "als", 1), ("a", "discover", "als", 2), ("b", "discover", "popular", 1),
            ("a", "blended", "segment_popular", 1), ("b", "blended", "als", 1), ("b", "blended", "als", 2)]
    lists = spark.createDataFrame(rows, "user_id string, strategy string, source string, rank int")
    counts, total = list_counts(lists, ("discover", "buy_again", "blended"))
    assert total == 6
    assert counts == {"users_als": 1, "users_segment_popular": 0, "users_popular": 1, "rows_discover": 3,
                      "rows_buy_again": 0, "rows_blended": 3, "users_blended_segment_popular": 1,
                      "users_blended_als": 1}


def test_shipped_notes_name_only_the_groups_a_baseline_won():
    shipped = {"buy_again": {"repeat": "buy_again", "one_order": "most_bought"},
               "blended": {"repeat": "blended"}}
    assert shipped_notes(shipped) == ["buy_again: a baseline won validation, so it ships as the list of "
                                      "one_order customers (most_bought)"]


def test_similar_items_on_hand_made_baskets(spark):
    # u1 {a, b, c}, u2 {a, b}, u3 {a, c}, u4 {b, d}: a is held by 3, b by 3, c by 2, d by 1 of 4 customers;
    # together: ab 2, ac 2, bc 1, bd 1.
    a, b, c, d = 0, 1, 2, 3
    baskets = {1: (a, b, c), 2: (a, b), 3: (a, c), 4: (b, d)}
    history = spark.createDataFrame([(user, item, 1.0) for user, items in baskets.items() for item in items]
                                    + [(5, d, 0.0)],  # a zero score is no history
                                    "user_idx int, item_idx int, score double")
    jaccard = {(r["item_idx"], r["similar_item_idx"]): (r["score"], r["customers"], r["rank"])
               for r in item_similarities(history, top_k=2, min_customers=1).collect()}
    assert jaccard == {(a, c): (pytest.approx(2 / 3), 2, 1), (a, b): (pytest.approx(2 / 4), 2, 2),
                       (b, a): (pytest.approx(2 / 4), 2, 1), (b, d): (pytest.approx(1 / 3), 1, 2),
                       (c, a): (pytest.approx(2 / 3), 2, 1), (c, b): (pytest.approx(1 / 4), 1, 2),
                       (d, b): (pytest.approx(1 / 3), 1, 1)}
    lift = {(r["item_idx"], r["similar_item_idx"]): r["score"]
            for r in item_similarities(history, top_k=5, similarity="lift", min_customers=2).collect()}
    assert lift == {(a, b): pytest.approx(2 * 4 / 9), (b, a): pytest.approx(2 * 4 / 9),
                    (a, c): pytest.approx(2 * 4 / 6), (c, a): pytest.approx(2 * 4 / 6)}
    # A customer counts with their max_items highest-scored items only: u1's weakest item (c) drops out.
    weighted = history.withColumn("score", F.when((F.col("user_idx") == 1) & (F.col("item_idx") == c), 0.5)
                                  .otherwise(F.col("score")))
    capped = {(r["item_idx"], r["similar_item_idx"]): (r["customers"], r["score"])
              for r in item_similarities(weighted, top_k=5, min_customers=1, max_items=2).collect()}
    # c is then held by u3 alone, in the item counts as in the pairs: Jaccard(a, c) = 1 / (3 + 1 - 1).
    assert capped[(a, c)] == (1, pytest.approx(1 / 3)) and (b, c) not in capped and capped[(a, b)][0] == 2
    # Ties in score and co-occurrence go to the smaller item index.
    twins = spark.createDataFrame([(user, item, 1.0) for user in (1, 2) for item in (a, b, c)],
                                  "user_idx int, item_idx int, score double")
    assert [(r["similar_item_idx"], r["rank"]) for r in item_similarities(twins, top_k=2).where(
        f"item_idx = {a}").orderBy("rank").collect()] == [(b, 1), (c, 2)]
    with pytest.raises(ValueError, match="similarity must be one of jaccard, lift"):
        item_similarities(history, 2, similarity="cosine")


def test_similar_items_by_the_cosine_of_item_factors(spark):
    # 0 and 1 point the same way, 2 halfway to 3; 4 has no direction and is in no list.
    factors = spark.createDataFrame([(0, [1.0, 0.0]), (1, [2.0, 0.0]), (2, [1.0, 1.0]), (3, [0.0, 3.0]),
                                     (4, [0.0, 0.0])], "item_idx int, factors array<float>")
    rows = {(r["item_idx"], r["rank"]): (r["similar_item_idx"], r["score"], r["customers"])
            for r in factor_similarities(factors, top_k=2).collect()}
    half = pytest.approx(0.5 ** 0.5, abs=1e-6)
    assert rows == {(0, 1): (1, pytest.approx(1.0, abs=1e-6), None), (0, 2): (2, half, None),
                    (1, 1): (0, pytest.approx(1.0, abs=1e-6), None), (1, 2): (2, half, None),
                    (2, 1): (0, half, None), (2, 2): (1, half, None),  # a three-way tie: the smaller indexes
                    (3, 1): (2, half, None), (3, 2): (0, pytest.approx(0.0, abs=1e-6), None)}
