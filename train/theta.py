"""BatchTopK's inference threshold θ, two ways.

At inference BatchTopK runs as JumpReLU with one scalar θ: f(x) = z·H(z − θ), per sample and batch
independent. The paper (eq. 7) estimates θ as the mean, over training batches, of the smallest
activation BatchTopK kept; its mean L0 then lands near k but not on it (30.0 for k = 32 at SmolLM2
layer 15; 37.0 when the massive-norm rows were left out of training), and a comparison with TopK is
no longer at equal L0. Calibration instead chooses θ on held-out rows so that their mean L0 is the
target exactly: θ lies between the n-th and (n+1)-th largest pre-activation of all N held-out rows
together, n = round(target · N), which is BatchTopK's own selection over the whole held-out set.
"""

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae.device import resolve_device
from sae.errors import UserError
from sae.train.holdout import batches, evaluate_heldout, heldout_rows
from sae.train.rundir import TRAINING_KEYS, load_sae, read_run, run_cfg, save_run
from sae.train.sae import SparseAutoencoder
from sae.train.sparse import Active


class Eq7Estimate:
    """Eq. 7 over the last `tail` of the steps run so far, whose batches match the current weights
    (earlier ones describe an encoder that no longer exists): one minimum per step, kept on the
    device and written without a host sync."""

    def __init__(self, steps: int, tail: float, device: torch.device):
        self.tail = tail
        self.min_S = torch.full((steps,), float("nan"), device=device)

    def record(self, step: int, active: Active) -> None:
        kept_N = active.acts_N.detach()
        self.min_S[step] = torch.where(kept_N > 0, kept_N, torch.inf).min()

    def value(self, step: int) -> float:
        """θ after `step` steps; 0 before any batch kept a positive activation."""
        window_S = self.min_S[int(step * (1 - self.tail)) : step].double()
        window_S = window_S[window_S.isfinite()]
        return float(window_S.mean()) if len(window_S) else 0.0


@torch.no_grad()
def calibrate_theta(sae: SparseAutoencoder, rows: Iterable[Tensor], target_l0: float) -> dict[str, Any]:
    """θ giving mean L0 = target_l0 on these batches of raw rows; exact: it keeps the n + 1 largest
    pre-activations seen so far, never all of them."""
    top_K = None
    batches = [sae.normalize(x_BD)[0] for x_BD in rows]
    n_rows = sum(len(x_BD) for x_BD in batches)
    n_keep = round(target_l0 * n_rows)
    if not 0 < n_keep < n_rows * sae.m:
        raise ValueError(f"target L0 {target_l0} on {n_rows} rows of {sae.m} latents selects {n_keep} entries")
    for x_BD in batches:
        values_N = sae.pre_acts(x_BD).flatten()
        if top_K is not None and len(top_K) == n_keep + 1:  # only values that can still enter the top
            values_N = values_N[values_N > top_K[-1]]
        merged = values_N if top_K is None else torch.cat([top_K, values_N])
        top_K = merged.topk(min(n_keep + 1, len(merged))).values  # sorted, largest first
    if len(top_K) <= n_keep:
        top_K = torch.cat([top_K, top_K.new_zeros(n_keep + 1 - len(top_K))])
    # Between the n-th and (n+1)-th largest: exactly n entries exceed it (unless those two tie). Every
    # entry above the (n+1)-th largest is in top_K, so its count there is the L0 at θ, with no second pass.
    theta = float((top_K[n_keep - 1] + top_K[n_keep]) / 2)
    l0 = float((top_K > theta).sum()) / n_rows
    return {"theta": theta, "target_l0": target_l0, "l0": l0, "rows": n_rows}


def calibrate_run(run_dir: Path, target_l0: float | None = None, cache: str | None = None,
                  device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    """Choose a saved BatchTopK run's θ again on its held-out rows (gated as in training) for mean L0
    = target_l0 (default k); rewrites its weights and cfg.json (eq. 7's θ stays beside it)."""
    run = read_run(run_dir, cache)
    if run.imported is not None:
        raise UserError(f"{run_dir} holds a {run.imported.format} SAE; sae calibrate chooses θ again for our runs only")
    device = resolve_device(device)
    sae = load_sae(run_dir, device)
    if not sae.arch.calibrated_theta:
        raise UserError(f"{run_dir} is a {sae.spec.arch} SAE; only BatchTopK has a θ to calibrate")
    chunks = run.cfg.get("heldout", {}).get("chunks")
    if not chunks:
        raise UserError(
            f"run {run_dir} has no held-out rows to calibrate on (trained with --holdout-chunks 0, or unfinished)"
        )
    target = sae.spec.k if target_l0 is None else target_l0
    if not 0 < target < sae.m:
        raise UserError(f"target L0 must be in (0, {sae.m}), got {target}")
    held = heldout_rows(run.cache, run.layer, chunks, sae.gate)
    batch_size = run.cfg["train_config"]["batch_size"]
    calibration = calibrate_theta(sae, batches(held.rows_RD, batch_size, device), target)
    sae.theta.fill_(calibration["theta"])
    heldout = {**run.cfg["heldout"], **evaluate_heldout(sae, held, batch_size, device)}
    training = {key: run.cfg[key] for key in TRAINING_KEYS if key in run.cfg}
    training.update(theta_source="calibrated", theta_calibration=calibration, heldout=heldout)
    save_run(Path(run_dir), sae, run_cfg(sae, run.cfg["cache"], training))
    return calibration
