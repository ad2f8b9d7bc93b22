"""End to end: the pipeline on a tiny generated sample, read back from Delta, and its run report."""
import base64
import json
from html.parser import HTMLParser
from pathlib import Path

from mlflow.tracking import MlflowClient
from pyspark.ml.recommendation import ALSModel
from pyspark.sql import functions as F

import pytest
import yaml

from jobs import run_pipeline
from jobs.common import run_stage
from jobs.stages import BUILD_INTERACTIONS, INGEST, PIPELINE
from lib.platform.run_report import SECTIONS
from lib.platform.tracking import metric_name


# Written only when configured: segments.sweep_ks, input.items, privacy.pseudonymize.
OPTIONAL_TABLES = {"nmf_k_sweep", "products", "products_quarantine", "user_identities"}


@pytest.mark.slow
def test_pipeline_end_to_end_twice(spark, tmp_path: Path, context):
    root = tmp_path / "wh"
    args = ["--conf", "conf/local.toml", "--set", f"output.root={root}", "--set", "spark.shuffle_partitions=2",
            "--set", "sample.users=150", "--set", "sample.items=40", "--set", "sample.events=6000",
            "--set", "sample.segments=3", "--set", "ingest.now=2026-11-01T00:00:00+00:00",
            # Later stages run at their smallest useful size: their own tests cover their settings.
            "--set", "segments.k=3", "--set", "segments.max_iter=10", "--set", "segments.stability_check=false",
            "--set", "scores.gbt_max_iter=5", "--set", "recommend.als.ranks=8",
            "--set", "recommend.als.max_candidates=1", "--set", "recommend.als.max_iter=5"]
    first = run_pipeline.main(args + ["--run-id", "run-a"])
    assert first == "run-a"
    written = {table.name for stage in PIPELINE for table in stage.writes} - OPTIONAL_TABLES
    for table in written:
        assert (root / table / "_delta_log").is_dir(), table

    read = lambda name: spark.read.format("delta").load(str(root / name))  # noqa: E731
    stages = [stage.name for stage in PIPELINE]
    runs = read("pipeline_runs").where("run_id = 'run-a'")
    assert sorted(r["stage"] for r in runs.collect()) == sorted(["generate_events", *stages])
    assert runs.where("status != 'success'").count() == 0
    generated = runs.where("stage = 'generate_events'").first()
    # The sample's 6000 events plus the planted campaign's sends and purchases.
    assert generated["counts"]["sample_events"] == 6000 and generated["counts"]["campaign_events"] > 0
    events_in = generated["rows_out"]
    assert read("events").count() == events_in
    assert read("events_quarantine").count() == 0
    ingest_run = runs.where("stage = 'ingest'").first()
    assert (ingest_run["rows_in"], ingest_run["rows_out"]) == (events_in, events_in)
    results = read("campaign_results").where("variant = 'treatment'").collect()
    assert [r["campaign_id"] for r in results] == ["weekly_newsletter"] and results[0]["recipients"] > 0

    interactions = read("interactions")
    users, items = read("user_index"), read("item_index")
    assert interactions.where("score < 0").count() == 0
    assert interactions.agg(F.sum("n_events")).first()[0] == events_in
    n_users = users.count()
    assert users.agg(F.min("user_idx"), F.max("user_idx"), F.countDistinct("user_idx")).first() == \
        (0, n_users - 1, n_users)
    assert interactions.join(users, "user_idx", "left_anti").count() == 0
    assert interactions.join(items, "item_idx", "left_anti").count() == 0
    index_before = sorted(tuple(r) for r in users.collect())
    assert read("user_segments").select("user_id").distinct().count() == read("user_segments").count()
    recommended = read("recommendations").where("run_id = 'run-a'")
    assert recommended.select("user_id").distinct().count() == n_users

    # Promotion gates: each shipped model against its best baseline, from this run's own metrics.
    promoted = {r["gate"]: (r["value"], r["threshold"], r["passed"]) for r in
                read("data_quality").where("run_id = 'run-a' AND gate LIKE 'promote_%'").collect()}
    top_k = read("rec_metrics").agg(F.max("k")).first()[0]
    ndcg = {r["model"]: r["value"] for r in read("rec_metrics").where(f"metric = 'ndcg' AND k = {top_k}").collect()}
    auc = {(r["target"], r["model"]): r["value"] for r in read("model_metrics").where("metric = 'roc_auc'").collect()}
    assert set(promoted) == {"promote_discover", "promote_shipped_buy_again", "promote_shipped_blended",
                             "promote_churn_score", "promote_purchase_score"}
    assert promoted["promote_discover"] == (ndcg["discover"], ndcg["popular_new"], True)
    assert promoted["promote_shipped_blended"][:2] == (
        ndcg["shipped_blended"], max(ndcg[m] for m in ("most_bought", "most_recent", "segment_popular", "popular_all")))
    churn_baselines = [v for (target, model), v in auc.items() if target == "churn" and model.endswith("_baseline")]
    assert promoted["promote_churn_score"][1] == max(churn_baselines)
    # A first run has no previous model to keep: a loser on this tiny sample ships, and its stage says so.
    losers = {r["stage"] for r in read("data_quality").where(
        "run_id = 'run-a' AND gate LIKE 'promote_%' AND NOT passed").collect()}
    for run in runs.collect():
        assert ("no previous model to keep" in run["message"]) == (run["stage"] in losers), run["stage"]

    # MLflow: one run for the pipeline run, a nested run per model stage holding what its tables hold.
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("email-personalization")
    tracked = client.search_runs([experiment.experiment_id], "tags.pipeline_run_id = 'run-a'")
    (parent,) = [run for run in tracked if "mlflow.parentRunId" not in run.data.tags]
    children = {run.data.tags["stage"]: run for run in tracked if run.data.tags.get("mlflow.parentRunId") ==
                parent.info.run_id}
    assert len(tracked) == 1 + len(children)                # every stage run nested under the pipeline's
    assert set(children) == {"segment_users", "recommend_items", "score_customers"}
    assert all(run.info.status == "FINISHED" and run.data.tags["status"] == "success" for run in children.values())
    recommend = children["recommend_items"].data
    assert {key: value for key, value in recommend.metrics.items() if key.count(".") == 2
            and not key.startswith(("als_tuning", "promotion", "count"))} == {
        metric_name(r["model"], r["metric"], f"at_{r['k']}"): r["value"]
        for r in read("rec_metrics").collect() if r["value"] == r["value"]}       # NaN (no SE) is not logged
    assert {key: value for key, value in recommend.metrics.items() if key.startswith("promotion.")} == {
        f"promotion.{gate}": value for gate, (value, _, _) in promoted.items() if gate in (
            "promote_discover", "promote_shipped_buy_again", "promote_shipped_blended")}
    assert recommend.params["recommend.top_n"] == str(context().settings.recommend.top_n)
    assert recommend.tags["delta_version.recommendations"] == str(
        spark.sql(f"DESCRIBE HISTORY delta.`{root / 'recommendations'}` LIMIT 1").first()["version"])
    scores = children["score_customers"].data.metrics
    assert scores.items() >= {metric_name(r["target"], r["model"], r["metric"]): r["value"]
                              for r in read("model_metrics").collect() if r["bin"] is None and r["value"] == r["value"]
                              }.items()
    assert {a.path for a in client.list_artifacts(children["recommend_items"].info.run_id)} >= {
        "recommendations.md", "strategies.png"}
    # Models: the ALS registered where it was saved (its user factors stay where an erasure rewrites them),
    # each chosen scoring model copied as a spark-flavor MLflow model (BG/NBD's own probability is none);
    # a stage that lost a gate on this tiny sample registers a version that is not the champion.
    chosen = {r["target"]: r["model"] for r in read("model_metrics").where("metric = 'brier'").collect()}
    expected = {"als": "recommend_items", **{target: "score_customers" for target, model in chosen.items()
                                             if not model.startswith("bgnbd")}}
    models = {m.name.removeprefix("email_personalization."): m for m in client.search_registered_models()}
    assert set(models) == set(expected)
    for name, stage in expected.items():
        (version,) = client.search_model_versions(f"name = 'email_personalization.{name}'")
        assert (version.run_id, version.tags["promoted"]) == (children[stage].info.run_id, str(stage not in losers).lower())
        assert models[name].aliases == ({"champion": version.version} if stage not in losers else {})
        assert children[stage].data.tags[f"model_version.{name}"] == str(version.version)
    copied = {a.path for a in client.list_artifacts(children["score_customers"].info.run_id, "models")}
    assert copied == {f"models/{name}" for name in expected if name != "als"}
    assert "models" not in {a.path for a in client.list_artifacts(children["recommend_items"].info.run_id)}
    als_source = client.get_model_version("email_personalization.als", "1").source
    assert als_source == (root / "models" / "als" / "run-a").resolve().as_uri()
    als_mlmodel = yaml.safe_load((root / "models" / "als" / "run-a" / "MLmodel").read_text())
    assert [column["name"] for column in json.loads(als_mlmodel["signature"]["inputs"])] == ["user_idx", "item_idx"]
    assert ALSModel.load(str(root / "models" / "als" / "run-a")).rank == 8   # recommend.als.ranks above

    # One page of the whole run, every section from this run's tables; drift needs a previous run.
    page = PageSections()
    page.feed((root / "reports" / "run_run-a.html").read_text())
    assert list(page.sections) == [section.title for section in SECTIONS]
    drift = page.sections.pop("Drift against the previous run")
    assert drift["rows"] == [] and "Not produced in this run." in drift["text"]
    tests = page.sections.pop("A/B/n tests")  # the Quick start declares no A/B/n test
    assert tests["rows"] == [] and "Not produced in this run." in tests["text"]
    assert all(section["rows"] for section in page.sections.values()), page.sections
    stages_rows = page.sections["Stages and timings"]
    assert [row[0] for row in stages_rows["rows"]] == ["generate_events", *stages]
    assert {row[1] for row in stages_rows["rows"]} == {"success"}
    assert all(len(row) == 5 for row in stages_rows["rows"])
    lists = page.sections["Lists beside their baselines (held-out NDCG, recall, precision, coverage)"]["rows"]
    assert len(lists) == read("rec_metrics").select("model", "k").distinct().count()
    audiences = page.sections["Audiences"]
    assert sum(int(row[2]) for row in audiences["rows"]) == read("campaign_audience").count()
    assert len(page.sections["Segments"]["rows"]) == read("segment_profiles").count()
    lift = page.sections["Campaign lift"]["rows"]
    assert sorted((row[0], row[1], int(row[2])) for row in lift) == sorted(
        (r["campaign_id"], r["variant"], r["recipients"]) for r in read("campaign_results").collect())
    # Plots inside the page: the stage timings, the send hours, and the PNGs each stage report wrote.
    assert {title: sorted(section["alts"]) for title, section in page.sections.items() if section["alts"]} == {
        "Stages and timings": ["seconds per stage"],
        "Segments": ["convergence", "segment_quality", "segment_sizes"],
        "Lists beside their baselines (held-out NDCG, recall, precision, coverage)": ["strategies"],
        "Scores (validation)": ["lift", "reliability"],
        "Send times (UTC hour of each customer's send)": ["customers per send hour"],
        "Campaign lift": ["lift"]}
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for section in page.sections.values()
               for image in section["images"])

    # A second run of the first stages over the same input: nothing new is ingested, indices keep
    # their numbers (the later stages only read these tables).
    ctx = context(*[a for a in args if "=" in a], conf=("conf/local.toml",), run_id="run-b")
    for stage in (INGEST, BUILD_INTERACTIONS):
        run_stage(ctx, stage.name)
    assert read("events").count() == events_in
    ingest_again = read("pipeline_runs").where("run_id = 'run-b' and stage = 'ingest'").first()
    assert (ingest_again["rows_out"], ingest_again["counts"]["duplicates"]) == (0, events_in)
    assert sorted(tuple(r) for r in read("user_index").collect()) == index_before

    history = spark.sql(f"DESCRIBE HISTORY delta.`{root / 'events'}`").collect()
    # Created empty, without statistics on its personal columns (lib.platform.storage.Tables.create), then merged into.
    assert [h["operation"] for h in sorted(history, key=lambda h: h["version"])][:3] == \
        ["WRITE", "SET TBLPROPERTIES", "MERGE"]
    interactions_history = spark.sql(f"DESCRIBE HISTORY delta.`{root / 'interactions'}`").count()
    assert interactions_history == 2  # one overwrite per run; version 0 stays readable
    assert spark.read.format("delta").option("versionAsOf", 0).load(str(root / "interactions")).count() > 0


class PageSections(HTMLParser):
    """The run report's sections: title -> {rows: table cells per body row, images: base64 PNGs, alts: their
    alt texts, text}."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict] = {}
        self._current: dict | None = None
        self._in: str | None = None
        self._body = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            self._in = "h2"
        elif tag == "tbody":
            self._body = True
        elif self._current is not None and tag == "tr" and self._body:
            self._current["rows"].append([])
        elif self._current is not None and tag == "td":
            self._in = "td"
            self._current["rows"][-1].append("")
        elif self._current is not None and tag == "img":
            self._current["images"].append(attrs["src"].removeprefix("data:image/png;base64,"))
            self._current["alts"].append(attrs["alt"])

    def handle_endtag(self, tag):
        self._in = None if tag in ("h2", "td") else self._in
        self._body = self._body and tag != "tbody"

    def handle_data(self, data):
        if self._in == "h2":
            self._current = self.sections.setdefault(data, {"rows": [], "images": [], "alts": [], "text": ""})
        elif self._current is not None:
            self._current["text"] += data
            if self._in == "td":
                self._current["rows"][-1][-1] += data
