"""`sae run`: harvest → train → eval → compare from one pipeline.toml, as the README's main command."""

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae.cache.lock import writer_lock
from sae.cache.store import open_cache, open_writer
from sae.train import trainer
from sae.train.rundir import WEIGHTS
from tests.test_cli import run_sae


@pytest.fixture
def pipeline_toml(tiny_llama, sample_parquet, tmp_path):
    """write(harvest=, train=, rest=): a pipeline.toml of the tiny model over the sample, CPU only, caches
    and runs under tmp_path; each argument adds lines to its table (rest: tables of its own)."""

    def write(harvest: str = "", train: str = "", rest: str = "") -> Path:
        config = tmp_path / "pipeline.toml"
        config.write_text(f"""
[harvest]
model = "{tiny_llama}"
dataset = "{sample_parquet}"
layers = [1]
ctx_len = 32
tokens = 2560
chunk_contexts = 16
device = "cpu"
cache_dir = "{tmp_path / "caches"}"
{harvest}

[train]
batch_size = 64
device = "cpu"
out = "{tmp_path / "runs"}"
{train}

[eval]
tokens = 512
batch_size = 8
device = "cpu"

{rest}
""")
        return config

    return write


def test_sae_run_makes_every_artifact(monkeypatch, capsys, pipeline_toml, tmp_path):
    """Trained while the harvest writes (here extending a cache begun before); harvested first instead
    (here from the cache the first run left), the same SAEs to the bit."""
    config = pipeline_toml(
        train="log_every = 10", rest='[[sweep]]\narch = ["batchtopk", "topk"]\nk = 4\ndict_size = 64'
    )
    code, _, err = run_sae(monkeypatch, capsys, "harvest", "--config", str(config), "--tokens", "1280")
    assert code == 0, err  # half the cache: `sae run` extends it, and trains on all of it
    code, out, err = run_sae(monkeypatch, capsys, "run", "--config", str(config))
    assert code == 0, err
    # one display for the two stages at once; the harvest's bar, not a message, says what training waits for
    finished = [line.split(":")[0] for line in err.splitlines() if "(100%)" in line]
    assert sorted(finished[:2]) == ["harvest", "train 2 SAE(s)"] and "waiting for" not in err
    comparison = tmp_path / "runs-comparison"
    lines = out.strip().splitlines()
    assert lines[-1] == str(comparison) and lines[0].split() == [
        "run",
        "L0",
        "NMSE",
        "CE",
        "degradation",
        "(nats)",
        "gated",
        "rows",
    ]
    # the rows a user came for: L0, NMSE, CE degradation with their standard errors, then the plots
    topk_line = next(line for line in lines if line.startswith("topk_k4_m64"))
    assert topk_line.split()[1:4] == ["4.0", "±", "0.0"] and "±" in topk_line.split()[5]
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["batchtopk_k4_m64", "topk_k4_m64"]  # only runs: `sae eval runs/*` works
    for run in runs:
        cfg = json.loads((run / "cfg.json").read_text())
        evaluation = json.loads((run / "eval.json").read_text())
        assert cfg["cache"]["layer"] == 1 and cfg["heldout"]["rows"] > 0
        assert cfg["heldout"]["l0"] == pytest.approx(4, rel=0.01)  # batchtopk: θ calibrated to L0 = k
        assert evaluation["n_tokens"] == 512 and evaluation["ce_clean"] > 0
        assert evaluation["ce_spliced"] >= evaluation["ce_clean"] - 3 * evaluation["ce_spliced_stderr"]
        assert (run / "l0_histogram.png").stat().st_size > 0
    rows = list(csv.DictReader((comparison / "table.csv").open()))
    assert [row["name"] for row in rows] == ["batchtopk_k4_m64", "topk_k4_m64"]
    assert float(rows[1]["l0_mean"]) == 4.0
    assert (comparison / "nmse_vs_l0.png").exists() and (comparison / "ce_degradation_vs_l0.png").exists()
    code, out, err = run_sae(
        monkeypatch, capsys, "run", "--config", str(config), "--no-overlap", "--out", str(tmp_path / "again")
    )
    assert code == 0, err
    assert "already holds 2,560 tokens" in err  # the cache the first run wrote, not harvested again
    for run in runs:
        assert_same_weights(run, tmp_path / "again" / run.name)
    code, out, err = run_sae(monkeypatch, capsys, "run", "--config", str(config), "--set", "train.lr=0.001")
    assert code == 1 and err == (
        f"error: {runs[0]} already holds a run of another [train] config or sweep than this sae run's: choose "
        "another --out\n"
    )  # before anything ran


def test_sae_run_again_after_a_kill_continues_to_the_same_saes(monkeypatch, capsys, pipeline_toml, tmp_path):
    """Killed mid-training, `sae run` again resumes the harvest and the training where they stopped and ends
    with the SAEs an uninterrupted `sae run` trains; run once more, it leaves them as they are."""
    config = pipeline_toml(train='arch = ["topk"]\nk = [4]\ndict_size = [64]\ncheckpoint_every = 10')
    whole = tmp_path / "whole"
    assert run_sae(monkeypatch, capsys, "run", "--config", str(config), "--out", str(whole))[0] == 0
    real_step, calls = trainer.train_step, []

    def killed_at_step_25(*args):
        calls.append(1)
        if len(calls) > 25:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(trainer, "train_step", killed_at_step_25)
    code, _, err = run_sae(monkeypatch, capsys, "run", "--config", str(config), "--out", str(tmp_path / "runs"))
    assert code == 130 and err.strip().endswith("aborted")  # as after Ctrl-C (it used to exit 0)
    monkeypatch.setattr(trainer, "train_step", real_step)
    (run,) = (tmp_path / "runs").iterdir()
    newest = max(p.name for p in run.glob("checkpoint-*"))
    assert newest == "checkpoint-000000020.pt" and not (run / "eval.json").exists()
    for _ in range(2):  # continued, then finished and only evaluated again
        code, _, err = run_sae(monkeypatch, capsys, "run", "--config", str(config), "--out", str(tmp_path / "runs"))
        assert code == 0, err
        assert_same_weights(whole / run.name, run)
    assert (run / "eval.json").exists()


def assert_same_weights(a, b) -> None:
    wa, wb = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[name], wb[name]) for name in wa)


def test_sae_run_whose_harvest_fails_in_its_thread_says_why_at_once(monkeypatch, capsys, pipeline_toml, tmp_path):
    """The harvest thread fails before it makes the cache: the training waiting for it raises that error
    (not, after --follow-timeout, that no cache appeared)."""
    config = pipeline_toml(
        harvest='text_column = "body"', train="follow_timeout = 20  # what a regression would wait for"
    )
    code, out, err = run_sae(monkeypatch, capsys, "run", "--config", str(config))
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: dataset") and "has no column 'body'" in err
    assert out == ""


def test_sae_run_on_a_cache_whose_target_it_does_not_reach_says_so(monkeypatch, capsys, pipeline_toml, tmp_path):
    """A cache a killed harvest left short of a larger target than `sae run` asks: the harvest has nothing to
    do, and the training planned for the target's chunks stops with one line instead of waiting for them."""
    config = pipeline_toml()
    code, out, err = run_sae(monkeypatch, capsys, "harvest", "--config", str(config))
    assert code == 0, err
    cache = open_cache(out.strip())
    with writer_lock(cache.location):  # as a harvest of twice the tokens killed at half way leaves it
        open_writer(cache.location, cache.spec, cache.meta["storage"], cache.d_model, {}).reserve(2 * cache.n_contexts)
    code, out, err = run_sae(monkeypatch, capsys, "run", "--config", str(config))
    assert code == 1 and out == ""
    assert (
        err.strip().splitlines()[-1].startswith(f"error: the harvest of {cache.path} ended with 80 of its target 160")
    )
