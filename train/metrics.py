"""What training logs: each SAE's loss terms summed on the device every step and, at each sync point
(every log_every steps, at checkpoints and at the end), averaged into a metrics.jsonl line, a W&B
record and the progress line; the sync is also where a NaN loss stops the run."""

import time
from pathlib import Path

import torch

from sae.errors import UserError
from sae.train.archs import SAEOutput
from sae.train.rundir import append_metrics
from sae.train.sae import SparseAutoencoder

METRIC_NAMES = ("loss", "mse", "sparsity", "aux", "l0")


class MetricsLog:
    def __init__(self, run_dirs: list[Path], device: torch.device, start: int, tokens_per_step: int,
                 wandb_run=None, write: bool = True):  # fmt: skip
        """write: this rank writes metrics.jsonl (rank 0); wandb_run: a W&B run to log to as well."""
        self.run_dirs, self.tokens_per_step, self.wandb_run, self.write = run_dirs, tokens_per_step, wandb_run, write
        self.sums = torch.zeros(len(run_dirs), len(METRIC_NAMES), device=device)
        self.last_sync, self.last_time = start, time.perf_counter()

    def add(self, i: int, out: SAEOutput) -> None:
        """SAE i's loss terms of one step, summed without a host sync."""
        terms = (out.loss, out.mse, out.sparsity, out.aux, out.l0_B.mean())
        self.sums[i] += torch.stack([t.detach().float() for t in terms])

    def sync(self, done: int, saes: list[SparseAutoencoder]) -> str:
        """Average since the last sync into one line per SAE; returns the progress status."""
        now = time.perf_counter()
        means = (self.sums / (done - self.last_sync)).tolist()
        self.sums.zero_()
        tok_s = (done - self.last_sync) * self.tokens_per_step / (now - self.last_time)
        self.last_sync, self.last_time = done, now
        status = []
        for run_dir, sae, values in zip(self.run_dirs, saes, means, strict=True):
            if not all(v == v and abs(v) != float("inf") for v in values):
                raise UserError(
                    f"loss became NaN/inf in {run_dir.name} before step {done}; training stopped and "
                    f"its last good checkpoint is kept in {run_dir}; try a lower --lr"
                )
            record = dict(zip(METRIC_NAMES, values, strict=True))
            record.update(step=done, tokens=done * self.tokens_per_step, dead_frac=float(sae.dead_fraction()),
                          tokens_per_s=tok_s)  # fmt: skip
            status.append(f"{run_dir.name}: loss {record['loss']:.4g} L0 {record['l0']:.1f}")
            if self.write:
                append_metrics(run_dir, record)
                if self.wandb_run is not None:
                    self.wandb_run.log({f"{run_dir.name}/{k}": v for k, v in record.items()}, step=done)
        return " | ".join(status)

    def final(self, run_dir: Path, step: int, record: dict) -> None:
        """The last line of a run: its θ and held-out figures; W&B's summary gets the held-out numbers."""
        append_metrics(run_dir, {"step": step, **record})
        if self.wandb_run is not None and "heldout" in record:
            heldout = {k: v for k, v in record["heldout"].items() if isinstance(v, int | float)}
            self.wandb_run.summary.update({f"{run_dir.name}/heldout_{k}": v for k, v in heldout.items()})
