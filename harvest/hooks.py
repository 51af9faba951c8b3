"""Forward hooks at a residual-stream site: read activations, optionally replace them, stop early.

resid_pre of block L is the input of block L (= HF hidden_states[L], the paper's site); resid_post
of block L is its output. Harvest reads and stops after the last hooked block, so later blocks and
the LM head never run; evaluate replaces the activation with the SAE reconstruction and runs on.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

# on_acts(layer, acts_BTD) -> replacement acts_BTD, or None to leave the activation as it is.
ActsFn = Callable[[int, torch.Tensor], torch.Tensor | None]


class StopForward(Exception):
    """Raised by the last hook to end the forward pass once every hooked activation is read."""


def _pre_hook(layer: int, on_acts: ActsFn, stop: bool):
    def hook(module, args, kwargs):
        acts = args[0] if args else kwargs["hidden_states"]
        replacement = on_acts(layer, acts)
        if stop:
            raise StopForward
        if replacement is None:
            return None
        if args:
            return (replacement, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replacement}

    return hook


def _post_hook(layer: int, on_acts: ActsFn, stop: bool):
    def hook(module, args, kwargs, output):
        acts = output[0] if isinstance(output, tuple) else output
        replacement = on_acts(layer, acts)
        if stop:
            raise StopForward
        if replacement is None:
            return None
        return (replacement, *output[1:]) if isinstance(output, tuple) else replacement

    return hook


@contextmanager
def hook_site(
    blocks: nn.ModuleList, site: str, layers: list[int], on_acts: ActsFn, stop_after_last: bool
) -> Iterator[None]:
    """Hooks on `blocks` at `site` for each layer, removed on exit, whatever happens."""
    last = max(layers)
    handles = []
    for layer in layers:
        stop = stop_after_last and layer == last
        if site == "resid_pre":
            handle = blocks[layer].register_forward_pre_hook(_pre_hook(layer, on_acts, stop), with_kwargs=True)
        else:
            handle = blocks[layer].register_forward_hook(_post_hook(layer, on_acts, stop), with_kwargs=True)
        handles.append(handle)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture(
    model: nn.Module, blocks: nn.ModuleList, site: str, layers: list[int], input_ids_BT: torch.Tensor
) -> dict[int, torch.Tensor]:
    """The activations [B, T, D] at site for each layer, running the model only up to the last one."""
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int, acts_BTD: torch.Tensor) -> None:
        captured[layer] = acts_BTD

    with hook_site(blocks, site, layers, keep, stop_after_last=True), torch.inference_mode():
        try:
            model(input_ids=input_ids_BT, use_cache=False)
        except StopForward:
            pass
    return captured
