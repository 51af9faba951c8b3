"""Per-token measurements, summed per context; headline metrics with standard errors.

Every metric is a ratio of sums, Σ_c num_c / Σ_c den_c over evaluation contexts c (a mean has den =
token counts). Tokens of one context are correlated, contexts are not (they come from different
stretches of text), so the standard error treats contexts as independent clusters (delta method):

    se(R)² = n/(n−1) · Σ_c (num_c − R·den_c)² / (Σ_c den_c)²
"""

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

STD_EPS = 1e-5  # the reference code's per-sample standardisation: (x − mean) / (std + 1e-5)
RECON_KEYS = ("mse", "nmse", "fvu", "explained_variance", "nmse_standardized", "cos_sim", "l0_mean")


def log_probs(logits_BTV: Tensor) -> Tensor:
    return logits_BTV.float().log_softmax(-1)


def token_ce(logp_BTV: Tensor, ids_BT: Tensor) -> Tensor:
    """[B, T] −log p(next token); the last position has no next token and gets 0."""
    ce_BT = torch.zeros(ids_BT.shape, device=ids_BT.device)
    ce_BT[:, :-1] = -logp_BTV[:, :-1].gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
    return ce_BT


def token_kl(clean_logp_BTV: Tensor, logp_BTV: Tensor) -> Tensor:
    """[B, T] KL(clean ‖ other) over the vocabulary, in nats."""
    return F.kl_div(logp_BTV, clean_logp_BTV, log_target=True, reduction="none").sum(-1)


def row_stats(x_RD: Tensor, recon_RD: Tensor, latents_RM: Tensor) -> dict[str, Tensor]:
    """Per-row [R] quantities whose context sums make up the reconstruction metrics."""
    x_RD, recon_RD = x_RD.float(), recon_RD.float()
    err_sq_R = (x_RD - recon_RD).square().sum(-1)
    std_R = x_RD.std(dim=-1)
    return {
        "err_sq": err_sq_R,
        "x_sq": x_RD.square().sum(-1),
        # MSE in the space of per-sample standardised inputs: the paper's "normalized MSE"
        "std_mse": err_sq_R / x_RD.shape[-1] / (std_R + STD_EPS).square(),
        "cos": F.cosine_similarity(x_RD, recon_RD, dim=-1),
        "l0": (latents_RM > 0).sum(-1).float(),
    }


@dataclass
class Tally:
    """Running sums of one evaluated variant (the clean/ablated LM, or one SAE in one mode)."""

    sums: dict[str, list[Tensor]] = field(default_factory=lambda: defaultdict(list))
    fires_M: Tensor | None = None
    """Tokens on which each latent was active."""
    l0_counts: dict[str, list[Tensor]] = field(default_factory=lambda: defaultdict(list))
    """bincounts of per-token L0, for "plain" tokens and "bos_or_first" ones."""

    def add(self, name: str, values_BT: Tensor, mask_BT: Tensor) -> None:
        """Per-context sums [B] of values over the masked positions (float64: millions of terms)."""
        self.sums[name].append((values_BT.double() * mask_BT).sum(1))

    def add_rows(self, prefix: str, x_BTD: Tensor, stats: dict[str, Tensor], mask_BT: Tensor) -> None:
        B, T, D = x_BTD.shape
        for name, values_R in stats.items():
            self.add(prefix + name, values_R.view(B, T), mask_BT)
        self.add(prefix + "rows", torch.ones_like(mask_BT, dtype=torch.float64), mask_BT)
        self.sums[prefix + "x_sum_D"].append((x_BTD.double() * mask_BT[..., None]).sum(1))

    def add_latents(self, latents_RM: Tensor, l0_R: Tensor, mask_R: Tensor, plain_R: Tensor) -> None:
        fired_M = ((latents_RM > 0) & mask_R[:, None]).sum(0)
        self.fires_M = fired_M if self.fires_M is None else self.fires_M + fired_M
        l0_R = l0_R.long()
        self.l0_counts["plain"].append(torch.bincount(l0_R[mask_R & plain_R]))
        self.l0_counts["bos_or_first"].append(torch.bincount(l0_R[mask_R & ~plain_R]))

    def cat(self, name: str) -> Tensor:
        return torch.cat(self.sums[name]).cpu()


def ratio(num_C: Tensor, den_C: Tensor) -> tuple[float, float]:
    """Σ num / Σ den and its cluster standard error (contexts as clusters); see the module docstring."""
    num_C, den_C = num_C.double(), den_C.double()
    total = float(den_C.sum())
    if total == 0:
        return math.nan, math.nan
    value = float(num_C.sum()) / total
    n = len(num_C)
    spread = float((num_C - value * den_C).square().sum())
    return value, math.sqrt(n / (n - 1) * spread) / abs(total) if n > 1 else math.nan


def _put(out: dict, key: str, value_se: tuple[float, float]) -> None:
    out[key], out[f"{key}_stderr"] = value_se


def lm_metrics(shared: Tally, run: Tally) -> dict[str, float]:
    """CE clean/spliced/ablated (nats per predicted token), degradation, recovered fractions, KL."""
    n, clean, spliced = shared.cat("n_pred"), shared.cat("ce_clean"), run.cat("ce_spliced")
    out: dict[str, float] = {}
    _put(out, "ce_clean", ratio(clean, n))
    _put(out, "ce_spliced", ratio(spliced, n))
    _put(out, "ce_degradation", ratio(spliced - clean, n))
    for name in ("zero", "mean"):
        ablated = shared.cat(f"ce_{name}")
        _put(out, f"ce_{name}_ablation", ratio(ablated, n))
        # (CE_ablated − CE_spliced) / (CE_ablated − CE_clean): 1 = as good as clean, 0 = as bad as ablation
        _put(out, f"ce_recovered_{name}", ratio(ablated - spliced, ablated - clean))
    _put(out, "kl", ratio(run.cat("kl"), n))
    out["n_pred_tokens"] = int(n.sum())
    return out


def recon_metrics(run: Tally, prefix: str, suffix: str) -> dict[str, float]:
    """NMSE, FVU, explained variance, standardised MSE, cosine, L0 over the rows summed under prefix."""
    rows, err, x_sq = run.cat(prefix + "rows"), run.cat(prefix + "err_sq"), run.cat(prefix + "x_sq")
    x_sum_CD = run.cat(prefix + "x_sum_D")
    d = x_sum_CD.shape[1]
    mean_D = x_sum_CD.sum(0) / rows.sum()
    # Σ_rows ‖x − x̄‖² per context, x̄ the mean over all evaluation rows, from streamed sums
    centered_C = x_sq - 2 * x_sum_CD @ mean_D + rows * mean_D.square().sum()
    fvu = ratio(err, centered_C)
    values = {
        "mse": ratio(err, rows * d),
        "nmse": ratio(err, x_sq),
        "fvu": fvu,
        "explained_variance": (1 - fvu[0], fvu[1]),
        "nmse_standardized": ratio(run.cat(prefix + "std_mse"), rows),
        "cos_sim": ratio(run.cat(prefix + "cos"), rows),
        "l0_mean": ratio(run.cat(prefix + "l0"), rows),
    }
    out: dict[str, float] = {}
    for key in RECON_KEYS:
        _put(out, key + suffix, values[key])
    out["n_rows" + suffix] = int(rows.sum())
    return out


def l0_distribution(run: Tally) -> dict:
    """Per-token L0 counts (only values that occur) for plain and BOS/first-position tokens, and quantiles."""
    counts = {}
    for kind, parts in run.l0_counts.items():
        total = np.zeros(max(len(p) for p in parts), dtype=np.int64)
        for part in parts:
            total[: len(part)] += part.cpu().numpy()
        counts[kind] = total
    size = max(len(c) for c in counts.values())
    both = {kind: np.pad(c, (0, size - len(c))) for kind, c in counts.items()}
    every = both["plain"] + both["bos_or_first"]
    values = np.flatnonzero(every)
    cdf = np.cumsum(every) / max(every.sum(), 1)
    quantiles = {f"p{q}": int(np.searchsorted(cdf, q / 100)) for q in (1, 10, 50, 90, 99)}
    return {
        "l0": values.tolist(),
        **{kind: c[values].tolist() for kind, c in both.items()},
        **quantiles,
        "min": int(values.min(initial=0)),
        "max": int(values.max(initial=0)),
    }


def density(run: Tally, n_rows: int, dense_threshold: float) -> dict:
    """Dead and dense latents and the histogram of log10 firing frequency over live latents."""
    freq_M = run.fires_M.double().cpu() / n_rows
    m, live = len(freq_M), freq_M[freq_M > 0]
    lo = math.floor(math.log10(1 / n_rows) * 4) / 4  # the rarest observable frequency: one token
    counts, edges = np.histogram(live.log10().numpy(), bins=np.arange(lo, 0.25 + 1e-9, 0.25))
    dead, dense = int((freq_M == 0).sum()), int((freq_M > dense_threshold).sum())
    return {
        "dead_latents": dead,
        "dead_fraction": dead / m,
        "dense_latents": dense,
        "dense_fraction": dense / m,
        "dense_threshold": dense_threshold,
        "density_log10_edges": edges.round(4).tolist(),
        "density_log10_counts": counts.tolist(),
        "density_median": float(freq_M.median()),
    }
