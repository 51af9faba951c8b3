"""The kept entries of (Batch)TopK: which they are, and the decode and gradients that touch only them.

Selection: select_topk (per row), select_batchtopk (paper eq. 6: the B·k largest of the whole batch
matrix, one tie rule on every path), select_dead (AuxK's dead latents). Sparse kernels: decode_sparse
(Σ over the kept rows of W_dec, embedding_bag) and KeptEncoderGrad (the encoder's gradient at the kept
entries only, as sparsify's fused encoder): B·k·d work instead of B·m·d. Beside each fast path is the
plain one it must equal (decode_dense, select_batchtopk_plain); tests/test_select.py and
tests/test_sae_arch.py check them, gradients included.
"""

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.device import one_cpu_thread


class Active(NamedTuple):
    """The latents kept by (Batch)TopK as a row-sorted sparse list of N entries."""

    rows_N: Tensor
    cols_N: Tensor
    acts_N: Tensor
    """Kept activations; carries the gradient back to the encoder."""
    offsets_B: Tensor
    """Start of each row's entries in the lists (embedding_bag's offsets)."""
    by_column: "ColumnOrder | None" = None
    """The entries grouped by column (column_order), made once for both weight gradients; None: made
    where a gradient needs it."""


class ColumnOrder(NamedTuple):
    """An order of the kept entries that groups them by column: W_dec's and W_enc's gradients are sums
    over each column's entries (sum_by_column), and both group the same columns."""

    perm_N: Tensor
    starts_M: Tensor
    """Where each column's entries start in perm_N's order."""


def column_order(cols_N: Tensor, M: int) -> ColumnOrder:
    """The entries grouped by column by one int32 sort, on one thread on the CPU (sae.device). Before:
    a float64 sort in each of the two gradients (7 ms at B·k 131k, 40 ms p90 on busy cores); int64
    indices, as embedding_bag's own backward sorts them, ran a two-thread radix sort that took
    170 ms on busy cores."""
    with one_cpu_thread(not cols_N.is_cuda):
        cols_sorted_N, perm_N = cols_N.to(torch.int32).sort()
        starts_M = torch.searchsorted(cols_sorted_N, torch.arange(M, device=cols_N.device, dtype=torch.int32))
    return ColumnOrder(perm_N, starts_M)


# Selection (TopK's and BatchTopK's): "auto" takes the threshold paths on CPU and the plain top-k on CUDA;
# "plain" or "threshold" forces one everywhere (the parity tests' switch, and a way back).
SELECT_PATH = os.environ.get("SAE_SELECT", "auto")


def _threshold_path(pre_BM: Tensor) -> bool:
    """Whether selection takes a threshold path (select_batchtopk_threshold, topk_rows_threshold)."""
    return SELECT_PATH == "threshold" or (SELECT_PATH == "auto" and not pre_BM.is_cuda)


def select_topk(pre_BM: Tensor, k: int) -> Active:
    """The k largest entries of each row, in row order (within a row, in no set order; among values tied
    at a row's k-th largest, any). On the CPU from the survivors of a per-row threshold
    (topk_rows_threshold), elsewhere, or where that path does not pay, by torch's top-k (the plain path)."""
    B, M = pre_BM.shape
    rows_N = torch.arange(B, device=pre_BM.device).repeat_interleave(k)
    offsets_B = torch.arange(0, B * k, k, device=pre_BM.device)
    if k == M:  # every entry (AuxK over the dead columns when no more than k are dead): no top-k
        return Active(rows_N, torch.arange(M, device=pre_BM.device).repeat(B), pre_BM.flatten(), offsets_B)
    kept = topk_rows_threshold(pre_BM, k) if _threshold_path(pre_BM) else None
    if kept is None:
        top = pre_BM.topk(k, dim=1, sorted=False)
        kept = top.indices.flatten(), top.values.flatten()
    return Active(rows_N, *kept, offsets_B)


def topk_rows_threshold(pre_BM: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """(columns, values) of each row's k largest entries, [B·k] each, row by row; None where this path
    does not pay. A row's threshold t_b is the k-th largest of its maxima over max(2k, 32) disjoint
    groups of columns: those k maxima reach it, so t_b is at most the row's k-th largest value and all k largest
    survive `≥ t_b`, with few others (43 a row on average at m 2,304, k 32). A top-k over the survivors,
    each row's padded to the most any row has, then keeps k largest of the row: 17.3 -> 9.8 ms at
    B 4,096, m 2,304 (torch's CPU top-k of a row keeps a heap, ~4 ns an entry a thread). The passes
    over [B, m] run on all threads, the rest on one: beside a competing job, with every op on both
    threads, the path's median was 1.6x the plain top-k's (60 vs 38 ms); this way 29.5. CPU only, as
    it reads the survivor counts on the host. None: groups of one column, fewer than k survivors in a
    row (a NaN), or a row with more than m/4 (ties at t_b): the plain top-k serves those."""
    B, M = pre_BM.shape
    n_groups = max(2 * k, 32)  # a max over rows of fewer than 32 floats ran 15x slower (24 ms at B 4,096, m 4,608)
    group_size = M // n_groups
    if group_size < 2:
        return None
    z_BM = pre_BM.detach()
    # group j: the columns ≡ j mod n_groups (past the last whole group, none): the max is elementwise over rows
    max_BG = z_BM[:, : group_size * n_groups].view(B, group_size, n_groups).amax(1)
    with one_cpu_thread(not z_BM.is_cuda):
        t_B = max_BG.topk(k, dim=1, sorted=False).values.amin(1)
    cand_C = nonzero_rare((z_BM >= t_B[:, None]).flatten())  # row-major: each row's survivors together
    with one_cpu_thread(not z_BM.is_cuda):
        rows_C = cand_C // M
        counts_B = torch.bincount(rows_C, minlength=B)
        width = int(counts_B.max())
        if int(counts_B.min()) < k or width * 4 > M:
            return None
        starts_B = counts_B.cumsum(0) - counts_B
        cand_values_C = pre_BM.flatten().index_select(0, cand_C)  # with pre_BM's gradient, if it has one
        slot_C = rows_C * width + torch.arange(len(cand_C), device=cand_C.device) - starts_B.index_select(0, rows_C)
        padded_BW = z_BM.new_full((B * width,), -math.inf).index_copy_(0, slot_C, cand_values_C.detach())
        at_BK = padded_BW.view(B, width).topk(k, dim=1, sorted=False).indices  # never a pad: each row has >= k
        kept_N = (starts_B[:, None] + at_BK).flatten()
        return cand_C.index_select(0, kept_N) % M, cand_values_C.index_select(0, kept_N)


def select_dead(pre_BM: Tensor, dead_M: Tensor, aux_k: int) -> Active:
    """AuxK's selection: in each row the aux_k largest pre-activations of dead latents. On CPU a top-k
    over the dead columns only (most often all of them: the trainer sizes aux_k to the dead count);
    on CUDA, where gathering them would read their count on the host, over every column with the
    live ones zeroed (the reference: the entries beyond the dead ones it keeps are 0 and add nothing)."""
    if pre_BM.is_cuda:
        return select_topk(pre_BM * dead_M, min(aux_k, pre_BM.shape[1]))
    dead_J = dead_M.nonzero().squeeze(1)
    if len(dead_J) == 0:  # nothing to select (AuxK then adds 0)
        zeros_B = torch.zeros(len(pre_BM), dtype=torch.long, device=pre_BM.device)
        return Active(dead_J, dead_J, pre_BM.flatten()[:0], zeros_B)
    active = select_topk(pre_BM.index_select(1, dead_J), min(aux_k, len(dead_J)))
    return active._replace(cols_N=dead_J[active.cols_N])


SELECT_SAMPLE = 1 << 15
"""Entries in the threshold path's strided sample of the batch matrix: 2¹⁵ the fastest of 2¹⁴-2¹⁷ at both
demo shapes (2.9 against 3.5 ms at 2¹⁷ at the study's; more survivors, fewer misses in a [B, m] past the cache)."""


def select_batchtopk(pre_BM: Tensor, k: int) -> Active:
    """The B·k largest entries of the whole batch matrix (paper eq. 6), in row-major order.

    Exactly the entries of select_batchtopk_plain (the reference): everything above the B·k-th
    largest value v, then the entries equal to v with the lowest flat index (row·m + col) until B·k
    are kept. Entries tied at 0, kept when fewer than B·k are positive, follow the same rule and
    change nothing: their activation is 0, and so is their gradient through the ReLU."""
    if _threshold_path(pre_BM):
        return select_batchtopk_threshold(pre_BM, k)
    return select_batchtopk_plain(pre_BM, k)


def select_batchtopk_plain(pre_BM: Tensor, k: int) -> Active:
    """The reference: v from a top-k over all B·m entries; on CUDA a radix select, with no host sync."""
    B, M = pre_BM.shape
    flat_N = pre_BM.detach().flatten()
    v = flat_N.topk(B * k, sorted=False).values.min()
    # nonzero_static: exactly B·k kept by construction, a shape known ahead, so CUDA does not wait
    kept_N = _keep_first(flat_N, v, B * k).nonzero_static(size=B * k).squeeze(1)
    return _active(pre_BM, kept_N, pre_BM.flatten().index_select(0, kept_N))


def select_batchtopk_threshold(pre_BM: Tensor, k: int) -> Active:
    """The same entries from a top-k over only the survivors of a threshold t ≤ v read off a strided
    sample (t from a full top-k when too few survive: rare, and still exact). A top-k over all B·m
    values runs on one CPU thread (1.0 s at the paper's B 4096, m 12288); the compare and nonzero
    that find the survivors run on all threads. Reads t and the survivor count on the host: CPU only
    in "auto". Past the survivors it keeps to one-thread ops (top-k of one row) or cheap passes (a
    mask): on busy cores each multi-threaded op over ~B·k entries waited 10-30 ms for its second thread.
    The kept activations come from the survivors' values: a second gather from a [B, m] larger than
    the cache took 0.75 ms at the demo shape."""
    B, M = pre_BM.shape
    n = B * k
    flat_N = pre_BM.detach().flatten()
    t = _sample_threshold(flat_N, n, M)
    cand_N = nonzero_rare(flat_N >= t) if t > 0 else flat_N[:0]  # row-major: no sort needed
    if len(cand_N) < n:  # the sample overestimated v, or fewer than ~B·k entries are positive
        t = flat_N.topk(n, sorted=False).values.min()
        cand_N = nonzero_rare(flat_N >= t)
    cand_values_N = pre_BM.flatten().index_select(0, cand_N)  # with pre_BM's gradient, if it has one
    if len(cand_N) == n:
        return _active(pre_BM, cand_N, cand_values_N)
    # the C − n + 1 smallest survivors rather than the n + 1 largest (C ≈ 1.3·n: 1.3 against 2.0 ms
    # at the demo shape): the n-th largest is their largest, the (n+1)-th their second
    low = cand_values_N.detach().topk(len(cand_N) - n + 1, largest=False, sorted=False)
    (v, w), (v_at, _) = low.values.topk(2)
    if w < v:  # the top n: all but the C − n smallest, back in flat order by a mask (no sort)
        kept_C = torch.ones(len(cand_N), dtype=torch.bool, device=cand_N.device)
        kept_C[low.indices] = False
        kept_C[low.indices[v_at]] = True
    else:  # a tie across the boundary: the tie rule decides
        kept_C = _keep_first(cand_values_N.detach(), v, n)
    return _active(pre_BM, cand_N.masked_select(kept_C), cand_values_N.masked_select(kept_C))


def _sample_threshold(flat_N: Tensor, n: int, M: int) -> float:
    """A value that about n·(1 + 6/√e) entries of flat_N reach, e = the sample's expected count above
    the n-th largest: six standard deviations of a binomial count, so too few survive almost never."""
    N = flat_N.numel()
    stride = max(1, N // SELECT_SAMPLE)
    while math.gcd(stride, M) > 1:  # coprime with m: the sample visits every column, not the same few in each row
        stride += 1
    sample_N = flat_N[stride // 2 :: stride]
    expected = len(sample_N) * n / N
    j = min(len(sample_N), math.ceil(expected + 6 * math.sqrt(expected) + 16))
    return float(sample_N.topk(j, sorted=False).values.min())


def nonzero_rare(mask_N: Tensor) -> Tensor:
    """The positions of the True entries of a contiguous [N] bool mask, ascending, as nonzero() gives
    them, for a mask that is mostly False (the candidates above a threshold: about 1.2·k/m of B·m).
    nonzero's loop visits every byte, twice (1.9 ms at the study's 4.7M); here it visits the mask's
    8-byte words, then the bytes of the words that hold a True: 0.7 ms at 0.8% True. Past a quarter of
    the words hit, the second visit costs more than it saves, and the plain nonzero runs instead; on
    CUDA (each nonzero a host sync) and for a mask not aligned to 8 bytes, it always does."""
    if mask_N.is_cuda or mask_N.storage_offset() % 8:
        return mask_N.nonzero().squeeze(1)
    N8 = len(mask_N) // 8 * 8
    hit_W = mask_N[:N8].view(torch.int64).nonzero().squeeze(1)
    if len(hit_W) > N8 // 32:
        return mask_N.nonzero().squeeze(1)
    at_H2 = mask_N[:N8].view(-1, 8).index_select(0, hit_W).nonzero()  # (word among the hits, byte)
    head_N = hit_W.index_select(0, at_H2[:, 0]) * 8 + at_H2[:, 1]
    if N8 == len(mask_N):
        return head_N
    return torch.cat([head_N, mask_N[N8:].nonzero().squeeze(1) + N8])


def _keep_first(values_N: Tensor, v: Tensor, n: int) -> Tensor:
    """[N] bool over values in flat order: all above v, then those equal to v, lowest position first,
    until n are kept (the tie rule, on every path)."""
    above_N = values_N > v
    tie_N = values_N == v
    count = torch.int32 if len(values_N) < 2**31 else torch.int64  # int32: half the bytes of a scan over B·m
    ties_so_far_N = tie_N.to(count).cumsum(0, dtype=count)
    # count_nonzero, not sum: torch 2.13's CPU sum of a bool tensor took 300 ms for 50M entries, this 10 ms
    return above_N | (tie_N & (ties_so_far_N <= n - above_N.count_nonzero()))


def _active(pre_BM: Tensor, kept_N: Tensor, acts_N: Tensor) -> Active:
    """Active from kept flat indices in row-major order and their values (from pre_BM, with its gradient)."""
    B, M = pre_BM.shape
    rows_N = kept_N // M
    if pre_BM.is_cuda:  # bincount would read its max on the host
        offsets_B = torch.searchsorted(kept_N, torch.arange(0, B * M, M, device=pre_BM.device))
    else:  # one thread, where searchsorted's threads wait on busy cores
        counts_B = torch.bincount(rows_N, minlength=B)
        offsets_B = counts_B.cumsum(0) - counts_B
    return Active(rows_N, kept_N % M, acts_N, offsets_B)


def decode_sparse(active: Active, W_dec_MD: Tensor, tangent: bool = False) -> Tensor:
    """Σ_j f_bj W_dec[j] over the kept entries only: B·k·d work instead of B·m·d. tangent: W_dec's rows
    are unit-norm and its gradient is wanted along the sphere's tangent, each row's component along
    itself removed (the trainer's projection, SparseAutoencoder.project_decoder_grad)."""
    args = active.acts_N, W_dec_MD, active.rows_N, active.cols_N, active.offsets_B
    return SparseDecode.apply(*args, active.by_column, tangent)


def sum_by_column(order: ColumnOrder, rows_N: Tensor, src_BD: Tensor, weights_N: Tensor) -> Tensor:
    """[M, D]: Σ_n weights_n · src[rows_n] over the entries n of each column, one embedding_bag over the
    entries in column order. rows_N is each call's own: Matryoshka's decode gathers its gradient by
    (row, group) bag, the encoder's by row."""
    return F.embedding_bag(rows_N[order.perm_N], src_BD, order.starts_M, mode="sum",
                           per_sample_weights=weights_N[order.perm_N])  # fmt: skip


class SparseDecode(torch.autograd.Function):
    """embedding_bag's decode; W_dec's gradient from sum_by_column (see column_order why not its own).
    On the tangent, each row's component along itself, ⟨∂W_dec[j], W_dec[j]⟩ = Σ over j's entries of
    f_n ∂f_n, comes from the entries' own gradients: no pass over [m, d] for it (the projection's dot
    product took 2-3 ms of a 50 ms step at m 4,608)."""

    @staticmethod
    def forward(ctx, acts_N: Tensor, W_dec_MD: Tensor, rows_N: Tensor, cols_N: Tensor, offsets_B: Tensor,
                by_column: ColumnOrder | None, tangent: bool) -> Tensor:  # fmt: skip
        ctx.save_for_backward(acts_N, W_dec_MD, rows_N, cols_N, offsets_B)
        ctx.by_column, ctx.tangent = by_column, tangent
        return F.embedding_bag(cols_N, W_dec_MD, offsets_B, mode="sum", per_sample_weights=acts_N)

    @staticmethod
    def backward(ctx, grad_BD: Tensor):
        acts_N, W_dec_MD, rows_N, cols_N, offsets_B = ctx.saved_tensors
        grad_acts_N = grad_W_dec_MD = None
        if ctx.needs_input_grad[0] or (ctx.needs_input_grad[1] and ctx.tangent):
            # ⟨∂x̂_b, W_dec[j]⟩: embedding_bag's own kernel for it, which needs each entry's bag (its row);
            # through autograd it would first redo the forward's B·k·d decode
            grad_acts_N = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_BD.contiguous(), W_dec_MD.detach(), cols_N, offsets_B, rows_N, 0
            )
        if ctx.needs_input_grad[1]:
            order = ctx.by_column or column_order(cols_N, W_dec_MD.shape[0])
            grad_W_dec_MD = sum_by_column(order, rows_N, grad_BD, acts_N.to(grad_BD.dtype))
            if ctx.tangent:
                along_N = acts_N.float() * grad_acts_N.float()
                along_M = torch.zeros(len(W_dec_MD), device=along_N.device).index_add_(0, cols_N, along_N)
                grad_W_dec_MD.addcmul_(along_M[:, None].to(grad_W_dec_MD.dtype), W_dec_MD, value=-1)
        grad_acts_N = grad_acts_N if ctx.needs_input_grad[0] else None
        return grad_acts_N, grad_W_dec_MD, None, None, None, None, None


def densify(active: Active, B: int, M: int) -> Tensor:
    """The kept entries as a dense [B, M] matrix (differentiable in acts_N)."""
    dense_BM = active.acts_N.new_zeros(B, M)
    return dense_BM.index_put((active.rows_N, active.cols_N), active.acts_N)


def decode_dense(active: Active, W_dec_MD: Tensor) -> Tensor:
    """The reference path: scatter to a dense [B, m] matrix and multiply; the parity test's baseline."""
    return densify(active, len(active.offsets_B), W_dec_MD.shape[0]) @ W_dec_MD


class KeptEncoderGrad(torch.autograd.Function):
    """The ReLU of acts_N, kept entries of the affine map computed without autograd, with the encoder's
    gradient over those entries only (as sparsify's fused encoder): B·k·d work in place of the dense
    backward's B·m·d matmul and its passes over [B, m] (ReLU, bias sums, the scatter into zeros). The
    selection ran on the affine map itself: it keeps the same positive entries as on its ReLU, and a
    non-positive entry kept in place of a 0 gives 0 and no gradient either way. For a kept (b, j) with
    pre_bj = ReLU(xc_b·W_enc[:, j] + b_enc[j]) > 0, xc_b = x_b − b_dec, and upstream gradient g:
    ∂W_enc[:, j] += g·xc_b, ∂b_enc[j] += g, ∂b_dec −= g·W_enc[:, j], ∂x_b += g·W_enc[:, j]."""

    @staticmethod
    def forward(ctx, acts_N: Tensor, x_BD: Tensor, xc_BD: Tensor, W_enc_MD: Tensor, b_enc_M: Tensor, b_dec_D: Tensor,
                rows_N: Tensor, cols_N: Tensor, offsets_B: Tensor, by_column: ColumnOrder) -> Tensor:  # fmt: skip
        relu_N = acts_N.clamp(min=0)
        ctx.save_for_backward(relu_N, xc_BD, W_enc_MD, rows_N, cols_N, offsets_B)
        ctx.by_column, ctx.x_dtype = by_column, x_BD.dtype
        return relu_N

    @staticmethod
    def backward(ctx, grad_N: Tensor):
        relu_N, xc_BD, W_enc_MD, rows_N, cols_N, offsets_B = ctx.saved_tensors
        M = W_enc_MD.shape[0]
        g_N = grad_N.float() * (relu_N > 0)  # ReLU's gradient: none through a kept 0
        grad_b_enc_M = torch.zeros(M, device=g_N.device).index_add_(0, cols_N, g_N)
        grad_x = grad_W_enc = grad_b_dec = None
        if ctx.needs_input_grad[3]:
            grad_W_enc = sum_by_column(ctx.by_column, rows_N, xc_BD.float(), g_N)  # [m, d], W_enc_MD's own layout
        if ctx.needs_input_grad[5]:
            grad_b_dec = -(grad_b_enc_M @ W_enc_MD.float())
        if ctx.needs_input_grad[1]:
            grad_x = F.embedding_bag(cols_N, W_enc_MD.float(), offsets_B, mode="sum", per_sample_weights=g_N)
            grad_x = grad_x.to(ctx.x_dtype)
        return None, grad_x, None, grad_W_enc, grad_b_enc_M, grad_b_dec, None, None, None, None
