"""One self-contained HTML page per pipeline run: its stages and timings, data quality and drift,
segments, lists beside their baselines, scores, send times, audiences and lift, with plots.

Every section reads one of the run's tables and brings back only small rows (one per stage, gate,
segment, model, hour or campaign variant); the PNGs the stages' reports wrote during the run are
embedded as data URIs, so the page opens offline from a single file.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # batch jobs have no display
import matplotlib.pyplot as plt  # noqa: E402
from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from lib.platform import catalog as C  # noqa: E402
from lib.platform.storage import Tables  # noqa: E402

MAX_ROWS = 60   # per section: the page is read by people, the tables hold the rest
LIST_METRICS = ("ndcg", "ndcg_se", "recall", "precision", "coverage", "users")
SCORE_METRICS = ("roc_auc", "pr_auc", "brier", "top_decile_lift", "base_rate", "n")


def _stages(df: DataFrame) -> DataFrame:
    seconds = (F.unix_micros("finished_at") - F.unix_micros("started_at")) / 1e6
    # Not the messages: a refused row's may quote a customer, and this page is not among what an erasure rewrites.
    return df.orderBy("started_at").select("stage", "status", F.round(seconds, 1).alias("seconds"), "rows_in",
                                           "rows_out")


def _segments(df: DataFrame) -> DataFrame:
    top = F.concat_ws(", ", F.slice(F.transform("top_items", lambda item: item["item_id"]), 1, 5))
    return df.orderBy("segment_id").select("segment_id", "label", "size", "share", top.alias("top_items"))


def _lists(df: DataFrame) -> DataFrame:
    return (df.where(F.col("metric").isin(*LIST_METRICS)).groupBy("model", "k")
            .pivot("metric", list(LIST_METRICS)).agg(F.first("value")).orderBy("k", F.desc("ndcg")))


def _scores(df: DataFrame) -> DataFrame:
    return (df.where(F.col("bin").isNull() & F.col("metric").isin(*SCORE_METRICS)).groupBy("target", "model")
            .pivot("metric", list(SCORE_METRICS)).agg(F.first("value")).orderBy("target", F.desc("pr_auc")))


def _send_times(df: DataFrame) -> DataFrame:
    return df.groupBy("hour_utc").agg(F.count(F.lit(1)).alias("customers"),
                                      F.avg(F.col("is_fallback").cast("double")).alias("fallback_share")) \
        .orderBy("hour_utc")


def _audiences(df: DataFrame) -> DataFrame:
    return df.groupBy("campaign_id", "variant").agg(F.count(F.lit(1)).alias("customers"),
                                                    F.avg(F.size("products")).alias("products_per_customer")) \
        .orderBy("campaign_id", "variant")


@dataclass(frozen=True)
class Chart:
    """A bar chart of a section's rows: one bar per ``label`` column value, its length the ``value`` column."""

    label: str
    value: str
    alt: str


@dataclass(frozen=True)
class Section:
    """A part of the page: the rows ``rows(table rows of this run)`` of ``table``, an optional chart of
    them, and the PNGs of the stage report ``plots`` (a key of the report directories given to
    ``write_run_report``)."""

    title: str
    table: C.TableSpec
    rows: Callable[[DataFrame], DataFrame]
    plots: str = ""
    chart: Chart | None = None


SECTIONS = (
    Section("Stages and timings", C.PIPELINE_RUNS, _stages, chart=Chart("stage", "seconds", "seconds per stage")),
    Section("Data quality", C.DATA_QUALITY,
            lambda df: df.orderBy("stage", "gate").select("stage", "gate", "value", "threshold", "passed")),
    Section("Drift against the previous run", C.DRIFT,
            lambda df: df.orderBy("stage", "table_name", "column_name").select(
                "stage", "table_name", "column_name", "statistic", "value", "threshold", "status")),
    Section("Segments", C.SEGMENT_PROFILES, _segments, plots="segments"),
    Section("Segment quality", C.SEGMENT_QUALITY,
            lambda df: df.select("k", "users", "largest_share", "size_entropy", "stability_ari", "min_top_lift",
                                 "median_top_lift")),
    Section("Lists beside their baselines (held-out NDCG, recall, precision, coverage)", C.REC_METRICS, _lists,
            plots="recommendations"),
    Section("Scores (validation)", C.MODEL_METRICS, _scores, plots="scores"),
    Section("Send times (UTC hour of each customer's send)", C.SEND_TIMES, _send_times,
            chart=Chart("hour_utc", "customers", "customers per send hour")),
    Section("Audiences", C.CAMPAIGN_AUDIENCE, _audiences),
    Section("Kept out by the contact policy", C.CAPPED_CUSTOMERS,
            lambda df: df.groupBy("campaign_id", "rule").agg(F.count(F.lit(1)).alias("customers"))
            .orderBy("campaign_id", "rule")),
    Section("Campaign lift", C.CAMPAIGN_RESULTS,
            lambda df: df.orderBy("campaign_id", "variant").select(
                "campaign_id", "variant", "recipients", "conversions", "conversion_rate", "lift", "ci_low",
                "ci_high", "revenue_per_recipient"),
            plots="campaigns"),
    Section("A/B/n tests", C.CAMPAIGN_TESTS,
            lambda df: df.orderBy("campaign_id", F.col("control").desc(), "test_variant").select(
                "campaign_id", "test_variant", "control", "recipients", "conversion_rate", "difference",
                "difference_low", "difference_high", "probability_best")),
)


def section_rows(spark: SparkSession, tables: Tables, run_id: str) -> dict[str, tuple[list[str], list[tuple]]]:
    """Section title -> (columns, rows) of ``run_id``; a section whose table is absent or holds nothing
    of the run has no rows."""
    found = {}
    for section in SECTIONS:
        if not tables.exists(spark, section.table):
            found[section.title] = ([], [])
            continue
        shown = section.rows(tables.read(spark, section.table).where(F.col("run_id") == run_id)).limit(MAX_ROWS)
        found[section.title] = (shown.columns, [tuple(row) for row in shown.collect()])
    return found


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def _table(columns: list[str], rows: list[tuple]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f'<td class="n">{_cell(v)}</td>' if isinstance(v, (int, float)) else
                                     f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _bar_chart(chart: Chart, columns: list[str], rows: list[tuple]) -> bytes:
    labels = [str(row[columns.index(chart.label)]) for row in rows]
    values = [float(row[columns.index(chart.value)] or 0.0) for row in rows]
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.3 * len(labels) + 0.8)))
    ax.barh(labels[::-1], values[::-1], color="#4477aa")
    ax.set_xlabel(chart.value)
    ax.set_ylabel(chart.label)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    plt.close(fig)
    return out.getvalue()


def _plots(directory: Path | None, since_epoch: float) -> list[Path]:
    """The PNGs a stage report wrote into ``directory`` during this run (not an earlier run's left there)."""
    if directory is None or not directory.is_dir():
        return []
    return [png for png in sorted(directory.glob("*.png")) if png.stat().st_mtime >= since_epoch]


def render(run_id: str, sections: dict[str, tuple[list[str], list[tuple]]],
           plot_dirs: dict[str, Path | None], since_epoch: float) -> str:
    """The page: each section's table (or a line saying the run produced none) and the PNGs its stage
    report wrote since ``since_epoch`` (the run's start, seconds since the epoch)."""
    parts = []
    for section in SECTIONS:
        columns, rows = sections.get(section.title, ([], []))
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if not rows:
            parts.append('<p class="empty">Not produced in this run.</p>')
            continue
        parts.append(_table(columns, rows))
        if section.chart is not None:
            parts.append(_image(_bar_chart(section.chart, columns, rows), section.chart.alt))
        for png in _plots(plot_dirs.get(section.plots) if section.plots else None, since_epoch):
            parts.append(_image(png.read_bytes(), png.stem))
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Run {html.escape(run_id)}</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0}"
            "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}td.n{text-align:right}th{background:#eef}"
            "img{display:block;max-width:100%;margin:.5em 0}.empty{color:#888}"
            f"</style></head><body><h1>Pipeline run {html.escape(run_id)}</h1><p>Written {written}.</p>"
            + "".join(parts) + "</body></html>")


def write_run_report(spark: SparkSession, tables: Tables, run_id: str, directory: Path,
                     plot_dirs: dict[str, Path | None]) -> Path:
    """Write ``run_<run_id>.html`` into ``directory`` and return its path."""
    started = tables.read(spark, C.PIPELINE_RUNS).where(F.col("run_id") == run_id) \
        .agg(F.min(F.unix_micros("started_at")).alias("micros")).first()["micros"]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"run_{run_id}.html"
    # Whole seconds: some file systems keep modification times to the second only.
    since = math.floor(started / 1e6) if started is not None else float("inf")
    path.write_text(render(run_id, section_rows(spark, tables, run_id), plot_dirs, since), encoding="utf-8")
    return path
