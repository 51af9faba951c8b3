"""Which torch device a stage runs on: the one place `--device` is read."""

import contextlib
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


@contextlib.contextmanager
def one_cpu_thread(on_cpu: bool = True):
    """torch's CPU ops on one thread inside the block (on_cpu False: no change). For ops over ~B·k
    entries: as a two-thread kernel each waited milliseconds for its second thread on busy cores
    (an int32 sort of 131k: 0.34 ms idle, 4.4 ms p90 beside one other job; on one thread 0.6 ms
    either way). Switching costs nothing measurable."""
    if not on_cpu:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
