"""Which torch device a stage runs on (the one place `--device` is read), and what running on the CPU
asks for: blocks on one thread, a malloc that keeps freed memory, oneDNN's matmul in place of MKL's."""

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


def keep_freed_memory(device: torch.device) -> None:
    """On the CPU, glibc's malloc keeps the blocks the process frees for its next allocations, instead
    of giving them back to the kernel (the resident memory then stays at its peak); every stage calls it
    for its device. A training step frees and makes the same [B, d] and [m, d] tensors every step; past
    glibc's trim and mmap thresholds each came back as fresh pages: 1,800 page faults a step at the demo
    shape (B 4,096, d 576), ~9 ms of an 88 ms step; the inspect pass's fresh [4,096, 2,304] affine maps
    ran ~20% faster with it. No effect beyond Linux's glibc."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): its own malloc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def _onednn_linear():
    """oneDNN's fp32 y = x Wᵀ + b (Inductor's CPU linear), where this torch build has it; else None."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


ONEDNN_LINEAR = _onednn_linear()
"""torch's own CPU matmuls call MKL's sgemm, which on AMD CPUs runs its AVX2 code: at B 1,024, d 576,
m 4,608 on two Zen 5 cores 28.2 ms (190 GFLOP/s) where oneDNN's AVX-512 kernel takes 12.8 (2.2×; 55.7
and 25.3 ms at B 4,096, m 2,304), the same float32 arithmetic summed in another order. The op has
no autograd: train.sae.cpu_linear gives it a backward; harvest.model.onednn_linears needs none."""


def cpu_fp32(*tensors: torch.Tensor) -> bool:
    """All on the CPU in float32: the tensors ONEDNN_LINEAR takes."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
