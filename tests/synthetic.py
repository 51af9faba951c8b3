"""Synthetic activations with planted sparse features, and caches made of them (tests, benchmarks).

Each row is a sum of a few of `n_features` random unit directions with positive coefficients; the
number of active features varies from row to row, which is what lets BatchTopK beat TopK at equal k.
"""

from pathlib import Path

import numpy as np
import torch

from sae.cache.location import as_location
from sae.cache.lock import writer_lock
from sae.cache.spec import cache_dir_name
from sae.cache.store import open_writer


def planted_acts(n: int, d: int, n_features: int, mean_active: float, seed: int = 0) -> torch.Tensor:
    """[n, d] float32: rows with between 1 and 2·mean_active − 1 active features (uniformly many).

    The feature directions depend on (d, n_features) only; `seed` draws the rows, so two calls with
    different seeds are a train and a held-out set of the same distribution."""
    dirs_FD = torch.randn(n_features, d, generator=torch.Generator().manual_seed(n_features))
    dirs_FD /= dirs_FD.norm(dim=1, keepdim=True)
    gen = torch.Generator().manual_seed(seed)
    max_active = max(1, round(2 * mean_active - 1))
    counts_N = torch.randint(1, max_active + 1, (n,), generator=gen)
    # Feature ranks per row from a random permutation; keep the first counts_N of them.
    ranks_NF = torch.rand(n, n_features, generator=gen).argsort(dim=1).argsort(dim=1)
    coeffs_NF = (0.5 + torch.rand(n, n_features, generator=gen)) * (ranks_NF < counts_N[:, None])
    return coeffs_NF @ dirs_FD


def synthetic_spec(d_model: int, ctx_len: int, layer: int = 0, bos_token_id: int = 0) -> dict:
    """A cache spec with every key field, naming no real model."""
    return {
        "model": f"synthetic-d{d_model}",
        "model_revision": "none",
        "model_dtype": "float32",
        "site": "resid_pre",
        "layers": [layer],
        "dataset": "planted",
        "dataset_config": None,
        "dataset_split": "train",
        "dataset_revision": None,
        "text_column": "text",
        "seed": 0,
        "ctx_len": ctx_len,
        "packing": "bos_per_context",
        "bos_token_id": bos_token_id,
        "dtype": "float32",
    }


def write_cache(root: str | Path, acts_RD: "torch.Tensor | dict[int, torch.Tensor]", ctx_len: int,
                chunk_contexts: int, layer: int = 0, dtype: str = "float32", codec: str = "none",
                bos_every: int = 0) -> str:  # fmt: skip
    """A committed cache under root (a local path or URL) holding acts_RD (rows in context order) at
    `layer`, or {layer: rows} at several; tokens are 1..ctx_len except every `bos_every`-th row (and each
    context's first), which is token 0 = BOS. Returns its path or URL."""
    by_layer = acts_RD if isinstance(acts_RD, dict) else {layer: acts_RD}
    acts_RD = next(iter(by_layer.values()))
    n_ctx = len(acts_RD) // ctx_len
    spec = {**synthetic_spec(acts_RD.shape[1], ctx_len, layer), "layers": sorted(by_layer), "dtype": dtype}
    path = as_location(root).child(cache_dir_name(spec))
    tokens_R = np.tile(np.arange(1, ctx_len + 1, dtype=np.int32), n_ctx)
    tokens_R[::ctx_len] = 0
    if bos_every:
        tokens_R[::bos_every] = 0
    tokens_CT = tokens_R.reshape(n_ctx, ctx_len)
    storage = {"codec": codec, "chunk_contexts": chunk_contexts}
    with writer_lock(path):
        writer = open_writer(path, spec, storage, acts_RD.shape[1], {"provenance": "synthetic"})
        writer.reserve(n_ctx)
        for chunk, ctx0 in enumerate(range(0, n_ctx, chunk_contexts)):
            ctx1 = min(ctx0 + chunk_contexts, n_ctx)
            acts = {lay: rows_RD[ctx0 * ctx_len : ctx1 * ctx_len] for lay, rows_RD in by_layer.items()}
            writer.write_chunk(chunk, tokens_CT[ctx0:ctx1], acts, {"doc": ctx1, "offset": 0})
    return path.url
