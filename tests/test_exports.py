"""Email-platform exports: row counts and manifest match campaign_audience, files respect the row cap,
holdout and control never appear, read_export refuses an interrupted or altered export and the export
of a run that failed or never recorded its success, and reads an empty export as empty."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from jobs import build_audience, common
from jobs.common import run_stage
from lib.campaign.audience import CUSTOMER_VALUE_COLUMNS
from lib.campaign.exports import (MANIFEST, PAYLOAD_FIELDS, ExportError, ProductContent, discard_exports,
                                  publish_exports, read_export, write_export)
from lib.platform import catalog as C

STAMP = datetime(2026, 11, 1, 6, 30, tzinfo=timezone.utc)


def customer_value(i: int) -> dict:
    """The customer-value fields of the i-th customer; every 7th is unscored (all null)."""
    if i % 7 == 0:
        return dict.fromkeys(CUSTOMER_VALUE_COLUMNS)
    return {"historic_clv": 10.0 * i, "predicted_clv": 2.5 * i, "total_clv": 12.5 * i, "p_alive": 0.75,
            "expected_orders": 1.5, "avg_days_between_orders": None if i % 2 else 20.25,
            "expected_next_order_date": date(2026, 11, 1) + timedelta(days=i % 30)}


def audience(spark, n=230):
    variants = ("treatment", "treatment", "treatment", "holdout", "global_control")
    rows = [{"campaign_id": "spring", "user_id": f"u{i:04d}", "variant": variants[i % 5], "segment_id": i % 3,
             "segment_label": f"segment {i % 3}",
             "products": [{"item_id": f'i"{i}",x', "rank": 1, "score": 0.5, "source": "als", "name": "Mug",
                           "category": "kitchen", "price": 4.5},
                          {"item_id": "i\\002", "rank": 2, "score": 0.25, "source": "popular"}],
             "churn_band": None if i % 7 == 0 else "low", "purchase_probability": i / n, "send_hour_utc": i % 24,
             "run_id": "r1", **customer_value(i)} for i in range(n)]
    return C.CAMPAIGN_AUDIENCE.conform(spark.createDataFrame(rows, C.CAMPAIGN_AUDIENCE.schema))


def test_export_matches_the_table_and_its_manifest(spark, tmp_path: Path):
    frame = audience(spark)
    directory = str(tmp_path / "spring" / "r1")
    content = ProductContent("EUR", "https://img.example/{item_id}.jpg", "")
    manifest = write_export(spark, frame, directory, ("csv", "json"), 40, "spring", "r1", STAMP, content=content,
                            products_dropped={"unavailable": 3})
    treated = sorted(r["user_id"] for r in frame.where("variant = 'treatment'").collect())
    assert manifest["rows"] == len(treated) == 138
    assert (manifest["schema_version"], manifest["products_dropped"]) == (3, {"unavailable": 3})

    export = read_export(directory)
    assert export.manifest == json.loads((tmp_path / "spring" / "r1" / MANIFEST).read_text())
    for fmt in ("csv", "json"):
        files = manifest["formats"][fmt]["files"]
        assert len(files) >= 4 and all(f["rows"] <= 40 for f in files)  # 138 rows at 40 per file
        assert sum(f["rows"] for f in files) == 138
        assert {p.name for p in (tmp_path / "spring" / "r1" / fmt).glob("part-*")} == \
            {Path(f["path"]).name for f in files}
        records = list(export.records(fmt))
        assert sorted(r["external_id"] for r in records) == treated  # no holdout, no control
        one = next(r for r in records if r["external_id"] == "u0007")
        assert one["updated_at"] == "2026-11-01T06:30:00Z"
        payload = one["payload"]
        assert payload["campaign_id"] == "spring" and payload["churn_band"] is None  # nulls kept, not dropped
        # Email-ready: the catalog's details, the currency, an image URL from the template with the id
        # URL-encoded; no link template, so no link; a product the catalog lacks has null details.
        assert payload["products"][0] == {"item_id": 'i"7",x', "rank": 1, "score": 0.5, "source": "als",
                                          "name": "Mug", "category": "kitchen", "price": 4.5, "currency": "EUR",
                                          "image_url": "https://img.example/i%227%22%2Cx.jpg", "link": None}
        assert payload["products"][1] == {"item_id": "i\\002", "rank": 2, "score": 0.25, "source": "popular",
                                          "name": None, "category": None, "price": None, "currency": "EUR",
                                          "image_url": "https://img.example/i%5C002.jpg", "link": None}
        assert payload["send_hour_utc"] == 7 and payload["segment_id"] == 1 and payload["segment_label"] == "segment 1"
        assert set(payload) == set(PAYLOAD_FIELDS)
        assert all(payload[c] is None for c in CUSTOMER_VALUE_COLUMNS)  # unscored: null, never dropped
        scored = next(r for r in records if r["external_id"] == "u0006")["payload"]
        assert {c: scored[c] for c in CUSTOMER_VALUE_COLUMNS} == {
            "historic_clv": 60.0, "predicted_clv": 15.0, "total_clv": 75.0, "p_alive": 0.75, "expected_orders": 1.5,
            "avg_days_between_orders": 20.25, "expected_next_order_date": "2026-11-07"}
    header = (tmp_path / "spring" / "r1" / manifest["formats"]["csv"]["files"][0]["path"]).read_text().splitlines()[0]
    assert header == "external_id,updated_at,payload"


def test_read_export_refuses_interrupted_and_altered_exports(spark, tmp_path: Path):
    directory = tmp_path / "spring" / "r1"
    write_export(spark, audience(spark, 60), str(directory), ("csv", "json"), 10, "spring", "r1", STAMP)
    assert read_export(directory).rows == 36

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(directory, target)
        return target

    interrupted = copy("interrupted")
    (interrupted / MANIFEST).unlink()  # the files are all there, the manifest never came
    with pytest.raises(ExportError, match="no manifest.json: the export is incomplete"):
        read_export(interrupted)

    altered = copy("altered")
    part = sorted((altered / "csv").glob("part-*"))[0]
    part.write_text(part.read_text().replace("u00", "u99", 1))  # same size, other bytes
    with pytest.raises(ExportError, match="differs from manifest.json .size or SHA-256"):
        read_export(altered)

    missing = copy("missing")
    sorted((missing / "json").glob("part-*"))[-1].unlink()
    with pytest.raises(ExportError, match="is listed in manifest.json but missing"):
        read_export(missing)

    extra = copy("extra")
    shutil.copy(sorted((extra / "json").glob("part-*"))[0], extra / "json" / "part-99999-leftover.json")
    with pytest.raises(ExportError, match="part-99999-leftover.json are not in manifest.json"):
        read_export(extra)

    broken = copy("broken")
    (broken / MANIFEST).write_text('{"schema_version": 1, "rows": ')
    with pytest.raises(ExportError, match="not a valid manifest"):
        read_export(broken)

    # A rewrite of the same run removes the old manifest first: stopped half-way (here: the writer
    # fails on the second format) the directory has no manifest, never the old one over new files.
    with pytest.raises(Exception):
        write_export(spark, audience(spark, 60), str(directory), ("csv", "parquet"), 10, "spring", "r1", STAMP)
    with pytest.raises(ExportError, match="no manifest.json"):
        read_export(directory)


def test_an_empty_export_reads_as_empty(spark, tmp_path: Path):
    """A campaign nobody qualifies for (issue 19, case 6): Spark leaves an empty part file, which the
    manifest lists like any other."""
    directory = tmp_path / "winback" / "r1"
    nobody = audience(spark, 20).where("variant <> 'treatment'")
    manifest = write_export(spark, nobody, str(directory), ("csv", "json"), 10, "winback", "r1", STAMP)
    export = read_export(directory)
    assert manifest["rows"] == export.rows == 0
    for fmt in ("csv", "json"):
        assert list(export.records(fmt)) == []
        listed = {Path(f["path"]).name for f in export.manifest["formats"][fmt]["files"]}
        assert {p.name for p in (directory / fmt).glob("part-*")} == listed


def test_an_export_is_readable_only_once_published(spark, tmp_path: Path):
    directory = tmp_path / "spring" / "r1"
    write_export(spark, audience(spark, 20), str(directory), ("json",), 10, "spring", "r1", STAMP, publish=False)
    with pytest.raises(ExportError, match="not published: its run has not recorded success"):
        read_export(directory)
    assert publish_exports(str(tmp_path), "r1") == [directory]
    assert read_export(directory).rows == 12
    assert discard_exports(str(tmp_path), "r1") == [directory] and not directory.exists()


@pytest.mark.slow  # two build_audience runs
def test_exports_of_a_failed_or_killed_build_audience_are_refused(context, tmp_path: Path, monkeypatch):
    """Issue 19, case 5: the first campaign's export of a run that then fails is removed; a run killed
    before its success is recorded (pipeline_runs still says running) leaves an export read_export refuses."""
    root = tmp_path / "wh"
    ctx = context(f"output.root={root}", run_id="failed")
    users = [f"u{i:02d}" for i in range(30)]
    recs = [{"user_id": u, "rank": r, "item_id": f"i{r}", "score": 1.0 / r, "source": "als", "run_id": "r0",
             "strategy": "blended"} for u in users for r in range(1, 5)]
    ctx.tables.overwrite(ctx.spark.createDataFrame(recs, C.RECOMMENDATIONS.schema), C.RECOMMENDATIONS)
    exports = root / "exports"

    real_write, written = build_audience.write_export, []

    def fail_on_the_second_campaign(*args, **kwargs):
        if written:
            raise RuntimeError("injected failure after the first export")
        written.append(real_write(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(build_audience, "write_export", fail_on_the_second_campaign)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_stage(ctx, "build_audience")
    assert written and not (exports / "weekly_newsletter" / "failed").exists()
    with pytest.raises(ExportError):
        read_export(exports / "weekly_newsletter" / "failed")
    monkeypatch.undo()

    def killed_before_success(ctx, name, status, *args):
        if status == "success":
            raise KeyboardInterrupt  # the process dies here: nothing after it runs
        return real_finish(ctx, name, status, *args)

    real_finish = common._finish
    monkeypatch.setattr(common, "_finish", killed_before_success)
    with pytest.raises(KeyboardInterrupt):
        run_stage(replace(ctx, run_id="killed"), "build_audience")
    monkeypatch.undo()
    runs = ctx.tables.read(ctx.spark, C.PIPELINE_RUNS).where("run_id = 'killed'").collect()
    assert [r["status"] for r in runs] == ["running"]
    for campaign in ("weekly_newsletter", "winback"):
        assert (exports / campaign / "killed").is_dir()
        with pytest.raises(ExportError, match="not published"):
            read_export(exports / campaign / "killed")
