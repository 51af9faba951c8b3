"""GPT-2-shaped models with random weights, for benchmarks on machines that cannot reach the hub.

    python -m benchmarks.models OUT_DIR            # GPT-2 small's shape (GPT2Config() defaults)
    python -m benchmarks.models OUT_DIR --tiny     # d 32, 3 layers, 512 tokens (the tests' tiny GPT-2): seconds

Prints the model directory and one JSON line with its shape; `--model OUT_DIR` of the other benchmarks loads it.
"""

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.tiny_models import bpe_tokenizer, sample_texts, save_random_model

# The tests' tiny GPT-2 (tests/conftest.py): fast enough that a benchmark's tiny mode can build and run it.
TINY_GPT2 = {"vocab_size": 512, "n_positions": 256, "n_embd": 32, "n_layer": 3, "n_head": 4}
TINY_DOCS = 200
DEFAULT_MODEL = "smollm2-135m"


def gpt2_small_shaped(directory: Path) -> Path:
    """GPT-2 small's shape (12 layers, d 768, 50,257-token head) with random weights. The tokenizer has
    8,192 tokens from the sample (the hub's GPT-2 vocabulary is unreachable offline); the ids fit the head."""
    return gpt2_shaped(directory, {}, n_docs=None, vocab_size=8192)


def tiny_gpt2(directory: Path) -> Path:
    """TINY_GPT2's shape, its 512-token tokenizer trained on the sample's first TINY_DOCS documents."""
    return gpt2_shaped(directory, TINY_GPT2, n_docs=TINY_DOCS, vocab_size=512)


def gpt2_shaped(directory: Path, shape: dict, n_docs: int | None, vocab_size: int) -> Path:
    """A GPT-2 of `shape` (GPT2Config's defaults where it says nothing) with random weights, saved with a BPE
    tokenizer of vocab_size tokens trained on the bundled sample's first n_docs documents (None: all)."""
    from transformers import GPT2Config

    config = GPT2Config(bos_token_id=0, eos_token_id=0, **shape)
    return save_random_model(directory, config, bpe_tokenizer(sample_texts(n_docs), vocab_size=vocab_size))


@contextlib.contextmanager
def model_or_tiny(model: str | None, tiny: bool) -> Iterator[str]:
    """`model` if given; else with tiny a tiny GPT-2 built in a temporary directory that lives as long as
    the block, without it DEFAULT_MODEL (the embedded SmolLM2-135M)."""
    if model is not None or not tiny:
        yield model or DEFAULT_MODEL
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield str(tiny_gpt2(Path(tmp) / "tiny-gpt2"))


def saved_shape(directory: Path) -> dict:
    """The saved model's shape, read back from its config."""
    config = json.loads((directory / "config.json").read_text())
    return {key: config[key] for key in ("model_type", "n_embd", "n_layer", "n_head", "vocab_size")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny GPT-2 shape")
    args = parser.parse_args(argv)
    directory = (tiny_gpt2 if args.tiny else gpt2_small_shaped)(args.out)
    print(directory)
    print(json.dumps({"path": str(directory), **saved_shape(directory)}))


if __name__ == "__main__":
    main()
