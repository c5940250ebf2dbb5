"""`ds-eval` on hand-made samples: pass@k against hand-computed values, results files,
incremental scoring (both protocols), report.json (protocol, settings, atomic replacement) and
one-line errors on bad input."""

import json
from pathlib import Path

import pytest

from eval import protocol
from eval.cli import main
from eval.incremental import subtasks
from eval.problems import load_problems
from tests.test_eval_generate import make_export

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
    argv = ["score", "--protocol", "standard", "--problems", str(PROBLEMS), "--samples", str(samples)]
    assert main([*argv, "--k", "1,2,5,10"]) == 0
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
        main(
            ["score", "--protocol", "standard", "--problems", str(PROBLEMS), "--samples", str(samples)]
            + ["--k", "1", "--incremental"]
        )
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
    assert (
        main(["score", "--protocol", "standard", "--problems", str(PROBLEMS), "--samples", str(samples)]) == 0
    )
    summary = last_json(capsys)
    assert summary["skipped_samples"] == 3 and summary["samples"] == 1 and summary["pass@1"] == 1.0


def test_mrpt_incremental_report_has_macro_micro_and_replaces_report_atomically(allowed, tmp_path, capsys):
    tasks = protocol.incremental_problems(protocol.load_problems(PROBLEMS))
    he0 = [t for t in tasks if protocol.base_of(t.task_id) == "HumanEval/0"]
    assert len(he0) == 7  # the empty prefix and 6 prefixes of its 7 lines
    # HumanEval/0: every sub-task solved once out of two; HumanEval/2 solved; HumanEval/38 fails
    # (its helper encode_cyclic is not part of an mrpt program, as in the original)
    rows = [(t.task_id, t.solution) for t in tasks] + [(t.task_id, "    return None\n") for t in he0]
    samples = write_samples(tmp_path / "samples.jsonl", rows)
    report = tmp_path / "report.json"
    report.write_text("old")
    argv = ["score", "--problems", str(PROBLEMS), "--samples", str(samples), "--k", "1", "--incremental"]
    assert main(argv) == 0
    saved = json.loads(report.read_text())
    assert saved["protocol"] == "mrpt" and saved["timeout"] == 5.0 and saved["incremental"] is True
    assert saved["per_problem"]["HumanEval/38"] == {"n": 1, "c": 0, "pass@1": 0.0}
    # macro: 9 tasks (7 at 1/2, HumanEval/2 at 1, HumanEval/38 at 0); micro: 3 problems (7/14, 1, 0)
    assert saved["macro"]["pass@1"] == pytest.approx((7 * 0.5 + 1 + 0) / 9)
    assert saved["micro"]["pass@1"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert saved["base"]["pass@1"] == pytest.approx((0.5 + 1 + 0) / 3)  # the empty prefixes alone
    assert last_json(capsys)["micro"] == saved["micro"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == [
        "report.json",
        "samples.jsonl",
        "samples.jsonl_results.jsonl",
    ]


def test_generation_records_the_protocol_and_every_setting(allowed, tmp_path):
    model = tmp_path / "model"
    make_export(model)
    out = tmp_path / "run"
    argv = [
        "mbpp",
        "--model",
        str(model),
        "--out",
        str(out),
        "--limit",
        "2",
        "--no-score",
        "--max-length",
        "64",
        "--batch-size",
        "100",
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"] == "mrpt" and report["split"] == "test" and report["benchmark"] == "mbpp"
    settings = report["settings"]
    assert (settings["n"], settings["temperature"], settings["top_p"], settings["top_k"], settings["seed"]) == (
        200, 0.95, 0.8, None, 42
    )  # fmt: skip
    assert settings["max_length"] == 64 and settings["greedy"] is False and settings["dtype"] == "float32"
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {(s["task_id"], s["index"]) for s in lines} == {
        (f"MBPP/{i}", j) for i in (11, 12) for j in range(200)
    }
    # scoring later keeps what generation recorded, and adds the scores (10 samples keep it short)
    few = out / "samples.jsonl"
    few.write_text("".join(line + "\n" for line in few.read_text().splitlines()[:10]))
    argv = ["score", "--problems", "mbpp", "--samples", str(out / "samples.jsonl"), "--k", "1,10"]
    assert main([*argv, "--workers", "2"]) == 0
    rescored = json.loads((out / "report.json").read_text())
    assert rescored["settings"] == settings and rescored["model"] == str(model)
    assert rescored["samples"] == 10 and rescored["unsampled_problems"] == 499


def test_standard_protocol_settings_and_greedy(allowed, tmp_path):
    model = tmp_path / "model"
    make_export(model)
    out = tmp_path / "run"
    argv = ["humaneval", "--model", str(model), "--out", str(out), "--limit", "1", "--no-score"]
    assert main([*argv, "--protocol", "standard", "--greedy", "--max-new-tokens", "8"]) == 0
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["n"] == 1 and settings["greedy"] is True and settings["seed"] == 0
    assert settings["max_new_tokens"] == 8 and settings["max_length"] is None  # an explicit count wins


@pytest.mark.parametrize(
    "argv",
    [
        ["score", "--problems", "missing.jsonl", "--samples", "s.jsonl"],
        ["score", "--problems", str(PROBLEMS), "--samples", "missing.jsonl"],
        ["score", "--problems", str(PROBLEMS), "--samples", "s.jsonl", "--k", "0"],
        ["score", "--problems", str(PROBLEMS), "--samples", "s.jsonl", "--timeout", "1e19"],
        ["score", "--problems", str(PROBLEMS), "--samples", "s.jsonl", "--workers", "0"],
        ["score", "--problems", str(PROBLEMS), "--samples", "s.jsonl", "--split", "validation"],
        ["score", "--problems", "mbpp", "--samples", "s.jsonl", "--split", "nope"],
        ["humaneval", "--model", "no-such-dir", "--out", "o", "--greedy"],
        ["humaneval", "--model", "no-such-dir", "--out", "o", "--temperature", "0"],
        ["humaneval", "--model", "no-such-dir", "--out", "o", "--limit", "0"],
        ["mbpp", "--model", "no-such-dir", "--out", "o", "--max-length", "1"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(allowed, tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.jsonl").write_text("")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ds-eval: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "report.json").exists()


def test_code_execution_needs_opt_in_once(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DS_TRAIN_ALLOW_CODE_EXECUTION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    samples = write_samples(tmp_path / "s.jsonl", [("HumanEval/2", "    return number % 1.0\n")])
    argv = ["score", "--problems", str(PROBLEMS), "--samples", str(samples), "--k", "1", "--protocol", "standard"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "--allow-code-execution" in err[0] and "DS_TRAIN_ALLOW_CODE_EXECUTION=1" in err[0]
    )
    assert not (tmp_path / "s.jsonl_results.jsonl").exists()
    assert main([*argv, "--allow-code-execution"]) == 0
    assert main(argv) == 0  # remembered for this machine
    assert last_json(capsys)["pass@1"] == 1.0


def test_loss_subcommand_is_dispatched(capsys):
    with pytest.raises(SystemExit) as info:
        main(["loss", "--help"])
    assert info.value.code == 0
    assert "ds-eval loss" in capsys.readouterr().out
