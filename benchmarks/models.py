"""GPT-2 small's shape with random weights, for benchmarks on machines that cannot reach the hub.

python -m benchmarks.models OUT_DIR     # GPT2Config() defaults, random weights
"""

import sys
from pathlib import Path

from tests.tiny_models import bpe_tokenizer, sample_texts, save_random_model


def gpt2_small_shaped(directory: Path) -> Path:
    """GPT-2 small's shape (12 layers, d 768, 50,257-token head) with random weights. The tokenizer has
    8,192 tokens from the sample (the hub's GPT-2 vocabulary is unreachable offline); the ids fit the head."""
    from transformers import GPT2Config

    config = GPT2Config(bos_token_id=0, eos_token_id=0)
    return save_random_model(directory, config, bpe_tokenizer(sample_texts(), vocab_size=8192))


if __name__ == "__main__":
    print(gpt2_small_shaped(Path(sys.argv[1])))
