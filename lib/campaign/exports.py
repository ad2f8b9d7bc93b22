"""Email-platform exports of a campaign audience: files written by Spark, a manifest written last.

Layout of one export (one campaign, one run)::

    <exports.dir>/<campaign_id>/<run_id>/
        csv/part-*.csv     external_id, updated_at, payload (a JSON string); a header line in every file
        json/part-*.json   JSON lines: {"external_id", "updated_at", "payload": {...}}
                           payload: PAYLOAD_FIELDS, nulls written as null (the customer-value fields
                           are null for customers without a score; dates as "yyyy-MM-dd")
        manifest.json      schema version, columns, every file with its rows, bytes and SHA-256, and the
                           products passed over (not in the catalog / unavailable) by reason, the
                           customers the contact policy kept out by rule (capped), and the A/B/n test's
                           variants with its minimum detectable effect (ab_test; null without a test)

Each exported product carries what a template shows: item_id, rank, score, source, the catalog's
name, category and price, the configured currency, and an image URL and a link made from the
configured templates (``{item_id}`` replaced by the URL-encoded id); null where not configured.

Only treatment rows are exported: a holdout or global-control customer is never in a file. Files
hold at most ``max_rows_per_file`` rows (Spark's maxRecordsPerFile). The manifest is removed before
the files are (re)written and written last, atomically (a temporary file renamed), after its row
counts were checked against the table: a directory without a valid manifest is an interrupted
export, and ``read_export`` refuses it, as it refuses files whose size or checksum differ from it.

A stage writes its manifest as ``manifest.pending.json`` (``publish=False``): the export is published
(``publish_exports`` renames it to ``manifest.json``) only after the run's success is recorded in
``pipeline_runs``, and a failed run's exports are removed (``discard_exports``). So an export of a run
that failed, was killed or is still running is never readable. An export with no rows has its empty
part files in the manifest and reads as empty.

File sizes, checksums and row counts are measured by Spark (binaryFile, text); only one row per file
reaches the driver.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from lib.campaign.audience import CUSTOMER_VALUE_COLUMNS

# 2: segment_label, and each product's name, category, price, currency, image_url and link (1 had ids only);
# the manifest's products_dropped. 3: test_variant and content_key (A/B/n tests); the manifest's capped and
# ab_test. Earlier versions read as before.
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
PENDING = "manifest.pending.json"  # the manifest of an export whose run has not recorded its success
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
COLUMNS = ("external_id", "updated_at", "payload")
PAYLOAD_FIELDS = ("campaign_id", "run_id", "test_variant", "content_key", "segment_id", "segment_label", "churn_band",
                  "purchase_probability", "send_hour_utc", "products") + CUSTOMER_VALUE_COLUMNS
ITEM_ID_PLACEHOLDER = "{item_id}"


@dataclass(frozen=True)
class ProductContent:
    """What each exported product carries beside the catalog's details (exports.currency, the URL templates)."""

    currency: str = ""
    image_url_template: str = ""
    link_template: str = ""

    def products(self, products: Column) -> Column:
        """``products`` (campaign_audience's array) with currency, image_url and link added to each item."""
        def text(value: str) -> Column:  # an unconfigured value is null, never ""
            return F.lit(value or None).cast("string")

        def from_template(template: str, item_id: Column) -> Column:
            if not template:
                return text(template)
            return F.replace(F.lit(template), F.lit(ITEM_ID_PLACEHOLDER), F.url_encode(item_id))

        return F.transform(products, lambda p: p.withField("currency", text(self.currency))
                           .withField("image_url", from_template(self.image_url_template, p["item_id"]))
                           .withField("link", from_template(self.link_template, p["item_id"])))


class ExportError(ValueError):
    """An export directory is incomplete or does not match its manifest."""


def local_path(directory: str) -> Path:
    return Path(directory.removeprefix("file://").removeprefix("file:"))


def export_directory(root: str, campaign_id: str, run_id: str) -> str:
    return f"{root.rstrip('/')}/{campaign_id}/{run_id}"


def export_rows(audience: DataFrame, updated_at: datetime, content: ProductContent = ProductContent()) -> DataFrame:
    """(external_id, updated_at, payload struct) of the treatment rows of ``audience`` (campaign_audience rows)."""
    stamp = updated_at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    fields = [content.products(F.col(name)).alias(name) if name == "products" else F.col(name)
              for name in PAYLOAD_FIELDS]
    return audience.where(F.col("variant") == "treatment").select(
        F.col("user_id").alias("external_id"),
        F.lit(stamp).alias("updated_at"),
        F.struct(*fields).alias("payload"),
    )


def _file_stats(spark: SparkSession, directory: str, fmt: str) -> list[dict[str, Any]]:
    """Name, bytes, SHA-256 and rows of every part file of one format, measured by Spark."""
    location = f"{directory}/{fmt}"
    files = (spark.read.format("binaryFile").option("pathGlobFilter", "part-*").load(location)
             .select(F.regexp_extract("path", r"([^/]+)$", 1).alias("name"), "length",
                     F.sha2("content", 256).alias("sha256")))
    lines = (spark.read.text(location).select(F.regexp_extract(F.input_file_name(), r"([^/]+)$", 1).alias("name"))
             .groupBy("name").count())
    header = 1 if fmt == "csv" else 0
    rows = files.join(lines, "name", "left").orderBy("name").collect()  # one row per file
    return [{"path": f"{fmt}/{r['name']}", "bytes": int(r["length"]), "sha256": r["sha256"],
             "rows": max(int(r["count"] or 0) - header, 0)} for r in rows]


def _empty_files(base: Path, fmt: str) -> list[dict[str, Any]]:
    """The 0-byte part files of one format: Spark's file sources skip them, so ``_file_stats`` never sees
    the one empty part an export without rows leaves (JSON)."""
    return [{"path": f"{fmt}/{p.name}", "bytes": 0, "sha256": EMPTY_SHA256, "rows": 0}
            for p in sorted((base / fmt).glob("part-*")) if p.stat().st_size == 0]


def write_export(spark: SparkSession, audience: DataFrame, directory: str, formats: tuple[str, ...],
                 max_rows_per_file: int, campaign_id: str, run_id: str, updated_at: datetime,
                 publish: bool = True, content: ProductContent = ProductContent(),
                 products_dropped: dict[str, int] | None = None,
                 capped: dict[str, int] | None = None, ab_test: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one campaign's export into ``directory`` (see the module docstring); return the manifest.

    ``audience``: that campaign's campaign_audience rows (all variants; only treatment is written).
    ``publish=False`` leaves the manifest pending, for ``publish_exports`` once the run has succeeded.
    ``products_dropped``: reason -> products passed over in the exported lists (the manifest's count).
    ``capped``: contact-policy rule -> customers the campaign's filters passed that it kept out.
    ``ab_test``: the campaign's A/B/n test before the send (variants, minimum detectable effect), if any."""
    base = local_path(directory)
    base.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, PENDING):  # from here on the directory reads as incomplete
        (base / name).unlink(missing_ok=True)
    rows = export_rows(audience, updated_at, content).orderBy("external_id")
    expected = rows.count()
    for fmt in formats:
        writer = None
        if fmt == "csv":
            flat = rows.select("external_id", "updated_at",
                               F.to_json("payload", {"ignoreNullFields": "false"}).alias("payload"))
            writer = flat.write.option("header", True).option("escape", '"')
        elif fmt == "json":
            writer = rows.write.option("ignoreNullFields", False)
        else:
            raise ValueError(f"exports.formats: unknown format {fmt!r}")
        writer = writer.mode("overwrite").option("maxRecordsPerFile", max_rows_per_file).option("compression", "none")
        (writer.csv if fmt == "csv" else writer.json)(f"{directory}/{fmt}")

    listing = {fmt: _file_stats(spark, directory, fmt) + _empty_files(base, fmt) for fmt in formats}
    for fmt, files in listing.items():
        written = sum(f["rows"] for f in files)
        if written != expected:
            raise ExportError(f"{directory}/{fmt}: {written} rows in the files, {expected} treatment rows in the "
                              "audience; no manifest written")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "campaign_id": campaign_id,
        "run_id": run_id,
        "updated_at": updated_at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "key": "external_id",
        "columns": list(COLUMNS),
        "payload_schema": rows.schema["payload"].dataType.simpleString(),
        "max_rows_per_file": max_rows_per_file,
        "rows": expected,
        "products_dropped": dict(sorted((products_dropped or {}).items())),
        "capped": dict(sorted((capped or {}).items())),
        "ab_test": ab_test,
        "formats": {fmt: {"rows": sum(f["rows"] for f in files), "files": files} for fmt, files in listing.items()},
    }
    temporary = base / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, base / (MANIFEST if publish else PENDING))  # atomic: no manifest or the whole one
    return manifest


def _run_directories(root: str, run_id: str) -> list[Path]:
    """Every campaign's export directory of ``run_id`` under the exports root."""
    base = local_path(root)
    if not base.is_dir():
        return []
    return sorted(p / run_id for p in base.iterdir() if (p / run_id).is_dir())


def publish_exports(root: str, run_id: str) -> list[Path]:
    """Make the pending exports of ``run_id`` readable (their manifest renamed into place, atomically);
    called only once the run's success is recorded. Returns the directories published."""
    published = []
    for directory in _run_directories(root, run_id):
        if (directory / PENDING).is_file():
            os.replace(directory / PENDING, directory / MANIFEST)
            published.append(directory)
    return published


def discard_exports(root: str, run_id: str) -> list[Path]:
    """Remove every export directory of ``run_id`` (a failed run's): nothing of it can be imported."""
    directories = _run_directories(root, run_id)
    for directory in directories:
        shutil.rmtree(directory)
    return directories


@dataclass(frozen=True)
class Export:
    """A validated export: its manifest and directory."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    def files(self, fmt: str) -> list[Path]:
        return [self.directory / f["path"] for f in self.manifest["formats"][fmt]["files"]]

    def records(self, fmt: str) -> Iterator[dict[str, Any]]:
        """Every row of one format as a dict, the payload parsed (for importers and tests)."""
        for path in self.files(fmt):
            with path.open(newline="", encoding="utf-8") as handle:
                if fmt == "csv":
                    for row in csv.DictReader(handle):
                        yield {**row, "payload": json.loads(row["payload"])}
                else:
                    for line in handle:
                        if line.strip():
                            yield json.loads(line)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_export(directory: str | Path) -> Export:
    """The export in ``directory``, validated: refuses (ExportError) an unpublished export (its run
    has not recorded success), a directory without a valid manifest, a listed file that is missing or
    whose size or SHA-256 differs, and a part file the manifest does not list (the leftover of an
    interrupted rewrite)."""
    base = local_path(str(directory))
    path = base / MANIFEST
    if not path.is_file() and (base / PENDING).is_file():
        raise ExportError(f"{base}: not published: its run has not recorded success in pipeline_runs (still "
                          "running, killed, or failed)")
    if not path.is_file():
        raise ExportError(f"{base}: no {MANIFEST}: the export is incomplete (interrupted) or not an export")
    try:
        manifest = json.loads(path.read_text())
        version, formats = manifest["schema_version"], manifest["formats"]
        total = int(manifest["rows"])
    except (ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{path}: not a valid manifest ({type(err).__name__}: {err})") from None
    if version not in READABLE_VERSIONS:
        raise ExportError(f"{path}: schema_version {version!r}, this reader knows "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
    for fmt, entry in formats.items():
        listed = {f["path"] for f in entry["files"]}
        present = {f"{fmt}/{p.name}" for p in (base / fmt).glob("part-*")}
        if present - listed:
            raise ExportError(f"{base}: file(s) {', '.join(sorted(present - listed))} are not in {MANIFEST}")
        for item in entry["files"]:
            file = base / item["path"]
            if not file.is_file():
                raise ExportError(f"{base}: {item['path']} is listed in {MANIFEST} but missing")
            if file.stat().st_size != item["bytes"] or _sha256(file) != item["sha256"]:
                raise ExportError(f"{base}: {item['path']} differs from {MANIFEST} (size or SHA-256 checksum)")
        if sum(int(f["rows"]) for f in entry["files"]) != total:
            raise ExportError(f"{path}: the {fmt} files' rows do not add up to rows = {total}")
    return Export(base, manifest)
