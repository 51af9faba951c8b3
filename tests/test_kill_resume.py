"""A harvest killed with SIGKILL mid-way, then rerun, leaves arrays identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from sae.cache.lock import LOCK_NAME
from sae.cache.store import open_cache
from sae.harvest.harvest import harvest
from tests.test_harvest import arrays, small_config

N_CONTEXTS = 120
SCRIPT = """
import sys
from pathlib import Path
from sae.harvest.harvest import harvest
from tests.test_harvest import small_config
harvest(small_config(sys.argv[1], sys.argv[2], Path(sys.argv[3]), tokens=32 * {n}, chunk_contexts=2, batch_contexts=2))
"""


def committed_contexts(root) -> int:
    for meta_file in root.glob("*/zarr.json"):
        return json.loads(meta_file.read_text())["attributes"].get("sae_cache", {}).get("n_contexts", 0)
    return 0


def test_sigkill_then_resume_equals_uninterrupted(tiny_llama, sample_parquet, tmp_path):
    killed_root = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-c", SCRIPT.format(n=N_CONTEXTS), str(tiny_llama), str(sample_parquet), str(killed_root)],
        cwd=os.path.dirname(os.path.dirname(__file__)), stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while committed_contexts(killed_root) < 10 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = committed_contexts(killed_root)
    assert child.returncode == -signal.SIGKILL and 10 <= killed_at < N_CONTEXTS, "the kill must land mid-way"

    (path,) = killed_root.iterdir()
    assert (path / LOCK_NAME).exists()  # the killed writer's lock, stale: the rerun takes it over
    cfg = dict(tokens=32 * N_CONTEXTS, chunk_contexts=2, batch_contexts=2)
    resumed = harvest(small_config(tiny_llama, sample_parquet, killed_root, **cfg))
    whole = harvest(small_config(tiny_llama, sample_parquet, tmp_path / "whole", **cfg))
    a, b = arrays(resumed), arrays(whole)
    assert len(b["tokens"]) == N_CONTEXTS
    for name in b:
        np.testing.assert_array_equal(a[name], b[name])
    assert open_cache(resumed).meta["stats"] == open_cache(whole).meta["stats"]
