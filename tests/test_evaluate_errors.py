"""Every bad input to `sae eval` / `sae compare` gets one line on stderr and a non-zero exit."""

import shutil

import pytest

from sae.errors import UserError
from sae.evaluate.config import EvalConfig
from tests.test_evaluate import EVAL, cache_path, data, identity_sae, make_cache, run_cli, save_sae  # noqa: F401  (module fixtures)

FLAGS = ("--tokens", "256", "--batch-size", "4", "--device", "cpu")


def one_line_error(monkeypatch, capsys, *args) -> str:
    assert run_cli(monkeypatch, *args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pipeline.toml: defaults + flags only
    return tmp_path


def test_run_dir_without_a_saved_sae(in_tmp, monkeypatch, capsys):
    (in_tmp / "empty").mkdir()
    err = one_line_error(monkeypatch, capsys, "eval", in_tmp / "empty", *FLAGS)
    assert "no saved SAE in" in err and "sae_weights.safetensors" in err
    err = one_line_error(monkeypatch, capsys, "compare", in_tmp / "empty")
    assert "has no eval.json; evaluate it first with `sae eval" in err


def test_run_whose_model_cannot_be_loaded(in_tmp, tiny_gpt2, data, monkeypatch, capsys):  # noqa: F811
    model_copy = in_tmp / "model"
    shutil.copytree(tiny_gpt2, model_copy)
    run = save_sae(in_tmp / "run", identity_sae(), make_cache(model_copy, data, in_tmp / "caches"))
    shutil.rmtree(model_copy)
    capsys.readouterr()  # the harvest's progress bar
    err = one_line_error(monkeypatch, capsys, "eval", run, *FLAGS)
    assert f"run {run}: cannot load model '{model_copy}': no such model directory" in err


def test_evaluation_data_overlapping_the_training_cache(in_tmp, cache_path, monkeypatch, capsys):  # noqa: F811
    run = save_sae(in_tmp / "run", identity_sae(), cache_path)
    err = one_line_error(monkeypatch, capsys, "eval", run, "--start-doc", "0", *FLAGS)
    assert "evaluation dataset overlaps the training cache" in err and "use --start-doc" in err
    err = one_line_error(monkeypatch, capsys, "eval", run, "--seed", "7", *FLAGS)
    assert "evaluation dataset overlaps the training cache" in err and "seed-7 order" in err


def test_too_few_evaluation_tokens(in_tmp, cache_path, monkeypatch, capsys):  # noqa: F811
    run = save_sae(in_tmp / "run", identity_sae(), cache_path)
    err = one_line_error(monkeypatch, capsys, "eval", run, *FLAGS[2:], "--tokens", "1e7")
    assert "too few evaluation tokens" in err and "fewer than the 10,000,000 asked" in err
    err = one_line_error(monkeypatch, capsys, "eval", run, *FLAGS[2:], "--tokens", "40")
    assert "too few evaluation tokens: tokens=40 is less than 2 contexts of 32" in err


def test_sae_d_model_differs_from_the_site(in_tmp, cache_path, monkeypatch, capsys):  # noqa: F811
    run = save_sae(in_tmp / "run", identity_sae(16), cache_path)
    err = one_line_error(monkeypatch, capsys, "eval", run, *FLAGS)
    assert "the SAE has d_in=16 but" in err and "has d_model=32" in err


def test_moved_cache_and_bad_config_values(in_tmp, cache_path, monkeypatch, capsys):  # noqa: F811
    run = save_sae(in_tmp / "run", identity_sae(), cache_path)
    err = one_line_error(monkeypatch, capsys, "eval", run, "--cache", in_tmp / "gone", *FLAGS)
    assert "is not there; give its path with --cache" in err
    with pytest.raises(UserError, match="batch_size must be positive, got 0"):
        EvalConfig(**{**EVAL, "batch_size": 0})
    with pytest.raises(UserError, match=r"dense_threshold must be in \(0, 1\), got 2"):
        EvalConfig(dense_threshold=2)
