"""Evaluation: exact SAEs give exact numbers, CE matches the model's own loss, splicing is local,
the held-out text is disjoint from the cache, and `sae eval` / `sae compare` write their outputs."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae.cache.store import open_cache
from sae.evaluate.compare import compare_runs
from sae.evaluate.config import EvalConfig
from sae.evaluate.evaluate import evaluate_runs
from sae.evaluate.metrics import ratio
from sae.evaluate.splice import spliced_pass
from sae.harvest.harvest import harvest
from sae.harvest.model import load_model
from sae.train.config import SAESpec
from sae.train.gate import Gate
from sae.train.rundir import cache_record, load_sae, run_cfg, save_run
from sae.train.sae import SparseAutoencoder
from tests.test_harvest import small_config

PIPELINE_TOML = Path(__file__).parent.parent / "pipeline.toml"
LAYER, CTX_LEN, D = 1, 32, 32  # the tiny models have d_model 32
EVAL = dict(tokens=8 * CTX_LEN, batch_size=4, device="cpu")


# -- helpers shared with test_evaluate_errors.py -------------------------------------------------
def make_cache(model_dir: Path, dataset: Path, cache_dir: Path) -> Path:
    """16 contexts of 32 tokens at resid_pre of layer 1: the harvest reads only the first documents."""
    return harvest(small_config(model_dir, dataset, cache_dir, layers=(LAYER,), tokens=16 * CTX_LEN, chunk_contexts=8))


def save_sae(run_dir: Path, sae: SparseAutoencoder, cache_path: Path) -> Path:
    """A run dir as `sae train` writes it: SAELens weights, cfg.json naming the training cache."""
    run_dir.mkdir(parents=True)
    save_run(run_dir, sae, run_cfg(sae, cache_record(open_cache(cache_path), LAYER), {}))
    return run_dir


def identity_sae(d: int = D, normalize: str = "none") -> SparseAutoencoder:
    """ReLU SAE with m = 2d, encoder [I, −I], decoder [I; −I]: x̂ = ReLU(x) − ReLU(−x) = x exactly."""
    sae = SparseAutoencoder(SAESpec("relu", 1, 2 * d, 0.0, 0.0), d, normalize=normalize)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d: int = D) -> SparseAutoencoder:
    """Every weight zero: no latent fires and x̂ = 0, which is zero-ablation."""
    sae = SparseAutoencoder(SAESpec("relu", 1, 2 * d, 0.0, 0.0), d)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.zero_()
    return sae


def random_sae(arch: str, k: int, m: int, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAESpec(arch, k, m, 0.0018, 0.004), D)
    if arch == "batchtopk":  # a θ as training would have chosen it
        sae.theta.fill_(0.3)
    return sae


def run_cli(monkeypatch, *args: str) -> int:
    from sae.cli import main

    monkeypatch.setattr(sys, "argv", ["sae", *map(str, args)])
    try:
        main()
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_texts) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("data") / "docs.parquet"
    pq.write_table(pa.table({"text": sample_texts[:40]}), path)
    return path


@pytest.fixture(scope="module")
def cache_path(tiny_gpt2, data, tmp_path_factory) -> Path:
    return make_cache(tiny_gpt2, data, tmp_path_factory.mktemp("caches"))


def eval_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval.json").read_text())


# -- tests -----------------------------------------------------------------------------------------
def test_identity_sae_is_lossless_and_zero_sae_is_zero_ablation(cache_path, tmp_path):
    exact = save_sae(tmp_path / "exact", identity_sae(), cache_path)
    zero = save_sae(tmp_path / "zero", zero_sae(), cache_path)
    written = evaluate_runs([exact, zero], EvalConfig(**EVAL))
    assert written == [exact / "eval.json", zero / "eval.json"]
    e, z = eval_json(exact), eval_json(zero)
    assert abs(e["ce_degradation"]) < 1e-6 and abs(e["kl"]) < 1e-6
    assert e["nmse"] == 0 and e["fvu"] == 0 and e["nmse_standardized"] == 0 and e["nmse_excl_bos"] == 0
    assert e["ce_recovered_zero"] == pytest.approx(1, abs=1e-6)
    # L0 = non-zero coordinates of x: one of the pair (x_i⁺, x_i⁻) is active for every x_i ≠ 0
    loaded = load_model(str(small_path(cache_path)), "float32", "cpu")
    x = held_out_acts(loaded, e)
    assert e["l0_mean"] == pytest.approx(float((x != 0).sum(-1).float().mean()), abs=1e-9)
    assert z["ce_spliced"] == z["ce_zero_ablation"] and z["ce_recovered_zero"] == 0
    assert z["l0_mean"] == 0 and z["dead_latents"] == 2 * D and z["nmse"] == 1
    # shared passes: both runs see the same clean and ablated CE
    for key in ("ce_clean", "ce_zero_ablation", "ce_mean_ablation"):
        assert e[key] == z[key] and f"{key}_stderr" in e
    for key in ("ce_clean", "ce_spliced", "ce_degradation", "kl", "nmse", "fvu", "l0_mean"):
        assert np.isfinite(e[f"{key}_stderr"])
    assert e["n_tokens"] == EVAL["tokens"] and e["eval_spec"]["n_tokens"] == EVAL["tokens"]
    assert {"config", "eval_spec", "run", "versions"} <= set(e) and e["run"]["arch"] == "relu"
    for name in ("report.md", "l0_histogram.png", "feature_density.png"):
        assert (exact / name).stat().st_size > 0
    assert "CE degradation" in (exact / "report.md").read_text()


def small_path(cache_path: Path) -> Path:
    return Path(open_cache(cache_path).spec["model"])


def held_out_acts(loaded, result: dict) -> torch.Tensor:
    from sae.harvest.hooks import capture

    ids = torch.from_numpy(independent_heldout_tokens(loaded.tokenizer, result)).long()
    return capture(loaded.model, loaded.blocks, "resid_pre", [LAYER], ids)[LAYER]


def independent_heldout_tokens(tokenizer, result: dict) -> np.ndarray:
    """The evaluation contexts rebuilt by hand: documents in seeded order from start_doc, [BOS] + tokens each."""
    import datasets

    spec = result["eval_spec"]
    texts = datasets.load_dataset("parquet", data_files=spec["dataset"], split="train").shuffle(seed=spec["seed"])
    texts = texts["text"]
    docs = tokenizer(texts[spec["start_doc"] :], add_special_tokens=False)["input_ids"]
    stream = np.concatenate([[spec["bos_token_id"], *doc] for doc in docs if doc])
    return stream[: spec["n_tokens"]].reshape(-1, spec["ctx_len"])


def test_ce_clean_equals_the_models_labels_loss_on_held_out_documents(cache_path, tmp_path):
    from transformers import AutoModelForCausalLM

    run = save_sae(tmp_path / "exact", identity_sae(), cache_path)
    evaluate_runs([run], EvalConfig(**EVAL))
    result = eval_json(run)
    model_dir = small_path(cache_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = load_model(str(model_dir), "float32", "cpu").tokenizer
    ids = torch.from_numpy(independent_heldout_tokens(tokenizer, result)).long()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert result["ce_clean"] == pytest.approx(float(loss), rel=1e-5)
    assert result["eval_spec"]["same_data_as_cache"]
    # held out: the cache's tokens end inside a document before the first evaluation document
    cache = open_cache(cache_path)
    cached = np.concatenate([cache.read_tokens(i) for i in range(cache.n_chunks)]).reshape(-1)
    docs_started = int((cached == cache.spec["bos_token_id"]).sum())  # bos_per_doc: one BOS per document
    assert result["eval_spec"]["start_doc"] >= docs_started > 0


def test_splicing_touches_only_the_hooked_site(tiny_llama):
    loaded = load_model(str(tiny_llama), "float32", "cpu")
    ids = torch.randint(1, 512, (2, 16))
    seen: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_pre_hook(lambda m, args, kwargs, i=i: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
        for i, block in enumerate(loaded.blocks)
    ]  # fmt: skip
    try:
        with torch.no_grad():
            loaded.model(input_ids=ids, use_cache=False)
            clean = dict(seen)
            replacement = torch.randn_like(clean[1])
            spliced_pass(loaded, ids, "resid_post", 0, replacement)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(seen[0], clean[0])  # before the site: untouched
    assert torch.equal(seen[1], replacement)  # the site: exactly the replacement
    assert not torch.allclose(seen[2], clean[2])  # after it: the change propagates
    assert not loaded.blocks[0]._forward_hooks and not loaded.blocks[1]._forward_pre_hooks  # hooks removed


def test_an_evaluation_gate_passes_bos_rows_through_and_leaves_them_out_of_the_metrics(cache_path, tmp_path):
    zero = save_sae(tmp_path / "zero", zero_sae(), cache_path)
    btk = save_sae(tmp_path / "btk", random_sae("batchtopk", 4, 64), cache_path)
    evaluate_runs([zero, btk], EvalConfig(**EVAL, gate_bos=True, gate_first=True, batch_mode=True))
    result = eval_json(zero)
    loaded = load_model(str(small_path(cache_path)), "float32", "cpu")
    ids = independent_heldout_tokens(loaded.tokenizer, result)
    plain = ids != result["eval_spec"]["bos_token_id"]
    plain[:, 0] = False
    assert result["n_tokens"] == plain.sum() < ids.size
    assert result["gated_fraction"] == pytest.approx(1 - plain.mean())
    assert result["n_pred_tokens"] == ids[:, :-1].size  # CE counts every position: gated rows pass through
    assert result["gate"]["bos_token_id"] == result["eval_spec"]["bos_token_id"] and result["gate"]["first"]
    assert sum(result["l0_distribution"]["bos_or_first"]) == 0 and result["nmse"] == 1
    # beside it, every position through the SAE: a zero SAE there is exactly zero-ablation
    every = result["every_position"]
    assert every["ce_spliced"] == result["ce_zero_ablation"] and every["n_tokens"] == ids.size
    assert result["ce_spliced"] != result["ce_zero_ablation"]  # the gated rows kept their activation
    # batch mode selects among the encoded rows only: exactly k per row on average
    assert eval_json(btk)["batch_mode"]["l0_mean"] == pytest.approx(4, abs=1e-9)


def test_an_sae_with_a_norm_gate_passes_its_gated_rows_through(cache_path, tmp_path):
    sae = identity_sae()
    norms = open_cache(cache_path).read_acts(LAYER, 0).float().norm(dim=1)
    sae.gate = Gate(norm_ratio=1.0, median_norm=float(norms.quantile(0.7)))  # the top ≈ 30% of rows
    run = save_sae(tmp_path / "gated", sae, cache_path)
    zero = zero_sae()
    zero.gate = sae.gate
    zero_run = save_sae(tmp_path / "zero", zero, cache_path)
    evaluate_runs([run, zero_run], EvalConfig(**EVAL))
    result, z = eval_json(run), eval_json(zero_run)
    x = held_out_acts(load_model(str(small_path(cache_path)), "float32", "cpu"), result).reshape(-1, D)
    gated = x.norm(dim=1) > sae.gate.max_norm
    assert 0 < gated.sum() < len(gated) and result["gated_fraction"] == pytest.approx(float(gated.float().mean()))
    assert result["gate"] == sae.gate.record() and result["n_tokens"] == int((~gated).sum())
    # the zero SAE zeroes the ungated rows only: NMSE 1 over them, a CE of its own; every position: zero-ablation
    assert z["nmse"] == 1 and z["every_position"]["ce_spliced"] == z["ce_zero_ablation"]
    assert z["ce_spliced"] not in (z["ce_clean"], z["ce_zero_ablation"]) and z["every_position"]["nmse"] == 1


def test_theta_and_batch_mode_for_batchtopk(cache_path, tmp_path):
    run = save_sae(tmp_path / "btk", random_sae("batchtopk", 4, 64), cache_path)
    evaluate_runs([run], EvalConfig(**EVAL, batch_mode=True))
    result = eval_json(run)
    sae = load_sae(run)
    loaded = load_model(str(small_path(cache_path)), "float32", "cpu")
    x = held_out_acts(loaded, result).reshape(-1, D)
    with torch.no_grad():
        expected_l0 = (sae.pre_acts(x) > 0.3).sum(-1).float().mean()
    assert result["l0_mean"] == pytest.approx(float(expected_l0), rel=1e-6)
    batch = result["batch_mode"]
    assert batch["l0_mean"] == pytest.approx(4, abs=1e-9)  # exactly B·k kept in every full batch
    assert {"ce_spliced", "nmse", "l0_mean_stderr", "l0_distribution"} <= set(batch)


def test_standardising_sae_output_is_mapped_back(cache_path, tmp_path):
    run = save_sae(tmp_path / "ln", identity_sae(normalize="standardize"), cache_path)
    sae = load_sae(run)
    assert sae.input_norm == "standardize"
    x = torch.randn(5, D) * 3 + 1
    recon, _ = sae.reconstruct(x)
    torch.testing.assert_close(recon, x, rtol=1e-4, atol=1e-4)  # the std's epsilon: 1e-5 relative


def test_ratio_standard_error():
    num = torch.tensor([1.0, 2.0, 3.0, 6.0])
    value, se = ratio(num, torch.full((4,), 2.0))
    assert value == pytest.approx(1.5)
    assert se == pytest.approx(float((num / 2).std() / 2))  # equal weights: the plain standard error of the mean


def test_eval_all_then_compare_three_runs(cache_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no pipeline.toml here: defaults + flags
    runs = tmp_path / "runs"
    for arch, k in (("topk", 4), ("topk", 8), ("batchtopk", 4)):
        save_sae(runs / f"{arch}_k{k}_m64", random_sae(arch, k, 64), cache_path)
    run_dirs = sorted(runs.iterdir())
    assert run_cli(monkeypatch, "eval", *run_dirs, "--tokens", "256", "--batch-size", "4", "--device", "cpu") == 0
    assert capsys.readouterr().out.split() == [str(d / "eval.json") for d in run_dirs]
    assert eval_json(runs / "topk_k8_m64")["l0_mean"] == pytest.approx(8)
    assert run_cli(monkeypatch, "compare", *run_dirs, "--out", tmp_path / "cmp") == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cmp")
    for name in ("table.md", "table.csv", "nmse_vs_l0.png", "ce_degradation_vs_l0.png", "l0_distributions.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    lines = (tmp_path / "cmp" / "table.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("name,arch,dict_size,k,l0_mean,l0_mean_stderr")
    assert "topk_k8_m64" in (tmp_path / "cmp" / "table.md").read_text()


def test_every_matryoshka_prefix_is_scored_as_an_sae_and_compared(cache_path, tmp_path):
    """A prefix is the SAE of its first `width` latents: its L0 counts only them, its reconstruction
    decodes only them; `sae compare` gives each a row and draws the run's prefix curve."""
    sae = SparseAutoencoder(SAESpec("matryoshka_batchtopk", 4, 64, 0.0, 0.0, (16, 32, 64)), D)
    sae.theta.fill_(0.0)  # every positive pre-activation: about half of each prefix is active
    run = save_sae(tmp_path / "matryoshka", sae, cache_path)
    evaluate_runs([run], EvalConfig(**EVAL))
    result = eval_json(run)
    loaded = load_model(str(small_path(cache_path)), "float32", "cpu")
    x_RD = held_out_acts(loaded, result).reshape(-1, D)
    with torch.no_grad():
        latents_RM = load_sae(run).encode(x_RD)
    for width in (16, 32):
        block = result[f"prefix_{width}"]
        assert block["width"] == width
        assert block["l0_mean"] == pytest.approx(float((latents_RM[:, :width] > 0).sum(1).float().mean()), rel=1e-6)
        recon_RD = latents_RM[:, :width] @ sae.W_dec[:width].detach() + sae.b_dec.detach()
        nmse = float((recon_RD - x_RD).square().sum() / x_RD.square().sum())
        assert block["nmse"] == pytest.approx(nmse, rel=1e-4) and "ce_degradation" in block
    assert result["prefix_16"]["l0_mean"] < result["prefix_32"]["l0_mean"] < result["l0_mean"]
    compare_runs([run], tmp_path / "cmp")
    names = [line.split(",")[0] for line in (tmp_path / "cmp" / "table.csv").read_text().splitlines()[1:]]
    assert sorted(names) == ["matryoshka", "matryoshka[:16]", "matryoshka[:32]"]
