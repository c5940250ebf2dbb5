"""The linearized code form: exact encodings, the AST round trip, and ragged model output.

The reference for the round trip is always `ast.parse` of the original source: for any Python
source, `ast.dump(ast.parse(delinearize(linearize(src))))` must equal `ast.dump(ast.parse(src))`.
"""

from __future__ import annotations

import ast
import io
import os
import sysconfig
import tokenize
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ds_train.data import delinearize, linearize
from ds_train.data.codec import escape_literal, split_signature, unescape_literal

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def dump(source: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources
        return ast.dump(ast.parse(source))


def assert_round_trip(source: str) -> str:
    """Check the property on one source; return its linearized form."""
    text = linearize(source)
    assert text.split() == text.split(" "), "an item contains whitespace or two spaces in a row"
    assert dump(delinearize(text)) == dump(source)
    return text


# --------------------------------------------------------------------------------------------
# exact encodings (hand-written expected strings)
# --------------------------------------------------------------------------------------------


def test_linearize_matches_the_corpus_example() -> None:
    source = "def add(a, b):\n    return a + b\n"
    assert linearize(source) == "def add ( a , b ) : <NEW_LINE> <INDENT> return a + b <NEW_LINE> <DEDENT>"


def test_linearize_drops_comments_blank_lines_and_continuations() -> None:
    source = "# head\nx = (1 +  # one\n     2)\n\ny = 3 + \\\n    4\n"
    assert linearize(source) == "x = ( 1 + 2 ) <NEW_LINE> y = 3 + 4 <NEW_LINE>"


def test_linearize_nested_blocks_close_every_indent() -> None:
    source = "class A:\n    def f(self):\n        if x:\n            return 1\nz = 2\n"
    assert linearize(source) == (
        "class A : <NEW_LINE> <INDENT> def f ( self ) : <NEW_LINE> <INDENT> if x : <NEW_LINE> "
        "<INDENT> return 1 <NEW_LINE> <DEDENT> <DEDENT> <DEDENT> z = 2 <NEW_LINE>"
    )


def test_literals_stay_one_item_with_escaped_whitespace() -> None:
    source = 's = """a b\n\tc""" + f"{x!r: >4} y" + r"\\d ␣\xa0▁"\n'
    expected = 's = """a␣b⏎⇥c""" + f"{x!r:␣>4}␣y" + r"\\d␣⁅2423⁆⁅a0⁆⁅2581⁆" <NEW_LINE>'
    assert linearize(source) == expected
    assert delinearize(expected) == source


def test_linearized_code_survives_the_project_tokenizer() -> None:
    """A sentencepiece tokenizer of the project (tests/assets) gives back the escaped literals."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).parent / "assets" / "tokenizer")
    source = 's = """a  b\n\tc""" + f"{x!r: >4} y" + r"\\d ␣\xa0▁⁅"\nif s:\n    t = {1: \'\\\\\'}\n'
    text = linearize(source)
    back = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    assert back == text
    assert delinearize(back) == source


def test_delinearize_spacing_reads_like_python() -> None:
    text = linearize(
        "@functools.wraps(f)\ndef g(*a, **k) -> dict[str, int]:\n    return {k: v for k, v in x.items()}[1:]\n"
    )
    assert delinearize(text) == (
        "@functools.wraps(f)\ndef g(* a, ** k) -> dict[str, int]:\n    return {k: v for k, v in x.items()}[1:]\n"
    )


def test_linearize_rejects_untokenizable_source() -> None:
    with pytest.raises(ValueError, match="cannot tokenize"):
        linearize("x = (1,\n")
    with pytest.raises(ValueError, match="cannot tokenize"):
        linearize("if x:\n        a\n    b\n")


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_literal_escaping_is_reversible_and_whitespace_free(text: str) -> None:
    escaped = escape_literal(text)
    assert not any(c.isspace() for c in escaped)
    assert unescape_literal(escaped) == text


# --------------------------------------------------------------------------------------------
# the round trip on hand-written tricky sources
# --------------------------------------------------------------------------------------------

TRICKY_SOURCES = [
    # nested f-strings, format specs, conversions, doubled braces, spaces inside fields
    "x = f\"a {b!r:>{w}} {{c}} {f'{d}'} {e if f else g}\"\n",
    "y = f'''\n  {a\n  + b}\n  {c:%Y %m}'''\n",
    "z = f\"{x = }\" F'{y!s}' rf'\\d{z}' fr\"{w}\\n\"\n",
    # implicit concatenation across lines, in brackets and with continuations
    "s = ('a b'\n     \"c  d\"\n     'e')\nt = 'x' \\\n    'y'\n",
    # string prefixes and triple quotes with embedded newlines and quotes
    "a = rb'\\x00 b' + Rb\"q\" + br'''z''' + BR\"\"\" y \"\"\"\nb = u'u' + U\"v\"\nc = b'\\t'\n",
    "d = '''it's \"quoted\"\n  and \\'\\'\\' spaced '''\ne = \"\"\"\n\n\n\"\"\"\n",
    's = \'a\\\nb\'\nt = """c\\\nd"""\n',
    # decorators, async, classes
    (
        "@decorator\n@other.attr(1, k=2)\nclass A(B, metaclass=M):\n    @property\n    async def f(self):\n"
        "        async with a as b, c:\n            async for x in y:\n                await z\n"
    ),
    # match statements with soft keywords used as names elsewhere
    (
        "match = 1\ncase = 2\ntype = 3\nmatch command.split():\n    case [action]:\n        pass\n"
        '    case ["go", direction] if direction:\n        go(direction)\n'
        '    case Point(x=0, y=0) | {"k": _, **rest}:\n        pass\n    case _:\n        pass\n'
    ),
    # walrus, lambdas, comprehensions, star expressions
    "if (n := len(a)) > 10:\n    f = lambda x, *a, k=1, **kw: (x, a, k, kw)\n    g = [y for x in a if (y := x)]\n",
    "print(*args, sep='', **kw)\nfirst, *rest = items\n",
    # tabs, semicolons, empty-ish blocks, one-liners
    "if x:\n\ty = 1; z = 2\n\tif y:\n\t\tpass\nelse: pass\n",
    "def f(): pass\nclass C: x = 1; y = 2\nwhile 0: break\nfor i in r: continue\n",
    "try:\n    pass\nexcept (A, B) as e:\n    raise X from e\nelse:\n    pass\nfinally:\n    ...\n",
    "try:\n    pass\nexcept* (A, B) as e:\n    pass\n",
    # type hints, defaults, positional-only and keyword-only parameters
    (
        "def f(a: int, /, b: 'str' = 'x y', *, c: list[dict[str, int]] | None = None) -> tuple[int, ...]:\n"
        "    v: int = 1\n    w: float\n    return a,\n"
    ),
    # global / nonlocal at several indent levels
    "global g0\ndef f():\n    global g1, g2\n    def h():\n        nonlocal x\n        if x:\n            global g3\n",
    # numbers whose spacing matters
    "x = 1 .real + 1.0.imag + 0x1f.bit_length() + 1e5j + 1_000 + 0o17 + 0b1 + ...\n",
    # relative imports and dotted names
    "from . import a\nfrom .. import b\nfrom ...c.d import e as f\nimport g.h.i as j\n",
    # Windows newlines, form feed, a file without a final newline, unicode identifiers
    "x = 1\r\ny = '''a\r\nb'''\r\n\x0cz = 3",
    "données = 'é ü'\nπ = 3.14\n",
    # a docstring-only body, ellipsis body, decorators with comments between
    "def f():\n    '''doc string'''\n\n\n@a  # comment\n# another\n@b\ndef g(): ...\n",
]


@pytest.mark.parametrize("source", TRICKY_SOURCES, ids=range(len(TRICKY_SOURCES)))
def test_round_trip_tricky_sources(source: str) -> None:
    assert_round_trip(source)


# Syntax of Python 3.12+ (PEP 701 f-strings, PEP 695 generics): the GPU machines run 3.12.
NEWER_SOURCES = [
    'x = f"{d["k"]} {f"{a["b"]}"}"\n',
    'y = f"""{\n    a  # a comment inside a replacement field\n    + b\n}"""\n',
    "type Alias[T] = list[T]\ndef f[T: int, *Ts, **P](x: T) -> T:\n    return x\nclass A[T]:\n    pass\n",
    'z = f\'{x:{"a" if y else "b"}}\' f\'{"\\n".join(s)}\'\n',
]


def test_sources_of_newer_pythons() -> None:
    """Round trip where this Python parses them; elsewhere linearize returns or raises ValueError."""
    for source in NEWER_SOURCES:
        try:
            dump(source)
        except SyntaxError:
            try:
                text = linearize(source)
            except ValueError:
                continue
            assert isinstance(delinearize(text), str)
        else:
            assert_round_trip(source)


def test_round_trip_of_empty_and_comment_only_sources() -> None:
    assert linearize("") == ""
    assert linearize("# only a comment\n\n") == ""
    assert delinearize("") == ""


# --------------------------------------------------------------------------------------------
# the round trip on generated sources (random ASTs, unparsed)
# --------------------------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "x_1", "self", "_", "match", "case", "type", "print", "données"])


def node(cls: type[ast.AST], **fields: object) -> ast.AST:
    """An AST node with the fields this Python version has and that were not given set empty."""
    for name in cls._fields:
        fields.setdefault(
            name, [] if name in ("type_params", "decorator_list", "keywords", "bases") else None
        )
    return cls(**{k: v for k, v in fields.items() if k in cls._fields})


def load(name: str) -> ast.Name:
    return ast.Name(name, ast.Load())


def store(name: str) -> ast.Name:
    return ast.Name(name, ast.Store())


LEAVES = st.one_of(
    NAMES.map(load),
    st.integers(0, 10**20).map(ast.Constant),
    st.floats(min_value=0, allow_nan=False, allow_infinity=False).map(ast.Constant),
    st.text(max_size=10).map(ast.Constant),
    st.binary(max_size=6).map(ast.Constant),
    st.sampled_from([None, True, False, ...]).map(ast.Constant),
)
BINOPS = st.sampled_from(
    [ast.Add, ast.Sub, ast.Mult, ast.MatMult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitOr]
)


def fstring(value: ast.expr, text: str, conversion: int, spec: str | None) -> ast.JoinedStr:
    format_spec = ast.JoinedStr([ast.Constant(spec)]) if spec else None
    return ast.JoinedStr([ast.Constant(text), ast.FormattedValue(value, conversion, format_spec)])


def extend_expressions(inner: st.SearchStrategy[ast.expr]) -> st.SearchStrategy[ast.expr]:
    lambda_args = st.lists(NAMES, max_size=3, unique=True).map(
        lambda names: node(
            ast.arguments,
            posonlyargs=[],
            args=[ast.arg(n) for n in names],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[],
        )
    )
    return st.one_of(
        st.builds(ast.BinOp, inner, BINOPS.map(lambda op: op()), inner),
        st.builds(ast.UnaryOp, st.sampled_from([ast.USub, ast.Not, ast.Invert]).map(lambda op: op()), inner),
        st.builds(
            ast.Compare,
            inner,
            st.lists(
                st.sampled_from([ast.Lt, ast.In, ast.IsNot]).map(lambda op: op()), min_size=1, max_size=2
            ).map(list),
            st.lists(inner, min_size=2, max_size=2),
        ).map(lambda c: ast.Compare(c.left, c.ops, c.comparators[: len(c.ops)])),
        st.builds(
            lambda f, a, k: ast.Call(f, a, [ast.keyword(n, v) for n, v in k]),
            inner,
            st.lists(inner, max_size=2),
            st.lists(st.tuples(NAMES, inner), max_size=2, unique_by=lambda t: t[0]),
        ),
        st.builds(lambda v, n: ast.Attribute(v, n, ast.Load()), inner, NAMES),
        st.builds(
            lambda v, lo, hi: ast.Subscript(v, ast.Slice(lo, hi), ast.Load()),
            inner,
            st.none() | inner,
            st.none() | inner,
        ),
        st.builds(ast.IfExp, inner, inner, inner),
        st.builds(ast.Lambda, lambda_args, inner),
        st.builds(
            fstring,
            inner,
            st.text(max_size=5),
            st.sampled_from([-1, ord("r"), ord("s")]),
            st.sampled_from([None, ">10", " ^8", "%Y %m"]),
        ),
        st.builds(lambda xs: ast.Tuple(xs, ast.Load()), st.lists(inner, max_size=3)),
        st.builds(lambda xs: ast.List(xs, ast.Load()), st.lists(inner, max_size=3)),
        st.builds(
            lambda ks, vs: ast.Dict(ks, vs[: len(ks)] + ks[len(vs) :]),
            st.lists(inner, max_size=2),
            st.lists(inner, max_size=2),
        ),
        st.builds(lambda n, v: ast.NamedExpr(store(n), v), NAMES, inner),
        st.builds(
            lambda e, n, it: ast.ListComp(e, [ast.comprehension(store(n), it, [], 0)]), inner, NAMES, inner
        ),
    )


EXPRESSIONS = st.recursive(LEAVES, extend_expressions, max_leaves=6)


def extend_statements(body: st.SearchStrategy[list[ast.stmt]]) -> st.SearchStrategy[list[ast.stmt]]:
    arguments = st.lists(st.tuples(NAMES, st.none() | EXPRESSIONS), max_size=3, unique_by=lambda t: t[0]).map(
        lambda ps: node(
            ast.arguments,
            posonlyargs=[],
            args=[ast.arg(n, a) for n, a in ps],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[],
        )
    )
    compound = st.one_of(
        st.builds(lambda t, b, o: ast.If(t, b, o), EXPRESSIONS, body, st.just([]) | body),
        st.builds(lambda t, b: ast.While(t, b, []), EXPRESSIONS, body),
        st.builds(
            lambda n, it, b: node(ast.For, target=store(n), iter=it, body=b, orelse=[]),
            NAMES,
            EXPRESSIONS,
            body,
        ),
        st.builds(
            lambda e, n, b: node(ast.With, items=[ast.withitem(e, store(n))], body=b),
            EXPRESSIONS,
            NAMES,
            body,
        ),
        st.builds(
            lambda b, h, f: ast.Try(b, [ast.ExceptHandler(load("E"), "e", h)], [], f), body, body, body
        ),
        st.builds(
            lambda cls, n, a, b, r, d: node(cls, name=n, args=a, body=b, returns=r, decorator_list=d),
            st.sampled_from([ast.FunctionDef, ast.AsyncFunctionDef]),
            NAMES,
            arguments,
            body,
            st.none() | EXPRESSIONS,
            st.lists(EXPRESSIONS, max_size=2),
        ),
        st.builds(
            lambda n, bases, b: node(ast.ClassDef, name=n, bases=bases, keywords=[], body=b),
            NAMES,
            st.lists(NAMES.map(load), max_size=2),
            body,
        ),
        st.builds(
            lambda s, b: ast.Match(s, [ast.match_case(ast.MatchAs(None, "y"), None, b)]), EXPRESSIONS, body
        ),
    )
    return st.lists(compound | SIMPLE_STATEMENT, min_size=1, max_size=3)


SIMPLE_STATEMENT = st.one_of(
    st.builds(lambda n, v: node(ast.Assign, targets=[store(n)], value=v), NAMES, EXPRESSIONS),
    st.builds(lambda n, t, v: ast.AnnAssign(store(n), t, v, 1), NAMES, EXPRESSIONS, st.none() | EXPRESSIONS),
    st.builds(ast.Expr, EXPRESSIONS),
    st.builds(ast.Return, st.none() | EXPRESSIONS),
    st.builds(lambda ns: ast.Global(ns), st.lists(NAMES, min_size=1, max_size=2, unique=True)),
    st.builds(
        lambda m, n, lvl: ast.ImportFrom(m, [ast.alias(n)], lvl if m else lvl + 1),
        st.none() | NAMES,
        NAMES,
        st.integers(0, 3),
    ),
    st.just(ast.Pass()),
)
PROGRAMS = st.recursive(st.lists(SIMPLE_STATEMENT, min_size=1, max_size=3), extend_statements, max_leaves=6)


def unparse(body: list[ast.stmt]) -> str:
    """Source text of a generated program; examples `ast.unparse` cannot write are discarded."""
    module = ast.fix_missing_locations(ast.Module(body, []))
    try:
        source = ast.unparse(module)
        dump(source)
    except (ValueError, SyntaxError, RecursionError):  # e.g. a backslash inside an f-string field on 3.11
        assume(False)
    return source + "\n"


@given(PROGRAMS)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
def test_round_trip_generated_programs(body: list[ast.stmt]) -> None:
    assert_round_trip(unparse(body))


# --------------------------------------------------------------------------------------------
# the round trip over the standard library
# --------------------------------------------------------------------------------------------


def stdlib_sources() -> list[Path]:
    """Every `.py` file of the standard library (not site-packages), sorted.

    The default suite takes every third file; DS_TRAIN_FULL_STDLIB=1 takes them all.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )
    return files if os.environ.get("DS_TRAIN_FULL_STDLIB") == "1" else files[::3]


def read_parsable(path: Path) -> tuple[str, str] | None:
    """The decoded text of a file that parses on this Python and its AST dump, else None."""
    try:
        data = path.read_bytes()
        text = data.decode(tokenize.detect_encoding(io.BytesIO(data).readline)[0])
        return text, dump(text)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
        return None


@pytest.mark.slow
def test_round_trip_standard_library() -> None:
    checked, failures = 0, []
    for path in stdlib_sources():
        parsed = read_parsable(path)
        if parsed is None:
            continue
        source, reference = parsed
        checked += 1
        try:
            if dump(delinearize(linearize(source))) != reference:
                failures.append(f"{path}: different AST")
        except (ValueError, SyntaxError) as err:
            failures.append(f"{path}: {err}")
    assert checked > 400, f"only {checked} stdlib files were checked"
    assert failures == []


# --------------------------------------------------------------------------------------------
# delinearize on ragged input
# --------------------------------------------------------------------------------------------

VOCABULARY = [
    "<NEW_LINE>",
    "<INDENT>",
    "<DEDENT>",
    "<NEW_",
    "<IND",
    "<eot>",
    "<pad>",
    "<unk>",
    "def",
    "f",
    "(",
    ")",
    ":",
    "=",
    "x",
    "1",
    "'a␣b'",
    '"open',
    "'''",
    "return",
    "if",
    "@",
    ".",
    ",",
    "lambda",
    "⁅zz⁆",
    "⁅110000⁆",
    "\\",
]


@given(st.lists(st.sampled_from(VOCABULARY) | st.text(max_size=4), max_size=40))
@settings(max_examples=400, deadline=None)
def test_delinearize_never_raises_on_junk(items: list[str]) -> None:
    assert isinstance(delinearize(" ".join(items)), str)


@given(st.text(max_size=80))
@settings(max_examples=200, deadline=None)
def test_delinearize_never_raises_on_any_text(text: str) -> None:
    assert isinstance(delinearize(text), str)


@given(PROGRAMS, st.data())
@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
def test_delinearize_repairs_harmless_noise(body: list[ast.stmt], data: st.DataObject) -> None:
    """Doubled newlines, special tokens, and a missing tail of newline/dedents keep the AST."""
    source = unparse(body)
    items = linearize(source).split()
    noisy = []
    for item in items:
        noisy.append(item)
        if item == "<NEW_LINE>" and data.draw(st.booleans()):
            noisy.append(data.draw(st.sampled_from(["<NEW_LINE>", "<pad>", "<eot>"])))
    while noisy and noisy[-1] in ("<NEW_LINE>", "<DEDENT>") and data.draw(st.booleans()):
        noisy.pop()
    assert dump(delinearize(" ".join(noisy))) == dump(source)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("def f ( ) : <NEW_LINE> <INDENT>", "def f():\n    pass\n"),  # cut off after the header
        ("def f ( ) : <NEW_LINE> <INDENT> return 1 <NEW_", "def f():\n    return 1\n"),  # partial marker
        ("<DEDENT> <DEDENT> x = 1 <NEW_LINE> <DEDENT>", "x = 1\n"),  # dedent below the margin
        ("x = 1 <NEW_LINE> <INDENT> y = 2 <NEW_LINE>", "x = 1\ny = 2\n"),  # indent without a header
        ("if x : <NEW_LINE> <INDENT> <INDENT> y <NEW_LINE>", "if x:\n    y\n"),  # doubled indent
        ("x = 'abc", "x = 'abc'\n"),  # literal cut off: closed
        ("x = 'abc\\", "x = 'abc'\n"),  # ... even after a backslash
        (
            "print ( \"hello world\" , 'a  b' ) <NEW_LINE>",
            "print(\"hello world\", 'a b')\n",
        ),  # unescaped spaces
        ("<bot> x = 1 <eot> <pad> <pad>", "x = 1\n"),  # special tokens
        ("", ""),
    ],
)
def test_delinearize_ragged_cases(text: str, expected: str) -> None:
    assert delinearize(text) == expected
    ast.parse(delinearize(text))


# --------------------------------------------------------------------------------------------
# split_signature
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "header"),
    [
        ("def add(a, b):\n    return a + b\n", "def add ( a , b ) :"),
        (
            "@a.b(1)\n@c\nasync def f(x: dict[str, int] = {1: 2}) -> 'T':\n    pass\n",
            "@ a . b ( 1 ) <NEW_LINE> @ c <NEW_LINE> async def f ( x : dict [ str , int ] = { 1 : 2 } ) -> 'T' :",
        ),
        ("def f(k=lambda: 1) -> (lambda: 2): return 3\n", "def f ( k = lambda : 1 ) -> ( lambda : 2 ) :"),
        ("class A(B, metaclass=M): x = 1\n", "class A ( B , metaclass = M ) :"),
    ],
)
def test_split_signature(source: str, header: str) -> None:
    text = linearize(source)
    head, rest = split_signature(text)
    assert head == header
    assert head + " " + rest == text
    # The header is a whole def/class line: with `pass` as its body it parses.
    ast.parse(delinearize(head + " pass <NEW_LINE>"))


def test_split_signature_block_body_starts_with_newline_indent() -> None:
    _, rest = split_signature(linearize("def f():\n    return 1\n"))
    assert rest == "<NEW_LINE> <INDENT> return 1 <NEW_LINE> <DEDENT>"


@pytest.mark.parametrize("text", ["x = 1 <NEW_LINE>", "@ d <NEW_LINE> x = 1", "def f ( x <NEW_LINE>", ""])
def test_split_signature_rejects_non_definitions(text: str) -> None:
    with pytest.raises(ValueError, match="not a linearized function or class"):
        split_signature(text)
