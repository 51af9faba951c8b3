"""Model FLOPs utilisation: FLOPs a workload needs per token, and the device's peak FLOP/s.

MFU = FLOPs per token × tokens/s ÷ peak. Counts are matmul FLOPs (2 per multiply-add), the
convention of nanoGPT's estimate; attention scores use the full T×T square, not the causal half.
"""

import functools
import time

import torch

from sae.device import ONEDNN_LINEAR

# Dense (no 2:4 sparsity) tensor-core peaks from the vendors' data sheets, TFLOP/s; SXM parts.
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989, "tf32": 495, "fp32": 67},
    "H100": {"bf16": 989, "tf32": 495, "fp32": 67},
    "A100": {"bf16": 312, "tf32": 156, "fp32": 19.5},
    "L40S": {"bf16": 362, "tf32": 183, "fp32": 91.6},
    "L4": {"bf16": 121, "tf32": 60, "fp32": 30.3},
    "A10": {"bf16": 125, "tf32": 62.5, "fp32": 31.2},
    "RTX 4090": {"bf16": 165, "tf32": 82.6, "fp32": 82.6},
}


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from): a data-sheet table on GPUs, a measured matmul on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peaks[precision] * 1e12, f"{name} data sheet, {precision}"
        return float("nan"), f"{name}: not in the peak table"
    return cpu_peak_flops(torch.get_num_threads())


@functools.cache  # once a process for each thread count: `python -m benchmarks` asks five times
def cpu_peak_flops(threads: int) -> tuple[float, str]:
    """(FLOP/s of a 1024³ fp32 matmul on `threads` threads, the source string); torch must be set to them.
    The matmul our CPU paths run: oneDNN's where torch has it (MKL's sgemm, torch's own, ran at half
    its rate on AMD Zen 5, which put our oneDNN encodes at 180% of that "peak")."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul, kernel = (lambda: ONEDNN_LINEAR(a, b, None, "none", [], "")), "oneDNN"
    if ONEDNN_LINEAR is None:
        matmul, kernel = (lambda: a @ b), "torch"
    matmul()  # warm-up
    repeats, start = 20, time.perf_counter()
    for _ in range(repeats):
        matmul()
    return 2 * n**3 * repeats / (time.perf_counter() - start), f"measured {n}³ fp32 {kernel} matmul, {threads} threads"


def lm_forward_flops_per_token(block_params: int, head_params: int, n_layers: int, d_model: int, ctx_len: int) -> int:
    """2 FLOPs per weight the token meets, plus attention scores and values (2 × 2·T·d per layer)."""
    return 2 * (block_params + head_params) + 4 * n_layers * ctx_len * d_model


def sae_train_flops_per_token(d: int, m: int, k: int, sparse_decode: bool) -> int:
    """Encoder forward (2dm) and weight gradient (2dm; no input gradient is formed), plus the decoder's
    forward and two backward products over the k kept latents (sparse) or all m (dense)."""
    decoded = k if sparse_decode else m
    return 4 * d * m + 6 * decoded * d
