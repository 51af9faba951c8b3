"""Storage dtypes and compression codecs, named by short strings in the config and the cache attrs.

Every chunk ends with a crc32c checksum, so a corrupt chunk fails loudly on read instead of training
an SAE on flipped bits. The default codec is chosen by benchmarks/harvest.py (see the README).
"""

import numpy as np
import torch
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from sae.config import check_choice
from sae.errors import UserError

# bfloat16 has no numpy dtype: its bits are stored as uint16 and viewed back as bfloat16 on read.
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ZARR_DTYPES = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}
_SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")

CODEC_HELP = "none | zstd:LEVEL | blosc-zstd:LEVEL[:shuffle|bitshuffle] | blosc-lz4:LEVEL[:shuffle|bitshuffle]"


def zarr_dtype(storage_dtype: str) -> str:
    check_choice("storage dtype", storage_dtype, STORAGE_DTYPES)
    return _ZARR_DTYPES[storage_dtype]


def to_storage(acts: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """A CPU tensor in the storage dtype as the numpy array zarr writes."""
    acts = acts.to(STORAGE_DTYPES[storage_dtype])
    return acts.view(torch.uint16).numpy() if storage_dtype == "bfloat16" else acts.numpy()


def from_storage(stored: np.ndarray, storage_dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(stored))
    return tensor.view(torch.bfloat16) if storage_dtype == "bfloat16" else tensor


def compressors(codec: str) -> list:
    """The zarr bytes-to-bytes codec chain for a codec name, checksum last."""
    name, *params = codec.split(":")
    try:
        if name == "none" and not params:
            chain = []
        elif name == "zstd" and len(params) == 1:
            chain = [ZstdCodec(level=int(params[0]))]
        elif name in ("blosc-zstd", "blosc-lz4") and len(params) in (1, 2):
            shuffle = params[1] if len(params) == 2 else "noshuffle"
            if shuffle not in _SHUFFLES:
                raise ValueError(shuffle)
            chain = [BloscCodec(cname=name.split("-")[1], clevel=int(params[0]), shuffle=shuffle)]
        else:
            raise ValueError(codec)
    except ValueError:
        raise UserError(f"unknown codec '{codec}'; use {CODEC_HELP}") from None
    return [*chain, Crc32cCodec()]
