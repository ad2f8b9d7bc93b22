"""From raw exports to validated Delta tables: readers and source presets, the events ingest (quarantine,
dedupe, reconciled counts) and the product catalog.
"""
