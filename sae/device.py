"""Which torch device a stage runs on: the one place `--device` is read."""

import os

import torch

from sae.errors import UserError


def resolve_device(name: str) -> torch.device:
    """auto: CUDA if torch sees it, else the CPU. Under torchrun a bare "cuda" (or auto) is this rank's
    own GPU (LOCAL_RANK), so every rank can be given the same flags."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for, but torch sees no CUDA device; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
