"""Source presets (conf/sources/*.toml): a file in each public shape, with its own column names, event
names and time format, goes through the ingest stage with one --conf and no conversion."""
from datetime import datetime, timezone
from pathlib import Path

import pytest

from jobs.common import BASE_CONFIG, load_settings, run_stage
from jobs import ingest_products
from lib.platform import catalog as C

pytestmark = pytest.mark.slow  # runs whole stages on generated data

SOURCES = BASE_CONFIG.parent / "sources"


def _ingest(context, tmp_path: Path, name: str, text: str, preset: str, *sets: str):
    path = tmp_path / name
    path.write_text(text)
    ctx = context(f"input.events={path}", f"output.root={tmp_path / 'wh'}", "spark.shuffle_partitions=2",
                  "ingest.now=2026-11-01T00:00:00+00:00", *sets, conf=(str(SOURCES / preset),))
    result = run_stage(ctx, "ingest")
    assert result.rows_in == result.rows_out + result.counts["quarantined"] + result.counts["duplicates"]
    events = {r["user_id"] + "/" + r["item_id"] + "/" + r["event_type"]: r
              for r in ctx.tables.read(ctx.spark, C.EVENTS).collect()}
    reasons = {r["raw_line"]: r["reason"] for r in ctx.tables.read(ctx.spark, C.EVENTS_QUARANTINE).collect()}
    return result, events, reasons


def test_every_preset_is_a_valid_overlay():
    presets = sorted(SOURCES.glob("*.toml"))
    assert {p.stem for p in presets} >= {"retailrocket", "rees46", "invoice_lines", "completejourney"}
    for preset in presets:
        settings = load_settings([str(preset)], [])
        assert settings.input.columns, preset.name


RETAILROCKET = """timestamp,visitorid,event,itemid,transactionid
1433221332117,257597,view,355908,
1433224214164,992329,addtocart,248676,
1433221999827,111016,transaction,318965,4000
1433221955914,483717,remove,253185,
1433221999,992329,view,248676,
"""


def test_retailrocket_events(spark, tmp_path, context):
    result, events, reasons = _ingest(context, tmp_path, "events.csv", RETAILROCKET, "retailrocket.toml")
    assert (result.rows_in, result.rows_out) == (5, 3)
    assert set(events) == {"257597/355908/view", "992329/248676/add_to_cart", "111016/318965/purchase"}
    assert events["257597/355908/view"]["event_ts"] == datetime(2015, 6, 2, 5, 2, 12, 117000)
    assert reasons == {"1433221955914,483717,remove,253185,": "unknown_event_type",
                       "1433221999,992329,view,248676,": "timestamp_unit_mismatch"}  # seconds in a ms file


REES46 = """event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session
2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76fde-8bb3-4e00-8c23-a032dfed738c
2019-10-01 00:00:05 UTC,cart,3900821,2053013552326770905,appliances.environment.water_heater,aqua,33.20,554748717,9333dfbd-b87a-4708-9857-6336556b0fcc
2019-10-01 00:01:10 UTC,purchase,3900821,2053013552326770905,appliances.environment.water_heater,aqua,33.20,554748717,9333dfbd-b87a-4708-9857-6336556b0fcc
2019-10-01 00:02:00 UTC,remove_from_cart,3900821,2053013552326770905,appliances.environment.water_heater,aqua,33.20,554748717,9333dfbd-b87a-4708-9857-6336556b0fcc
"""


def test_rees46_events(spark, tmp_path, context):
    result, events, reasons = _ingest(context, tmp_path, "2019-Oct.csv", REES46, "rees46.toml")
    assert (result.rows_in, result.rows_out) == (4, 3)
    assert set(events) == {"541312140/44600062/view", "554748717/3900821/add_to_cart",
                           "554748717/3900821/purchase"}
    purchase = events["554748717/3900821/purchase"]
    assert (purchase["event_ts"], purchase["revenue"]) == (datetime(2019, 10, 1, 0, 1, 10), 33.2)
    assert list(reasons.values()) == ["unknown_event_type"]


INVOICES = """InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,12/1/2010 8:26,2.55,17850.0,United Kingdom
536365,71053,"WHITE METAL LANTERN, LARGE",6,12/1/2010 8:26,3.39,17850.0,United Kingdom
536366,22633,HAND WARMER UNION JACK,6,12/1/2010 8:28,1.85,,United Kingdom
C536379,D,Discount,-1,12/1/2010 9:41,27.5,14527.0,United Kingdom
536367,84879,ASSORTED COLOUR BIRD ORNAMENT,32,12/1/2010 8:34,1.69,13047.0,United Kingdom
536367,84879,ASSORTED COLOUR BIRD ORNAMENT,32,12/1/2010 8:34,1.69,13047.0,United Kingdom
"""


def test_invoice_lines(spark, tmp_path, context):
    result, events, reasons = _ingest(context, tmp_path, "online_retail.csv", INVOICES, "invoice_lines.toml")
    assert (result.rows_in, result.rows_out, result.counts["duplicates"]) == (6, 3, 1)
    assert set(events) == {"17850/85123A/purchase", "17850/71053/purchase", "13047/84879/purchase"}
    line = events["17850/71053/purchase"]
    assert (line["event_ts"], line["quantity"]) == (datetime(2010, 12, 1, 8, 26), 6.0)
    assert line["revenue"] == pytest.approx(6 * 3.39)
    assert events["13047/84879/purchase"]["revenue"] == pytest.approx(32 * 1.69)
    assert sorted(reasons.values()) == ["missing_user_id", "negative_quantity"]
    assert reasons["C536379,D,Discount,-1,12/1/2010 9:41,27.5,14527.0,United Kingdom"] == "negative_quantity"


NEXT_DAY_INVOICES = """InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
536401,85123A,WHITE HANGING HEART T-LIGHT HOLDER,2,12/2/2010 10:05,2.95,17850.0,United Kingdom
536400,85123A,CREAM HANGING HEART T-LIGHT HOLDER,6,12/2/2010 9:00,2.55,13047.0,United Kingdom
536402,21730,GLASS STAR FROSTED T-LIGHT HOLDER,6,12/2/2010 10:10,abc,13047.0,United Kingdom
536403,22752,,2,12/2/2010 11:00,7.65,13047.0,United Kingdom
"""


def test_invoice_lines_describe_their_products(spark, tmp_path, context):
    """The preset's Description and UnitPrice become products: names and prices of the valid lines only,
    each item's latest value, differing values counted; the next day's file updates the items it holds
    and keeps the others."""
    def products(name: str, text: str):
        path = tmp_path / name
        path.write_text(text)
        ctx = context(f"input.events={path}", f"output.root={tmp_path / 'wh'}", "spark.shuffle_partitions=2",
                      "ingest.now=2026-11-01T00:00:00+00:00", conf=(str(SOURCES / "invoice_lines.toml"),))
        result = ingest_products.run(ctx)
        rows = {r["item_id"]: (r["name"], r["price"], r["available"], r["recommendable"])
                for r in ctx.tables.read(spark, C.PRODUCTS).collect()}
        return result, rows, ctx.tables.read(spark, C.PRODUCTS_QUARANTINE).collect()

    result, rows, quarantine = products("online_retail.csv", INVOICES)
    # 22633 (no customer) and D (a cancellation) are quarantined events: they describe nothing.
    assert rows == {"85123A": ("WHITE HANGING HEART T-LIGHT HOLDER", 2.55, True, True),
                    "71053": ("WHITE METAL LANTERN, LARGE", 3.39, True, True),
                    "84879": ("ASSORTED COLOUR BIRD ORNAMENT", 1.69, True, True)}
    assert (result.rows_in, result.rows_out, result.counts["items_from_events"]) == (3, 3, 3)
    assert result.counts["attribute_conflicts.name"] == result.counts["attribute_conflicts.price"] == 0
    assert quarantine == []

    result, rows, quarantine = products("online_retail_next_day.csv", NEXT_DAY_INVOICES)
    # 21730's price "abc" makes its revenue unparseable: a quarantined event, so it describes nothing.
    assert rows == {"85123A": ("WHITE HANGING HEART T-LIGHT HOLDER", 2.95, True, True),  # the 10:05 line's
                    "22752": (None, 7.65, True, True),
                    "71053": ("WHITE METAL LANTERN, LARGE", 3.39, True, True),
                    "84879": ("ASSORTED COLOUR BIRD ORNAMENT", 1.69, True, True)}
    assert result.counts["items_kept_from_earlier_runs"] == 2 and result.rows_out == 4
    assert (result.counts["attribute_conflicts.name"], result.counts["attribute_conflicts.price"]) == (1, 1)
    assert quarantine == []


COMPLETE_JOURNEY = """household_id,store_id,basket_id,product_id,quantity,sales_value,retail_disc,coupon_disc,coupon_match_disc,week,transaction_timestamp
900,330,31198570044,1095275,1,0.5,0.0,0.0,0.0,1,2017-01-01 11:53:26
900,330,31198570047,9878513,1,0.99,0.1,0.0,0.0,1,2017-01-01 12:10:28
1228,406,31198655051,1041453,0,0.0,0.0,0.0,0.0,1,2017-01-01 12:26:30
1228,406,31198655051,1041453,0,0.0,0.0,0.0,0.0,1,2017-01-01 12:26:30
"""


def test_complete_journey_transactions(spark, tmp_path, context):
    result, events, reasons = _ingest(context, tmp_path, "transactions.csv", COMPLETE_JOURNEY, "completejourney.toml")
    # A line repeating another exactly (household, product, quantity, value, second) counts once.
    assert (result.rows_in, result.rows_out, result.counts["duplicates"]) == (4, 3, 1)
    assert set(events) == {"900/1095275/purchase", "900/9878513/purchase", "1228/1041453/purchase"}
    line = events["900/9878513/purchase"]
    assert (line["event_ts"], line["quantity"], line["revenue"]) == (datetime(2017, 1, 1, 12, 10, 28), 1.0, 0.99)
    assert events["1228/1041453/purchase"]["quantity"] == 0.0  # a zero-quantity line is a real receipt line
    assert reasons == {}


def _retailrocket_file(path: Path, users: int = 200, items: int = 40, seed: int = 3) -> int:
    """A RetailRocket-shaped events.csv: epoch ms, numeric visitor ids, view / addtocart / transaction over
    60 days ending 2015-09-18, each visitor mostly on one of four item groups; returns the row count."""
    import random

    rng = random.Random(seed)
    end_ms = int(datetime(2015, 9, 18, tzinfo=timezone.utc).timestamp() * 1000)
    lines, transaction = ["timestamp,visitorid,event,itemid,transactionid"], 4000
    for user in range(users):
        group = user % 4
        for _ in range(rng.randint(6, 20)):
            item = 355000 + (group * 10 + rng.randrange(10) if rng.random() < 0.8 else rng.randrange(items))
            ts = end_ms - rng.randrange(60 * 86_400_000)
            event = rng.choices(["view", "addtocart", "transaction"], [0.8, 0.12, 0.08])[0]
            transaction += event == "transaction"
            lines.append(f"{ts},{257000 + user},{event},{item},{transaction if event == 'transaction' else ''}")
    lines += [f"{end_ms - 5000},257001,remove,355001,", f"{end_ms // 1000},257002,view,355002,"]
    path.write_text("\n".join(lines) + "\n")
    return len(lines) - 1


@pytest.mark.slow
def test_a_retailrocket_file_runs_the_whole_pipeline_with_one_conf(spark, tmp_path):
    """Issue 13: a file in the preset's native shape (epoch ms, visitorid, addtocart / transaction) goes
    through every stage with --conf conf/sources/retailrocket.toml and no conversion."""
    from pyspark.sql import functions as F

    from jobs import run_pipeline
    from jobs.stages import PIPELINE

    path, root = tmp_path / "events.csv", tmp_path / "wh"
    rows = _retailrocket_file(path)
    cheap = ["spark.shuffle_partitions=2", "segments.k=3", "segments.max_iter=10", "segments.stability_check=false",
             "recommend.als.ranks=8", "recommend.als.max_candidates=1", "recommend.als.max_iter=5",
             "scores.models=logistic_regression", "recommend.evaluate=false"]
    args = ["--conf", str(SOURCES / "retailrocket.toml"), "--set", f"input.events={path}",
            "--set", f"output.root={root}", "--run-id", "rr"]
    assert run_pipeline.main(args + [a for pair in cheap for a in ("--set", pair)]) == "rr"

    read = lambda name: spark.read.format("delta").load(str(root / name))  # noqa: E731
    runs = {r["stage"]: r for r in read("pipeline_runs").where("run_id = 'rr'").collect()}
    assert sorted(runs) == sorted(stage.name for stage in PIPELINE)  # no generate_events: the file is the input
    assert {stage: r["status"] for stage, r in runs.items() if r["status"] != "success"} == {}
    ingest = runs["ingest"]
    assert (ingest["rows_in"], ingest["rows_out"], ingest["counts"]["quarantined"]) == (rows, rows - 2, 2)
    assert (ingest["counts"]["reason.unknown_event_type"], ingest["counts"]["reason.timestamp_unit_mismatch"]) == (1, 1)
    events = read("events")
    assert {r["event_type"] for r in events.select("event_type").distinct().collect()} == \
        {"view", "add_to_cart", "purchase"}
    assert events.agg(F.min("event_ts")).first()[0].year == 2015
    recommendations = read("recommendations").where("run_id = 'rr'")
    users = read("user_index").count()
    assert users == 200
    assert recommendations.where("strategy = 'discover'").select("user_id").distinct().count() == users
    assert recommendations.where("item_id NOT LIKE '355%'").count() == 0
