"""The gate: rows an SAE leaves alone, out of training and passed through unchanged at inference.

Residual streams have rows of massive norm: the BOS token and each context's first position (≈ 7×
the median norm in SmolLM2; GPT-2's first position too), and a few more tokens in Llama-family
models. They are attention sinks, not features, and an SAE that spends its latents on them
reconstructs the ordinary rows worse. A gate names such rows by token (BOS), by position (first) and
by norm (above `norm_ratio` × the median row norm of the cache, in raw units); it is saved with the
SAE (cfg.json `metadata.gate`), so training, `sae eval`, `sae calibrate`, `sae inspect` and
`reconstruct()` all treat the same rows the same way.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae.cache.codecs import StoredRows, decode_rows
from sae.cache.store import Cache

NORM_SAMPLE_CHUNKS = 4  # ≈ 65k rows at the default chunk size: the median to well under 1%


@dataclass(frozen=True)
class Gate:
    bos_token_id: int | None = None
    """Rows of this token are gated (BOS); None: no token is."""
    first: bool = False
    """The first position of every context is gated."""
    norm_ratio: float | None = None
    """Rows with ‖x‖ > norm_ratio × median_norm are gated; None: no norm gate."""
    median_norm: float | None = None
    """Median raw row norm of the cache, from a sample of NORM_SAMPLE_CHUNKS chunks."""

    @property
    def max_norm(self) -> float | None:
        """The norm gate in raw activation units."""
        return None if self.norm_ratio is None else self.norm_ratio * self.median_norm

    @property
    def empty(self) -> bool:
        return self.bos_token_id is None and not self.first and self.norm_ratio is None

    def gated(self, x_RD: Tensor, tokens_R: Tensor | None = None, positions_R: Tensor | None = None) -> Tensor:
        """[R] bool on x's device: the rows this gate leaves alone. Raw activations; token ids and
        positions in their contexts are needed only by a BOS or first-position gate."""
        gated_R = torch.zeros(len(x_RD), dtype=torch.bool, device=x_RD.device)
        if self.bos_token_id is not None:
            if tokens_R is None:
                raise ValueError("this SAE gates BOS rows: pass the rows' token ids (tokens_R)")
            gated_R |= tokens_R.to(x_RD.device) == self.bos_token_id
        if self.first:
            if positions_R is None:
                raise ValueError("this SAE gates first-position rows: pass the rows' positions (positions_R)")
            gated_R |= positions_R.to(x_RD.device) == 0
        if self.norm_ratio is not None:
            gated_R |= x_RD.float().norm(dim=1) > self.max_norm
        return gated_R

    def union(self, other: "Gate") -> "Gate":
        """Rows either gate leaves alone (an evaluation-time gate added to an SAE's own)."""
        if self.bos_token_id is not None and other.bos_token_id not in (None, self.bos_token_id):
            raise ValueError(f"gates on two BOS tokens: {self.bos_token_id} and {other.bos_token_id}")
        ratios = [g for g in (self, other) if g.norm_ratio is not None]
        tighter = min(ratios, key=lambda g: g.max_norm) if ratios else Gate()
        return Gate(
            self.bos_token_id if self.bos_token_id is not None else other.bos_token_id,
            self.first or other.first,
            tighter.norm_ratio,
            tighter.median_norm,
        )

    def record(self) -> dict[str, Any]:
        """The gate as cfg.json stores it (with max_norm, for readers of the file)."""
        return {**dataclasses.asdict(self), "max_norm": self.max_norm}

    @staticmethod
    def from_record(record: dict[str, Any] | None) -> "Gate":
        fields = {f.name for f in dataclasses.fields(Gate)}
        return Gate(**{k: v for k, v in (record or {}).items() if k in fields})


def chunk_rows(cache: Cache, chunk: int) -> tuple[Tensor, Tensor]:
    """([R] token ids, [R] positions) of a chunk's rows, in row order."""
    tokens_CT = torch.from_numpy(cache.read_tokens(chunk))
    positions_CT = torch.arange(cache.ctx_len).expand_as(tokens_CT)
    return tokens_CT.reshape(-1), positions_CT.reshape(-1)


def sample_chunks(cache: Cache, chunks: list[int]) -> list[int]:
    """NORM_SAMPLE_CHUNKS chunks spread evenly over `chunks` (all of them if there are fewer)."""
    picks = np.linspace(0, len(chunks) - 1, min(NORM_SAMPLE_CHUNKS, len(chunks))).round().astype(int)
    return [chunks[i] for i in sorted(set(picks.tolist()))]


def build_gate(cache: Cache, layer: int, bos: bool, first: bool, norm_ratio: float | None,
               chunks: list[int] | None = None) -> Gate:  # fmt: skip
    """A gate over this cache's rows; the norm gate's median comes from a sample of `chunks` (default:
    every committed chunk)."""
    median_norm = None
    norm_ratio = norm_ratio or None  # 0: no norm gate
    if norm_ratio is not None:
        chunks = range(cache.n_chunks) if chunks is None else chunks
        norms = [cache.read_acts(layer, c).float().norm(dim=1) for c in sample_chunks(cache, chunks)]
        median_norm = float(torch.cat(norms).median())
    return Gate(cache.spec["bos_token_id"] if bos else None, first, norm_ratio, median_norm)


def kept_rows(cache: Cache, layer: int, chunk: int, gate: Gate, decode: bool = True) -> StoredRows:
    """A chunk's ungated rows [R', d], in row order: decoded to floats (float16 as stored, int8 to
    float32), or as stored (int8 and its scales: half the bytes of float16 to move to a GPU, decoded there)."""
    stored = cache.read_stored(layer, chunk)
    acts_RD = decode_rows(stored, cache.dim_scale(layer)) if decode or not gate.empty else None
    if not gate.empty:
        kept_R = ~gate.gated(acts_RD, *chunk_rows(cache, chunk))
        acts_RD, stored = acts_RD[kept_R], stored.take(kept_R)
    return StoredRows(acts_RD, None) if decode else stored


def sample_kept_rows(cache: Cache, layer: int, chunks: list[int], gate: Gate) -> tuple[Tensor, float]:
    """(the ungated rows of a sample of `chunks` [R', D] float32, the gated fraction of the sample)."""
    kept, total = [], 0
    for chunk in sample_chunks(cache, chunks):
        kept.append(kept_rows(cache, layer, chunk, gate).values_RD.float())
        total += cache.contexts_in_chunk(chunk) * cache.ctx_len
    rows_RD = torch.cat(kept)
    return rows_RD, 1 - len(rows_RD) / total
