"""Matryoshka BatchTopK (Bussmann, Nabeshima, Karvonen, Nanda, 2025): nested dictionaries on one BatchTopK.

The dictionary's first w_1 < w_2 < … < w_G = m latents are each an SAE of their own: one BatchTopK
selection over the whole dictionary per batch (as SAELens and dictionary_learning do), and the loss
sums every prefix's reconstruction error, x̂_g = b_dec + Σ over the kept entries j < w_g of a_j W_dec[j].
The early latents must then reconstruct alone, so they learn general directions, and the later ones
refine them rather than absorbing them (less feature absorption, a little worse reconstruction).

All prefixes come from one decode: the kept entries are grouped by (row, group), decoded once per
group into [B, G, d] and summed along the groups (B·k·d + G·B·d work, not one decode per prefix).
Inference is BatchTopK's: one scalar θ, calibrated on held-out rows; saved as SAELens's `jumprelu`.
"""

import torch
from torch import Tensor

from sae.errors import UserError
from sae.train.archs.base import SAEOutput
from sae.train.archs.batchtopk import BatchTopK
from sae.train.archs.topk import fired
from sae.train.sparse import Active, densify

LOSSES = ("sum", "mean", "reference")
"""How the prefix errors add up: their sum (SAELens), their mean (dictionary_learning's weights 1/G),
or the mean of them and of b_dec's own error (the reference code, bartbussmann/matryoshka_sae)."""


def default_widths(m: int) -> tuple[int, ...]:
    """The reference code's groups m/16, m/16, m/8, m/4, m/2: prefixes m/16, m/8, m/4, m/2, m."""
    return tuple(sorted({w for w in (m // 16, m // 8, m // 4, m // 2, m) if w > 0}))


class MatryoshkaBatchTopK(BatchTopK):
    name = "matryoshka_batchtopk"

    def __init__(self, spec, cfg):
        super().__init__(spec, cfg)
        self.widths = spec.matryoshka_widths or default_widths(spec.dict_size)
        self.loss = cfg.matryoshka_loss

    @classmethod
    def check(cls, spec) -> None:
        super().check(spec)
        widths = spec.matryoshka_widths
        if widths and not (all(0 < a < b for a, b in zip(widths, widths[1:], strict=False)) and widths[0] > 0):
            raise UserError(f"matryoshka_widths must increase from above 0, got {list(widths)}")
        if widths and widths[-1] != spec.dict_size:
            raise UserError(
                f"matryoshka_widths must end at the dictionary size {spec.dict_size} (the whole SAE), got {list(widths)}"
            )

    def forward(self, sae, x_BD: Tensor, aux_k: int) -> SAEOutput:
        z_BM, xc_BD, active = self.kept(sae, x_BD)
        prefix_BGD = self.decode_prefixes(sae, active, len(x_BD)) + sae.b_dec
        recon_BD = prefix_BGD[:, -1]
        l0_B, fired_M = fired(active, len(x_BD), sae.m)
        zero = z_BM.new_zeros(())
        aux = self.aux_coeff * self.auxk_loss(sae, x_BD, xc_BD, recon_BD, z_BM, aux_k) if aux_k else zero
        # mean over B·d of each prefix's squared error: [G]; the last is the whole SAE's (the logged mse)
        errors_G = (prefix_BGD.float() - x_BD.float()[:, None]).square().mean((0, 2))
        mse = errors_G[-1]
        if self.loss == "sum":
            reconstruction = errors_G.sum()
        elif self.loss == "mean":
            reconstruction = errors_G.mean()
        else:  # the reference: b_dec alone is one more term of the mean
            reconstruction = (errors_G.sum() + sae.mse(sae.b_dec.expand_as(x_BD), x_BD)) / (len(errors_G) + 1)
        return SAEOutput(recon_BD, active, l0_B, fired_M, mse, zero, aux, reconstruction + aux)

    def decode_prefixes(self, sae, active: Active, B: int) -> Tensor:
        """[B, G, d]: each prefix's decode of the kept entries, without b_dec: each group decoded once,
        then summed along the groups. Sparse (the kept rows of W_dec) or dense (the reference)."""
        widths_G = torch.tensor(self.widths, device=active.cols_N.device)
        G = len(widths_G)
        if sae.sparse_decode:
            # Entries are row-major with ascending columns, so (row, group) bags are already contiguous.
            bag_N = active.rows_N * G + torch.searchsorted(widths_G, active.cols_N, right=True)
            offsets_P = torch.searchsorted(bag_N, torch.arange(B * G, device=bag_N.device))
            groups_PD = sae.decode_active(active._replace(rows_N=bag_N, offsets_B=offsets_P))
            groups_BGD = groups_PD.view(B, G, -1)
        else:
            latents_BM = densify(active, B, sae.m)
            starts = (0, *self.widths[:-1])
            groups = [latents_BM[:, a:b] @ sae.W_dec[a:b] for a, b in zip(starts, self.widths, strict=True)]
            groups_BGD = torch.stack(groups, dim=1)
        return groups_BGD.cumsum(1)

    def saelens_metadata(self) -> dict:
        return {"matryoshka_widths": list(self.widths)}
