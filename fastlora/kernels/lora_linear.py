"""The two GEMMs of the LoRA linear, each with the rank-r term in its fp32 accumulator.

Forward:   Y  = x·Wᵀ + b + s·S·Bᵀ             (M × N, reduction over K)
Backward:  dX = G·W + (dS·A) ⊙ m / (1 − p)     (M × K, reduction over N)

Each tile starts its accumulator with the rank-r product (a short loop over the rank, ≤ 256), masks and
scales it, then runs the main loop on top of it, so the LoRA term costs no extra pass over Y or dX and no
second accumulator. Tiles are ordered in groups of GROUP_M row blocks so that neighbouring tiles share the
same W tiles in L2 (Triton tutorial 03).

One GEMM per direction, two main loops around the same parts (tile order, prologue, epilogue):
- TMA (``_lora_linear_*_tma_kernel``, sm_90 and newer, inputs a TMA descriptor can take, see ``uses_tma``):
  input tiles arrive by TMA into shared memory, wgmma reads them there; persistent (Triton tutorial 09).
- pointers (``_lora_linear_*_kernel``): any strides; sm_80, and sm_90 when TMA cannot take the inputs.

Shapes: x (M, K), W (N, K), b (N,), S (M, R), B (N, R), G (M, N), dS (M, R) fp32, A (R, K); any strides.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fastlora.kernels import _launch
from fastlora.kernels._launch import Tunable, cdiv, dot_precision, triton_version
from fastlora.kernels.dropout import keep, keep_threshold, seed_pointer
from fastlora.kernels.lora_multi import bwd_prologue_multi, fwd_prologue_multi, no_multi
from fastlora.kernels.weight_tile import NF4, load_nf4_rows, load_w_tile, weight_args

__all__ = ["lora_linear_fwd", "lora_linear_bwd", "uses_tma"]


# ---------------------------------------------------------------------------------------------------------
# The parts both main loops share: tile order, the rank-r prologue, the epilogue.


@triton.jit
def _grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile index -> (row block, column block), GROUP_M row blocks at a time for L2 reuse."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_size
    pid_n = (tile % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _fwd_prologue(s_ptr, b_ptr, rm, rn, M, N, R, scaling, stride_sm, stride_sr, stride_bn, stride_br,
                  DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_STAGES: tl.constexpr):  # fmt: skip
    """s·S·Bᵀ on rows rm and columns rn: the accumulator the forward main loop starts from. RANK_STAGES
    pipelines the rank loop (None: as deep as the main loop)."""
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=RANK_STAGES):
        rr = r0 + tl.arange(0, BLOCK_R)
        s = tl.load(s_ptr + rm64[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)  # fmt: skip
        b_t = tl.load(b_ptr + rn64[None, :] * stride_bn + rr[:, None] * stride_br,
                      mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)  # fmt: skip
        acc = tl.dot(s.to(DTYPE), b_t.to(DTYPE), acc, input_precision=DOT_PRECISION)
    return acc * scaling


@triton.jit
def _bwd_prologue(ds_ptr, a_ptr, seed_ptr, rm, rk, col0, M, K, R, threshold, inv_keep,
                  stride_dsm, stride_dsr, stride_ar, stride_ak,
                  DTYPE: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RANK_STAGES: tl.constexpr):  # fmt: skip
    """(dS·A) ⊙ m / (1 − p) on rows rm and columns rk (rk = col0 + arange): the dX main loop's start."""
    rm64 = rm.to(tl.int64)
    rk64 = rk.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=RANK_STAGES):
        rr = r0 + tl.arange(0, BLOCK_R)
        ds = tl.load(ds_ptr + rm64[:, None] * stride_dsm + rr[None, :] * stride_dsr,
                     mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)  # fmt: skip
        a = tl.load(a_ptr + rr[:, None] * stride_ar + rk64[None, :] * stride_ak,
                    mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)  # fmt: skip
        acc = tl.dot(ds.to(DTYPE), a.to(DTYPE), acc, input_precision=DOT_PRECISION)
    if DROPOUT:
        kept = keep(tl.load(seed_ptr), rm64, col0, K, threshold, BLOCK_M, BLOCK_K)
        acc = acc * (kept.to(tl.float32) * inv_keep)
    return acc


@triton.jit
def _fwd_start(s_ptr, b_ptr, idx_ptr, rank_ptr, scale_ptr, rm, rn, M, N, R, scaling,
               stride_sm, stride_sr, stride_ba, stride_bn, stride_br,
               DTYPE: tl.constexpr, MULTI: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_STAGES: tl.constexpr):  # fmt: skip
    """The forward accumulator's start, for both main loops: one adapter's s·S·Bᵀ, or with MULTI each row's
    own adapter's (kernels/lora_multi.py)."""
    if MULTI:
        acc = fwd_prologue_multi(s_ptr, b_ptr, idx_ptr, rank_ptr, scale_ptr, rm, rn, M, N, stride_sm, stride_sr,
                                 stride_ba, stride_bn, stride_br, DTYPE, DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_N)  # fmt: skip
    else:
        acc = _fwd_prologue(s_ptr, b_ptr, rm, rn, M, N, R, scaling, stride_sm, stride_sr, stride_bn, stride_br, DTYPE,
                            DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_N, RANK_STAGES)  # fmt: skip
    return acc


@triton.jit
def _bwd_start(ds_ptr, a_ptr, seed_ptr, idx_ptr, rank_ptr, thr_ptr, inv_ptr, rm, rk, col0, M, K, R, threshold,
               inv_keep, stride_dsm, stride_dsr, stride_aa, stride_ar, stride_ak,
               DTYPE: tl.constexpr, DROPOUT: tl.constexpr, MULTI: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RANK_STAGES: tl.constexpr):  # fmt: skip
    """The dX accumulator's start, for both main loops: (dS·A) ⊙ m / (1 − p) of one adapter, or with MULTI of
    each row's own adapter, masked with its probability (kernels/lora_multi.py)."""
    if MULTI:
        acc = bwd_prologue_multi(ds_ptr, a_ptr, idx_ptr, rank_ptr, thr_ptr, inv_ptr, seed_ptr, rm, rk, col0, M, K,
                                 stride_dsm, stride_dsr, stride_aa, stride_ar, stride_ak, DTYPE, DROPOUT,
                                 DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_K)  # fmt: skip
    else:
        acc = _bwd_prologue(ds_ptr, a_ptr, seed_ptr, rm, rk, col0, M, K, R, threshold, inv_keep, stride_dsm,
                            stride_dsr, stride_ar, stride_ak, DTYPE, DROPOUT, DOT_PRECISION, BLOCK_R, BLOCK_M,
                            BLOCK_K, RANK_STAGES)  # fmt: skip
    return acc


@triton.jit
def _dora_epilogue(acc, d_ptr, c_ptr, rm, rn, M, N, stride_dm, stride_dn, DORA: tl.constexpr):
    """DoRA (fastlora.dora, dropout 0): stores the tile as it is, D = x·Wᵀ + s·S·Bᵀ (what m's gradient needs),
    and returns it scaled per column by c = m / ‖W + s·B·A‖, for the bias and the output store. Without DORA,
    the tile unchanged."""
    if DORA:
        tl.store(d_ptr + rm.to(tl.int64)[:, None] * stride_dm + rn.to(tl.int64)[None, :] * stride_dn,
                 acc.to(d_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))  # fmt: skip
        acc = acc * tl.load(c_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _dora_scale(g, c_ptr, rn, N, DORA: tl.constexpr):
    """DoRA's dX reads G ⊙ c (c per column of G, DoRA's scale): the G tile scaled on arrival and rounded back
    to its dtype, as the unfused (G ⊙ c)·W would be; without DORA, the tile unchanged."""
    if DORA:
        c = tl.load(c_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        g = (g.to(tl.float32) * c[None, :]).to(g.dtype)
    return g


@triton.jit
def _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, stride_on, HAS_BIAS: tl.constexpr):
    """Adds the bias (over columns) when there is one and stores the tile once, in the output's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn.to(tl.int64)[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Pointer main loop (any strides; sm_80, and sm_90 when TMA cannot take the inputs): one program a tile.


@triton.jit
def _lora_linear_fwd_kernel(
    x_ptr, w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr,
    bias_ptr, s_ptr, b_ptr, y_ptr, idx_ptr, rank_ptr, scale_ptr, c_ptr, d_ptr,
    M, N, K, R, scaling,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_ba, stride_bn, stride_br,
    stride_ym, stride_yn, stride_dm, stride_dn,
    HAS_BIAS: tl.constexpr, DORA: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    NF4_ROWS: tl.constexpr, MULTI: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Y tile (BLOCK_M × BLOCK_N); W dense or NF4 (weight_tile.load_w_tile); one adapter, or with MULTI each
    row's own (kernels/lora_multi.py: B stacked (n, N, R), the row's adapter in idx). With DORA the tile is
    also stored unscaled to D and scaled by c before the bias (``_dora_epilogue``)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = _fwd_start(s_ptr, b_ptr, idx_ptr, rank_ptr, scale_ptr, rm, rn, M, N, R, scaling, stride_sm, stride_sr,
                     stride_ba, stride_bn, stride_br, x_ptr.dtype.element_ty, MULTI, DOT_PRECISION, BLOCK_R, BLOCK_M,
                     BLOCK_N, None)  # fmt: skip
    for k0 in range(0, K, BLOCK_K):  # + x·Wᵀ on top
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # fmt: skip
        if NF4_ROWS:
            w_t = tl.trans(load_nf4_rows(w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                                         nf4_ptr, rn64, k0, N, K, QBLOCK, DOUBLE_QUANT, BLOCK_N, BLOCK_K))  # fmt: skip
        else:
            w_t = load_w_tile(w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr,
                              rn64[None, :], rk[:, None], (rn[None, :] < N) & (rk[:, None] < K), stride_wn, stride_wk,
                              K, WEIGHT_FORMAT, QBLOCK, DOUBLE_QUANT)  # fmt: skip
        acc = tl.dot(x, w_t.to(x.dtype), acc, input_precision=DOT_PRECISION)
    acc = _dora_epilogue(acc, d_ptr, c_ptr, rm, rn, M, N, stride_dm, stride_dn, DORA)
    _epilogue(acc, y_ptr, bias_ptr, rm, rn, M, N, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _lora_linear_bwd_kernel(
    g_ptr, w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr,
    ds_ptr, a_ptr, dx_ptr, seed_ptr, idx_ptr, rank_ptr, thr_ptr, inv_ptr, c_ptr,
    M, N, K, R, threshold, inv_keep,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_dsm, stride_dsr, stride_aa, stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    DROPOUT: tl.constexpr, DORA: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    NF4_ROWS: tl.constexpr, MULTI: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dX tile (BLOCK_M × BLOCK_K); the reduction runs over N in steps of BLOCK_N; W dense or NF4; one
    adapter, or with MULTI each row's own (A stacked (n, R, K), per-adapter dropout). With DORA each G tile
    is scaled by c per column as it arrives (``_dora_scale``)."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm64 = rm.to(tl.int64)
    rk64 = rk.to(tl.int64)
    acc = _bwd_start(ds_ptr, a_ptr, seed_ptr, idx_ptr, rank_ptr, thr_ptr, inv_ptr, rm, rk, pid_k * BLOCK_K, M, K, R,
                     threshold, inv_keep, stride_dsm, stride_dsr, stride_aa, stride_ar, stride_ak, g_ptr.dtype.element_ty,
                     DROPOUT, MULTI, DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_K, None)  # fmt: skip
    for n0 in range(0, N, BLOCK_N):  # + G·W on top
        rn = n0 + tl.arange(0, BLOCK_N)
        rn64 = rn.to(tl.int64)
        g = tl.load(g_ptr + rm64[:, None] * stride_gm + rn64[None, :] * stride_gn,
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)  # fmt: skip
        g = _dora_scale(g, c_ptr, rn, N, DORA)
        if NF4_ROWS:
            w = load_nf4_rows(w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, rn64,
                              pid_k * BLOCK_K, N, K, QBLOCK, DOUBLE_QUANT, BLOCK_N, BLOCK_K)  # fmt: skip
        else:
            w = load_w_tile(w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr,
                            rn64[:, None], rk64[None, :], (rn[:, None] < N) & (rk[None, :] < K), stride_wn, stride_wk,
                            K, WEIGHT_FORMAT, QBLOCK, DOUBLE_QUANT)  # fmt: skip
        acc = tl.dot(g, w.to(g.dtype), acc, input_precision=DOT_PRECISION)
    _epilogue(acc, dx_ptr, dx_ptr, rm, rk, M, K, stride_dxm, stride_dxk, False)


# ---------------------------------------------------------------------------------------------------------
# TMA main loop (sm_90+, inputs TMA can take). Input tiles come through host-side tensor descriptors
# (triton.tools.tensor_descriptor.TensorDescriptor, passed as __grid_constant__ CUtensorMaps: no device
# allocator, nothing built per program): cp.async.bulk.tensor copies into shared memory complete on
# mbarriers, which Triton's pipeliner multi-buffers over num_stages, and wgmma reads the tiles there. Boxes
# past the tensor's edge read as zeros, so the main loop needs no masks.
# Persistent: min(#SMs, #tiles) programs walk the tiles in grouped order (Triton tutorial 09), so no tile
# waits for a block slot and each SM keeps its program's descriptors and barriers.
# Not flattened: tl.range(flatten=True) leaves this loop nest as it is (the rank loop is a second inner
# loop), and with a loop-free prologue it makes every wgmma wait for the previous one (sm_90, Triton 3.4,
# 3.6, 3.9), so each tile fills its pipeline after its prologue. Not warp-specialised: on sm_90,
# tl.range(warp_specialize=True) compiles to the same code on Triton 3.4, 3.6 and 3.9 (their automatic
# warp specialisation runs on sm_100+ only).
# The rank loop is not pipelined here (RANK_STAGES = 1): its buffers would cost the registers the 128 × 256
# dX tile needs (8 bytes of spill on Triton 3.6).
# The output goes through the shared epilogue as in the pointer kernels. It is the first argument because
# launchers key configs on their first tensor's dtype, and descriptors are not tensors.


@triton.jit
def _lora_linear_fwd_tma_kernel(
    y_ptr, x_desc, w_desc, bias_ptr, s_ptr, b_ptr, c_ptr, d_ptr, idx_ptr, rank_ptr, scale_ptr,
    M, N, K, R, scaling,
    stride_sm, stride_sr, stride_ba, stride_bn, stride_br, stride_ym, stride_yn, stride_dm, stride_dn,
    HAS_BIAS: tl.constexpr, DORA: tl.constexpr, MULTI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # The host sets the descriptors' boxes per config (_persistent_grid); a stale one would load other tiles.
    tl.static_assert(x_desc.block_shape[0] == BLOCK_M and x_desc.block_shape[1] == BLOCK_K, "x_desc: stale box")
    tl.static_assert(w_desc.block_shape[0] == BLOCK_N and w_desc.block_shape[1] == BLOCK_K, "w_desc: stale box")
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _fwd_start(s_ptr, b_ptr, idx_ptr, rank_ptr, scale_ptr, rm, rn, M, N, R, scaling, stride_sm, stride_sr,
                         stride_ba, stride_bn, stride_br, x_desc.dtype, MULTI, DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_N,
                         1)  # fmt: skip
        for k0 in range(0, K, BLOCK_K):  # + x·Wᵀ on top
            x = x_desc.load([pid_m * BLOCK_M, k0])
            w = w_desc.load([pid_n * BLOCK_N, k0])
            acc = tl.dot(x, w.T, acc, input_precision=DOT_PRECISION)
        acc = _dora_epilogue(acc, d_ptr, c_ptr, rm, rn, M, N, stride_dm, stride_dn, DORA)
        _epilogue(acc, y_ptr, bias_ptr, rm, rn, M, N, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _lora_linear_bwd_tma_kernel(
    dx_ptr, g_desc, w_desc, ds_ptr, a_ptr, seed_ptr, c_ptr, idx_ptr, rank_ptr, thr_ptr, inv_ptr,
    M, N, K, R, threshold, inv_keep,
    stride_dsm, stride_dsr, stride_aa, stride_ar, stride_ak, stride_dxm, stride_dxk,
    DROPOUT: tl.constexpr, DORA: tl.constexpr, MULTI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dX tiles (BLOCK_M × BLOCK_K); the reduction runs over N in steps of BLOCK_N."""
    tl.static_assert(g_desc.block_shape[0] == BLOCK_M and g_desc.block_shape[1] == BLOCK_N, "g_desc: stale box")
    tl.static_assert(w_desc.block_shape[0] == BLOCK_N and w_desc.block_shape[1] == BLOCK_K, "w_desc: stale box")
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_k = _grouped_tile(tile, M, K, BLOCK_M, BLOCK_K, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = _bwd_start(ds_ptr, a_ptr, seed_ptr, idx_ptr, rank_ptr, thr_ptr, inv_ptr, rm, rk, pid_k * BLOCK_K, M, K,
                         R, threshold, inv_keep, stride_dsm, stride_dsr, stride_aa, stride_ar, stride_ak, g_desc.dtype,
                         DROPOUT, MULTI, DOT_PRECISION, BLOCK_R, BLOCK_M, BLOCK_K, 1)  # fmt: skip
        for n0 in range(0, N, BLOCK_N):  # + G·W on top
            g = _dora_scale(g_desc.load([pid_m * BLOCK_M, n0]), c_ptr, n0 + tl.arange(0, BLOCK_N), N, DORA)
            w = w_desc.load([n0, pid_k * BLOCK_K])
            acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
        _epilogue(acc, dx_ptr, dx_ptr, rm, rk, M, K, stride_dxm, stride_dxk, False)


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_warps=warps,
                         num_stages=stages)  # fmt: skip


# Hopper-sized tiles (wgmma wants BLOCK_M >= 64 and 4-warp multiples), then smaller ones for skinny M
# (decode: M of 1 to 64 tokens). Each stage holds (BLOCK_M + BLOCK_N) × BLOCK_K inputs in shared memory.
_FWD_CONFIGS = [
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 128, 64, 4, 4),
    _cfg(64, 256, 64, 4, 3),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(16, 128, 128, 4, 4, group=1),
]
_INTERPRETER_CONFIG = _cfg(16, 32, 32, 1, 1, group=2)


def _fwd_boxes(meta: dict) -> dict[str, list[int]]:
    """The tile each forward descriptor moves under a config: x (BLOCK_M × BLOCK_K), W (BLOCK_N × BLOCK_K)."""
    return {"x_desc": [meta["BLOCK_M"], meta["BLOCK_K"]], "w_desc": [meta["BLOCK_N"], meta["BLOCK_K"]]}


def _bwd_boxes(meta: dict) -> dict[str, list[int]]:
    """dX's descriptors: G (BLOCK_M × BLOCK_N), W (BLOCK_N × BLOCK_K); the reduction runs over N."""
    return {"g_desc": [meta["BLOCK_M"], meta["BLOCK_N"]], "w_desc": [meta["BLOCK_N"], meta["BLOCK_K"]]}


# The TMA kernels' tiles (BLOCK_M, output columns, reduction block, warps, stages), all wgmma-sized (64+
# rows), best-first for large problems (the first that fits is what "heuristic" tuning takes): the
# forward's are (BLOCK_M, BLOCK_N, BLOCK_K), dX takes them with the last two swapped. The first is Triton
# tutorial 09's Hopper tile; BLOCK_K = 128 halves the loop's steps; BLOCK_K = 32 keeps four stages of fp32
# (tf32) inputs within shared memory. All are spill-free on Triton 3.4, 3.6 and 3.9 (sm_90,
# fp16/bf16/fp32, the heaviest flags); a 128 × 256 × 32 tile was dropped: it spills with fp32 inputs
# (forward, 8 bytes on 3.9) and as a dX tile (8 bytes with 16-bit inputs on 3.9).
_TMA_TILES = [
    (128, 256, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 8, 4),
    (128, 128, 64, 4, 3),
    (64, 256, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
]
_TMA_FWD_CONFIGS = [_cfg(bm, bn, bk, w, s) for bm, bn, bk, w, s in _TMA_TILES]
_TMA_BWD_CONFIGS = [_cfg(bm, bk, bn, w, s) for bm, bn, bk, w, s in _TMA_TILES]
# Under the interpreter the TMA kernels take the pointer kernels' config, on a few programs, so that each
# program's loop over tiles runs more than once.
INTERPRETER_PROGRAMS = 3


# Shared memory a block may use: 227 KB on sm_90 (H100/H200), 163 KB on sm_80 (A100); 16 KB of it is left
# for the rank-r prologue's tiles and the epilogue's layout conversion.
_SHARED_BYTES = {90: 227 * 1024, 80: 163 * 1024}
_RESERVED_BYTES = 16 * 1024


def _fits(c: triton.Config, arch: int, itemsize: int, out_cols: str, reduction: str) -> bool:
    """Whether the pipelined input tiles, stages × (BLOCK_M + output columns) × reduction block elements,
    fit in shared memory."""
    kw = c.kwargs
    tiles = c.num_stages * (kw["BLOCK_M"] + kw[out_cols]) * kw[reduction] * itemsize
    limit = _SHARED_BYTES[90] if arch >= 90 else _SHARED_BYTES[80]
    return tiles <= limit - _RESERVED_BYTES


def _per_thread(c: triton.Config, rows: str, cols: str) -> int:
    return c.kwargs[rows] * c.kwargs[cols] // (32 * c.num_warps)


def _wide_fp32_on_four_warps(c: triton.Config, itemsize: int) -> bool:
    """fp32 inputs in 128-row tiles on 4 warps: with 4 pipeline stages this spills on Triton 3.4 (96 bytes
    forward, 64 for dX, sm_90); 8 warps serve such tiles."""
    return itemsize == 4 and c.kwargs["BLOCK_M"] >= 128 and c.num_warps < 8


def _fwd_fit(configs: list[triton.Config], arch: int, itemsize: int) -> list[triton.Config]:
    # Before Hopper the accumulator lives in mma fragments, which a 64 × 256 tile on 4 warps overflows.
    most = 128 if arch >= 90 else 64
    return [c for c in configs if _fits(c, arch, itemsize, "BLOCK_N", "BLOCK_K")
            and _per_thread(c, "BLOCK_M", "BLOCK_N") <= most and not _wide_fp32_on_four_warps(c, itemsize)]  # fmt: skip


def _bwd_fit(configs: list[triton.Config], flags: dict, arch: int, itemsize: int) -> list[triton.Config]:
    """dX tiles: output columns are K, the reduction N. With dropout the Philox state for the whole
    (BLOCK_M × BLOCK_K) tile is live beside the accumulator: at most 64 output elements a thread (32 with
    4-byte inputs) leave it room."""
    most = (64 if itemsize <= 2 else 32) if flags["DROPOUT"] else (128 if arch >= 90 else 64)
    return [c for c in configs if _fits(c, arch, itemsize, "BLOCK_K", "BLOCK_N")
            and _per_thread(c, "BLOCK_M", "BLOCK_K") <= most and not _wide_fp32_on_four_warps(c, itemsize)]  # fmt: skip


# With an NF4 weight every W element is decoded in registers (its byte, its absmax, a lookup in the
# 16-value table), and the software pipeline stages those gathers in shared memory as well: smaller tiles
# and two stages keep both within bounds. Spill-free on sm_90 and sm_80 (Triton 3.4, 3.6, 3.9); dropped:
# 64 × 64 × 64 on 4 warps (24 bytes of spill on sm_90 with 16-bit inputs on 3.9, 16 for dX on sm_80),
# 16-row decode tiles on 4 warps (8 to 400 bytes on 3.4 and 3.6; the decode of a W tile needs its
# registers spread over 8 warps). The 128-row tiles run on sm_90 only: on sm_80 they spill 8 to 16 bytes
# (3.6, 3.9).
_NF4_FWD_CONFIGS = [
    _cfg(128, 64, 64, 8, 2),
    _cfg(128, 64, 32, 8, 2),
    _cfg(64, 64, 32, 4, 2),
    _cfg(16, 64, 32, 8, 2, group=1),
]


# Row tiles of whole blocks (weight_tile.load_nf4_rows) decode with fewer registers: their decode tile runs on
# 4 warps (on 8, dX spills 8 bytes with fp32 inputs on Triton 3.9).
_NF4_ROWS_DECODE_CONFIG = _cfg(16, 64, 32, 4, 2, group=1)


def _nf4_configs(flags: dict, arch: int) -> list[triton.Config]:
    configs = [*_NF4_FWD_CONFIGS[:-1], _NF4_ROWS_DECODE_CONFIG if flags["NF4_ROWS"] else _NF4_FWD_CONFIGS[-1]]
    return configs if arch >= 90 else configs[2:]


def _multi_fit(configs: list[triton.Config], flags: dict, arch: int, itemsize: int, out_cols: str) -> list[triton.Config]:
    """A mixed-adapter batch's prologue (MULTI) keeps the block's adapter indices and the loop over them live
    beside the accumulator: at most 64 accumulator values a thread on sm_90 with 16-bit inputs, 32 with fp32
    inputs and on sm_80 (more spill 8 to 32 bytes: 64 × 256 dX tiles on 4 warps on sm_90, Triton 3.9; 64 × 128
    fp32 tiles on 4 warps, 3.4; 128 × 64 on 4 warps on sm_80, 3.9). With an NF4 weight, no 16-row decode tile
    (8 bytes on sm_90 with Triton 3.4, on sm_80 with 3.9) and no 128-row tile for fp32 inputs (8 bytes, 3.4)."""
    if not flags.get("MULTI"):
        return configs
    most = 64 if arch >= 90 and itemsize <= 2 else 32
    nf4 = flags.get("WEIGHT_FORMAT") == NF4  # (the TMA kernels take a dense W only)
    return [c for c in configs if _per_thread(c, "BLOCK_M", out_cols) <= most
            and not (nf4 and (c.kwargs["BLOCK_M"] < 64 or (itemsize == 4 and c.kwargs["BLOCK_M"] >= 128)))]  # fmt: skip


def _dora_fit(configs: list[triton.Config], flags: dict, arch: int, out_cols: str = "BLOCK_N") -> list[triton.Config]:
    """DoRA's flag (DORA: a second store and c beside the forward tile, c applied to each G tile in dX) costs
    registers: at most 64 accumulator values a thread, 32 on sm_80 with 4 warps (more spill: 8 to 32 bytes,
    64 × 256 and 128 × 128 tiles on 4 warps on sm_90 with Triton 3.9, 128 × 256 on 8 warps with Triton 3.6,
    128 × 64 on 4 warps on sm_80 with 3.9)."""
    if not flags.get("DORA"):
        return configs
    return [c for c in configs
            if _per_thread(c, "BLOCK_M", out_cols) <= (64 if arch >= 90 or c.num_warps >= 8 else 32)]  # fmt: skip


def _fwd_configs(flags: dict, arch: int, itemsize: int) -> list[triton.Config]:
    configs = _fwd_fit(_nf4_configs(flags, arch) if flags["WEIGHT_FORMAT"] == NF4 else _FWD_CONFIGS, arch, itemsize)
    return _dora_fit(_multi_fit(configs, flags, arch, itemsize, "BLOCK_N"), flags, arch)


def _bwd_configs(flags: dict, arch: int, itemsize: int) -> list[triton.Config]:
    configs = _nf4_configs(flags, arch) if flags["WEIGHT_FORMAT"] == NF4 else _FWD_CONFIGS
    swapped = [_cfg(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                    c.kwargs["GROUP_M"]) for c in configs]  # fmt: skip
    return _dora_fit(_multi_fit(_bwd_fit(swapped, flags, arch, itemsize), flags, arch, itemsize, "BLOCK_K"), flags,
                     arch, "BLOCK_K")  # fmt: skip


def _fwd_tma_configs(flags: dict, arch: int, itemsize: int) -> list[triton.Config]:
    if arch < 90:
        return []
    configs = _multi_fit(_fwd_fit(_TMA_FWD_CONFIGS, arch, itemsize), flags, arch, itemsize, "BLOCK_N")
    return _dora_fit(configs, flags, arch)


def _bwd_tma_configs(flags: dict, arch: int, itemsize: int) -> list[triton.Config]:
    if arch < 90:
        return []
    configs = _multi_fit(_bwd_fit(_TMA_BWD_CONFIGS, flags, arch, itemsize), flags, arch, itemsize, "BLOCK_K")
    return _dora_fit(configs, flags, arch, "BLOCK_K")


_FWD = Tunable(_lora_linear_fwd_kernel, _fwd_configs, key=["M", "N", "K", "R"], interpreter_config=_INTERPRETER_CONFIG)
_BWD = Tunable(_lora_linear_bwd_kernel, _bwd_configs, key=["M", "N", "K", "R"], interpreter_config=_INTERPRETER_CONFIG)
_FWD_TMA = Tunable(_lora_linear_fwd_tma_kernel, _fwd_tma_configs, key=["M", "N", "K", "R"],
                   interpreter_config=_INTERPRETER_CONFIG)  # fmt: skip
_BWD_TMA = Tunable(_lora_linear_bwd_tma_kernel, _bwd_tma_configs, key=["M", "N", "K", "R"],
                   interpreter_config=_INTERPRETER_CONFIG)  # fmt: skip
# Each TMA kernel's descriptor boxes as a function of its config (the AOT check compiles with them too).
TMA_BOXES = {_FWD_TMA: _fwd_boxes, _BWD_TMA: _bwd_boxes}

# The rank-r prologue runs in 16-lane steps: its S and Bᵀ tiles stay small beside the main loop's
# accumulator (a rank of 256 is 16 short steps, against K/BLOCK_K long ones).
PROLOGUE_BLOCK_R = 16


# ---------------------------------------------------------------------------------------------------------
# Which main loop a launch takes. The interpreter, capability and SM count are read through _launch's
# module, so that fastlora.bench_host's stubbed launches (which patch them there) take the GPU path.

# The GPU the interpreter stands in for when a launcher chooses its main loop: 90 takes the TMA kernels
# wherever an sm_90 would, 80 the pointer kernels everywhere (tests set it to check both).
INTERPRETED_ARCH = 90


# Triton 3.4 and 3.5's interpreter checks a descriptor's row stride in elements (a multiple of 16), not
# bytes: under it, those versions take only such tensors.
_ROW_STRIDE_IN_ELEMENTS_WHEN_INTERPRETED = triton_version() < (3, 6)


def _tma_can_load(t: torch.Tensor) -> bool:
    """What a TMA descriptor requires of a 2-D tensor: unit last stride, 16-byte aligned base and row
    stride, no empty dimension."""
    rows, cols = t.shape
    row_stride, col_stride = t.stride()
    unit = 1 if _ROW_STRIDE_IN_ELEMENTS_WHEN_INTERPRETED and _launch.interpreting() else t.element_size()
    return rows > 0 and cols > 0 and col_stride == 1 and row_stride * unit % 16 == 0 and t.data_ptr() % 16 == 0


def uses_tma(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a GEMM on inputs ``a`` and ``b`` (x and W forward, G and W for dX) runs the TMA kernel: on
    NVIDIA sm_90 and newer (or the interpreter standing in for one, see INTERPRETED_ARCH), for tensor-core
    dots (16-bit inputs, or fp32 with tf32 allowed), when TMA can load both; otherwise the pointer kernel,
    which takes any strides. Exact fp32 dots (PyTorch's default precision) run on CUDA cores, and their
    operands read from TMA's swizzled tiles compile to 32 registers and 4 to 10 KB of local memory (sm_90,
    Triton 3.6 and 3.9)."""
    if a.dtype == torch.float32 and dot_precision(a.dtype) == "ieee":
        return False
    if _launch.interpreting():
        arch = INTERPRETED_ARCH
    elif torch.version.hip is not None:  # AMD GPUs have no TMA
        return False
    else:
        arch = _launch.capability(a.device)
    return arch >= 90 and _tma_can_load(a) and _tma_can_load(b)


def _persistent_grid(device: torch.device, tiles: Callable[[dict], int], boxes: Callable[[dict], dict[str, list[int]]],
                     descriptors: dict[str, TensorDescriptor]) -> Callable[[dict], tuple[int]]:  # fmt: skip
    """The launch grid of a persistent TMA kernel: min(#SMs, #tiles) programs (INTERPRETER_PROGRAMS on a
    CPU, which runs only the interpreter). It also gives each host-side descriptor, which carries its box,
    the box of the config being launched: Tunable calls the grid with a config's meta-parameters right
    before each launch of it (timing included), and the kernels assert that the boxes match."""
    programs = _launch.sm_count(device) if device.type == "cuda" else INTERPRETER_PROGRAMS

    def grid(meta: dict) -> tuple[int]:
        for name, box in boxes(meta).items():
            descriptors[name].block_shape = box
        return (min(programs, tiles(meta)),)

    return grid


def _descriptors(boxes: Callable[[dict], dict[str, list[int]]], **tensors: torch.Tensor) -> dict[str, TensorDescriptor]:
    """Host-side descriptors of 2-D tensors, with the interpreter config's boxes until a grid sets others."""
    first = boxes(_INTERPRETER_CONFIG.kwargs)
    return {name: TensorDescriptor(t, [*t.shape], [*t.stride()], first[name]) for name, t in tensors.items()}


# ---------------------------------------------------------------------------------------------------------
# Launchers.


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shrink: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, multi: tuple | None = None,
                    dora: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """Y = x·Wᵀ + b + s·S·Bᵀ, stored once.

    Args:
        x: (M, K), weight: (N, K), bias: (N,) or None, all one dtype; shrink: (M, R) in x's dtype;
        lora_B: (N, R) any floating dtype (cast in registers). Any strides; R may be 0 (no LoRA term).
        multi: for a mixed-adapter batch, (index (M,) int64, ``lora_multi.AdapterTables``): lora_B is then
            (n, N, R) and each row's term is s_a·S·B_aᵀ with its adapter a (``scaling`` unused).
        dora: DoRA at dropout 0, (c (N,) in x's dtype, D (M, N) in x's dtype to fill): the kernel stores
            D = x·Wᵀ + s·S·Bᵀ and returns Y = c ⊙ D + b (dense W, one adapter).

    Returns:
        (M, N), contiguous, in x's dtype.
    """
    m, k = x.shape
    n = weight.shape[0]
    r = lora_B.shape[-1]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    c, d = dora if dora is not None else (y, y)  # (unused pointers without DoRA)
    index, tables = multi if multi is not None else no_multi(x.device)
    stride_ba, stride_bn, stride_br = lora_B.stride() if multi is not None else (0, *lora_B.stride())
    dense = isinstance(weight, torch.Tensor)
    if dense and uses_tma(x, weight):
        flags = dict(HAS_BIAS=bias is not None, DORA=dora is not None, MULTI=multi is not None,
                     DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=PROLOGUE_BLOCK_R)  # fmt: skip
        desc = _descriptors(_fwd_boxes, x_desc=x, w_desc=weight)
        _FWD_TMA.launch(
            _persistent_grid(x.device, lambda meta: cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), _fwd_boxes,
                             desc),
            y, desc["x_desc"], desc["w_desc"], bias if bias is not None else y, shrink, lora_B, c, d, index,
            tables.rank, tables.scale,
            m, n, k, r, scaling,
            shrink.stride(0), shrink.stride(1), stride_ba, stride_bn, stride_br, y.stride(0), y.stride(1),
            d.stride(0), d.stride(1),
            **flags,
        )  # fmt: skip
        return y
    (w, absmax, absmax_code, absmax_scale, absmax_offset, nf4, stride_wn, stride_wk), formats = weight_args(weight, x)
    _FWD.launch(
        lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),),
        x, w, absmax, absmax_code, absmax_scale, absmax_offset, nf4, bias if bias is not None else x, shrink,
        lora_B, y, index, tables.rank, tables.scale, c, d,
        m, n, k, r, scaling,
        x.stride(0), x.stride(1), stride_wn, stride_wk, shrink.stride(0), shrink.stride(1),
        stride_ba, stride_bn, stride_br, y.stride(0), y.stride(1), d.stride(0), d.stride(1),
        HAS_BIAS=bias is not None, DORA=dora is not None, **formats, MULTI=multi is not None, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_R=PROLOGUE_BLOCK_R,
    )  # fmt: skip
    return y


def lora_linear_bwd(grad_y: torch.Tensor, weight: torch.Tensor, d_shrink: torch.Tensor, lora_A: torch.Tensor,
                    dropout_p: float, seed: torch.Tensor | None, multi: tuple | None = None,
                    dora_c: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """dX = G·W + (dS·A) ⊙ m / (1 − p), with the mask regenerated from ``seed``.

    Args:
        grad_y: (M, N) G; weight: (N, K) in G's dtype; d_shrink: (M, R) fp32; lora_A: (R, K) any floating
        dtype. Any strides; R may be 0 (no LoRA term).
        seed: (1,) int64 on G's device when dropout_p > 0.
        multi: for a mixed-adapter batch, (index, tables) as in ``lora_linear_fwd``: lora_A is (n, R, K), each
            row masked with its adapter's probability from the tables (``dropout_p`` unused).
        dora_c: DoRA at dropout 0, c (N,) in G's dtype: dX = (G ⊙ c)·W + dS·A, G scaled in the main loop
            (dense W, one adapter).

    Returns:
        (M, K), contiguous, in G's dtype.
    """
    m, n = grad_y.shape
    k = weight.shape[1]
    r = lora_A.shape[-2]
    dx = torch.empty((m, k), device=grad_y.device, dtype=grad_y.dtype)
    if m == 0:
        return dx
    dense = isinstance(weight, torch.Tensor)
    index, tables = multi if multi is not None else no_multi(grad_y.device)
    stride_aa, stride_ar, stride_ak = lora_A.stride() if multi is not None else (0, *lora_A.stride())
    single_p = 0.0 if multi is not None else dropout_p
    dropout = tables.dropout if multi is not None else dropout_p > 0.0
    if dense and uses_tma(grad_y, weight):
        flags = dict(DROPOUT=dropout, DORA=dora_c is not None, MULTI=multi is not None,
                     DOT_PRECISION=dot_precision(grad_y.dtype), BLOCK_R=PROLOGUE_BLOCK_R)  # fmt: skip
        desc = _descriptors(_bwd_boxes, g_desc=grad_y, w_desc=weight)
        _BWD_TMA.launch(
            _persistent_grid(grad_y.device, lambda meta: cdiv(m, meta["BLOCK_M"]) * cdiv(k, meta["BLOCK_K"]),
                             _bwd_boxes, desc),
            dx, desc["g_desc"], desc["w_desc"], d_shrink, lora_A, seed_pointer(seed, dx),
            dora_c if dora_c is not None else dx, index, tables.rank, tables.threshold, tables.inv_keep,
            m, n, k, r, keep_threshold(single_p), 1.0 / (1.0 - single_p),
            d_shrink.stride(0), d_shrink.stride(1), stride_aa, stride_ar, stride_ak, dx.stride(0), dx.stride(1),
            **flags,
        )  # fmt: skip
        return dx
    (w, absmax, absmax_code, absmax_scale, absmax_offset, nf4, stride_wn, stride_wk), formats = weight_args(weight, grad_y)
    _BWD.launch(
        lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(k, meta["BLOCK_K"]),),
        grad_y, w, absmax, absmax_code, absmax_scale, absmax_offset, nf4, d_shrink, lora_A, dx,
        seed_pointer(seed, grad_y), index, tables.rank, tables.threshold, tables.inv_keep,
        dora_c if dora_c is not None else grad_y,
        m, n, k, r, keep_threshold(single_p), 1.0 / (1.0 - single_p),
        grad_y.stride(0), grad_y.stride(1), stride_wn, stride_wk,
        d_shrink.stride(0), d_shrink.stride(1), stride_aa, stride_ar, stride_ak, dx.stride(0), dx.stride(1),
        DROPOUT=dropout, DORA=dora_c is not None, **formats, MULTI=multi is not None,
        DOT_PRECISION=dot_precision(grad_y.dtype),
        BLOCK_R=PROLOGUE_BLOCK_R,
    )  # fmt: skip
    return dx
