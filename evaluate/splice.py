"""Run the LM with the activation at one site read, replaced by an SAE reconstruction, or ablated.

All passes use harvest's hook_site, so eval hooks exactly the site the cache was harvested from. A
replacement is computed once from the clean pass's activation and spliced into the later passes.

Everything before the site is the same computation in every pass, so a spliced pass need not redo
it: `Splicer.spliced` runs the model with the blocks before the site handing their input on
unchanged (the embeddings, masks and rotary tables are still made by the model, for pennies), the
hook puts each replacement in at the site, and only the later blocks, the final norm and the head
run; several replacements go through as one larger batch, up to `LOGIT_BYTES` of logits. Identical
replacements run once. The first batch is checked against the clean logits; a model whose later
blocks need more from the earlier ones than the residual stream (or whose blocks do not take the
hidden states first) fails the check and gets full passes instead, whole-model spliced passes as
before (`SAE_EVAL_SPLICE=full` asks for those everywhere: the reference path).
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from sae.harvest.hooks import hook_site
from sae.harvest.model import LoadedModel

SPLICE = os.environ.get("SAE_EVAL_SPLICE", "prefix")
LOGIT_BYTES = 1 << 30
"""Logits of one batched spliced pass: the replacements batched together are as many as fit."""
# Largest |Δ log p| between the clean logits and the same activation re-run from the site. Only the
# batch composition differs (on CPU in float32 the logits came out bit-identical for GPT-2, Llama
# and SmolLM2); a later block that needs more than its input moves them by far more.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
CHECK_TOLERANCE_HALF = 0.2


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
    """Logits [B, T, V] with the site's activation replaced by acts_BTD: the whole model (the reference)."""
    return _logits(loaded, ids_BT, site, layer, lambda _, original: acts_BTD.to(original.dtype))


@contextmanager
def skip_blocks(blocks: nn.ModuleList, n: int, tuple_out: bool) -> Iterator[None]:
    """Blocks [0, n) hand their input hidden states on as their output (a tuple if tuple_out, as older
    transformers' blocks return); their forward is restored on exit, whatever happens."""

    def passthrough(hidden_states: Tensor, *args, **kwargs):
        return (hidden_states,) if tuple_out else hidden_states

    saved = [block.__dict__.get("forward") for block in blocks[:n]]  # an instance forward (accelerate's) stays
    for block in blocks[:n]:
        block.forward = passthrough
    try:
        yield
    finally:
        for block, forward in zip(blocks[:n], saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


class Splicer:
    """The clean pass and spliced passes of one loaded model at one site and layer."""

    def __init__(self, loaded: LoadedModel, site: str, layer: int):
        self.loaded, self.site, self.layer = loaded, site, layer
        self.full = SPLICE == "full"
        """Whole-model spliced passes: asked for, or the check on the first batch failed."""
        self.checked = self.full  # whether the first batch's check has run
        # the blocks whose work is the shared prefix: before the site's block, and that block too
        # when the site is its output
        self.prefix = layer if site == "resid_pre" else layer + 1
        self.tuple_out = False

    def clean(self, ids_BT: Tensor) -> tuple[Tensor, Tensor]:
        """(logits [B, T, V], the site's activation [B, T, D]) of the unmodified model."""
        block = self.loaded.blocks[0]
        handle = block.register_forward_hook(lambda m, a, out: setattr(self, "tuple_out", isinstance(out, tuple)))
        try:
            logits_BTV, x_BTD = clean_pass(self.loaded, ids_BT, self.site, self.layer)
        finally:
            handle.remove()
        if not self.checked:
            self._first = (logits_BTV, x_BTD)
        return logits_BTV, x_BTD

    def spliced(self, ids_BT: Tensor, acts: list[Tensor]) -> Iterator[Tensor]:
        """Logits [B, T, V] for each replacement [B, T, D] in acts, in order, of the contexts ids_BT
        (those of the last clean pass)."""
        if not self.checked:  # the clean activation, re-run from the site, must give the clean logits
            self.checked = True
            clean_BTV, x_BTD = self._first
            del self._first
            self.full = self.full or not self._agree(clean_BTV, next(self._from_site(ids_BT, [x_BTD])))
        if self.full:
            for acts_BTD in acts:
                yield spliced_pass(self.loaded, ids_BT, self.site, self.layer, acts_BTD)
            return
        yield from self._from_site(ids_BT, acts)

    def _from_site(self, ids_BT: Tensor, acts: list[Tensor]) -> Iterator[Tensor]:
        """Only the blocks from the site on, for as many replacements per pass as LOGIT_BYTES allows."""
        B, T = ids_BT.shape
        dtype = next(self.loaded.model.parameters()).dtype
        unique: list[Tensor] = []  # a zero SAE's reconstruction is zero-ablation: one pass for both
        slot_of = []
        for acts_BTD in acts:
            acts_BTD = acts_BTD.to(dtype)
            slot = next((i for i, u in enumerate(unique) if torch.equal(u, acts_BTD)), None)
            if slot is None:
                slot = len(unique)
                unique.append(acts_BTD)
            slot_of.append(slot)
        vocab = self.loaded.model.get_output_embeddings().weight.shape[0]
        group = max(1, LOGIT_BYTES // (B * T * vocab * 4))
        logits: dict[int, Tensor] = {}
        for i, slot in enumerate(slot_of):
            if slot not in logits:
                first = slot  # every slot before it is done: first uses come in slot order
                batch = unique[first : first + group]
                out = self._after_site(ids_BT.repeat(len(batch), 1), torch.cat(batch))
                logits.update(zip(range(first, first + len(batch)), out.split(B), strict=True))
            yield logits[slot]
            if slot not in slot_of[i + 1 :]:
                logits.pop(slot)  # its memory goes once nothing later needs it

    def _after_site(self, ids_BT: Tensor, acts_BTD: Tensor) -> Tensor:
        with skip_blocks(self.loaded.blocks, self.prefix, self.tuple_out):
            return _logits(self.loaded, ids_BT, self.site, self.layer, lambda _, original: acts_BTD)

    def _agree(self, clean_BTV: Tensor, rerun_BTV: Tensor) -> bool:
        tolerance = CHECK_TOLERANCE.get(clean_BTV.dtype, CHECK_TOLERANCE_HALF)
        clean_logp, rerun_logp = clean_BTV.float().log_softmax(-1), rerun_BTV.float().log_softmax(-1)
        return bool((clean_logp - rerun_logp).abs().max() <= tolerance)
