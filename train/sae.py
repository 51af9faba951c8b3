"""The sparse autoencoder: one module, four activations (batchtopk, topk, jumprelu, relu).

    pre_BM  = ReLU((x_BD − b_dec) @ W_enc_DM + b_enc)    the activation picks which entries survive
    recon   = f_BM @ W_dec_MD + b_dec                     W_dec rows (latent directions) unit-norm

Equations and defaults follow the BatchTopK paper and its reference code. Parameters use SAELens's names and layouts
(W_enc [d, m], W_dec [m, d]), so saving is a rename-free copy.
"""

import contextlib
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sae.train.config import SAESpec
from sae.train.gate import Gate
from sae.train.sparse import (
    Active,
    KeptEncoderGrad,
    decode_dense,
    decode_sparse,
    densify,
    select_batchtopk,
    select_dead,
    select_topk,
)

TOPK_ARCHS = ("topk", "batchtopk")


class SAEOutput(NamedTuple):
    recon_BD: Tensor
    """Reconstruction of the (normalised) input."""
    latents: "Active | Tensor"
    """Latents in training form (batchtopk: top-k over the batch): the kept entries as an Active list
    for (batch)topk, never densified in the hot loop; a dense [B, m] matrix for jumprelu and relu."""
    l0_B: Tensor
    """Active latents per row."""
    fired_M: Tensor
    """Which latents fired in this batch."""
    mse: Tensor
    """Mean over all B·d elements of (x − x̂)², the reference code's L2 loss (sets λ's scale)."""
    sparsity: Tensor
    """λ · penalty: L1 (relu), straight-through L0 (jumprelu); 0 for (batch)topk."""
    aux: Tensor
    """α · AuxK loss (topk, batchtopk) while some latent is dead, else 0."""
    loss: Tensor
    """mse + sparsity + aux: what is minimised."""


class JumpReLU(torch.autograd.Function):
    """z · H(z − θ) with θ = exp(log_θ); θ's gradient through a rectangle kernel (JumpReLU paper)."""

    @staticmethod
    def forward(ctx, z_BM: Tensor, log_theta_M: Tensor, bandwidth: float) -> Tensor:
        theta_M = log_theta_M.exp()
        ctx.save_for_backward(z_BM, theta_M)
        ctx.bandwidth = bandwidth
        return z_BM * (z_BM > theta_M)

    @staticmethod
    def backward(ctx, grad_BM: Tensor) -> tuple[Tensor, Tensor, None]:
        z_BM, theta_M = ctx.saved_tensors
        in_window_BM = ((z_BM - theta_M).abs() < ctx.bandwidth / 2).to(grad_BM.dtype)
        # d/dθ of z·H(z−θ) ≈ −(θ/ε)·rect((z−θ)/ε) (z = θ inside the window); × θ since we learn log θ
        grad_log_theta_M = -(theta_M / ctx.bandwidth) * (in_window_BM * grad_BM * theta_M).sum(0)
        return grad_BM * (z_BM > theta_M), grad_log_theta_M, None


class StepL0(torch.autograd.Function):
    """Σ_i H(z_i − θ_i) per row, θ's gradient through the same rectangle kernel; no gradient to z."""

    @staticmethod
    def forward(ctx, z_BM: Tensor, log_theta_M: Tensor, bandwidth: float) -> Tensor:
        theta_M = log_theta_M.exp()
        ctx.save_for_backward(z_BM, theta_M)
        ctx.bandwidth = bandwidth
        return (z_BM > theta_M).to(z_BM.dtype).sum(1)

    @staticmethod
    def backward(ctx, grad_B: Tensor) -> tuple[None, Tensor, None]:
        z_BM, theta_M = ctx.saved_tensors
        in_window_BM = ((z_BM - theta_M).abs() < ctx.bandwidth / 2).to(grad_B.dtype)
        # d/dθ of H(z−θ) ≈ −(1/ε)·rect((z−θ)/ε); × θ since we learn log θ
        grad_log_theta_M = -(theta_M / ctx.bandwidth) * (in_window_BM * grad_B[:, None]).sum(0)
        return None, grad_log_theta_M, None


class SparseAutoencoder(nn.Module):
    def __init__(self, spec: SAESpec, d_in: int, aux_k: int = 512, aux_coeff: float = 1 / 32,
                 dead_tokens: int = 20_480, bandwidth: float = 0.001, init_threshold: float = 1.0,
                 sparse_decode: bool = True):  # fmt: skip
        super().__init__()
        self.spec, self.d_in, self.m = spec, d_in, spec.dict_size
        self.aux_k, self.aux_coeff, self.dead_tokens = aux_k, aux_coeff, dead_tokens
        # sparse_decode, for (batch)topk: decode from the kept rows of W_dec (embedding_bag) and take the
        # encoder's gradient at the kept entries only (KeptEncoderGrad); False: the dense matmuls
        self.bandwidth, self.sparse_decode = bandwidth, sparse_decode
        # The reference code's init: kaiming-uniform W_enc, W_dec its transpose with unit-norm rows.
        self.W_enc = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d_in, self.m)))
        self.b_enc = nn.Parameter(torch.zeros(self.m))
        self.W_dec = nn.Parameter(self.W_enc.detach().t().contiguous())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.normalize_decoder()
        if spec.arch == "jumprelu":  # fp32 even under autocast: θ ~ 1e-3 moves by ε-sized steps
            self.log_threshold = nn.Parameter(torch.full((self.m,), math.log(init_threshold)))
        if spec.arch == "batchtopk":  # the inference threshold; set by the trainer (train.theta)
            self.register_buffer("theta", torch.zeros(()))
        # Tokens since each latent last fired (AuxK's dead set).
        self.register_buffer("tokens_since_fired_M", torch.zeros(self.m, dtype=torch.long))
        self.gate = Gate()  # rows left alone: see train.gate
        # How raw rows are normalised before encode (normalize_input's mode) in a saved SAE, whose scale
        # is folded into its weights: "none", or "standardize" for SAELens's "layer_norm" SAEs.
        self.input_mode = "none"

    # -- inference form: per-sample, batch-independent (what is saved and evaluated) --------------
    def affine(self, x_BD: Tensor, out: Tensor | None = None) -> Tensor:
        """(x − b_dec) W_enc + b_enc [B, m], a fresh tensor (callers may change it in place) or written
        into `out`: a loop that reuses one buffer saves, on CPU, the page faults of a fresh [B, m]
        (~15% of the matmul's time at B 4,096, m 2,304)."""
        # Written so that autograd never forms the [B, d] input gradient (a third B·m·d matmul) only to
        # sum it into b_dec's: b_dec W_enc is one [m] vector.
        bias_M = self.b_enc - self.b_dec @ self.W_enc
        if torch.is_autocast_enabled(x_BD.device.type):  # a bf16 product summed into fp32 pre-activations
            return torch.add(x_BD @ self.W_enc, bias_M, out=out)
        return torch.addmm(bias_M, x_BD, self.W_enc, out=out)  # the bias enters the matmul's output: one pass fewer

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        return self.affine(x_BD).relu_()  # in place: a pass over [B, m] fewer

    def threshold_M(self) -> Tensor:
        """Per-latent inference threshold: BatchTopK's θ (eq. 7) broadcast, JumpReLU's exp(log θ)."""
        if self.spec.arch == "jumprelu":
            return self.log_threshold.detach().exp()
        return self.theta.expand(self.m)

    def scores(self, x_BD: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(z_BM, θ_M): the latents as deployed are z where z > θ, 0 elsewhere (θ ≥ 0). BatchTopK and
        JumpReLU give the affine map (in `out` if given) and their threshold, so that a caller wanting
        only the active entries skips a pass over [B, m] that sets the rest to 0; TopK and ReLU give
        their latents (a fresh tensor), θ 0."""
        if self.spec.arch in ("batchtopk", "jumprelu"):
            return self.affine(x_BD, out), self.threshold_M()
        return self.encode(x_BD), x_BD.new_zeros(self.m)

    def encode(self, x_BD: Tensor, batch_mode: bool = False, theta: float | None = None) -> Tensor:
        """Dense latents [B, m]; BatchTopK runs as JumpReLU with its scalar θ (or `theta`), or, in
        batch_mode, in its training form (the B·k largest activations of this batch together)."""
        if self.spec.arch in ("batchtopk", "jumprelu") and not batch_mode:
            # θ ≥ 0: the ReLU and the threshold in one in-place pass over the affine map, 2.5× faster on
            # CPU than a where() over [B, m] and no host sync for θ; +0 (not −0) below θ
            z_BM, theta_M = self.scores(x_BD)
            return z_BM.masked_fill_(z_BM <= (theta_M if theta is None else theta), 0.0)
        pre_BM = self.pre_acts(x_BD)
        if self.spec.arch in ("topk", "batchtopk"):
            select = select_topk if self.spec.arch == "topk" else select_batchtopk
            return densify(select(pre_BM, self.spec.k), *pre_BM.shape)
        return pre_BM

    def decode(self, latents_BM: Tensor) -> Tensor:
        return latents_BM @ self.W_dec + self.b_dec

    # -- training form ---------------------------------------------------------------------------
    def forward(self, x_BD: Tensor, aux_k: int = 0) -> SAEOutput:
        """aux_k: width of AuxK's top-k over the dead latents (topk, batchtopk); 0: no AuxK. The trainer
        sizes it from the dead count (train.trainer.DeadLatents); a batch with no dead latent adds 0."""
        B = x_BD.shape[0]
        # sparse: (batch)topk's encoder gradient over the kept entries only (KeptEncoderGrad)
        kept_grad = self.sparse_decode and self.spec.arch in TOPK_ARCHS
        with torch.no_grad() if kept_grad else contextlib.nullcontext():
            pre_BM = self.pre_acts(x_BD)
        zero = pre_BM.new_zeros(())
        sparsity = aux = zero
        if self.spec.arch in TOPK_ARCHS:
            select = select_topk if self.spec.arch == "topk" else select_batchtopk
            active = select(pre_BM, self.spec.k)
            if kept_grad:
                active = self._with_encoder_grad(active, x_BD)
            decode = decode_sparse if self.sparse_decode else decode_dense
            recon_BD = decode(active, self.W_dec) + self.b_dec
            latents, fired_N = active, (active.acts_N > 0).detach()
            l0_B = torch.zeros(B, device=x_BD.device).index_add_(0, active.rows_N, fired_N.float())
            # a sum, not a boolean-mask gather: no data-dependent shape, so torch.compile keeps one graph
            fired_M = torch.zeros(self.m, device=x_BD.device).index_add_(0, active.cols_N, fired_N.float()) > 0
            if aux_k:
                aux = self.aux_coeff * self.auxk_loss(x_BD, recon_BD, pre_BM, aux_k)
        else:
            if self.spec.arch == "jumprelu":
                latents_BM = JumpReLU.apply(pre_BM.float(), self.log_threshold, self.bandwidth)
                l0_B = StepL0.apply(pre_BM.float(), self.log_threshold, self.bandwidth)
                sparsity = self.spec.l0_coeff * l0_B.mean()
            else:
                latents_BM = pre_BM
                sparsity = self.spec.l1_coeff * (latents_BM * self.W_dec.norm(dim=1)).sum(1).mean()
            recon_BD = self.decode(latents_BM)
            latents = latents_BM.detach()
            l0_B, fired_M = (latents > 0).sum(1).float(), (latents > 0).any(0)
        mse = (recon_BD.float() - x_BD.float()).square().mean()
        if self.training:
            self.tokens_since_fired_M.add_(B).masked_fill_(fired_M, 0)
        return SAEOutput(recon_BD, latents, l0_B, fired_M, mse, sparsity, aux, mse + sparsity + aux)

    def auxk_loss(self, x_BD: Tensor, recon_BD: Tensor, pre_BM: Tensor, aux_k: int) -> Tensor:
        """Gao et al.: reconstruct the residual from the aux_k largest dead latents (no b_dec)."""
        dead_M = self.dead_M()
        active = select_dead(pre_BM, dead_M, aux_k)
        if self.sparse_decode:  # pre_BM was made without autograd (forward)
            active = self._with_encoder_grad(active, x_BD)
        decode = decode_sparse if self.sparse_decode else decode_dense
        residual_BD = (x_BD - recon_BD).detach()
        return (decode(active, self.W_dec).float() - residual_BD.float()).square().mean() * dead_M.any()

    def _with_encoder_grad(self, active: Active, x_BD: Tensor) -> Active:
        acts_N = KeptEncoderGrad.apply(
            active.acts_N, x_BD, self.W_enc, self.b_enc, self.b_dec, active.rows_N, active.cols_N, active.offsets_B
        )
        return active._replace(acts_N=acts_N)

    def dead_M(self) -> Tensor:
        """[m] bool: latents that have not fired for dead_tokens tokens."""
        return self.tokens_since_fired_M >= self.dead_tokens

    def dead_fraction(self) -> Tensor:
        return self.dead_M().float().mean()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component along each unit-norm decoder row (it only changes the norm)."""
        if self.W_dec.grad is not None:
            along_M1 = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
            self.W_dec.grad.sub_(along_M1 * self.W_dec)


def normalize_input(x_BD: Tensor, mode: str, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(x_n, mult, shift) with raw x ≈ x_n · mult + shift; modes as in TrainConfig.normalize.

    "standardize" is the reference code's per-sample standardisation and SAELens's "layer_norm"
    (whose output side multiplies by the std without the epsilon, as here)."""
    x_BD = x_BD.float()
    if mode == "standardize":
        mean_B1 = x_BD.mean(dim=1, keepdim=True)
        std_B1 = (x_BD - mean_B1).std(dim=1, keepdim=True)
        return (x_BD - mean_B1) / (std_B1 + 1e-5), std_B1, mean_B1
    if mode == "scale":
        return x_BD * scale, x_BD.new_tensor(1 / scale), x_BD.new_zeros(())
    return x_BD, x_BD.new_ones(()), x_BD.new_zeros(())
