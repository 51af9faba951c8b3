"""ReLU SAE (the standard one): every positive pre-activation is active; sparsity from an L1 penalty on
the latents weighted by their decoder norms, Σ_i f_i ‖W_dec_i‖ (Anthropic's April 2024 update)."""

from torch import Tensor

from sae.train.archs.base import Architecture, SAEOutput


class ReLU(Architecture):
    name = "relu"
    knob = "l1_coeff"
    saelens_architecture = "standard"

    def activate(self, sae, pre_BM: Tensor) -> tuple[Tensor, Tensor]:
        """(the latents [B, m] with their gradient, λ · the sparsity penalty)."""
        return pre_BM, self.spec.l1_coeff * (pre_BM * sae.W_dec.norm(dim=1)).sum(1).mean()

    def forward(self, sae, x_BD: Tensor, aux_k: int) -> SAEOutput:
        pre_BM = sae.pre_acts(x_BD)
        latents_BM, sparsity = self.activate(sae, pre_BM)
        recon_BD = sae.decode(latents_BM)
        latents = latents_BM.detach()
        l0_B, fired_M = (latents > 0).sum(1).float(), (latents > 0).any(0)
        zero = pre_BM.new_zeros(())
        mse = sae.mse(recon_BD, x_BD)
        return SAEOutput(recon_BD, latents, l0_B, fired_M, mse, sparsity, zero, mse + sparsity + zero)

    def select_dense(self, sae, pre_BM: Tensor) -> Tensor:
        return pre_BM
