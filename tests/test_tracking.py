"""MLflow tracking's names and store (the logged run itself: tests/test_pipeline.py)."""
from __future__ import annotations

import pytest

from jobs.common import load_settings
from lib.platform.config import ConfigError
from lib.platform.storage import Tables
from lib.platform.tracking import flat_params, local_dir, metric_name, tracking_uri


def test_names_are_ones_mlflow_accepts():
    assert metric_name("churn", "gbt+isotonic", "roc_auc") == "churn.gbt_isotonic.roc_auc"
    assert metric_name("shipped_blended", "ndcg", "at_10") == "shipped_blended.ndcg.at_10"


def test_a_settings_section_becomes_dotted_parameters():
    params = flat_params(load_settings([], ["recommend.top_n=7"]).recommend, "recommend.")
    assert params["recommend.top_n"] == "7"
    assert params["recommend.als.ranks"] == str(load_settings([], []).recommend.als.ranks)   # nested section
    assert all(len(value) <= 500 for value in params.values())


def test_the_store_is_sqlite_under_a_local_root_and_none_for_catalog_tables(tmp_path):
    settings = load_settings([], [])
    assert tracking_uri(settings, Tables(root=str(tmp_path))) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri(settings, Tables(root="", catalog="main", schema="ep")) is None
    assert tracking_uri(settings, Tables(root="s3a://bucket/ep")) is None
    assert tracking_uri(load_settings([], ["tracking.tracking_uri=databricks"]), Tables(root="s3a://b/ep")) == "databricks"


@pytest.mark.parametrize("prefix", ["", "email personalization", "main..ep"])
def test_a_registry_prefix_mlflow_would_refuse_is_named(prefix):
    with pytest.raises(ConfigError, match="tracking.registry_prefix"):
        load_settings([], [f'tracking.registry_prefix="{prefix}"'])


def test_a_saved_model_is_local_only_where_its_directory_is_on_this_machine(tmp_path):
    assert local_dir(str(tmp_path)) == local_dir(tmp_path.as_uri()) == local_dir(f"file:{tmp_path}") == tmp_path
    assert local_dir(str(tmp_path / "absent")) is None
    assert local_dir("s3a://bucket/models/als/run-1") is None
