"""Offline models of real architectures with random weights, for tests and benchmarks on machines that
cannot reach the hub: a byte-level BPE tokenizer trained on the bundled OpenWebText sample, and a model
built from a transformers config, saved as a local model directory."""

from pathlib import Path

import pyarrow.parquet as pq
import torch

from sae.harvest.text import bundled_path


def sample_texts(n_docs: int | None = None) -> list[str]:
    texts = pq.read_table(bundled_path("openwebtext-sample"), columns=["text"]).column("text").to_pylist()
    return texts[:n_docs]


def bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with one special token, <|bos|> (id 0), also used as EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|bos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|bos|>")


def save_random_model(directory: Path, config, tokenizer, seed: int = 0) -> Path:
    """A model of config's architecture with seeded random weights, saved with tokenizer: a local model id."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
