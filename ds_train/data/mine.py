"""The embedded corpus: (docstring, code) pairs mined from Python source trees on this machine.

Every function, method and class that has a docstring becomes one JSON line
`{"_id", "docstring", "code"}`, the fields of `huawei-noah/python_text2code`:

- `_id`: `<path relative to the root it was found under>::<qualified name>::<sha1(code)[:12]>`;
  the qualified name follows `__qualname__` (`Class.method`, `Outer.Inner`, `f.<locals>.g`). It
  does not depend on where the tree lives, so two runs on the same files give the same ids.
- `docstring`: the docstring, `inspect.cleandoc`-ed and stripped.
- `code`: the definition (decorators, header, body) without its docstring statement (`pass` if
  nothing else is left), linearized (`ds_train.data.codec`).

Files are visited in sorted order of their relative path, roots in the order given, definitions in
source order (a class before its methods), so the output is deterministic. A pair is kept only if
its docstring and code pass the length filters, its code was not seen before (exact duplicates
of the linearized code, hence also of the pair, are dropped: the first one is kept) and its code
delinearizes to the same AST as the source. Files that cannot be read, decoded or parsed are
skipped and counted; every skip is counted under its reason in the returned `MineSummary`.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import copy
import hashlib
import io
import json
import logging
import os
import stat
import sysconfig
import time
import tokenize
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ds_train.data.codec import (
    DEDENT,
    INDENT,
    NEW_LINE,
    CodeToken,
    code_tokens,
    delinearize,
    normalize_newlines,
)
from ds_train.errors import UsageError, first_line, refuse
from ds_train.fileio import replacing_file

logger = logging.getLogger(__name__)

DEFAULT_MIN_DOCSTRING_CHARS = 16
DEFAULT_MAX_DOCSTRING_CHARS = 2000
DEFAULT_MIN_CODE_TOKENS = 12
DEFAULT_MAX_CODE_TOKENS = 768

# Skip reasons, file level.
UNREADABLE = "unreadable_file"  # OSError, or not a regular file (FIFO, device, dangling link, loop)
UNDECODABLE = "undecodable_file"  # bad coding cookie or bytes invalid in the declared encoding
EMPTY = "empty_file"  # nothing but whitespace
SYNTAX_ERROR = "syntax_error"  # does not parse on this Python
UNTOKENIZABLE = "untokenizable_file"  # parses, but the tokenize module refuses it
UNREADABLE_DIR = "unreadable_dir"  # a folder that cannot be listed
# Skip reasons, definition level.
NO_DOCSTRING = "no_docstring"
DOCSTRING_TOO_SHORT = "docstring_too_short"
DOCSTRING_TOO_LONG = "docstring_too_long"
CODE_TOO_SHORT = "code_too_short"
CODE_TOO_LONG = "code_too_long"
DUPLICATE = "duplicate"
UNENCODABLE = "unencodable"  # a lone surrogate (from an escape in the docstring) cannot be UTF-8
ROUNDTRIP_MISMATCH = "roundtrip_mismatch"  # the linearized code does not give back the same AST

_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclass(frozen=True)
class Filters:
    """Length limits of a kept pair (code lengths in linearized items, markers included)."""

    min_docstring_chars: int = DEFAULT_MIN_DOCSTRING_CHARS
    max_docstring_chars: int = DEFAULT_MAX_DOCSTRING_CHARS
    min_code_tokens: int = DEFAULT_MIN_CODE_TOKENS
    max_code_tokens: int = DEFAULT_MAX_CODE_TOKENS

    def validate(self) -> None:
        """Raise one `UsageError` naming every bad limit."""
        problems = [f"{name} must be >= 0 (got {value})" for name, value in vars(self).items() if value < 0]
        if self.min_docstring_chars > self.max_docstring_chars:
            problems.append("min_docstring_chars must be <= max_docstring_chars")
        if self.min_code_tokens > self.max_code_tokens:
            problems.append("min_code_tokens must be <= max_code_tokens")
        if problems:
            raise UsageError("; ".join(problems))


@dataclass
class MineSummary:
    """What one `mine` call did (`str()` gives `describe()`'s line)."""

    out: Path
    roots: list[Path]
    files: int = 0  # files opened (skipped ones included)
    kept: int = 0  # pairs written
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count
    limit_reached: bool = False
    seconds: float = 0.0

    def describe(self) -> str:
        """One line: kept pairs, files, rate and the skip counts by reason."""
        rate = self.kept / self.seconds if self.seconds > 0 else 0.0
        skipped = ", ".join(f"{reason}={n}" for reason, n in sorted(self.skipped.items())) or "none"
        stop = " (limit reached)" if self.limit_reached else ""
        return (
            f"mined {self.kept} pairs{stop} from {self.files} files in {self.seconds:.1f}s "
            f"({rate:.0f} pairs/s) into {self.out}; skipped: {skipped}"
        )

    __str__ = describe


@dataclass(frozen=True)
class MinedPair:
    """One mined record."""

    id: str
    docstring: str
    code: str

    def to_json(self) -> str:
        return json.dumps(
            {"_id": self.id, "docstring": self.docstring, "code": self.code}, ensure_ascii=False
        )


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def default_roots() -> list[Path]:
    """The running interpreter's standard library and site-packages (those that exist)."""
    paths = sysconfig.get_paths()
    roots: list[Path] = []
    for key in ("stdlib", "purelib", "platlib"):
        root = Path(paths[key])
        if root.is_dir() and all(root.resolve() != r.resolve() for r in roots):
            roots.append(root)
    return roots


def mine(
    paths: list[Path] | None,
    out: Path,
    *,
    limit: int | None = None,
    min_docstring_chars: int = DEFAULT_MIN_DOCSTRING_CHARS,
    max_docstring_chars: int = DEFAULT_MAX_DOCSTRING_CHARS,
    min_code_tokens: int = DEFAULT_MIN_CODE_TOKENS,
    max_code_tokens: int = DEFAULT_MAX_CODE_TOKENS,
    progress: bool = True,
) -> MineSummary:
    """Mine (docstring, code) pairs from source trees (or single files) into a JSONL file.

    `paths`: directories (walked for `*.py`, skipping `__pycache__` and hidden folders; symlinked
    folders are not followed) or files; None or empty: `default_roots()`, where the interpreter's
    own `site-packages` inside the standard library is left to its own root. `limit`: stop after
    that many pairs. The file is written atomically (a temporary file renamed at the end).
    Raises `UsageError` for a path that does not exist or bad limits.
    """
    filters = Filters(min_docstring_chars, max_docstring_chars, min_code_tokens, max_code_tokens)
    roots, prune = _resolve_roots(paths, filters, limit, out)
    summary = MineSummary(out=out, roots=roots)
    started = time.perf_counter()
    files = [(path, rel) for root in roots for path, rel in _source_files(root, prune, summary.skipped)]
    logger.info("mining %d files under %s", len(files), ", ".join(map(str, roots)))
    with replacing_file(out) as sink:
        _mine_files(files, sink, filters, limit, summary, progress)
    summary.seconds = time.perf_counter() - started
    logger.info("%s", summary.describe())
    return summary


def _mine_files(
    files: list[tuple[Path, str]],
    sink: io.TextIOBase,
    filters: Filters,
    limit: int | None,
    summary: MineSummary,
    progress: bool,
) -> None:
    """Write the pairs of these files to `sink`, counting into `summary`, until `limit`."""
    seen: set[str] = set()
    # disable=None: no bar off a terminal (a log file would get every update)
    bar = tqdm(files, desc="mine", unit="file", disable=None if progress else True, dynamic_ncols=True)
    for path, rel in bar:
        summary.files += 1
        for pair in _file_pairs(path, rel, filters, seen, summary.skipped):
            sink.write(pair.to_json() + "\n")
            summary.kept += 1
            if summary.kept == limit:
                summary.limit_reached = True
                break
        if summary.limit_reached:
            break
        if summary.files % 64 == 0:
            bar.set_postfix(pairs=summary.kept, refresh=False)
    bar.close()


def _resolve_roots(
    paths: list[Path] | None, filters: Filters, limit: int | None, out: Path
) -> tuple[list[Path], set[Path]]:
    """Check the arguments; return the roots and the folders not to descend into."""
    filters.validate()
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be >= 1 (got {limit})")
    if out.is_dir():
        raise UsageError(f"output path is a directory: {out}")
    if paths:
        roots = list({Path(p).resolve(): Path(p) for p in paths}.values())  # each root once
        missing = [str(p) for p in roots if not p.exists()]
        if missing:
            raise UsageError(f"path does not exist: {', '.join(missing)}")
        extra: set[Path] = set()
    else:
        roots = default_roots()
        extra = {(roots[0] / name).resolve() for name in ("site-packages", "dist-packages")}
    # A root inside another root is left to itself, so no file is visited twice.
    prune = {r.resolve() for r in roots} | extra
    return roots, prune


def _source_files(root: Path, prune: set[Path], skipped: Counter[str]) -> list[tuple[Path, str]]:
    """The `.py` files under `root` with their POSIX paths relative to it, sorted by that path."""
    if not root.is_dir():
        return [(root, root.name)]

    def on_error(err: OSError) -> None:
        logger.warning("cannot list %s: %s", err.filename, err.strerror)
        skipped[UNREADABLE_DIR] += 1

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        here = Path(dirpath)
        dirnames[:] = [
            d
            for d in dirnames
            if d != "__pycache__" and not d.startswith(".") and (here / d).resolve() not in prune
        ]
        found += [
            (here / name, (here / name).relative_to(root).as_posix())
            for name in filenames
            if name.endswith(".py")
        ]
    return sorted(found, key=lambda item: item[1])


# --------------------------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------------------------


def _file_pairs(
    path: Path, rel: str, filters: Filters, seen: set[str], skipped: Counter[str]
) -> Iterator[MinedPair]:
    """The kept pairs of one file; skips are counted in `skipped` (`seen`: code hashes so far)."""
    source, reason = read_source(path)
    tree = _parse(source) if source is not None else None
    if tree is None:
        _skip_file(path, reason or SYNTAX_ERROR, skipped)
        return
    definitions = list(_definitions(tree.body, ""))
    documented = [
        (name, node) for name, node in definitions if ast.get_docstring(node, clean=False) is not None
    ]
    skipped[NO_DOCSTRING] += len(definitions) - len(documented)
    if not documented:
        return
    try:
        file = _TokenizedFile(source, code_tokens(source))
    except ValueError:  # tokenize refused what the parser accepted
        _skip_file(path, UNTOKENIZABLE, skipped)
        return
    for qualname, node in documented:
        pair, reason = _pair(file, rel, qualname, node, filters, seen)
        if pair is not None:
            yield pair
        else:
            logger.debug("skipped %s::%s: %s", rel, qualname, reason)
            skipped[reason] += 1


def _skip_file(path: Path, reason: str, skipped: Counter[str]) -> None:
    logger.debug("skipped %s: %s", path, reason)
    skipped[reason] += 1


def _parse(source: str) -> ast.Module | None:
    """The AST of a source text, or None where it does not parse on this Python."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences and the like
            return ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes (3.11)
        return None


def read_source(path: Path) -> tuple[str | None, str]:
    """Read and decode a Python file (PEP 263 coding cookie, BOM); (text, '') or (None, reason)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return None, UNREADABLE
        data = path.read_bytes()
    except OSError:
        return None, UNREADABLE
    if not data.strip():
        return None, EMPTY
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        text = data.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None, UNDECODABLE
    return normalize_newlines(text.removeprefix("\ufeff")), ""


def _definitions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) of every def/class below these statements, in source order."""
    for node in body:
        yield from _definitions_in(node, prefix)


def _definitions_in(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.AST]]:
    if isinstance(node, _DEFINITIONS):
        qualname = prefix + node.name
        yield qualname, node
        inner = qualname + ("." if isinstance(node, ast.ClassDef) else ".<locals>.")
        yield from _definitions(node.body, inner)
        return
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.stmt | ast.match_case | ast.ExceptHandler):
            yield from _definitions_in(child, prefix)


class _TokenizedFile:
    """A file's linearized tokens, searchable by source position."""

    def __init__(self, source: str, tokens: list[CodeToken]) -> None:
        self.lines = io.StringIO(source).readlines()
        self.tokens = tokens
        self.starts = [t.start for t in tokens]

    def index(self, lineno: int, byte_col: int) -> int:
        """Index of the first token starting at or after an AST position (UTF-8 byte column)."""
        line = self.lines[lineno - 1] if lineno <= len(self.lines) else ""
        col = byte_col if line.isascii() else len(line.encode()[:byte_col].decode("utf-8", "ignore"))
        return bisect.bisect_left(self.starts, (lineno, col))


def _pair(
    file: _TokenizedFile, rel: str, qualname: str, node: ast.AST, filters: Filters, seen: set[str]
) -> tuple[MinedPair | None, str]:
    """The pair of one documented definition, or (None, skip reason)."""
    docstring = ast.get_docstring(node, clean=True).strip()
    if len(docstring) < filters.min_docstring_chars:
        return None, DOCSTRING_TOO_SHORT
    if len(docstring) > filters.max_docstring_chars:
        return None, DOCSTRING_TOO_LONG
    code = _code_without_docstring(file, node)
    size = len(code.split())
    if size < filters.min_code_tokens:
        return None, CODE_TOO_SHORT
    if size > filters.max_code_tokens:
        return None, CODE_TOO_LONG
    digest = hashlib.sha1(code.encode("utf-8", "surrogatepass")).hexdigest()
    if digest in seen:
        return None, DUPLICATE
    if not (_encodable(docstring) and _encodable(code)):
        return None, UNENCODABLE
    if not _round_trips(code, node):
        return None, ROUNDTRIP_MISMATCH
    seen.add(digest)
    return MinedPair(f"{rel}::{qualname}::{digest[:12]}", docstring, code), ""


def _code_without_docstring(file: _TokenizedFile, node: ast.AST) -> str:
    """The linearized definition with its docstring statement removed (`pass` if it was alone).

    Tokens from the first decorator to the end of the node; layout tokens of the enclosing code
    at the start are dropped, and the final `<NEW_LINE>` and `<DEDENT>`s (which tokenize places
    after the node's end) are added back.
    """
    first = node.decorator_list[0] if node.decorator_list else node
    begin = file.index(first.lineno, 0)
    end = file.index(node.end_lineno, node.end_col_offset)
    while begin < end and file.tokens[begin].text in (INDENT, DEDENT):
        begin += 1
    doc = node.body[0]
    doc_begin = file.index(doc.lineno, doc.col_offset)
    doc_end = file.index(doc.end_lineno, doc.end_col_offset)
    if len(node.body) == 1:
        items = _texts(file, begin, doc_begin) + ["pass"] + _texts(file, doc_end, end)
    else:
        after = doc_end + 1 if doc_end < end and file.tokens[doc_end].text in (NEW_LINE, ";") else doc_end
        items = _texts(file, begin, doc_begin) + _texts(file, after, end)
    if items[-1] != NEW_LINE:
        items.append(NEW_LINE)
    items += [DEDENT] * (items.count(INDENT) - items.count(DEDENT))
    return " ".join(items)


def _texts(file: _TokenizedFile, begin: int, end: int) -> list[str]:
    return [t.text for t in file.tokens[begin:end]]


def _round_trips(code: str, node: ast.AST) -> bool:
    """Whether the linearized code parses back to the node without its docstring."""
    expected = copy.copy(node)
    expected.body = node.body[1:] or [ast.Pass()]
    parsed = _parse(delinearize(code))
    return parsed is not None and len(parsed.body) == 1 and ast.dump(parsed.body[0]) == ast.dump(expected)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# `ds-data mine`
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ds-data mine`."""
    parser.add_argument(
        "paths",
        nargs="*",
        type=Path,
        help="source trees or .py files (default: this interpreter's stdlib and site-packages)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many pairs")
    parser.add_argument("--min-docstring-chars", type=int, default=DEFAULT_MIN_DOCSTRING_CHARS)
    parser.add_argument("--max-docstring-chars", type=int, default=DEFAULT_MAX_DOCSTRING_CHARS)
    parser.add_argument(
        "--min-code-tokens",
        type=int,
        default=DEFAULT_MIN_CODE_TOKENS,
        help="fewest linearized items (markers included) in a kept code",
    )
    parser.add_argument("--max-code-tokens", type=int, default=DEFAULT_MAX_CODE_TOKENS)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run `ds-data mine`; prints the summary line, returns the exit code (2 for bad input)."""
    try:
        summary = mine(
            args.paths or None,
            args.out,
            limit=args.limit,
            min_docstring_chars=args.min_docstring_chars,
            max_docstring_chars=args.max_docstring_chars,
            min_code_tokens=args.min_code_tokens,
            max_code_tokens=args.max_code_tokens,
            progress=not args.no_progress,
        )
    except ValueError as err:
        return refuse("ds-data mine: error", err)
    except OSError as err:
        return refuse("ds-data mine: error", f"cannot write {args.out}: {err.strerror or first_line(err)}")
    print(summary.describe())
    return 0
