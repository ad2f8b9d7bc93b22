"""The stage registry: every stage of the pipeline, in order, with the tables it reads and writes.

The pipeline (jobs/run_pipeline.py), the wheel's console entry points (jobs/entrypoints.py and
pyproject.toml), the Databricks bundle and their tests all read this list; a stage is added here
and nowhere else. Each stage's code is ``run(ctx)`` in ``jobs/<name>.py``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from lib.platform import catalog as C


@dataclass(frozen=True)
class StageSpec:
    """One stage: its name (also its job module and task key), what it reads and writes, and ``package``:
    the ``lib`` package its transforms come from (a newcomer's second hop from a table to its code).

    ``keeps``: tables the stage appends a record of its work to; a failure does not restore them,
    so the record of a failed attempt survives for the rerun. ``ships``: of ``writes``, the model's
    outputs later stages and the API use; a model that fails its promotion gates
    (``lib.platform.promotion``) has them restored, its evidence (metrics) stays."""

    name: str
    summary: str
    reads: tuple[C.TableSpec, ...]
    writes: tuple[C.TableSpec, ...]
    package: str
    keeps: tuple[C.TableSpec, ...] = ()
    ships: tuple[C.TableSpec, ...] = ()

    @property
    def module(self) -> str:
        return f"jobs.{self.name}"

    @property
    def run(self) -> Callable:
        """The stage's ``run(ctx) -> StageResult``, imported on first use."""
        return importlib.import_module(self.module).run

    @property
    def publish(self) -> Callable | None:
        """The stage's optional ``publish(ctx)``: makes what it wrote outside Delta (export files) visible,
        called only once the stage's success is recorded."""
        return getattr(importlib.import_module(self.module), "publish", None)

    @property
    def discard(self) -> Callable | None:
        """The stage's optional ``discard(ctx)``: removes what a failed attempt wrote outside Delta."""
        return getattr(importlib.import_module(self.module), "discard", None)

    @property
    def console_script(self) -> str:
        return "email-personalization-" + self.name.replace("_", "-")


GENERATE_EVENTS = StageSpec(
    "generate_events", "generate the sample clickstream with planted segments (when input.events is empty)",
    reads=(), writes=(), package="lib.sample")
INGEST = StageSpec(
    "ingest", "validate the raw clickstream into events, quarantine the rest",
    reads=(), writes=(C.EVENTS, C.EVENTS_QUARANTINE, C.USER_IDENTITIES), package="lib.ingest")
INGEST_PRODUCTS = StageSpec(
    "ingest_products", "validate the optional product catalog (input.items) into products, quarantine the rest",
    reads=(), writes=(C.PRODUCTS, C.PRODUCTS_QUARANTINE), package="lib.ingest")
BUILD_INTERACTIONS = StageSpec(
    "build_interactions", "weighted, decayed user-item scores and stable indices",
    reads=(C.EVENTS,), writes=(C.USER_INDEX, C.ITEM_INDEX, C.INTERACTIONS), package="lib.features")
SEGMENT_USERS = StageSpec(
    "segment_users", "customer segments from a blockwise NMF",
    reads=(C.INTERACTIONS, C.USER_INDEX, C.ITEM_INDEX, C.PRODUCTS),
    writes=(C.NMF_USER_FACTORS, C.NMF_ITEM_FACTORS, C.NMF_HISTORY, C.NMF_K_SWEEP, C.USER_SEGMENTS,
            C.SEGMENT_PROFILES, C.SEGMENT_QUALITY), package="lib.segments",
    ships=(C.NMF_USER_FACTORS, C.NMF_ITEM_FACTORS, C.USER_SEGMENTS, C.SEGMENT_PROFILES))
RECOMMEND_ITEMS = StageSpec(
    "recommend_items", "ALS top-N lists, tuned and evaluated offline against baselines; similar items",
    reads=(C.EVENTS, C.INTERACTIONS, C.USER_INDEX, C.ITEM_INDEX, C.USER_SEGMENTS, C.PRODUCTS),
    writes=(C.ALS_TUNING, C.REC_METRICS, C.SEGMENT_USEFULNESS, C.RECOMMENDATIONS, C.ITEM_SIMILARITIES), package="lib.recommend",
    ships=(C.RECOMMENDATIONS, C.ITEM_SIMILARITIES))
SCORE_CUSTOMERS = StageSpec(
    "score_customers", "churn and purchase probability, expected revenue, email engagement per customer",
    reads=(C.EVENTS, C.NMF_USER_FACTORS, C.USER_SEGMENTS),
    writes=(C.CUSTOMER_SCORES, C.MODEL_METRICS, C.SEGMENT_OUTCOMES), package="lib.scores",
    ships=(C.CUSTOMER_SCORES, C.SEGMENT_OUTCOMES))
PLAN_SENDS = StageSpec(
    "plan_sends", "best send hour per customer and the global control / campaign holdout assignments",
    reads=(C.EVENTS, C.USER_SEGMENTS, C.USER_IDENTITIES),
    writes=(C.SEND_TIMES, C.SUPPRESSED_USERS, C.HOLDOUT_ASSIGNMENTS), package="lib.campaign")
BUILD_AUDIENCE = StageSpec(
    "build_audience", "campaign audiences (filters, suppressions, cap, treatment / holdout / control) and "
                      "email-platform exports with a manifest",
    reads=(C.RECOMMENDATIONS, C.USER_SEGMENTS, C.SEGMENT_PROFILES, C.PRODUCTS, C.CUSTOMER_SCORES, C.SEND_TIMES,
           C.EVENTS, C.USER_IDENTITIES),  # and its own campaign_sends of earlier runs
    writes=(C.SUPPRESSED_USERS, C.CAMPAIGN_AUDIENCE, C.CAMPAIGN_SENDS, C.CAPPED_CUSTOMERS), package="lib.campaign")
CAMPAIGN_REPORT = StageSpec(
    "campaign_report", "lift of each campaign's treatment over its holdout after the send, with 95% intervals, "
                       "and each A/B/n test's variants against its control",
    reads=(C.EVENTS, C.CAMPAIGN_AUDIENCE),
    writes=(C.CAMPAIGN_RESULTS, C.CAMPAIGN_TESTS), package="lib.campaign")

FORGET_USERS = StageSpec(
    "forget_users", "erase customers listed in privacy.erasure_request from every table, export and saved "
                    "model, VACUUM, then verify that no file holds them",
    # Deletes rather than writes: nothing to roll back; a rerun finishes a killed or failed attempt.
    reads=(), writes=(), package="lib.platform", keeps=(C.ERASURE_REQUESTS,))

# The pipeline's stages in run order (generate_events runs first only for the embedded sample).
PIPELINE: tuple[StageSpec, ...] = (INGEST, INGEST_PRODUCTS, BUILD_INTERACTIONS, SEGMENT_USERS, RECOMMEND_ITEMS, SCORE_CUSTOMERS,
                                    PLAN_SENDS, BUILD_AUDIENCE, CAMPAIGN_REPORT)
ALL_STAGES: tuple[StageSpec, ...] = (GENERATE_EVENTS, *PIPELINE, FORGET_USERS)
BY_NAME = {stage.name: stage for stage in ALL_STAGES}


def tables_markdown() -> str:
    """The README's table list, generated from the catalog and this registry (a test holds them equal)."""
    writers: dict[str, list[str]] = {}
    for stage in ALL_STAGES:
        for table in (*stage.writes, *stage.keeps):
            writers.setdefault(table.name, []).append(f"{stage.name} (`{stage.package}`)")
    lines = ["| table | columns | what it holds | written by |", "|---|---|---|---|"]
    for table in C.ALL_TABLES:
        columns = ", ".join(f.name + (" (partition)" if f.name in table.partition_by else "")
                            for f in table.schema.fields)
        written_by = ", ".join(writers.get(table.name, [])) or "every stage (jobs.common.run_stage, lib.platform.runs)"
        lines.append(f"| `{table.name}` | {columns} | {table.description} | {written_by} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m jobs.stages: print the README's table list
    print(tables_markdown())
