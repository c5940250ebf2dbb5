"""Reading pairs: every format, folders, and every class of bad input skipped and counted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ds_train.data.sources import Pair, SkipCounter, iter_file, read_pairs

GOOD = [
    {
        "_id": "a",
        "docstring": "Add two numbers.",
        "code": "def add ( a , b ) : <NEW_LINE> <INDENT> return a + b <NEW_LINE> <DEDENT>",
    },
    {
        "_id": "b",
        "docstring": "Negate.",
        "code": "def neg ( x ) : <NEW_LINE> <INDENT> return - x <NEW_LINE> <DEDENT>",
    },
    {
        "_id": 7,
        "docstring": "Seven.",
        "code": "def seven ( ) : <NEW_LINE> <INDENT> return 7 <NEW_LINE> <DEDENT>",
    },
]
EXPECTED = [
    Pair("a", GOOD[0]["docstring"], GOOD[0]["code"]),
    Pair("b", GOOD[1]["docstring"], GOOD[1]["code"]),
    Pair("7", GOOD[2]["docstring"], GOOD[2]["code"]),
]


def write_jsonl(path: Path, lines: list[bytes | str | dict]) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


def test_every_local_format_reads_the_same_pairs(tmp_path: Path) -> None:
    table = pa.Table.from_pylist([{**g, "_id": str(g["_id"])} for g in GOOD])
    write_jsonl(tmp_path / "p.jsonl", GOOD)
    (tmp_path / "p.json").write_text(json.dumps(GOOD))
    pq.write_table(table, tmp_path / "p.parquet")
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    for name in ("p.jsonl", "p.json", "p.parquet", "file.arrow", "stream.arrow"):
        skips = SkipCounter()
        assert list(read_pairs(tmp_path / name, skips)) == EXPECTED, name
        assert skips.total == 0


def test_folders_are_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b" / "inner").mkdir(parents=True)
    write_jsonl(tmp_path / "b" / "inner" / "2.jsonl", [GOOD[1]])
    write_jsonl(tmp_path / "b" / "1.jsonl", [GOOD[0]])
    write_jsonl(tmp_path / "a.jsonl", [GOOD[2]])
    (tmp_path / "notes.txt").write_text("not a pair file")
    assert [p.id for p in read_pairs(tmp_path)] == ["7", "a", "b"]


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    lines = [
        GOOD[0],
        "{not json",
        b'{"_id": "x", "docstring": "caf\xe9", "code": "def f ( ) : pass"}',  # latin-1, not UTF-8
        {"_id": "m", "docstring": "no code"},
        {"_id": "n", "docstring": 3, "code": "def f ( ) : pass"},
        {"_id": "e", "docstring": "   ", "code": "def f ( ) : pass"},
        {"_id": "c", "docstring": "Empty code.", "code": ""},
        '{"_id": "s", "docstring": "\\ud800", "code": "def f ( ) : pass"}',  # lone surrogate
        "[1, 2]",
        "",
        GOOD[1],
    ]
    skips = SkipCounter()
    pairs = list(read_pairs(write_jsonl(tmp_path / "bad.jsonl", lines), skips))
    assert pairs == EXPECTED[:2]
    assert skips.as_dict() == {
        "bad_utf8": 2,
        "empty_code": 1,
        "empty_docstring": 1,
        "malformed_json": 1,
        "missing_field": 1,
        "non_string_field": 1,
        "not_an_object": 1,
    }
    assert skips.report().startswith("skipped 8: ")


def test_positions_resume_a_file_where_it_stopped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD[0], "{bad", GOOD[1], GOOD[2]])
    positions = [pos for pos, _ in iter_file(path, SkipCounter())]
    assert positions == [0, 2, 3]
    assert [p.id for _, p in iter_file(path, SkipCounter(), start=2)] == ["b", "7"]
    assert [p.id for _, p in iter_file(path, SkipCounter(), keep=lambda pos: pos % 2 == 1)] == ["7"]


def unreadable_folder(tmp_path: Path) -> Path:
    """A folder that cannot be listed: mode 000 where permissions apply, else a root-proof /proc one."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0)
    for candidate in (folder, Path("/proc/1/map_files")):
        try:
            os.listdir(candidate)
        except OSError:
            return candidate
    raise AssertionError("found no folder this process cannot list")


def test_missing_unreadable_and_corrupt_files_are_counted(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not parquet at all")
    (tmp_path / "garbage.arrow").write_bytes(b"ARROW1\x00\x00 nope")
    (tmp_path / "broken.json").write_text('[{"_id": "z", ')
    pq.write_table(
        pa.Table.from_pylist([{**g, "_id": str(g["_id"])} for g in GOOD]), tmp_path / "whole.parquet"
    )
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    sources = [
        good,
        tmp_path / "missing.jsonl",
        unreadable_folder(tmp_path),
        tmp_path / "garbage.parquet",
        tmp_path / "garbage.arrow",
        tmp_path / "broken.json",
        tmp_path / "truncated.parquet",
    ]
    skips = SkipCounter()
    try:
        assert list(read_pairs(sources, skips)) == EXPECTED
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert skips.as_dict() == {"corrupt_file": 4, "missing_file": 1, "unreadable": 1}


def test_nothing_readable_is_one_clear_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "bad.jsonl", ["{nope", {"_id": "q"}])
    with pytest.raises(ValueError, match=r"no valid pairs in .*skipped 2"):
        list(read_pairs(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="no valid pairs.*missing_file=1"):
        list(read_pairs(tmp_path / "absent"))


def test_hub_name_offline_fails_with_one_line_naming_local_files() -> None:
    with pytest.raises(ValueError) as err:
        list(read_pairs("huawei-noah/python_text2code"))
    message = str(err.value)
    assert "\n" not in message
    assert "huawei-noah/python_text2code" in message and "local" in message
