"""Re-read every committed chunk of a cache and name the ones that are missing, corrupt or non-finite."""

from collections.abc import Iterator

import torch

from sae.cache.codecs import is_scaled
from sae.cache.store import Cache, acts_name, chunk_key, scales_name
from sae.errors import UserError


def verify(cache: Cache) -> Iterator[tuple[int, str | None]]:
    """(chunk index, problem or None) for every committed chunk, tokens and every layer checked."""
    vocab_size = cache.spec.get("vocab_size")
    for chunk_index in range(cache.n_chunks):
        problems = []
        try:
            tokens = cache.read_tokens(chunk_index)
            if tokens.min() < 0 or (vocab_size is not None and tokens.max() >= vocab_size):
                problems.append(f"token ids out of range in {cache.path}/{chunk_key('tokens', chunk_index)}")
        except UserError as e:
            problems.append(str(e))
        for layer in cache.layers:
            try:
                acts = cache.read_acts(layer, chunk_index)
                if not torch.isfinite(acts).all():
                    problems.append(f"non-finite values in {cache.path}/{chunk_key(acts_name(layer), chunk_index)}")
            except UserError as e:
                problems.append(str(e))
        yield chunk_index, "; ".join(problems) or None


def describe(cache: Cache) -> dict:
    """The machine-readable description printed by `sae cache info --json` (documented in README.md)."""
    return {
        "path": cache.path,
        "key": cache.key,
        "model": cache.spec["model"],
        "layers": cache.layers,
        "site": cache.spec["site"],
        "ctx_len": cache.ctx_len,
        "d_model": cache.d_model,
        "rows": cache.rows,
        "n_contexts": cache.n_contexts,
        "dtype": cache.storage_dtype,
        "arrays": {
            "tokens": "tokens",
            "acts": {str(layer): acts_name(layer) for layer in cache.layers},
            **(
                {"scales": {str(layer): scales_name(layer) for layer in cache.layers}}
                if is_scaled(cache.storage_dtype)
                else {}
            ),
        },
        "chunk_rows": cache.chunk_rows,
        "codec": cache.meta["storage"]["codec"],
        "size_bytes": cache.location.size(),
        "spec": cache.spec,
        "stats": {
            layer: {k: v for k, v in stats.items() if k != "mean_D"} for layer, stats in cache.meta["stats"].items()
        },
        "versions": cache.meta.get("versions", {}),
        "created": cache.meta["created"],
        "updated": cache.meta["updated"],
    }
