"""The training loop: every SAE of a sweep steps on the same batch, read once from the cache.

Host-device syncs happen only every `log_every` steps (metrics, the NaN check, AuxK's dead set) and
at checkpoints, so on a GPU the loop runs ahead of the device. Under torchrun each rank reads its
own share of the chunks and gradients are averaged (gloo on CPU, NCCL on GPU); rank 0 writes.
"""

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from sae.cache.follow import Follower, wait_for_cache
from sae.cache.store import Cache, open_cache
from sae.cache.window import Window
from sae.config import to_jsonable
from sae.device import keep_freed_memory, resolve_device
from sae.errors import UserError
from sae.progress import console, make_progress
from sae.train import rundir
from sae.train.config import TrainConfig
from sae.train.holdout import HeldOut, batches, evaluate_heldout, heldout_rows
from sae.train.inputs import InputSetup
from sae.train.loader import Loader
from sae.train.metrics import MetricsLog
from sae.train.plan import Plan, plan_training
from sae.train.state import DeadLatents, TrainState
from sae.train.theta import calibrate_theta
from sae.versions import library_versions

OnBatch = Callable[[TrainState, dict[int, torch.Tensor]], dict[int, torch.Tensor]]


def run_training(cfg: TrainConfig, cache: "str | Path | Cache", resume: bool = False,
                 on_batch: OnBatch | None = None, window: Window | None = None,
                 source: dict | None = None) -> list[Path]:  # fmt: skip
    """Train every SAE of cfg's sweep on the same batches; returns their run directories. Resuming a
    finished sweep changes nothing. on_batch(state, batch) sees the state and each batch ({layer:
    x_BD}) before the SAEs step on it (state.step: the step about to run) and returns what they get:
    tests inject faults and read the SAEs through it. window: the cache is a stream's, written by a harvest in this process
    (the trainer frees each block from it once read, and checkpoints say where the stream stood);
    source: what made the stream, recorded in cfg.json."""
    world, rank = start_ranks(cfg)
    device = resolve_device(cfg.device)
    configure_backend(device, cfg.precision)
    if cfg.compile and device.type == "cpu" and rank == 0:
        console.print("note: --compile on the CPU ran at half eager's speed in our measurements (sae train --help)")
    follower = None
    if not isinstance(cache, Cache):
        if cfg.harvest_order:
            cache = wait_for_cache(str(cache), cfg.follow_timeout, window)
        else:
            cache = open_cache(cache)
    if cfg.harvest_order and not cache.complete:
        follower = Follower(cache, window=window)
    elif cfg.harvest_order and window is None:  # said once
        console.print(f"cache {cache.path} is complete: nothing to wait for (its first pass keeps harvest order)")
    plan = plan_training(cfg, cache, world, follower, saved_setups(cfg) if resume else None)
    plan = plan._replace(source=source)
    setups = [plan.setups[layer] for layer in plan.sae_layers]
    state = TrainState(cfg, plan.specs, plan.cache.d_model, setups, plan.steps, device)
    if not start_or_resume(state, plan, resume, rank, device):
        return plan.run_dirs
    gate = setups[0].gate  # one gate: it names the same rows at every layer
    loader = Loader(
        plan.cache, plan.layers, plan.train_chunks, cfg.batch_size, cfg.seed, gate, cfg.buffer_chunks,
        cfg.loader_threads, device, rank, world, state.position, cfg.harvest_order, follower, window,
    )  # fmt: skip
    held = {}
    if rank == 0 and plan.held_chunks:
        held = {layer: heldout_rows(plan.cache, layer, plan.held_chunks, gate) for layer in plan.layers}
    wandb_run = _wandb(cfg, [s.name for s in plan.specs]) if rank == 0 else None
    log = MetricsLog(plan.run_dirs, device, state.step, plan.tokens_per_step, wandb_run, write=rank == 0)
    try:
        train_loop(cfg, plan, state, loader, log, held, on_batch, rank, world)
    finally:
        loader.close()
    if rank == 0:
        stream = stream_record(plan)
        for i, run_dir in enumerate(plan.run_dirs):
            record = save_complete_run(cfg, plan, state, i, held.get(plan.sae_layers[i]), run_dir, stream)
            log.final(run_dir, plan.steps, record)
    if wandb_run is not None:
        wandb_run.finish()
    return plan.run_dirs


def train_loop(cfg: TrainConfig, plan: Plan, state: TrainState, loader: Loader, log: MetricsLog,
               held: dict[int, HeldOut], on_batch: OnBatch | None, rank: int, world: int) -> None:  # fmt: skip
    """Steps from state.step to plan.steps: snapshots, syncs (metrics, the NaN check) and checkpoints."""
    tokens_per_step = plan.tokens_per_step
    with make_progress("tok", quiet=rank != 0) as progress:
        task = progress.add_task(f"train {len(state.saes)} SAE(s)", total=plan.steps * tokens_per_step, status="")
        progress.update(task, completed=state.step * tokens_per_step)
        for step in range(state.step, plan.steps):
            batch = next(loader)
            if on_batch is not None:
                batch = on_batch(state, batch)
            for i, (sae, model, opt) in enumerate(zip(state.saes, state.models, state.opts, strict=True)):
                out = train_step(sae, model, opt, batch[plan.sae_layers[i]], cfg, world, state.dead[i])
                if state.thetas[i] is not None:
                    state.thetas[i].record(step, out.latents)
                log.add(i, out)
            state.step = done = step + 1
            if done in plan.snapshot_steps and rank == 0:
                stream = stream_record(plan)
                for i, run_dir in enumerate(plan.run_dirs):
                    snapshot = rundir.snapshot_dir(run_dir, done * tokens_per_step)
                    save_complete_run(cfg, plan, state, i, held.get(plan.sae_layers[i]), snapshot, stream)
            if done % cfg.log_every and done % cfg.checkpoint_every and done != plan.steps:
                continue
            status = log.sync(done, state.saes)
            progress.update(task, completed=done * tokens_per_step, status=status)
            if done % cfg.checkpoint_every == 0 or done == plan.steps:
                checkpoint(cfg, plan, state, loader, rank, world)


def train_step(sae, model, opt, x_BD: torch.Tensor, cfg: TrainConfig, world: int, dead: DeadLatents):
    """One optimiser step of one SAE on raw rows; `model` is the SAE or its torch.compile wrapper; `dead`
    its DeadLatents, which sizes this step's AuxK."""
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
    params = [p for p in sae.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if x_BD.is_cuda or norm > cfg.grad_clip:  # on the CPU the host knows: no multiply by 1 when not clipping
        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm, foreach=True)
    sae.project_decoder_grad()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.normalize_decoder()
    return out


def start_ranks(cfg: TrainConfig) -> tuple[int, int]:
    """(world size, this rank): torchrun's, its process group started; (1, 0) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    return world, dist.get_rank() if world > 1 else 0


def configure_backend(device: torch.device, precision: str) -> None:
    """CUDA: select the device; TF32 matmuls unless fp32 was asked for. CPU: malloc keeps freed memory."""
    keep_freed_memory(device)
    if device.type == "cuda":
        if device.index is not None:  # "cuda" alone means the current device
            torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"


def start_or_resume(state: TrainState, plan: Plan, resume: bool, rank: int, device: torch.device) -> bool:
    """Restore the newest checkpoint every run has (resume) or prepare fresh run dirs; False when the
    sweep had already finished (then nothing is touched)."""
    if resume:
        step, checkpoints = rundir.resume_point(plan.run_dirs, device)
        if checkpoints is not None:
            state.restore(checkpoints, rank, plan.run_dirs, plan.cache.path)
            finished = step == plan.steps and all(rundir.is_finished(d, step) for d in plan.run_dirs)
            for run_dir in plan.run_dirs if rank == 0 else []:
                rundir.remove_partial_writes(run_dir)
                if not finished:
                    rundir.truncate_metrics(run_dir, step)
            return not finished
    if rank == 0:
        for run_dir in plan.run_dirs:
            rundir.prepare_run_dir(run_dir, overwrite=resume)
    return True


def saved_setups(cfg: TrainConfig) -> dict[int, InputSetup] | None:
    """The input set-ups a sweep recorded at its last save, by layer; None before it saved any."""
    specs, setups = cfg.specs(), {}
    for path in (Path(cfg.out) / spec.name for spec in specs):
        saved = rundir.saved_input(path)
        if saved is None:
            return None
        setups.setdefault(saved["layer"], InputSetup.from_record(saved))
    return setups


def training_record(cfg: TrainConfig, plan: Plan, step: int, i: int, stream: dict | None) -> dict:
    """cfg.json's record of how far SAE i's training got (train.rundir.TRAINING_KEYS); `stream`: the
    sweep's stream_record."""
    tokens = step * plan.tokens_per_step
    record = {
        "step": step, "tokens": tokens, "epochs": tokens / plan.pass_rows,
        "input": plan.setups[plan.sae_layers[i]].record(cfg.normalize), "train_config": to_jsonable(cfg),
        "versions": library_versions(),
    }  # fmt: skip
    return record if stream is None else {**record, "stream": stream}


def stream_record(plan: Plan) -> dict | None:
    """cfg.json's "stream" of a sweep trained from a stream: what made it and where its token stream
    stands, read once for every SAE of the sweep (a stream's cache in memory goes with it, and its
    evaluation holds out the text after that point). None: not a stream."""
    if plan.source is None:
        return None
    plan.cache.refresh()
    return {**plan.source, "stream_end": plan.cache.meta["stream_end"]}


def checkpoint(cfg: TrainConfig, plan: Plan, state: TrainState, loader: Loader, rank: int, world: int) -> None:
    """Every run's checkpoint and its run dir as it stands (with eq. 7's θ between checkpoints); rank 0.
    A stream's checkpoint in memory also records where its harvest must start again (one on disk resumes
    from its cache)."""
    position = loader.position
    if loader.window is not None and not loader.window.keep and position["epoch"] == 0:
        position = {**position, "stream": loader.stream_point()}
    positions = [None] * world
    if world > 1:
        dist.all_gather_object(positions, position)
    else:
        positions = [position]
    if rank != 0:
        return
    stream = stream_record(plan)
    for i, run_dir in enumerate(plan.run_dirs):
        sae, theta = state.saes[i], state.thetas[i]
        if theta is not None:
            sae.theta.fill_(theta.value(state.step))
        rundir.save_checkpoint(run_dir, state.step, state.checkpoint(i, positions))
        record = {**training_record(cfg, plan, state.step, i, stream), "theta_source": "eq7" if theta else None}
        rundir.save_run(run_dir, sae, rundir.run_cfg(sae, rundir.cache_record(plan.cache, plan.sae_layers[i]), record))


def save_complete_run(
    cfg: TrainConfig, plan: Plan, state: TrainState, i: int, held: HeldOut | None, run_dir: Path, stream: dict | None
) -> dict:
    """SAE i as it is now, saved as a complete run dir: θ chosen, the held-out figures; returns what the
    run's last metrics line records. Rank 0. `stream`: the sweep's stream_record."""
    sae, theta, record = state.saes[i], state.thetas[i], {}
    device = sae.W_enc.device
    if theta is not None:
        record["theta_eq7"] = theta.value(state.step)
        record["theta_source"] = "eq7" if held is None else cfg.theta
        sae.theta.fill_(record["theta_eq7"])
        if record["theta_source"] == "calibrated":
            rows = batches(held.rows_RD, cfg.batch_size, device)
            record["theta_calibration"] = calibrate_theta(sae, rows, sae.spec.k)
            sae.theta.fill_(record["theta_calibration"]["theta"])
    if held is not None:
        record["heldout"] = {
            **evaluate_heldout(sae, held, cfg.batch_size, device),
            "dead_frac": float(sae.dead_fraction()),
        }
    training = {**training_record(cfg, plan, state.step, i, stream), **record}
    rundir.save_run(run_dir, sae, rundir.run_cfg(sae, rundir.cache_record(plan.cache, plan.sae_layers[i]), training))
    return record


def _wandb(cfg: TrainConfig, names: list[str]):
    if cfg.wandb is None:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project=cfg.wandb, config={**to_jsonable(cfg), "runs": names})
