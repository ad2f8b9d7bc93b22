"""The table catalog: every Delta table the suite writes, its name, schema and partitioning, in one place.

Writers go through ``lib.platform.storage.Tables`` with one of these specs, which conforms the DataFrame to
the declared schema (columns in order, declared types; a missing column fails naming the table),
so a table's shape is defined here and nowhere else. Readers and tests use the same specs.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

_PRIMITIVES = {
    "string": T.StringType(), "int": T.IntegerType(), "bigint": T.LongType(), "long": T.LongType(),
    "double": T.DoubleType(), "float": T.FloatType(), "boolean": T.BooleanType(),
    "timestamp": T.TimestampType(), "date": T.DateType(), "binary": T.BinaryType(),
}


def _split_top(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside angle brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def parse_type(text: str) -> T.DataType:
    """A Spark SQL type from its DDL text (primitives, array<>, map<>, struct<name: type, ...>),
    without a session: the catalog is read by Spark-free code and tests."""
    text = text.strip()
    lowered = text.lower()
    if lowered in _PRIMITIVES:
        return _PRIMITIVES[lowered]
    if lowered.startswith("array<") and text.endswith(">"):
        return T.ArrayType(parse_type(text[6:-1]))
    if lowered.startswith("map<") and text.endswith(">"):
        key, value = _split_top(text[4:-1], ",")
        return T.MapType(parse_type(key), parse_type(value))
    if lowered.startswith("struct<") and text.endswith(">"):
        return T.StructType([_parse_field(part.replace(":", " ", 1)) for part in _split_top(text[7:-1], ",")])
    raise ValueError(f"unsupported column type {text!r}")


def _parse_field(text: str) -> T.StructField:
    name, type_text = text.strip().split(None, 1)
    return T.StructField(name, parse_type(type_text))


def parse_ddl(ddl: str) -> T.StructType:
    """``name type, name type, ...`` as a StructType."""
    return T.StructType([_parse_field(part) for part in _split_top(ddl, ",")])


# Column names that hold customer ids or raw input rows (see TableSpec.personal, lib.platform.privacy).
# detail and message may quote an input value, such as the id of a customer whose row was refused.
PERSONAL_COLUMNS = ("user_id", "raw", "raw_line", "detail", "external_id", "message")


@dataclass(frozen=True)
class TableSpec:
    """One table: its name, its columns as a Spark DDL string, partition columns, what it holds."""

    name: str
    ddl: str
    description: str
    partition_by: tuple[str, ...] = ()

    @property
    def personal(self) -> tuple[str, ...]:
        """Columns that may hold a customer id: no Delta statistics are kept on them (erasable)."""
        return tuple(name for name in self.columns if name in PERSONAL_COLUMNS)

    @property
    def schema(self) -> T.StructType:
        return parse_ddl(self.ddl)

    @property
    def columns(self) -> list[str]:
        return self.schema.fieldNames()

    def conform(self, df: DataFrame) -> DataFrame:
        """``df`` with exactly this table's columns, in order, cast to the declared types.

        The casts name the types by their DDL text, never by DataType object: over Spark Connect a
        ``StringType()`` object travels with its collation spelled out, the server keeps it as an
        explicit ``UTF8_BINARY`` collation and Delta then records ``string collate UTF8_BINARY``,
        which the Delta protocol's plain readers (delta-rs, so Polars, DuckDB and the API) refuse.
        Parsed on the server, ``string`` is the plain default type, whatever the column's type was.
        """
        missing = [name for name in self.columns if name not in df.columns]
        if missing:
            raise ValueError(f"rows for table {self.name} lack column(s) {', '.join(missing)}; "
                             f"they have {', '.join(df.columns)}")
        return df.select(*[F.col(f.name).cast(f.dataType.simpleString()).alias(f.name) for f in self.schema.fields])

    def empty(self, spark) -> DataFrame:
        return self.conform(spark.createDataFrame([], self.schema))


EVENTS = TableSpec(
    "events",
    "event_id string, user_id string, item_id string, event_type string, event_ts timestamp, quantity double, "
    "revenue double, campaign_id string, channel string, event_date date, ingest_run_id string",
    "the clickstream, normalized to the input contract; one row per event_id",
    partition_by=("event_date",),
)
EVENTS_QUARANTINE = TableSpec(
    "events_quarantine",
    "raw string, raw_hash string, reason string, ingest_run_id string, detail string, raw_line string, "
    "source_file string",
    "input rows that failed a check: the raw row as JSON, why (reason, detail), the input line of a text "
    "file, the file, and the ingest run",
)
USER_INDEX = TableSpec("user_index", "user_id string, user_idx int",
                       "dense integer index of users, stable across runs")
ITEM_INDEX = TableSpec("item_index", "item_id string, item_idx int",
                       "dense integer index of items, stable across runs")
INTERACTIONS = TableSpec(
    "interactions",
    "user_idx int, item_idx int, score double, n_events long, n_weighted_events long, last_ts timestamp",
    "weighted, time-decayed user-item scores (the sparse matrix) and the pair's event counts",
)
NMF_USER_FACTORS = TableSpec(
    "nmf_user_factors",
    "user_idx int, user_id string, factors array<double>, row_scale double, score_transform string, run_id string",
    "NMF user factors W with the row scaling of the factorized matrix",
)
NMF_ITEM_FACTORS = TableSpec(
    "nmf_item_factors",
    "item_idx int, item_id string, factors array<double>, item_weight double, score_transform string, run_id string",
    "NMF item factors H' with the item weighting of the factorized matrix",
)
USER_SEGMENTS = TableSpec("user_segments", "user_id string, segment_id int, affinity double, run_id string",
                          "each user's segment (segments.assignment) and its share of the user's weight")
SEGMENT_PROFILES = TableSpec(
    "segment_profiles",
    "segment_id int, size long, share double, top_items array<struct<item_id: string, weight: double>>, "
    "distinctive_items array<struct<item_id: string, lift: double, support: double>>, distinct boolean, "
    "label string, run_id string",
    "one row per segment: size, share, top items, distinctive items, a label",
)
SEGMENT_QUALITY = TableSpec(
    "segment_quality",
    "run_id string, k int, users long, assigned_share double, largest_share double, size_entropy double, "
    "stability_ari double, min_top_lift double, median_top_lift double, top_lifts array<double>, "
    "excluded_items int, capped_items int, distinct_lifts array<double>, min_distinct_lift double, "
    "distinct_share double, empty_segments int",
    "per run: largest segment share, normalised size entropy, ARI between two seeds, each segment's "
    "top-item and distinctive-item lift over the global rate, share of users assigned and in distinct "
    "segments, segments left empty (appended)",
)
NMF_HISTORY = TableSpec("nmf_history", "run_id string, iteration int, rel_error double, seconds double",
                        "the NMF objective per iteration, per run (appended)")
NMF_K_SWEEP = TableSpec(
    "nmf_k_sweep",
    "run_id string, k int, rel_error double, iterations int, largest_share double, size_entropy double, "
    "stability_ari double, empty_segments int, chosen boolean",
    "final NMF error for each k of segments.sweep_ks; with segments.choose_k also its sizes, stability and "
    "whether it was chosen (appended)")
PRODUCTS = TableSpec(
    "products",
    "item_id string, name string, category string, price double, available boolean, recommendable boolean, "
    "run_id string",
    "the optional product catalog (input.items, or derived from the events' input.item_columns), one row per "
    "item_id; unavailable or unrecommendable items are in no list",
)
PRODUCTS_QUARANTINE = TableSpec(
    "products_quarantine",
    "raw string, reason string, detail string, source_file string, run_id string",
    "catalog rows with a problem (missing or duplicate item_id, bad price or flag): the raw row as JSON, why, "
    "the file",
)
RECOMMENDATIONS = TableSpec(
    "recommendations",
    "user_id string, rank int, item_id string, score double, source string, run_id string, strategy string",
    "top-N items per user and strategy (discover, buy_again, blended; source: als, segment_popular, popular, "
    "buy_again, or most_bought / most_recent / segment_popular where that baseline won the customer group's "
    "validation)",
)
ITEM_SIMILARITIES = TableSpec(
    "item_similarities",
    "run_id string, item_id string, rank int, similar_item_id string, score double, customers long, method string",
    "per item, its most similar items (method: als_cosine, the cosine of the ALS item factors; or jaccard / lift "
    "of co-occurrence in customers' histories, with customers: how many hold both), for \"customers who bought "
    "this also bought\" emails",
)
SEGMENT_OUTCOMES = TableSpec(
    "segment_outcomes",
    "run_id string, as_of date, segment_id int, customers long, eligible long, churn_probability double, "
    "purchase_probability double, expected_revenue double, historic_clv double, engagement_score double",
    "per segment and scored date: its customers, and the mean churn and purchase probability, expected "
    "revenue, historic CLV and email engagement of the eligible ones (a re-run replaces its as_of)",
)
REC_METRICS = TableSpec("rec_metrics", "run_id string, model string, k int, metric string, value double",
                        "offline ranking metrics per model on held-out events (appended)")
SEGMENT_USEFULNESS = TableSpec(
    "segment_usefulness",
    "run_id string, k int, segment_id int, users long, ndcg_segment double, ndcg_global double, ndcg_diff double, "
    "ndcg_diff_se double, hit_segment double, hit_global double",
    "per segment refitted on the evaluation's training side: NDCG@K and hit rate of its own most bought items "
    "against the most bought overall on its customers' held-out purchases, the paired difference and its "
    "standard error (appended)",
)
ALS_TUNING = TableSpec(
    "als_tuning",
    "run_id string, candidate int, rank int, reg_param double, alpha double, max_iter int, metric string, "
    "k int, value double, seconds double, chosen boolean",
    "every ALS candidate's validation metric and which one was chosen (appended)",
)
CUSTOMER_SCORES = TableSpec(
    "customer_scores",
    "user_id string, as_of date, churn_probability double, churn_band string, churn_percentile double, "
    "purchase_probability double, expected_revenue double, engagement_score double, historic_clv double, "
    "predicted_clv double, total_clv double, p_alive double, expected_orders double, avg_days_between_orders double, "
    "expected_next_order_date date, eligible boolean, reason_code string, model_version string, run_id string",
    "per user per as_of date: churn and purchase probability in the next horizon, expected revenue, customer "
    "value (historic / predicted / total CLV, p_alive, expected orders, order pace, next order date from the "
    "BG/NBD + Gamma-Gamma purchase model), email engagement; eligible = false with a reason_code instead of "
    "a score (a re-run replaces its as_of)",
    partition_by=("as_of",),
)
MODEL_METRICS = TableSpec(
    "model_metrics",
    "run_id string, as_of date, target string, model string, metric string, bin int, value double",
    "validation metrics per run, target (churn, purchase, clv, next_order) and model, with the recency, "
    "frequency, RFM and BG/NBD baselines and 10-bin reliability tables (bin set only for the reliability_* "
    "and decile_lift metrics; appended)",
)
SEND_TIMES = TableSpec(
    "send_times",
    "user_id string, hour_of_week_utc int, weekday_utc int, hour_utc int, time_zone string, "
    "hour_of_week_local int, weekday_local int, hour_local int, confidence double, n_signals long, "
    "is_fallback boolean, segment_id int, run_id string",
    "per user the best hour of week to send (0 = Monday 00:00 UTC), smoothed toward the segment and everyone",
)
HOLDOUT_ASSIGNMENTS = TableSpec(
    "holdout_assignments",
    "user_id string, campaign_id string, control_bucket int, campaign_bucket int, variant string, run_id string",
    "per user and configured campaign: treatment, holdout or global_control (hash of salt and user id)",
)
SUPPRESSED_USERS = TableSpec(
    "suppressed_users",
    "user_id string, campaign_id string, reason string, since timestamp, source string, run_id string",
    "every suppressed customer as the warehouse stores ids (pseudonyms when privacy.pseudonymize): "
    "campaign_id null for input.suppressions (every campaign, and the API), else the campaign's own list",
)
USER_IDENTITIES = TableSpec(
    "user_identities", "user_key string, user_id string, first_seen_run_id string",
    "the only map from pseudonyms back to raw customer ids (privacy.pseudonymize); access-control it",
)
DATA_QUALITY = TableSpec(
    "data_quality",
    "run_id string, stage string, gate string, value double, threshold double, passed boolean, detail string",
    "every data-quality gate measured after a stage: value, threshold, passed; and every promotion gate "
    "(promote_*: the model's measure as value, its best baseline's or the floor as threshold) (appended)",
)
DRIFT = TableSpec(
    "drift",
    "run_id string, stage string, table_name string, column_name string, statistic string, value double, "
    "threshold double, status string, previous_version long",
    "per run, stage and measured column (customer_scores after score_customers, user_segments after "
    "segment_users): its drift (statistic psi) against the table's version before the stage "
    "(previous_version), the threshold it was held to, status ok / warn / fail (appended; none on a table's "
    "first version)",
)
CAMPAIGN_AUDIENCE = TableSpec(
    "campaign_audience",
    "campaign_id string, user_id string, variant string, test_variant string, content_key string, "
    "segment_id int, segment_label string, "
    "products array<struct<item_id: string, rank: int, score: double, source: string, name: string, "
    "category: string, price: double>>, churn_band string, "
    "purchase_probability double, send_hour_utc int, historic_clv double, predicted_clv double, total_clv double, "
    "p_alive double, expected_orders double, avg_days_between_orders double, expected_next_order_date date, "
    "run_id string",
    "per enabled campaign its audience: variant (treatment / holdout / global_control by a hash of the user id), "
    "a treatment customer's A/B/n test_variant and its content_key (null without a test), "
    "the products to show (with the catalog's name, category and price; an item the catalog lacks or hides gives "
    "way to the next) and the attributes exported; suppressed customers never appear",
)
CAMPAIGN_TESTS = TableSpec(
    "campaign_tests",
    "campaign_id string, test_variant string, control boolean, recipients long, conversions long, "
    "conversion_rate double, rate_low double, rate_high double, difference double, difference_low double, "
    "difference_high double, probability_best double, revenue_per_recipient double, send_start timestamp, "
    "window_days int, run_id string",
    "per campaign with an A/B/n test and sends, per variant of its treatment: conversions in the window after the "
    "first send, the rate with its 95% Wilson interval, the difference to the control variant with a Bonferroni-"
    "corrected 95% interval, and the probability of being best",
)
CAMPAIGN_SENDS = TableSpec(
    "campaign_sends",
    "send_date date, campaign_id string, user_id string, variant string, run_id string, trigger_ts timestamp",
    "every send build_audience planned, by day: treatment rows are exported; holdout and global_control rows are "
    "the sends they stand in for, counted by the contact policy so every arm is capped alike (a re-run of a day "
    "replaces that day's rows; appended otherwise); trigger_ts: the event a triggered campaign's send answers",
)
CAPPED_CUSTOMERS = TableSpec(
    "capped_customers",
    "campaign_id string, user_id string, rule string, detail string, run_id string",
    "per run, customers a campaign's filters passed that the contact policy kept out: rule max_sends / cooldown "
    "(detail: the sends or last send that bind) or arbitration (detail: the campaign that won the customer)",
)
CAMPAIGN_RESULTS = TableSpec(
    "campaign_results",
    "campaign_id string, variant string, recipients long, sent long, conversions long, conversion_rate double, "
    "revenue double, revenue_per_recipient double, lift double, ci_low double, ci_high double, "
    "relative_lift double, relative_ci_low double, relative_ci_high double, revenue_lift double, "
    "revenue_ci_low double, revenue_ci_high double, send_start timestamp, window_days int, run_id string",
    "per campaign with sends and variant: conversions and revenue in the window after the first send; on the "
    "treatment row the lift over the holdout with 95% intervals (absolute, relative, revenue per recipient)",
)
PIPELINE_RUNS = TableSpec(
    "pipeline_runs",
    "run_id string, stage string, status string, started_at timestamp, finished_at timestamp, rows_in long, "
    "rows_out long, message string, counts map<string, bigint>",
    "one row per stage per run: status (running, success, failed, or not_promoted: its model lost to a "
    "baseline and its outputs were restored to the previous run's), timings, row counts, a message",
)
ERASURE_REQUESTS = TableSpec(
    "erasure_requests",
    "request string, run_id string, step string, target string, rows long, at timestamp",
    "what each erasure attempt did, per request (its privacy.erasure_request location, no customer id): "
    "requested, deleted / redacted rows per table, exports removed, models rewritten, tables vacuumed, "
    "verified (appended, never rolled back)",
)

ALL_TABLES: tuple[TableSpec, ...] = (
    EVENTS, EVENTS_QUARANTINE, PRODUCTS, PRODUCTS_QUARANTINE, USER_INDEX, ITEM_INDEX, INTERACTIONS, NMF_USER_FACTORS, NMF_ITEM_FACTORS,
    USER_SEGMENTS, SEGMENT_PROFILES, SEGMENT_QUALITY, NMF_HISTORY, NMF_K_SWEEP, RECOMMENDATIONS, ITEM_SIMILARITIES, REC_METRICS,
    SEGMENT_USEFULNESS, ALS_TUNING, CUSTOMER_SCORES, MODEL_METRICS, SEGMENT_OUTCOMES, SEND_TIMES, SUPPRESSED_USERS, HOLDOUT_ASSIGNMENTS, CAMPAIGN_AUDIENCE,
    CAMPAIGN_SENDS, CAPPED_CUSTOMERS, CAMPAIGN_RESULTS, CAMPAIGN_TESTS,
    PIPELINE_RUNS,
    DATA_QUALITY, DRIFT, USER_IDENTITIES, ERASURE_REQUESTS,
)
BY_NAME = {spec.name: spec for spec in ALL_TABLES}
# Written around every stage by jobs.common.run_stage rather than by a stage itself.
BOOKKEEPING: tuple[TableSpec, ...] = (PIPELINE_RUNS, DATA_QUALITY, DRIFT)
