"""Crash suite: "nothing already written is lost", proved the way storage systems prove it.

Harvests and training sweeps are killed with SIGKILL at seeded random instants and then resumed the
way a user would (rerun the harvest; `sae train --resume`, or the same command again if nothing was
saved yet): every resumed result is byte for byte the uninterrupted one. Also a damaged newest
checkpoint, a full disk (a file-size limit: writes fail with EFBIG), two harvests of one spec at
once, and readers during a harvest. A failing trial prints its seed and instant to replay it.

Children are forked from this process, which has the model loaded: a trial costs the work, not a
Python start-up.
"""

import json
import multiprocessing
import os
import random
import resource
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from sae.cache.store import is_cache, open_cache
from sae.errors import UserError
from sae.harvest.harvest import harvest
from sae.harvest.model import load_model
from sae.train.config import TrainConfig
from sae.train.rundir import CFG, METRICS, WEIGHTS, checkpoint_steps
from sae.train.trainer import run_training
from tests.synthetic import planted_acts, write_cache
from tests.test_harvest import small_config

SEED = int(os.environ.get("SAE_CRASH_SEED", "20261201"))
HARVEST_TRIALS, TRAIN_TRIALS = 20, 10
FORK = multiprocessing.get_context("fork")


def contents(path: str) -> dict:
    """Every array's bytes and the metadata, but for the times and the cache_dir that was asked for."""
    cache = open_cache(path)
    arrays = {name: node[:] for name, node in cache.group.members(max_depth=None) if isinstance(node, zarr.Array)}
    meta = {k: v for k, v in cache.meta.items() if k not in ("created", "updated", "harvest_config")}
    return {"arrays": arrays, "meta": meta}


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a["meta"] == b["meta"], what
    assert a["arrays"].keys() == b["arrays"].keys(), what
    for name in b["arrays"]:
        np.testing.assert_array_equal(a["arrays"][name], b["arrays"][name], err_msg=f"{what}: {name}")


@pytest.fixture(autouse=True)
def one_thread():
    """A forked child must not enter the parent's OpenMP pool (it hangs); and the uninterrupted runs
    compute with the same single thread as the children, so the floats match to the bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_child(target, *args) -> None:
    torch.set_num_threads(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # the progress lines of many children are noise
    target(*args)


def child_seconds(target, args: tuple) -> float:
    """How long target(*args) takes in a forked child, start-up included: the trials' time scale."""
    start = time.monotonic()
    child = FORK.Process(target=in_child, args=(target, *args), daemon=True)
    child.start()
    child.join()
    assert child.exitcode == 0
    return time.monotonic() - start


def killed_at(target, args: tuple, delay_s: float) -> None:
    """Run target(*args) in a forked child and SIGKILL it after delay_s (if it is still running)."""
    child = FORK.Process(target=in_child, args=(target, *args), daemon=True)
    child.start()
    child.join(delay_s)
    if child.is_alive():
        os.kill(child.pid, signal.SIGKILL)
    child.join()


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load_model(str(tiny_llama), "float32", "cpu")


def test_harvests_killed_at_random_instants_resume_to_the_same_bytes(loaded, sample_parquet, tmp_path, capsys):
    cfg = dict(tokens=32 * 48, chunk_contexts=1, batch_contexts=1, dtype="int8")  # int8: its s_dim too
    reference = contents(
        harvest(small_config(loaded.model.name_or_path, sample_parquet, tmp_path / "ref", **cfg), loaded)
    )
    child_cfg = small_config(loaded.model.name_or_path, sample_parquet, tmp_path / "child", **cfg)
    duration = child_seconds(harvest, (child_cfg, loaded))  # a whole harvest in a child, as the trials run
    assert_same(contents(str(next((tmp_path / "child").iterdir()))), reference, "an uninterrupted child")
    rng = random.Random(SEED)
    instants = []
    for trial in range(HARVEST_TRIALS):
        delay = rng.uniform(0, 1.2 * duration)  # from before the lock is taken to after the last commit
        root = tmp_path / f"trial{trial}"
        trial_cfg = small_config(loaded.model.name_or_path, sample_parquet, root, **cfg)
        killed_at(harvest, (trial_cfg, loaded), delay)
        (cache_dir,) = root.iterdir() if root.exists() and any(root.iterdir()) else (None,)
        committed = open_cache(cache_dir).n_contexts if cache_dir and is_cache(cache_dir) else 0
        instants.append(f"{delay:.3f}s:{committed}")
        resumed = harvest(trial_cfg, loaded)  # takes over the killed writer's stale lock
        assert_same(contents(resumed), reference, f"trial {trial} (seed {SEED}, killed after {delay:.3f} s)")
    with capsys.disabled():
        print(f"\ncrash suite: {HARVEST_TRIALS} harvests killed (seed {SEED}; instant:committed contexts) {instants}")
    assert len({i.split(":")[1] for i in instants}) >= 4  # the kills landed at many different points


def run_files(run_dirs: list[Path]) -> dict[str, object]:
    """Every file of the run directories: its bytes, but metrics.jsonl without the timings, cfg.json
    without the output folder asked for (the trials write to folders of their own), and a checkpoint's
    contents (pickle's bytes depend on which equal strings are one object)."""
    files = {}
    for run_dir in run_dirs:
        for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
            name = str(path.relative_to(run_dir.parent))
            if path.name == METRICS:
                lines = [json.loads(line) for line in path.read_text().splitlines()]
                files[name] = [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in lines]
            elif path.name == CFG:
                cfg = json.loads(path.read_text())
                files[name] = {**cfg, "train_config": {**cfg["train_config"], "out": None}}
            elif path.suffix == ".pt":
                files[name] = canonical(torch.load(path, weights_only=True))
            else:
                files[name] = path.read_bytes()
    return files


def canonical(value):
    """A checkpoint's contents as comparable values: each tensor as its dtype, shape and bytes."""
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), value.numpy().tobytes())
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def assert_same_files(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: files {sorted(a.keys() ^ b.keys())} differ"
    for name in b:
        assert a[name] == b[name], f"{what}: {name} differs"


def test_sweeps_killed_at_random_instants_resume_to_the_same_run_directories(tmp_path, capsys):
    cache = write_cache(tmp_path / "caches", planted_acts(12 * 256, 32, 64, 4) * 2, ctx_len=16, chunk_contexts=16)

    def config(out: Path) -> TrainConfig:
        return TrainConfig(
            arch=("batchtopk", "topk", "jumprelu"), k=(4,), dict_size=(96,), batch_size=64, lr=3e-3,
            log_every=4, checkpoint_every=3, buffer_chunks=3, loader_threads=2, epochs=1.5, snapshots=(64 * 10,),
            out=out,
        )  # fmt: skip

    reference = run_files(run_training(config(tmp_path / "ref"), cache))
    duration = child_seconds(run_training, (config(tmp_path / "child"), cache))
    rng = random.Random(SEED + 1)
    instants = []
    for trial in range(TRAIN_TRIALS):
        delay = rng.uniform(0, 1.1 * duration)
        out = tmp_path / f"trial{trial}"
        killed_at(run_training, (config(out), cache), delay)
        saved = sorted(p.parent.name for p in out.glob("*/cfg.json"))
        instants.append(f"{delay:.2f}s:{len(saved)} saved")
        # as a user would: --resume once a run has saved its config, else the same command again
        resumed = run_training(config(out), cache, resume=bool(saved))
        assert_same_files(run_files(resumed), reference, f"trial {trial} (seed {SEED + 1}, killed after {delay:.2f} s)")
    with capsys.disabled():
        print(f"crash suite: {TRAIN_TRIALS} sweeps killed (seed {SEED + 1}) {instants}")


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    cache = write_cache(tmp_path / "caches", planted_acts(8 * 256, 32, 64, 4), ctx_len=16, chunk_contexts=16)
    cfg = TrainConfig(arch=("topk",), k=(4,), dict_size=(64,), batch_size=64, checkpoint_every=5, out=tmp_path / "runs")
    (run_dir,) = run_training(cfg, cache)
    before = load_file(run_dir / WEIGHTS)
    newest = checkpoint_steps(run_dir)[-1]
    path = run_dir / f"checkpoint-{newest:09d}.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a torn file, as a failing disk leaves
    capsys.readouterr()
    (resumed,) = run_training(cfg, cache, resume=True)
    err = " ".join(capsys.readouterr().err.split())
    assert (
        f"a checkpoint of step {newest} in {run_dir.parent} is unreadable" in err
        and "resuming from an earlier one" in err
    )
    after = load_file(resumed / WEIGHTS)
    assert all(torch.equal(before[n], after[n]) for n in before)  # the steps after it were simply run again


def limited_harvest(cfg, loaded, max_file_bytes: int, errors) -> None:
    """A harvest under a file-size limit: a write past it fails with EFBIG, as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error to handle, not a signal that kills
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    try:
        harvest(cfg, loaded)
    except UserError as e:
        errors.put(str(e))


def test_a_full_disk_stops_with_one_line_and_the_rerun_resumes_to_the_same_bytes(loaded, sample_parquet, tmp_path):
    model = loaded.model.name_or_path
    cfg = dict(chunk_contexts=16, batch_contexts=8)
    whole = contents(harvest(small_config(model, sample_parquet, tmp_path / "whole", tokens=32 * 64, **cfg), loaded))
    path = harvest(small_config(model, sample_parquet, tmp_path / "full", tokens=32 * 32, **cfg), loaded)
    chunk_bytes = (Path(path) / "acts/1/c/0/0").stat().st_size
    errors = FORK.Queue()
    child = FORK.Process(target=in_child, args=(limited_harvest,
        small_config(model, sample_parquet, tmp_path / "full", tokens=32 * 64, **cfg), loaded, chunk_bytes // 2, errors))  # fmt: skip
    child.start()
    child.join()
    message = errors.get(timeout=10)
    assert "\n" not in message and f"of {path}: File too large; the cache keeps its 1,024 committed rows" in message
    assert open_cache(path).n_contexts == 32 and not (Path(path) / "writer.lock").exists()
    resumed = harvest(small_config(model, sample_parquet, tmp_path / "full", tokens=32 * 64, **cfg), loaded)
    assert_same(contents(resumed), whole, "after the disk was freed")


def test_two_harvests_at_once_one_writes_and_readers_see_only_committed_rows(loaded, sample_parquet, tmp_path):
    model = loaded.model.name_or_path
    cfg = small_config(model, sample_parquet, tmp_path / "both", tokens=32 * 96, chunk_contexts=2, batch_contexts=2)
    errors = FORK.Queue()

    def one(cfg, loaded, errors) -> None:
        try:
            harvest(cfg, loaded)
            errors.put("ok")
        except UserError as e:
            errors.put(str(e))

    children = [FORK.Process(target=in_child, args=(one, cfg, loaded, errors)) for _ in range(2)]
    for child in children:
        child.start()
    seen, deadline = [], time.monotonic() + 120  # a reader during the harvest
    while any(c.is_alive() for c in children) and time.monotonic() < deadline:
        caches = list((tmp_path / "both").glob("*/zarr.json"))
        if caches:
            try:
                cache = open_cache(caches[0].parent)
            except UserError:
                continue  # the metadata is not written yet: not a cache so far
            rows = [cache.read_acts(1, c) for c in range(cache.n_chunks)]  # never a missing or half chunk
            seen.append((cache.n_contexts, torch.cat(rows) if rows else None))
    for child in children:
        child.join()
    outcomes = sorted(errors.get(timeout=10) for _ in children)
    assert outcomes[0].startswith("cache ") and "is locked by a live writer" in outcomes[0] and outcomes[1] == "ok"
    final = torch.cat([open_cache(caches[0].parent).read_acts(1, c) for c in range(48)])
    counts = [n for n, _ in seen]
    assert counts == sorted(counts) and len(set(counts)) > 2  # committed rows only grow, seen mid-way
    for n, rows in seen:
        if rows is not None:
            assert torch.equal(rows, final[: n * 32])  # what a reader saw is what stays
    with open(caches[0].parent / "zarr.json") as f:
        assert json.load(f)["attributes"]["sae_cache"]["n_contexts"] == 96
