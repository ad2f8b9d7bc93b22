"""What every stage stands on: configuration and settings (validated once), the table catalog (names and
schemas), storage (Delta paths or catalog tables), the Spark session, run records, quality gates,
privacy (suppression, pseudonyms, erasure), drift checks and the one-page report of a pipeline run.
"""
