"""Harvest writes exactly what the model computes, resumes exactly, and extends exactly."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sae.cache.store import open_cache
from sae.harvest.config import HarvestConfig
from sae.harvest.harvest import harvest
from sae.harvest.model import OneDNNConv1D, OneDNNLinear, load_model


def small_config(model, dataset, cache_dir, **overrides) -> HarvestConfig:
    values = dict(
        model=str(model), dataset=str(dataset), layers=(1,), ctx_len=32, tokens=32 * 40, batch_contexts=8,
        chunk_contexts=16, cache_dir=cache_dir, device="cpu",
    )  # fmt: skip
    return HarvestConfig(**{**values, **overrides})


def arrays(path) -> dict[str, np.ndarray]:
    cache = open_cache(path)
    out = {"tokens": np.concatenate([cache.read_tokens(i) for i in range(cache.n_chunks)])}
    for layer in cache.layers:
        out[f"acts/{layer}"] = torch.cat([cache.read_acts(layer, i) for i in range(cache.n_chunks)]).numpy()
    return out


@pytest.mark.parametrize("model_fixture", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_stored_acts_equal_an_independent_forward(request, model_fixture, site, sample_parquet, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    path = harvest(small_config(model_dir, sample_parquet, tmp_path, layers=(0, 1), site=site))
    stored = arrays(path)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hidden = model(torch.from_numpy(stored["tokens"]).long(), output_hidden_states=True).hidden_states
    for layer in (0, 1):
        # hidden_states[L] is the input of block L; resid_post of block L is hidden_states[L + 1]
        expected = hidden[layer if site == "resid_pre" else layer + 1].reshape(-1, 32)
        got = torch.from_numpy(stored[f"acts/{layer}"]).float()
        assert got.shape == (40 * 32, 32)
        torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)  # float16 storage
        assert not torch.equal(got, torch.zeros_like(got))


def test_tokens_pack_documents_with_bos(tiny_gpt2, sample_parquet, tmp_path, tiny_tokenizer):
    path = harvest(small_config(tiny_gpt2, sample_parquet, tmp_path))
    tokens = arrays(path)["tokens"].reshape(-1)
    docs = tiny_tokenizer(
        __import__("datasets")
        .load_dataset("parquet", data_files=str(sample_parquet), split="train")
        .shuffle(seed=0)["text"][:5],
        add_special_tokens=False,
    )["input_ids"]
    stream = np.concatenate([[0, *doc] for doc in docs])
    n = min(len(stream), len(tokens))
    np.testing.assert_array_equal(tokens[:n], stream[:n])


def test_bos_per_context_packing_starts_every_context_with_bos(tiny_gpt2, sample_parquet, tmp_path):
    path = harvest(small_config(tiny_gpt2, sample_parquet, tmp_path, packing="bos_per_context"))
    tokens = arrays(path)["tokens"]
    assert (tokens[:, 0] == 0).all()


def test_extension_equals_one_longer_run(tiny_llama, sample_parquet, tmp_path):
    # 40 contexts in chunks of 16: the first run ends in a partial chunk that the extension rewrites
    harvest(small_config(tiny_llama, sample_parquet, tmp_path / "a", tokens=32 * 24))
    extended = harvest(small_config(tiny_llama, sample_parquet, tmp_path / "a"))
    whole = harvest(small_config(tiny_llama, sample_parquet, tmp_path / "b"))
    assert Path(extended).name == Path(whole).name
    a, b = arrays(extended), arrays(whole)
    for name in b:
        np.testing.assert_array_equal(a[name], b[name])
    assert open_cache(extended).meta["stats"] == open_cache(whole).meta["stats"]


def test_fewer_tokens_does_nothing(tiny_gpt2, sample_parquet, tmp_path, capsys):
    path = Path(harvest(small_config(tiny_gpt2, sample_parquet, tmp_path)))
    before = (path / "zarr.json").read_text()
    harvest(small_config(tiny_gpt2, sample_parquet, tmp_path, tokens=32 * 10))
    assert (path / "zarr.json").read_text() == before
    assert "nothing to do" in capsys.readouterr().err


def test_statistics_match_the_stored_rows(tiny_llama, sample_parquet, tmp_path):
    path = harvest(small_config(tiny_llama, sample_parquet, tmp_path))
    stored = arrays(path)
    acts = stored["acts/1"].astype(np.float64)
    norms = np.linalg.norm(acts, axis=1)
    stats = open_cache(path).stats(1)
    assert stats["count"] == len(acts) == 40 * 32
    np.testing.assert_allclose(stats["mean_D"], acts.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats["mean_norm"], norms.mean(), rtol=1e-9)
    np.testing.assert_allclose(stats["max_norm"], norms.max(), rtol=1e-9)
    tokens = stored["tokens"]
    plain = (tokens != 0).copy()
    plain[:, 0] = False
    np.testing.assert_allclose(stats["plain_mean_norm"], norms[plain.reshape(-1)].mean(), rtol=1e-9)
    assert stats["plain_count"] == plain.sum() < len(acts)


def test_dataset_exhausted_keeps_what_it_read(tiny_gpt2, tmp_path, sample_texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    small = tmp_path / "small.parquet"
    pq.write_table(pa.table({"text": sample_texts[:2]}), small)
    path = harvest(small_config(tiny_gpt2, small, tmp_path, tokens=10**6))
    cache = open_cache(path)
    assert 0 < cache.n_contexts < 10**6 // 32
    assert cache.group["tokens"].shape[0] == cache.n_contexts


def test_hub_streaming_path_resumes_exactly(monkeypatch, tiny_gpt2, sample_parquet, tmp_path):
    """The hub branch (streaming, seeded shuffle buffer, skip on resume), fed a local parquet stream."""
    import datasets

    real_load_dataset = datasets.load_dataset
    calls = []

    def hub_as_local(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return real_load_dataset("parquet", data_files=str(sample_parquet), split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", hub_as_local)
    # A stream closed before its end sleeps 5 s for arrow's threads: a cost per harvest, not per token.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    hub_id = "Skylion007/openwebtext"
    harvest(small_config(tiny_gpt2, hub_id, tmp_path / "a", tokens=32 * 20, chunk_contexts=8))
    extended = harvest(small_config(tiny_gpt2, hub_id, tmp_path / "a", chunk_contexts=8))
    whole = harvest(small_config(tiny_gpt2, hub_id, tmp_path / "b", chunk_contexts=8))
    assert calls[0] == (hub_id, None, "train", True)
    assert open_cache(whole).spec["dataset_revision"] == "unversioned"
    a, b = arrays(extended), arrays(whole)
    for name in b:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")
@pytest.mark.parametrize(
    "name, swapped", [("tiny_llama", {OneDNNLinear: 3 * 7 + 1}), ("tiny_gpt2", {OneDNNConv1D: 3 * 4, OneDNNLinear: 1})]
)
def test_the_loaded_models_linears_compute_by_onednn_as_the_plain_ones(name, swapped, request):
    """load_model swaps every float32 nn.Linear (Llama: q k v o gate up down, 3 layers; the head) and
    GPT-2 Conv1D (c_attn, attention and MLP c_proj, c_fc) on the CPU to oneDNN's matmul: the logits equal
    the plain model's to float32 rounding; with autograd on, the plain forward runs (to the bit)."""
    path = request.getfixturevalue(name)
    loaded = load_model(str(path), "float32", "cpu")
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    found = Counter(type(mod) for mod in loaded.model.modules() if type(mod) in (OneDNNLinear, OneDNNConv1D))
    assert found == swapped
    assert not any(type(mod).__name__ in ("Linear", "Conv1D") for mod in loaded.model.modules())  # none left
    tokens = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.profiler.profile() as prof:
        ours, theirs = loaded.model(tokens).logits, plain(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls["mkldnn::_linear_pointwise"] == sum(swapped.values())  # ours ran oneDNN's, once for each
    with torch.enable_grad():
        assert torch.equal(loaded.model(tokens).logits, plain(tokens).logits)
