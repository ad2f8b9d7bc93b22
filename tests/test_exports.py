"""Email-platform exports: row counts and manifest match campaign_audience, files respect the row cap,
holdout and control never appear, and read_export refuses an interrupted or altered export."""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest

from lib import catalog as C
from lib.exports import MANIFEST, ExportError, read_export, write_export

STAMP = datetime(2026, 11, 1, 6, 30, tzinfo=timezone.utc)


def audience(spark, n=230):
    variants = ("treatment", "treatment", "treatment", "holdout", "global_control")
    rows = [{"campaign_id": "spring", "user_id": f"u{i:04d}", "variant": variants[i % 5], "segment_id": i % 3,
             "products": [{"item_id": f'i"{i}",x', "rank": 1, "score": 0.5, "source": "als"},
                          {"item_id": "i\\002", "rank": 2, "score": 0.25, "source": "popular"}],
             "churn_band": None if i % 7 == 0 else "low", "purchase_probability": i / n, "send_hour_utc": i % 24,
             "run_id": "r1"} for i in range(n)]
    return C.CAMPAIGN_AUDIENCE.conform(spark.createDataFrame(rows, C.CAMPAIGN_AUDIENCE.schema))


def test_export_matches_the_table_and_its_manifest(spark, tmp_path: Path):
    frame = audience(spark)
    directory = str(tmp_path / "spring" / "r1")
    manifest = write_export(spark, frame, directory, ("csv", "json"), 40, "spring", "r1", STAMP)
    treated = sorted(r["user_id"] for r in frame.where("variant = 'treatment'").collect())
    assert manifest["rows"] == len(treated) == 138

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
        assert payload["products"][0] == {"item_id": 'i"7",x', "rank": 1, "score": 0.5, "source": "als"}
        assert payload["products"][1]["item_id"] == "i\\002"
        assert payload["send_hour_utc"] == 7 and payload["segment_id"] == 1
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
