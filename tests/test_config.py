"""pipeline.toml: its values are the dataclass defaults, typos are errors, flags override it."""

import dataclasses
from pathlib import Path

import pytest

from sae.cli import STAGES
from sae.config import field_docs, parse_count, parse_sets, read_pipeline_toml, stage_config, to_jsonable
from sae.errors import UserError
from sae.evaluate.config import EvalConfig
from sae.flags import flag_names, from_text, is_table, parse_int
from sae.harvest.config import HarvestConfig
from sae.inspect.config import InspectConfig
from sae.pipeline import train_config
from sae.train.config import TrainConfig

PIPELINE_TOML = Path(__file__).parent.parent / "pipeline.toml"


@pytest.mark.parametrize("section, config_class", list(STAGES.items()))
def test_pipeline_toml_equals_the_dataclass_defaults(section, config_class):
    table = read_pipeline_toml(PIPELINE_TOML)[section]
    defaults = to_jsonable(config_class())
    assert {k: defaults[k] for k in table} == table
    assert all(defaults[k] in (None, []) for k in set(defaults) - set(table))  # only empty defaults left out


def test_a_typo_names_the_key_and_the_closest_one(tmp_path):
    path = tmp_path / "pipeline.toml"
    path.write_text("[harvest]\nlayer = [6]\n")
    with pytest.raises(UserError, match=r"unknown key 'layer' in \[harvest\] .*did you mean 'layers'\?"):
        stage_config(HarvestConfig, "harvest", path, {})
    path.write_text("[harvst]\nlayers = [6]\n")
    with pytest.raises(UserError, match=r"unknown key 'harvst' .*did you mean 'harvest'\?"):
        stage_config(HarvestConfig, "harvest", path, {})


def test_flags_override_the_file_and_values_are_coerced(tmp_path):
    path = tmp_path / "pipeline.toml"
    path.write_text('[harvest]\nlayers = [6, 8]\ntokens = 2e8\nmodel = "gpt2"\ncache_dir = "/data/caches"\n')
    cfg = stage_config(HarvestConfig, "harvest", path, {"model": "smollm2-135m", "site": None})
    assert cfg.model == "smollm2-135m" and cfg.layers == (6, 8) and cfg.tokens == 200_000_000
    assert cfg.cache_dir == "/data/caches" and cfg.site == "resid_pre"
    assert dataclasses.replace(cfg, layers=(1,)).layers == (1,)


def test_flag_parsers():
    (layers,) = [f for f in dataclasses.fields(HarvestConfig) if f.name == "layers"]
    assert from_text("6,8,10", tuple[int, ...], "layers") == (6, 8, 10) and parse_count("2e8") == 200_000_000
    assert parse_count("1_000") == 1000 and parse_int("-3") == -3 and parse_int("1e9") == 10**9
    assert from_text("0.5,1", tuple[float, ...], "x") == (0.5, 1.0) and from_text(None, int, "x") is None
    assert from_text('[{arch = "topk", k = 8}]', tuple[dict, ...], "sweep") == ({"arch": "topk", "k": 8},)
    assert flag_names(layers) == ["--layers", "--layer"]
    with pytest.raises(UserError, match="expected a count like 1e6, got 'lots'"):
        parse_count("lots")
    with pytest.raises(UserError, match="expected a count like 1e6, got '6;8'"):
        from_text("6;8", tuple[int, ...], "layers")


def sample_text(field: dataclasses.Field, hint) -> tuple[list[str], object]:
    """A flag and its text for a field, and the value that text must give: not the default, so that a
    flag which did not reach the config would show."""
    from sae.config import optional_inner, tuple_item

    hint, choices = optional_inner(hint), field.metadata.get("choices")
    item = tuple_item(hint)
    if item is not None and not is_table(item):
        text, value = sample_text(field, item)
        return text, (value,)
    if hint is bool:
        return [], True
    if choices:
        default = field.default[0] if isinstance(field.default, tuple) else field.default
        choice = next(c for c in choices if c != default)
        return [choice], choice
    if is_table(item):
        return ['[{arch = "topk", k = 8, dict_size = 64}]'], ({"arch": "topk", "k": 8, "dict_size": 64},)
    samples = {int: ("3", 3), float: ("1.5", 1.5), str: ("sample", "sample"), Path: ("/sample", Path("/sample"))}
    text, value = samples[hint]
    return [text], value


@pytest.mark.parametrize("section, config_class", list(STAGES.items()))
def test_every_setting_is_a_flag_and_a_pipeline_toml_key_with_help(section, config_class, tmp_path):
    """The one declaration of each field makes its flag, its pipeline.toml key and its help."""
    import typing

    import typer

    from sae.cli import app

    command = typer.main.get_command(app).commands[section]
    options = {name: param for param in command.params for name in param.opts + param.secondary_opts}
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        assert field_docs(config_class).get(field.name), f"{config_class.__name__}.{field.name} has no docstring"
        for flag in flag_names(field):
            assert flag in options, f"sae {section} has no {flag}"
        text, value = sample_text(field, hints[field.name])
        args = [f"--{field.name.replace('_', '-')}", *text]
        ctx = command.make_context(section, [*args, *(["."] if section in ("eval", "inspect") else [])])
        parsed = ctx.params[field.name]
        assert from_text(parsed, hints[field.name], field.name) == value, (field.name, parsed)
        path = tmp_path / f"{field.name}.toml"
        default = to_jsonable(config_class())[field.name]
        if default is not None:
            path.write_text(f"[{section}]\n{field.name} = {tomlish(default)}\n")
            stage_config(config_class, section, path, {})  # the key is accepted, and its default is valid


def tomlish(value) -> str:
    import json

    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def test_set_overrides_parse_toml_values_and_check_keys():
    stages = {"harvest": HarvestConfig, "train": TrainConfig, "eval": EvalConfig, "inspect": InspectConfig}
    sets = parse_sets(["train.gate_bos=true", "train.k=[16, 32]", "train.out=runs-x", "eval.tokens=8192"], stages)
    assert sets == {
        "harvest": {},
        "train": {"gate_bos": True, "k": [16, 32], "out": "runs-x"},
        "eval": {"tokens": 8192},
        "inspect": {},
    }
    with pytest.raises(UserError, match=r"unknown key 'gate_boss' in --set train\.; did you mean 'gate_bos'\?"):
        parse_sets(["train.gate_boss=true"], stages)
    with pytest.raises(UserError, match="unknown key 'trian' in --set; did you mean 'train'"):
        parse_sets(["trian.k=16"], stages)
    with pytest.raises(UserError, match="--set takes STAGE.KEY=VALUE"):
        parse_sets(["gate_bos"], stages)


@pytest.mark.parametrize("name, n_saes", [("pipeline.toml", 2), ("paper.toml", 13), ("paper-gpt2.toml", 9)])
def test_shipped_experiment_files_build_valid_configs(name, n_saes):
    path = Path(__file__).parent.parent / name
    for section, config_class in [("harvest", HarvestConfig), ("eval", EvalConfig), ("inspect", InspectConfig)]:
        stage_config(config_class, section, path, {})
    assert len(train_config(path, {}).specs()) == n_saes
