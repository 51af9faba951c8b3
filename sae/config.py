"""Settings: declared once, on the fields of each stage's config dataclass; read from pipeline.toml.

A field is a setting: its name is the pipeline.toml key and the `--set` key, its type and default are
the dataclass's, the docstring under it is its help, and `setting(...)` adds what the type cannot say
(allowed values, bounds, a flag alias such as `--layer` for `layers`). sae.flags makes every
command's options from the same fields, and validate() checks the declared bounds and choices.

Precedence: dataclass defaults < pipeline.toml < CLI flags. A key the dataclass does not have is an
error naming the key and the closest valid one, so a typo never silently falls back to a default.
"""

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from sae.errors import UserError

T = TypeVar("T")
DEFAULT_PIPELINE_TOML = Path("pipeline.toml")
SECTIONS = ["harvest", "train", "sweep", "eval", "inspect", "storage"]


def setting(
    default: Any = dataclasses.MISSING, *, choices: Sequence[str] = (), positive: bool = False,
    at_least: float | None = None, aliases: Sequence[str] = (),
) -> Any:  # fmt: skip
    """A config field with what its type does not say: allowed values (of the value, or of each item
    of a tuple), a bound (positive: > 0; at_least: ≥), extra flag names. Mutable defaults (a Path)
    are copied per instance."""
    metadata = {"choices": tuple(choices), "positive": positive, "at_least": at_least, "aliases": tuple(aliases)}
    if isinstance(default, Path):
        return dataclasses.field(default_factory=lambda: Path(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class StageConfig:
    """What every stage's config dataclass has (each extends this one): where it computes."""

    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:1, ..."""


def stage_fields(cls: type) -> list[dataclasses.Field]:
    """cls's fields, those a class declares before those it inherits (StageConfig's last): the order
    of its help."""
    declared_at = {}
    for depth, klass in enumerate(cls.__mro__):  # cls first: the farthest base that has a field declared it
        for field in dataclasses.fields(klass) if dataclasses.is_dataclass(klass) else ():
            declared_at[field.name] = depth
    return sorted(dataclasses.fields(cls), key=lambda field: declared_at[field.name])


def validate(config: Any) -> None:
    """The declared checks of every field (choices and bounds, on each item of a tuple); None passes."""
    for field in dataclasses.fields(config):
        value, meta = getattr(config, field.name), field.metadata
        for item in value if isinstance(value, tuple) else (value,):
            if item is None:
                continue
            if meta.get("choices"):
                check_choice(field.name, item, meta["choices"])
            if meta.get("positive"):
                check_positive(field.name, item)
            if meta.get("at_least") is not None and not item >= meta["at_least"]:
                raise UserError(f"{field.name} must be >= {meta['at_least']:g}, got {item}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring} from the source of cls and of the dataclasses it extends: the string
    under each annotated assignment."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:], strict=False):
            is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            if isinstance(node, ast.AnnAssign) and is_doc and isinstance(after.value.value, str):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def read_pipeline_toml(path: Path | None) -> dict[str, Any]:
    """The parsed pipeline.toml: the given path, else ./pipeline.toml if present, else {}."""
    if path is None:
        if not DEFAULT_PIPELINE_TOML.exists():
            return {}
        path = DEFAULT_PIPELINE_TOML
    if not path.exists():
        raise UserError(f"config file {path} does not exist")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: {e}") from None
    check_keys(table, SECTIONS, str(path))
    return table


def apply_storage_options(config_path: Path | None) -> None:
    """pipeline.toml's [storage] table: obstore options (endpoint, region, ...) for every object-store
    cache location opened after this; credentials stay in the environment (AWS_ACCESS_KEY_ID, ...)."""
    from sae.cache.location import set_storage_options

    set_storage_options(read_pipeline_toml(config_path).get("storage", {}))


def stage_config(cls: type[T], section: str, config_path: Path | None, overrides: dict[str, Any]) -> T:
    """cls from the [section] table of pipeline.toml, overridden by the settings that were given."""
    table = read_pipeline_toml(config_path).get(section, {})
    return build_config(cls, table, overrides, f"[{section}] of {config_path or DEFAULT_PIPELINE_TOML}")


def parse_count(text: str) -> int:
    """ "2e8", "1000000" or "1_000_000" -> an int."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise UserError(f"expected a count like 1e6, got '{text}'") from None
    if not value.is_integer() or value < 0:
        raise UserError(f"expected a non-negative whole count, got '{text}'")
    return int(value)


def parse_sets(items: list[str], stages: dict[str, type]) -> dict[str, dict[str, Any]]:
    """["train.gate_bos=true", ...] -> {"train": {"gate_bos": True}, ...}: one override per item, the
    value read as TOML (true, 0.01, [16, 32]) or else as a plain string; keys checked like the file's."""
    sets: dict[str, dict[str, Any]] = {stage: {} for stage in stages}
    for item in items:
        target, sep, text = item.partition("=")
        stage, dot, key = target.strip().partition(".")
        if not sep or not dot or not key:
            raise UserError(f"--set takes STAGE.KEY=VALUE (e.g. train.gate_bos=true), got '{item}'")
        check_keys({stage: None}, list(stages), "--set")
        check_keys({key: None}, [f.name for f in stage_fields(stages[stage])], f"--set {stage}.")
        try:
            sets[stage][key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            sets[stage][key] = text
    return sets


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} '{value}'; choose one of {', '.join(choices)}")


def check_gate_norm(value: float | None) -> None:
    """A norm gate's ratio: above 1 (a multiple of the median row norm), or 0 / None for no norm gate."""
    if value and not value > 1:  # 0 and None are "no gate"; a negative value is refused here too
        raise UserError(
            f"gate_norm must be above 1 (a multiple of the median row norm, e.g. 4), or 0 for none; got {value}"
        )


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"{name} must be positive, got {value}")


def check_keys(table: dict[str, Any], valid: list[str], where: str) -> None:
    for key in table:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise UserError(f"unknown key '{key}' in {where}{hint}")


def build_config(cls: type[T], table: dict[str, Any], overrides: dict[str, Any], where: str) -> T:
    """cls filled from table (a pipeline.toml section), then from overrides whose value is not None."""
    names = [f.name for f in stage_fields(cls)]
    check_keys(table, names, where)
    values = {**table, **{k: v for k, v in overrides.items() if v is not None}}
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(v, hints[k], k) for k, v in values.items()})


def optional_inner(hint: Any) -> Any:
    """X for X | None, else the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def tuple_item(hint: Any) -> Any | None:
    """X for tuple[X, ...], else None."""
    if typing.get_origin(hint) is not tuple:
        return None
    (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
    return item


def coerce(value: Any, hint: Any, name: str) -> Any:
    """TOML has no tuples and writes 1e9 as a float; accept what a person would naturally write."""
    if value is None:
        return None
    hint = optional_inner(hint)
    item = tuple_item(hint)
    if item is not None:  # a scalar where a list may go is a list of one: dict_size = 2304
        return tuple(coerce(v, item, name) for v in (value if isinstance(value, list | tuple) else [value]))
    if hint is int and isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{name} must be an integer, got {value}")
        return int(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    return value


def to_jsonable(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON values (Paths as strings, tuples as lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(config, f.name)) for f in stage_fields(type(config))}
