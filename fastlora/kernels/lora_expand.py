"""The backward of the expand s·S·Bᵀ: dS = s·G·B and dB = s·Gᵀ·S, reading G once.

G (M × N) is the largest tensor of the backward after x, so both rank-r products come out of one pass
over it (ranks over 256 take one pass per 256). Program (i, j) owns the row block i and the column range
j of G:

- dS for its rows accumulates in registers over its columns, then goes to ``d_shrink_partial[j]``;
- dB for each column block of its range goes to ``d_b_partial[i]``.

The launcher sums the partials in a fixed order (no atomics: bitwise-reproducible). The dB partials
cost 4·R/BLOCK_M bytes per byte of G (0.25 at r = 16 with 256-row blocks); BLOCK_M grows as far as the
rank's registers allow.

Shapes: G (M, N), B (N, R), S (M, R); returns dS (M, R) fp32 and dB (N, R) in B's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels._launch import Tunable, cdiv, dot_precision, interpreting, rank_block, sm_count

__all__ = ["lora_expand_bwd"]


@triton.jit
def _lora_expand_bwd_kernel(
    g_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, d_ptr, gd_ptr,
    M, N, R, cols_per_split,
    stride_gm, stride_gn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dss, stride_dsm, stride_dsr, stride_dbs, stride_dbn, stride_dbr,
    stride_dm, stride_dn, stride_gds, stride_gdn,
    DORA: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)  # ranks past 256 take more programs
    rm64 = rm.to(tl.int64)
    row_ok = rm < M
    dtype = g_ptr.dtype.element_ty
    s = tl.load(s_ptr + rm64[:, None] * stride_sm + rr[None, :] * stride_sr,
                mask=row_ok[:, None] & (rr[None, :] < R), other=0.0).to(dtype)  # fmt: skip
    d_shrink = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_start = pid_s * cols_per_split
    n_end = tl.minimum(n_start + cols_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        rn64 = rn.to(tl.int64)
        col_ok = rn < n_end
        g = tl.load(g_ptr + rm64[:, None] * stride_gm + rn64[None, :] * stride_gn,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        b = tl.load(b_ptr + rn64[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=col_ok[:, None] & (rr[None, :] < R), other=0.0)  # fmt: skip
        d_shrink = tl.dot(g, b.to(dtype), d_shrink, input_precision=DOT_PRECISION)
        d_b = tl.dot(tl.trans(g), s, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_R)
        tl.store(db_ptr + pid_m * stride_dbs + rn64[:, None] * stride_dbn + rr[None, :] * stride_dbr, d_b,
                 mask=col_ok[:, None] & (rr[None, :] < R))  # fmt: skip
        if DORA:  # DoRA's Σ_rows G ⊙ D per column (m's gradient), from the G tile already here
            if tl.program_id(2) == 0:
                d = tl.load(d_ptr + rm64[:, None] * stride_dm + rn64[None, :] * stride_dn,
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
                g_d = tl.sum(g.to(tl.float32) * d.to(tl.float32), axis=0)
                tl.store(gd_ptr + pid_m * stride_gds + rn64 * stride_gdn, g_d, mask=col_ok)
    tl.store(ds_ptr + pid_s * stride_dss + rm64[:, None] * stride_dsm + rr[None, :] * stride_dsr, d_shrink,
             mask=row_ok[:, None] & (rr[None, :] < R))  # fmt: skip


def _cfg(bn, warps, stages):
    return triton.Config({"BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _configs(flags: dict, arch: int, itemsize: int) -> list[triton.Config]:
    """8 warps throughout: the row block is tall (up to 256 rows) and G's tile is read twice, once
    transposed. Wider ranks keep S, B and the dB partial (each BLOCK_R wide) live: narrower G tiles. DoRA's
    D tile beside G's (DORA) takes the narrow tile at every rank, in two stages (32-column tiles spill 104 to
    200 bytes on sm_90, Triton 3.9)."""
    if flags.get("DORA"):
        return [_cfg(16, 8, 2)]
    if flags["BLOCK_R"] <= 64:
        # A 64-column G tile (BLOCK_R <= 32, 16-bit, sm_90) fits in 255 registers on Triton 3.9 only: it
        # spills 368 bytes on 3.4 and 16 on 3.6 and 3.7. Four stages spill 8 bytes on sm_80 with Triton 3.4.
        return [_cfg(32, 8, 3), _cfg(32, 8, 4)] if arch >= 90 else [_cfg(32, 8, 3)]
    return [_cfg(16, 8, 2)]


_BWD = Tunable(_lora_expand_bwd_kernel, _configs, key=["M", "N", "R"], interpreter_config=_cfg(32, 1, 1))


def _block_m(block_r: int, dora: bool = False) -> int:
    """Row block: as tall as a (BLOCK_M × BLOCK_R) fp32 accumulator of 8192 values allows (32 registers a
    thread at 8 warps), since the dB partials cost 4·R/BLOCK_M of G's traffic; half that with DoRA's D tile
    to hold as well. Fixed per rank rather than autotuned, because the partials' buffer is sized by it before
    the launch."""
    return max(32, min(256, 8192 // block_r) // (2 if dora else 1))


# With DoRA's D tile the rank runs in steps of at most 128 lanes (a 256-lane step spills 8 bytes on sm_90).
DORA_MAX_BLOCK_R = 128


# Column splits per row block: the second grid axis, so that short M still fills the GPU.
_TARGET_PROGRAMS_PER_SM = 2


def _col_splits(row_programs: int, n: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1 if n <= 64 else 2  # two splits under the interpreter, so tests cover the partial sums
    sms = sm_count(device)
    return max(1, min(cdiv(_TARGET_PROGRAMS_PER_SM * sms, row_programs), cdiv(n, 256)))


def lora_expand_bwd(grad_y: torch.Tensor, lora_B: torch.Tensor, shrink: torch.Tensor, scaling: float,
                    dora_d: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """dS = s·G·B (M, R) fp32 and dB = s·Gᵀ·S (N, R) in lora_B's dtype; with ``dora_d`` also Σ_rows G ⊙ D
    (N,) fp32, DoRA's m gradient before the norm, from the same pass over G.

    Args:
        grad_y: (M, N) G, any strides, x's dtype.
        lora_B: (N, R), any floating dtype (cast to G's dtype in registers).
        shrink: (M, R) S, G's dtype.
        dora_d: (M, N) DoRA's unscaled output D, any strides, or None.
    """
    m, n = grad_y.shape
    r = lora_B.shape[1]
    if m == 0:
        empty = torch.zeros((0, r), device=grad_y.device, dtype=torch.float32), torch.zeros_like(lora_B)
        return empty if dora_d is None else (*empty, torch.zeros(n, device=grad_y.device, dtype=torch.float32))
    dora = dora_d is not None
    block_r = min(rank_block(r), DORA_MAX_BLOCK_R) if dora else rank_block(r)
    block_m = 16 if interpreting() else _block_m(block_r, dora)
    splits = _col_splits(cdiv(m, block_m), n, grad_y.device)
    cols_per_split = cdiv(n, splits)
    ds_partial = torch.empty((splits, m, r), device=grad_y.device, dtype=torch.float32)
    db_partial = torch.empty((cdiv(m, block_m), n, r), device=grad_y.device, dtype=torch.float32)
    d = dora_d if dora_d is not None else grad_y  # (unused without DoRA)
    gd_partial = ds_partial[0]  # (unused without DoRA: no allocation for it)
    if dora_d is not None:
        gd_partial = torch.empty((cdiv(m, block_m), n), device=grad_y.device, dtype=torch.float32)
    _BWD.launch(
        lambda meta: (cdiv(m, block_m), splits, cdiv(r, block_r)),
        grad_y, lora_B, shrink, ds_partial, db_partial, d, gd_partial,
        m, n, r, cols_per_split,
        grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1), shrink.stride(0), shrink.stride(1),
        ds_partial.stride(0), ds_partial.stride(1), ds_partial.stride(2),
        db_partial.stride(0), db_partial.stride(1), db_partial.stride(2),
        d.stride(0), d.stride(1), gd_partial.stride(0), gd_partial.stride(1),
        DORA=dora_d is not None, DOT_PRECISION=dot_precision(grad_y.dtype), BLOCK_M=block_m, BLOCK_R=block_r,
    )  # fmt: skip
    # A single partial is the sum: scaled in place rather than copied (host time at small sizes).
    d_shrink = (ds_partial[0] if splits == 1 else ds_partial.sum(0)).mul_(scaling)
    d_b = (db_partial[0] if db_partial.shape[0] == 1 else db_partial.sum(0)).mul_(scaling).to(lora_B.dtype)
    if dora_d is None:
        return d_shrink, d_b
    return d_shrink, d_b, gd_partial.sum(0)
