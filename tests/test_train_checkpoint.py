"""Saved run directories: SAELens layout, raw-activation weights, reload, and the `sae train` CLI."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sae.cache.store import open_cache
from sae.cli import app
from sae.train.config import TrainConfig
from sae.train.gate import Gate
from sae.train.inputs import InputSetup
from sae.train.rundir import WEIGHTS, load_checkpoint, load_sae
from sae.train.sae import SparseAutoencoder
from sae.train.state import TrainState
from sae.train.trainer import run_training, train_step
from tests.synthetic import planted_acts, write_cache

D, CTX, CHUNK_CTX = 32, 16, 16
PIPELINE_TOML = Path(__file__).parent.parent / "pipeline.toml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    acts_RD = planted_acts(6 * CHUNK_CTX * CTX, D, 64, 4, seed=0) * 5 + 1.0  # an offset and a scale to undo
    return write_cache(tmp_path_factory.mktemp("caches"), acts_RD, CTX, CHUNK_CTX)


@pytest.mark.parametrize("normalize", ["scale", "standardize", "none"])
def test_saved_saes_act_on_raw_activations_like_the_trained_ones(cache, tmp_path, normalize):
    cfg = TrainConfig(
        arch=("batchtopk", "topk", "jumprelu", "relu", "matryoshka_batchtopk"), k=(4,), dict_size=(96,), batch_size=128, lr=3e-3,
        normalize=normalize, log_every=5, checkpoint_every=10, buffer_chunks=2, out=tmp_path,
    )  # fmt: skip
    run_dirs = run_training(cfg, cache)
    held = open_cache(cache)
    x_BD = held.read_acts(0, held.n_chunks - 1).float()
    for run_dir, spec in zip(run_dirs, cfg.specs(), strict=True):
        record = json.loads((run_dir / "cfg.json").read_text())
        tensors = load_file(run_dir / WEIGHTS)
        thresholded = spec.arch in ("batchtopk", "jumprelu", "matryoshka_batchtopk")
        assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if thresholded else set())
        assert tensors["W_enc"].shape == (D, 96) and tensors["W_dec"].shape == (96, D)
        assert record["architecture"] == {"batchtopk": "jumprelu", "topk": "topk"}.get(
            spec.arch, record["architecture"]
        )
        assert record["normalize_activations"] == ("layer_norm" if normalize == "standardize" else "none")
        # the SAE as it trained, its input space set at construction, from the last checkpoint: the same
        # encode(x) and reconstruction of raw rows as the saved one, whose scale is in its weights
        trained = SparseAutoencoder(spec, D, cfg, normalize=normalize, input_scale=record["input"]["scale"])
        trained.load_state_dict(load_checkpoint(run_dir, record["step"], torch.device("cpu"))["sae"])
        if spec.arch in ("batchtopk", "matryoshka_batchtopk"):  # the saved θ is chosen after the last checkpoint
            trained.theta.fill_(record["theta"])
        trained.eval()
        loaded = load_sae(run_dir)
        with torch.no_grad():
            expected_BD, expected_BM = trained.reconstruct(x_BD)
            recon_BD, latents_BM = loaded.reconstruct(x_BD)
            torch.testing.assert_close(loaded.encode(x_BD), trained.encode(x_BD), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(recon_BD, expected_BD, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(latents_BM, expected_BM, rtol=1e-4, atol=1e-4)
        fvu = float((recon_BD - x_BD).square().sum() / (x_BD - x_BD.mean(0)).square().sum())
        assert fvu == pytest.approx(record["heldout"]["fvu"], rel=1e-3)  # the held-out chunk is these rows
        assert float((latents_BM > 0).sum(1).float().mean()) == pytest.approx(record["heldout"]["l0"], rel=1e-3)


@pytest.mark.parametrize("normalize", ["scale", "standardize"])
def test_sae_lens_loads_a_run_as_it_is(cache, tmp_path, normalize):
    """Checked with sae-lens 6.54.12; skipped where sae_lens is not installed."""
    sae_lens = pytest.importorskip("sae_lens")
    cfg = TrainConfig(
        arch=("batchtopk", "topk", "jumprelu", "relu", "matryoshka_batchtopk"), k=(4,), dict_size=(96,), batch_size=128,
        normalize=normalize, out=tmp_path,
    )  # fmt: skip
    for run_dir in run_training(cfg, cache):
        theirs = sae_lens.SAE.load_from_disk(str(run_dir))
        # read as a SAELens 6 config: its metadata kept, not dropped as a pre-6.0 one's would be
        spec = open_cache(cache).spec
        assert theirs.cfg.metadata.hook_name == "blocks.0.hook_resid_pre"
        assert theirs.cfg.metadata.model_name == spec["model"] and theirs.cfg.metadata.context_size == spec["ctx_len"]
        ours = load_sae(run_dir)
        x_BD = torch.randn(64, D) * 5 + 1
        with torch.no_grad():
            torch.testing.assert_close(theirs(x_BD), ours.reconstruct(x_BD)[0], rtol=1e-4, atol=1e-4)


def test_cli_errors_are_one_line(cache, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--cache", str(cache), "--k", "0", "--out", str(tmp_path)])
    assert "k must be a positive integer, got 0" in str(result.exception)
    toml = tmp_path / "pipeline.toml"
    toml.write_text(f'[harvest]\ncache_dir = "{tmp_path / "none"}"\n')
    result = runner.invoke(app, ["train", "--config", str(toml)])
    assert "no cache in" in str(result.exception) and "make it with `sae harvest --model" in str(result.exception)
    result = runner.invoke(app, ["train", "--resume", str(tmp_path), "--k", "4"])
    assert "is not a run directory (no cfg.json)" in str(result.exception)


def test_cli_trains_a_sweep_and_resumes_it(cache, tmp_path):
    runner = CliRunner()
    args = ["train", "--cache", str(cache), "--arch", "batchtopk,topk", "--k", "4,8", "--dict-size", "64"]
    result = runner.invoke(app, [*args, "--batch-size", "128", "--tokens", "1280", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["batchtopk_k4_m64", "batchtopk_k8_m64", "topk_k4_m64", "topk_k8_m64"]
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "topk_k8_m64")])
    assert result.exit_code == 0, result.output  # already at its last step: nothing more to do


def test_a_checkpoint_with_the_encoder_as_d_by_m_resumes_exactly(tmp_path):
    """Checkpoints written before the encoder was stored a row per latent hold W_enc [d, m] and Adam
    moments of that shape: restored, the SAE and its optimiser take the same next step as the original."""
    cfg = TrainConfig(arch=("batchtopk",), k=(4,), dict_size=(96,), batch_size=128, lr=3e-3)
    x_SBD = planted_acts(4 * 128, D, 64, 4, seed=1).view(4, 128, D) * 3
    setups = [InputSetup(Gate(), 1.0, 0.0, None)]
    states = [TrainState(cfg, cfg.specs(), D, setups, 4, torch.device("cpu")) for _ in range(2)]
    ours = states[0]
    for x_BD in x_SBD[:3]:
        train_step(ours.saes[0], ours.models[0], ours.opts[0], x_BD, cfg, 1, ours.dead[0])
    old = copy.deepcopy(ours.checkpoint(0, [None]))
    old["sae"]["W_enc"] = old["sae"].pop("W_enc_MD").t().contiguous()  # as the older code saved them
    for name in ("exp_avg", "exp_avg_sq"):
        old["optim"]["state"][0][name] = old["optim"]["state"][0][name].t().contiguous()
    restored = states[1]
    restored.restore([old], 0, [tmp_path], "cache")
    for state in (ours, restored):
        train_step(state.saes[0], state.models[0], state.opts[0], x_SBD[3], cfg, 1, state.dead[0])
    assert restored.saes[0].W_enc_MD.shape == (96, D)
    for name, p in ours.saes[0].named_parameters():
        assert torch.equal(p, getattr(restored.saes[0], name)), name
