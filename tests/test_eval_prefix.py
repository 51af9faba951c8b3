"""Spliced passes that start at the site give eval.json's numbers of full passes (the reference path)."""

import math
from pathlib import Path

import pytest
import torch

import sae.evaluate.splice as splice
from sae.cache.store import open_cache
from sae.evaluate.config import EvalConfig
from sae.evaluate.evaluate import evaluate_runs
from sae.harvest.config import HarvestConfig
from sae.harvest.harvest import harvest
from sae.harvest.model import load_model
from sae.train.config import SAESpec
from sae.train.gate import Gate
from sae.train.rundir import cache_record, run_cfg, save_run
from sae.train.sae import SparseAutoencoder
from tests.test_evaluate import EVAL, eval_json, identity_sae, random_sae, save_sae, zero_sae
from tests.test_harvest import small_config


def compare(ours: dict, full: dict, path: str = "") -> int:
    """Every number of eval.json equal to float tolerance (every key present in both); the count checked."""
    assert ours.keys() == full.keys(), path
    checked = 0
    for key, value in full.items():
        if key in ("config", "versions"):  # the resolved config and library versions: not measurements
            continue
        if isinstance(value, dict):
            checked += compare(ours[key], value, f"{path}.{key}")
        elif isinstance(value, float):
            assert math.isclose(ours[key], value, rel_tol=1e-5, abs_tol=1e-6) or (
                math.isnan(value) and math.isnan(ours[key])
            ), f"{path}.{key}: {ours[key]} vs {value}"
            checked += 1
        else:
            assert ours[key] == value, f"{path}.{key}"
    return checked


def evaluate_both(runs: list[Path], cfg: EvalConfig, monkeypatch) -> tuple[list[dict], list[dict], dict]:
    """eval.json of every run from the prefix-sharing path and from full passes, and how often block 0
    computed in each (at the tests' layer 1 it is in the prefix)."""
    calls = {}
    results = {}
    for mode in ("prefix", "full"):
        monkeypatch.setattr(splice, "SPLICE", mode)
        counted = []
        original = splice.clean_pass

        def counting_clean_pass(loaded, *args, counted=counted, original=original):
            if not counted:
                # on a submodule: a skipped block's own hooks still fire, its submodules do not run
                next(loaded.blocks[0].children()).register_forward_pre_hook(lambda *a: counted.append(1))
                counted.append(0)
            return original(loaded, *args)

        monkeypatch.setattr(splice, "clean_pass", counting_clean_pass)
        evaluate_runs(runs, cfg)
        calls[mode] = sum(counted)
        results[mode] = [eval_json(run) for run in runs]
    return results["prefix"], results["full"], calls


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_texts) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("data") / "docs.parquet"
    pq.write_table(pa.table({"text": sample_texts[:40]}), path)
    return path


def some_runs(cache: Path, tmp_path: Path) -> list[Path]:
    """Exact, zero, TopK and BatchTopK (θ and, with batch_mode, batch mode) SAEs; one gated, so it is also
    spliced at every position: seven spliced passes per batch besides the two ablations."""
    gated = random_sae("topk", 4, 64, seed=1)
    gated.gate = Gate(bos_token_id=0, first=True)
    saes = {"exact": identity_sae(), "zero": zero_sae(), "topk": random_sae("topk", 4, 64), "gated": gated}
    saes["btk"] = random_sae("batchtopk", 4, 64, seed=2)
    return [save_sae(tmp_path / name, sae, cache) for name, sae in saes.items()]


@pytest.mark.parametrize("model_fixture", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_eval_from_the_site_equals_full_passes(request, model_fixture, site, data, tmp_path, monkeypatch):
    model_dir = request.getfixturevalue(model_fixture)
    cache = harvest(small_config(model_dir, data, tmp_path / "caches", site=site, tokens=16 * 32, chunk_contexts=8))
    runs = some_runs(cache, tmp_path)
    ours, full, calls = evaluate_both(runs, EvalConfig(**EVAL, batch_mode=True), monkeypatch)
    assert sum(compare(o, f) for o, f in zip(ours, full, strict=True)) > 300
    batches = EVAL["tokens"] // 32 // EVAL["batch_size"]
    assert calls == {"prefix": batches, "full": batches * (1 + 2 + 7)}  # block 0: in the clean passes only
    zero = ours[1]
    assert zero["ce_spliced"] == zero["ce_zero_ablation"]  # the same replacement runs once


def test_replacements_batched_together_or_one_by_one_give_the_same_numbers(tiny_llama, data, tmp_path, monkeypatch):
    cache = harvest(small_config(tiny_llama, data, tmp_path / "caches", tokens=16 * 32, chunk_contexts=8))
    runs = some_runs(cache, tmp_path)
    monkeypatch.setattr(splice, "SPLICE", "prefix")
    results = []
    for logit_bytes in (1, 1 << 30):  # one replacement per pass; all of them in one
        monkeypatch.setattr(splice, "LOGIT_BYTES", logit_bytes)
        evaluate_runs(runs, EvalConfig(**EVAL))
        results.append([eval_json(run) for run in runs])
    for one_by_one, together in zip(*results, strict=True):
        compare(one_by_one, together)


def test_a_model_that_fails_the_first_batch_check_gets_full_passes(tiny_gpt2, data, tmp_path, monkeypatch):
    """As if a later block needed more from the earlier ones than the residual stream: the re-run of the
    clean activation disagrees with the clean logits, and every spliced pass is then a full one."""
    cache = harvest(small_config(tiny_gpt2, data, tmp_path / "caches", tokens=16 * 32, chunk_contexts=8))
    runs = some_runs(cache, tmp_path)[:2]
    monkeypatch.setattr(splice, "CHECK_TOLERANCE", {torch.float32: -1.0})
    ours, full, calls = evaluate_both(runs, EvalConfig(**EVAL), monkeypatch)
    for o, f in zip(ours, full, strict=True):
        compare(o, f)
    assert calls["prefix"] == calls["full"]


def test_blocks_before_the_site_are_skipped_and_restored(tiny_llama):
    loaded = load_model(str(tiny_llama), "float32", "cpu")
    ids_BT = torch.randint(1, 512, (2, 16))
    splicer = splice.Splicer(loaded, "resid_pre", 2)
    with torch.no_grad():
        clean_BTV, x_BTD = splicer.clean(ids_BT)
        (rerun_BTV,) = splicer.spliced(ids_BT, [x_BTD])
        with splice.skip_blocks(loaded.blocks, 2, tuple_out=False):
            assert "forward" in loaded.blocks[1].__dict__
    assert not splicer.full and splicer.checked
    assert all("forward" not in block.__dict__ for block in loaded.blocks)
    torch.testing.assert_close(rerun_BTV, clean_BTV, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layer", [3, 24])
def test_smollm2_eval_from_the_site_equals_full_passes(layer, tmp_path, monkeypatch):
    """The embedded SmolLM2-135M (Llama blocks, rotary tables, tied head) at an early and a late layer."""
    cfg = HarvestConfig(layers=(layer,), tokens=128 * 16, chunk_contexts=16, cache_dir=tmp_path, device="cpu")
    cache = harvest(cfg)
    runs = []
    for arch in ("batchtopk", "topk"):
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAESpec(arch, 16, 1024, 0.0, 0.0), 576)
        if arch == "batchtopk":
            sae.theta.fill_(0.3)
        (tmp_path / arch).mkdir()
        save_run(tmp_path / arch, sae, run_cfg(sae, cache_record(open_cache(cache), layer), {}))
        runs.append(tmp_path / arch)
    ours, full, calls = evaluate_both(runs, EvalConfig(tokens=128 * 8, batch_size=4, device="cpu"), monkeypatch)
    for o, f in zip(ours, full, strict=True):
        compare(o, f)
    assert calls == {"prefix": 2, "full": 2 * (1 + 2 + 2)}  # two batches; block 0 is in the prefix
