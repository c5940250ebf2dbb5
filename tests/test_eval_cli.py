"""`ds-eval score` on hand-made samples: pass@k against hand-computed values, results files,
incremental scoring, the code-execution opt-in and one-line errors on bad input."""

import json
from pathlib import Path

import pytest

from eval.cli import main
from eval.incremental import subtasks
from eval.problems import load_problems

PROBLEMS = Path(__file__).parent / "assets" / "eval" / "humaneval_3.jsonl"


@pytest.fixture
def allowed(monkeypatch, tmp_path):
    monkeypatch.setenv("DS_TRAIN_ALLOW_CODE_EXECUTION", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def write_samples(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in rows))
    return path


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_score_pass_at_k_hand_computed(allowed, tmp_path, capsys):
    he0, he2, _ = load_problems(PROBLEMS)
    wrong = "    return None\n"
    rows = (
        [("HumanEval/0", he0.solution)] * 2
        + [("HumanEval/0", wrong)] * 3
        + [("HumanEval/2", he2.solution)] * 5
        + [("HumanEval/38", wrong)] * 5
    )
    samples = write_samples(tmp_path / "samples.jsonl", rows)
    assert main(["score", "--problems", str(PROBLEMS), "--samples", str(samples), "--k", "1,2,5,10"]) == 0
    summary = last_json(capsys)
    # HumanEval/0: n=5, c=2 -> pass@1 = 2/5, pass@2 = 1 - C(3,2)/C(5,2) = 0.7, pass@5 = 1
    assert summary["per_problem"]["HumanEval/0"] == pytest.approx(
        {"n": 5, "c": 2, "pass@1": 0.4, "pass@2": 0.7, "pass@5": 1.0}
    )
    assert summary["per_problem"]["HumanEval/2"]["pass@1"] == 1.0
    assert summary["per_problem"]["HumanEval/38"]["pass@5"] == 0.0
    assert summary["pass@1"] == pytest.approx((0.4 + 1 + 0) / 3)
    assert summary["pass@2"] == pytest.approx((0.7 + 1 + 0) / 3)
    assert "pass@10" not in summary  # k > n is not reported
    results = [
        json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()
    ]
    assert [r["passed"] for r in results] == [True] * 2 + [False] * 3 + [True] * 5 + [False] * 5
    assert results[0]["result"] == "passed" and results[2]["result"].startswith("failed")
    assert results[0]["completion"] == he0.solution


def test_score_incremental_subtasks(allowed, tmp_path, capsys):
    he0 = load_problems(PROBLEMS)[0]
    subs = subtasks(he0)
    rows = [(s.task_id, s.solution) for s in subs] + [
        ("HumanEval/0", he0.solution),
        ("HumanEval/2", "    pass\n"),
    ]
    samples = write_samples(tmp_path / "inc.jsonl", rows)
    assert (
        main(["score", "--problems", str(PROBLEMS), "--samples", str(samples), "--k", "1", "--incremental"])
        == 0
    )
    summary = last_json(capsys)
    assert summary["problems"] == len(subs) + 2 and summary["passed"] == len(subs) + 1
    assert summary["pass@1"] == pytest.approx((len(subs) + 1) / (len(subs) + 2))
    assert summary["base"]["pass@1"] == pytest.approx(0.5)  # the original tasks alone
    assert summary["unsampled_problems"] == 1  # HumanEval/38 had no samples


def test_malformed_and_unknown_samples_are_skipped_and_counted(allowed, tmp_path, capsys):
    he0 = load_problems(PROBLEMS)[0]
    samples = tmp_path / "s.jsonl"
    samples.write_text(
        json.dumps({"task_id": "HumanEval/0", "completion": he0.solution})
        + "\n"
        + "{not json\n"
        + json.dumps({"task_id": "HumanEval/0"})
        + "\n"
        + json.dumps({"task_id": "Nope/1", "completion": ""})
        + "\n"
    )
    assert main(["score", "--problems", str(PROBLEMS), "--samples", str(samples), "--k", "1"]) == 0
    summary = last_json(capsys)
    assert summary["skipped_samples"] == 3 and summary["samples"] == 1 and summary["pass@1"] == 1.0


@pytest.mark.parametrize(
    "argv",
    [
        ["score", "--problems", "missing.jsonl", "--samples", "s.jsonl"],
        ["score", "--problems", str(PROBLEMS), "--samples", "missing.jsonl"],
        ["score", "--problems", str(PROBLEMS), "--samples", "s.jsonl", "--k", "0"],
        ["humaneval", "--model", "no-such-dir", "--out", "o", "--greedy"],
        ["humaneval", "--model", "no-such-dir", "--out", "o", "--temperature", "0"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(allowed, tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.jsonl").write_text("")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ds-eval: error:") and len(err.splitlines()) == 1


def test_code_execution_needs_opt_in_once(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DS_TRAIN_ALLOW_CODE_EXECUTION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    samples = write_samples(tmp_path / "s.jsonl", [("HumanEval/2", "    return number % 1.0\n")])
    argv = ["score", "--problems", str(PROBLEMS), "--samples", str(samples), "--k", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "--allow-code-execution" in err[0] and "DS_TRAIN_ALLOW_CODE_EXECUTION=1" in err[0]
    )
    assert not (tmp_path / "s.jsonl_results.jsonl").exists()
    assert main([*argv, "--allow-code-execution"]) == 0
    assert main(argv) == 0  # remembered for this machine
    assert last_json(capsys)["pass@1"] == 1.0


def test_loss_subcommand_is_dispatched_lazily(capsys):
    with pytest.raises(SystemExit) as info:
        main(["loss", "--help"])
    assert info.value.code == 0
    assert "ds-eval loss" in capsys.readouterr().out
