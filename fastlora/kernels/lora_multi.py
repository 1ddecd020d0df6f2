"""Mixed-adapter batches: the per-row-adapter parts of the fused LoRA linear (``fastlora.lora_linear_multi``).

Row m uses adapter ``idx[m]`` (−1: the base alone) of a stack A (n, R, K), B (n, N, R), with its own rank,
scaling and dropout probability (tables of n entries on the device). A row block loops over the distinct
adapters it holds, ascending, each found with one min-reduction (``_next_adapter``): a block inside one
adapter's run takes one step, adapters absent from the block cost nothing, and each step's rank loop stops at
that adapter's rank, so lanes past it are never read.

- ``_lora_multi_shrink_kernel``: S = x̂·A_aᵀ per row (x̂ = x ⊙ m_a / (1 − p_a), the mask regenerated with
  the row's adapter's threshold), lanes past the rank zero.
- ``fwd_prologue_multi`` / ``bwd_prologue_multi``: the forward and dX GEMMs' accumulators start from
  Σ_a s_a·S[rows of a]·B_aᵀ and Σ_a (dS[rows of a]·A_a) ⊙ m_a / (1 − p_a) (kernels/lora_linear.py's pointer
  kernels, MULTI=True).
- ``_lora_multi_ds_kernel``: dS = s_a·G·B_a per row (fp32).
- ``_lora_multi_segment_kernel``: dB_a = s_a·Σ Gᵀ·S and dA_a = Σ dSᵀ·x̂ over the rows of adapter a, read
  through the grouping's device-side sort (rows ordered by adapter, offsets per adapter): one program per
  (column tile, adapter, lane tile) walks its adapter's rows, each row read once per column tile, no
  atomics (deterministic).

Shapes: x (M, K), idx (M,) int64, A (n, R, K), B (n, N, R), S (M, R), G (M, N), dS (M, R) fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastlora.kernels._launch import Tunable, cdiv, dot_precision, rank_block
from fastlora.kernels.dropout import keep, keep_threshold, seed_pointer

__all__ = ["AdapterTables", "adapter_tables", "lora_multi_shrink", "lora_multi_ds", "lora_multi_segment_sum",
           "sorted_rows", "no_multi", "fwd_prologue_multi", "bwd_prologue_multi"]  # fmt: skip

# Above any adapter index: "no adapter left" for _next_adapter.
_NONE_LEFT = tl.constexpr(1 << 30)


@triton.jit
def _next_adapter(idx, after):
    """The smallest adapter index in ``idx`` (BLOCK_M,) above ``after``, or _NONE_LEFT."""
    return tl.min(tl.where(idx > after, idx, _NONE_LEFT), axis=0)


@triton.jit
def _row_adapters(idx_ptr, rm, M):
    """The adapter of each row of the block (−1 past M), as int32."""
    return tl.load(idx_ptr + rm, mask=rm < M, other=-1).to(tl.int32)


@triton.jit
def _per_row(table_ptr, idx):
    """Each row's entry of a per-adapter table, (BLOCK_M, 1); base-only rows read adapter 0's (their terms
    are zero whatever it is)."""
    return tl.load(table_ptr + tl.maximum(idx, 0))[:, None]


# Each loop below accumulates every adapter of the block into one accumulator (the operand rows of other
# adapters load as zeros), and applies per-row factors (scaling, 1/(1 − p), the dropout mask with the row's
# threshold) once after it: a second (BLOCK_M × BLOCK_N) accumulator per adapter would spill the GEMMs' large
# tiles (600 bytes at 128 × 256 on sm_90).


@triton.jit
def _rank_terms(l_ptr, r_ptr, idx, rm, rc, C, stride_lm, stride_lr, stride_ra, stride_rr, stride_rc, rank_ptr,
                DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_C: tl.constexpr):  # fmt: skip
    """Σ over the block's adapters a of L[rows of a, :rank_a]·R_a[:rank_a, rc]: (BLOCK_M, BLOCK_C) fp32, with
    L (M, R) and R_a's element (r, c) at r_ptr + a·stride_ra + r·stride_rr + c·stride_rc."""
    rm64 = rm.to(tl.int64)
    rc64 = rc.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    a = _next_adapter(idx, -1)
    while a < _NONE_LEFT:
        rank = tl.load(rank_ptr + a)
        mine = (idx == a)[:, None]
        r_base = r_ptr + a.to(tl.int64) * stride_ra
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            lt = tl.load(l_ptr + rm64[:, None] * stride_lm + rr[None, :] * stride_lr,
                         mask=mine & (rr[None, :] < rank), other=0.0)  # fmt: skip
            rt = tl.load(r_base + rr[:, None] * stride_rr + rc64[None, :] * stride_rc,
                         mask=(rr[:, None] < rank) & (rc[None, :] < C), other=0.0)  # fmt: skip
            acc = tl.dot(lt.to(DTYPE), rt.to(DTYPE), acc, input_precision=DOT_PRECISION)
        a = _next_adapter(idx, a)
    return acc


@triton.jit
def fwd_prologue_multi(s_ptr, b_ptr, idx_ptr, rank_ptr, scale_ptr, rm, rn, M, N,
                       stride_sm, stride_sr, stride_ba, stride_bn, stride_br,
                       DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Σ over the block's adapters a of s_a·S[rows of a]·B_aᵀ on rows rm and columns rn."""
    idx = _row_adapters(idx_ptr, rm, M)
    acc = _rank_terms(s_ptr, b_ptr, idx, rm, rn, N, stride_sm, stride_sr, stride_ba, stride_br, stride_bn, rank_ptr,
                      DTYPE, DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_N)  # fmt: skip
    return acc * _per_row(scale_ptr, idx)


@triton.jit
def bwd_prologue_multi(ds_ptr, a_ptr, idx_ptr, rank_ptr, thr_ptr, inv_ptr, seed_ptr, rm, rk, col0, M, K,
                       stride_dsm, stride_dsr, stride_aa, stride_ar, stride_ak,
                       DTYPE: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Σ over the block's adapters a of (dS[rows of a]·A_a) ⊙ m_a / (1 − p_a) on rows rm, columns rk."""
    idx = _row_adapters(idx_ptr, rm, M)
    acc = _rank_terms(ds_ptr, a_ptr, idx, rm, rk, K, stride_dsm, stride_dsr, stride_aa, stride_ar, stride_ak,
                      rank_ptr, DTYPE, DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_K)  # fmt: skip
    if DROPOUT:
        kept = keep(tl.load(seed_ptr), rm.to(tl.int64), col0, K, _per_row(thr_ptr, idx), BLOCK_M, BLOCK_K)
        acc = acc * (kept.to(tl.float32) * _per_row(inv_ptr, idx))
    return acc


@triton.jit
def _lora_multi_shrink_kernel(
    x_ptr, a_ptr, idx_ptr, rank_ptr, thr_ptr, inv_ptr, s_ptr, seed_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_aa, stride_ar, stride_ak, stride_sm, stride_sr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program (i, j): rows [i·BLOCK_M, +BLOCK_M) and lanes [j·BLOCK_R, +BLOCK_R) of S, each row against its
    own adapter (x's rows of each adapter read once)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_first = tl.program_id(1) * BLOCK_R
    rr = r_first + tl.arange(0, BLOCK_R)
    rm64 = rm.to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    idx = _row_adapters(idx_ptr, rm, M)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    a = _next_adapter(idx, -1)
    while a < _NONE_LEFT:
        rank = tl.load(rank_ptr + a)
        if r_first < rank:  # lane tiles past the rank: nothing to read
            a_base = a_ptr + a.to(tl.int64) * stride_aa
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
                            mask=(idx == a)[:, None] & (rk[None, :] < K), other=0.0)  # fmt: skip
                if DROPOUT:  # the rows read are adapter a's: its threshold, a scalar (a per-row one spills)
                    # Multiply (not select) so an Inf that is dropped still gives NaN, as x * mask does.
                    x = x * keep(seed, rm64, k0, K, tl.load(thr_ptr + a), BLOCK_M, BLOCK_K).to(dtype)
                a_t = tl.load(a_base + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                              mask=(rr[None, :] < rank) & (rk[:, None] < K), other=0.0)  # fmt: skip
                acc = tl.dot(x, a_t.to(dtype), acc, input_precision=DOT_PRECISION)
        a = _next_adapter(idx, a)
    if DROPOUT:
        acc = acc * _per_row(inv_ptr, idx)
    tl.store(s_ptr + rm64[:, None] * stride_sm + rr[None, :] * stride_sr, acc.to(s_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))  # fmt: skip


@triton.jit
def _lora_multi_ds_kernel(
    g_ptr, b_ptr, idx_ptr, rank_ptr, scale_ptr, ds_ptr,
    M, N, R,
    stride_gm, stride_gn, stride_ba, stride_bn, stride_br, stride_dsm, stride_dsr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program (i, j): dS = s_a·G·B_a on rows [i·BLOCK_M, +BLOCK_M), lanes [j·BLOCK_R, +BLOCK_R), fp32."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_first = tl.program_id(1) * BLOCK_R
    rr = r_first + tl.arange(0, BLOCK_R)
    rm64 = rm.to(tl.int64)
    dtype = g_ptr.dtype.element_ty
    idx = _row_adapters(idx_ptr, rm, M)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    a = _next_adapter(idx, -1)
    while a < _NONE_LEFT:
        rank = tl.load(rank_ptr + a)
        if r_first < rank:
            b_base = b_ptr + a.to(tl.int64) * stride_ba
            for n0 in range(0, N, BLOCK_N):
                rn = n0 + tl.arange(0, BLOCK_N)
                rn64 = rn.to(tl.int64)
                g = tl.load(g_ptr + rm64[:, None] * stride_gm + rn64[None, :] * stride_gn,
                            mask=(idx == a)[:, None] & (rn[None, :] < N), other=0.0)  # fmt: skip
                b = tl.load(b_base + rn64[:, None] * stride_bn + rr[None, :] * stride_br,
                            mask=(rn[:, None] < N) & (rr[None, :] < rank), other=0.0)  # fmt: skip
                acc = tl.dot(g, b.to(dtype), acc, input_precision=DOT_PRECISION)
        a = _next_adapter(idx, a)
    tl.store(ds_ptr + rm64[:, None] * stride_dsm + rr[None, :] * stride_dsr, acc * _per_row(scale_ptr, idx),
             mask=(rm[:, None] < M) & (rr[None, :] < R))  # fmt: skip


@triton.jit
def _lora_multi_segment_kernel(
    l_ptr, r_ptr, order_ptr, offsets_ptr, rank_ptr, coef_ptr, thr_ptr, out_ptr, seed_ptr,
    C, R,
    stride_lm, stride_lc, stride_rm, stride_rr, stride_oa, stride_oc, stride_or,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program (j, a, t): out[a][c, r] = coef_a·Σ over adapter a's rows m of L[m, c]·Rt[m, r], columns
    [j·BLOCK_C, +BLOCK_C), lanes [t·BLOCK_R, +BLOCK_R). L's rows are masked by adapter a's dropout when
    DROPOUT (L = x for dA). Rows come sorted by adapter: ``order[offsets[a] : offsets[a + 1]]``."""
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    a = tl.program_id(1)
    r_first = tl.program_id(2) * BLOCK_R
    rr = r_first + tl.arange(0, BLOCK_R)
    rank = tl.load(rank_ptr + a)
    start = tl.load(offsets_ptr + a)
    end = tl.load(offsets_ptr + a + 1)
    dtype = l_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    if r_first < rank:
        for m0 in range(start, end, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            row_ok = pos < end
            rows = tl.load(order_ptr + pos, mask=row_ok, other=0)  # int64 row indices of x, G
            lt = tl.load(l_ptr + rows[:, None] * stride_lm + rc[None, :].to(tl.int64) * stride_lc,
                         mask=row_ok[:, None] & (rc[None, :] < C), other=0.0)  # fmt: skip
            if DROPOUT:
                col0 = tl.program_id(0) * BLOCK_C
                lt = lt * keep(tl.load(seed_ptr), rows, col0, C, tl.load(thr_ptr + a), BLOCK_M, BLOCK_C).to(dtype)
            rt = tl.load(r_ptr + rows[:, None] * stride_rm + rr[None, :] * stride_rr,
                         mask=row_ok[:, None] & (rr[None, :] < rank), other=0.0)  # fmt: skip
            acc = tl.dot(tl.trans(lt), rt.to(dtype), acc, input_precision=DOT_PRECISION)
        acc = acc * tl.load(coef_ptr + a)
    tl.store(out_ptr + a.to(tl.int64) * stride_oa + rc[:, None].to(tl.int64) * stride_oc + rr[None, :] * stride_or,
             acc, mask=(rc[:, None] < C) & (rr[None, :] < R))  # fmt: skip


def _cfg(bm, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def _cfg_n(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _cfg_c(bm, bc, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=warps, num_stages=stages)


# Memory-bound like the single-adapter shrink and dS; 64-row blocks at most, so that a block holds few
# adapters. The loop over adapters keeps more live than the single-adapter kernels: their 8-warp, 128-column
# tiles spill (8 to 40 bytes on sm_80, Triton 3.6), and with dropout, whose Philox state
# joins the accumulator, only 16 × 64 tiles on 8 warps are spill-free on Triton 3.4, 3.6 and 3.9 (fp32 and
# bf16, sm_80 and sm_90; 64- and 32-row tiles spill 8 to 208 bytes).
_SHRINK_DROPOUT_CONFIGS = [_cfg(16, 64, 8, 2)]


def _shrink_configs(flags: dict, arch: int, itemsize: int) -> list[triton.Config]:
    if flags["DROPOUT"]:
        return _SHRINK_DROPOUT_CONFIGS
    return [_cfg(64, 64, 4, 3)]


_SHRINK = Tunable(_lora_multi_shrink_kernel, _shrink_configs, key=["M", "K", "R"], interpreter_config=_cfg(16, 32, 1, 1))
_DS = Tunable(_lora_multi_ds_kernel, lambda flags, arch, itemsize: [_cfg_n(64, 64, 4, 3), _cfg_n(32, 64, 4, 3)],
              key=["M", "N", "R"], interpreter_config=_cfg_n(16, 32, 1, 1))  # fmt: skip
# The segment sums keep a (BLOCK_C × BLOCK_R) fp32 accumulator, BLOCK_R up to 256 lanes: narrow tiles there.
_SEGMENT = Tunable(_lora_multi_segment_kernel,
                   lambda flags, arch, itemsize: [_cfg_c(32, 64, 4, 3), _cfg_c(64, 64, 8, 3)] if flags["BLOCK_R"] <= 64
                   else [_cfg_c(32, 32, 8, 2)],
                   key=["C", "R"], interpreter_config=_cfg_c(16, 32, 1, 1))  # fmt: skip
# Lanes per program in the shrink and dS (more lanes take the grid's second axis).
MAX_BLOCK_R = 64


class AdapterTables:
    """Per-adapter values on the device, for the kernels: ranks (int32), scalings and 1/(1 − p) (fp32),
    keep thresholds (int64); and on the host ``dropout``, whether any adapter drops (the kernels' DROPOUT:
    rows of adapters that do not drop have threshold 0 and keep everything)."""

    def __init__(self, scalings, dropout_ps, ranks, device: torch.device) -> None:
        self.dropout = any(p > 0.0 for p in dropout_ps)
        self.rank = torch.tensor(ranks, dtype=torch.int32, device=device)
        self.scale = torch.tensor(scalings, dtype=torch.float32, device=device)
        self.inv_keep = torch.tensor([1.0 / (1.0 - p) for p in dropout_ps], dtype=torch.float32, device=device)
        self.threshold = torch.tensor([keep_threshold(p) for p in dropout_ps], dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=256)
def adapter_tables(scalings: tuple, dropout_ps: tuple, ranks: tuple, device: torch.device) -> AdapterTables:
    """The tables for these values, built once (a host-to-device copy from pageable memory waits for the
    device; layers call with the same values every step)."""
    return AdapterTables(scalings, dropout_ps, ranks, device)


@functools.lru_cache(maxsize=16)
def no_multi(device: torch.device) -> tuple[torch.Tensor, AdapterTables]:
    """Placeholders (index, tables) for the GEMMs' MULTI arguments in a single-adapter launch (never read)."""
    return torch.full((1,), -1, dtype=torch.int64, device=device), AdapterTables([1.0], [0.0], [1], device)


def sorted_rows(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order (M,) int64: rows sorted by adapter, stable; offsets (n + 1,) int64: adapter a's rows are
    ``order[offsets[a] : offsets[a + 1]]``), computed on the device without a host sync (base-only rows sort
    first and belong to no adapter)."""
    keys, order = torch.sort(index, stable=True)
    bounds = torch.arange(n + 1, device=index.device, dtype=index.dtype)
    return order, torch.searchsorted(keys, bounds, side="left")


def lora_multi_shrink(x: torch.Tensor, lora_A: torch.Tensor, index: torch.Tensor, tables: AdapterTables,
                      seed: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """S (M, R) in x's dtype: each row's x̂·A_aᵀ (zeros for base-only rows and past the rank).

    Args:
        x: (M, K) any strides; lora_A: (n, R, K) any floating dtype; index: (M,) int64.
    """
    m, k = x.shape
    r = lora_A.shape[1]
    s = torch.empty((m, r), device=x.device, dtype=x.dtype)
    if m == 0:
        return s
    block_r = rank_block(r, MAX_BLOCK_R)
    _SHRINK.launch(
        lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(r, block_r)),
        x, lora_A, index, tables.rank, tables.threshold, tables.inv_keep, s, seed_pointer(seed, x),
        m, k, r,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), s.stride(0), s.stride(1),
        DROPOUT=tables.dropout, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r,
    )  # fmt: skip
    return s


def lora_multi_ds(grad_y: torch.Tensor, lora_B: torch.Tensor, index: torch.Tensor,
                  tables: AdapterTables) -> torch.Tensor:  # fmt: skip
    """dS (M, R) fp32: each row's s_a·G·B_a (zeros for base-only rows and past the rank)."""
    m, n = grad_y.shape
    r = lora_B.shape[2]
    ds = torch.empty((m, r), device=grad_y.device, dtype=torch.float32)
    if m == 0:
        return ds
    block_r = rank_block(r, MAX_BLOCK_R)
    _DS.launch(
        lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(r, block_r)),
        grad_y, lora_B, index, tables.rank, tables.scale, ds,
        m, n, r,
        grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        ds.stride(0), ds.stride(1),
        DOT_PRECISION=dot_precision(grad_y.dtype), BLOCK_R=block_r,
    )  # fmt: skip
    return ds


def lora_multi_segment_sum(left: torch.Tensor, right: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                           tables: AdapterTables, coef: torch.Tensor, out: torch.Tensor, transpose_out: bool,
                           seed: torch.Tensor | None = None, masked: bool = False) -> torch.Tensor:  # fmt: skip
    """Per adapter a: coef_a·Σ over its rows of leftᵀ·right, (C, R), written to every element of ``out[a]`` (an
    (n, C, R) fp32 tensor, or (n, R, C) read transposed when ``transpose_out``; adapters without rows get
    zeros, so ``out`` may come uninitialised).

    Args:
        left: (M, C), any strides (G for dB, x for dA: then ``masked`` applies the forward's dropout).
        right: (M, R) (S for dB, dS for dA).
        order, offsets: ``sorted_rows(index, n)``.
    """
    m, c = left.shape
    r = right.shape[1]
    n = offsets.shape[0] - 1
    block_r = rank_block(r)
    stride_oa, stride_o1, stride_o2 = out.stride()
    stride_oc, stride_or = (stride_o2, stride_o1) if transpose_out else (stride_o1, stride_o2)
    _SEGMENT.launch(
        lambda meta: (cdiv(c, meta["BLOCK_C"]), n, cdiv(r, block_r)),
        left, right, order, offsets, tables.rank, coef, tables.threshold, out, seed_pointer(seed, left),
        c, r,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), stride_oa, stride_oc, stride_or,
        DROPOUT=masked and tables.dropout, DOT_PRECISION=dot_precision(left.dtype), BLOCK_R=block_r,
    )  # fmt: skip
    return out
