"""What the trainer needs around the SAE: the input set-up (gate, scale, where b_dec starts) and the
held-out rows, with the report on them (FVU and L0 of the saved, batch-independent form on chunks
never trained on)."""

import math
from typing import Any, NamedTuple

import torch

from sae.cache.store import Cache
from sae.train.config import TrainConfig
from sae.train.gate import Gate, build_gate, chunk_rows, sample_kept_rows
from sae.train.sae import SparseAutoencoder, normalize_input


class InputSetup(NamedTuple):
    gate: Gate
    scale: float
    """The "scale" normalisation's factor (1 otherwise): E‖x‖ = √d over the ungated rows."""
    gated_fraction: float
    """Of a sample of the training rows (0 without a gate): sizes a pass over the ungated rows."""
    b_dec_D: torch.Tensor | None
    """The decoder bias's initial value (cfg.b_dec_init "median"), in the SAE's input units; None: zeros."""

    def record(self, normalize: str) -> dict[str, Any]:
        return {"normalize": normalize, "scale": self.scale, "gated_fraction_sample": self.gated_fraction}


def input_setup(cfg: TrainConfig, cache: Cache, layer: int, train_chunks: list[int]) -> InputSetup:
    gate = build_gate(cache, layer, cfg.gate_bos, cfg.gate_first, cfg.gate_norm)
    sample_RD = None
    if gate.empty:  # the cache's exact statistics
        mean_norm, gated_fraction = cache.stats(layer)["mean_norm"], 0.0
    else:
        sample_RD, gated_fraction = sample_kept_rows(cache, layer, train_chunks, gate)
        mean_norm = float(sample_RD.norm(dim=1).mean())
    scale = math.sqrt(cache.d_model) / mean_norm if cfg.normalize == "scale" else 1.0
    b_dec_D = None
    if cfg.b_dec_init == "median":
        if sample_RD is None:
            sample_RD = sample_kept_rows(cache, layer, train_chunks, gate)[0]
        b_dec_D = geometric_median(normalize_input(sample_RD, cfg.normalize, scale)[0])
    return InputSetup(gate, scale, gated_fraction, b_dec_D)


def geometric_median(points_ND: torch.Tensor, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """argmin_y Σ‖x − y‖ by Weiszfeld's iteration from the mean: a centre that the few massive-norm
    rows cannot drag, as the mean is dragged. Stops once a step moves y by less than tol·‖y‖."""
    points_ND = points_ND.double()
    y_D = points_ND.mean(0)
    for _ in range(iterations):
        weight_N = 1 / (points_ND - y_D).norm(dim=1).clamp(min=1e-12)  # a point at y: its pull dominates
        step_D = (weight_N[:, None] * points_ND).sum(0) / weight_N.sum() - y_D
        y_D = y_D + step_D
        if step_D.norm() <= tol * y_D.norm():
            break
    return y_D.float()


class HeldOut(NamedTuple):
    rows_ND: torch.Tensor
    """The ungated held-out rows, raw, float32, on the CPU."""
    n_gated: int
    chunks: list[int]


def heldout_rows(cache: Cache, layer: int, chunks: list[int], gate: Gate) -> HeldOut:
    kept, n_gated = [], 0
    for chunk in chunks:
        acts_RD = cache.read_acts(layer, chunk).float()
        gated_R = gate.gated(acts_RD, *chunk_rows(cache, chunk))
        kept.append(acts_RD[~gated_R])
        n_gated += int(gated_R.sum())
    return HeldOut(torch.cat(kept), n_gated, chunks)


def batches(rows_ND: torch.Tensor, batch_size: int, device: torch.device):
    for start in range(0, len(rows_ND), batch_size):
        yield rows_ND[start : start + batch_size].to(device)


@torch.no_grad()
def evaluate_heldout(sae: SparseAutoencoder, held: HeldOut, normalize: str, scale: float, batch_size: int,
                     device: torch.device) -> dict[str, Any]:  # fmt: skip
    """FVU, NMSE, normalised MSE and mean L0 of the inference form on the ungated held-out rows (raw)."""
    was_training = sae.training
    sae.eval()
    sums = {"err": 0.0, "sq": 0.0, "mse_n": 0.0, "l0": 0.0, "x_sum": 0.0}
    for x_BD in batches(held.rows_ND, batch_size, device):
        x_n, mult, shift = normalize_input(x_BD, normalize, scale)
        latents_BM = sae.encode(x_n)
        recon_n = sae.decode(latents_BM)
        sums["err"] += (x_BD - (recon_n * mult + shift)).double().square().sum()
        sums["sq"] += x_BD.double().square().sum()
        sums["mse_n"] += (x_n - recon_n).double().square().mean(1).sum()
        sums["l0"] += (latents_BM > 0).double().sum()
        sums["x_sum"] += x_BD.double().sum(0)
    sae.train(was_training)
    n = max(len(held.rows_ND), 1)
    total_var = sums["sq"] - sums["x_sum"].square().sum() / n  # Σ‖x − x̄‖²
    return {
        "rows": len(held.rows_ND),
        "rows_gated": held.n_gated,
        "fvu": float(sums["err"] / total_var),
        "nmse": float(sums["err"] / sums["sq"]),
        "mse_normalized": float(sums["mse_n"] / n),
        "l0": float(sums["l0"] / n),
        "k": sae.spec.k,
        "chunks": held.chunks,
    }
