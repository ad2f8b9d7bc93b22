"""A corpus of bad input: every class lands in events_quarantine with its own reason, no valid row is
lost, the reconciliation holds from independent counts, and the tables are readable afterwards."""
from pathlib import Path

from jobs.common import run_stage
from lib.ingest import events as ingest
from lib.ingest import readers
from lib.platform import catalog as C
import pytest

pytestmark = pytest.mark.slow  # runs whole stages on generated data

HEADER = "event_id,user_id,item_id,event_type,event_ts,quantity,revenue"
TS = "2026-10-01T10:00:00Z"
VALID = {  # event_id -> line
    "v1": f"v1,u1,i1,view,{TS},,",
    "v2": f'v2,"u2",i1,purchase,{TS},2,12.5',
    "v3": 'v3,"\u00a0u3\u200b","item, with comma",click,2026-10-01 12:00:00+02:00,,',
    "v4": "v4,u4,i4,purchase,1759312800,1,9.99",
}
BAD = {  # expected reason -> line(s) that must get it
    "malformed_record": [f"m1,u1,i1,view,{TS}", f"m2,u1,i1,view,{TS},,,extra", f'm3,u1,"i1,view,{TS},,'],
    "missing_user_id": [f"r1,,i1,view,{TS},,"],
    "blank_user_id": [f"r2,\u00a0\t\u200b,i1,view,{TS},,"],
    "missing_item_id": [f"r3,u1,,view,{TS},,"],
    "blank_item_id": [f"r4,u1,\u0000\u2003,view,{TS},,"],
    "missing_event_type": [f"r5,u1,i1,,{TS},,"],
    "unknown_event_type": [f"r6,u1,i1,teleport,{TS},,"],
    "missing_event_ts": ["r7,u1,i1,view,,,"],
    "unparseable_event_ts": ["r8,u1,i1,view,next tuesday,,"],
    "timestamp_unit_mismatch": ["r9,u1,i1,view,1759312800000,,"],
    "too_early_event_ts": ["r10,u1,i1,view,0001-01-01T00:00:00Z,,", "r11,u1,i1,view,20240501,,"],
    "future_event_ts": ["r12,u1,i1,view,2099-01-01T00:00:00Z,,"],
    "unparseable_quantity": [f"r13,u1,i1,purchase,{TS},two,5"],
    "non_finite_quantity": [f"r14,u1,i1,purchase,{TS},NaN,5"],
    "negative_quantity": [f"r15,u1,i1,purchase,{TS},-1,5"],
    "unparseable_revenue": [f"r16,u1,i1,purchase,{TS},1,5 EUR"],
    "non_finite_revenue": [f"r17,u1,i1,purchase,{TS},1,Infinity"],
    "negative_revenue": [f"r18,u1,i1,purchase,{TS},1,-5"],
    "event_id_conflict": ["v1,u1,i2,view,2026-10-02T10:00:00Z,,"],  # v1 again, a later payload
}
DUPLICATE = VALID["v4"]
INVALID_UTF8 = b"r19,u\xff\xfe1,i1,view,2026-10-01T10:00:00Z,,"


def _write_corpus(path: Path) -> int:
    lines = [HEADER, *VALID.values(), *[line for group in BAD.values() for line in group], DUPLICATE]
    data = ("\n".join(lines) + "\n").encode("utf-8") + INVALID_UTF8 + b"\n\n\r\n"  # blank lines are no records
    path.write_bytes(data)
    return len(lines) - 1 + 1  # every line but the header, and the invalid line


def _sets(tmp_path: Path, path: Path, *extra: str) -> list[str]:
    return [f"input.events={path}", f"output.root={tmp_path / 'wh'}", "spark.shuffle_partitions=2",
            "ingest.now=2026-11-01T00:00:00+00:00", "ingest.max_quarantine_share=1.0", *extra]


def test_csv_corpus_every_class_has_its_reason(spark, tmp_path, context, delta_rs_rows):
    path = tmp_path / "corpus.csv"
    records = _write_corpus(path)
    ctx = context(*_sets(tmp_path, path))
    result = run_stage(ctx, "ingest")

    events = {r["event_id"]: r for r in ctx.tables.read(spark, C.EVENTS).collect()}
    assert set(events) == set(VALID)  # no valid row lost
    assert events["v3"]["user_id"] == "u3" and events["v3"]["item_id"] == "item, with comma"
    assert (events["v2"]["quantity"], events["v2"]["revenue"]) == (2.0, 12.5)
    assert events["v1"]["item_id"] == "i1"  # the stored-first payload of v1, not the later one

    quarantine = ctx.tables.read(spark, C.EVENTS_QUARANTINE).collect()
    got: dict[str, list[str]] = {}
    for row in quarantine:
        got.setdefault(row["reason"], []).append(row["raw_line"])
    expected = {reason: sorted(lines) for reason, lines in BAD.items()}
    assert {reason: sorted(lines) for reason, lines in got.items() if reason != "invalid_encoding"} == expected
    assert len(got["invalid_encoding"]) == 1 and got["invalid_encoding"][0].startswith("r19,u\ufffd")
    encoding_row = next(r for r in quarantine if r["reason"] == "invalid_encoding")
    assert "FFFE" in encoding_row["detail"]  # the original bytes, as hex
    malformed = {r["raw_line"]: r["detail"] for r in quarantine if r["reason"] == "malformed_record"}
    assert malformed[BAD["malformed_record"][0]] == "expected 7 fields, found 5"
    assert set(got) | {"invalid_encoding"} <= set(ingest.QUARANTINE_REASONS)
    assert set(ingest.QUARANTINE_REASONS) - set(got) == {"malformed_json"}  # JSON only, tested below

    assert result.rows_in == records  # records, not lines: the header and blank lines are none
    assert result.rows_out == len(VALID) and result.counts["duplicates"] == 1
    assert result.counts["quarantined"] == len(quarantine) == sum(len(v) for v in BAD.values()) + 1
    assert result.rows_in == result.rows_out + result.counts["quarantined"] + result.counts["duplicates"]
    for reason, lines in BAD.items():
        assert result.counts[f"reason.{reason}"] == len(lines)
    # Every table opens with delta-rs with Spark's rows (and the same event instants), none empty.
    rows = delta_rs_rows(tmp_path / "wh")
    assert {"events", "events_quarantine", "pipeline_runs"} <= set(rows)
    assert [name for name, count in rows.items() if count == 0] == []


JSON_LINES = [
    '{"event_id": "j1", "user_id": "u1", "item_id": "i1", "event_type": "purchase", "event_ts": 1759312800, '
    '"quantity": 2, "revenue": 9.5}',
    '{"event_id": "j2", "user_id": 17, "item_id": "i1", "event_type": "view", "event_ts": "2026-10-01T10:00:00+00:00",'
    ' "extra": {"nested": [1, 2]}}',
    '{"event_id": "j3", "user_id": "u3", "item_id": ',  # cut off
    '{"event_id": "j4", "user_id": "u4", "user_id": "u5", "item_id": "i1", "event_type": "view", '
    '"event_ts": "2026-10-01T10:00:00Z"}',  # duplicate key
    '["j5", "u1", "i1"]',  # not an object
    '{"event_id": "j6", "item_id": "i1", "event_type": "view", "event_ts": "2026-10-01T10:00:00Z"}',
]


def test_json_lines_one_bad_line_does_not_fail_the_file(spark, tmp_path, context):
    path = tmp_path / "clicks.jsonl"
    path.write_bytes(("\n".join(JSON_LINES) + "\n\n").encode() + b'{"event_id": "j7", "user_id": "\xff"}\n')
    ctx = context(*_sets(tmp_path, path))
    result = run_stage(ctx, "ingest")
    events = {r["event_id"]: r for r in ctx.tables.read(spark, C.EVENTS).collect()}
    assert set(events) == {"j1", "j2"}
    assert (events["j1"]["quantity"], events["j1"]["revenue"], events["j2"]["user_id"]) == (2.0, 9.5, "17")
    quarantine = ctx.tables.read(spark, C.EVENTS_QUARANTINE).collect()
    got = {r["raw_line"][:30]: (r["reason"], r["detail"]) for r in quarantine}
    assert got[JSON_LINES[2][:30]] == ("malformed_json", "not one JSON object")
    assert got[JSON_LINES[3][:30]] == ("malformed_json", "a key appears more than once")
    assert got[JSON_LINES[4][:30]] == ("malformed_json", "not one JSON object")
    assert got[JSON_LINES[5][:30]][0] == "missing_user_id"
    assert [r["reason"] for r in quarantine if "j7" in r["raw_line"]] == ["invalid_encoding"]
    assert (result.rows_in, result.rows_out, result.counts["quarantined"]) == (7, 2, 5)


def test_multiline_csv_reads_a_quoted_line_break_as_one_record(spark, tmp_path, context):
    path = tmp_path / "multi.csv"
    path.write_text(f'{HEADER}\nv1,u1,"item\nwith a line break",view,{TS},,\nv2,u2,i2,view,{TS},,\n'
                    f"m1,u1,i1,view,{TS}\n")
    strict = context(*_sets(tmp_path, path))
    lines = run_stage(strict, "ingest")  # line by line, the quoted line break splits v1 into two bad records
    assert (lines.rows_in, lines.rows_out, lines.counts["reason.malformed_record"]) == (4, 1, 3)

    multi = context(*_sets(tmp_path / "m", path, "ingest.csv_multiline=true"))
    result = run_stage(multi, "ingest")
    events = {r["event_id"]: r["item_id"] for r in multi.tables.read(spark, C.EVENTS).collect()}
    # One record; the id's line break is white space inside an id, made a plain space (docs/ingest.md#ids).
    assert events == {"v1": "item with a line break", "v2": "i2"}
    assert (result.rows_in, result.rows_out, result.counts["reason.malformed_record"]) == (3, 2, 1)


def test_latin1_input_is_decoded_when_declared(spark, tmp_path, context):
    path = tmp_path / "latin1.csv"
    path.write_bytes(f"{HEADER}\nv1,Zoë,Crème brûlée,view,{TS},,\n".encode("iso-8859-1"))
    as_utf8 = context(*_sets(tmp_path, path))
    assert run_stage(as_utf8, "ingest").counts["reason.invalid_encoding"] == 1
    latin1 = context(*_sets(tmp_path / "l", path, "ingest.encoding=iso-8859-1"))
    assert run_stage(latin1, "ingest").rows_out == 1
    row = latin1.tables.read(spark, C.EVENTS).first()
    assert (row["user_id"], row["item_id"]) == ("Zoë", "Crème brûlée")


def test_a_directory_of_csv_files_with_headers_bom_and_crlf(spark, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "part-1.csv").write_bytes(f"\ufeff{HEADER}\r\nv1,u1,i1,view,{TS},,\r\nv2,u2,i2,view,{TS},,\r\n".encode())
    (folder / "part-2.csv").write_bytes(f"{HEADER}\nv3,u3,i3,view,{TS},,\n\nm1,u1\n".encode())
    raw = readers.read_raw(spark, str(folder), "csv")
    rows = {r["event_id"] or r["_raw_line"]: (r["_read_error"], r["_source_file"].rsplit("/", 1)[-1])
            for r in raw.select("event_id", "_raw_line", "_read_error", "_source_file").collect()}
    assert rows == {"v1": (None, "part-1.csv"), "v2": (None, "part-1.csv"), "v3": (None, "part-2.csv"),
                    "m1,u1": ("malformed_record", "part-2.csv")}
