"""Erase customers (a GDPR / CCPA request): delete them from every table, then VACUUM.

    ./spark-submit.sh jobs/forget_users.py --set privacy.erasure_request=requests/2026-11-25.csv

The request lists the customers' ids as the source system knows them (column ``user_id``); with
``privacy.pseudonymize`` on, the key in ``privacy.key_env`` maps them to the stored pseudonyms.
"""
from __future__ import annotations

from jobs.common import StageContext, main_for
from lib.privacy import forget, load_key, read_erasure_request
from lib.runs import StageResult


def run(ctx: StageContext) -> StageResult:
    settings = ctx.settings.privacy
    if not settings.erasure_request:
        raise ValueError("set privacy.erasure_request to the file or table of customer ids to erase")
    key = load_key(settings.key_env, settings.secret_scope, settings.secret_key) if settings.pseudonymize else None
    ids = read_erasure_request(ctx.spark, settings.erasure_request)
    requested = ids.select("user_id").distinct().count()
    report = forget(ctx.spark, ctx.tables, ids, key, settings.vacuum_retention_hours)
    counts = {f"deleted.{name}": count for name, count in report.deleted.items()}
    return StageResult(rows_in=requested, rows_out=sum(report.deleted.values()), counts=counts,
                       message=f"{requested} customers erased from {len(report.vacuumed)} tables "
                               f"(vacuumed with {settings.vacuum_retention_hours} h retention)")


if __name__ == "__main__":
    main_for("forget_users")
