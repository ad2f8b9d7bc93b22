"""The product catalog: validation into products / products_quarantine, exclusions, and that excluded
items never reach any recommendations list."""
from __future__ import annotations

from pathlib import Path

import pytest
from pyspark.sql import functions as F

from jobs import ingest_products, recommend_items
from lib.features.interactions import write_matrix_tables
from lib.ingest.products import (CatalogError, catalog_from_events, excluded_items, merge_catalogs, read_catalog,
                                 recommendable_items, validate_products)
from lib.platform import catalog as C
from lib.sample.repeat import POSTAGE_ID, RepeatSpec, generate_repeat_purchases

CATALOG = """item_id,name,category,price,available,recommendable
A1,Mug,kitchen,4.5,true,true
A2,Plate,kitchen,abc,yes,1
A3,Bowl,kitchen,-2,true,TRUE
A4,Cup,kitchen,3.0,maybe,true
A5,Lamp,home,20,true,nope
,Nameless,home,1.0,true,true
A6,Chair,home,40,true,true
A6,Chair v2,home,40,true,false
A7,Vase,home,,false,
A8,Rug,,12.5,,no
"""


def _write(tmp_path: Path, text: str, name: str = "items.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_validation_quarantines_with_reasons_and_keeps_items_conservatively(spark, tmp_path: Path):
    location = _write(tmp_path, CATALOG)
    products, quarantine = validate_products(read_catalog(spark, location, "csv"), location, "r1")
    got = {r["item_id"]: r for r in products.collect()}
    assert sorted(got) == ["A1", "A2", "A3", "A4", "A5", "A6", "A7", "A8"]   # one row per usable id
    assert (got["A1"]["name"], got["A1"]["price"], got["A1"]["available"], got["A1"]["recommendable"]) == \
        ("Mug", 4.5, True, True)
    assert got["A2"]["price"] is None and got["A2"]["recommendable"] is True      # "abc": no price; "1": true
    assert got["A3"]["price"] is None                                            # negative price dropped
    assert got["A4"]["available"] is False                                       # unreadable flag: false
    assert got["A5"]["recommendable"] is False
    assert got["A6"]["recommendable"] is False and got["A6"]["name"] is None     # copies disagree
    assert got["A6"]["price"] == 40.0                                            # copies agree
    assert got["A7"]["available"] is False and got["A7"]["recommendable"] is True  # blank flag: true
    assert got["A8"]["recommendable"] is False and got["A8"]["category"] is None
    assert {r["run_id"] for r in got.values()} == {"r1"}

    reasons = sorted((r["reason"], r["raw"]) for r in quarantine.collect())
    assert [reason for reason, _ in reasons] == ["bad_available", "bad_price", "bad_recommendable",
                                                 "duplicate_item_id", "duplicate_item_id", "missing_item_id",
                                                 "negative_price"]
    assert any('"name":"Nameless"' in raw for reason, raw in reasons if reason == "missing_item_id")
    rows = quarantine.collect()
    assert all(r["source_file"].endswith("items.csv") and r["detail"] for r in rows)


def test_catalog_without_item_id_fails_naming_the_column_and_file(spark, tmp_path: Path):
    location = _write(tmp_path, "sku,name\nA1,Mug\n", "bad.csv")
    with pytest.raises(CatalogError, match=r"input.items .*bad.csv: the catalog has no item_id column"):
        validate_products(read_catalog(spark, location, "csv"), location, "r1")


def test_a_catalog_with_its_own_column_names_is_mapped_by_products_columns(spark, tmp_path: Path):
    # The grocer's catalog shape: product_id, product_type, product_category, and columns nobody maps.
    location = _write(tmp_path, "product_id,brand,product_type,product_category\n"
                                "1095275,National,FLUID MILK WHITE ONLY,FLUID MILK PRODUCTS\n"
                                "26081,National,,\n", "product.csv")
    mapping = {"product_id": "item_id", "product_type": "name", "product_category": "category"}
    products, quarantine = validate_products(read_catalog(spark, location, "csv", columns=mapping), location, "r1")
    assert sorted((r["item_id"], r["name"], r["category"]) for r in products.collect()) == \
        [("1095275", "FLUID MILK WHITE ONLY", "FLUID MILK PRODUCTS"), ("26081", None, None)]
    assert quarantine.count() == 0
    with pytest.raises(CatalogError, match=r"product.csv: products.columns names sku, not in the catalog"):
        read_catalog(spark, location, "csv", columns={"sku": "item_id"})
    with pytest.raises(CatalogError, match=r"products.columns maps onto product_id, which the catalog already has"):
        read_catalog(spark, location, "csv", columns={"brand": "product_id"})


def test_exclusions_from_flags_and_patterns(spark):
    items = spark.createDataFrame([(i,) for i in ("10001", "POST", "m", "M", "gift_0001_20", "DOT", "POSTAGE",
                                                  "A1", "A2", "A3")], "item_id string")
    products = spark.createDataFrame(
        [("A1", True, True, "DAIRY"), ("A2", False, True, "DAIRY"), ("A3", True, False, "DAIRY"),
         ("Z9", False, False, None), ("F1", True, True, " FUEL "), ("F2", True, True, "FUEL OIL")],
        "item_id string, available boolean, recommendable boolean, category string")
    patterns = ["POST", "DOT", "(?i)m", "(?i)gift_.*"]
    got = {r["item_id"]: r["reason"] for r in excluded_items(products, items, patterns).collect()}
    assert got == {"POST": "pattern", "m": "pattern", "M": "pattern", "gift_0001_20": "pattern", "DOT": "pattern",
                   "A2": "unavailable", "A3": "not_recommendable", "Z9": "unavailable"}
    # A category matches in full, trimmed: FUEL OIL stays, a category rule comes before the flags.
    by_category = {r["item_id"]: r["reason"] for r in excluded_items(products, items, [], ["FUEL", "DAIRY"]).collect()}
    assert by_category == {"F1": "category", "A1": "category", "A2": "category", "A3": "category",
                           "Z9": "unavailable"}
    # Patterns match the whole id: POSTAGE stays; without a catalog only patterns apply.
    assert {r["item_id"] for r in recommendable_items(products, items, patterns).collect()} == {"10001", "POSTAGE",
                                                                                                 "A1"}
    assert {r["item_id"] for r in excluded_items(None, items, ["POST"]).collect()} == {"POST"}
    assert excluded_items(None, items, []).count() == 0


def test_a_catalog_from_events_takes_each_items_latest_given_value_and_counts_conflicts(spark):
    """Only valid events describe an item; per attribute the latest event that gives a value wins."""
    events = spark.createDataFrame([
        ("A", "2024-01-01 10:00:00", "Mug", "4.50", None, "f1"),
        ("A", "2024-01-02 10:00:00", "Mug large", None, None, "f1"),  # newest name; gives no price
        ("A", "2024-01-03 10:00:00", "Mug XL", "9.99", "negative_quantity", "f1"),  # quarantined: ignored
        ("B", "2024-01-01 10:00:00", "  ", "3", None, "f2"),
        ("B", "2024-01-01 11:00:00", None, "3", None, "f2"),
        (None, "2024-01-01 10:00:00", "Orphan", "1", None, "f1"),
    ], "item_id string, event_ts string, name string, price string, reason string, source_file string") \
        .withColumn("event_ts", F.to_timestamp("event_ts"))
    rows = {r["item_id"]: r.asDict() for r in catalog_from_events(events, ["name", "price"]).collect()}
    assert rows == {
        "A": {"item_id": "A", "_source_file": "f1", "name": "Mug large", "price": "4.50",
              "_conflicts_name": True, "_conflicts_price": False},
        "B": {"item_id": "B", "_source_file": "f2", "name": None, "price": "3",
              "_conflicts_name": False, "_conflicts_price": False},
    }


def test_a_catalog_files_row_wins_over_the_derived_one(spark):
    columns = "item_id string, name string"
    preferred = spark.createDataFrame([("A", "Mug (catalog)")], columns)
    fallback = spark.createDataFrame([("A", "MUG"), ("B", "BOWL")], columns)
    assert sorted(map(tuple, merge_catalogs(preferred, fallback).collect())) == [("A", "Mug (catalog)"),
                                                                                  ("B", "BOWL")]


@pytest.mark.slow  # a whole stage or model fit: over 9 s
def test_stage_without_catalog_writes_nothing_and_says_so(spark, tmp_path: Path, context):
    ctx = context(f"output.root={tmp_path / 'wh'}")
    result = ingest_products.run(ctx)
    assert "input.items and input.item_columns are empty" in result.message and result.rows_out == 0
    assert not ctx.tables.exists(spark, C.PRODUCTS)

    ctx = context(f"output.root={tmp_path / 'wh'}", f"input.items={_write(tmp_path, CATALOG)}")
    result = ingest_products.run(ctx)
    assert ctx.tables.read(spark, C.PRODUCTS).count() == 8 == result.rows_out
    assert ctx.tables.read(spark, C.PRODUCTS_QUARANTINE).count() == 7
    assert result.rows_in == 10 and result.counts["quarantined_duplicate_item_id"] == 2


SETS = ("spark.shuffle_partitions=2", "recommend.top_n=8", "recommend.k_values=8", "recommend.tune_k=8",
        "recommend.min_history=3", "recommend.als.search=grid", "recommend.als.ranks=8",
        "recommend.als.reg_params=0.1", "recommend.als.alphas=10.0", "recommend.als.max_iter=5")


@pytest.mark.slow
def test_excluded_items_never_appear_in_any_list(spark, tmp_path: Path, context):
    """Postage lines on a third of the purchases, and the most bought items marked unavailable or not
    recommendable in the catalog: none of them is in any strategy's list, and the lists stay full."""
    events = generate_repeat_purchases(spark, RepeatSpec(users=150, items=80, days=120, segments=2,
                                                         postage_share=0.3, seed=4))
    top = [r["item_id"] for r in events.where(F.col("item_id") != POSTAGE_ID).groupBy("item_id").count()
           .orderBy(F.desc("count"), "item_id").limit(4).collect()]
    catalog = "item_id,available,recommendable\n" + "\n".join(
        [f"{top[0]},false,true", f"{top[1]},true,false", f"{top[2]},no,yes", f"{top[3]},true,true"]) + "\n"
    # Similar items (by ALS factors, the default) must honour the exclusions too.
    ctx = context(f"output.root={tmp_path / 'wh'}", f"input.items={_write(tmp_path, catalog)}", *SETS)
    tables = ctx.tables
    tables.overwrite(events.withColumn("event_date", F.to_date("event_ts")).withColumn("ingest_run_id", F.lit("x")),
                     C.EVENTS)
    events = tables.read(spark, C.EVENTS)
    write_matrix_tables(spark, tables, events, ctx.settings.interactions.weights, 30.0)
    ingest_products.run(ctx)

    result = recommend_items.run(ctx)
    recs = tables.read(spark, C.RECOMMENDATIONS).cache()
    forbidden = {POSTAGE_ID, top[0], top[1], top[2]}
    assert recs.where(F.col("item_id").isin(*forbidden)).count() == 0
    assert result.counts["excluded_items"] == 4
    assert {r[0] for r in recs.select("strategy").distinct().collect()} == {"discover", "buy_again", "blended"}
    # Without the exclusions postage and the top items would be everywhere: the lists are not empty of them
    # by accident. The allowed top item is still recommended.
    assert recs.where(F.col("item_id") == top[3]).count() > 0
    per_list = recs.where("strategy != 'buy_again'").groupBy("user_id", "strategy").count()
    assert per_list.where("count < 8").count() == 0
    metrics = tables.read(spark, C.REC_METRICS)
    assert metrics.where(F.col("model") == "buy_again").count() > 0
    recs.unpersist()
    similar = tables.read(spark, C.ITEM_SIMILARITIES)
    assert {tuple(r) for r in similar.select("method").distinct().collect()} == {("als_cosine",)}
    assert similar.where(F.col("item_id").isin(*forbidden) | F.col("similar_item_id").isin(*forbidden)).count() == 0
    assert similar.where("item_id = similar_item_id or customers is not null or score > 1.000001").count() == 0
    assert similar.select("item_id").distinct().count() == result.counts["similar_items"] >= 70
