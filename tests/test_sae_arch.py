"""SAE architectures on planted sparse data: each assertion is on a number a bug would move."""

from functools import partial

import pytest
import torch

from sae.device import cpu_linear
from sae.errors import UserError
from sae.train.config import SAESpec, TrainConfig
from sae.train.gate import Gate
from sae.train.inputs import InputSetup
from sae.train.sae import SparseAutoencoder, normalize_input
from sae.train.sparse import (
    decode_dense,
    decode_sparse,
    densify,
    select_batchtopk,
    select_batchtopk_plain,
    select_topk,
)
from sae.train.state import DeadLatents, make_optimizer, make_sae
from sae.train.theta import Eq7Estimate
from sae.train.trainer import configure_backend, train_step
from tests.synthetic import planted_acts

D, FEATURES, K = 64, 128, 4


@pytest.fixture(scope="module")
def planted() -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out rows, scaled so E‖x‖ = √d as the trainer's default normalisation does."""
    train_ND, test_ND = planted_acts(64_000, D, FEATURES, K, seed=1), planted_acts(4096, D, FEATURES, K, seed=2)
    scale = D**0.5 / train_ND.norm(dim=1).mean()
    return train_ND * scale, test_ND * scale


def fit(arch: str, data_ND: torch.Tensor, steps: int, init=None, **overrides) -> SparseAutoencoder:
    """The trainer's own step on in-memory batches; AuxK's dead set refreshed every 25 steps."""
    fields = dict(arch=(arch,), k=(K,), dict_size=(FEATURES,), batch_size=512, lr=3e-3, dead_tokens=2560)
    cfg = TrainConfig(**{**fields, **overrides})
    (spec,) = cfg.specs()
    configure_backend(torch.device("cpu"), cfg.precision)
    sae = make_sae(cfg, spec, D, torch.device("cpu"))
    if init is not None:
        init(sae)
    opt = make_optimizer(cfg, sae)
    dead = DeadLatents(sae)
    theta = Eq7Estimate(steps, cfg.theta_tail, torch.device("cpu"))
    n_batches = len(data_ND) // cfg.batch_size
    for step in range(steps):
        b = step % n_batches
        x_BD = data_ND[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        out = train_step(sae, sae, opt, x_BD, cfg, world=1, dead=dead)
        if arch == "batchtopk":
            theta.record(step, out.latents)
    if arch == "batchtopk":
        sae.theta.fill_(theta.value(steps))
    return sae.eval()


@torch.no_grad()
def fvu_and_l0(sae: SparseAutoencoder, x_ND: torch.Tensor) -> tuple[float, torch.Tensor]:
    latents_NM = sae.encode(x_ND)
    err = (sae.decode(latents_NM) - x_ND).square().sum()
    return float(err / (x_ND - x_ND.mean(0)).square().sum()), (latents_NM > 0).sum(1)


def test_batchtopk_beats_topk_at_equal_k_and_theta_keeps_l0_near_k(planted):
    train_ND, test_ND = planted
    btk_fvu, btk_l0 = fvu_and_l0(fit("batchtopk", train_ND, 500), test_ND)
    topk_fvu, topk_l0 = fvu_and_l0(fit("topk", train_ND, 500), test_ND)
    assert btk_fvu < 0.8 * topk_fvu, (btk_fvu, topk_fvu)
    assert abs(btk_l0.float().mean() - K) <= 0.1 * K  # θ inference, per sample, batch-independent
    assert btk_l0.max() > 2 * K and btk_l0.min() < K  # ... and it spends latents unevenly
    # TopK keeps exactly k of the ReLU'd pre-activations; a row with fewer than k positive ones is the
    # only way to have fewer active
    assert (topk_l0 <= K).all() and (topk_l0 == K).float().mean() > 0.99


def test_jumprelu_l0_falls_as_its_coefficient_rises(planted):
    train_ND, test_ND = planted
    l0s = [fvu_and_l0(fit("jumprelu", train_ND, 300, l0_coeff=(c,)), test_ND)[1].float().mean() for c in (0, 0.01, 0.1)]
    assert l0s[0] > 1.08 * l0s[1] and l0s[1] > 1.3 * l0s[2], l0s


def test_auxk_revives_dead_latents(planted):
    """Half the latents start as slightly weaker copies of the other half: they never win TopK, so
    without AuxK they stay dead; AuxK trains them on the residual until they find features of their own."""

    def duplicate_half(sae: SparseAutoencoder) -> None:
        with torch.no_grad():
            sae.W_enc[:, FEATURES // 2 :] = 0.98 * sae.W_enc[:, : FEATURES // 2]
            sae.W_dec[FEATURES // 2 :] = sae.W_dec[: FEATURES // 2]

    runs = [fit("topk", planted[0], 300, aux_coeff=c, aux_k=32, init=duplicate_half) for c in (0, 1 / 32)]
    dead = [float(sae.dead_fraction()) for sae in runs]
    assert dead[0] > 0.35 and dead[1] < 0.5 * dead[0], dead
    assert fvu_and_l0(runs[1], planted[1])[0] < 0.9 * fvu_and_l0(runs[0], planted[1])[0]


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "jumprelu", "relu"])
def test_decoder_rows_stay_unit_norm(planted, arch):
    sae = fit(arch, planted[0], 20)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(FEATURES), atol=1e-5)


@pytest.mark.parametrize("tangent", [False, True])
@pytest.mark.parametrize("select", [select_topk, select_batchtopk])
def test_sparse_decode_equals_dense_decode_with_gradients(select, tangent):
    """Values and gradients; on the tangent (unit-norm rows) W_dec's gradient is the dense one with each
    row's component along the row removed."""
    torch.manual_seed(0)
    pre_BM = torch.randn(32, 256).relu().requires_grad_()
    W_dec_MD = torch.randn(256, 48)
    W_dec_MD = (W_dec_MD / W_dec_MD.norm(dim=1, keepdim=True) if tangent else W_dec_MD).requires_grad_()
    results = []
    for decode in (partial(decode_sparse, tangent=tangent), decode_dense):
        recon_BD = decode(select(pre_BM, 8), W_dec_MD)
        grads = torch.autograd.grad((recon_BD.sin() * torch.linspace(-1, 1, 48)).sum(), [pre_BM, W_dec_MD])
        results.append([recon_BD, *grads])
    if tangent:
        grad_MD = results[1][2]
        results[1][2] = grad_MD - (grad_MD * W_dec_MD).sum(1, keepdim=True) * W_dec_MD
        assert (grad_MD * W_dec_MD).sum(1).abs().max() > 0.1  # there was a component to remove
    for sparse, dense in zip(*results, strict=True):
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)  # fp32 summation order only


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "matryoshka_batchtopk"])
def test_sparse_and_dense_paths_train_the_same_module(arch):
    """The whole forward (AuxK included) and every parameter gradient as the optimiser gets it (W_dec's
    projected: the sparse decode's own, the dense path's by project_decoder_grad) agree across the two
    paths (Matryoshka: each prefix group decoded once from the kept rows of W_dec against dense matmuls
    per group)."""
    x_BD = planted_acts(256, D, FEATURES, K, seed=3) * 3
    grads = []
    for sparse in (True, False):
        torch.manual_seed(0)
        sae = SparseAutoencoder(
            SAESpec(arch, K, 256, 0.0, 0.0), D, TrainConfig(aux_k=32, dead_tokens=1), sparse_decode=sparse
        )
        sae.tokens_since_fired_M[::2] = 10  # half the latents dead
        out = sae(x_BD, aux_k=32)
        out.loss.backward()
        sae.project_decoder_grad()
        grads.append([out.loss.detach(), out.aux.detach()] + [p.grad for p in sae.parameters()])
    assert grads[0][1] > 0
    for sparse, dense in zip(*grads, strict=True):
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-6)


def test_jumprelu_threshold_gradient_is_the_rectangle_kernel_estimate():
    """d loss/d log θ_i = −(θ/ε)·θ·Σ_b 1[|z−θ|<ε/2]·∂loss/∂f (reconstruction) and −(θ/ε)·Σ_b 1[...] (L0)."""
    sae = SparseAutoencoder(
        SAESpec("jumprelu", 1, 2, 0.5, 0.0), 2, TrainConfig(bandwidth=0.1, jumprelu_init_threshold=1.0)
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
    x_BD = torch.tensor([[1.02, 0.0], [0.97, 3.0], [2.0, 1.3]])  # z = x: rows 0, 1 in latent 0's window
    out = sae(x_BD)
    out.loss.backward()
    # latent 0: row 0 fires (f = 1.02, x̂ = 1.02 = x: zero mse gradient), row 1 does not (f = 0,
    # ∂mse/∂f = −2·0.97/6); L0 gradient counts both rows: λ·(1/3)·(−1/ε)·2, times θ = 1.
    expected = -(1 / 0.1) * (-2 * 0.97 / 6) - 0.5 / 3 * (1 / 0.1) * 2
    torch.testing.assert_close(sae.log_threshold.grad[0], torch.tensor(expected))
    assert sae.log_threshold.grad[1] == 0  # no row near latent 1's threshold


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(k=(0,)), "k must be a positive integer, got 0"),
        (dict(k=(64,), dict_size=(32,)), "k=64 exceeds dict_size=32"),
        (dict(dict_size=(0,)), "dict_size must be a positive integer, got 0"),
        (dict(arch=("batchtop",)), "unknown arch 'batchtop'; choose one of batchtopk, topk, jumprelu, relu"),
        (dict(sweep=({"arch": "topk", "kk": 3},)), r"unknown key 'kk' in \[\[sweep\]\]; did you mean 'k'"),
        (dict(normalize="l2"), "unknown normalize 'l2'"),
    ],
)
def test_bad_sae_settings_are_one_line_errors(fields, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**fields)


def test_sweep_grid_crosses_each_arch_with_its_own_knob():
    cfg = TrainConfig(arch=("batchtopk", "jumprelu"), k=(16, 32), dict_size=(1024,), l0_coeff=(0.004,))
    assert [s.name for s in cfg.specs()] == ["batchtopk_k16_m1024", "batchtopk_k32_m1024", "jumprelu_l0c0.004_m1024"]


def test_auxk_sized_to_the_dead_count_equals_auxk_at_full_width():
    torch.manual_seed(0)
    x_BD = torch.randn(64, 16) * 3
    sae = SparseAutoencoder(SAESpec("topk", 4, 256, 0.0, 0.0), 16, TrainConfig(aux_k=64, dead_tokens=100)).eval()
    assert DeadLatents(sae).aux_k() == 0  # nothing dead: AuxK is skipped
    sae.tokens_since_fired_M[:5] = 100  # 5 dead latents
    dead = DeadLatents(sae)
    assert dead.aux_k() == 8  # the next power of two
    assert sae(x_BD, aux_k=8).aux > 0
    torch.testing.assert_close(sae(x_BD, aux_k=8).aux, sae(x_BD, aux_k=64).aux)
    sae.tokens_since_fired_M[:200] = 100
    dead.record()
    assert dead.aux_k() == 64  # capped at aux_k


def test_decode_auto_is_sparse_on_cpu_and_threshold_lr_sets_only_log_theta():
    cpu = torch.device("cpu")
    for decode, sparse in (("auto", True), ("sparse", True), ("dense", False)):
        cfg = TrainConfig(arch=("topk",), k=(4,), dict_size=(64,), decode=decode)
        assert make_sae(cfg, cfg.specs()[0], D, cpu).sparse_decode is sparse
    cfg = TrainConfig(arch=("jumprelu",), dict_size=(64,), lr=3e-4, threshold_lr=0.01)
    sae = make_sae(cfg, cfg.specs()[0], D, cpu)
    groups = make_optimizer(cfg, sae).param_groups
    assert [g["lr"] for g in groups] == [3e-4, 0.01]
    assert [id(p) for p in groups[1]["params"]] == [id(sae.log_threshold)]
    assert id(sae.log_threshold) not in {id(p) for p in groups[0]["params"]}


def plain_step(sae: SparseAutoencoder, opt, x_BD: torch.Tensor, cfg: TrainConfig) -> None:
    """The step written plainly with autograd: .std() standardisation, a dense selection and decode, autograd's
    squared error, torch's clip_grad_norm_, the projection and renormalisation as products."""
    mean_B1 = x_BD.mean(1, keepdim=True)
    x_n = (x_BD - mean_B1) / ((x_BD - mean_B1).std(1, keepdim=True) + 1e-5)
    pre_BM = torch.relu((x_n - sae.b_dec) @ sae.W_enc + sae.b_enc)
    select = select_batchtopk_plain if sae.spec.arch == "batchtopk" else select_topk
    recon_BD = densify(select(pre_BM, K), *pre_BM.shape) @ sae.W_dec + sae.b_dec
    (recon_BD - x_n).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    with torch.no_grad():
        sae.W_dec.grad -= (sae.W_dec.grad * sae.W_dec).sum(1, keepdim=True) * sae.W_dec
        opt.step()
        opt.zero_grad()
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("grad_clip", [1e-2, 1e5])  # every step clipped; none
@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_train_step_follows_the_plain_step(arch, grad_clip):
    """Five steps of train_step (the sparse path, its shared column order, the fused squared error, the
    layer-norm statistics, the clip skipped on the host when under the bound) and of plain_step from one
    start: the same weights to float32 summation order."""
    cfg = TrainConfig(arch=(arch,), k=(K,), dict_size=(256,), batch_size=256, lr=1e-3, grad_clip=grad_clip)
    (spec,) = cfg.specs()
    x_SBD = (planted_acts(5 * 256, D, FEATURES, K, seed=4) * 3 + 0.5).view(5, 256, D)
    standardized = InputSetup(Gate(), 1.0, 0.0, None)  # the trainer's default input space
    ours, plain = (make_sae(cfg, spec, D, torch.device("cpu"), standardized) for _ in range(2))
    opt_ours, opt_plain, dead = make_optimizer(cfg, ours), make_optimizer(cfg, plain), DeadLatents(ours)
    for x_BD in x_SBD:
        train_step(ours, ours, opt_ours, x_BD, cfg, world=1, dead=dead)
        plain_step(plain, opt_plain, x_BD, cfg)
    moved = (ours.W_enc - SparseAutoencoder(spec, D).W_enc).abs().max()
    assert moved > 10 * 1e-5  # the steps did move the weights
    for name, theirs in plain.named_parameters():
        torch.testing.assert_close(getattr(ours, name), theirs, rtol=1e-4, atol=1e-5, msg=name)


def test_standardize_is_the_plain_formula_and_leaves_a_constant_row_at_zero():
    x_BD = torch.randn(64, D) * 4 + 2
    x_BD[3] = 7.0
    x_n, std_B1, mean_B1 = normalize_input(x_BD, "standardize")
    plain_std_B1 = (x_BD - x_BD.mean(1, keepdim=True)).std(1, keepdim=True)
    torch.testing.assert_close(std_B1, plain_std_B1)
    torch.testing.assert_close(mean_B1, x_BD.mean(1, keepdim=True))
    torch.testing.assert_close(x_n, (x_BD - mean_B1) / (plain_std_B1 + 1e-5))
    assert std_B1[3] == 0 and x_n[3].abs().max() == 0
    torch.testing.assert_close(x_n * std_B1 + mean_B1, x_BD, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_squared_error_equals_autograds_with_both_gradients(dtype):
    recon_BD, x_BD = torch.randn(32, D, dtype=dtype), torch.randn(32, D, dtype=dtype)
    results = []
    for mse in (SparseAutoencoder(SAESpec("topk", K, 64, 0.0, 0.0), D).mse,
                lambda r, x: (r.float() - x.float()).square().mean()):  # fmt: skip
        r, x = recon_BD.clone().requires_grad_(), x_BD.clone().requires_grad_()
        loss = mse(r, x)
        (3 * loss).backward()
        results.append((loss, r.grad, x.grad))
    assert results[0][1].dtype == dtype
    for fused, plain in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")
def test_cpu_linear_and_its_gradients_equal_addmms():
    """oneDNN's product with autograd (the CPU's encoder product and decode): the output and the three
    gradients equal autograd's through addmm, W given as a transposed view as the decode gives it."""
    generator = torch.Generator().manual_seed(0)
    x_BI, W_IO, bias_O, g_BO = (
        torch.randn(*shape, generator=generator) for shape in ((64, 48), (48, 80), (80,), (64, 80))
    )
    results = []
    for product in (cpu_linear, lambda x, W, b: torch.addmm(b, x, W.t())):
        leaves = [t.clone().requires_grad_() for t in (x_BI, W_IO, bias_O)]
        y_BO = product(leaves[0], leaves[1].t(), leaves[2])
        y_BO.backward(g_BO)
        results.append([y_BO.detach()] + [t.grad for t in leaves])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
