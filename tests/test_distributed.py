"""Data-parallel training under torchrun on CPU (gloo): both ranks end with the same averaged model."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from sae.train.config import TrainConfig
from sae.train.trainer import run_training

stepped = {}
def remember_state(state, batch):
    stepped["state"] = state
    return batch

cfg = TrainConfig(arch=("batchtopk",), k=(4,), dict_size=(64,), batch_size=64, device="cpu", log_every=4,
                  checkpoint_every=8, holdout_chunks=1, out=Path(sys.argv[2]))
run_training(cfg, Path(sys.argv[1]), on_batch=remember_state)
weights = torch.cat([p.detach().flatten() for p in stepped["state"].saes[0].parameters()])
gathered = [torch.zeros_like(weights) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, weights)
if dist.get_rank() == 0:
    Path(sys.argv[2], "ranks_equal").write_text(str(all(torch.equal(g, gathered[0]) for g in gathered)))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_two_ranks_on_gloo(tmp_path):
    from tests.synthetic import planted_acts, write_cache

    cache = write_cache(tmp_path / "caches", planted_acts(8 * 256, 16, 48, 4.0), ctx_len=32, chunk_contexts=8)
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    runs = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(script), str(cache), str(runs)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (runs / "ranks_equal").read_text() == "True"
    cfg = json.loads((runs / "batchtopk_k4_m64" / "cfg.json").read_text())
    assert cfg["tokens"] == cfg["step"] * 64 * 2 == 7 * 256  # two ranks' shares cover the training chunks once
    assert cfg["theta"] > 0  # calibrated once on the held-out chunk, the same on both ranks


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_harvest(model, data, cache_dir, contexts: int, *flags: str) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 -m sae harvest ...` on gloo, as a user types it."""
    args = [
        "--model", str(model), "--dataset", str(data), "--layer", "1", "--ctx-len", "32", "--tokens", str(32 * contexts),
        "--batch-contexts", "2", "--chunk-contexts", "4", "--device", "cpu", "--cache-dir", str(cache_dir), *flags,
    ]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "sae", "harvest", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def same_cache(a: str, b: str) -> None:
    """Equal tokens, stored rows (scales included), statistics and metadata but for times and the cache_dir asked."""
    import numpy as np

    from sae.cache.store import open_cache

    ca, cb = open_cache(a), open_cache(b)
    for name in ("tokens", "acts/1", "chunk_stats/1", *(["scales/1"] if "scales" in cb.group else [])):
        np.testing.assert_array_equal(ca.group[name][:], cb.group[name][:])
    meta_a, meta_b = dict(ca.meta), dict(cb.meta)
    for meta in (meta_a, meta_b):
        for volatile in ("created", "updated", "harvest_config"):
            meta.pop(volatile)
    assert meta_a == meta_b


@pytest.mark.slow
def test_torchrun_harvest_writes_the_bytes_of_one_process(tiny_llama, sample_parquet, tmp_path):
    from sae.harvest.harvest import harvest
    from tests.test_harvest import small_config

    done = torchrun_harvest(tiny_llama, sample_parquet, tmp_path / "two", 48, "--dtype", "int8")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-3000:]
    (two,) = out.split()[:1]  # each rank prints the cache's path; rank 0 first or not, they agree
    assert set(out.split()) == {two}
    one = harvest(small_config(tiny_llama, sample_parquet, tmp_path / "one", tokens=32 * 48, batch_contexts=2,
                               chunk_contexts=4, dtype="int8"))  # fmt: skip
    same_cache(two, one)


@pytest.mark.slow
def test_torchrun_harvest_killed_resumes_to_the_same_bytes(tiny_llama, sample_parquet, tmp_path):
    import signal
    import time

    from sae.harvest.harvest import harvest
    from tests.test_harvest import small_config
    from tests.test_kill_resume import committed_contexts

    run = torchrun_harvest(tiny_llama, sample_parquet, tmp_path / "two", 1000)
    deadline = time.monotonic() + 240
    while committed_contexts(tmp_path / "two") < 40 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = subprocess.run(["pgrep", "-f", "-P", str(run.pid), "sae harvest"], capture_output=True, text=True)
    os.kill(int(workers.stdout.split()[-1]), signal.SIGKILL)  # one rank dies; torchrun stops the other
    run.communicate(timeout=120)
    assert run.returncode != 0 and 40 <= committed_contexts(tmp_path / "two") < 1000, "the kill must land mid-way"
    again = torchrun_harvest(tiny_llama, sample_parquet, tmp_path / "two", 1000)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    one = harvest(small_config(tiny_llama, sample_parquet, tmp_path / "one", tokens=32 * 1000, batch_contexts=2,
                               chunk_contexts=4))  # fmt: skip
    same_cache(out.split()[0], one)
