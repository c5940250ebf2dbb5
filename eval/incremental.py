"""Incremental sub-tasks (DESIGN.md §7): each problem also posed with the first 1, 2, ... lines of
its reference solution given after the prompt.

Lines are the logical lines of the entry function's body in the linearized form (one per
`<NEW_LINE>`), so blank lines, comments and line breaks inside brackets never make a sub-task of
their own; identical prefixes are kept once and the whole solution is never given. Sub-task j has
the id `<task_id>#inc<j>`; its `prompt` is the problem's prompt plus the given lines in source
form (four-space indentation, as `delinearize` writes them), its `given_lin` the same lines
linearized, and its `solution` the rest of the reference body, so that `prompt + solution` is the
reference program again.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from ds_train.data.codec import DEDENT, INDENT, NEW_LINE, delinearize
from eval.problems import Problem, completion_after, reference_lin

log = logging.getLogger(__name__)

_MARKER = "__ds_eval_given_end__"


def body_line_ends(rest_lin: str) -> list[int]:
    """Indices (into `rest_lin.split()`) of the `<NEW_LINE>` ending each line of the function body."""
    ends, depth = [], 0
    for i, item in enumerate(rest_lin.split()):
        if item == INDENT:
            depth += 1
        elif item == DEDENT:
            depth -= 1
            if depth <= 0:
                break
        elif item == NEW_LINE and depth >= 1:
            ends.append(i)
    return ends


def subtasks(problem: Problem) -> list[Problem]:
    """The incremental sub-tasks of one problem (without the problem itself)."""
    rest = reference_lin(problem)
    items = rest.split()
    ends = body_line_ends(rest)
    out: dict[str, Problem] = {}
    for j, end in enumerate(ends[:-1], 1):
        given_lin = " ".join(items[: end + 1])
        if given_lin in out:
            continue
        prefix = f"{problem.signature_lin} {given_lin}"
        out[given_lin] = replace(
            problem,
            task_id=f"{problem.task_id}#inc{j}",
            prompt=problem.prompt + given_source(problem.signature_lin, given_lin),
            solution=completion_after(prefix, " ".join(items[end + 1 :])),
            given_lin=given_lin,
            base_id=problem.task_id,
        )
    return list(out.values())


def incremental_problems(problems: list[Problem]) -> list[Problem]:
    """Every problem followed by its sub-tasks; problems without a reference get none (logged)."""
    result: list[Problem] = []
    missing = 0
    for problem in problems:
        result.append(problem)
        if not problem.solution.strip():
            missing += 1
            continue
        result.extend(subtasks(problem))
    if missing:
        log.warning("%d problems have no reference solution and get no incremental sub-tasks", missing)
    return result


def given_source(signature_lin: str, given_lin: str) -> str:
    """The given lines in source form: what `given_lin` adds after the signature, no `pass` added."""
    probe = delinearize(f"{signature_lin} {given_lin} {INDENT} {_MARKER} {NEW_LINE}").splitlines(
        keepends=True
    )
    start = len(delinearize(f"{signature_lin} {NEW_LINE} {INDENT} {_MARKER} {NEW_LINE}").splitlines()) - 1
    stop = next(i for i, line in enumerate(probe) if _MARKER in line)
    return "".join(probe[start:stop])
