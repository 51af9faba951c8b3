"""Tiny real models (GPT-2 and Llama blocks, random weights) with a real BPE tokenizer, built offline."""

import os
from pathlib import Path

# Tests never reach a hub: an unknown hub id must fail at once, not after network retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pyarrow.parquet as pq
import pytest

from tests import tiny_models


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    return tiny_models.sample_texts()


@pytest.fixture(scope="session")
def tiny_tokenizer(sample_texts):
    """A byte-level BPE tokenizer with 512 tokens trained on the bundled OpenWebText sample."""
    return tiny_models.bpe_tokenizer(sample_texts[:200], vocab_size=512)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=512, n_positions=256, n_embd=32, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0)
    return tiny_models.save_random_model(tmp_path_factory.mktemp("tiny-gpt2"), config, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return tiny_models.save_random_model(tmp_path_factory.mktemp("tiny-llama"), config, tiny_tokenizer)


@pytest.fixture
def sample_parquet(tmp_path, sample_texts) -> Path:
    """The first 40 documents of the bundled sample (≈ 40k tiny-tokenizer tokens)."""
    import pyarrow as pa

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": sample_texts[:40]}), path)
    return path
