"""TopK (Gao et al., 2024): the k largest pre-activations of each row; AuxK revives dead latents.

The kept entries travel as an Active list (train.sparse), never as a dense [B, m] matrix: the decode
and, on the sparse path, the encoder's gradient touch only them (B·k·d work). BatchTopK and Matryoshka
BatchTopK inherit this forward and change the selection and the loss.
"""

import torch
from torch import Tensor

from sae.train.archs.base import Architecture, SAEOutput
from sae.train.sparse import Active, densify, select_dead, select_topk


class TopK(Architecture):
    name = "topk"
    saelens_architecture = "topk"
    decodes_kept_entries = True

    def __init__(self, spec, cfg):
        super().__init__(spec, cfg)
        self.aux_k, self.aux_coeff = cfg.aux_k, cfg.aux_coeff

    def select(self, pre_BM: Tensor) -> Active:
        return select_topk(pre_BM, self.spec.k)

    def select_dense(self, sae, pre_BM: Tensor) -> Tensor:
        return densify(self.select(pre_BM), *pre_BM.shape)

    def kept(self, sae, x_BD: Tensor) -> tuple[Tensor, Tensor | None, Active]:
        """(the [B, m] matrix selected from, x − b_dec or None, the selected entries carrying the encoder's
        gradient). The dense path selects from the pre-activations, with autograd. The sparse path
        selects from the affine map of x − b_dec (formed once, for the encoder's gradient too), made
        without autograd and without the ReLU, a pass over [B, m]: the ReLU and the gradient apply to
        the kept entries only (KeptEncoderGrad)."""
        if not sae.sparse_decode:
            pre_BM = sae.pre_acts(x_BD)
            return pre_BM, None, self.select(pre_BM)
        with torch.no_grad():
            xc_BD = x_BD - sae.b_dec
            z_BM = sae.affine_centered(xc_BD)
        return z_BM, xc_BD, sae.with_encoder_grad(self.select(z_BM), x_BD, xc_BD)

    def forward(self, sae, x_BD: Tensor, aux_k: int) -> SAEOutput:
        z_BM, xc_BD, active = self.kept(sae, x_BD)
        recon_BD = sae.decode_active(active) + sae.b_dec
        l0_B, fired_M = fired(active, len(x_BD), sae.m)
        zero = z_BM.new_zeros(())
        aux = self.aux_coeff * self.auxk_loss(sae, x_BD, xc_BD, recon_BD, z_BM, aux_k) if aux_k else zero
        mse = sae.mse(recon_BD, x_BD)
        return SAEOutput(recon_BD, active, l0_B, fired_M, mse, zero, aux, mse + zero + aux)

    def auxk_loss(self, sae, x_BD: Tensor, xc_BD: Tensor | None, recon_BD: Tensor, z_BM: Tensor, aux_k: int) -> Tensor:
        """Gao et al.: reconstruct the residual from the aux_k largest dead latents (no b_dec); z_BM, xc_BD
        as kept() gave them."""
        dead_M = sae.dead_M()
        active = select_dead(z_BM, dead_M, aux_k)
        if xc_BD is not None:  # the sparse path: z_BM was made without autograd
            active = sae.with_encoder_grad(active, x_BD, xc_BD)
        residual_BD = (x_BD - recon_BD).detach()
        return (sae.decode_active(active).float() - residual_BD.float()).square().mean() * dead_M.any()

    def saelens_fields(self) -> dict:
        return {"k": self.spec.k}


def fired(active: Active, B: int, M: int) -> tuple[Tensor, Tensor]:
    """(active latents per row [B], whether each latent fired [M]) of the kept entries."""
    fired_N = (active.acts_N > 0).detach()
    l0_B = torch.zeros(B, device=fired_N.device).index_add_(0, active.rows_N, fired_N.float())
    # a sum, not a boolean-mask gather: no data-dependent shape, so torch.compile keeps one graph
    fired_M = torch.zeros(M, device=fired_N.device).index_add_(0, active.cols_N, fired_N.float()) > 0
    return l0_B, fired_M
