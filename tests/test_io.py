"""The one place for file I/O (bench.core.io): strict JSON, JSONL that survives a kill, corpora."""

from __future__ import annotations

import json
import math

import pytest

from bench.core.errors import BenchError
from bench.core.io import append_jsonl, read_corpus, read_json, read_jsonl, write_json_atomic


def test_json_is_strict_non_finite_floats_become_null(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic(path, {"x": float("nan"), "y": [1.5, float("inf")], "z": (1, 2)})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard {c}")) == \
        {"x": None, "y": [1.5, None], "z": [1, 2]}
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, renamed


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(BenchError, match="not found"):
        read_json(tmp_path / "missing.json")
    with pytest.raises(BenchError, match="is a directory"):
        read_json(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ')
    with pytest.raises(BenchError, match=r"bad.json is not valid JSON \(line 1"):
        read_json(bad)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": 1}).encode())
    assert read_json(bom) == {"a": 1}


def test_jsonl_torn_last_line_is_dropped_and_repaired_only_on_request(tmp_path):
    path = tmp_path / "c.jsonl"
    for i in range(2):
        append_jsonl(path, {"i": i, "v": math.nan})
    with open(path, "a") as f:
        f.write('{"i": 2, "v"')
    assert read_jsonl(path) == [{"i": 0, "v": None}, {"i": 1, "v": None}]
    assert path.read_text().endswith('"v"')  # a reader changes nothing
    assert len(read_jsonl(path, repair=True)) == 2
    assert path.read_text().endswith("}\n")
    path.write_text('{"i": 0}\n{oops\n{"i": 2}\n')
    with pytest.raises(BenchError, match="line 2 is not valid JSON"):
        read_jsonl(path)
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_one_corpus_reader(tmp_path):
    paragraphs = tmp_path / "p.txt"
    paragraphs.write_text("one\nstill one\n\ntwo\n")
    assert read_corpus(paragraphs) == ["one\nstill one", "two"]
    lines = tmp_path / "l.txt"
    lines.write_text("one\ntwo\n")
    assert read_corpus(lines) == ["one", "two"]
    jsonl = tmp_path / "j.jsonl"
    jsonl.write_text('{"text": "one"}\n{"text": "  "}\n{"text": "two"}\n')
    assert read_corpus(jsonl) == ["one", "two"]
    jsonl.write_text('{"text": 3}\n')
    with pytest.raises(BenchError, match="line 1 has no string \"text\" field"):
        read_corpus(jsonl)
    with pytest.raises(BenchError, match="my corpus file not found"):
        read_corpus(tmp_path / "absent.txt", "my corpus file")
    with pytest.raises(BenchError, match="is a directory"):
        read_corpus(tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(BenchError, match="holds no documents"):
        read_corpus(tmp_path / "empty.txt")
