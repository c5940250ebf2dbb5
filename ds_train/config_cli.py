"""The `ds-train` command line: YAML files, `--section.key=value` overrides, `--print-config`, and a
`--help` that lists every config field with the docstring written under it in `ds_train/config.py`
and its default."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import sys
import textwrap
import typing
from typing import Any

from ds_train import errors
from ds_train.config import Config, batch_arithmetic, load_config, resolved, to_yaml

DESCRIPTION = "DeepSpeed ZeRO training of a GPT-Neo with modality-relative pre-training (MRPT)."


def parse_args(argv: list[str] | None) -> tuple[list[str], list[str], bool]:
    """Split the command line into YAML files, `--section.key=value` overrides (`--section.key value`
    works too) and `--print-config`; `--local_rank` from the deepspeed launcher is accepted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest, i = [], [], 0
    while i < len(argv):
        item = argv[i]
        key = item.split("=", 1)[0]
        if item.startswith("--") and "." in key and key not in ("--local_rank", "--local-rank"):
            if "=" not in item and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                item, i = f"{item}={argv[i + 1]}", i + 1
            overrides.append(item)
        else:
            rest.append(item)
        i += 1
    parser = argparse.ArgumentParser(
        prog="ds-train", description=DESCRIPTION, allow_abbrev=False,
        usage="ds-train [RECIPE.yaml ...] [--section.key=VALUE ...] [--print-config]",
        epilog="Precedence: defaults < YAML files (in order) < --section.key=value; every problem is reported at once.")
    parser.add_argument("configs", nargs="*", help="YAML recipe / machine files, merged in order")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (YAML, batch sizes derived) and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_help_arguments(parser)
    args = parser.parse_args(rest)
    return args.configs, overrides, args.print_config


def print_config(files: list[str], overrides: list[str]) -> int:
    """`--print-config`: the resolved config as YAML on stdout (batch sizes derived for the world size a
    launcher gives, 1 for a plain process); a bad config is refused in lines, as a run would be."""
    try:
        cfg = load_config(files, overrides)
        world = os.environ.get("WORLD_SIZE", "1")
        if not world.isdigit():
            raise errors.UsageError(f"WORLD_SIZE={world!r} is not a number of ranks")
        text = to_yaml(resolved(cfg, batch_arithmetic(cfg.train, int(world))))
    except errors.UsageError as err:
        return errors.refuse("ds-train", err)
    print(text, end="", flush=True)
    return 0


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (Python keeps none of them at run time)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _shown_default(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if value == "" else str(value)


def add_help_arguments(parser: argparse.ArgumentParser) -> None:
    """One argument group per config section, one `--section.key=VALUE` entry per field with its
    docstring and default. (Overrides are taken apart by `load_config`; these entries are for --help.)"""
    defaults = Config()
    for section in dataclasses.fields(Config):
        obj = getattr(defaults, section.name)
        hints = typing.get_type_hints(type(obj))
        group = parser.add_argument_group(f"{section.name} section")
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            text = docs.get(f.name, "")
            text = f"{text} (default: {_shown_default(getattr(obj, f.name))})".replace("%", "%%")
            group.add_argument(f"--{section.name}.{f.name}", metavar=_metavar(hints[f.name]), help=text,
                               default=argparse.SUPPRESS)


def _metavar(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return "A,B,..."
    return {bool: "true|false", int: "INT", float: "FLOAT", str: "TEXT"}.get(hint, "VALUE")
