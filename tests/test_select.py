"""BatchTopK's selection paths keep exactly the same entries, ties and zeros included; TopK's threshold
path keeps each row's k largest as torch's top-k does; AuxK's dead-column selection and the kept-entry
encoder gradient equal their dense references."""

import pytest
import torch

import sae.train.sparse as sparse_module
from sae.train.config import SAESpec, TrainConfig
from sae.train.sae import SparseAutoencoder
from sae.train.sparse import (
    decode_sparse,
    nonzero_rare,
    select_batchtopk,
    select_batchtopk_plain,
    select_batchtopk_threshold,
    select_dead,
    select_topk,
    topk_rows_threshold,
)
from tests.synthetic import planted_acts

FAST_PATHS = [select_batchtopk_threshold, select_batchtopk_plain]


def defined_flat(pre_BM: torch.Tensor, k: int) -> torch.Tensor:
    """The tie rule written as a definition: a stable descending sort keeps equal values in flat order,
    so its first B·k are the largest with ties to the lowest flat index; returned in flat order."""
    order_N = pre_BM.flatten().sort(descending=True, stable=True).indices
    return order_N[: pre_BM.shape[0] * k].sort().values


def check(pre_BM: torch.Tensor, k: int) -> None:
    """Both paths equal the definition; rows, offsets and values are consistent with the flat indices."""
    B, M = pre_BM.shape
    expected_N = defined_flat(pre_BM, k)
    for select in FAST_PATHS:
        active = select(pre_BM, k)
        flat_N = active.rows_N * M + active.cols_N
        assert torch.equal(flat_N, expected_N), select.__name__
        assert torch.equal(active.acts_N, pre_BM.flatten()[expected_N])
        counts_B = torch.bincount(active.rows_N, minlength=B)
        assert torch.equal(active.offsets_B, counts_B.cumsum(0) - counts_B)


def sae_pre_acts(B: int, M: int, d: int = 32, seed: int = 0) -> torch.Tensor:
    """Real-like pre-activations: a fresh SAE's on planted rows, a few of them scaled to massive norms."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAESpec("batchtopk", 8, M, 0.0, 0.0), d)
    x_BD = planted_acts(B, d, 4 * d, 8, seed=seed) * 3
    x_BD[::17] *= 7  # BOS-like rows
    with torch.no_grad():
        return sae.pre_acts(x_BD)


@pytest.mark.parametrize("B, M, k", [(64, 4096, 8), (48, 2304, 32), (8, 96, 4), (256, 1024, 1)])
def test_paths_equal_a_plain_topk_on_real_like_pre_activations(B, M, k):
    pre_BM = sae_pre_acts(B, M)
    check(pre_BM, k)
    # continuous values: no tie at the boundary, so torch's own topk set is the same
    top_N = pre_BM.flatten().topk(B * k).indices.sort().values
    assert torch.equal(top_N, defined_flat(pre_BM, k))


def adversarial() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    B, M = 64, 4096  # 262k entries: the threshold path samples with a stride
    real = torch.rand(B, M, generator=gen).sub_(0.3).relu_()
    massive = real.clone()
    massive[5] *= 1000  # one row holds all B·k of the top entries and more
    levels = torch.randint(0, 4, (B, M), generator=gen).float()  # four values: ties everywhere
    sparse = torch.zeros(B, M)
    sparse.view(-1)[torch.randperm(B * M, generator=gen)[:100]] = torch.rand(100, generator=gen) + 1
    return {
        "constant rows": torch.arange(B, dtype=torch.float32)[:, None].expand(B, M).contiguous(),
        "all constant": torch.full((B, M), 0.5),
        "one massive row": massive,
        "all zero": torch.zeros(B, M),
        "many exact ties": levels,
        "ties at the boundary in bf16": real.bfloat16().float(),
        "fewer positives than B*k": sparse,
    }


@pytest.mark.parametrize("name", list(adversarial()))
@pytest.mark.parametrize("k", [1, 8, 64])
def test_paths_keep_the_defined_entries_on_adversarial_inputs(name, k):
    check(adversarial()[name], k)


def test_too_few_survivors_falls_back_exactly(monkeypatch):
    """A sample that overestimates the boundary (here: forced to the maximum) leaves fewer than B·k
    survivors; the threshold path then takes t from a full top-k and still keeps the defined entries."""
    pre_BM = sae_pre_acts(64, 4096)
    calls = []
    monkeypatch.setattr(sparse_module, "_sample_threshold", lambda flat, n, M: calls.append(n) or float(flat.max()))
    check(pre_BM, 8)
    assert calls  # the forced branch ran


def test_gradients_through_the_kept_activations_agree():
    pre_BM = sae_pre_acts(48, 2304).requires_grad_()
    W_dec_MD = torch.randn(2304, 16)
    grads = []
    for select in FAST_PATHS:
        recon_BD = decode_sparse(select(pre_BM, 8), W_dec_MD)
        grads.append(torch.autograd.grad((recon_BD.sin() * torch.linspace(-1, 1, 16)).sum(), pre_BM)[0])
    assert torch.equal(grads[0], grads[1])
    kept_N = torch.zeros(48 * 2304, dtype=torch.bool)
    kept_N[defined_flat(pre_BM.detach(), 8)] = True
    assert grads[0].flatten()[kept_N].all() and not grads[0].flatten()[~kept_N].any()  # the kept entries only


def test_select_batchtopk_chooses_its_path_once_by_device(monkeypatch):
    pre_BM = sae_pre_acts(8, 96)
    taken = []
    monkeypatch.setattr(sparse_module, "select_batchtopk_threshold", lambda p, k: taken.append("threshold"))
    monkeypatch.setattr(sparse_module, "select_batchtopk_plain", lambda p, k: taken.append("plain"))
    for setting in ("auto", "plain", "threshold"):
        monkeypatch.setattr(sparse_module, "SELECT_PATH", setting)
        select_batchtopk(pre_BM, 4)
    assert taken == ["threshold", "plain", "threshold"]  # auto on CPU: the threshold path


def test_topk_of_the_whole_row_is_every_entry():
    pre_BM = sae_pre_acts(8, 96)
    every, top = select_topk(pre_BM, 96), pre_BM.topk(96, dim=1)
    assert torch.equal(every.rows_N * 96 + every.cols_N, torch.arange(8 * 96))
    assert torch.equal(every.acts_N.view(8, 96).sort(1).values, top.values.sort(1).values)


def check_topk(pre_BM: torch.Tensor, k: int, monkeypatch) -> list:
    """Both TopK paths keep, in each row, k distinct columns whose values are the row's k largest (the
    multiset torch's top-k gives: among ties at the k-th value either may keep any); returns both."""
    B, M = pre_BM.shape
    expected_BK = pre_BM.topk(k, dim=1).values.sort(1).values
    kept = []
    for path in ("threshold", "plain"):
        monkeypatch.setattr(sparse_module, "SELECT_PATH", path)
        active = select_topk(pre_BM, k)
        cols_BK = active.cols_N.view(B, k)
        assert torch.equal(active.rows_N, torch.arange(B).repeat_interleave(k))
        assert torch.equal(active.offsets_B, torch.arange(0, B * k, k))
        assert (cols_BK.sort(1).values.diff(dim=1) > 0).all(), path  # distinct columns in each row
        exact = {"rtol": 0, "atol": 0, "equal_nan": True}
        torch.testing.assert_close(active.acts_N, pre_BM[active.rows_N, active.cols_N], **exact)
        torch.testing.assert_close(active.acts_N.view(B, k).sort(1).values, expected_BK, **exact)
        kept.append(active)
    return kept


@pytest.mark.parametrize("B, M, k", [(64, 4096, 8), (48, 2304, 32), (40, 1000, 5), (256, 1024, 1), (8, 96, 4)])
def test_topk_threshold_path_keeps_the_rows_k_largest_on_real_like_pre_activations(B, M, k, monkeypatch):
    """Continuous values, no tie: the same columns as torch's top-k, from the threshold path itself (it
    did not step aside), m not a multiple of the groups' count included."""
    pre_BM = sae_pre_acts(B, M)
    threshold, plain = check_topk(pre_BM, k, monkeypatch)
    same = torch.equal(threshold.cols_N.view(B, k).sort(1).values, plain.cols_N.view(B, k).sort(1).values)
    assert same
    assert (topk_rows_threshold(pre_BM, k) is not None) == (M // max(2 * k, 32) >= 2)


@pytest.mark.parametrize("name", list(adversarial()) + ["a NaN"])
@pytest.mark.parametrize("k", [1, 8, 64])
def test_topk_threshold_path_keeps_the_rows_k_largest_on_adversarial_inputs(name, k, monkeypatch):
    pre_BM = adversarial()["one massive row"].clone() if name == "a NaN" else adversarial()[name]
    if name == "a NaN":
        pre_BM[3, 17] = float("nan")  # fewer than k survivors in that row: the plain top-k serves
        assert topk_rows_threshold(pre_BM, k) is None
    check_topk(pre_BM, k, monkeypatch)


def test_topk_paths_pass_the_same_gradient_to_the_kept_entries(monkeypatch):
    pre_BM = sae_pre_acts(48, 2304).requires_grad_()
    W_dec_MD = torch.randn(2304, 16)
    grads = []
    for path in ("threshold", "plain"):
        monkeypatch.setattr(sparse_module, "SELECT_PATH", path)
        recon_BD = decode_sparse(select_topk(pre_BM, 8), W_dec_MD)
        grads.append(torch.autograd.grad((recon_BD.sin() * torch.linspace(-1, 1, 16)).sum(), pre_BM)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)  # the decode sums a row in another order
    assert (grads[0] != 0).sum() == 48 * 8


@pytest.mark.parametrize("N, offset", [(4096 * 8, 0), (1001, 0), (7, 0), (0, 0), (4096, 3), (4096, 8)])
@pytest.mark.parametrize("density", [0.0, 0.003, 0.05, 0.6, 1.0])
def test_nonzero_rare_equals_nonzero(N, offset, density):
    """Every path (word hits then bytes, the dense fallback, the tail past the last whole word, a mask
    not aligned to 8 bytes) gives nonzero's positions; clustered Trues, as kept latents cluster in rows."""
    generator = torch.Generator().manual_seed(N + offset)
    mask_N = torch.rand(N + offset, generator=generator) < density
    mask_N[offset + N // 3 : offset + N // 3 + 5] = density > 0  # a run across a word boundary
    mask_N = mask_N[offset:]
    assert torch.equal(nonzero_rare(mask_N), mask_N.nonzero().squeeze(1))


@pytest.mark.parametrize("n_dead, aux_k", [(5, 8), (40, 8), (0, 8), (96, 128)])
def test_auxk_over_the_dead_columns_equals_the_masked_top_k(n_dead, aux_k):
    """The CPU gather of the dead columns against the CUDA form (live columns zeroed, top-k over all):
    the same decode and the same gradient where it reaches the encoder (the ReLU passes none through a
    0); beyond the dead entries the reference keeps only zeros, and it keeps some of the zeros."""
    pre_BM = sae_pre_acts(48, 96).requires_grad_()
    dead_M = torch.zeros(96, dtype=torch.bool)
    dead_M[torch.randperm(96, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    W_dec_MD = torch.randn(96, 16)
    results = []
    for active in (select_dead(pre_BM, dead_M, aux_k), select_topk(pre_BM * dead_M, min(aux_k, 96))):
        recon_BD = decode_sparse(active, W_dec_MD)
        grad = torch.autograd.grad((recon_BD.sin()).sum(), pre_BM, allow_unused=True)[0]
        grad = grad if grad is not None else torch.zeros_like(pre_BM)
        results.append((recon_BD, grad * (pre_BM.detach() > 0)))
    for fast, reference in zip(*results, strict=True):
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)  # summation order only


@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_kept_entry_encoder_gradient_equals_the_dense_backward(arch):
    """The sparse path's encoder gradient (KeptEncoderGrad, input gradient included) against autograd
    through the dense [B, m] pre-activations, with AuxK on."""
    x_BD = planted_acts(256, 32, 128, 4, seed=3) * 3
    grads = []
    for sparse in (True, False):
        torch.manual_seed(0)
        sae = SparseAutoencoder(
            SAESpec(arch, 4, 256, 0.0, 0.0), 32, TrainConfig(aux_k=32, dead_tokens=1), sparse_decode=sparse
        )
        with torch.no_grad():
            sae.b_dec.normal_()  # the b_dec terms of the gradient are not zero
            sae.b_enc.normal_(std=0.1)
        sae.tokens_since_fired_M[::2] = 10  # half the latents dead
        x = x_BD.clone().requires_grad_()
        out = sae(x, aux_k=32)
        out.loss.backward()
        sae.project_decoder_grad()  # the sparse decode's W_dec gradient comes projected
        grads.append([out.loss.detach(), out.aux.detach(), x.grad] + [p.grad for p in sae.parameters()])
    assert grads[0][1] > 0
    for sparse, dense in zip(*grads, strict=True):
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-7)
