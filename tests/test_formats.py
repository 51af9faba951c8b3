"""SAEs other libraries trained, read as ours (train.formats): each library builds its SAE and writes its
files with its own code, and our encode and reconstruction equal the library's own on real activations
(the tiny GPT-2's rows from a cache; SmolLM2's at d 576); `sae eval`, `sae compare` and `sae inspect`
take them beside our runs; bad input is one line.

dictionary_learning is installed without its dependencies (.ci/install: nnsight's would replace torch
with a CUDA build), so its package is imported with a stand-in for nnsight, which only its activation
buffer uses; its trainers build and train the SAEs, and their files are written the way its trainSAE
writes them: torch.save of the SAE's state dict, json.dump of {"trainer": trainer.config, "buffer": ...}.
"""

import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sae.cache.store import open_cache
from sae.errors import UserError
from sae.evaluate.compare import compare_runs
from sae.evaluate.config import EvalConfig
from sae.evaluate.evaluate import evaluate_runs
from sae.harvest.hooks import capture
from sae.harvest.model import load_model
from sae.train.formats import parse_hook
from sae.train.rundir import load_sae, read_run
from tests.test_evaluate import (  # noqa: F401  (module fixtures)
    EVAL,
    LAYER,
    cache_path,
    data,
    independent_heldout_tokens,
    run_cli,
    save_sae,
)

D, M, K = 32, 96, 8  # the tiny models' d_model
FLAGS = ("--tokens", "256", "--batch-size", "4", "--device", "cpu")
FILES = {"saelens": {"cfg.json", "sae_weights.safetensors"}, "sparsify": {"cfg.json", "sae.safetensors", "config.json"},
         "dictionary_learning": {"ae.pt", "config.json"}}  # fmt: skip
MAX_DIFF: dict[str, float] = {}  # what each check measured, for the record (pytest -s prints it)


@pytest.fixture(scope="module", autouse=True)
def report_max_diff():
    yield
    print("\nmax abs differences, ours − the library's own:", json.dumps(MAX_DIFF, indent=1))


def max_diff(name: str, ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 2e-6) -> float:
    """Max |ours − theirs|, asserted within float32 rounding of the values' scale."""
    diff = float((ours.float() - theirs.float()).abs().max())
    MAX_DIFF[name] = diff
    scale = float(theirs.abs().max())
    assert diff <= rtol * max(scale, 1.0) * 10, f"{name}: max abs difference {diff:.3g} at scale {scale:.3g}"
    return diff


def same_encode(name: str, ours, x_RD: torch.Tensor, latents_RM: torch.Tensor, recon_RD: torch.Tensor) -> None:
    with torch.no_grad():
        our_recon_RD, our_latents_RM = ours.reconstruct(x_RD)
    max_diff(f"{name} latents", our_latents_RM, latents_RM)
    max_diff(f"{name} reconstruction", our_recon_RD, recon_RD)
    assert 0 < (latents_RM > 0).float().mean() < 0.9  # a sparse code, not a blank one


@pytest.fixture(scope="module")
def rows(cache_path) -> torch.Tensor:  # noqa: F811
    """Real rows: the tiny GPT-2's resid_pre of layer 1, the cache's first chunk [256, 32]."""
    return open_cache(cache_path).read_acts(LAYER, 0).float()


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_rows(smollm2) -> torch.Tensor:
    """SmolLM2's residual stream after block 6 on two contexts of the bundled sample [256, 576]."""
    ids_BT = torch.tensor(sample_ids(smollm2.tokenizer, 2, 128))
    return capture(smollm2.model, smollm2.blocks, "resid_post", [6], ids_BT)[6].reshape(-1, 576).float()


def sample_ids(tokenizer, contexts: int, ctx_len: int) -> list[list[int]]:
    from tests.tiny_models import sample_texts

    ids = [tokenizer.bos_token_id or 0, *tokenizer(" ".join(sample_texts(20)))["input_ids"]]
    return [ids[i * ctx_len : (i + 1) * ctx_len] for i in range(contexts)]


def randomize(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


# -- SAELens ----------------------------------------------------------------------------------------
def saelens_metadata(model, dataset=None, hook=f"blocks.{LAYER}.hook_resid_pre"):
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(model_name=str(model), hook_name=hook, context_size=32, dataset_path=dataset and str(dataset))


def saelens_inference(kind: str, d: int = D, m: int = M, **cfg):
    import sae_lens as sl

    cls, cfg_cls = {"standard": (sl.StandardSAE, sl.StandardSAEConfig), "topk": (sl.TopKSAE, sl.TopKSAEConfig),
                    "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig)}[kind]  # fmt: skip
    return cls(cfg_cls(d_in=d, d_sae=m, **cfg))


def saelens_training(kind: str, **cfg):
    import sae_lens as sl

    cls, cfg_cls = {
        "topk": (sl.TopKTrainingSAE, sl.TopKTrainingSAEConfig),
        "batchtopk": (sl.BatchTopKTrainingSAE, sl.BatchTopKTrainingSAEConfig),
        "matryoshka_batchtopk": (sl.MatryoshkaBatchTopKTrainingSAE, sl.MatryoshkaBatchTopKTrainingSAEConfig),
        "jumprelu": (sl.JumpReLUTrainingSAE, sl.JumpReLUTrainingSAEConfig),
    }[kind]
    return cls(cfg_cls(d_in=D, d_sae=M, **cfg))


SAELENS_INFERENCE = {  # name: (SAELens architecture, its config, our architecture, our normalisation)
    "standard": ("standard", {}, "relu", "none"),
    "topk": ("topk", {"k": K}, "topk", "none"),
    "jumprelu": ("jumprelu", {}, "jumprelu", "none"),
    "topk no b_dec in, layer_norm": (
        "topk", {"k": K, "apply_b_dec_to_input": False, "normalize_activations": "layer_norm"}, "topk", "standardize"
    ),
    "standard constant_norm_rescale": (
        "standard", {"normalize_activations": "constant_norm_rescale"}, "relu", "constant_norm_rescale"
    ),
    "jumprelu expected_average_only_in": (
        "jumprelu", {"normalize_activations": "expected_average_only_in"}, "jumprelu", "none"
    ),
    "topk rescale_acts_by_decoder_norm": ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}, "topk", "none"),
}  # fmt: skip


def test_saelens_inference_saes_read_as_ours(rows, tiny_gpt2, tmp_path):
    from sae_lens import SAE

    for name, (kind, cfg, arch, normalize) in SAELENS_INFERENCE.items():
        sae = randomize(saelens_inference(kind, metadata=saelens_metadata(tiny_gpt2), **cfg))
        if kind == "jumprelu":  # thresholds at the pre-activations' quantiles, a few negative ones too
            with torch.no_grad():
                sae.threshold.copy_(torch.linspace(-0.2, 1.0, M))
        sae.save_model(str(tmp_path / name))
        theirs, ours = SAE.load_from_disk(str(tmp_path / name)), load_sae(tmp_path / name)
        assert (ours.spec.arch, ours.input_norm) == (arch, normalize), name
        with torch.no_grad():
            same_encode(f"saelens {name}", ours, rows, theirs.encode(rows), theirs(rows))
    # a pre-6.0 cfg.json (flat, hook_point, activation_fn_str) as SAELens 6 still reads it
    pre6 = {"d_in": D, "d_sae": M, "dtype": "float32", "hook_point": f"blocks.{LAYER}.hook_resid_pre", "hook_layer": 1,
            "model_name": str(tiny_gpt2), "context_size": 32, "normalize_activations": False,
            "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "sae_lens_training_version": "3.0.0"}  # fmt: skip
    (tmp_path / "topk" / "cfg.json").write_text(json.dumps(pre6))
    theirs, run = SAE.load_from_disk(str(tmp_path / "topk")), read_run(tmp_path / "topk", cache=tmp_path / "nowhere")
    assert (run.imported.sae.spec.arch, run.imported.sae.spec.k, run.spec["site"], run.layer) == (
        "topk",
        K,
        "resid_pre",
        1,
    )
    with torch.no_grad():
        same_encode("saelens pre-6.0 topk", run.imported.sae, rows, theirs.encode(rows), theirs(rows))


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "matryoshka_batchtopk", "jumprelu"])
def test_saelens_training_saes_read_as_their_inference_form(kind, rows, tiny_gpt2, tmp_path):
    """save_model's training form and save_inference_model's export both read as the SAE SAELens deploys."""
    from sae_lens import SAE

    extra = {"k": K} if kind != "jumprelu" else {}
    extra |= {"matryoshka_widths": [16, 48, M]} if kind == "matryoshka_batchtopk" else {}
    sae = randomize(saelens_training(kind, metadata=saelens_metadata(tiny_gpt2), **extra))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(M, 1) + 0.5)  # not unit norm: rescale_acts_by_decoder_norm is folded
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.6)
        if kind == "jumprelu":
            sae.threshold.copy_(torch.linspace(-0.2, 1.0, M))
    sae.save_model(str(tmp_path / "training"))
    sae.save_inference_model(str(tmp_path / "inference"))
    theirs = SAE.load_from_disk(str(tmp_path / "inference"))
    with torch.no_grad():
        latents_RM, recon_RD = theirs.encode(rows), theirs(rows)
    for form in ("training", "inference"):
        ours = load_sae(tmp_path / form)
        assert ours.spec.arch == kind and ours.spec.k == extra.get("k", 0)
        if kind in ("batchtopk", "matryoshka_batchtopk"):
            assert float(ours.theta) == pytest.approx(0.6)
        assert tuple(ours.spec.matryoshka_widths) == tuple(extra.get("matryoshka_widths", ()))
        same_encode(f"saelens training {kind} ({form})", ours, rows, latents_RM, recon_RD)


# -- sparsify ---------------------------------------------------------------------------------------
def sparsify_run(root: Path, hookpoint: str, model, dataset, d: int = D, m: int = M, rows_RD=None) -> Path:
    """A sparsify TopK SAE trained a few steps on rows (its own forward and FVU), saved by save_to_disk,
    with the run's config.json as its trainer writes it (RunConfig.save_json)."""
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.__main__ import RunConfig

    torch.manual_seed(0)
    coder = SparseCoder(d, SparseCoderConfig(num_latents=m, k=K))
    with torch.no_grad():
        coder.b_dec.normal_(0, 0.3)
        coder.encoder.bias.normal_(0, 0.3)
    if rows_RD is not None:
        optimizer = torch.optim.Adam(coder.parameters(), lr=1e-3)
        for _ in range(3):
            coder(rows_RD).fvu.backward()
            optimizer.step()
            optimizer.zero_grad()
    coder.save_to_disk(root / hookpoint)
    config = RunConfig(sae=coder.cfg, model=str(model), dataset=str(dataset), ctx_len=32, hookpoints=[hookpoint])
    config.save_json(root / "config.json")
    return root / hookpoint


def test_sparsify_saes_read_as_ours(rows, tiny_gpt2, data, tmp_path):  # noqa: F811
    from sparsify import SparseCoder

    path = sparsify_run(tmp_path / "run", "layers.0", tiny_gpt2, data, rows_RD=rows)
    theirs, ours = SparseCoder.load_from_disk(path), load_sae(path)
    assert ours.spec.arch == "topk" and ours.spec.k == K
    with torch.no_grad():
        out = theirs.encode(rows)
        latents_RM = torch.zeros(len(rows), M).scatter_(1, out.top_indices, out.top_acts)
        same_encode("sparsify topk", ours, rows, latents_RM, theirs.decode(out.top_acts, out.top_indices))
    run = read_run(path, cache=tmp_path / "nowhere")
    assert (run.spec["model"], run.spec["site"], run.layer, run.spec["ctx_len"]) == (
        str(tiny_gpt2),
        "resid_post",
        0,
        32,
    )
    assert run.spec["dataset"] == str(data) and run.imported.name == "run/layers.0"


# -- dictionary_learning ------------------------------------------------------------------------------
def dictionary_learning_trainers():
    """Its trainers, imported with a stand-in for nnsight (used by its activation buffer only)."""
    pytest.importorskip("einops")
    try:
        import nnsight  # noqa: F401
    except ImportError:
        sys.modules["nnsight"] = types.SimpleNamespace(LanguageModel=object)
    pytest.importorskip("dictionary_learning")
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer

    return {
        "relu": (StandardTrainer, {}),
        "topk": (TopKTrainer, {"k": K}),
        "batchtopk": (BatchTopKTrainer, {"k": K, "threshold_start_step": 0}),
        "matryoshka_batchtopk": (
            MatryoshkaBatchTopKTrainer,
            {"k": K, "group_fractions": [1 / 6, 1 / 3, 1 / 2], "threshold_start_step": 0},
        ),  # fmt: skip
        "jumprelu": (JumpReluTrainer, {}),
    }


def dictionary_learning_save(trainer, save_dir: Path, ctx_len: int = 32) -> Path:
    """trainSAE's save: config.json of the trainer's and the buffer's configs, ae.pt of the state dict."""
    save_dir.mkdir(parents=True)
    buffer = {"d_submodule": trainer.ae.activation_dim, "io": "out", "n_ctxs": 30, "ctx_len": ctx_len,
              "refresh_batch_size": 8, "out_batch_size": 256, "device": "cpu"}  # fmt: skip
    with open(save_dir / "config.json", "w") as f:
        json.dump({"trainer": trainer.config, "buffer": buffer}, f, indent=4)
    torch.save({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, save_dir / "ae.pt")
    return save_dir


def dictionary_learning_trained(arch: str, rows_RD: torch.Tensor, model, layer: int, steps: int = 3):
    trainer_class, extra = dictionary_learning_trainers()[arch]
    torch.manual_seed(0)
    trainer = trainer_class(
        steps=5000, activation_dim=rows_RD.shape[1], dict_size=3 * rows_RD.shape[1], layer=layer, lm_name=str(model),
        submodule_name=f"resid_post_layer_{layer}", device="cpu", **extra,
    )  # fmt: skip
    for step in range(steps):
        trainer.update(step, rows_RD)
    return trainer


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu"])
def test_dictionary_learning_saes_read_as_ours(arch, rows, tiny_gpt2, tmp_path):
    trainer = dictionary_learning_trained(arch, rows, tiny_gpt2, 0)
    path = dictionary_learning_save(trainer, tmp_path / "save" / "trainer_0")
    ours = load_sae(path)
    assert ours.spec.arch == arch
    if arch == "matryoshka_batchtopk":
        assert tuple(ours.spec.matryoshka_widths) == (16, 48, M)
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        assert float(ours.theta) == pytest.approx(float(trainer.ae.threshold)) and float(ours.theta) > 0
    with torch.no_grad():
        same_encode(f"dictionary_learning {arch}", ours, rows, trainer.ae.encode(rows), trainer.ae(rows))
    run = read_run(path, cache=tmp_path / "nowhere")
    assert (run.spec["site"], run.layer, run.spec["ctx_len"], run.imported.name) == (
        "resid_post",
        0,
        32,
        "save/trainer_0",
    )


# -- the embedded SmolLM2 at d 576 ------------------------------------------------------------------
def test_each_library_at_smollm2_width_on_its_rows(smollm2_rows, tmp_path):
    from sae_lens import SAE
    from sparsify import SparseCoder

    x_RD, m = smollm2_rows, 1152
    sae = randomize(saelens_inference("topk", d=576, m=m, k=32, metadata=saelens_metadata("smollm2-135m")), 0.05)
    sae.save_model(str(tmp_path / "saelens"))
    theirs = SAE.load_from_disk(str(tmp_path / "saelens"))
    with torch.no_grad():
        same_encode("smollm2 saelens topk", load_sae(tmp_path / "saelens"), x_RD, theirs.encode(x_RD), theirs(x_RD))
    path = sparsify_run(tmp_path / "sparsify", "layers.6", "smollm2-135m", "openwebtext-sample", d=576, m=m)
    coder = SparseCoder.load_from_disk(path)
    with torch.no_grad():
        out = coder.encode(x_RD)
        latents_RM = torch.zeros(len(x_RD), m).scatter_(1, out.top_indices, out.top_acts)
        same_encode(
            "smollm2 sparsify topk", load_sae(path), x_RD, latents_RM, coder.decode(out.top_acts, out.top_indices)
        )
    trainer = dictionary_learning_trained("batchtopk", x_RD, "smollm2-135m", 6, steps=2)
    path = dictionary_learning_save(trainer, tmp_path / "dl" / "trainer_0", ctx_len=128)
    with torch.no_grad():
        same_encode(
            "smollm2 dictionary_learning batchtopk", load_sae(path), x_RD, trainer.ae.encode(x_RD), trainer.ae(x_RD)
        )


# -- sites ------------------------------------------------------------------------------------------
def test_a_block_output_is_resid_post_and_the_next_resid_pre(tiny_gpt2, tiny_llama, smollm2):
    """sparsify's hookpoint layers.L (h.L) hooks block L's output: our resid_post L, which is resid_pre
    L+1; checked on the tiny GPT-2 and Llama, and on SmolLM2, through the hooks harvest uses."""
    assert parse_hook("blocks.8.hook_resid_pre") == ("resid_pre", 8) and parse_hook("h.3") == ("resid_post", 3)
    assert (
        parse_hook("layers.6") == parse_hook("model.layers.6") == parse_hook("gpt_neox.layers.6") == ("resid_post", 6)
    )
    assert parse_hook("blocks.8.hook_mlp_out") is None and parse_hook("layers.6.mlp") is None
    models = [
        (load_model(str(tiny_gpt2)), "h.1", 1),
        (load_model(str(tiny_llama)), "layers.1", 1),
        (smollm2, "layers.6", 6),
    ]
    for loaded, hookpoint, layer in models:
        ids_BT = torch.tensor(sample_ids(loaded.tokenizer, 2, 32))
        post = capture(loaded.model, loaded.blocks, "resid_post", [layer], ids_BT)[layer]
        pre = capture(loaded.model, loaded.blocks, "resid_pre", [layer + 1], ids_BT)[layer + 1]
        hooked = module_output(loaded.model.base_model.get_submodule(hookpoint), loaded.model, ids_BT)
        assert parse_hook(hookpoint) == ("resid_post", layer)
        assert torch.equal(post, pre) and torch.equal(hooked, post), hookpoint


def module_output(module: torch.nn.Module, model: torch.nn.Module, ids_BT: torch.Tensor) -> torch.Tensor:
    """What a forward hook on module reads (output[0] of a tuple), as sparsify's trainer hooks its hookpoints."""
    hooked = {}
    handle = module.register_forward_hook(
        lambda m, i, out: hooked.setdefault("out", out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.inference_mode():
            model(input_ids=ids_BT, use_cache=False)
    finally:
        handle.remove()
    return hooked["out"]


# -- sae eval, compare and inspect ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_gpt2, data, cache_path, rows):  # noqa: F811
    """One SAE of each library at the cache's rows (resid_pre 1 = resid_post 0), and ours with the SAELens one's weights."""
    root = tmp_path_factory.mktemp("imported")
    sae = randomize(saelens_inference("topk", k=K, metadata=saelens_metadata(tiny_gpt2, data)))
    sae.save_model(str(root / "saelens"))
    save_sae(root / "ours", load_sae(root / "saelens"), cache_path)
    sparsify_run(root / "sparsify", "h.0", tiny_gpt2, data, rows_RD=rows)
    dictionary_learning_save(dictionary_learning_trained("batchtopk", rows, tiny_gpt2, 0), root / "dl" / "trainer_0")
    return {"ours": root / "ours", "saelens": root / "saelens", "sparsify": root / "sparsify" / "h.0",
            "dictionary_learning": root / "dl" / "trainer_0"}  # fmt: skip


def eval_json(path: Path) -> dict:
    return json.loads((path / "eval.json").read_text())


def test_eval_reads_each_format_beside_ours_on_the_cache_and_compare_mixes_them(imported, cache_path, tmp_path):  # noqa: F811
    caches = Path(cache_path).parent  # a folder of caches: each SAE finds the one of its site
    evaluate_runs(list(imported.values()), EvalConfig(**EVAL, cache=str(caches)))
    results = {name: eval_json(path) for name, path in imported.items()}
    ours, theirs = results.pop("ours"), results["saelens"]
    for key in ("ce_spliced", "ce_degradation", "nmse", "fvu", "l0_mean", "kl", "ce_mean_ablation"):
        assert theirs[key] == ours[key], key  # the same weights on the same rows: the same figures
    for name, result in results.items():
        run = result["run"]
        assert run["format"] == name and run["cache_key"] == open_cache(cache_path).key
        assert (run["site"], run["layer"]) == ("resid_pre", LAYER) and result["eval_spec"] == ours["eval_spec"]
        assert set(run["source"]["files_sha256"]) == FILES[name]
    assert results["sparsify"]["run"]["source"]["hook"] == "h.0" and results["sparsify"]["run"]["arch"] == "topk"
    assert results["dictionary_learning"]["run"]["arch"] == "batchtopk"
    compare_runs(list(imported.values()), tmp_path / "cmp")
    names = [line.split(",")[0] for line in (tmp_path / "cmp" / "table.csv").read_text().splitlines()[1:]]
    assert sorted(names) == ["dl/trainer_0", "ours", "saelens", "sparsify/h.0"]


def test_eval_without_a_cache_matches_saelens_own_explained_variance_and_l0(tiny_gpt2, data, tmp_path):  # noqa: F811
    """No cache of its site: its dataset from the first document, its context size, the mean for mean
    ablation from the evaluation contexts; EV and L0 by SAELens's own formula on the same tokens agree."""
    from sae_lens import SAE
    from sae_lens.evals import ExplainedVarianceCalculator

    sae = randomize(
        saelens_inference("topk", k=K, metadata=saelens_metadata(tiny_gpt2, data, "blocks.2.hook_resid_pre")), 0.05
    )
    with torch.no_grad():  # ±e_i for the first 2d latents: the top k keep the k largest |x_i|, a real code
        eye = torch.eye(D)
        sae.W_enc[:, : 2 * D] = torch.cat([eye, -eye], 1)
        sae.W_dec[: 2 * D] = torch.cat([eye, -eye])
        sae.b_enc.zero_(), sae.b_dec.zero_()
    sae.save_model(str(tmp_path / "saelens"))
    evaluate_runs([tmp_path / "saelens"], EvalConfig(**EVAL, cache=str(tmp_path / "no-caches")))
    result = eval_json(tmp_path / "saelens")
    spec = result["eval_spec"]
    assert spec["mean_ablation"] == "evaluation_contexts" and spec["start_doc"] == 0 and spec["ctx_len"] == 32
    assert spec["dataset"] == str(data) and not spec["same_data_as_cache"] and result["run"]["cache_key"] is None
    loaded = load_model(str(tiny_gpt2))
    ids_CT = torch.from_numpy(independent_heldout_tokens(loaded.tokenizer, result)).long()
    x_RD = capture(loaded.model, loaded.blocks, "resid_pre", [2], ids_CT)[2].reshape(-1, D)
    theirs, ev = SAE.load_from_disk(str(tmp_path / "saelens")), ExplainedVarianceCalculator()
    with torch.no_grad():
        ev.add_batch(theirs(x_RD), x_RD)
        l0 = float((theirs.encode(x_RD) != 0).sum(-1).float().mean())
    MAX_DIFF["explained variance, ours"] = result["explained_variance"]
    MAX_DIFF["explained variance, ours − SAELens's"] = result["explained_variance"] - ev.compute()
    MAX_DIFF["L0, ours − SAELens's"] = result["l0_mean"] - l0
    assert 0.3 < ev.compute() < 0.99 and result["explained_variance"] == pytest.approx(ev.compute(), abs=1e-6)
    assert result["l0_mean"] == pytest.approx(l0, rel=1e-6)


def test_inspect_reads_an_imported_sae_over_a_cache_of_its_site(imported, cache_path, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("SAE_CACHE_DIR", str(Path(cache_path).parent))  # the default cache root
    args = ("--no-lm", "--top", "4", "--sample-size", "8", "--quantile-pool", "4", "--quantile-samples", "2")
    assert (
        run_cli(monkeypatch, "inspect", imported["sparsify"], "--out", tmp_path / "page", *args, "--device", "cpu") == 0
    )
    saved = json.loads((tmp_path / "page" / "latents.json").read_text())
    assert saved["run"]["format"] == "sparsify" and saved["run"]["name"] == "sparsify/h.0"
    assert saved["cache"]["layer"] == LAYER and saved["source"]["rows"] == 8 * 32  # the cache's last chunk
    monkeypatch.setenv("SAE_CACHE_DIR", str(tmp_path / "no-caches"))
    capsys.readouterr()  # the pass's progress
    err = one_line_error(monkeypatch, capsys, "inspect", imported["sparsify"], *args)
    assert "sae inspect reads rows of" in err and "--layer 0 --site resid_post" in err and "sae harvest --model" in err


# -- `saelens:RELEASE/SAE_ID` -----------------------------------------------------------------------
def test_a_saelens_release_is_saved_by_saelens_and_read_as_a_directory(tiny_gpt2, tmp_path, monkeypatch):
    import sae_lens

    calls = []

    def from_pretrained(release, sae_id, device="cpu", **kwargs):  # the hub's answer, offline
        calls.append((release, sae_id))
        return randomize(saelens_inference("topk", k=K, metadata=saelens_metadata(tiny_gpt2)))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", from_pretrained)
    run = read_run("saelens:some-release/blocks.1.hook_resid_pre", cache=str(tmp_path / "no-caches"))
    assert run.path == Path("saelens/some-release/blocks.1.hook_resid_pre") and run.imported.format == "saelens"
    assert (run.spec["site"], run.layer) == ("resid_pre", 1) and calls == [("some-release", "blocks.1.hook_resid_pre")]
    load_sae("saelens:some-release/blocks.1.hook_resid_pre")  # saved once: read again, not fetched
    assert len(calls) == 1


# -- bad input: one line each ---------------------------------------------------------------------------
def one_line_error(monkeypatch, capsys, *args) -> str:
    assert run_cli(monkeypatch, *args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def bad_inputs(root: Path, tiny_gpt2, data) -> dict[str, tuple[Path, list[str], str]]:  # noqa: F811
    """name: (the run argument, extra flags, what the one line says)."""
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "notes.txt").write_text("not an SAE")
    for name, hook, d in (("layer7", "blocks.7.hook_resid_pre", D), ("d16", "blocks.1.hook_resid_pre", 16),
                          ("mlp", "blocks.1.hook_mlp_out", D)):  # fmt: skip
        randomize(saelens_inference("topk", d=d, k=K, metadata=saelens_metadata(tiny_gpt2, data, hook))).save_model(
            str(root / name)
        )
    (root / "cfg-only").mkdir()
    (root / "cfg-only" / "cfg.json").write_text((root / "layer7" / "cfg.json").read_text())
    (root / "ae-only").mkdir()
    torch.save({}, root / "ae-only" / "ae.pt")
    return {
        "none of the formats": (root / "notes", [], "no saved SAE in"),
        "SAELens weights missing": (root / "cfg-only", [], "holds cfg.json of a SAELens SAE but not sae_weights.safetensors"),
        "dictionary_learning config missing": (root / "ae-only", [], "holds ae.pt of a dictionary_learning SAE but not config.json"),
        "a layer the model lacks": (root / "layer7", [], "layer 7 out of range: this model has layers 0..2"),
        "d_in is not d_model": (root / "d16", [], "the SAE has d_in=16 but"),
        "not a residual site": (root / "mlp", [], "its hook 'blocks.1.hook_mlp_out' is no residual-stream site); pass --site and --layer"),
        "gate-norm without a cache": (root / "layer7", ["--layer", "2", "--gate-norm", "4"], "--gate-norm needs the median row norm"),
        "an unknown release": (Path("saelens:no-such-release/x"), [], "Release no-such-release not found"),
    }  # fmt: skip


def test_bad_input_is_one_line_and_a_failure(tiny_gpt2, data, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # no pipeline.toml, no caches
    for name, (run, flags, message) in bad_inputs(tmp_path / "bad", tiny_gpt2, data).items():
        err = one_line_error(monkeypatch, capsys, "eval", run, *FLAGS, *flags)
        assert message in err, (name, err)
    assert "(it holds notes.txt)" in one_line_error(monkeypatch, capsys, "eval", tmp_path / "bad" / "notes", *FLAGS)
    started = time.monotonic()  # HF_HUB_OFFLINE (tests/conftest.py): no retries of an unreachable hub
    err = one_line_error(monkeypatch, capsys, "eval", "saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre", *FLAGS)
    assert "cannot download 'saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre'" in err
    assert time.monotonic() - started < 10


def test_foreign_saes_that_are_not_plain_saes_are_refused(rows, tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    for name, cfg in (("transcoder", {"transcode": True}), ("skip", {"skip_connection": True})):
        SparseCoder(D, SparseCoderConfig(num_latents=M, k=K, **cfg)).save_to_disk(tmp_path / name / "layers.0")
        with pytest.raises(UserError, match="not a TopK SAE of its input"):
            load_sae(tmp_path / name / "layers.0")
    trainer = dictionary_learning_trained("batchtopk", rows, "m", 0, steps=0)  # θ still at its initial −1
    path = dictionary_learning_save(trainer, tmp_path / "dl" / "trainer_0")
    with pytest.raises(UserError, match="training stopped before its threshold was estimated"):
        load_sae(path)
    assert np.isclose(float(trainer.ae.threshold), -1.0)
