"""Which torch device a stage runs on (the one place `--device` is read), and what running on the CPU
asks for: blocks on one thread, a malloc that keeps freed memory, oneDNN's matmul in place of MKL's."""

import contextlib
import ctypes
import os
import sys

import torch
from torch import Tensor

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
    ran ~20% faster with it. Blocks past 256 MiB are still mapped and returned on their own: with 1 GiB
    thresholds `sae eval`'s [16, 128, 49,152] logits (403 MB each) grew the heap it kept to a peak of
    8.8 GB against 4.4 without the change, and to 4.5 with 256 MiB, as fast (88 s; 97 without). The
    paper's [B, m] (B 4,096, m 12,288) is 201 MB. No effect beyond Linux's glibc."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): its own malloc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 28)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 28)


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
no autograd: cpu_linear below gives it a backward."""


def cpu_fp32(*tensors: Tensor) -> bool:
    """All on the CPU in float32: the tensors ONEDNN_LINEAR takes."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def use_onednn(*tensors: Tensor) -> bool:
    """oneDNN's matmul for these operands: a CPU torch with oneDNN, float32, and not under torch.compile
    (Inductor lowers oneDNN's op only with its own packed weights, and picks its own kernels)."""
    return ONEDNN_LINEAR is not None and cpu_fp32(*tensors) and not torch.compiler.is_compiling()


def cpu_linear(x_BI: Tensor, W_OI: Tensor, bias_O: Tensor | None) -> Tensor:
    """x Wᵀ + bias [B, O] by oneDNN's fp32 matmul (ONEDNN_LINEAR), with autograd when an operand wants
    it: its backward's two products are oneDNN's too, on transposed views (no copies: 16 vs MKL's 29 ms
    for W's gradient at the study shape). Callers check use_onednn first."""
    if not torch.is_grad_enabled():
        return ONEDNN_LINEAR(x_BI, W_OI, bias_O, "none", [], "")
    return CPULinear.apply(x_BI, W_OI, bias_O)


class CPULinear(torch.autograd.Function):
    """cpu_linear with its gradients: ∂x = g W, ∂W = gᵀ x, ∂bias = Σ_b g (each product by oneDNN)."""

    @staticmethod
    def forward(ctx, x_BI: Tensor, W_OI: Tensor, bias_O: Tensor | None) -> Tensor:
        ctx.save_for_backward(x_BI, W_OI)
        ctx.has_bias = bias_O is not None
        return ONEDNN_LINEAR(x_BI, W_OI, bias_O, "none", [], "")

    @staticmethod
    def backward(ctx, grad_BO: Tensor):
        x_BI, W_OI = ctx.saved_tensors
        grad_x = grad_W = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = ONEDNN_LINEAR(grad_BO, W_OI.t(), None, "none", [], "")
        if ctx.needs_input_grad[1]:
            grad_W = ONEDNN_LINEAR(grad_BO.t(), x_BI.t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_BO.sum(0)
        return grad_x, grad_W, grad_bias
