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
import sae.train.trainer as trainer
from sae.train.config import TrainConfig

stepped = {}
real_train_step = trainer.train_step
def remember_sae(sae, *args, **kwargs):
    stepped["sae"] = sae
    return real_train_step(sae, *args, **kwargs)
trainer.train_step = remember_sae

cfg = TrainConfig(arch=("batchtopk",), k=(4,), dict_size=(64,), batch_size=64, device="cpu", log_every=4,
                  checkpoint_every=8, holdout_chunks=0, out=Path(sys.argv[2]))
trainer.run_training(cfg, Path(sys.argv[1]))
weights = torch.cat([p.detach().flatten() for p in stepped["sae"].parameters()])
gathered = [torch.zeros_like(weights) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, weights)
if dist.get_rank() == 0:
    Path(sys.argv[2], "ranks_equal").write_text(str(all(torch.equal(g, gathered[0]) for g in gathered)))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_two_ranks_on_gloo(tmp_path):
    from sae.train.synthetic import planted_acts, write_cache

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
    assert cfg["tokens"] == cfg["step"] * 64 * 2 == 8 * 256  # two ranks' shares cover the cache once
