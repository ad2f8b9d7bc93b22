"""Top-K ranking metrics with binary relevance, computed as DataFrame joins and aggregations.

Inputs are long tables, never per-user lists on the driver:
- ``recommended``: (user, item, rank) with rank 1, 2, ... per user (rank 1 is the best);
- ``relevant``: (user, item), the items each evaluated user actually engaged with.

The evaluated users are the distinct users of ``relevant``; a user with no recommendations scores 0.
Definitions match ``pyspark.ml.evaluation.RankingEvaluator`` (``RankingMetrics``) when each
user's ranking has no duplicate items, with ``hits@K`` the relevant items among the top K and
``R`` the user's number of relevant items:

- precision@K = hits@K / K (K even when fewer than K items were recommended);
- recall@K = hits@K / R;
- MAP@K: mean over users of (sum over hit positions i <= K of hits@i / i) / min(R, K);
- NDCG@K = DCG / IDCG with DCG = sum over hit positions i <= K of 1 / log2(i + 1) and
  IDCG = sum over i = 1..min(R, K) of 1 / log2(i + 1) (the log base cancels);
- coverage@K (not in RankingEvaluator) = distinct items in anyone's top K / catalog size.
"""
from __future__ import annotations

import math

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

RANKING_METRICS = ("precision", "recall", "map", "ndcg")


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"ranking metrics need K >= 1, got {k}")


def _check_columns(df: DataFrame, columns: tuple[str, ...], name: str) -> None:
    missing = [column for column in columns if column not in df.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {', '.join(missing)}; has {', '.join(df.columns)}")


def ideal_dcg_prefix(k: int) -> list[float]:
    """IDCG for 1..K relevant items: the running sums of 1 / log2(i + 1)."""
    _check_k(k)
    sums, total = [], 0.0
    for position in range(1, k + 1):
        total += 1.0 / math.log2(position + 1)
        sums.append(total)
    return sums


def per_user_ranking_metrics(
    recommended: DataFrame,
    relevant: DataFrame,
    k: int,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rank_col: str = "rank",
) -> DataFrame:
    """One row per evaluated user: (user, n_relevant, hits, precision, recall, map, ndcg) at K."""
    _check_k(k)
    _check_columns(recommended, (user_col, item_col, rank_col), "recommended")
    _check_columns(relevant, (user_col, item_col), "relevant")
    truth = relevant.select(user_col, item_col).distinct()
    n_relevant = truth.groupBy(user_col).agg(F.count(F.lit(1)).alias("n_relevant"))

    top_k = recommended.where(F.col(rank_col) <= k).select(user_col, item_col, rank_col)
    # hits@i at each hit position i: a running count of hits in rank order per user.
    hits = top_k.join(truth, [user_col, item_col]).withColumn(
        "hits_so_far",
        F.row_number().over(Window.partitionBy(user_col).orderBy(rank_col)),
    )
    per_user_hits = hits.groupBy(user_col).agg(
        F.count(F.lit(1)).alias("hits"),
        F.sum(F.col("hits_so_far") / F.col(rank_col)).alias("precision_sum"),
        F.sum(1.0 / F.log2(F.col(rank_col) + 1.0)).alias("dcg"),
    )
    idcg = F.element_at(
        F.array(*[F.lit(value) for value in ideal_dcg_prefix(k)]),
        F.least(F.col("n_relevant"), F.lit(k)).cast("int"),
    )
    joined = n_relevant.join(per_user_hits, user_col, "left").fillna(0.0, ["precision_sum", "dcg"]).fillna(0, ["hits"])
    return joined.select(
        user_col,
        "n_relevant",
        "hits",
        (F.col("hits") / F.lit(float(k))).alias("precision"),
        (F.col("hits") / F.col("n_relevant")).alias("recall"),
        (F.col("precision_sum") / F.least(F.col("n_relevant"), F.lit(k))).alias("map"),
        (F.col("dcg") / idcg).alias("ndcg"),
    )


def _summary_columns() -> list:
    """The aggregation of ``per_user_ranking_metrics`` into ``users``, each metric's mean and its sample sd."""
    return [F.count(F.lit(1)).alias("users"),
            *[F.avg(name).alias(name) for name in RANKING_METRICS],
            *[F.stddev_samp(name).alias(f"{name}_sd") for name in RANKING_METRICS]]


def _summary_values(row) -> dict[str, float]:
    users = row["users"]
    if not users:
        raise ValueError("no evaluated users: the relevant table is empty")
    values = {"users": float(users), **{name: float(row[name]) for name in RANKING_METRICS}}
    values.update({f"{name}_se": float(row[f"{name}_sd"] or 0.0) / math.sqrt(users) for name in RANKING_METRICS})
    return values


def ranking_metrics(
    recommended: DataFrame,
    relevant: DataFrame,
    k: int,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rank_col: str = "rank",
) -> dict[str, float]:
    """Means over evaluated users of precision, recall, MAP and NDCG at K, plus ``users`` evaluated and
    each metric's sampling error ``<metric>_se``: the standard error of the mean over users (sample
    standard deviation / sqrt(users); 0 for a single user)."""
    per_user = per_user_ranking_metrics(recommended, relevant, k, user_col, item_col, rank_col)
    return _summary_values(per_user.agg(*_summary_columns()).first())


def group_ranking_metrics(
    recommended: DataFrame,
    relevant: DataFrame,
    groups: DataFrame,
    k: int,
    group_col: str = "customer_group",
    user_col: str = "user_id",
    item_col: str = "item_id",
    rank_col: str = "rank",
) -> dict[str, dict[str, float]]:
    """``ranking_metrics`` per group of ``groups`` (user, group): group -> {users, ndcg, ndcg_se, precision,
    recall}. Evaluated users missing from ``groups`` are left out; a group without users is absent."""
    per_user = per_user_ranking_metrics(recommended, relevant, k, user_col, item_col, rank_col)
    rows = per_user.join(groups.select(user_col, group_col), user_col).groupBy(group_col).agg(
        F.count(F.lit(1)).alias("users"), F.avg("ndcg").alias("ndcg"), F.stddev_samp("ndcg").alias("_sd"),
        F.avg("precision").alias("precision"), F.avg("recall").alias("recall")).collect()
    return {row[group_col]: {"users": float(row["users"]), "ndcg": float(row["ndcg"]),
                             "ndcg_se": float(row["_sd"] or 0.0) / math.sqrt(row["users"]),
                             "precision": float(row["precision"]), "recall": float(row["recall"])}
            for row in rows}


# One row per segment of ``segment_usefulness``, in this order (the segment_usefulness table adds run_id, k).
SEGMENT_USEFULNESS_COLUMNS = ("segment_id", "users", "ndcg_segment", "ndcg_global", "ndcg_diff", "ndcg_diff_se",
                              "hit_segment", "hit_global")


def segment_usefulness(
    segment_lists: DataFrame,
    global_lists: DataFrame,
    truth: DataFrame,
    segments: DataFrame,
    k: int,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rank_col: str = "rank",
) -> DataFrame:
    """Per segment, how much better the segment's own list predicts its customers' held-out purchases than
    the global list: one row per segment of ``segments`` (user, segment_id; one row per user) with evaluated
    customers, columns ``SEGMENT_USEFULNESS_COLUMNS``, ordered by segment_id.

    The evaluated customers are those of ``truth`` (user, item) with a segment; a customer of ``truth``
    missing from a list scores NDCG 0 and no hit on it (as in ``per_user_ranking_metrics``); customers
    without a segment are left out. The comparison is paired (same customer, two lists): ndcg_diff is the
    mean over the segment's customers of NDCG@K(segment list) - NDCG@K(global list) and ndcg_diff_se that
    difference's sample standard deviation / sqrt(users) (null for a segment of one customer). hit_*: the
    share of customers with at least one held-out purchase in the list's top K.
    """
    def per_user(lists: DataFrame, name: str) -> DataFrame:
        metrics = per_user_ranking_metrics(lists, truth, k, user_col, item_col, rank_col)
        return metrics.select(user_col, F.col("ndcg").alias(f"ndcg_{name}"),
                              (F.col("hits") > 0).cast("double").alias(f"hit_{name}"))

    _check_columns(segments, (user_col, "segment_id"), "segments")
    # Both per-user tables hold exactly the users of truth, so the inner join keeps every evaluated customer.
    paired = per_user(segment_lists, "segment").join(per_user(global_lists, "global"), user_col) \
        .join(segments.select(user_col, "segment_id"), user_col)
    diff = F.col("ndcg_segment") - F.col("ndcg_global")
    return paired.groupBy("segment_id").agg(
        F.count(F.lit(1)).alias("users"),
        F.avg("ndcg_segment").alias("ndcg_segment"),
        F.avg("ndcg_global").alias("ndcg_global"),
        F.avg(diff).alias("ndcg_diff"),
        (F.stddev_samp(diff) / F.sqrt(F.count(F.lit(1)))).alias("ndcg_diff_se"),
        F.avg("hit_segment").alias("hit_segment"),
        F.avg("hit_global").alias("hit_global"),
    ).select(*SEGMENT_USEFULNESS_COLUMNS).orderBy("segment_id")


def segments_beating_global(rows: list[dict], z: float = 2.0) -> tuple[int, int, float]:
    """Of ``segment_usefulness`` rows: how many segments' own list beats the global one by more than ``z``
    standard errors of NDCG, of how many, and the share of the rows' customers in those segments (a
    segment of one customer has no standard error and never counts)."""
    beating = [row for row in rows if row["ndcg_diff_se"] is not None and row["ndcg_diff"] > z * row["ndcg_diff_se"]]
    customers = sum(row["users"] for row in rows)
    share = sum(row["users"] for row in beating) / customers if customers else 0.0
    return len(beating), len(rows), share


def segment_usefulness_summary(rows: list[dict], k: int) -> str:
    """One line: the share of evaluated customers in segments whose own list beats the global one by > 2 SE."""
    beating, segments, share = segments_beating_global(rows)
    customers = sum(row["users"] for row in rows)
    return (f"segment_popular beats popular_all by more than 2 SE of NDCG@{k} in {beating} of {segments} "
            f"training-side segments, holding {share:.1%} of the {customers} evaluated customers with a segment")


def evaluate(
    recommended: DataFrame,
    relevant: DataFrame,
    k: int,
    catalog_size: int,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rank_col: str = "rank",
) -> dict[str, float]:
    """All metrics at K: precision, recall, map, ndcg (with their standard errors), coverage and the
    number of users evaluated, in one Spark action (``recommended`` is often an unmaterialised list)."""
    if catalog_size < 1:
        raise ValueError(f"catalog size must be >= 1, got {catalog_size}")
    per_user = per_user_ranking_metrics(recommended, relevant, k, user_col, item_col, rank_col)
    listed = recommended.where(F.col(rank_col) <= k).agg(F.countDistinct(item_col).alias("_listed_items"))
    row = per_user.agg(*_summary_columns()).crossJoin(listed).first()
    return {**_summary_values(row), "coverage": row["_listed_items"] / catalog_size}


def ranking_evaluator_input(
    recommended: DataFrame,
    relevant: DataFrame,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rank_col: str = "rank",
) -> DataFrame:
    """(user, prediction, label) rows as ``RankingEvaluator`` reads them: arrays of doubles.

    Item ids must be numeric (e.g. item_idx). Users without recommendations get an empty prediction.
    """
    predictions = recommended.groupBy(user_col).agg(
        F.transform(
            F.array_sort(F.collect_list(F.struct(F.col(rank_col).alias("r"), F.col(item_col).alias("i")))),
            lambda entry: entry["i"].cast("double"),
        ).alias("prediction")
    )
    labels = relevant.groupBy(user_col).agg(
        F.collect_set(F.col(item_col).cast("double")).alias("label")
    )
    return labels.join(predictions, user_col, "left").select(
        user_col,
        F.coalesce(F.col("prediction"), F.array().cast("array<double>")).alias("prediction"),
        "label",
    )


# The strategy comparisons of the offline evaluation (lib.recommend.evaluation.evaluate_strategies): each list
# beside the trivial baselines it must beat, measured on the same ground truth.
STRATEGY_COMPARISONS = (
    ("buy_again", "all next purchases", ("buy_again", "shipped_buy_again", "buy_again_heuristic", "most_bought",
                                         "most_recent")),
    ("blended", "all next purchases", ("blended", "shipped_blended", "most_bought", "most_recent", "popular_all",
                                       "segment_popular")),
    ("discover", "next purchases of new items", ("discover", "popular_new")),
)


def write_strategy_report(directory, run_id: str, metrics: list[tuple[str, int, str, float]],
                          notes: list[str] = (), segment_rows: list[dict] = ()) -> "object | None":
    """recommendations.md and strategies.png in ``directory``: NDCG@K and recall@K of each strategy beside
    its baselines (``metrics``: (model, k, metric, value) rows), and per training-side segment how much its
    own popular items beat the global ones (``segment_rows``: ``segment_usefulness`` rows with their k).
    Returns the markdown path, or None when the metrics hold no strategy rows."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")  # batch jobs have no display
    import matplotlib.pyplot as plt

    values = {(model, k, metric): value for model, k, metric, value in metrics}
    ks = sorted({k for _, k, _, _ in metrics})
    if not ks or not any((models[0], ks[0], "ndcg") in values for _, _, models in STRATEGY_COMPARISONS):
        return None
    k = ks[0] if 10 not in ks else 10
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    panels = [(name, truth, [m for m in models if (m, k, "ndcg") in values])
              for name, truth, models in STRATEGY_COMPARISONS if (models[0], k, "ndcg") in values]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, truth, models) in zip(axes[0], panels):
        ndcg = [values[(m, k, "ndcg")] for m in models]
        recall = [values[(m, k, "recall")] for m in models]
        positions = range(len(models))
        ax.bar([p - 0.2 for p in positions], ndcg, width=0.4, label=f"NDCG@{k}", color="#4477aa")
        ax.bar([p + 0.2 for p in positions], recall, width=0.4, label=f"recall@{k}", color="#ccbb44")
        ax.set_xticks(list(positions), models, rotation=20)
        ax.set_title(f"{name}\non {truth}", fontsize=9)
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "strategies.png", dpi=110)
    plt.close(fig)

    lines = [f"# Recommendation strategies, run {run_id}", "",
             "Each list beside the trivial baselines it must beat, on the same split "
             "(recommend.split; docs/recommendations.md). shipped_*: per customer group, the list validation chose.", "", "![strategies](strategies.png)", "",
             f"| list | ground truth | model | NDCG@{k} (SE) | recall@{k} | precision@{k} | users |",
             "|---|---|---|---|---|---|---|"]
    for name, truth, models in panels:
        for model in models:
            lines.append(f"| {name} | {truth} | {model} | {values[(model, k, 'ndcg')]:.4f} "
                         f"({values.get((model, k, 'ndcg_se'), 0.0):.4f}) | "
                         f"{values[(model, k, 'recall')]:.4f} | {values[(model, k, 'precision')]:.4f} | "
                         f"{values[(model, k, 'users')]:.0f} |")
    if segment_rows:
        segment_k = segment_rows[0]["k"]
        lines += ["", "## Do the segments predict next purchases?", "",
                  segment_usefulness_summary(segment_rows, segment_k) + " (segments refitted on the training "
                  "side: their ids are not the shipped segments' ids).", "",
                  f"| segment | users | NDCG@{segment_k} segment_popular | NDCG@{segment_k} popular_all | "
                  f"difference (SE) | hit@{segment_k} segment_popular | hit@{segment_k} popular_all |",
                  "|---|---|---|---|---|---|---|"]
        for row in segment_rows:
            se = "-" if row["ndcg_diff_se"] is None else f"{row['ndcg_diff_se']:.4f}"
            lines.append(f"| {row['segment_id']} | {row['users']} | {row['ndcg_segment']:.4f} | "
                         f"{row['ndcg_global']:.4f} | {row['ndcg_diff']:+.4f} ({se}) | {row['hit_segment']:.3f} | "
                         f"{row['hit_global']:.3f} |")
    lines += ["", *[f"- {note}" for note in notes]]
    path = out / "recommendations.md"
    path.write_text("\n".join(lines) + "\n")
    return path
