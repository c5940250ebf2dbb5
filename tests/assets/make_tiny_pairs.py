"""Regenerate ``tiny_pairs.jsonl``: (docstring, linearized code) pairs mined from a few stdlib modules.

Run from the repository root::

    .venv/bin/python tests/assets/make_tiny_pairs.py tests/assets/tiny_pairs.jsonl

The linearization here is a small stand-alone one (``tokenize`` tokens joined by single spaces,
``<NEW_LINE>`` / ``<INDENT>`` / ``<DEDENT>`` for logical newlines and blocks, comments dropped), so
the committed asset does not change when the project's codec evolves.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import sys
import sysconfig
import textwrap
import tokenize
from pathlib import Path

MODULES = [
    "textwrap.py",
    "shlex.py",
    "fnmatch.py",
    "heapq.py",
    "bisect.py",
    "string.py",
    "csv.py",
    "json/decoder.py",
    "json/encoder.py",
    "glob.py",
    "colorsys.py",
    "difflib.py",
    "ipaddress.py",
    "fractions.py",
    "statistics.py",
    "calendar.py",
    "graphlib.py",
    "pprint.py",
    "base64.py",
    "quopri.py",
    "netrc.py",
    "configparser.py",
    "tomllib/_parser.py",
    "gettext.py",
    "ntpath.py",
]
MAX_CODE_CHARS = 900
MAX_DOC_CHARS = 500
MAX_PAIRS = 360
MARKERS = {tokenize.NEWLINE: "<NEW_LINE>", tokenize.INDENT: "<INDENT>", tokenize.DEDENT: "<DEDENT>"}
SKIPPED = {tokenize.NL, tokenize.COMMENT, tokenize.ENCODING, tokenize.ENDMARKER}


def linearize(source: str) -> str:
    """Python tokens of ``source`` separated by single spaces, with block/newline markers."""
    words = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in SKIPPED:
            continue
        words.append(MARKERS.get(tok.type, tok.string))
    return " ".join(words)


def without_docstring(source_lines: list[str], node: ast.AST) -> str | None:
    """The definition's source with its docstring statement removed (None where that is unclean)."""
    doc_node = node.body[0]
    if doc_node.lineno == node.lineno or len(node.body) < 2:
        return None
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    lines = (
        source_lines[first - 1 : doc_node.lineno - 1] + source_lines[doc_node.end_lineno : node.end_lineno]
    )
    return textwrap.dedent("".join(lines))


def pairs_of(path: Path, rel: str) -> list[dict]:
    """Every documented function / class of one module that passes the length filters."""
    text = path.read_text(encoding="utf-8")
    source_lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc or len(doc) > MAX_DOC_CHARS:
            continue
        source = without_docstring(source_lines, node)
        if source is None or len(source) > MAX_CODE_CHARS:
            continue
        try:
            code = linearize(source)
        except (tokenize.TokenError, IndentationError, SyntaxError):
            continue
        digest = hashlib.sha1(f"{doc}\n{code}".encode()).hexdigest()[:12]
        out.append({"_id": f"{rel}:{node.name}:{node.lineno}:{digest}", "docstring": doc, "code": code})
    return out


def main(out_path: str) -> None:
    """Write the pairs of ``MODULES`` (sorted, de-duplicated, capped) as JSON lines."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen, pairs = set(), []
    for rel in MODULES:
        for pair in pairs_of(stdlib / rel, rel):
            key = (pair["docstring"], pair["code"])
            if key not in seen:
                seen.add(key)
                pairs.append(pair)
    with open(out_path, "w", encoding="utf-8") as f:
        for pair in pairs[:MAX_PAIRS]:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    print(f"wrote {min(len(pairs), MAX_PAIRS)} of {len(pairs)} pairs to {out_path}")


if __name__ == "__main__":
    main(sys.argv[1])
