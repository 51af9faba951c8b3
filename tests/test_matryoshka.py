"""Matryoshka BatchTopK: its prefix losses, its relation to BatchTopK, its θ and its evaluation per prefix."""

import json
from pathlib import Path

import pytest
import torch

from sae.errors import UserError
from sae.train.archs.matryoshka_batchtopk import LOSSES, default_widths
from sae.train.config import TrainConfig
from sae.train.sparse import densify, select_batchtopk
from sae.train.state import make_sae
from sae.train.trainer import run_training
from tests.synthetic import planted_acts, write_cache

D, FEATURES, K, M = 32, 96, 4, 64
WIDTHS = (8, 24, 64)
CPU = torch.device("cpu")


def matryoshka(loss: str = "sum", widths: tuple = WIDTHS, **fields):
    cfg = TrainConfig(
        arch=("matryoshka_batchtopk",), k=(K,), dict_size=(M,), matryoshka_widths=widths, matryoshka_loss=loss,
        **fields,
    )  # fmt: skip
    return make_sae(cfg, cfg.specs()[0], D, CPU)


@pytest.mark.parametrize("loss", LOSSES)
def test_prefix_losses_equal_a_direct_dense_computation(loss):
    """The kept entries masked to each prefix, decoded densely: every prefix error, and the loss as each
    weighting adds them up (sum, mean, and the reference's mean with b_dec alone as one more term)."""
    x_BD = planted_acts(256, D, FEATURES, K, seed=3) * 3
    sae = matryoshka(loss)
    out = sae(x_BD)
    with torch.no_grad():
        latents_BM = densify(select_batchtopk(sae.pre_acts(x_BD), K), len(x_BD), M)
        errors = torch.stack([(latents_BM[:, :w] @ sae.W_dec[:w] + sae.b_dec - x_BD).square().mean() for w in WIDTHS])
        b_dec_alone = (sae.b_dec - x_BD).square().mean()
    expected = {"sum": errors.sum(), "mean": errors.mean(), "reference": (errors.sum() + b_dec_alone) / 4}[loss]
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mse, errors[-1], rtol=1e-5, atol=1e-6)
    assert errors[0] > errors[1] > errors[2]  # a wider prefix reconstructs better


def test_the_whole_dictionary_is_batchtopk_with_the_same_weights():
    x_BD = planted_acts(256, D, FEATURES, K, seed=4) * 3
    nested = matryoshka()
    cfg = TrainConfig(arch=("batchtopk",), k=(K,), dict_size=(M,))
    flat = make_sae(cfg, cfg.specs()[0], D, CPU)  # the same seed: the same initial weights
    assert all(torch.equal(a, b) for a, b in zip(nested.parameters(), flat.parameters(), strict=True))
    ours, theirs = nested(x_BD), flat(x_BD)
    assert all(torch.equal(a, b) for a, b in zip(ours.latents[:3], theirs.latents[:3], strict=True))
    torch.testing.assert_close(ours.recon_BD, theirs.recon_BD, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.mse, theirs.mse)


def test_widths_default_to_the_reference_groups_and_bad_ones_are_one_line_errors():
    assert default_widths(4608) == (288, 576, 1152, 2304, 4608)
    assert matryoshka(widths=()).arch.widths == (4, 8, 16, 32, 64)
    with pytest.raises(UserError, match=r"matryoshka_widths must end at the dictionary size 64"):
        matryoshka(widths=(8, 32))
    with pytest.raises(UserError, match=r"matryoshka_widths must increase from above 0, got \[16, 8, 64\]"):
        matryoshka(widths=(16, 8, 64))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A Matryoshka run on a synthetic cache: 10 chunks of 256 rows, the last held out."""
    root = tmp_path_factory.mktemp("matryoshka")
    cache = write_cache(
        root / "caches", planted_acts(10 * 256, D, FEATURES, K, seed=0) * 2, ctx_len=16, chunk_contexts=16
    )
    cfg = TrainConfig(
        arch=("matryoshka_batchtopk",), k=(K,), dict_size=(M,), matryoshka_widths=WIDTHS, batch_size=128, lr=3e-3,
        log_every=5, checkpoint_every=10, buffer_chunks=3, loader_threads=2, epochs=2, out=root / "runs",
    )  # fmt: skip
    (run_dir,) = run_training(cfg, cache)
    return run_dir


def test_theta_is_calibrated_to_l0_k_and_the_widths_are_saved(trained):
    cfg = json.loads((trained / "cfg.json").read_text())
    assert cfg["theta_source"] == "calibrated" and cfg["heldout"]["l0"] == pytest.approx(K, rel=0.01)
    assert cfg["architecture"] == "jumprelu" and cfg["training_architecture"] == "matryoshka_batchtopk"
    assert cfg["metadata"]["matryoshka_widths"] == list(WIDTHS) and cfg["sae"]["matryoshka_widths"] == list(WIDTHS)


def test_sae_lens_loads_it_and_reproduces_our_reconstruction(trained):
    sae_lens = pytest.importorskip("sae_lens")
    from sae.train.rundir import load_sae

    theirs, ours = sae_lens.SAE.load_from_disk(str(trained)), load_sae(trained)
    x_BD = planted_acts(64, D, FEATURES, K, seed=6) * 2
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x_BD), ours.encode(x_BD), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs(x_BD), ours.reconstruct(x_BD)[0], rtol=1e-4, atol=1e-4)
