"""Typed settings: conf/base.toml and the dataclasses agree, bad values fail naming their key (Spark-free),
and the stages' checks against the data fail before their first write (a tiny matrix, last test)."""
from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import get_type_hints

import pytest

from jobs.common import BASE_CONFIG, load_settings, submit_options
from lib.platform import catalog as C
from lib.platform.config import OPEN_TABLES, ConfigError, parse_toml
from lib.platform.settings import (INT_RANGES, TOP_N_SCORES_CHUNK_MB, AbVariantSettings, CampaignSettings, Settings,
                                   section_keys)
from lib.recommend.topn import TopNBlocks


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
    # Issue 19: integers have upper bounds, floats must be finite, a float is no int.
    ("segments.k=1e23", "'segments.k' expects an int, got '1e23'"),
    ("segments.k=100000000000000000000000", "'segments.k' must be <= 1000, got 100000000000000000000000"),
    ("segments.sweep_ks=3,5000", "'segments.sweep_ks' must hold integers <= 1000, got \\[3, 5000\\]"),
    ("recommend.top_n=1000000000", "'recommend.top_n' must be <= 1000, got 1000000000"),
    ("recommend.als.seed=4294967296", "'recommend.als.seed' must be <= 2147483646"),
    ("recommend.als.checkpoint_interval=0", "'recommend.als.checkpoint_interval' must be >= 1, or -1 for never"),
    ("campaigns.promo.send_hour_utc=24", "'campaigns.promo.send_hour_utc' must be <= 23, got 24"),
    ("interactions.half_life_days=inf", "'interactions.half_life_days' must be a finite number, got inf"),
    ("segments.tol=nan", "'segments.tol' must be a finite number, got nan"),
    ("interactions.weights.view=inf", "'interactions.weights' must hold finite numbers"),
    ("recommend.als.reg_params=0.1,inf", "'recommend.als.reg_params' must hold finite numbers, got \\[0.1, inf\\]"),
    ("recommend.als.top_n_user_block_mb=8", "'recommend.als.top_n_user_block_mb' must be > 8 \\(the scores chunk"),
    ("spark.driver_memory=lots", "'spark.driver_memory' must be a size such as \"2g\""),
    ("spark.executor_memory=2gb", "'spark.executor_memory' must be a size such as"),
    ("spark.driver_memory=256m", "'spark.driver_memory' must be at least 512m, got '256m'"),
    ("products.columns.product_id=sku", "'products.columns' maps to sku, not catalog columns"),
    ("input.item_columns.Description=title", "'input.item_columns' maps to title, not product attribute columns"),
    ("exports.currency=euro", "'exports.currency' must be an ISO 4217 code such as EUR or USD, or empty"),
    ("exports.link_template=https://shop.example/p", "'exports.link_template' must hold \\{item_id\\}"),
    ("drift.psi_warn=0", "'drift.psi_warn' must be > 0, got 0.0"),
    ("drift.psi_fail=0.05", "'drift.psi_fail' must be >= drift.psi_warn \\(0.1\\), got 0.05"),
    ("drift.action=stop", "'drift.action' must be one of warn, fail; got 'stop'"),
    ("drift.bins=1", "'drift.bins' must be >= 2, got 1"),
    ("drift.psi_fail=nan", "'drift.psi_fail' must be a finite number, got nan"),
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


def test_heap_sizes_reach_spark_submit_from_the_jobs_own_config():
    assert submit_options([]) == ["--driver-memory", "4g", "--executor-memory", "2g"]
    assert submit_options(["--set", "spark.driver_memory=6G", "--set", "spark.executor_memory=", "--run-id", "r"]) \
        == ["--driver-memory", "6G"]
    assert submit_options(["--conf", "conf/databricks.toml"]) == []          # the cluster sizes its JVMs
    assert submit_options(["--set", "spark.driver_memory=lots"]) == []       # the job itself then fails naming it


def test_runtime_spark_settings_leave_zero_to_spark_and_let_spark_conf_win():
    listing = "spark.sql.sources.parallelPartitionDiscovery.parallelism"
    conf = load_settings([], []).spark.runtime_conf()
    assert conf == {"spark.sql.shuffle.partitions": "8", "spark.sql.session.timeZone": "UTC",
                    "spark.databricks.delta.snapshotPartitions": "2", listing: "8"}
    cluster = load_settings(["conf/databricks.toml"], []).spark
    assert cluster.runtime_conf() == {"spark.sql.shuffle.partitions": "200", "spark.sql.session.timeZone": "UTC"}
    overridden = dataclasses.replace(cluster, conf={listing: "64"})
    assert overridden.runtime_conf()[listing] == "64"


def test_the_user_block_floor_is_the_scores_chunk_of_top_n():
    assert TOP_N_SCORES_CHUNK_MB == 4 * TopNBlocks().chunk_elements / 2**20


def test_settings_are_frozen():
    settings = load_settings([], [])
    with pytest.raises(AttributeError):
        settings.segments.k = 3  # type: ignore[misc]


def _integer_keys(cls: type = Settings, prefix: str = "") -> set[str]:
    keys = set()
    for name, hint in get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys |= _integer_keys(hint, f"{prefix}{name}.")
        elif hint is int or hint == tuple[int, ...]:
            keys.add(f"{prefix}{name}")
    return keys


def test_every_integer_key_has_a_range_and_the_ranges_name_no_other_key():
    assert set(INT_RANGES) == (_integer_keys() | _integer_keys(CampaignSettings, "campaigns.*.")
                               | _integer_keys(AbVariantSettings, "ab_variants.*."))
    assert all(low <= high for low, high in INT_RANGES.values())


def test_a_float_in_a_config_file_is_no_integer(tmp_path):
    conf = tmp_path / "big.toml"
    conf.write_text("[segments]\nk = 1e23\n")
    with pytest.raises(ConfigError, match="'segments.k' expects an int, got float 1e\\+23"):
        load_settings([str(conf)], [])


def test_an_unusable_directory_fails_at_job_start_naming_the_key(tmp_path, caplog):
    from jobs.common import start_job

    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    settings = load_settings([], [f"output.root={a_file}/warehouse"])
    with pytest.raises(ConfigError, match=f"config key 'output.root' = '{a_file}/warehouse' is not a usable "
                                          f"directory: {a_file} is a file, not a directory"):
        settings.check_directories()
    with pytest.raises(ConfigError, match="'exports.dir' = .* is not a usable directory"):
        load_settings([], [f"output.root={tmp_path}/wh", f"exports.dir={a_file}"]).check_directories()
    # A directory yet to be created under a writable parent, a remote root and catalog tables pass.
    for sets in ([f"output.root={tmp_path}/new/wh"], ["output.root=s3://bucket/wh"], ["output.root=dbfs:/mnt/wh"],
                 [f"output.root={a_file}", "output.catalog=main", "output.schema=s", "recommend.model_dir=/tmp/m"]):
        load_settings([], sets).check_directories()

    # The job stops before its Spark session, with status 2 and the key named; nothing is created.
    with pytest.raises(SystemExit) as stop:
        start_job("ingest", "test", ["--set", f"output.root={a_file}/warehouse"])
    assert stop.value.code == 2
    assert "'output.root'" in caplog.text and "is not a usable directory" in caplog.text
    assert a_file.read_text() == "not a directory" and [p.name for p in tmp_path.iterdir()] == ["a-file"]


def _tiny_matrix(spark) -> dict:
    """The tables build_interactions leaves, in memory: 20 users with 5 of 11 items each, and a POST line
    (excluded by products.exclude_item_patterns) bought by one of them."""
    last = datetime(2026, 10, 1, 10)
    cells = [(u, (u + i) % 11, 1.0, 1, 1, last) for u in range(20) for i in range(5)] + [(0, 11, 8.0, 1, 1, last)]
    rows = {C.USER_INDEX: [(f"u{u:02d}", u) for u in range(20)],
            C.ITEM_INDEX: [(f"i{i:02d}", i) for i in range(11)] + [("POST", 11)], C.INTERACTIONS: cells, C.EVENTS: []}
    return {table.name: spark.createDataFrame(data, table.schema) for table, data in rows.items()}


@pytest.mark.slow  # two stages up to their checks: 12.7 s on the shared machine
def test_stage_parameters_beyond_the_data_fail_before_the_first_write(spark, tmp_path, context, monkeypatch):
    from jobs import recommend_items, segment_users
    from lib.platform.storage import Tables

    frames = _tiny_matrix(spark)
    monkeypatch.setattr(Tables, "require", lambda self, spark, table, producer: frames[table.name])
    root = tmp_path / "wh"
    ctx = context(f"output.root={root}", "segments.k=100", "recommend.top_n=12")
    with pytest.raises(ConfigError, match="'segments.k' must be <= 11: the matrix has 20 users and 11 items with "
                                          "interactions; got 100"):
        segment_users.run(ctx)
    with pytest.raises(ConfigError, match="'recommend.top_n' must be <= the 11 items that may be recommended "
                                          "\\(12 in item_index less 1 excluded .*got 12"):
        recommend_items.run(ctx)
    assert not root.exists()  # no table, model or report: nothing at all was written

    with pytest.raises(ConfigError, match="'segments.sweep_ks' must hold integers <= 11: the matrix has 20 users"):
        load_settings([], ["segments.k=3", "segments.sweep_ks=3,12"]).segments.check_against_matrix(20, 11)
