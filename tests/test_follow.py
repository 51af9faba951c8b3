"""Training while a harvest writes the cache (--follow): on the embedded SmolLM2, a harvest in another
process is killed mid-way and resumed while a follower trains; the follower ends with the same SAE as
a --follow run on the finished cache (the first pass in harvest order: the same run whenever the
harvest ends)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae.cache.store import is_cache, open_cache
from sae.errors import UserError
from sae.train.config import TrainConfig
from sae.train.rundir import WEIGHTS
from sae.train.trainer import run_training
from tests.synthetic import planted_acts, write_cache

pytestmark = pytest.mark.slow
HARVEST = ["harvest", "--layer", "3", "--ctx-len", "64", "--chunk-contexts", "8", "--tokens", str(64 * 8 * 16)]


def harvest_process(cache_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "sae", *HARVEST, "--cache-dir", str(cache_dir), "--device", "cpu"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def committed_chunks(cache_dir: Path) -> int:
    caches = [p for p in cache_dir.glob("*") if is_cache(p)] if cache_dir.exists() else []
    return open_cache(caches[0]).n_chunks if caches else 0


def config(out: Path) -> TrainConfig:
    return TrainConfig(
        arch=("batchtopk", "topk"), k=(8,), dict_size=(256,), batch_size=256, buffer_chunks=3, loader_threads=2,
        log_every=4, checkpoint_every=8, follow=True, follow_timeout=120, device="cpu", out=out,
    )  # fmt: skip


def test_a_follower_trains_through_a_killed_and_resumed_harvest(tmp_path):
    cache_dir = tmp_path / "caches"
    first = harvest_process(cache_dir)
    follower_result: dict = {}

    def follow() -> None:
        try:
            follower_result["runs"] = run_training(config(tmp_path / "followed"), next(_cache_path(cache_dir)))
        except BaseException as e:  # surfaced below
            follower_result["error"] = e

    deadline = time.monotonic() + 180
    while committed_chunks(cache_dir) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    while committed_chunks(cache_dir) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    stopped_at = committed_chunks(cache_dir)
    assert 6 <= stopped_at < 16, stopped_at  # killed mid-way
    time.sleep(3)
    assert thread.is_alive() and "runs" not in follower_result  # waiting for the rest of the harvest
    second = harvest_process(cache_dir)  # the same command: resumes after the committed chunks
    assert second.wait(timeout=300) == 0
    thread.join(timeout=300)
    assert "error" not in follower_result, follower_result.get("error")
    finished = run_training(config(tmp_path / "after"), next(_cache_path(cache_dir)))
    for a, b in zip(follower_result["runs"], finished, strict=True):
        wa, wb = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
        assert all(torch.equal(wa[n], wb[n]) for n in wa), a.name


def _cache_path(cache_dir: Path):
    while True:
        caches = list(cache_dir.glob("*"))
        if caches:
            yield str(caches[0])
            return
        time.sleep(0.05)


def test_follow_of_a_path_that_never_becomes_a_cache_times_out(tmp_path):
    cfg = TrainConfig(arch=("topk",), k=(4,), dict_size=(64,), follow=True, follow_timeout=1.5, out=tmp_path)
    with pytest.raises(UserError, match=r"did not become an activation cache within 1.5 s; start its `sae harvest`"):
        run_training(cfg, tmp_path / "nothing-here")


def test_follow_of_a_finished_cache_is_the_same_run_as_following_it(tmp_path, capsys):
    """On a complete cache --follow waits for nothing, says so, and keeps its order of chunks."""
    cache = write_cache(tmp_path / "caches", planted_acts(10 * 256, 32, 64, 4), ctx_len=16, chunk_contexts=16)
    cfg = TrainConfig(arch=("topk",), k=(4,), dict_size=(64,), batch_size=128, follow=True, out=tmp_path / "runs")
    (run,) = run_training(cfg, cache)
    assert "is complete: nothing to wait for" in capsys.readouterr().err
    import json

    record = json.loads((run / "cfg.json").read_text())
    assert record["heldout"]["chunks"] == [0]  # following, the first chunk is held out: a harvest writes it first
