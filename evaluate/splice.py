"""Run the LM with the activation at one site read, replaced by an SAE reconstruction, or ablated.

All passes use harvest's hook_site, so eval hooks exactly the site the cache was harvested from. A
replacement is computed once from the clean pass's activation and spliced into the later passes:
everything before the site is the same computation in every pass, so the hook need not redo it.
"""

from torch import Tensor

from sae.harvest.hooks import hook_site
from sae.harvest.model import LoadedModel


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
