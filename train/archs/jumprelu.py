"""JumpReLU (Rajamanoharan et al., 2024): z·H(z − θ_i) with a learned threshold per latent, θ = exp(log θ),
and an L0 penalty; both reach θ through a straight-through estimator with a rectangle kernel of width ε."""

import math

import torch
from torch import Tensor, nn

from sae.train.archs.relu import ReLU


def _save_theta(ctx, z_BM: Tensor, log_theta_M: Tensor, bandwidth: float) -> Tensor:
    """θ = exp(log θ), kept with z and ε for the backward's window."""
    theta_M = log_theta_M.exp()
    ctx.save_for_backward(z_BM, theta_M)
    ctx.bandwidth = bandwidth
    return theta_M


def _window(ctx, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(z, θ, rect((z−θ)/ε) as [B, m]): the estimate of d/dθ of H(z−θ) is −(1/ε)·rect, and × θ for
    log θ, which is what we learn."""
    z_BM, theta_M = ctx.saved_tensors
    return z_BM, theta_M, ((z_BM - theta_M).abs() < ctx.bandwidth / 2).to(dtype)


class JumpReLUFunction(torch.autograd.Function):
    """z · H(z − θ) with θ = exp(log_θ); θ's gradient through a rectangle kernel (JumpReLU paper)."""

    @staticmethod
    def forward(ctx, z_BM: Tensor, log_theta_M: Tensor, bandwidth: float) -> Tensor:
        theta_M = _save_theta(ctx, z_BM, log_theta_M, bandwidth)
        return z_BM * (z_BM > theta_M)

    @staticmethod
    def backward(ctx, grad_BM: Tensor) -> tuple[Tensor, Tensor, None]:
        z_BM, theta_M, in_window_BM = _window(ctx, grad_BM.dtype)
        # d/d log θ of z·H(z−θ): z = θ inside the window
        grad_log_theta_M = -(theta_M / ctx.bandwidth) * (in_window_BM * grad_BM * theta_M).sum(0)
        return grad_BM * (z_BM > theta_M), grad_log_theta_M, None


class StepL0(torch.autograd.Function):
    """Σ_i H(z_i − θ_i) per row, θ's gradient through the same rectangle kernel; no gradient to z."""

    @staticmethod
    def forward(ctx, z_BM: Tensor, log_theta_M: Tensor, bandwidth: float) -> Tensor:
        theta_M = _save_theta(ctx, z_BM, log_theta_M, bandwidth)
        return (z_BM > theta_M).to(z_BM.dtype).sum(1)

    @staticmethod
    def backward(ctx, grad_B: Tensor) -> tuple[None, Tensor, None]:
        _, theta_M, in_window_BM = _window(ctx, grad_B.dtype)
        return None, -(theta_M / ctx.bandwidth) * (in_window_BM * grad_B[:, None]).sum(0), None


class JumpReLU(ReLU):
    name = "jumprelu"
    knob = "l0_coeff"
    saelens_architecture = "jumprelu"

    def __init__(self, spec, cfg):
        super().__init__(spec, cfg)
        self.bandwidth, self.init_threshold = cfg.bandwidth, cfg.jumprelu_init_threshold

    def add_parameters(self, sae) -> None:
        # fp32 even under autocast: θ ~ 1e-3 moves by ε-sized steps
        sae.log_threshold = nn.Parameter(torch.full((sae.m,), math.log(self.init_threshold)))

    def activate(self, sae, pre_BM: Tensor) -> tuple[Tensor, Tensor]:
        latents_BM = JumpReLUFunction.apply(pre_BM.float(), sae.log_threshold, self.bandwidth)
        l0_B = StepL0.apply(pre_BM.float(), sae.log_threshold, self.bandwidth)
        return latents_BM, self.spec.l0_coeff * l0_B.mean()

    def select_dense(self, sae, pre_BM: Tensor) -> Tensor:
        return pre_BM.masked_fill_(pre_BM <= self.threshold_M(sae), 0.0)

    def threshold_M(self, sae) -> Tensor:
        return sae.log_threshold.detach().exp()

    def load_threshold(self, sae, threshold_M: Tensor) -> None:
        sae.log_threshold.copy_(threshold_M.log())
