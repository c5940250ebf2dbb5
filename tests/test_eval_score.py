"""`ds-eval score` at its edges: each bad flag or file is one line and exit 2, bad sample lines are
skipped and counted, and the results file is replaced only by a complete one."""

import json
import logging
from pathlib import Path

import pytest

from eval import sandbox
from eval.cli import main

PROBLEMS = Path(__file__).parent / "assets" / "eval" / "humaneval_3.jsonl"
RIGHT = ("HumanEval/2", "    return number % 1.0\n")


@pytest.fixture
def allowed(monkeypatch, tmp_path):
    monkeypatch.setenv("DS_TRAIN_ALLOW_CODE_EXECUTION", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def fresh_mechanism():
    """The isolation check is cached per process: start and end these tests without it."""
    sandbox.mechanism.cache_clear()
    yield
    sandbox.mechanism.cache_clear()


def write_samples(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in rows))
    return path


def score_argv(samples: Path, *extra: str) -> list[str]:
    return ["score", "--problems", str(PROBLEMS), "--samples", str(samples), "--k", "1", *extra]


def refused_in_one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ds-eval: "), err
    return err[0]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--timeout", "1e19"], "--timeout"),
        (["--timeout", "inf"], "--timeout"),
        (["--timeout", "nan"], "--timeout"),
        (["--timeout", "0"], "--timeout"),
        (["--timeout", "-3"], "--timeout"),
        (["--workers", "0"], "--workers"),
        (["--workers", "-2"], "--workers"),
    ],
)
def test_unbounded_timeouts_and_worker_counts_are_refused(allowed, tmp_path, capsys, flags, words):
    samples = write_samples(tmp_path / "s.jsonl", [RIGHT])
    assert words in refused_in_one_line(capsys, score_argv(samples, *flags))
    assert not Path(f"{samples}_results.jsonl").exists()


def test_samples_of_unknown_tasks_only_are_refused(allowed, tmp_path, capsys):
    samples = write_samples(tmp_path / "s.jsonl", [("Nope/1", "x"), ("Nope/2", "y")])
    line = refused_in_one_line(capsys, score_argv(samples))
    assert "no sample of these problems" in line and "Nope/1" in line
    assert not Path(f"{samples}_results.jsonl").exists()


def test_a_directory_given_as_samples_file_is_refused(allowed, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert "is a directory" in refused_in_one_line(capsys, score_argv(tmp_path / "d"))


def test_invalid_utf8_lines_are_skipped_counted_and_named(allowed, tmp_path, capsys, caplog):
    good = json.dumps({"task_id": RIGHT[0], "completion": RIGHT[1]}).encode() + b"\n"
    samples = tmp_path / "s.jsonl"
    samples.write_bytes(good + b'{"task_id": "HumanEval/2", "completion": "\xff\xfe"}\n' + good)
    with caplog.at_level(logging.WARNING):
        assert main(score_argv(samples)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["samples"], summary["skipped_samples"], summary["pass@1"]) == (2, 1, 1.0)
    assert f"{samples}:2: not UTF-8; skipped" in caplog.text


def test_results_replace_the_old_file_only_when_complete(allowed, tmp_path, capsys):
    samples = write_samples(tmp_path / "s.jsonl", [RIGHT])
    results = Path(f"{samples}_results.jsonl")
    results.write_text("old results\n")
    write_samples(samples, [("Nope/1", "x")])
    refused_in_one_line(capsys, score_argv(samples))
    assert results.read_text() == "old results\n"
    write_samples(samples, [RIGHT])
    assert main(score_argv(samples)) == 0
    assert [json.loads(line)["passed"] for line in results.read_text().splitlines()] == [True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "report.json", "s.jsonl", results.name]


def test_no_isolation_tool_refuses_unless_unsafe_flag(
    allowed, fresh_mechanism, tmp_path, capsys, monkeypatch
):
    """PATH without bwrap and unshare: one line saying why and how; the unsafe flag still scores."""
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    samples = write_samples(tmp_path / "s.jsonl", [RIGHT])
    line = refused_in_one_line(capsys, score_argv(samples))
    assert "cannot isolate generated programs" in line and "--unsafe-no-isolation" in line
    assert not Path(f"{samples}_results.jsonl").exists()
    assert main(score_argv(samples, "--unsafe-no-isolation")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sandbox"].startswith("NO ISOLATION") and summary["pass@1"] == 1.0
