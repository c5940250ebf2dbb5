"""The embedded corpus miner on small source trees written by the tests, and on real stdlib folders."""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import inspect
import json
import os
import shutil
import sysconfig
from collections import Counter
from pathlib import Path

import pytest

from ds_train.data import delinearize
from ds_train.data.mine import add_arguments, mine, run

TOP_DOC = """Add two numbers together.

        Indented detail line.
    """

A_PY = f'''"""Module docstring (not a pair)."""
import functools


def top(a, b):
    """{TOP_DOC}"""
    return a + b  # trailing comment


def no_doc(x):
    return x


class Klass(Base):
    """A class with methods."""

    attr = 1

    def method(self, x):
        """Return x plus one, always."""
        return x + 1

    @functools.cache
    def cached(self):
        """A cached method here."""
        return self.attr


class Outer:
    """The outer class docstring."""

    class Inner:
        """The inner class docstring."""

        def deep(self):
            """A deeply nested method."""
            if self:
                return 1
            return 2


def outer_func():
    """Outer function docstring."""

    def inner():
        """Inner function docstring."""
        return 42

    return inner


def semi(): "Docstring on one line"; return 1


class Empty:
    """Only a docstring in here."""
'''

B_PY = '''def top(a, b):
    """A different docstring for the very same code."""
    return a + b
'''

LATIN_PY = (
    b'# -*- coding: latin-1 -*-\ndef caf():\n    """Caf\xe9 au lait, s\'il vous pla\xeet."""\n'
    b'    return "\xe9"\n'
)

QUALNAMES = [
    "top",
    "Klass",
    "Klass.method",
    "Klass.cached",
    "Outer",
    "Outer.Inner",
    "Outer.Inner.deep",
    "outer_func",
    "outer_func.<locals>.inner",
    "semi",
    "Empty",
]

# Hand-linearized code (docstring statement removed) of some of the definitions above.
EXPECTED_CODE = {
    "top": "def top ( a , b ) : <NEW_LINE> <INDENT> return a + b <NEW_LINE> <DEDENT>",
    "Klass.method": "def method ( self , x ) : <NEW_LINE> <INDENT> return x + 1 <NEW_LINE> <DEDENT>",
    "Klass.cached": "@ functools . cache <NEW_LINE> def cached ( self ) : <NEW_LINE> <INDENT> return self . attr "
    "<NEW_LINE> <DEDENT>",
    "Outer.Inner.deep": "def deep ( self ) : <NEW_LINE> <INDENT> if self : <NEW_LINE> <INDENT> return 1 <NEW_LINE> "
    "<DEDENT> return 2 <NEW_LINE> <DEDENT>",
    "semi": "def semi ( ) : return 1 <NEW_LINE>",
    "Empty": "class Empty : <NEW_LINE> <INDENT> pass <NEW_LINE> <DEDENT>",
}

NO_FILTERS = {"min_docstring_chars": 0, "min_code_tokens": 0}


def write_good_tree(root: Path) -> Path:
    """pkg/a.py, pkg/b.py (a duplicate of `top`), pkg/latin.py, plus folders that are not walked."""
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text(A_PY, encoding="utf-8")
    (root / "pkg" / "b.py").write_text(B_PY, encoding="utf-8")
    (root / "pkg" / "latin.py").write_bytes(LATIN_PY)
    for hidden in ("__pycache__", ".hidden"):
        (root / "pkg" / hidden).mkdir()
        (root / "pkg" / hidden / "c.py").write_text(B_PY.replace("top", "other"), encoding="utf-8")
    return root


def write_bad_tree(root: Path) -> Path:
    """One file for each file-level skip reason, and one good file."""
    root.mkdir(parents=True)
    (root / "good.py").write_text(B_PY, encoding="utf-8")
    (root / "bad_utf8.py").write_bytes(b'def f():\n    """\xff\xfe not utf-8 at all"""\n    return 1\n')
    (root / "bad_syntax.py").write_text("def f(:\n    return\n", encoding="utf-8")
    (root / "empty.py").write_text("", encoding="utf-8")
    (root / "blank.py").write_text("\n  \n", encoding="utf-8")
    os.mkfifo(root / "fifo.py")  # reading would block forever: must be skipped, not opened
    os.symlink("loop.py", root / "loop.py")  # a symlink to itself: ELOOP
    return root


def read_records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def qualname(record: dict[str, str]) -> str:
    return record["_id"].split("::")[1]


# --------------------------------------------------------------------------------------------


def test_pairs_ids_docstrings_and_code(tmp_path: Path) -> None:
    src = write_good_tree(tmp_path / "src")
    summary = mine([src], tmp_path / "out.jsonl", progress=False, **NO_FILTERS)
    records = read_records(tmp_path / "out.jsonl")
    assert [list(r) for r in records] == [["_id", "docstring", "code"]] * len(records)
    a_records = [r for r in records if r["_id"].startswith("pkg/a.py::")]
    assert [qualname(r) for r in a_records] == QUALNAMES
    by_name = {qualname(r): r for r in a_records}
    for name, code in EXPECTED_CODE.items():
        assert by_name[name]["code"] == code
    for record in records:
        digest = record["_id"].split("::")[2]
        assert digest == hashlib.sha1(record["code"].encode()).hexdigest()[:12]
    assert by_name["top"]["docstring"] == inspect.cleandoc(TOP_DOC).strip()
    latin = [r for r in records if r["_id"].startswith("pkg/latin.py::caf::")]
    assert latin[0]["docstring"] == "Café au lait, s'il vous plaît."
    assert '"é"' in latin[0]["code"]
    assert summary.kept == len(records) == len(QUALNAMES) + 1  # b.py's `top` is a duplicate
    assert summary.files == 3  # __pycache__ and hidden folders are not walked
    assert summary.skipped == Counter({"duplicate": 1, "no_docstring": 1})


def test_code_has_no_docstring_and_parses_back_to_the_definition(tmp_path: Path) -> None:
    src = write_good_tree(tmp_path / "src")
    mine([src / "pkg" / "a.py"], tmp_path / "out.jsonl", progress=False, **NO_FILTERS)
    records = read_records(tmp_path / "out.jsonl")
    definitions = {}
    for node in ast.walk(ast.parse(A_PY)):
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            definitions[node.name] = node
    for record in records:
        assert record["docstring"] not in record["code"]
        node = copy.copy(definitions[qualname(record).split(".")[-1]])
        node.body = node.body[1:] or [ast.Pass()]
        parsed = ast.parse(delinearize(record["code"])).body
        assert [ast.dump(n) for n in parsed] == [ast.dump(node)]
    assert records[0]["_id"].startswith("a.py::top::")  # a file root: ids relative to its folder


def test_ids_are_stable_across_runs_and_folders(tmp_path: Path) -> None:
    src = write_good_tree(tmp_path / "src")
    mine([src], tmp_path / "one.jsonl", progress=False)
    mine([src], tmp_path / "two.jsonl", progress=False)
    moved = tmp_path / "somewhere" / "else"
    shutil.copytree(src, moved)
    shutil.rmtree(src)
    mine([moved], tmp_path / "three.jsonl", progress=False)
    one = (tmp_path / "one.jsonl").read_bytes()
    assert one == (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "three.jsonl").read_bytes()
    assert len(one.splitlines()) > 0


def test_bad_files_are_skipped_and_counted(tmp_path: Path) -> None:
    bad = write_bad_tree(tmp_path / "bad")
    summary = mine([bad], tmp_path / "out.jsonl", progress=False, **NO_FILTERS)
    assert summary.skipped == Counter(
        {"unreadable_file": 2, "undecodable_file": 1, "syntax_error": 1, "empty_file": 2}
    )
    assert summary.files == 7
    assert [qualname(r) for r in read_records(tmp_path / "out.jsonl")] == ["top"]


def test_duplicates_keep_the_first_in_path_order(tmp_path: Path) -> None:
    src = write_good_tree(tmp_path / "src")
    (src / "pkg" / "0_first.py").write_text(B_PY, encoding="utf-8")
    summary = mine([src], tmp_path / "out.jsonl", progress=False, **NO_FILTERS)
    tops = [r for r in read_records(tmp_path / "out.jsonl") if qualname(r) == "top"]
    assert [r["_id"].split("::")[0] for r in tops] == ["pkg/0_first.py"]
    assert tops[0]["docstring"] == "A different docstring for the very same code."
    assert summary.skipped["duplicate"] == 2  # a.py's and b.py's copies


@pytest.mark.parametrize(
    ("knob", "value", "reason", "keeps"),
    [
        ("min_docstring_chars", 25, "docstring_too_short", lambda r: len(r["docstring"]) >= 25),
        ("max_docstring_chars", 25, "docstring_too_long", lambda r: len(r["docstring"]) <= 25),
        ("min_code_tokens", 12, "code_too_short", lambda r: len(r["code"].split()) >= 12),
        ("max_code_tokens", 14, "code_too_long", lambda r: len(r["code"].split()) <= 14),
    ],
)
def test_length_filters(tmp_path: Path, knob: str, value: int, reason: str, keeps) -> None:
    a_py = write_good_tree(tmp_path / "src") / "pkg" / "a.py"
    mine([a_py], tmp_path / "all.jsonl", progress=False, **NO_FILTERS)
    everything = read_records(tmp_path / "all.jsonl")
    summary = mine([a_py], tmp_path / "some.jsonl", progress=False, **{**NO_FILTERS, knob: value})
    expected = [r for r in everything if keeps(r)]
    assert read_records(tmp_path / "some.jsonl") == expected
    assert 0 < len(expected) < len(everything)
    assert summary.skipped[reason] == len(everything) - len(expected)


def test_limit_stops_after_that_many_pairs(tmp_path: Path) -> None:
    src = write_good_tree(tmp_path / "src")
    mine([src], tmp_path / "all.jsonl", progress=False, **NO_FILTERS)
    summary = mine([src], tmp_path / "three.jsonl", limit=3, progress=False, **NO_FILTERS)
    assert summary.limit_reached and summary.kept == 3
    assert read_records(tmp_path / "three.jsonl") == read_records(tmp_path / "all.jsonl")[:3]


def test_bad_arguments_raise_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="path does not exist: .*nowhere"):
        mine([tmp_path / "nowhere"], tmp_path / "out.jsonl", progress=False)
    with pytest.raises(
        ValueError, match="max_docstring_chars must be >= 0.*min_code_tokens must be <= max_code_tokens"
    ):
        mine([tmp_path], tmp_path / "out.jsonl", max_docstring_chars=-1, min_code_tokens=9, max_code_tokens=3)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        mine([tmp_path], tmp_path / "out.jsonl", limit=0)
    assert not (tmp_path / "out.jsonl").exists()


def test_real_stdlib_folders_round_trip(tmp_path: Path) -> None:
    """Every definition of real code (json, email) passes the AST round-trip check."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    summary = mine([stdlib / "json", stdlib / "email"], tmp_path / "out.jsonl", progress=False)
    assert summary.skipped["roundtrip_mismatch"] == 0
    assert summary.kept > 100
    ids = [r["_id"] for r in read_records(tmp_path / "out.jsonl")]
    assert len(set(ids)) == len(ids)
    assert ids[0].startswith("__init__.py::")  # json/__init__.py, relative to its root


def test_default_roots_are_the_interpreter_trees(tmp_path: Path) -> None:
    summary = mine(None, tmp_path / "out.jsonl", limit=20, progress=False)
    assert summary.kept == 20
    assert summary.roots[0] == Path(sysconfig.get_paths()["stdlib"])
    for record in read_records(tmp_path / "out.jsonl"):
        assert not record["_id"].startswith("/")
        assert (summary.roots[0] / record["_id"].split("::")[0]).is_file()


# --------------------------------------------------------------------------------------------
# the `ds-data mine` command
# --------------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ds-data mine")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_mines_and_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_good_tree(tmp_path / "src")
    out = tmp_path / "sub" / "pairs.jsonl"
    assert run(parse([str(src), "--out", str(out), "--min-code-tokens", "0", "--no-progress"])) == 0
    assert len(read_records(out)) == len(QUALNAMES) + 1
    assert capsys.readouterr().out.startswith(f"mined {len(QUALNAMES) + 1} pairs from 3 files")


def test_cli_missing_path_is_one_error_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(parse([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.jsonl"), "--no-progress"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "path does not exist" in err and "Traceback" not in err
    assert run(parse([str(tmp_path), "--out", str(tmp_path), "--no-progress"])) == 2
    assert "output path is a directory" in capsys.readouterr().err


def test_summary_prints_as_one_readable_line(tmp_path: Path) -> None:
    src = write_good_tree(tmp_path / "src")
    summary = mine([src], tmp_path / "pairs.jsonl", min_code_tokens=0, progress=False)
    text = f"corpus: {summary}"
    assert text.startswith(f"corpus: mined {summary.kept} pairs from 3 files") and "\n" not in text
    assert "MineSummary(" not in text and "Counter(" not in text and "PosixPath(" not in text


def test_prepare_keeps_the_mined_pairs_that_fit_a_row(tmp_path: Path) -> None:
    """The default job's corpus: a pool is mined, the tokenizer trained on it, and the pairs kept
    are the first ones whose layout fits ``seq_len`` tokens (counted here with the tokenizer itself)."""
    from ds_train.config import Config
    from ds_train.data.encode import Encoder
    from ds_train.data.sources import read_pairs
    from ds_train.data.tokenizer import load_tokenizer
    from ds_train.prepare import prepare

    cfg = Config()
    cfg.data.mine_paths = [str(Path(sysconfig.get_paths()["stdlib"]) / name) for name in ("json", "email")]
    cfg.data.mine_limit, cfg.data.seq_len, cfg.data.vocab_size = 120, 400, 800
    prepared = prepare(cfg, tmp_path, True)
    pool = list(read_pairs(tmp_path / "data" / "mined.jsonl"))
    kept = list(read_pairs(prepared.sources))
    assert len(pool) == 150
    encoder = Encoder(load_tokenizer(prepared.tokenizer_dir))
    lengths = {pid: len(ids) for pid, ids, _ in encoder.layout(pool)}
    fitting = [p.id for p in pool if lengths[p.id] <= 400]
    assert len(fitting) < len(pool)  # the filter has something to do at this row length
    assert [p.id for p in kept] == fitting[:120]
    again = prepare(cfg, tmp_path, True)  # a re-run reuses both
    assert list(read_pairs(again.sources)) == kept


def test_prepare_trains_the_tokenizer_on_every_source(tmp_path: Path) -> None:
    from ds_train.config import Config
    from ds_train.data.tokenizer import load_tokenizer, train_tokenizer
    from ds_train.prepare import prepare

    lines = (Path(__file__).parent / "assets" / "tiny_pairs.jsonl").read_text().splitlines()
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(lines[:150]) + "\n")
    second.write_text("\n".join(lines[150:]) + "\n")
    cfg = Config()
    cfg.data.source, cfg.data.vocab_size = f"{first},{second}", 700
    prepared = prepare(cfg, tmp_path / "run", True)
    assert prepared.sources == [str(first), str(second)]
    tok = load_tokenizer(prepared.tokenizer_dir)
    assert 690 <= len(tok) <= 700
    # Both files were read: the vocabulary differs from one trained on the first file alone.
    assert tok.get_vocab() != train_tokenizer(first, tmp_path / "first_only", 700).get_vocab()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"_id": "x", "docstring": "d", "code": "x = 1"}) + "\n")
    cfg.data.source = str(bad)
    with pytest.raises(ValueError, match="no usable .* pair"):
        prepare(cfg, tmp_path / "run2", True)
    assert not (tmp_path / "run2" / "tokenizer").exists()
