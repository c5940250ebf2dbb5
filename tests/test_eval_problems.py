"""Benchmark loading, the prompt split for MRPT prompting, and the incremental sub-task builder."""

import ast
import json
from pathlib import Path

import pytest

from ds_train.data.codec import linearize
from eval.incremental import incremental_problems, subtasks
from eval.problems import (
    MBPP_FILE,
    completion_after,
    humaneval_problem,
    load_benchmark,
    load_problems,
    mbpp_problem,
    reference_lin,
)

ASSETS = Path(__file__).parent / "assets" / "eval"


def test_bundled_benchmarks_have_their_sizes():
    assert len(load_benchmark("humaneval")) == 164
    mbpp = load_benchmark("mbpp")
    assert [p.task_id for p in mbpp] == [f"MBPP/{i}" for i in range(11, 511)]
    assert (MBPP_FILE.parent / "MBPP_SOURCE.md").is_file()


def test_format_detection_on_fixtures():
    he = load_problems(ASSETS / "humaneval_3.jsonl")
    mb = load_problems(ASSETS / "mbpp_3.jsonl")
    assert [p.task_id for p in he] == ["HumanEval/0", "HumanEval/2", "HumanEval/38"]
    assert [p.task_id for p in mb] == ["MBPP/11", "MBPP/17", "MBPP/367"]
    assert all(p.check == f"check({p.entry_point})" for p in he)
    assert all(p.check == "" for p in mb)


def test_humaneval_split_at_entry_point():
    p = {q.task_id: q for q in load_problems(ASSETS / "humaneval_3.jsonl")}["HumanEval/38"]
    assert p.entry_point == "decode_cyclic"
    assert p.header == "def decode_cyclic(s: str):\n"
    assert p.docstring == "takes as input string encoded with encode_cyclic function. Returns decoded string."
    assert "def encode_cyclic(s: str):" in p.preamble and "decode_cyclic" not in p.preamble
    # the SIGNATURE part is the linearized helper code followed by the entry header
    assert p.signature_lin == linearize(p.preamble) + " def decode_cyclic ( s : str ) :"
    # preamble + header + docstring block is the prompt again
    assert p.prompt.startswith(p.preamble + p.header)


def test_humaneval_multiline_header_and_decorator():
    record = {
        "task_id": "T/1",
        "entry_point": "f",
        "test": "def check(c):\n    assert c(1, 2) == 3\n",
        "prompt": "import math\n\n@staticmethod\ndef f(a: int,\n      b: int) -> int:\n    '''Add a and b.'''\n",
        "canonical_solution": "    return a + b\n",
    }
    p = humaneval_problem(record)
    assert p.preamble == "import math\n\n"
    assert p.header == "@staticmethod\ndef f(a: int,\n      b: int) -> int:\n"
    assert p.docstring == "Add a and b."
    assert (
        p.signature_lin
        == "import math <NEW_LINE> @ staticmethod <NEW_LINE> def f ( a : int , b : int ) -> int :"
    )


def test_mbpp_signature_from_reference_and_asserts_in_docstring():
    record = {
        "task_id": 1,
        "text": "Find the min cost.",
        "test_setup_code": "",
        "code": (
            "import math\r\nR = 3\r\ndef helper(x):\r\n\treturn x\r\n"
            "def min_cost(cost, m,  n): \r\n\treturn helper(R)"
        ),
        "test_list": [
            "assert min_cost([1], 2, 2) == 3",
            "assert min_cost([2], 1, 1) == 3",
            "assert min_cost([3], 0, 0) == 3",
        ],
    }
    p = mbpp_problem(record)
    assert p.task_id == "MBPP/1" and p.entry_point == "min_cost"  # the function the asserts call
    assert p.preamble == "import math\n"  # imports only: helpers and constants are not shown
    assert p.header == "def min_cost(cost, m, n):\n"
    assert p.prompt == "import math\ndef min_cost(cost, m, n):\n"
    assert p.docstring == "Find the min cost.\n" + "\n".join(record["test_list"])
    assert p.signature_lin == "import math <NEW_LINE> def min_cost ( cost , m , n ) :"
    # the reference completion is the body, then the rest of the reference code
    program = p.prompt + p.solution
    namespace: dict = {}
    exec(compile(program, "<mbpp>", "exec"), namespace)  # noqa: S102 - our own fixture code, not model output
    exec(p.test, namespace)  # noqa: S102
    assert ast.parse(program)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"task_id": "x", "prompt": "def f(:\\n"  , "entry_point": "f", "test": ""}\n', "not valid Python"),
        ('{"foo": 1}\n', "not a HumanEval or MBPP record"),
        ("not json\n", "not valid JSON"),
        (
            '{"task_id": "x", "prompt": "def g():\\n  pass\\n", "entry_point": "f", "test": ""}\n',
            "no top-level function",
        ),
        ("", "holds no problems"),
    ],
)
def test_bad_problem_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_problems(path)
    assert "\n" not in str(info.value)


def _problem(body: str):
    return humaneval_problem(
        {
            "task_id": "T/0",
            "entry_point": "f",
            "test": "",
            "prompt": "def f(x):\n    '''Doc.'''\n",
            "canonical_solution": body,
        }
    )


def test_incremental_subtasks_on_hand_written_solution():
    body = (
        "    total = 0\n"
        "    # a comment is not a line of its own\n"
        "\n"
        "    for i in range(x):\n"
        "        total += i\n"
        "    return total\n"
    )
    tasks = subtasks(_problem(body))
    # 4 logical lines -> given 1, 2, 3 lines (the whole solution is excluded; comment/blank lines dropped)
    assert [t.task_id for t in tasks] == ["T/0#inc1", "T/0#inc2", "T/0#inc3"]
    assert [t.prompt[len("def f(x):\n    '''Doc.'''\n") :] for t in tasks] == [
        "    total = 0\n",
        "    total = 0\n    for i in range(x):\n",
        "    total = 0\n    for i in range(x):\n        total += i\n",
    ]
    assert [t.given_lin for t in tasks] == [
        "<NEW_LINE> <INDENT> total = 0 <NEW_LINE>",
        "<NEW_LINE> <INDENT> total = 0 <NEW_LINE> for i in range ( x ) : <NEW_LINE>",
        "<NEW_LINE> <INDENT> total = 0 <NEW_LINE> for i in range ( x ) : <NEW_LINE> <INDENT> total += i <NEW_LINE>",
    ]
    assert [t.solution for t in tasks] == [
        "    for i in range(x):\n        total += i\n    return total\n",
        "        total += i\n    return total\n",
        "    return total\n",
    ]
    assert all(t.base_id == "T/0" and t.code_prefix.endswith(t.given_lin) for t in tasks)
    # prompt + solution is a complete program defining the same function
    for t in tasks:
        namespace: dict = {}
        exec(compile(t.prompt + t.solution, t.task_id, "exec"), namespace)  # noqa: S102 - hand-written code
        assert namespace["f"](4) == 6


def test_incremental_edge_cases():
    assert subtasks(_problem("    return x\n")) == []  # one line: nothing to give
    nested = subtasks(_problem("    if x:\n        return [1,\n                2]\n    return []\n"))
    # a bracketed continuation is one line; no sub-task for the whole solution
    assert [t.task_id for t in nested] == ["T/0#inc1", "T/0#inc2"]
    problems = incremental_problems(load_problems(ASSETS / "humaneval_3.jsonl"))
    ids = [p.task_id for p in problems]
    assert ids[0] == "HumanEval/0" and len(ids) == len(set(ids))
    # HumanEval/2 and /38 have one-line solutions: only HumanEval/0 (7 lines) gets sub-tasks
    assert ids == [
        "HumanEval/0",
        *(f"HumanEval/0#inc{j}" for j in range(1, 7)),
        "HumanEval/2",
        "HumanEval/38",
    ]


def test_reference_lin_needs_a_solution():
    p = humaneval_problem(
        {"task_id": "T/9", "entry_point": "f", "test": "", "prompt": "def f():\n    '''D.'''\n"}
    )
    with pytest.raises(ValueError, match="no reference solution"):
        reference_lin(p)


def test_gz_and_humaneval_records_round_trip(tmp_path):
    import gzip

    rows = [json.loads(line) for line in (ASSETS / "humaneval_3.jsonl").read_text().splitlines()]
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert [p.prompt for p in load_problems(path)] == [r["prompt"] for r in rows]


def test_mbpp_splits_and_unknown_split():
    assert [p.task_id for p in load_benchmark("mbpp", "prompt")] == [f"MBPP/{i}" for i in range(1, 11)]
    assert len(load_benchmark("mbpp", "validation")) == 90 and len(load_benchmark("mbpp", "all")) == 974
    with pytest.raises(ValueError, match="unknown MBPP split 'dev'"):
        load_benchmark("mbpp", "dev")


def test_completion_after_a_prefix_cut_inside_a_statement():
    header = "def f ( x ) :"
    # a complete header or line: the completion starts on the next line
    assert completion_after(header, "<NEW_LINE> <INDENT> return x <NEW_LINE> <DEDENT>") == "    return x\n"
    # cut inside brackets: the completion carries the whole statement
    cut = f"{header} <NEW_LINE> <INDENT> y = [ x ,"
    assert (
        completion_after(cut, "x ] <NEW_LINE> return y <NEW_LINE> <DEDENT>")
        == "    y = [x, x]\n    return y\n"
    )
    # a line cut after an operator (a backslash continuation) counts as cut too
    assert (
        completion_after(f"{header} <NEW_LINE> <INDENT> return x +", "1 <NEW_LINE> <DEDENT>")
        == "    return x + 1\n"
    )
