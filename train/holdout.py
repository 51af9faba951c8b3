"""The held-out chunks: the cache's last chunks, never trained on; BatchTopK's θ is calibrated on them
and every SAE reports FVU and L0 of its saved, batch-independent form on them at the end."""

from typing import Any, NamedTuple

import torch

from sae.cache.store import Cache
from sae.train.gate import Gate, kept_rows
from sae.train.sae import SparseAutoencoder


def holdout_chunks(cache: Cache, n_full: int, first: bool = False) -> list[int]:
    """The last n_full full chunks, plus a partial last chunk if any: alone it may be a handful of rows;
    or (first: following a harvest, which writes them before the rest) the first n_full chunks."""
    if n_full == 0:
        return []
    full_chunks = cache.target_contexts // cache.chunk_contexts
    if first:
        return list(range(min(n_full, cache.target_chunks)))
    return list(range(max(full_chunks - n_full, 0), cache.target_chunks))


class HeldOut(NamedTuple):
    rows_RD: torch.Tensor
    """The ungated held-out rows, raw, float32, on the CPU."""
    n_gated: int
    chunks: list[int]


def heldout_rows(cache: Cache, layer: int, chunks: list[int], gate: Gate) -> HeldOut:
    kept, n_gated = [], 0
    for chunk in chunks:
        rows_RD = kept_rows(cache, layer, chunk, gate).values_RD.float()
        kept.append(rows_RD)
        n_gated += cache.contexts_in_chunk(chunk) * cache.ctx_len - len(rows_RD)
    return HeldOut(torch.cat(kept), n_gated, chunks)


def batches(rows_RD: torch.Tensor, batch_size: int, device: torch.device):
    for start in range(0, len(rows_RD), batch_size):
        yield rows_RD[start : start + batch_size].to(device)


@torch.no_grad()
def evaluate_heldout(sae: SparseAutoencoder, held: HeldOut, batch_size: int, device: torch.device) -> dict[str, Any]:
    """FVU, NMSE, normalised MSE and mean L0 of the inference form on the ungated held-out rows (raw)."""
    was_training = sae.training
    sae.eval()
    sums = {"err": 0.0, "sq": 0.0, "mse_n": 0.0, "l0": 0.0, "x_sum": 0.0}
    for x_BD in batches(held.rows_RD, batch_size, device):
        x_n, mult, shift = sae.normalize(x_BD)
        latents_BM = sae.encode_normalized(x_n)
        recon_n = sae.decode(latents_BM)
        sums["err"] += (x_BD - (recon_n * mult + shift)).double().square().sum()
        sums["sq"] += x_BD.double().square().sum()
        sums["mse_n"] += (x_n - recon_n).double().square().mean(1).sum()
        sums["l0"] += (latents_BM > 0).double().sum()
        sums["x_sum"] += x_BD.double().sum(0)
    sae.train(was_training)
    n = max(len(held.rows_RD), 1)
    total_var = sums["sq"] - sums["x_sum"].square().sum() / n  # Σ‖x − x̄‖²
    return {
        "rows": len(held.rows_RD),
        "rows_gated": held.n_gated,
        "fvu": float(sums["err"] / total_var),
        "nmse": float(sums["err"] / sums["sq"]),
        "mse_normalized": float(sums["mse_n"] / n),
        "l0": float(sums["l0"] / n),
        "k": sae.spec.k,
        "chunks": held.chunks,
    }
