"""The trainer on small synthetic caches: resume, one read per batch, and its one-line errors."""

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae.cache.store import open_cache
from sae.errors import UserError
from sae.train.config import TrainConfig
from sae.train.rundir import METRICS, WEIGHTS, checkpoint_steps
from sae.train.trainer import run_training
from tests.synthetic import planted_acts, write_cache

D, CTX, CHUNK_CTX, CHUNKS = 32, 16, 16, 12  # 256 rows a chunk; the last chunk is held out
TRAIN_ROWS = (CHUNKS - 1) * CHUNK_CTX * CTX


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    acts_RD = planted_acts(CHUNKS * CHUNK_CTX * CTX, D, 64, 4, seed=0) * 2
    return write_cache(tmp_path_factory.mktemp("caches"), acts_RD, CTX, CHUNK_CTX, bos_every=37)


def small_config(out: Path, **fields) -> TrainConfig:
    base = dict(
        arch=("batchtopk", "jumprelu"), k=(4,), dict_size=(128,), batch_size=128, lr=3e-3,
        log_every=5, checkpoint_every=5, buffer_chunks=4, loader_threads=2, dead_tokens=512, out=out,
    )  # fmt: skip
    return TrainConfig(**{**base, **fields})


def killed_at(kill_step: int):
    """An on_batch hook that stops the training as a Ctrl-C would, before step kill_step."""

    def on_batch(state, batch: dict) -> dict:
        if state.step >= kill_step:
            raise KeyboardInterrupt
        return batch

    return on_batch


def directory_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_kill_and_resume_ends_bit_identical(cache, tmp_path):
    whole = run_training(small_config(tmp_path / "whole"), cache)
    cfg = small_config(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, cache, on_batch=killed_at(13))
    assert checkpoint_steps(cfg.out / "batchtopk_k4_m128") == [5, 10]
    resumed = run_training(cfg, cache, resume=True)
    for a, b in zip(whole, resumed, strict=True):
        wa, wb = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
        lines_a, lines_b = [(p / METRICS).read_text().splitlines() for p in (a, b)]
        assert [json.loads(x)["step"] for x in lines_a] == [json.loads(x)["step"] for x in lines_b]
        assert json.loads(lines_a[-1])["heldout"] == json.loads(lines_b[-1])["heldout"]
    cfg_json = json.loads((resumed[0] / "cfg.json").read_text())
    assert cfg_json["step"] == TRAIN_ROWS // 128 and cfg_json["theta"] > 0
    assert abs(cfg_json["heldout"]["l0"] - 4) < 2  # θ-inference L0 near k after 22 steps


def test_resuming_a_finished_run_changes_no_byte_of_it(cache, tmp_path):
    run_dirs = run_training(small_config(tmp_path, snapshots=(128 * 8,)), cache)
    before = directory_bytes(tmp_path)
    assert run_training(small_config(tmp_path, snapshots=(128 * 8,)), cache, resume=True) == run_dirs
    assert directory_bytes(tmp_path) == before


def test_a_sweep_reads_each_chunk_once_for_all_its_saes(cache, tmp_path):
    counts = []
    for archs in [("batchtopk",), ("batchtopk", "topk", "relu")]:
        reads, counted = [], open_cache(cache)
        read_stored = counted.read_stored

        def loader_reads(layer: int, chunk: int, reads=reads, read_stored=read_stored):
            if threading.current_thread().name.startswith("sae-chunk"):  # the loader's readers only
                reads.append(chunk)
            return read_stored(layer, chunk)

        counted.read_stored = loader_reads
        run_training(small_config(tmp_path / "-".join(archs), arch=archs, holdout_chunks=1), counted)
        counts.append(len(reads))
    # 22 steps of 128 rows use 11 chunks once, plus what the loader had already prefetched
    assert counts[0] == counts[1] and CHUNKS - 1 <= counts[0] <= 2 * (CHUNKS - 1)


def test_too_few_rows_says_how_many_there_are(cache, tmp_path):
    with pytest.raises(UserError, match=f"has {TRAIN_ROWS:,} training rows .* fewer than the 1,000,000 tokens"):
        run_training(small_config(tmp_path, tokens=1_000_000), cache)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cache, tmp_path):
    def nan_from_step_8(state, batch: dict) -> dict:
        return {layer: x_BD * float("nan") for layer, x_BD in batch.items()} if state.step >= 7 else batch

    cfg = small_config(tmp_path, arch=("topk",), checkpoint_every=5)
    with pytest.raises(UserError, match="loss became NaN/inf in topk_k4_m128 before step 10; .*checkpoint is kept"):
        run_training(cfg, cache, on_batch=nan_from_step_8)
    run_dir = tmp_path / "topk_k4_m128"
    assert checkpoint_steps(run_dir) == [5]
    assert torch.isfinite(load_file(run_dir / WEIGHTS)["W_enc"]).all()


def test_resume_on_a_cache_of_another_width_is_refused(cache, tmp_path):
    cfg = small_config(tmp_path / "runs", arch=("topk",), tokens=128 * 5)
    run_training(cfg, cache)
    narrow = write_cache(tmp_path / "narrow", planted_acts(4 * CHUNK_CTX * CTX, 16, 32, 4), CTX, CHUNK_CTX)
    with pytest.raises(UserError, match="has d_model=16 but the run .* was trained with d_in=32"):
        run_training(cfg, narrow, resume=True)


def test_unwritable_or_occupied_run_directories_are_refused(cache, tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="cannot write run directory .*a-file/runs/topk_k4_m128"):
        run_training(small_config(tmp_path / "a-file" / "runs", arch=("topk",)), cache)
    cfg = small_config(tmp_path / "runs", arch=("topk",), tokens=128 * 5)
    run_training(cfg, cache)
    with pytest.raises(UserError, match="already holds a run; continue it with --resume"):
        run_training(dataclasses.replace(cfg), cache)


def test_holdout_takes_full_chunks_and_the_partial_last_one(tmp_path):
    from sae.train.holdout import holdout_chunks

    cache = open_cache(write_cache(tmp_path, torch.randn(10 * 4, 8), ctx_len=4, chunk_contexts=4))
    assert cache.n_chunks == 3 and cache.contexts_in_chunk(2) == 2
    assert holdout_chunks(cache, 1) == [1, 2]
    assert holdout_chunks(cache, 0) == []
    assert holdout_chunks(cache, 5) == [0, 1, 2]


def test_geometric_median_is_the_median_on_a_line_and_a_minimum_elsewhere():
    from sae.train.inputs import geometric_median

    u_D = torch.nn.functional.normalize(torch.randn(8, generator=torch.Generator().manual_seed(1)), dim=0)
    on_line = torch.tensor([0.0, 1.0, 2.0, 3.0, 1000.0])[:, None] * u_D  # mean at 201.2 u
    assert torch.allclose(geometric_median(on_line), 2 * u_D, atol=1e-4)

    gen = torch.Generator().manual_seed(2)
    points_ND = torch.cat([torch.randn(500, 6, generator=gen), 50 + torch.randn(20, 6, generator=gen)])
    y_D = geometric_median(points_ND)

    def total_distance(y: torch.Tensor) -> float:
        return float((points_ND - y).norm(dim=1).sum())

    nudges = 1e-2 * torch.randn(50, 6, generator=gen)
    assert all(total_distance(y_D) <= total_distance(y_D + nudge) for nudge in nudges)
    assert y_D.norm() < 0.3 * points_ND.mean(0).norm()  # the 4% outliers drag the mean, not the median


def test_median_b_dec_keeps_latents_alive_on_rows_with_a_shared_offset(tmp_path):
    """Residual-stream rows share a large mean direction; from b_dec 0 most latents never reach the
    top k. Started at the rows' geometric median, the same SAE loses none (SmolLM2 layer 15: 62% dead
    after 400 steps from zeros, 0.1% from the median)."""
    gen = torch.Generator().manual_seed(3)
    offset_D = 8 * torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0)
    acts_RD = planted_acts(CHUNKS * CHUNK_CTX * CTX, D, 64, 4, seed=0) + offset_D
    cache = write_cache(tmp_path / "caches", acts_RD, CTX, CHUNK_CTX)
    dead = {}
    for init in ("zeros", "median"):
        cfg = small_config(tmp_path / init, arch=("topk",), normalize="none", b_dec_init=init, epochs=2.0)
        (run_dir,) = run_training(cfg, cache)
        lines = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
        dead[init] = [line["dead_frac"] for line in lines if "dead_frac" in line][-1]
    assert dead["median"] < 0.15 < 0.5 < dead["zeros"], dead  # measured 0.04 and 0.95


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(cache, tmp_path):
    whole = run_training(small_config(tmp_path / "whole"), cache)
    cfg = small_config(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, cache, on_batch=killed_at(13))
    for run_dir in Path(cfg.out).iterdir():
        with open(run_dir / METRICS, "a") as f:
            f.write('{"loss": 0.3, "ms')  # an append the kill interrupted
    resumed = run_training(cfg, cache, resume=True)
    for a, b in zip(whole, resumed, strict=True):
        steps = [[json.loads(x)["step"] for x in (p / METRICS).read_text().splitlines()] for p in (a, b)]
        assert steps[0] == steps[1]


def test_a_sweep_over_layers_trains_each_sae_as_a_run_on_its_layer_alone(tmp_path):
    """One read of each chunk feeds every layer's SAEs: each ends as a single-layer run on its layer would."""
    acts = {
        3: planted_acts(CHUNKS * CHUNK_CTX * CTX, D, 64, 4, seed=0),
        5: planted_acts(CHUNKS * CHUNK_CTX * CTX, D, 64, 4, seed=7),
    }
    cache = write_cache(tmp_path / "caches", acts, CTX, CHUNK_CTX)
    both = run_training(small_config(tmp_path / "both", arch=("topk",), layer=(3, 5)), cache)
    assert [d.name for d in both] == ["topk_k4_m128_L3", "topk_k4_m128_L5"]
    for layer, run_dir in zip((3, 5), both, strict=True):
        (alone,) = run_training(small_config(tmp_path / f"alone{layer}", arch=("topk",), layer=layer), cache)
        wa, wb = load_file(run_dir / WEIGHTS), load_file(alone / WEIGHTS)
        assert all(torch.equal(wa[n], wb[n]) for n in wa)
        assert json.loads((run_dir / "cfg.json").read_text())["cache"]["layer"] == layer
    with pytest.raises(UserError, match="a sweep over several layers gates rows by token or position only"):
        run_training(small_config(tmp_path / "gated", layer=(3, 5), gate_norm=4.0), cache)


FREE_AND_MAKE = """
import resource, sys, torch
from sae.train.trainer import configure_backend
if sys.argv[1] == "on":
    configure_backend(torch.device("cpu"), "tf32")
for elements, times in ((10 << 20, 10), (128 << 20, 3)):  # 40 MB (a [B, m] of B 4,096, m 2,304), 512 MB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        torch.empty(elements).fill_(1.0)  # made, then freed at once
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_cpu_training_reuses_freed_memory_instead_of_faulting_in_fresh_pages():
    """After configure_backend on the CPU a block freed and made again comes from memory the process
    kept; by default glibc unmaps it and the next one page-faults all its 10,240 pages in again. A
    block past 256 MiB is returned either way (its 131,072 pages faulted in each time), so the memory
    kept stays bounded."""
    faults = {}
    for mode in ("off", "on"):
        done = subprocess.run([sys.executable, "-c", FREE_AND_MAKE, mode], capture_output=True, text=True, check=True)
        faults[mode] = [int(line) for line in done.stdout.split()]
    (small_off, large_off), (small_on, large_on) = faults["off"], faults["on"]
    assert small_off > 9 * 10240 and small_on < small_off / 3, faults
    assert large_off > 3 * 131072 * 0.9 and large_on > 3 * 131072 * 0.9, faults


def test_a_compiled_sweep_trains_the_eager_sweeps_saes(cache, tmp_path, capsys):
    """--compile on the CPU (Inductor, which builds C++: .ci/install puts g++ there): the same logged
    losses as the eager run to float32 summation order, BatchTopK's sparse step and JumpReLU's dense one;
    the run says, once, that on the CPU eager was faster."""
    losses, notes = {}, {}
    for compiled in (False, True):
        cfg = small_config(tmp_path / str(compiled), compile=compiled, tokens=10 * 128)
        losses[compiled] = {
            run_dir.name: [json.loads(line)["loss"] for line in (run_dir / METRICS).read_text().splitlines()[:-1]]
            for run_dir in run_training(cfg, cache)
        }
        notes[compiled] = capsys.readouterr().err.count("--compile on the CPU ran at half eager's speed")
    assert notes == {False: 0, True: 1}
    assert losses[True].keys() == losses[False].keys() and all(len(v) == 2 for v in losses[False].values())
    for name, eager in losses[False].items():
        assert losses[True][name] == pytest.approx(eager, rel=1e-4), name
