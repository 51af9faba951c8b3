"""What the trainer needs around the SAE: the input set-up (scale, left-out rows) and the
held-out report (FVU and L0 of the saved, batch-independent form on chunks never trained on)."""

import math
from typing import Any

import torch

from sae.cache.store import Cache
from sae.train.config import TrainConfig
from sae.train.loader import RowFilter, read_rows
from sae.train.sae import SparseAutoencoder, normalize_input

NORM_SAMPLE_CHUNKS = 4


def input_setup(cfg: TrainConfig, cache: Cache, layer: int, train_chunks: list[int]):
    """(scale, row filter, the record of both for cfg.json)."""
    plain = cfg.drop_bos or cfg.drop_first
    row_filter = RowFilter(cfg.drop_bos, cfg.drop_first, None, cache.spec.get("bos_token_id"))
    if cfg.drop_norm_quantile is not None:  # the cap is a quantile of a sample of the other kept rows
        sample_RD = torch.cat([read_rows(cache, layer, c, row_filter) for c in train_chunks[:NORM_SAMPLE_CHUNKS]])
        norms_R = sample_RD.float().norm(dim=1)
        max_norm = float(torch.quantile(norms_R[: 1 << 24], cfg.drop_norm_quantile))
        row_filter = RowFilter(cfg.drop_bos, cfg.drop_first, max_norm, row_filter.bos_token_id)
    scale = 1.0
    if cfg.normalize == "scale":
        # cache stats over "plain" rows leave out BOS and first positions, as the filter does
        stats = cache.stats(layer)
        mean_norm = stats["plain_mean_norm"] if plain else stats["mean_norm"]
        scale = math.sqrt(cache.d_model) / mean_norm
    record = {
        "normalize": cfg.normalize,
        "scale": scale,
        "drop_bos": cfg.drop_bos,
        "drop_first": cfg.drop_first,
        "drop_norm_quantile": cfg.drop_norm_quantile,
        "max_norm": row_filter.max_norm,
        "bos_token_id": row_filter.bos_token_id,
    }
    return scale, row_filter, record


@torch.no_grad()
def evaluate_heldout(sae: SparseAutoencoder, cache: Cache, layer: int, chunks: list[int], cfg: TrainConfig,
                     scale: float, row_filter: RowFilter, device: torch.device) -> dict[str, Any]:  # fmt: skip
    """FVU, NMSE and mean L0 on raw held-out rows, all rows and (if a filter is on) the kept ones."""
    was_training = sae.training
    sae.eval()
    sums: dict[str, dict[str, Any]] = {"all": {}, "kept": {}}
    for chunk in chunks:
        acts_RD = cache.read_acts(layer, chunk)
        keep_R = row_filter.keep(cache.read_tokens(chunk), acts_RD)
        for start in range(0, len(acts_RD), cfg.batch_size):
            x_BD = acts_RD[start : start + cfg.batch_size].to(device).float()
            x_n, mult, shift = normalize_input(x_BD, cfg.normalize, scale)
            latents_BM = sae.encode(x_n)
            recon_n = sae.decode(latents_BM)
            per_row = {
                "err": (x_BD - (recon_n * mult + shift)).square().sum(1),
                "sq": x_BD.square().sum(1),
                "mse_n": (x_n - recon_n).square().mean(1),
                "l0": (latents_BM > 0).sum(1).float(),
            }
            _accumulate(sums["all"], per_row, x_BD)
            if keep_R is not None:
                kept_B = keep_R[start : start + cfg.batch_size].to(device)
                _accumulate(sums["kept"], {k: v[kept_B] for k, v in per_row.items()}, x_BD[kept_B])
    sae.train(was_training)
    report = {"rows_" + name: int(s["n"]) for name, s in sums.items() if s}
    report.update(_summary(sums["all"], ""))
    if sums["kept"]:
        report.update(_summary(sums["kept"], "kept_"))
    report.update(k=sae.spec.k, dead_frac=float(sae.dead_fraction()), chunks=chunks)
    return report


def _accumulate(sums: dict[str, Any], per_row: dict[str, torch.Tensor], x_BD: torch.Tensor) -> None:
    for name, values in per_row.items():
        sums[name] = sums.get(name, 0.0) + values.double().sum()
    sums["x_sum"] = sums.get("x_sum", 0.0) + x_BD.double().sum(0)
    sums["n"] = sums.get("n", 0) + len(x_BD)


def _summary(s: dict[str, Any], prefix: str) -> dict[str, float]:
    n = max(s["n"], 1)
    total_var = s["sq"] - (s["x_sum"].square().sum() / n)  # Σ‖x − x̄‖²
    return {
        f"{prefix}fvu": float(s["err"] / total_var),
        f"{prefix}nmse": float(s["err"] / s["sq"]),
        f"{prefix}mse_normalized": float(s["mse_n"] / n),
        f"{prefix}l0": float(s["l0"] / n),
    }
