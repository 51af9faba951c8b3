"""Command-line options made from config fields: a setting's flag is its field, never a second definition.

`@settings_command(TrainConfig)` gives a typer command one option per field: `--dict-size` for
`dict_size` (plus any alias the field declares, e.g. `--layer` for `layers`), its help the field's
docstring (first sentence), its allowed values and default shown beside it. The command receives the
given values as `settings` ({field: value or None}), parsed by the field's type: a tuple takes
comma-separated items (`--k 16,32`), an int a count (`--tokens 1e9`), a bool `--x/--no-x`, and a
tuple of tables TOML (`--sweep '[{arch = "topk", k = 16}]'`).
"""

import dataclasses
import functools
import inspect
import tomllib
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from sae.config import field_docs, optional_inner, stage_fields, tuple_item
from sae.errors import UserError

CONFIG = typer.Option(None, "--config", help="pipeline.toml to read (default: ./pipeline.toml if present).")


def flag_names(field: dataclasses.Field) -> list[str]:
    """The field's flag and its declared aliases, e.g. ["--layers", "--layer"]."""
    return [f"--{field.name.replace('_', '-')}", *field.metadata.get("aliases", ())]


def first_sentence(doc: str) -> str:
    """Up to the first full stop outside parentheses: "(eq. 7)" and "(e.g. 4)" do not end a sentence."""
    text, depth = " ".join(doc.split()), 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "." and depth == 0 and (i + 1 == len(text) or text[i + 1] == " "):
            return text[: i + 1]
    return text


def option(cls: type, field: dataclasses.Field, show_default: bool = True) -> inspect.Parameter:
    """The typer option of one field: a bool is --x/--no-x; anything else is text parsed by from_text."""
    hint = typing.get_type_hints(cls)[field.name]
    help_text = first_sentence(field_docs(cls).get(field.name, ""))
    if field.metadata.get("choices"):
        help_text += f" One of: {', '.join(field.metadata['choices'])}."
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if show_default and default is not None and default != ():
        help_text += f" [default: {format_default(default)}]"
    help_text, names = escape(help_text), flag_names(field)
    if optional_inner(hint) is bool:
        names = [f"{name}/--no-{name.removeprefix('--')}" for name in names]
        return _parameter(field.name, bool, typer.Option(None, *names, help=help_text))
    return _parameter(field.name, str, typer.Option(None, *names, help=help_text, metavar=metavar(hint)))


def _parameter(name: str, annotation: type, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def format_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def metavar(hint: Any) -> str:
    hint = optional_inner(hint)
    item = tuple_item(hint)
    if is_table(item):
        return "TOML"
    if item is not None:
        return f"{metavar(item)},..."
    return {int: "N", float: "X", Path: "PATH"}.get(hint, "TEXT")


def from_text(text: str | None, hint: Any, name: str) -> Any:
    """A flag's text as the field's type; None (not given) stays None."""
    if text is None or isinstance(text, bool):
        return text
    hint = optional_inner(hint)
    item = tuple_item(hint)
    if is_table(item):
        try:
            tables = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            tables = None
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise UserError(
                f"--{name.replace('_', '-')} takes a TOML list of tables, e.g. '[{{arch = \"topk\"}}]', got '{text}'"
            )
        return tuple(tables)
    if item is not None:
        return tuple(from_text(part.strip(), item, name) for part in text.split(","))
    if hint is int:
        return parse_int(text)
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"expected a number for --{name.replace('_', '-')}, got '{text}'") from None
    if hint is Path:
        return Path(text)
    return text


def is_table(hint: Any) -> bool:
    """A TOML table: dict or dict[str, ...]."""
    return hint is dict or typing.get_origin(hint) is dict


def parse_int(text: str) -> int:
    """ "4096", "-1", "2e8" or "1_000_000" -> an int."""
    try:
        return int(text.replace("_", ""))
    except ValueError:
        pass
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise UserError(f"expected a count like 1e6, got '{text}'") from None
    if not value.is_integer():
        raise UserError(f"expected a whole number, got '{text}'")
    return int(value)


def settings_command(
    cls: type, fields: Iterable[str] | None = None, show_defaults: bool = True, into: str = "settings"
) -> Callable:
    """Decorate `command(settings, ...own options)`: the typer command gains an option per field of cls
    (or of `fields`), and `settings` holds each one's parsed value, None where the flag was not given.
    show_defaults=False: the command has defaults of its own (say them in its docstring); into: the
    name of the argument that gets them (decorators stack, each class's settings in its own)."""
    chosen = [f for f in stage_fields(cls) if fields is None or f.name in fields]
    hints = typing.get_type_hints(cls)

    def decorate(command: Callable) -> Callable:
        own = [p for name, p in inspect.signature(command).parameters.items() if name != into]
        options = [option(cls, field, show_defaults) for field in chosen]

        @functools.wraps(command)
        def with_settings(**kwargs: Any) -> Any:
            settings = {f.name: from_text(kwargs.pop(f.name), hints[f.name], f.name) for f in chosen}
            return command(**{into: settings}, **kwargs)

        parameters = own + options
        with_settings.__signature__ = inspect.Signature(parameters)
        with_settings.__annotations__ = {p.name: p.annotation for p in parameters}
        return with_settings

    return decorate
