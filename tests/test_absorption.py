"""First-letter absorption: the measure on planted SAEs whose absorption is known, the main-latent
search, the probes, and `sae eval --absorption` end to end on a tiny model."""

import json
import math

import pytest
import torch

from sae.evaluate.absorption import LETTERS, absorption, main_latents, projections
from sae.evaluate.probes import f1_score, fit_logistic, train_probes
from sae.train.config import SAESpec
from sae.train.sae import SparseAutoencoder

D = 4
E = torch.eye(D)


def planted_sae(absorbing: bool) -> SparseAutoencoder:
    """Two latents on rows of a letter, whose probe direction is e0. Absorbing: latent 0 ("starts with
    S") reads e0 − e1 and so stays silent on "short" rows 2e0 + 2e1, which latent 1 reads, its decoder
    (e0 + e1)/√2 carrying the letter's direction. Not absorbing: latent 0 reads e0 everywhere, latent 1
    reads and writes e1 alone."""
    sae = SparseAutoencoder(SAESpec("relu", 1, 3, 0.0, 0.0), D)
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        if absorbing:
            sae.W_enc.copy_(torch.stack([E[0] - E[1], math.sqrt(2) * E[1], E[2]], dim=1))
            sae.W_dec.copy_(torch.stack([E[0], (E[0] + E[1]) / math.sqrt(2), E[2]]))
        else:
            sae.W_enc.copy_(torch.stack([E[0], E[1], E[2]], dim=1))
            sae.W_dec.copy_(torch.stack([E[0], E[1], E[2]]))
    return sae.eval()


def letter_rows() -> torch.Tensor:
    """10 ordinary rows of the letter (2e0, plus an unrelated e2), 5 "short" rows (2e0 + 2e1)."""
    return torch.cat([(2 * E[0] + E[2]).expand(10, D), (2 * E[0] + 2 * E[1]).expand(5, D)])


def test_an_absorbing_latent_is_found_with_its_fraction():
    x_WD, probe_D = letter_rows(), E[0]
    acts_WM, proj_WM, cos_M = projections(planted_sae(absorbing=True), x_WD, probe_D)
    fraction_W, full_W = absorption(proj_WM, cos_M, acts_WM, x_WD @ probe_D, main=[0])
    assert fraction_W.tolist() == [0.0] * 10 + [1.0] * 5  # the main latent carries the ordinary rows
    assert full_W.tolist() == [False] * 10 + [True] * 5  # latent 1 alone carries "short": fully absorbed
    assert float(fraction_W.mean()) == pytest.approx(5 / 15)


def test_a_main_latent_that_keeps_firing_shows_no_absorption():
    x_WD, probe_D = letter_rows(), E[0]
    acts_WM, proj_WM, cos_M = projections(planted_sae(absorbing=False), x_WD, probe_D)
    fraction_W, full_W = absorption(proj_WM, cos_M, acts_WM, x_WD @ probe_D, main=[0])
    assert float(fraction_W.abs().max()) == 0 and not full_W.any()


def test_partial_absorption_splits_the_projection():
    """Main latent 1.0 and an aligned other latent 1.0 along the probe of P = 2: half absorbed, not fully."""
    proj_WM, acts_WM = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 2.0, 0.0]])
    fraction_W, full_W = absorption(proj_WM, torch.tensor([1.0, 0.5, 0.0]), acts_WM, torch.tensor([2.0]), main=[0])
    assert fraction_W.tolist() == [0.5] and full_W.tolist() == [False]


def test_standardising_saes_project_in_raw_units():
    """A row's contribution along the probe is in the units of P: latents × decoder × the row's std."""
    sae = SparseAutoencoder(SAESpec("relu", 1, 3, 0.0, 0.0), D, normalize="standardize")
    x_WD = torch.randn(6, D, generator=torch.Generator().manual_seed(0)) * 5
    acts_WM, proj_WM, _ = projections(sae, x_WD, E[0])
    x_n, mult, _ = sae.normalize(x_WD)
    torch.testing.assert_close(proj_WM, acts_WM * (sae.W_dec @ E[0]).detach() * mult)


def test_main_latents_are_the_ones_that_carry_each_letter():
    """Latent c fires on words of letter c (and latent 26 + c on half of them, a weaker split)."""
    gen = torch.Generator().manual_seed(0)
    labels_N = torch.arange(26).repeat(24)
    latents_NM = 0.05 * torch.rand(len(labels_N), 60, generator=gen)
    latents_NM[torch.arange(len(labels_N)), labels_N] += 1.0
    cut = 20 * 26
    found = main_latents(latents_NM[:cut], labels_N[:cut], latents_NM[cut:], labels_N[cut:], seed=0)
    assert [entry["latents"][0] for entry in found] == list(range(26))
    assert all(entry["f1"] == 1.0 and entry["f1_k1"] == 1.0 for entry in found)


def test_probes_separate_planted_classes_and_the_small_fit_is_balanced_logistic_regression():
    gen = torch.Generator().manual_seed(1)
    centres_CD = 3 * torch.randn(5, 8, generator=gen)
    labels_N = torch.arange(5).repeat(40)
    x_ND = centres_CD[labels_N] + torch.randn(200, 8, generator=gen)
    W_CD, b_C = train_probes(x_ND, labels_N, 5)
    assert float(((x_ND @ W_CD.T + b_C).argmax(1) == labels_N).float().mean()) > 0.95
    w_K, b = fit_logistic(x_ND[:, :2], (labels_N == 0).float())
    # at the optimum of ½‖w‖² + Σ c_n log(1 + exp(−s_n f_n)) the gradient is 0
    w, bb = w_K.double().requires_grad_(), b.double().requires_grad_()
    y = (labels_N == 0).double()
    weight = torch.where(y > 0, 200 / 80, 200 / 320)
    loss = (
        0.5 * w.square().sum()
        + (weight * torch.nn.functional.softplus(-(2 * y - 1) * (x_ND[:, :2].double() @ w + bb))).sum()
    )
    grads = torch.autograd.grad(loss, [w, bb])
    assert max(float(g.abs().max()) for g in grads) < 1e-3
    assert f1_score(torch.tensor([True, True, False]), torch.tensor([True, False, False])) == pytest.approx(2 / 3)


@pytest.mark.slow
def test_sae_eval_absorption_on_a_tiny_model(tmp_path, monkeypatch):
    from tests.test_evaluate import make_cache, random_sae, run_cli, save_sae
    from tests.tiny_models import bpe_tokenizer, sample_texts, save_random_model

    monkeypatch.chdir(tmp_path)
    from transformers import GPT2Config

    texts = sample_texts(60)
    model = save_random_model(
        tmp_path / "model", GPT2Config(vocab_size=2048, n_positions=256, n_embd=32, n_layer=3, n_head=4,
                                       bos_token_id=0, eos_token_id=0), bpe_tokenizer(texts, 2048),
    )  # fmt: skip
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet")
    cache = make_cache(model, tmp_path / "docs.parquet", tmp_path / "caches")
    run = save_sae(tmp_path / "runs" / "btk", random_sae("batchtopk", 4, 64), cache)
    args = ["eval", run, "--tokens", "256", "--batch-size", "4", "--device", "cpu", "--absorption"]
    assert run_cli(monkeypatch, *args, "--absorption-words", "300") == 0
    result = json.loads((run / "eval.json").read_text())["absorption"]
    probe = result["probe"]
    assert probe["words"] == 300 and probe["train_words"] + probe["test_words"] + probe["dropped_words"] == 300
    assert 0 <= probe["accuracy"] <= 1 and set(probe["f1"]) == set(LETTERS)
    assert set(result["letters"]) == set(LETTERS) and result["letters_scored"] <= probe["letters_above_f1_min"]
    assert (result["mean_main_latents"] is None) == (result["letters_scored"] == 0)
    assert all(1 <= len(entry["latents"]) <= 10 for entry in result["letters"].values())
    for entry in result["letters"].values():
        assert 0 <= entry.get("absorption_fraction", 0) <= 1 and 0 <= entry.get("full_absorption_rate", 0) <= 1
