"""The streaming pass of `sae inspect`: one read of the rows, every latent at once, in memory that
depends on the number of latents and what is kept of each, never on the number of rows.

Per batch of whole contexts: encode as deployed (gated rows have no latents; BatchTopK through its
saved θ), take the active entries (one compare with θ and one nonzero()) and fold them into
per-latent state:

    count_M, sum_M, max_M       exact firing count, sum and maximum of the activations
    top     KeepBest [m, top]   the largest activations (ties: the earlier row)
    sample  KeepBest [m, S]     the entries with the S smallest i.i.d. uniform keys: an exact uniform
                                sample without replacement of the latent's nonzero activations

Each kept entry carries the latent's activations on a window of tokens around it (within its
context), so the page can shade them. Only entries that beat a latent's current worst kept entry
reach the merge: after the first batches that is a few per batch, and the pass costs the encode
plus one nonzero() over [B, m].
"""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from sae.cache.codecs import StoredRows, decode_rows
from sae.cache.store import Cache
from sae.inspect.config import InspectConfig
from sae.progress import make_progress
from sae.train.sae import SparseAutoencoder
from sae.train.sparse import nonzero_rare


class Kept(NamedTuple):
    """What a KeepBest holds, on the CPU; a latent's entries best first, empty slots last with row −1."""

    value_MK: np.ndarray
    row_MK: np.ndarray
    """Cache row: context × ctx_len + position."""
    window_MPW: np.ndarray
    """For the first P slots: the latent's activations at offsets −window_before … +window_after of
    the row (0 outside its context)."""


class ScanResult(NamedTuple):
    rows: int
    """Rows read (the density's denominator: gated rows count, as rows where no latent is active)."""
    rows_gated: int
    count_M: np.ndarray
    sum_M: np.ndarray
    max_M: np.ndarray
    top: Kept
    sample: Kept


EMPTY = 2**31 - 1  # the cost of an empty slot: above every entry's
# Gathers and scatters go through index_select / masked_select / index_copy_: on CPU they run 10-15×
# faster than advanced indexing (`a[idx]`, `a[mask]`), which dominated the pass when it was written so.
QUEUE = 2  # a merge when the queue holds QUEUE × (the table's size) entries: a merge costs a sort of both


def value_cost(values: Tensor) -> Tensor:
    """int64 costs, lower for larger activations: a positive float32's bit pattern rises with it."""
    return EMPTY - values.float().view(torch.int32).long()


def key_cost(keys: Tensor) -> Tensor:
    """int64 costs of uniform keys in [0, 1): the bit pattern, lower for smaller keys."""
    return keys.float().view(torch.int32).long()


class KeepBest:
    """Per latent, the k offered entries of lowest cost so far, best first (ties: the one offered
    earlier), with their activation and row, and the windows of the first `windowed` of them. Costs
    are int64 below EMPTY (value_cost, key_cost).

    Offers are filtered against each latent's k-th best as of the last merge and queued; the queue is
    merged (one sort) when it holds QUEUE times the table's m·k entries, and by result(). A stale bar lets more entries
    through, never fewer: an entry that ends among the k best beats every earlier k-th best. An
    entry's rank only falls as better ones arrive, so one that ends in a windowed slot beat the
    windowed-th best when it was offered: only those need a window (window_passes)."""

    def __init__(self, m: int, k: int, windowed: int, window: int, device: torch.device):
        self.k, self.windowed, self.queue = k, windowed, QUEUE * m * k
        self.cost_MK = torch.full((m, k), EMPTY, dtype=torch.long, device=device)
        self.value_MK = torch.zeros((m, k), device=device)
        self.row_MK = torch.full((m, k), -1, dtype=torch.long, device=device)
        # bfloat16: half the memory of float32 with its range (raw-unit activations of massive-norm rows
        # overflow float16); the example's own activation is kept exactly in value_MK.
        self.window_MPW = torch.zeros((m, windowed, window), dtype=torch.bfloat16, device=device)
        self.pending: list[tuple[Tensor, ...]] = []
        self.n_pending = self.n_windows = 0

    def passes(self, cols_N: Tensor, costs_N: Tensor) -> Tensor:
        """[N] bool: the entries that beat their latent's k-th best as of the last merge."""
        return costs_N < self.cost_MK[:, -1].contiguous().index_select(0, cols_N)

    def window_passes(self, cols_N: Tensor, costs_N: Tensor) -> Tensor:
        """[N] bool: the entries that may end in a windowed slot."""
        return costs_N < self.cost_MK[:, self.windowed - 1].contiguous().index_select(0, cols_N)

    def add(self, cols_n: Tensor, costs_n: Tensor, values_n: Tensor, rows_n: Tensor, windows_wW: Tensor,
            has_window_n: Tensor) -> None:  # fmt: skip
        """Queue entries that passed, in the order they were met, with the windows of those that have one."""
        if len(cols_n):
            window_at_n = torch.where(has_window_n, has_window_n.long().cumsum(0) - 1 + self.n_windows, -1)
            self.pending.append((cols_n, costs_n, values_n, rows_n, window_at_n, windows_wW.to(torch.bfloat16)))
            self.n_pending, self.n_windows = self.n_pending + len(cols_n), self.n_windows + len(windows_wW)
        if self.n_pending >= self.queue:
            self.merge()

    def merge(self) -> None:
        if not self.pending:
            return
        cols_n, costs_n, values_n, rows_n, window_at_n, windows_wW = (
            torch.cat(parts) for parts in zip(*self.pending, strict=True)
        )
        self.pending, self.n_pending, self.n_windows = [], 0, 0
        touched_T = cols_n.unique()
        # The touched latents' kept entries go first: the stable sort keeps them ahead of equal newcomers.
        all_cols = torch.cat([touched_T.repeat_interleave(self.k), cols_n])
        all_costs = torch.cat([self.cost_MK.index_select(0, touched_T).flatten(), costs_n])
        # One sort by (latent, cost) as a float64 key, exact below 2^53 (m < 2^22); torch's CPU sort
        # runs float64 far faster than int64 (see train.sparse.sum_by_column).
        order = (all_cols.double() * 2**31 + all_costs.double()).sort(stable=True).indices
        sorted_cols = all_cols.index_select(0, order)
        position = torch.arange(len(order), device=order.device)
        starts = torch.ones_like(sorted_cols, dtype=torch.bool)
        starts[1:] = sorted_cols[1:] != sorted_cols[:-1]
        rank = position - torch.where(starts, position, 0).cummax(0).values
        keep = rank < self.k  # every touched latent has exactly k entries here: all its slots are rewritten
        src, col, slot = order.masked_select(keep), sorted_cols.masked_select(keep), rank.masked_select(keep)
        # Payloads are gathered only for the kept entries: from the old table or from the queue.
        n_old = len(touched_T) * self.k
        from_old = src < n_old
        old = src.clamp(max=n_old - 1)
        old_at = touched_T.index_select(0, old // self.k) * self.k + old % self.k  # flat [m·k] slots
        new = (src - n_old).clamp(min=0)
        at = col * self.k + slot
        for table, queued in ((self.value_MK, values_n), (self.row_MK, rows_n)):
            flat = table.view(-1)
            flat.index_copy_(0, at, torch.where(from_old, flat.index_select(0, old_at), queued.index_select(0, new)))
        w = (slot < self.windowed).nonzero().squeeze(1)  # an old entry in a windowed slot was in one before
        blank = windows_wW.new_zeros(1, windows_wW.shape[1])
        windows_wW = torch.cat([windows_wW, blank])  # window_at −1 (no window) reads this blank row
        window_at = window_at_n.index_select(0, new.index_select(0, w)).remainder(len(windows_wW))
        old_col_w = old_at.index_select(0, w) // self.k
        old_slot_w = (old_at.index_select(0, w) % self.k).clamp(max=self.windowed - 1)
        windows_flat = self.window_MPW.view(-1, self.window_MPW.shape[2])
        old_windows = windows_flat.index_select(0, old_col_w * self.windowed + old_slot_w)
        chosen = torch.where(from_old.index_select(0, w)[:, None], old_windows, windows_wW.index_select(0, window_at))
        windows_flat.index_copy_(0, col.index_select(0, w) * self.windowed + slot.index_select(0, w), chosen)
        self.cost_MK.view(-1).index_copy_(0, at, all_costs.index_select(0, src))

    def result(self) -> Kept:
        self.merge()
        return Kept(self.value_MK.cpu().numpy(), self.row_MK.cpu().numpy(), self.window_MPW.float().cpu().numpy())


class Scanner:
    """The per-latent state of the pass; update() folds in one batch of whole contexts."""

    def __init__(self, sae: SparseAutoencoder, cfg: InspectConfig, ctx_len: int, device: torch.device):
        self.sae, self.ctx_len, self.device = sae, ctx_len, device
        m = sae.m
        self.count_M = torch.zeros(m, dtype=torch.long, device=device)
        self.sum_M = torch.zeros(m, dtype=torch.float64, device=device)
        self.max_M = torch.zeros(m, device=device)
        self.rows, self.rows_gated = 0, torch.zeros((), dtype=torch.long, device=device)
        self.top = KeepBest(m, cfg.top, cfg.top, cfg.window, device)
        # the first quantile_pool slots of the sample (smallest keys) are themselves a uniform sample
        self.sample = KeepBest(m, cfg.sample_size, cfg.quantile_pool, cfg.window, device)
        self.offsets_W = torch.arange(-cfg.window_before, cfg.window_after + 1, device=device)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        # Every batch reuses these: a fresh [B, m] per batch costs its page faults on CPU (the affine
        # map's ~11 ms of a ~80 ms encode at B 4,096, m 2,304).
        self.z_buffer = torch.empty((0, m), device=device)
        self.active_buffer = torch.empty((0, m), dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, acts_RD: Tensor, tokens_R: Tensor, row0: int) -> None:
        """acts_RD: raw rows of whole contexts (decoded, any float dtype and device); row0: the first one's cache row."""
        x_RD = acts_RD.to(self.device, non_blocking=True).float()
        R = len(x_RD)
        positions_R = torch.arange(R, device=self.device) % self.ctx_len
        if len(self.z_buffer) < R:
            self.z_buffer, self.active_buffer = (
                self.z_buffer.new_empty(R, self.sae.m),
                self.active_buffer.new_empty(R, self.sae.m),
            )
        z_RM, theta_M = self.sae.scores(x_RD, out=self.z_buffer[:R])
        if not self.sae.gate.empty:  # gated rows are passed through: no latent is active on them
            gated_R = self.sae.gate.gated(x_RD, tokens_R, positions_R)
            z_RM.masked_fill_(gated_R[:, None], 0)  # 0 is not above any θ
            self.rows_gated += gated_R.sum()
        self.rows += R
        z_flat = z_RM.view(-1)
        active_RM = torch.gt(z_RM, theta_M, out=self.active_buffer[:R])
        flat_N = nonzero_rare(active_RM.view(-1))  # row-major: in row order
        local_N, cols_N = flat_N // self.sae.m, flat_N % self.sae.m
        values_N = z_flat.index_select(0, flat_N)
        self.count_M += torch.bincount(cols_N, minlength=self.sae.m)
        self.sum_M.index_add_(0, cols_N, values_N.double())
        self.max_M.scatter_reduce_(0, cols_N, values_N, "amax")

        keys_N = torch.rand(len(cols_N), generator=self.generator, device=self.device)
        top_cost_N, sample_cost_N = value_cost(values_N), key_cost(keys_N)
        top_N, sample_N = self.top.passes(cols_N, top_cost_N), self.sample.passes(cols_N, sample_cost_N)
        sample_window_N = self.sample.window_passes(cols_N, sample_cost_N)  # ⊆ sample_N
        # Windows once for the entries that need one: [w, W], this latent's activations around each.
        window_w = (top_N | sample_window_N).nonzero().squeeze(1)
        rows_w, cols_w = local_N.index_select(0, window_w), cols_N.index_select(0, window_w)
        at_wW = rows_w[:, None] + self.offsets_W
        pos_wW = positions_R.index_select(0, rows_w)[:, None] + self.offsets_W
        inside_wW = (pos_wW >= 0) & (pos_wW < self.ctx_len)  # whole contexts: inside means in this batch
        at_flat = (at_wW.clamp(0, R - 1) * self.sae.m + cols_w[:, None]).view(-1)
        z_wW = z_flat.index_select(0, at_flat).view(at_wW.shape)
        windows_wW = torch.where(inside_wW & (z_wW > theta_M.index_select(0, cols_w)[:, None]), z_wW, 0.0)
        rows_N = local_N + row0
        for keeper, passed_N, cost_N, windowed_N in (
            (self.top, top_N, top_cost_N, top_N),
            (self.sample, sample_N, sample_cost_N, sample_window_N),
        ):
            take_n = passed_N.nonzero().squeeze(1)
            with_window_w = windowed_N.index_select(0, window_w).nonzero().squeeze(1)
            keeper.add(
                *(t.index_select(0, take_n) for t in (cols_N, cost_N, values_N, rows_N)),
                windows_wW.index_select(0, with_window_w), windowed_N.index_select(0, take_n),
            )  # fmt: skip

    def result(self) -> ScanResult:
        return ScanResult(
            self.rows, int(self.rows_gated), self.count_M.cpu().numpy(), self.sum_M.cpu().numpy(),
            self.max_M.cpu().numpy(), self.top.result(), self.sample.result(),
        )  # fmt: skip


def plan_rows(cache: Cache, heldout_chunks: list[int], tokens: int | None) -> list[tuple[int, int]]:
    """(chunk, contexts read from its start) for each chunk of the pass."""
    if tokens is None:
        return [(chunk, cache.contexts_in_chunk(chunk)) for chunk in heldout_chunks]
    n_contexts = tokens // cache.ctx_len
    plan = []
    for chunk in range(cache.n_chunks):
        take = min(cache.contexts_in_chunk(chunk), n_contexts - chunk * cache.chunk_contexts)
        if take <= 0:
            break
        plan.append((chunk, take))
    return plan


def read_batches(cache: Cache, layer: int, plan: list[tuple[int, int]], batch_contexts: int) -> Iterator[tuple[int, StoredRows, Tensor]]:  # fmt: skip
    """(first cache row, rows as stored [R, d], token ids [R]) per batch of whole contexts; the next
    chunk is read and decompressed in a thread while this one is encoded (the caller decodes)."""
    T = cache.ctx_len

    def load(chunk: int, contexts: int) -> tuple[StoredRows, Tensor]:
        stored = cache.read_stored(layer, chunk).take(slice(0, contexts * T))
        return stored, torch.from_numpy(cache.read_tokens(chunk)[:contexts].reshape(-1))

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, *plan[0]) if plan else None
        for i, (chunk, _) in enumerate(plan):
            stored, tokens_R = pending.result()
            pending = pool.submit(load, *plan[i + 1]) if i + 1 < len(plan) else None
            for start in range(0, len(tokens_R), batch_contexts * T):
                rows = slice(start, start + batch_contexts * T)
                yield chunk * cache.chunk_rows + start, stored.take(rows), tokens_R[rows]


def scan(sae: SparseAutoencoder, cache: Cache, layer: int, plan: list[tuple[int, int]], cfg: InspectConfig,
         device: torch.device) -> ScanResult:  # fmt: skip
    """The pass over the planned rows, with a progress bar."""
    scanner = Scanner(sae, cfg, cache.ctx_len, device)
    batch_contexts = max(1, cfg.batch_rows // cache.ctx_len)
    dim_scale_D = cache.dim_scale(layer, device)
    total = sum(contexts for _, contexts in plan) * cache.ctx_len
    with make_progress("rows") as progress:
        task = progress.add_task(f"inspect {sae.m:,} latents", total=total, status="")
        for row0, stored, tokens_R in read_batches(cache, layer, plan, batch_contexts):
            scanner.update(decode_rows(stored.to(device), dim_scale_D), tokens_R, row0)
            progress.advance(task, len(tokens_R))
    return scanner.result()
