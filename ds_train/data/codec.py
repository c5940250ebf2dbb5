"""The linearized code form of the public MRPT corpus, and its inverse.

`huawei-noah/python_text2code` stores code as Python tokens separated by single spaces, with
markers for the layout that the spaces lose::

    def add(a, b):             def add ( a , b ) : <NEW_LINE> <INDENT> return a + b <NEW_LINE> <DEDENT>
        return a + b

- `<NEW_LINE>` ends a logical line (tokenize's NEWLINE); line breaks inside brackets, blank lines,
  backslash continuations and comments are dropped.
- `<INDENT>` / `<DEDENT>` open and close an indented block (tokenize's INDENT / DEDENT).
- Every other item is one Python token: a name, keyword, number, operator, or a whole string
  literal, prefix and quotes included. f-strings stay one literal: on Python 3.12+ `tokenize`
  splits them into FSTRING_START ... FSTRING_END and this module re-joins them by slicing the
  source text from the start of FSTRING_START to the end of the matching FSTRING_END.

Literal escaping. A literal is kept as its verbatim source text (so `r"\\d"`, `'''...'''`,
`f"{x!r:>10}"` and backslash continuations inside strings survive unchanged), except that no
whitespace may remain inside it, so that `text.split()` gives exactly one item per token:

- a space becomes `␣` (U+2423), a newline `⏎` (U+23CE), a tab `⇥` (U+21E5);
- any other whitespace character (form feed, U+00A0, U+2028, ...), any literal occurrence of the
  four marker characters `␣ ⏎ ⇥ ⁅`, and sentencepiece's `▁` (U+2581, which sentencepiece
  tokenizers decode to a space) becomes `⁅<hex code point>⁆` (U+2045 / U+2046).

`⁅` only ever starts an escape, so the mapping is reversible: `delinearize` undoes it exactly. The
marker characters are not identifier characters, so they never occur outside literals. Before
tokenizing, `\\r\\n` and `\\r` become `\\n`, as Python itself reads source, so a literal's value
never changes.

`delinearize` writes one physical line per logical line, indented by four spaces per level, with
a few spacing rules that cannot change the token stream (`f(a, b)` rather than `f ( a , b )`). It
is best-effort on ragged model output (unbalanced markers, a cut-off last token, junk) and never
raises. It also accepts literals whose spaces were left as plain spaces (split over several items),
as found in corpora written by other tools: such items are joined back while a literal is open.
"""

from __future__ import annotations

import io
import keyword
import re
import textwrap
import token
import tokenize
from typing import NamedTuple

NEW_LINE = "<NEW_LINE>"
INDENT = "<INDENT>"
DEDENT = "<DEDENT>"
MARKERS = (NEW_LINE, INDENT, DEDENT)

# The special tokens of the sequence layout (ARCHITECTURE.md, "Tokens"); every tokenizer of the
# project holds each as one id. Defined here, beside the markers, so that this light module and
# the tokenizer share one definition.
PAD, MASK = "<pad>", "<mask>"
BOT, COMMENTS, PYTHON, EOT = "<bot>", "<comments>", "<python>", "<eot>"
SPECIAL_TOKENS = (PAD, MASK, NEW_LINE, INDENT, DEDENT, BOT, COMMENTS, PYTHON, EOT)

# Special tokens that may appear in model output (the layout's and common tokenizers' own);
# delinearize drops them.
_SPECIAL_TOKENS = frozenset(SPECIAL_TOKENS).difference(MARKERS) | {"<unk>", "<s>", "</s>"}
DOC_INDENT = "    "

_NAMED_ESCAPES = {" ": "\u2423", "\n": "\u23ce", "\t": "\u21e5"}
_ESCAPE_OPEN, _ESCAPE_CLOSE = "\u2045", "\u2046"
# Escaped as code points: the marker characters themselves, and sentencepiece's word marker.
_MARKER_CHARS = frozenset({*_NAMED_ESCAPES.values(), _ESCAPE_OPEN, "\u2581"})
_UNESCAPE_RE = re.compile(
    f"{_ESCAPE_OPEN}([0-9a-f]{{1,6}}){_ESCAPE_CLOSE}|[{''.join(_NAMED_ESCAPES.values())}]"
)
_NAMED_UNESCAPES = {v: k for k, v in _NAMED_ESCAPES.items()}

# Token types of Python 3.12+ (f-strings) and 3.14+ (t-strings); None where the version lacks them.
_STRING_STARTS = {
    t for t in (getattr(token, "FSTRING_START", None), getattr(token, "TSTRING_START", None)) if t
}
_STRING_ENDS = {t for t in (getattr(token, "FSTRING_END", None), getattr(token, "TSTRING_END", None)) if t}
_DROPPED = {tokenize.COMMENT, tokenize.NL, tokenize.ENDMARKER, tokenize.ENCODING}
_NAME_LIKE = (tokenize.NAME, tokenize.ERRORTOKEN)
_LAYOUT = {tokenize.NEWLINE: NEW_LINE, tokenize.INDENT: INDENT, tokenize.DEDENT: DEDENT}

# A string literal: an optional prefix (r, b, f, u, t and their pairs, any case), then a quote.
_LITERAL_START_RE = re.compile(r"[rRbBfFuUtT]{0,2}('''|\"\"\"|'|\")")


# --------------------------------------------------------------------------------------------
# Escaping of literals
# --------------------------------------------------------------------------------------------


def escape_literal(text: str) -> str:
    """Make a literal's source text whitespace-free, reversibly (see the module docstring)."""
    if not any(c.isspace() or c in _MARKER_CHARS for c in text):
        return text
    out = []
    for c in text:
        if c in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[c])
        elif c.isspace() or c in _MARKER_CHARS:
            out.append(f"{_ESCAPE_OPEN}{ord(c):x}{_ESCAPE_CLOSE}")
        else:
            out.append(c)
    return "".join(out)


def unescape_literal(text: str) -> str:
    """Invert `escape_literal`; text without escapes is returned unchanged."""

    def replace(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return _NAMED_UNESCAPES[match.group(0)]
        code = int(match.group(1), 16)
        return chr(code) if code <= 0x10FFFF else match.group(0)

    return _UNESCAPE_RE.sub(replace, text)


# --------------------------------------------------------------------------------------------
# linearize
# --------------------------------------------------------------------------------------------


class CodeToken(NamedTuple):
    """One item of the linearized form with where it came from in the source.

    `text` is the item as written in the linearized form (markers for layout, escaped literals).
    `start` / `end` are tokenize's (row, column) positions: rows from 1, columns in characters.
    """

    text: str
    kind: int
    start: tuple[int, int]
    end: tuple[int, int]


def code_tokens(source: str) -> list[CodeToken]:
    """Tokenize Python source into the items of its linearized form, with source positions.

    Raises `ValueError` when the source cannot be tokenized (unterminated string or bracket,
    inconsistent dedent).
    """
    source = normalize_newlines(source)
    lines = io.StringIO(source).readlines()  # split on "\n" only, as tokenize does
    raw = _raw_tokens(source)
    items: list[CodeToken] = []
    i = 0
    while i < len(raw):
        kind, string, start, end, _ = raw[i]
        if kind in _LAYOUT:
            items.append(CodeToken(_LAYOUT[kind], kind, start, end))
        elif kind == tokenize.STRING:
            items.append(CodeToken(escape_literal(string), kind, start, end))
        elif kind in _STRING_STARTS:
            i, literal = _join_split_literal(raw, i, lines)
            items.append(literal)
        elif kind in _NAME_LIKE and _continues_name(items, raw[i]):
            last = items[-1]
            items[-1] = CodeToken(last.text + string, tokenize.NAME, last.start, end)
        elif kind not in _DROPPED and not string.isspace():
            items.append(CodeToken(string, kind, start, end))
        i += 1
    return items


def _continues_name(items: list[CodeToken], tok: tokenize.TokenInfo) -> bool:
    """Whether `tok` (a NAME or ERRORTOKEN) is the rest of the identifier before it.

    Python 3.11's pure-Python tokenizer splits identifiers at characters its `\\w` misses (e.g.
    `x\\U000E0100`, a variation selector), returning ERRORTOKEN pieces that abut the NAME.
    In valid code two name-like tokens never abut otherwise, so abutting pieces are re-joined.
    """
    return (
        bool(items)
        and items[-1].kind in _NAME_LIKE
        and items[-1].end == tok.start
        and not tok.string.isspace()
    )


def normalize_newlines(source: str) -> str:
    """`\\r\\n` and `\\r` -> `\\n`, as Python itself reads source (also inside literals)."""
    return source.replace("\r\n", "\n").replace("\r", "\n")


def linearize(source: str) -> str:
    """Python source text -> the linearized form (see the module docstring).

    >>> linearize("def add(a, b):\\n    return a + b\\n")
    'def add ( a , b ) : <NEW_LINE> <INDENT> return a + b <NEW_LINE> <DEDENT>'

    Raises `ValueError` when the source cannot be tokenized.
    """
    return " ".join(item.text for item in code_tokens(source))


def is_linearized(code: str) -> bool:
    """Whether ``code`` is in the linearized form: it holds a layout marker (``linearize`` ends
    every logical line, a one-line definition's too, with ``<NEW_LINE>``)."""
    return any(marker in code for marker in MARKERS)


def ensure_linearized(code: str) -> str:
    """``code`` in the linearized form: Python source (no marker) is linearized, linearized code is
    returned unchanged. Raises ``ValueError`` for source that does not tokenize."""
    return code if is_linearized(code) else linearize(code)


def _raw_tokens(source: str) -> list[tokenize.TokenInfo]:
    """All of tokenize's tokens, with its errors turned into one `ValueError`."""
    try:
        return list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError) as err:  # IndentationError is a SyntaxError
        raise ValueError(f"cannot tokenize Python source: {err}") from None


def _join_split_literal(raw: list[tokenize.TokenInfo], i: int, lines: list[str]) -> tuple[int, CodeToken]:
    """Re-join a Python 3.12+ f-string (FSTRING_START ... FSTRING_END) into one literal.

    Returns the index of the matching end token and the literal, sliced verbatim from the source.
    """
    depth = 0
    for j in range(i, len(raw)):
        if raw[j].type in _STRING_STARTS:
            depth += 1
        elif raw[j].type in _STRING_ENDS:
            depth -= 1
            if depth == 0:
                start, end = raw[i].start, raw[j].end
                text = _source_slice(lines, start, end)
                return j, CodeToken(escape_literal(text), tokenize.STRING, start, end)
    raise ValueError("cannot tokenize Python source: unterminated f-string")


def _source_slice(lines: list[str], start: tuple[int, int], end: tuple[int, int]) -> str:
    """The source text between two tokenize positions (rows from 1, columns in characters)."""
    (srow, scol), (erow, ecol) = start, end
    if srow == erow:
        return lines[srow - 1][scol:ecol]
    middle = "".join(lines[srow : erow - 1])
    return lines[srow - 1][scol:] + middle + lines[erow - 1][:ecol]


# --------------------------------------------------------------------------------------------
# split_signature
# --------------------------------------------------------------------------------------------


def split_signature(linearized_code: str) -> tuple[str, str]:
    """Split a linearized function or class into (header, rest).

    header: the decorator lines (each `@ ... <NEW_LINE>`) and the `def` / `async def` / `class`
    line up to and including the `:` that ends it (the first `:` outside brackets that does not
    belong to a `lambda`). rest: everything after that `:`. For a block body it starts with
    `<NEW_LINE> <INDENT>`; for a one-liner (`def f ( ) : return 1 <NEW_LINE>`) it is the inline
    statement(s). Items are re-joined with single spaces, so
    `header + " " + rest == " ".join(linearized_code.split())` whenever rest is non-empty.

    Raises `ValueError` if the text does not start with a (decorated) def/class header.
    """
    items = linearized_code.split()
    i = _skip_decorators(items)
    if i < len(items) and items[i] == "async":
        i += 1
    if i >= len(items) or items[i] not in ("def", "class"):
        raise ValueError("not a linearized function or class: no def/class header found")
    end = _header_colon(items, i)
    if end is None:
        raise ValueError("not a linearized function or class: its header has no closing ':'")
    return " ".join(items[: end + 1]), " ".join(items[end + 1 :])


def _skip_decorators(items: list[str]) -> int:
    """Index of the first item after the leading `@ ... <NEW_LINE>` decorator lines."""
    i = 0
    while i < len(items) and items[i] == "@":
        try:
            i = items.index(NEW_LINE, i) + 1
        except ValueError:
            return len(items)
    return i


def _header_colon(items: list[str], start: int) -> int | None:
    """Index of the `:` that ends the def/class header beginning at `start`."""
    depth, lambdas = 0, 0
    for j in range(start, len(items)):
        item = items[j]
        if item in ("(", "[", "{"):
            depth += 1
        elif item in (")", "]", "}"):
            depth -= 1
        elif depth == 0 and item == "lambda":
            lambdas += 1
        elif depth == 0 and item == ":":
            if lambdas == 0:
                return j
            lambdas -= 1
        elif item in MARKERS:
            return None
    return None


# --------------------------------------------------------------------------------------------
# delinearize
# --------------------------------------------------------------------------------------------


def delinearize(text: str) -> str:
    """The linearized form -> runnable Python source (best-effort, never raises).

    Layout markers become line breaks and four-space indentation, literals are unescaped, and
    tokens are spaced so that the token stream is unchanged. Ragged input is repaired where that
    is cheap: project special tokens (`<eot>`, `<pad>`, ...) and a cut-off marker at the end are
    dropped, an `<INDENT>` not right after a block header is ignored (and so is the `<DEDENT>`
    that closes it), a `<DEDENT>` with no open `<INDENT>` is ignored, a block header with no body
    gets `pass`, and a string literal cut off at the end is closed.
    """
    lines: list[tuple[int, list[str]]] = []  # (indent level, items) per logical line
    current: list[str] = []
    indents: list[bool] = []  # one per open <INDENT>: whether it was honoured
    for item in _join_open_literals(_clean_items(str(text).split())):
        level = indents.count(True)
        if item in MARKERS and current:  # any marker ends the line (a NEW_LINE may be missing)
            lines.append((level, current))
            current = []
        if item == INDENT:
            indents.append(bool(lines) and lines[-1][1][-1] == ":" and lines[-1][0] == level)
        elif item == DEDENT:
            if indents:
                indents.pop()
        elif item != NEW_LINE:
            current.append(item)
    if current:
        lines.append((indents.count(True), current))
    return "".join(_render(lines))


def _clean_items(items: list[str]) -> list[str]:
    """Drop special tokens, and a cut-off one at the end (`<NEW_` from truncated output)."""
    items = [item for item in items if item not in _SPECIAL_TOKENS]
    last = items[-1] if items else ""
    if (
        last.startswith("<")
        and last not in MARKERS
        and any(s.startswith(last) for s in (*MARKERS, *_SPECIAL_TOKENS))
    ):
        items.pop()
    return items


def _join_open_literals(items: list[str]) -> list[str]:
    """Join items of a literal whose inner spaces were left as plain spaces (other corpora).

    An item that opens a string literal without closing it absorbs the following items, joined by
    single spaces, until the literal closes; if a layout marker, the end, or `_MAX_LITERAL_ITEMS`
    items come first, nothing is joined. A literal left open by the last item is closed.
    """
    out: list[str] = []
    i = 0
    while i < len(items):
        end = _literal_end(items, i) if _open_quote(items[i]) else i
        out.append(" ".join(items[i : end + 1]))
        i = end + 1
    if out and (quote := _open_quote(out[-1])):
        body = out[-1].rstrip("\\")
        out[-1] = body + quote if (len(out[-1]) - len(body)) % 2 == 0 else out[-1][:-1] + quote
    return out


_MAX_LITERAL_ITEMS = 256


def _literal_end(items: list[str], i: int) -> int:
    """Index of the item that closes the literal opened (and not closed) by `items[i]`; else `i`."""
    joined = items[i]
    for j in range(i + 1, min(len(items), i + _MAX_LITERAL_ITEMS)):
        if items[j] in MARKERS:
            return i
        joined += " " + items[j]
        if not _open_quote(joined):
            return j
    return i


def _open_quote(item: str) -> str:
    """The quote of a string literal that `item` opens and does not close; '' otherwise."""
    match = _LITERAL_START_RE.match(item)
    if match is None:
        return ""
    quote = match.group(1)
    k = match.end()
    while k < len(item):
        if item[k] == "\\":
            k += 2
        elif item.startswith(quote, k):
            return ""
        else:
            k += 1
    return quote


def _render(lines: list[tuple[int, list[str]]]) -> list[str]:
    """Physical lines of the output; a block header with no indented body gets `pass`."""
    out = []
    for n, (level, items) in enumerate(lines):
        out.append("    " * level + _join_line(items) + "\n")
        if items[-1] == ":" and (n + 1 == len(lines) or lines[n + 1][0] <= level):
            out.append("    " * (level + 1) + "pass\n")
    return out


_NO_SPACE_BEFORE = frozenset({",", ";", ":", ")", "]", "}"})
_NO_SPACE_AFTER = frozenset({"(", "[", "{"})


def _join_line(items: list[str]) -> str:
    """Join the items of one logical line with the spaces that read well and keep the tokens.

    A space is left out only where no two Python tokens can merge: before `, ; : ) ] }`, after
    `( [ {`, around `.` between names, before a call's or subscript's bracket, and after a
    decorator's `@`. Literals are unescaped.
    """
    parts = []
    for n, item in enumerate(items):
        if n > 0 and _needs_space(items[n - 1], item, n):
            parts.append(" ")
        parts.append(_unescape_item(item))
    return "".join(parts)


def _needs_space(prev: str, item: str, index: int) -> bool:
    """Whether to write a space between two neighbouring items (`item` is at `index`)."""
    if item in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER:
        return False
    if prev == "@" and index == 1:
        return False
    if item in ("(", "[", "."):
        return not (_is_name(prev) or prev in (")", "]", "}") or _is_literal(prev) or prev == item == ".")
    if prev == ".":
        return not _is_name(item)
    return True


def _is_name(item: str) -> bool:
    """An identifier that is not a keyword (soft keywords count as names: spacing never changes
    which tokens the parser sees, unless two tokens would merge)."""
    return item.isidentifier() and not keyword.iskeyword(item)


def _is_literal(item: str) -> bool:
    return _LITERAL_START_RE.match(item) is not None and not item.isidentifier()


def _unescape_item(item: str) -> str:
    return unescape_literal(item) if _is_literal(item) else item


# --------------------------------------------------------------------------------------------
# Docstrings
# --------------------------------------------------------------------------------------------


def render_docstring(docstring: str) -> str:
    """The docstring as an indented triple-quoted block, as it stands under its ``def`` line.

    The stripped docstring, ``\"\"\"`` inside it escaped, wrapped in triple quotes and indented
    by four spaces; a multi-line docstring indents every non-empty line and closes on its own line.
    """
    text = docstring.strip().replace('"""', '\\"\\"\\"')
    if "\n" not in text:
        return f'{DOC_INDENT}"""{text}"""'
    body = textwrap.indent(text, DOC_INDENT)[len(DOC_INDENT) :]
    return f'{DOC_INDENT}"""{body}\n{DOC_INDENT}"""'
