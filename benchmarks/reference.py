"""The paper's reference training (github: bartbussmann/BatchTopK), re-implemented plainly in one file.

Written from the paper (Bussmann, Leask, Nanda 2024) and its reference code's training loop, kept the way that
code does things, quirks included, so that our trainer is measured against what the paper's code
actually reaches: dense latents and dense decode in fp32; each input row standardised (mean 0, std 1,
+1e-5); W_enc kaiming-uniform [d, m] drawn first after `torch.manual_seed(seed)` (so ours, seeded the
same, starts from the same W_enc), W_dec = W_enc^T with unit-norm rows; Adam 3e-4, betas (0.9, 0.99);
grad-norm clip 1e5; then the decoder gradient projected and W_dec renormalised *before* Adam's step
(so each forward sees the previous step's un-renormalised W_dec, as in the reference).

    topk, batchtopk   pre = ReLU((x − b_dec) W_enc), no b_enc; AuxK: the k_aux = 512 largest
                      pre-activations of latents that fired in none of the last 5 batches, decoded
                      without b_dec, α = 1/32, against the residual x − x̂ (not detached)
    jumprelu          pre = ReLU(x W_enc + b_enc) (no b_dec subtracted at the input); log θ = 0;
                      rectangle kernel ε = 0.001; the L0 step is applied to the JumpReLU *output*
                      (only its upper half-window sees a gradient) and both kernels return dL/dθ
                      as log θ's gradient, without the chain-rule factor θ

The reference code has no BatchTopK inference threshold; `theta()` is eq. 7 estimated here over the
same final fraction of training as ours, so the two can also be compared batch-independently.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

ARCHS = ("batchtopk", "topk", "jumprelu")


def standardize(x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x_n, mean, std): the reference's per-row standardisation; raw x ≈ x_n · std + mean."""
    mean_B1 = x_BD.mean(-1, keepdim=True)
    std_B1 = (x_BD - mean_B1).std(-1, keepdim=True)
    return (x_BD - mean_B1) / (std_B1 + 1e-5), mean_B1, std_B1


def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts_BM: Tensor, log_theta_M: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(acts_BM, log_theta_M)
        ctx.bandwidth = bandwidth
        return acts_BM * (acts_BM > log_theta_M.exp())

    @staticmethod
    def backward(ctx, grad_BM: Tensor) -> tuple[Tensor, Tensor, None]:
        acts_BM, log_theta_M = ctx.saved_tensors
        theta_M, eps = log_theta_M.exp(), ctx.bandwidth
        grad_theta_M = (-(theta_M / eps) * _rect((acts_BM - theta_M) / eps) * grad_BM).sum(0)
        return grad_BM * (acts_BM > theta_M), grad_theta_M, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f_BM: Tensor, log_theta_M: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(f_BM, log_theta_M)
        ctx.bandwidth = bandwidth
        return (f_BM > log_theta_M.exp()).to(f_BM.dtype)

    @staticmethod
    def backward(ctx, grad_BM: Tensor) -> tuple[None, Tensor, None]:
        f_BM, log_theta_M = ctx.saved_tensors
        theta_M, eps = log_theta_M.exp(), ctx.bandwidth
        return None, (-(1 / eps) * _rect((f_BM - theta_M) / eps) * grad_BM).sum(0), None


class ReferenceSAE:
    """One SAE trained as the reference code trains it; `step(x_raw_BD)` is one optimiser step."""

    def __init__(self, arch: str, d: int, m: int, k: int = 32, l0_coeff: float = 0.0018, seed: int = 49,
                 device: torch.device = torch.device("cpu"), bandwidth: float = 0.001, theta_tail: float = 0.1,
                 steps: int | None = None):  # fmt: skip
        assert arch in ARCHS, f"arch={arch!r} is not one of {ARCHS}"
        assert 0 < k <= m, f"k={k} must be in [1, m={m}]"
        self.arch, self.k, self.l0_coeff, self.bandwidth = arch, k, l0_coeff, bandwidth
        torch.manual_seed(seed)
        self.W_enc_DM = torch.nn.init.kaiming_uniform_(torch.empty(d, m, device=device)).requires_grad_()
        W_dec_MD = self.W_enc_DM.detach().t()
        self.W_dec_MD = (W_dec_MD / W_dec_MD.norm(dim=-1, keepdim=True)).requires_grad_()
        self.b_dec_D = torch.zeros(d, device=device, requires_grad=True)
        self.params = [self.W_enc_DM, self.W_dec_MD, self.b_dec_D]
        if arch == "jumprelu":
            self.b_enc_M = torch.zeros(m, device=device, requires_grad=True)
            self.log_theta_M = torch.zeros(m, device=device, requires_grad=True)
            self.params += [self.b_enc_M, self.log_theta_M]
        self.opt = torch.optim.Adam(self.params, lr=3e-4, betas=(0.9, 0.99))
        self.batches_not_active_M = torch.zeros(m, device=device)
        # Eq. 7's terms (smallest kept activation of each batch) over the final theta_tail of `steps`;
        # without `steps` none are kept (the throughput benchmark's step then does only what the reference does).
        self.step_count = 0
        self.theta_from = int(steps * (1 - theta_tail)) if steps else None
        self.min_kept: list[Tensor] = []

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        if self.arch == "jumprelu":
            return F.relu(x_BD @ self.W_enc_DM + self.b_enc_M)
        return F.relu((x_BD - self.b_dec_D) @ self.W_enc_DM)

    def select(self, acts_BM: Tensor, theta: float | None = None) -> Tensor:
        """Latents [B, m] in training form, or (batchtopk with `theta`) as JumpReLU with scalar θ."""
        if self.arch == "jumprelu":
            return _JumpReLU.apply(acts_BM, self.log_theta_M, self.bandwidth)
        if theta is not None:
            return acts_BM * (acts_BM > theta)
        flat = acts_BM.flatten() if self.arch == "batchtopk" else acts_BM
        top = flat.topk(self.k * len(acts_BM) if self.arch == "batchtopk" else self.k, dim=-1)
        return torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(acts_BM.shape)

    def step(self, x_raw_BD: Tensor) -> Tensor:
        x_BD = standardize(x_raw_BD)[0]
        acts_BM = self.pre_acts(x_BD)
        f_BM = self.select(acts_BM)
        recon_BD = f_BM @ self.W_dec_MD + self.b_dec_D
        fired_M = f_BM.sum(0) > 0
        if self.arch == "batchtopk" and self.theta_from is not None and self.step_count >= self.theta_from:
            self.min_kept.append(torch.where(f_BM > 0, f_BM, torch.inf).min().detach())
        # Kept for every arch so dead fractions can be reported; only AuxK (topk, batchtopk) reads it.
        self.batches_not_active_M.add_((~fired_M).float()).masked_fill_(fired_M, 0)
        loss = (recon_BD - x_BD).pow(2).mean()
        if self.arch == "jumprelu":
            loss = loss + self.l0_coeff * _Step.apply(f_BM, self.log_theta_M, self.bandwidth).sum(-1).mean()
        else:
            dead_M = self.batches_not_active_M >= 5
            if dead_M.any():
                acts_dead = acts_BM[:, dead_M]
                aux_top = acts_dead.topk(min(512, int(dead_M.sum())), dim=-1)
                aux_BM = torch.zeros_like(acts_dead).scatter(-1, aux_top.indices, aux_top.values)
                loss = loss + (aux_BM @ self.W_dec_MD[dead_M] - (x_BD - recon_BD)).pow(2).mean() / 32
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1e5)
        with torch.no_grad():
            W_dec_normed = self.W_dec_MD / self.W_dec_MD.norm(dim=-1, keepdim=True)
            self.W_dec_MD.grad -= (self.W_dec_MD.grad * W_dec_normed).sum(-1, keepdim=True) * W_dec_normed
            self.W_dec_MD.data = W_dec_normed
        self.opt.step()
        self.opt.zero_grad()
        self.step_count += 1
        return loss.detach()

    def theta(self) -> float | None:
        """Eq. 7 over the batches since `theta_from` (batchtopk only)."""
        return float(torch.stack(self.min_kept).mean()) if self.min_kept else None

    def dead_fraction(self) -> float:
        return float((self.batches_not_active_M >= 5).float().mean())

    @torch.no_grad()
    def reconstruct(self, x_raw_BD: Tensor, theta: float | None = None) -> tuple[Tensor, Tensor]:
        """(raw-space reconstruction, latents): batchtopk in its batch form unless `theta` is given."""
        x_BD, mean_B1, std_B1 = standardize(x_raw_BD)
        f_BM = self.select(self.pre_acts(x_BD), theta)
        return (f_BM @ self.W_dec_MD + self.b_dec_D) * std_B1 + mean_B1, f_BM
