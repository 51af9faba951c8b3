"""Run the LM with the activation at one site read, replaced by an SAE reconstruction, or ablated.

All passes use harvest's hook_site, so eval hooks exactly the site the cache was harvested from. A
replacement is computed once from the clean pass's activation and spliced into the later passes:
everything before the site is the same computation in every pass, so the hook need not redo it.
"""

import torch
from torch import Tensor

from sae.harvest.hooks import hook_site
from sae.harvest.model import LoadedModel
from sae.train.checkpoint import reconstruct as saved_sae_reconstruct
from sae.train.sae import SparseAutoencoder


def _logits(loaded: LoadedModel, ids_BT: Tensor, site: str, layer: int, on_acts) -> Tensor:
    with hook_site(loaded.blocks, site, [layer], on_acts, stop_after_last=False):
        return loaded.model(input_ids=ids_BT, use_cache=False).logits


def clean_pass(loaded: LoadedModel, ids_BT: Tensor, site: str, layer: int) -> tuple[Tensor, Tensor]:
    """(logits [B, T, V], the site's activation [B, T, D]) of the unmodified model."""
    captured: dict[str, Tensor] = {}

    def keep(_: int, acts_BTD: Tensor) -> None:
        captured["acts"] = acts_BTD

    logits_BTV = _logits(loaded, ids_BT, site, layer, keep)
    return logits_BTV, captured["acts"]


def spliced_pass(loaded: LoadedModel, ids_BT: Tensor, site: str, layer: int, acts_BTD: Tensor) -> Tensor:
    """Logits [B, T, V] with the site's activation replaced by acts_BTD."""
    return _logits(loaded, ids_BT, site, layer, lambda _, original: acts_BTD.to(original.dtype))


def splice_where(mask_BT: Tensor, new_BTD: Tensor, acts_BTD: Tensor) -> Tensor:
    """new at the masked positions, the original activation elsewhere (--exclude-bos keeps BOS rows)."""
    return torch.where(mask_BT[..., None], new_BTD.to(acts_BTD.dtype), acts_BTD)


def reconstruct(
    sae: SparseAutoencoder, x_RD: Tensor, batch_mode: bool = False, rows_R: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(reconstruction [R, D] in raw activation space, float32; latents [R, m]).

    θ mode (default) is the saved, batch-independent inference form; batch_mode is BatchTopK's
    training form over these rows together. Given rows_R, only those rows are encoded (so batch mode
    selects among them); the others keep x and no latents."""
    if rows_R is not None:
        recon_ND, latents_NM = reconstruct(sae, x_RD[rows_R], batch_mode)
        recon_RD = x_RD.float().index_put((rows_R,), recon_ND)
        return recon_RD, latents_NM.new_zeros(len(x_RD), latents_NM.shape[1]).index_put((rows_R,), latents_NM)
    recon_RD, latents_RM = saved_sae_reconstruct(sae, x_RD.float(), batch_mode)
    return recon_RD.float(), latents_RM
