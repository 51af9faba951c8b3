"""pipeline.toml: its values are the dataclass defaults, typos are errors, flags override it."""

import dataclasses
from pathlib import Path

import pytest

from sae.config import parse_count, parse_ints, parse_sets, read_pipeline_toml, stage_config, to_jsonable
from sae.errors import UserError
from sae.evaluate.config import EvalConfig
from sae.harvest.config import HarvestConfig
from sae.train.cli import train_config
from sae.train.config import TrainConfig

PIPELINE_TOML = Path(__file__).parent.parent / "pipeline.toml"


@pytest.mark.parametrize(
    "section, config_class", [("harvest", HarvestConfig), ("train", TrainConfig), ("eval", EvalConfig)]
)
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
    assert parse_ints("6,8,10") == (6, 8, 10) and parse_count("2e8") == 200_000_000
    assert parse_count("1_000") == 1000
    with pytest.raises(UserError, match="expected a count like 1e6, got 'lots'"):
        parse_count("lots")
    with pytest.raises(UserError, match="expected comma-separated integers, got '6;8'"):
        parse_ints("6;8")


def test_set_overrides_parse_toml_values_and_check_keys():
    stages = {"harvest": HarvestConfig, "train": TrainConfig, "eval": EvalConfig}
    sets = parse_sets(["train.gate_bos=true", "train.k=[16, 32]", "train.out=runs-x", "eval.tokens=8192"], stages)
    assert sets == {
        "harvest": {},
        "train": {"gate_bos": True, "k": [16, 32], "out": "runs-x"},
        "eval": {"tokens": 8192},
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
    for section, config_class in [("harvest", HarvestConfig), ("eval", EvalConfig)]:
        stage_config(config_class, section, path, {})
    assert len(train_config(path, {}).specs()) == n_saes
