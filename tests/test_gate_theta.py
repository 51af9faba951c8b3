"""The gate (massive rows out of training, passed through after), BatchTopK's calibrated θ, epochs and
snapshots, on a synthetic cache whose massive rows are planted."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae.cache.store import open_cache
from sae.errors import UserError
from sae.train.config import SAESpec, TrainConfig
from sae.train.gate import Gate, build_gate, chunk_rows
from sae.train.loader import Loader
from sae.train.rundir import WEIGHTS, load_sae
from sae.train.sae import SparseAutoencoder
from sae.train.theta import calibrate_theta
from sae.train.trainer import run_training
from tests.synthetic import planted_acts, write_cache
from tests.test_cli import run_sae

D, CTX, CHUNK_CTX, CHUNKS = 32, 16, 16, 10  # 256 rows a chunk; the last chunk is held out
MASSIVE = 30.0  # planted rows' norm, in multiples of an ordinary row's


@pytest.fixture(scope="module")
def massive(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A cache whose first positions and every 23rd row are MASSIVE× the rest; and those rows' mask."""
    acts_RD = planted_acts(CHUNKS * CHUNK_CTX * CTX, D, 64, 4, seed=0) * 2
    massive_R = torch.zeros(len(acts_RD), dtype=torch.bool)
    massive_R[::CTX] = True
    massive_R[::23] = True
    acts_RD[massive_R] *= MASSIVE
    return write_cache(tmp_path_factory.mktemp("caches"), acts_RD, CTX, CHUNK_CTX, bos_every=37), massive_R


def small_config(out: Path, **fields) -> TrainConfig:
    base = dict(
        arch=("batchtopk", "topk"), k=(4,), dict_size=(96,), batch_size=128, lr=3e-3, log_every=5,
        checkpoint_every=5, buffer_chunks=3, loader_threads=2, dead_tokens=512, out=out,
    )  # fmt: skip
    return TrainConfig(**{**base, **fields})


def test_the_norm_gate_keeps_planted_massive_rows_out_of_every_batch(massive):
    path, massive_R = massive
    cache = open_cache(path)
    gate = build_gate(cache, 0, bos=False, first=False, norm_ratio=4)
    sample_RD = torch.cat([cache.read_acts(0, c) for c in (0, 3, 6, 9)])  # 4 chunks spread over the cache
    assert gate.median_norm == float(sample_RD.norm(dim=1).median()) and gate.max_norm == 4 * gate.median_norm
    chunks = list(range(CHUNKS - 1))
    loader = Loader(cache, [0], chunks, 64, seed=0, gate=gate, buffer_chunks=3, threads=2)
    ordinary_CR = ~massive_R.view(CHUNKS, -1)
    try:
        blocks = [loader.block_chunks(0, b) for b in range(loader.n_blocks())]
        batches_per_epoch = sum(int(ordinary_CR[block].sum()) // 64 for block in blocks)
        served = torch.cat([next(loader)[0] for _ in range(batches_per_epoch)])
    finally:
        loader.close()
    assert served.norm(dim=1).max() < gate.max_norm  # no massive row was served ...
    all_RD = torch.cat([cache.read_acts(0, c).float() for c in chunks])
    ordinary_RD = all_RD[~massive_R[: len(all_RD)]]
    # ... and every ordinary row at most once in an epoch: each served row is one of them, none twice
    matches = (served[:, None, :] == ordinary_RD[None]).all(-1)
    assert (matches.sum(1) == 1).all() and (matches.sum(0) <= 1).all()


def test_a_gated_sae_never_trains_on_them_and_passes_them_through(massive, tmp_path):
    path, massive_R = massive
    (btk, topk) = run_training(small_config(tmp_path, gate_norm=4.0, tokens=128 * 15), path)
    cfg = json.loads((btk / "cfg.json").read_text())
    cache = open_cache(path)
    held_R = massive_R[(CHUNKS - 1) * cache.chunk_rows :]
    assert cfg["heldout"]["rows_gated"] == int(held_R.sum()) and cfg["heldout"]["rows"] == int((~held_R).sum())
    assert cfg["metadata"]["gate"]["norm_ratio"] == 4 and cfg["metadata"]["gate"]["max_norm"] > 0
    assert 0.06 < cfg["input"]["gated_fraction_sample"] < 0.12  # 1/16 first positions + 1/23, overlapping
    for run in (btk, topk):
        sae = load_sae(run)
        x_RD = cache.read_acts(0, CHUNKS - 1).float()
        recon_RD, latents_RM = sae.reconstruct(x_RD, sae.encoded_rows(x_RD))
        assert torch.equal(recon_RD[held_R], x_RD[held_R]) and not latents_RM[held_R].any()
        assert not torch.allclose(recon_RD[~held_R], x_RD[~held_R])
        every_RD, every_latents_RM = sae.reconstruct(x_RD)  # every row, as SAELens computes
        assert torch.equal(every_RD[~held_R], recon_RD[~held_R]) and every_latents_RM[held_R].any()


def test_token_and_position_gates_need_their_inputs():
    gate = Gate(bos_token_id=0, first=True)
    x_RD = torch.ones(4, 3)
    gated = gate.gated(x_RD, torch.tensor([0, 5, 5, 0]), torch.tensor([0, 1, 0, 3]))
    assert gated.tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="gates BOS rows: pass the rows' token ids"):
        gate.gated(x_RD)
    both = Gate(norm_ratio=4, median_norm=1.0).union(Gate(norm_ratio=2, median_norm=1.5))
    assert both.max_norm == 3 and Gate.from_record(both.record()) == both


def test_calibrated_theta_selects_exactly_n_entries_and_equals_batchtopk_over_the_whole_set():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec("batchtopk", 6, 80, 0.0, 0.0), D).eval()
    x_ND = torch.randn(300, D)
    result = calibrate_theta(sae, x_ND.split(64), 6.0)
    pre_NM = sae.pre_acts(x_ND).detach()
    assert int((pre_NM > result["theta"]).sum()) == 1800 and result["l0"] == 6.0 and result["rows"] == 300
    top = pre_NM.flatten().topk(1801).values  # the set BatchTopK keeps over all 300 rows at k = 6
    assert top[1799] > result["theta"] > top[1800]
    # a batch-size-independent answer: the same θ from other batchings
    assert calibrate_theta(sae, x_ND.split(7), 6.0)["theta"] == result["theta"]


def test_calibrated_l0_counts_what_exceeds_theta_when_the_boundary_ties():
    """Every row's pre-activations are b_enc (W_enc 0): 3 once, 2 three times. L0 2 falls inside the
    tie at 2, so θ = 2 and only the 3s exceed it: L0 1, as a direct count says."""
    sae = SparseAutoencoder(SAESpec("batchtopk", 2, 8, 0.0, 0.0), D).eval()
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([3.0, 2, 2, 2, 1, 0, 0, 0]))
    x_ND = torch.randn(50, D)
    result = calibrate_theta(sae, x_ND.split(16), 2.0)
    assert result["theta"] == 2.0
    assert result["l0"] == float((sae.pre_acts(x_ND) > result["theta"]).sum()) / 50 == 1.0


def test_training_calibrates_to_k_and_sae_calibrate_to_any_target(massive, tmp_path, monkeypatch, capsys):
    path, massive_R = massive
    btk, _ = run_training(small_config(tmp_path, gate_norm=4.0, tokens=128 * 15), path)
    cfg = json.loads((btk / "cfg.json").read_text())
    assert cfg["theta_source"] == "calibrated" and cfg["theta"] == cfg["theta_calibration"]["theta"]
    assert cfg["theta_eq7"] > 0 and cfg["theta_eq7"] != cfg["theta"]
    assert cfg["heldout"]["l0"] == pytest.approx(4, rel=0.01)
    code, out, err = run_sae(monkeypatch, capsys, "calibrate", str(btk), "--l0", "9.5")
    assert code == 0, err
    cfg = json.loads((btk / "cfg.json").read_text())
    assert cfg["theta_calibration"]["target_l0"] == 9.5 and f"θ = {cfg['theta']:.6g}" in out
    # independently: the saved SAE on the ungated held-out rows, raw
    cache = open_cache(path)
    x_RD = cache.read_acts(0, CHUNKS - 1).float()
    ordinary_RD = x_RD[~massive_R[(CHUNKS - 1) * cache.chunk_rows :]]
    sae = load_sae(btk)
    _, latents_RM = sae.reconstruct(ordinary_RD, sae.encoded_rows(ordinary_RD))
    assert float((latents_RM > 0).sum(1).float().mean()) == pytest.approx(9.5, rel=0.01)
    assert float(load_file(btk / WEIGHTS)["threshold"][0]) == cfg["theta"]


@pytest.fixture(scope="module")
def short_runs(massive, tmp_path_factory) -> list[Path]:
    return run_training(small_config(tmp_path_factory.mktemp("runs"), tokens=128 * 5), massive[0])


@pytest.mark.parametrize(
    "args, message",
    [
        (["calibrate", "{topk}"], "is a topk SAE; only BatchTopK has a θ to calibrate"),
        (["calibrate", "{btk}", "--l0", "500"], "target L0 must be in (0, 96), got 500"),
        (["train", "--cache", "{cache}", "--gate-norm", "0.5"], "gate_norm must be above 1"),
        (["train", "--cache", "{cache}", "--gate-norm", "-4"], "or 0 for none; got -4.0"),
        (["train", "--cache", "{cache}", "--theta", "mean"], "unknown theta 'mean'; choose one of calibrated, eq7"),
        (
            ["train", "--cache", "{cache}", "--b-dec-init", "mean"],
            "unknown b_dec_init 'mean'; choose one of zeros, median",
        ),
        (["train", "--cache", "{cache}", "--epochs", "0"], "epochs must be positive, got 0.0"),
        (["train", "--cache", "{cache}", "--snapshots", "1e3,x"], "expected a count like 1e6, got 'x'"),
        (["train", "--cache", "{cache}", "--tokens", "1e6"], "fewer than the 1,000,000 tokens asked; harvest more"),
        (
            ["train", "--cache", "{cache}", "--holdout-chunks", "0", "--arch", "batchtopk"],
            "calibrating BatchTopK's θ needs held-out rows",
        ),
        (["eval", "{btk}", "--gate-norm", "1"], "gate_norm must be above 1"),
    ],
)
def test_bad_values_of_the_new_flags_are_one_line_errors(massive, short_runs, tmp_path, monkeypatch, capsys, args,
                                                          message):  # fmt: skip
    names = {"cache": massive[0], "btk": short_runs[0], "topk": short_runs[1]}
    monkeypatch.chdir(tmp_path)  # no pipeline.toml
    code, out, err = run_sae(monkeypatch, capsys, *[a.format(**names) for a in args])
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and message in err, err


def test_the_default_standardises_every_row_and_gate_norm_4_gates_the_massive_ones(massive, short_runs, tmp_path):
    path, massive_R = massive
    held_R = massive_R[(CHUNKS - 1) * open_cache(path).chunk_rows :]
    default = json.loads((short_runs[0] / "cfg.json").read_text())  # trained without normalize or gate_norm given
    assert default["normalize_activations"] == "layer_norm" and default["metadata"]["gate"]["max_norm"] is None
    assert default["heldout"]["rows_gated"] == 0 and default["heldout"]["rows"] == len(held_R)
    (btk,) = run_training(small_config(tmp_path, arch=("batchtopk",), gate_norm=4.0, tokens=128 * 5), path)
    gated = json.loads((btk / "cfg.json").read_text())
    assert gated["metadata"]["gate"]["norm_ratio"] == 4 and gated["heldout"]["rows_gated"] == int(held_R.sum())


def test_epochs_run_past_one_pass_and_resume_mid_epoch_bit_identically(massive, tmp_path):
    path, _ = massive
    cfg = dict(gate_norm=4.0, epochs=2.5)
    whole = run_training(small_config(tmp_path / "whole", **cfg), path)
    record = json.loads((whole[0] / "cfg.json").read_text())
    pass_rows = round((CHUNKS - 1) * CHUNK_CTX * CTX * (1 - record["input"]["gated_fraction_sample"]))
    assert record["step"] == int(2.5 * pass_rows) // 128 and record["epochs"] == pytest.approx(2.5, abs=0.07)

    def killed_in_the_second_epoch(state, batch: dict) -> dict:
        if state.step >= pass_rows // 128 + 7:
            raise KeyboardInterrupt
        return batch

    with pytest.raises(KeyboardInterrupt):
        run_training(small_config(tmp_path / "killed", **cfg), path, on_batch=killed_in_the_second_epoch)
    position = torch.load(sorted((tmp_path / "killed" / "topk_k4_m96").glob("checkpoint-*.pt"))[-1])["loader"][0]
    assert position["epoch"] == 1  # the kill left a checkpoint inside the second epoch
    resumed = run_training(small_config(tmp_path / "killed", **cfg), path, resume=True)
    for a, b in zip(whole, resumed, strict=True):
        wa, wb = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
        assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_a_snapshot_is_the_run_a_shorter_training_would_have_written(massive, tmp_path):
    path, _ = massive
    long = run_training(small_config(tmp_path / "long", tokens=128 * 16, snapshots=(128 * 8, 10**9)), path)
    short = run_training(small_config(tmp_path / "short", tokens=128 * 8), path)
    for a, b in zip(long, short, strict=True):
        snapshot = a / "snapshots" / str(128 * 8)
        assert sorted(p.name for p in (a / "snapshots").iterdir()) == [str(128 * 8)]  # past the end: the run itself
        wa, wb = load_file(snapshot / WEIGHTS), load_file(b / WEIGHTS)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
        snap_cfg, short_cfg = (json.loads((d / "cfg.json").read_text()) for d in (snapshot, b))
        assert snap_cfg["heldout"] == short_cfg["heldout"] and snap_cfg["step"] == 8


def test_tokens_past_the_allowed_passes_say_what_to_do(massive, tmp_path):
    path, _ = massive
    with pytest.raises(UserError, match="fewer than the 100,000 tokens asked; .* allow more passes with --epochs"):
        run_training(small_config(tmp_path, tokens=100_000, epochs=3), path)


def test_chunk_rows_gives_tokens_and_positions_in_row_order(massive):
    cache = open_cache(massive[0])
    tokens_R, positions_R = chunk_rows(cache, 1)
    assert positions_R[: CTX + 1].tolist() == [*range(CTX), 0] and len(tokens_R) == cache.chunk_rows
    assert tokens_R[0] == 0 and tokens_R[1] == 2  # write_cache: BOS at every first position, then 1..ctx_len
