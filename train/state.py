"""The state of a sweep's training: every SAE with its optimiser, its eq. 7 θ estimate and its dead
count, and the step. A checkpoint holds it with the loader's position (train.rundir writes it), and
--resume restores it exactly. There is no random state to keep: the initialisation is seeded, and the
loader's order is a function of (seed, epoch, block)."""

from typing import Any

import torch

from sae.errors import UserError
from sae.train.config import SAESpec, TrainConfig
from sae.train.inputs import InputSetup
from sae.train.sae import SparseAutoencoder
from sae.train.theta import Eq7Estimate


def make_sae(
    cfg: TrainConfig, spec: SAESpec, d_in: int, device: torch.device, setup: InputSetup | None = None
) -> SparseAutoencoder:
    """A fresh SAE: the reference code's initialisation from cfg.seed, its input space and gate from
    setup (none: raw rows, no gate), b_dec at setup's start."""
    torch.manual_seed(cfg.seed)  # every SAE starts from the reference code's seed
    sparse_decode = cfg.decode == "sparse" or (cfg.decode == "auto" and device.type != "cuda")
    inputs = {} if setup is None else {"normalize": cfg.normalize, "input_scale": setup.scale, "gate": setup.gate}
    sae = SparseAutoencoder(spec, d_in, cfg, sparse_decode=sparse_decode, **inputs).to(device)
    if setup is not None and setup.b_dec_D is not None:
        with torch.no_grad():
            sae.b_dec.copy_(setup.b_dec_D)
    return sae


def make_optimizer(cfg: TrainConfig, sae: SparseAutoencoder) -> torch.optim.Adam:
    thresholds = [p for name, p in sae.named_parameters() if name == "log_threshold"]
    groups = [{"params": [p for name, p in sae.named_parameters() if name != "log_threshold"]}]
    if thresholds:
        groups.append({"params": thresholds, "lr": cfg.threshold_lr or cfg.lr})
    # fused: one kernel for all parameters, on CPU too (12.2 -> 3.9 ms a step at d 576, m 4608)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)


class DeadLatents:
    """An SAE's dead-latent count, read one step late so that no step waits for the device (on CPU
    the read is current). It sizes AuxK: 0 (skipped) when no latent was dead, else the next power of
    two at or above the count, capped at the architecture's aux_k: AuxK's top-k and decode then cost
    what the dead latents need (on CPU, AuxK at a fixed 512 more than doubled a step once few latents
    were dead), and torch.compile sees at most log2(aux_k) + 1 shapes."""

    def __init__(self, sae: SparseAutoencoder):
        self.sae = sae
        cuda = sae.W_enc.is_cuda
        self._n_dead = sae.dead_M().sum().cpu().pin_memory() if cuda else sae.dead_M().sum()
        self._event = torch.cuda.Event() if cuda else None

    def aux_k(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        n_dead = int(self._n_dead)
        return 0 if n_dead == 0 else min(self.sae.arch.aux_k, 1 << (n_dead - 1).bit_length())

    def record(self) -> None:
        """Call after each step of the SAE."""
        if self._event is None:
            self._n_dead = self.sae.dead_M().sum()
        else:
            self._n_dead.copy_(self.sae.dead_M().sum(), non_blocking=True)
            self._event.record()


class TrainState:
    """Every SAE of a sweep, its optimiser, its torch.compile wrapper (or itself), its θ estimate (the
    architectures with a calibrated θ) and its dead count; `step` steps done, and this rank's loader
    position to go on from (None: the start)."""

    def __init__(self, cfg: TrainConfig, specs: list[SAESpec], d_in: int, setups: list[InputSetup], steps: int,
                 device: torch.device):  # fmt: skip
        """setups: each SAE's input set-up (its layer's)."""
        self.saes = [make_sae(cfg, spec, d_in, device, setup) for spec, setup in zip(specs, setups, strict=True)]
        self.opts = [make_optimizer(cfg, sae) for sae in self.saes]
        self.models = [torch.compile(sae) if cfg.compile else sae for sae in self.saes]
        self.thetas = [
            Eq7Estimate(steps, cfg.theta_tail, device) if sae.arch.calibrated_theta else None for sae in self.saes
        ]
        self.step, self.position = 0, None
        self.dead = [DeadLatents(sae) for sae in self.saes]

    def checkpoint(self, i: int, positions: list[dict]) -> dict[str, Any]:
        """SAE i's checkpoint: its weights, optimiser and θ statistics, and every rank's loader position."""
        sae, state = self.saes[i], {"step": self.step, "d_in": self.saes[i].d_in}
        state.update(sae=sae.state_dict(), optim=self.opts[i].state_dict(), loader=positions)
        if self.thetas[i] is not None:
            state["theta_min"] = self.thetas[i].min_S
        return state

    def restore(self, checkpoints: list[dict[str, Any]], rank: int, run_dirs: list, cache_path: str) -> None:
        """Load every SAE's checkpoint of one step, and this rank's loader position (run_dirs and the
        cache name them in a refusal)."""
        for i, (state, run_dir) in enumerate(zip(checkpoints, run_dirs, strict=True)):
            if state["d_in"] != self.saes[i].d_in:
                raise UserError(
                    f"cache {cache_path} has d_model={self.saes[i].d_in} but the run {run_dir} was trained "
                    f"with d_in={state['d_in']}; resume it on the cache it was trained on"
                )
            state = encoder_by_rows(state)
            self.saes[i].load_state_dict(state["sae"])
            self.opts[i].load_state_dict(state["optim"])
            if self.thetas[i] is not None:
                self.thetas[i].min_S.copy_(state["theta_min"])
        self.step, self.position = checkpoints[0]["step"], checkpoints[0]["loader"][rank]
        self.dead = [DeadLatents(sae) for sae in self.saes]  # after the weights: an exact resume


def encoder_by_rows(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of an SAE from before its encoder was stored a row per latent (W_enc [d, m] and its
    Adam moments alike) in today's layout: W_enc_MD [m, d], the moments contiguous [m, d] as fused Adam
    reads them (flat, in the parameter's memory order). Today's checkpoints pass as they are."""
    if "W_enc" not in state["sae"]:
        return state
    state["sae"]["W_enc_MD"] = state["sae"].pop("W_enc").t()
    moments = state["optim"]["state"].get(0, {})  # the encoder is the optimiser's first parameter
    for name in ("exp_avg", "exp_avg_sq"):
        if name in moments:
            moments[name] = moments[name].t().contiguous()
    return state
