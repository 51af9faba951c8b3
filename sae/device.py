"""Which torch device a stage runs on: the one place `--device` is read."""

import contextlib
import ctypes
import os
import sys

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


def keep_freed_memory() -> None:
    """glibc's malloc keeps the blocks the process frees for its next allocations, instead of giving
    them back to the kernel (CPU training; the resident memory then stays at its peak). A training step
    frees and makes the same [B, d] and [m, d] tensors every step; past glibc's trim and mmap thresholds
    each came back as fresh pages: 1,800 page faults a step at the demo shape (B 4,096, d 576), ~9 ms of
    an 88 ms step. No effect beyond Linux's glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): its own malloc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
