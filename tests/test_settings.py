"""Typed settings (Spark-free): conf/base.toml and the dataclasses agree, bad values fail naming their key."""
from __future__ import annotations

import pytest

from jobs.common import BASE_CONFIG, load_settings
from lib.config import OPEN_TABLES, ConfigError, parse_toml
from lib.settings import Settings, section_keys


def _toml_keys(table: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        # Free-form maps (event weights, Spark settings) are one setting each.
        if isinstance(value, dict) and dotted not in OPEN_TABLES:
            keys |= _toml_keys(value, dotted + ".")
        else:
            keys.add(dotted)
    return keys


def test_every_base_key_has_a_typed_field_and_back():
    base = parse_toml(BASE_CONFIG.read_text(), "base")
    assert _toml_keys(base) == section_keys(Settings)


def test_defaults_and_shipped_environments_build():
    for conf in ((), ("conf/local.toml",), ("conf/databricks.toml",)):
        settings = load_settings(list(conf), [])
        assert settings.segments.k >= 1 and settings.recommend.top_n >= 1
    settings = load_settings([], ["recommend.als.reg_params=1,2", "segments.sweep_ks=3,5"])
    assert settings.recommend.als.reg_params == (1.0, 2.0)  # ints widen to the declared float
    assert settings.segments.sweep_ks == (3, 5)            # typed by the field, not by the (empty) default


@pytest.mark.parametrize("assignment, message", [
    ("recommend.top_n=-5", "'recommend.top_n' must be >= 1, got -5"),
    ("interactions.half_life_days=0", "'interactions.half_life_days' must be > 0"),
    ("segments.k=0", "'segments.k' must be >= 1"),
    ("segments.solver=als", "'segments.solver' must be one of hals, mu"),
    ("recommend.holdout_fraction=1.5", "'recommend.holdout_fraction' must be in \\(0, 1\\)"),
    ("recommend.als.ranks=[]", "'recommend.als.ranks' must hold at least one value"),
    ("recommend.als.search=bayes", "'recommend.als.search' must be one of grid, random"),
    ("ingest.now=yesterday", "'ingest.now' expects an ISO-8601 date or time"),
    ("interactions.weights.view=-1", "'interactions.weights' must be >= 0; negative for view"),
    ("input.format=xml", "'input.format' must be one of"),
    ("spark.shuffle_partitions=0", "'spark.shuffle_partitions' must be >= 1"),
])
def test_bad_values_fail_at_start_naming_the_key(assignment, message):
    with pytest.raises(ConfigError, match=message):
        load_settings([], [assignment])


def test_cross_key_checks_name_both_sides():
    with pytest.raises(ConfigError, match="'interactions.weights' lacks a weight for event type.s. wishlist"):
        load_settings([], ["ingest.event_types=view,purchase,wishlist"])
    with pytest.raises(ConfigError, match="'recommend.exclude_event_types' names event type.s. refund"):
        load_settings([], ["recommend.exclude_event_types=refund"])
    with pytest.raises(ConfigError, match="'recommend.model_dir' must be set when tables are catalog tables"):
        load_settings([], ["output.catalog=main", "output.schema=s"])


def test_settings_are_frozen():
    settings = load_settings([], [])
    with pytest.raises(AttributeError):
        settings.segments.k = 3  # type: ignore[misc]
