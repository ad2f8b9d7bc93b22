"""Erase customers (a GDPR / CCPA request) from every table, export and saved model, VACUUM, verify.

    ./spark-submit.sh jobs/forget_users.py --set privacy.erasure_request=requests/2026-11-25.csv

The request lists the customers' ids as the source system knows them (column ``user_id``); with
``privacy.pseudonymize`` on, the key in ``privacy.key_env`` maps them to the stored pseudonyms.
Rerunning the same request after a kill or a failure finishes it (docs/privacy.md).
"""
from __future__ import annotations

from pathlib import Path

from jobs.common import StageContext, exports_root, main_for, models_root, report_directories, report_directory
from lib.platform.privacy import ErasureTargets, forget, load_key, read_erasure_request
from lib.platform.runs import StageResult
from lib.platform.tracking import local_artifact_root


def report_roots(ctx: StageContext) -> tuple[str, ...]:
    """The directories the stages write their markdown reports to, and MLflow's copies of them (local
    ones that exist)."""
    found: set[Path] = set()
    # ("", ""): <output.root>/reports itself, where the run reports are
    for directory in (*report_directories(ctx).values(), report_directory(ctx, "", ""),
                      local_artifact_root(ctx.tables)):
        if directory is not None and directory.is_dir():
            found.add(directory.resolve())
    return tuple(sorted(str(d) for d in found if not any(other in d.parents for other in found)))


def run(ctx: StageContext) -> StageResult:
    settings = ctx.settings.privacy
    if not settings.erasure_request:
        raise ValueError("set privacy.erasure_request to the file or table of customer ids to erase")
    key = load_key(settings.key_env, settings.secret_scope, settings.secret_key) if settings.pseudonymize else None
    ids = read_erasure_request(ctx.spark, settings.erasure_request)
    requested = ids.select("user_id").distinct().count()
    targets = ErasureTargets(exports_root(ctx), models_root(ctx), report_roots(ctx))
    report = forget(ctx.spark, ctx.tables, ids, key, settings.vacuum_retention_hours, settings.erasure_request,
                    ctx.run_id, targets)
    counts = {f"deleted.{name}": count for name, count in report.deleted.items()}
    counts |= {f"redacted.{name}": count for name, count in report.redacted.items()}
    counts |= {"exports_removed": len(report.exports_removed), "models_rewritten": len(report.models_rewritten),
               "files_verified": report.files_checked, "files_pending_vacuum": len(report.pending),
               "attempt": report.attempt}
    message = (f"{requested} customers erased (attempt {report.attempt} of this request); "
               f"{len(report.vacuumed)} tables vacuumed with {settings.vacuum_retention_hours} h retention")
    if report.exports_removed:
        message += f"; exports removed: {', '.join(report.exports_removed)}"
    if report.pending:
        message += (f"; {len(report.pending)} older data file(s) still hold them until the retention has passed: "
                    "rerun this request then to VACUUM and verify")
    else:
        message += f"; verified: no trace in {report.files_checked} files"
    return StageResult(rows_in=requested, rows_out=sum(report.deleted.values()), counts=counts, message=message)


if __name__ == "__main__":
    main_for("forget_users")
