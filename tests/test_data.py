import csv
import json

import pytest

from influcoder.config import DataConfig
from influcoder.data import DataError, LoadReport, content_id, iter_records, load_records

ROWS = [
    {"id": "a", "prompt": "What is 2+2?", "response": "4.", "topic": "math"},
    {"id": "b", "prompt": "Name a colour.", "response": "Blue.", "topic": "art"},
    {"text": "Just some text.", "topic": "misc"},
]


def write(tmp_path, fmt, rows=ROWS):
    if fmt == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        p = tmp_path / "d.json"
        p.write_text(json.dumps(rows, indent=2))
    elif fmt == "csv":
        p = tmp_path / "d.csv"
        keys = ["id", "prompt", "response", "text", "topic"]
        with p.open("w", newline="") as fh:
            w = csv.DictWriter(fh, keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in keys})
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "d.parquet"
        keys = sorted({k for r in rows for k in r})  # one schema for all rows (missing = null)
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), p)
    else:
        import datasets

        p = tmp_path / "hf"
        keys = sorted({k for r in rows for k in r})
        datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows]).save_to_disk(str(p))
    return p


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "hf"])
def test_each_format(tmp_path, fmt):
    recs = list(iter_records(write(tmp_path, fmt)))
    assert [r.id for r in recs[:2]] == ["a", "b"]
    assert recs[0].prompt == "What is 2+2?" and recs[0].response == "4." and recs[0].meta["topic"] == "math"
    assert recs[2].text == "Just some text." and not recs[2].is_pair
    assert recs[2].id == content_id(None, None, "Just some text.")


def test_content_ids_are_stable(tmp_path):
    a = list(iter_records(write(tmp_path, "jsonl")))
    b = list(iter_records(write(tmp_path, "parquet")))
    assert a[2].id == b[2].id and a[2].id.startswith("h-")


def test_field_mapping(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"uid": 7, "q": "Why?", "a": "Because."}) + "\n")
    (r,) = iter_records(p, DataConfig(id_field="uid", prompt_field="q", response_field="a"))
    assert (r.id, r.prompt, r.response, r.meta) == ("7", "Why?", "Because.", {})


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "invalid JSON"),
        ('{"prompt": "only a prompt"}', "'response' is missing"),
        ('{"topic": "x"}', "needs 'prompt' \\+ 'response' or a non-empty 'text'"),
        ('{"text": 5}', "'text' must be a string"),
        ('["a", "list"]', "expected an object"),
        ('{"id": [1], "text": "x"}', "'id' must be a string or integer"),
    ],
)
def test_malformed_jsonl_row_names_file_and_line(tmp_path, line, match):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=match) as e:
        list(iter_records(p))
    assert f"{p}:3:" in str(e.value)


def test_malformed_csv_and_json_name_the_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("id,text\na,hello\nb,hi,extra\n")
    with pytest.raises(DataError, match=f"{p}:3"):
        list(iter_records(p))
    q = tmp_path / "bad.json"
    q.write_text('[\n  {"text": "ok"},\n  {"topic": "no text"}\n]\n')
    with pytest.raises(DataError, match=f"{q}:3"):
        list(iter_records(q))


def test_duplicate_ids_are_an_error(tmp_path):
    p = write(tmp_path, "jsonl", ROWS + [{"id": "a", "text": "again"}])
    with pytest.raises(DataError, match="duplicate id 'a' \\(first at .*d.jsonl:1\\)"):
        list(iter_records(p))


def test_skip_bad_rows_counts_and_never_drops_silently(tmp_path):
    p = tmp_path / "mixed.jsonl"
    lines = ['{"id": "1", "text": "ok"}', "{broken", '{"id": "2"}', '{"id": "1", "text": "dup"}', '{"id": "3", "text": "ok"}']
    p.write_text("\n".join(lines) + "\n")
    report = LoadReport()
    recs = list(iter_records(p, DataConfig(skip_bad_rows=True), report))
    assert [r.id for r in recs] == ["1", "3"]
    assert report.n_rows == 2 and report.n_bad == 3
    assert report.n_rows + report.n_bad == len(lines)
    assert any(":2:" in m for m in report.bad) and any("duplicate" in m for m in report.bad)


def test_limit_and_unknown_format(tmp_path):
    recs, rep = load_records(DataConfig(path=str(write(tmp_path, "jsonl")), limit=2))
    assert len(recs) == 2 and rep.n_rows == 2
    with pytest.raises(DataError, match="unknown data format"):
        list(iter_records(tmp_path / "x.txt" if (tmp_path / "x.txt").write_text("hi") else None))


def test_demo_source():
    recs, rep = load_records(DataConfig(path="demo", demo={"n": 40, "planted_share": 0.1}))
    assert len(recs) == 40 and rep.n_rows == 40
    assert sum(r.meta["planted"] for r in recs) == 4


def test_shared_dolly_loads(shared_data):
    recs, rep = load_records(DataConfig(path=str(shared_data / "dolly_open_qa" / "dolly_open_qa.jsonl")))
    assert rep.n_bad == 0 and len(recs) == 2617 and all(r.is_pair for r in recs)
    assert recs[0].id.startswith("dolly-openqa-") and recs[0].meta["category"] == "open_qa"
