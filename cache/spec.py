"""The cache key: a short hash of everything that determines the stored activations."""

import hashlib
import json
from pathlib import Path
from typing import Any

# Spec fields that change the activations or tokens. Storage choices (codec, chunk size) and how many
# tokens were harvested are not among them: they change how much is stored and how, not what.
KEY_FIELDS = (
    "model",
    "model_revision",
    "model_dtype",
    "site",
    "layers",
    "dataset",
    "dataset_config",
    "dataset_split",
    "dataset_revision",
    "text_column",
    "seed",
    "ctx_len",
    "packing",
    "bos_token_id",
    "dtype",
)


def cache_key(spec: dict[str, Any]) -> str:
    """12 hex digits of sha256 over the canonical JSON of the key fields."""
    missing = [f for f in KEY_FIELDS if f not in spec]
    assert not missing, f"spec lacks key fields {missing}"
    canonical = json.dumps({f: spec[f] for f in KEY_FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def cache_dir_name(spec: dict[str, Any]) -> str:
    """Readable and unique: `<model>_<site>_L<layers>_<key>`; the key alone identifies the cache."""
    model = Path(str(spec["model"])).name.replace("/", "--")
    layers = "-".join(str(layer) for layer in spec["layers"])
    return f"{model}_{spec['site']}_L{layers}_{cache_key(spec)}"


def file_sha256(paths: list[Path]) -> str:
    """Content hash of local files (weights, datasets), so an edited file gets a new cache key."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()[:16]
