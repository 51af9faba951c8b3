"""The training loop: every SAE of a sweep steps on the same batch, read once from the cache.

Host-device syncs happen only every `log_every` steps (metrics, the NaN check, AuxK's dead set) and
at checkpoints, so on a GPU the loop runs ahead of the device. Under torchrun each rank reads its
own share of the chunks and gradients are averaged (gloo on CPU, NCCL on GPU); rank 0 writes.
"""

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sae.cache.store import Cache, open_cache
from sae.config import to_jsonable
from sae.device import resolve_device
from sae.errors import UserError
from sae.progress import make_progress
from sae.train.checkpoint import (
    METRICS,
    prepare_run_dir,
    prune_checkpoints,
    resume_point,
    run_cfg,
    save_checkpoint,
    save_run,
    truncate_metrics,
)
from sae.train.config import TrainConfig
from sae.train.gate import Gate
from sae.train.heldout import batches, evaluate_heldout, heldout_rows, input_setup
from sae.train.loader import Loader
from sae.train.sae import SparseAutoencoder, normalize_input
from sae.train.theta import Eq7Estimate, calibrate_theta
from sae.versions import library_versions

METRIC_NAMES = ("loss", "mse", "sparsity", "aux", "l0")


def configure_backend(device: torch.device, precision: str) -> None:
    """CUDA: select the device; TF32 matmuls unless fp32 was asked for. CPU: nothing to set."""
    if device.type == "cuda":
        if device.index is not None:  # "cuda" alone means the current device
            torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"


def pick_layer(cfg: TrainConfig, cache: Cache) -> int:
    if cfg.layer is None:
        if len(cache.layers) > 1:
            raise UserError(f"cache {cache.path} holds layers {cache.layers}; choose one with --layer")
        return cache.layers[0]
    if cfg.layer not in cache.layers:
        raise UserError(f"layer {cfg.layer} is not in cache {cache.path} (it holds {cache.layers})")
    return cfg.layer


def holdout_chunks(cache: Cache, n_full: int) -> list[int]:
    """The last n_full full chunks, plus a partial last chunk if any: alone it may be a handful of rows."""
    if n_full == 0:
        return []
    full_chunks = cache.n_contexts // cache.chunk_contexts
    return list(range(max(full_chunks - n_full, 0), cache.n_chunks))


def make_sae(cfg: TrainConfig, spec, d_in: int, device: torch.device, gate: Gate = Gate(),
             b_dec_D: torch.Tensor | None = None) -> SparseAutoencoder:  # fmt: skip
    """A fresh SAE: the reference code's initialisation from cfg.seed, b_dec at b_dec_D if given."""
    torch.manual_seed(cfg.seed)  # every SAE starts from the reference code's seed
    sparse_decode = cfg.decode == "sparse" or (cfg.decode == "auto" and device.type != "cuda")
    sae = SparseAutoencoder(
        spec, d_in, aux_k=cfg.aux_k, aux_coeff=cfg.aux_coeff, dead_tokens=cfg.dead_tokens,
        bandwidth=cfg.bandwidth, init_threshold=cfg.jumprelu_init_threshold, sparse_decode=sparse_decode,
    ).to(device)  # fmt: skip
    sae.gate = gate
    if b_dec_D is not None:
        with torch.no_grad():
            sae.b_dec.copy_(b_dec_D)
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
    two at or above the count, capped at aux_k: AuxK's top-k and decode then cost what the dead
    latents need (on CPU, AuxK at a fixed 512 more than doubled a step once few latents were dead),
    and torch.compile sees at most log2(aux_k) + 1 shapes."""

    def __init__(self, sae: SparseAutoencoder):
        self.sae = sae
        cuda = sae.W_enc.is_cuda
        self._n_dead = sae.dead_M().sum().cpu().pin_memory() if cuda else sae.dead_M().sum()
        self._event = torch.cuda.Event() if cuda else None

    def aux_k(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        n_dead = int(self._n_dead)
        return 0 if n_dead == 0 else min(self.sae.aux_k, 1 << (n_dead - 1).bit_length())

    def record(self) -> None:
        """Call after each step of the SAE."""
        if self._event is None:
            self._n_dead = self.sae.dead_M().sum()
        else:
            self._n_dead.copy_(self.sae.dead_M().sum(), non_blocking=True)
            self._event.record()


def train_step(sae, model, opt, x_BD: torch.Tensor, cfg: TrainConfig, world: int, dead: DeadLatents):
    """One optimiser step of one SAE; `model` is the SAE or its torch.compile wrapper; `dead` its
    DeadLatents, which sizes this step's AuxK."""
    with torch.autocast(x_BD.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        out = model(x_BD, dead.aux_k())
    dead.record()
    out.loss.backward()
    if world > 1:  # data parallel: average the gradients over ranks in one collective
        grads = [p.grad for p in sae.parameters()]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for g, avg in zip(grads, (flat / world).split([g.numel() for g in grads]), strict=True):
            g.copy_(avg.view_as(g))
    torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip, foreach=True)
    sae.project_decoder_grad()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.normalize_decoder()
    return out


def training_steps(
    cfg: TrainConfig, cache: Cache, train_chunks: list[int], gated_fraction: float, world: int
) -> tuple[int, int]:
    """(steps of cfg.batch_size rows per rank, rows in a pass): cfg.tokens, else cfg.epochs passes over
    the ungated training rows (their count estimated from the gate's sample)."""
    train_rows = sum(cache.contexts_in_chunk(c) for c in train_chunks) * cache.ctx_len
    pass_rows = round(train_rows * (1 - gated_fraction))
    available = int(cfg.epochs * pass_rows)
    tokens = cfg.tokens or available
    if tokens > available:
        gated = f", {gated_fraction:.1%} of them gated" if gated_fraction else ""
        raise UserError(
            f"cache {cache.path} has {train_rows:,} training rows ({cache.rows:,} committed, {cfg.holdout_chunks} "
            f"chunk(s) held out{gated}); {cfg.epochs:g} pass(es) over them are {available:,} tokens, fewer than the "
            f"{tokens:,} tokens asked; harvest more (sae harvest --tokens N), lower --tokens or allow more passes "
            f"with --epochs"
        )
    return max(1, tokens // (cfg.batch_size * world)), pass_rows


def run_training(cfg: TrainConfig, cache_path: Path, resume: bool = False) -> list[Path]:
    """Train every SAE of cfg's sweep on the same batches; returns their run directories."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    device = resolve_device(cfg.device)
    configure_backend(device, cfg.precision)
    cache = open_cache(cache_path)
    layer = pick_layer(cfg, cache)
    specs = cfg.specs()
    run_dirs = [Path(cfg.out) / s.name for s in specs]
    held_chunks = holdout_chunks(cache, cfg.holdout_chunks)
    train_chunks = [c for c in range(cache.n_chunks) if c not in held_chunks]
    if not train_chunks:
        raise UserError(f"cache {cache.path} has {cache.n_chunks} chunk(s), all held out; lower --holdout-chunks")
    if cfg.theta == "calibrated" and not held_chunks and any(s.arch == "batchtopk" for s in specs):
        raise UserError("calibrating BatchTopK's θ needs held-out rows: set --holdout-chunks 1 or more, or --theta eq7")
    setup = input_setup(cfg, cache, layer, train_chunks)
    steps, pass_rows = training_steps(cfg, cache, train_chunks, setup.gated_fraction, world)
    tokens_per_step = cfg.batch_size * world
    # Snapshots at or past the end are the run itself.
    snapshot_steps = {t // tokens_per_step for t in cfg.snapshots if 0 < t // tokens_per_step < steps}

    saes = [make_sae(cfg, spec, cache.d_model, device, setup.gate, setup.b_dec_D) for spec in specs]
    opts = [make_optimizer(cfg, sae) for sae in saes]
    models = [torch.compile(s) if cfg.compile else s for s in saes]
    thetas = [Eq7Estimate(steps, cfg.theta_tail, device) if s.arch == "batchtopk" else None for s in specs]
    start, position = 0, None
    start, states = resume_point(run_dirs, device) if resume else (0, None)
    if states is not None:
        for run_dir, sae, opt, theta, state in zip(run_dirs, saes, opts, thetas, states, strict=True):
            if state["d_in"] != cache.d_model:
                raise UserError(
                    f"cache {cache.path} has d_model={cache.d_model} but the run {run_dir} was trained "
                    f"with d_in={state['d_in']}; resume it on the cache it was trained on"
                )
            sae.load_state_dict(state["sae"])
            opt.load_state_dict(state["optim"])
            if theta is not None:
                theta.min_S.copy_(state["theta_min"])
            position = state["loader"][rank]
            if rank == 0:
                truncate_metrics(run_dir, start)
    elif rank == 0:
        for run_dir in run_dirs:
            prepare_run_dir(run_dir, overwrite=resume)
    loader = Loader(
        cache, layer, train_chunks, cfg.batch_size, cfg.seed, setup.gate, cfg.buffer_chunks,
        cfg.loader_threads, device, rank, world, position,
    )  # fmt: skip
    held = heldout_rows(cache, layer, held_chunks, setup.gate) if rank == 0 and held_chunks else None

    def cfg_json(i: int, step: int) -> dict:
        return {
            **run_cfg(saes[i], cfg.normalize == "standardize", cache, layer),
            "step": step,
            "tokens": step * tokens_per_step,
            "epochs": step * tokens_per_step / pass_rows,
            "input": setup.record(cfg.normalize),
            "train_config": to_jsonable(cfg),
            "versions": library_versions(),
        }

    def save_final(i: int, step: int, run_dir: Path) -> dict:
        """The run dir of SAE i as it is after `step` steps: θ chosen, held-out figures; rank 0."""
        sae, record = saes[i], {}
        if thetas[i] is not None:
            record["theta_eq7"] = thetas[i].value(step)
            record["theta_source"] = "eq7" if held is None else cfg.theta
            sae.theta.fill_(record["theta_eq7"])
            if record["theta_source"] == "calibrated":
                inputs = (
                    normalize_input(x, cfg.normalize, setup.scale)[0]
                    for x in batches(held.rows_ND, cfg.batch_size, device)
                )
                record["theta_calibration"] = calibrate_theta(sae, inputs, sae.spec.k)
                sae.theta.fill_(record["theta_calibration"]["theta"])
        if held is not None:
            record["heldout"] = {
                **evaluate_heldout(sae, held, cfg.normalize, setup.scale, cfg.batch_size, device),
                "dead_frac": float(sae.dead_fraction()),
            }
        save_run(run_dir, sae, setup.scale, {**cfg_json(i, step), **record})
        return record

    def checkpoint(step: int) -> None:
        positions = [None] * world
        if world > 1:
            dist.all_gather_object(positions, loader.position)
        else:
            positions = [loader.position]
        if rank != 0:
            return
        for i, (run_dir, sae, opt, theta) in enumerate(zip(run_dirs, saes, opts, thetas, strict=True)):
            state = {"step": step, "d_in": sae.d_in, "sae": sae.state_dict(), "optim": opt.state_dict()}
            if theta is not None:
                state["theta_min"] = theta.min_S
                sae.theta.fill_(theta.value(step))  # the run dir between checkpoints: eq. 7's θ
            save_checkpoint(run_dir, step, {**state, "loader": positions})
            save_run(run_dir, sae, setup.scale, {**cfg_json(i, step), "theta_source": "eq7" if theta else None})
        for run_dir in run_dirs:
            prune_checkpoints(run_dir)

    wandb_run = _wandb(cfg, [s.name for s in specs]) if rank == 0 else None
    dead_latents = [DeadLatents(sae) for sae in saes]  # after a resume's state is loaded: exact resumes
    sums = torch.zeros(len(saes), len(METRIC_NAMES), device=device)
    last_sync, last_time = start, time.perf_counter()
    progress = make_progress("tok", quiet=rank != 0)
    try:
        with progress:
            task = progress.add_task(f"train {len(saes)} SAE(s)", total=steps * tokens_per_step, status="")
            progress.update(task, completed=start * tokens_per_step)
            for step in range(start, steps):
                x_BD, _, _ = normalize_input(next(loader), cfg.normalize, setup.scale)
                for i, (sae, model, opt) in enumerate(zip(saes, models, opts, strict=True)):
                    out = train_step(sae, model, opt, x_BD, cfg, world, dead_latents[i])
                    if thetas[i] is not None:
                        thetas[i].record(step, out.latents)
                    terms = (out.loss, out.mse, out.sparsity, out.aux, out.l0_B.mean())
                    sums[i] += torch.stack([t.detach().float() for t in terms])
                done = step + 1
                if done in snapshot_steps and rank == 0:
                    for i, run_dir in enumerate(run_dirs):
                        snapshot_dir = run_dir / "snapshots" / str(done * tokens_per_step)
                        snapshot_dir.mkdir(parents=True, exist_ok=True)
                        save_final(i, done, snapshot_dir)
                if done % cfg.log_every and done % cfg.checkpoint_every and done != steps:
                    continue
                # Sync point: metrics, the NaN check (before any checkpoint), AuxK's dead set.
                now = time.perf_counter()
                means = (sums / (done - last_sync)).tolist()
                sums.zero_()
                tok_s = (done - last_sync) * tokens_per_step / (now - last_time)
                last_sync, last_time = done, now
                status = []
                for i, (run_dir, sae) in enumerate(zip(run_dirs, saes, strict=True)):
                    record = dict(zip(METRIC_NAMES, means[i], strict=True))
                    if not all(map(_finite, means[i])):
                        raise UserError(
                            f"loss became NaN/inf in {run_dir.name} before step {done}; training stopped and "
                            f"its last good checkpoint is kept in {run_dir}; try a lower --lr"
                        )
                    dead = float(sae.dead_fraction())
                    record.update(step=done, tokens=done * tokens_per_step, dead_frac=dead, tokens_per_s=tok_s)
                    status.append(f"{run_dir.name}: loss {record['loss']:.4g} L0 {record['l0']:.1f}")
                    if rank == 0:
                        with open(run_dir / METRICS, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        if wandb_run is not None:
                            wandb_run.log({f"{run_dir.name}/{k}": v for k, v in record.items()}, step=done)
                progress.update(task, completed=done * tokens_per_step, status=" | ".join(status))
                if done % cfg.checkpoint_every == 0 or done == steps:
                    checkpoint(done)
    finally:
        loader.close()
    if rank == 0:
        for i, run_dir in enumerate(run_dirs):
            record = save_final(i, steps, run_dir)
            with open(run_dir / METRICS, "a") as f:
                f.write(json.dumps({"step": steps, **record}) + "\n")
            if wandb_run is not None and "heldout" in record:
                heldout = {k: v for k, v in record["heldout"].items() if isinstance(v, int | float)}
                wandb_run.summary.update({f"{run_dir.name}/heldout_{k}": v for k, v in heldout.items()})
    if wandb_run is not None:
        wandb_run.finish()
    return run_dirs


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _wandb(cfg: TrainConfig, names: list[str]):
    if cfg.wandb is None:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project=cfg.wandb, config={**to_jsonable(cfg), "runs": names})
