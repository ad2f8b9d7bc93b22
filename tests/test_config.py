from pathlib import Path

import pytest

from jobs.common import BASE_CONFIG, load_config
from lib.platform.config import ConfigError, merge, parse_set, parse_toml, resolve

BASE = {
    "input": {"events": "", "format": ""},
    "ingest": {"future_skew_minutes": 60, "event_types": ["view", "click"], "strict": False},
    "interactions": {"half_life_days": 30.0, "weights": {"view": 1.0}},
    "spark": {"conf": {}},
}


def test_overlay_and_sets_override_defaults_in_order():
    config = resolve(BASE, [{"input": {"events": "a.csv"}}, {"input": {"events": "b.csv"}}],
                     ["ingest.future_skew_minutes=5", "interactions.half_life_days=7", "ingest.strict=true",
                      "ingest.event_types=view,click,purchase"])
    assert config["input"]["events"] == "b.csv"
    assert config["ingest"] == {"future_skew_minutes": 5, "event_types": ["view", "click", "purchase"], "strict": True}
    assert config["interactions"]["half_life_days"] == 7.0
    assert BASE["input"]["events"] == ""  # the base is not mutated


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'input.evnts'"):
        merge(BASE, {"input": {"evnts": "x"}})
    with pytest.raises(ConfigError, match="unknown config key 'nmf.rank'"):
        parse_set(BASE, "nmf.rank=3")


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match="'ingest.future_skew_minutes' expects an int, got str"):
        merge(BASE, {"ingest": {"future_skew_minutes": "60"}})
    with pytest.raises(ConfigError, match="'interactions.half_life_days' expects a float, got 'abc'"):
        parse_set(BASE, "interactions.half_life_days=abc")
    with pytest.raises(ConfigError, match="'ingest.strict' expects a bool"):
        parse_set(BASE, "ingest.strict=maybe")
    with pytest.raises(ConfigError, match="'input' is a table"):
        merge(BASE, {"input": "x"})


def test_open_tables_accept_new_keys_of_the_sibling_type():
    config = resolve(BASE, [], ["interactions.weights.wishlist=3", "spark.conf.spark.sql.adaptive.enabled=true"])
    assert config["interactions"]["weights"] == {"view": 1.0, "wishlist": 3.0}
    assert config["spark"]["conf"] == {"spark.sql.adaptive.enabled": "true"}
    with pytest.raises(ConfigError, match="'interactions.weights.wishlist' expects a float"):
        merge(BASE, {"interactions": {"weights": {"wishlist": "high"}}})


def test_invalid_toml_names_its_source():
    with pytest.raises(ConfigError, match="conf/bad.toml: invalid TOML"):
        parse_toml("input = [", "conf/bad.toml")


def test_shipped_environments_are_valid(tmp_path: Path):
    repo = BASE_CONFIG.parent
    for env in ("local.toml", "databricks.toml"):
        config = load_config([str(repo / env)], [])
        assert set(config) == set(parse_toml(BASE_CONFIG.read_text(), "base"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([str(tmp_path / "missing.toml")], [])
