"""How the GEMMs' main loops read a tile of the base weight W: dense, or NF4 codes dequantised in registers.

A launcher passes the weight through ``weight_args`` and the kernel reads each W tile with ``load_w_tile``
(element by element) or, for an NF4 weight whose rows hold whole blocks, ``load_nf4_rows`` (tile loads);
the constexprs WEIGHT_FORMAT and NF4_ROWS pick the code path, so the dense kernels compile exactly as before and a
quantised base never exists in full precision anywhere, in forward or backward.

NF4 (``fastlora.nf4``, bitsandbytes' layout): W (N, K) flattened row-major, element e = n·K + k is the
nibble ``e % 2`` (even: high) of byte ``e // 2`` of ``packed``; its value is nf4[code] · absmax[e // QBLOCK]
in fp32, with absmax itself rebuilt from 8-bit codes when double-quantised:
absmax_code[absmax[b]] · absmax_scale[b // 256] + absmax_offset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["DENSE", "NF4", "load_nf4_rows", "load_w_tile", "weight_args"]

DENSE = 0
NF4 = 1


@triton.jit
def load_w_tile(w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr,
                rn64, rk64, mask, stride_wn, stride_wk, K,
                WEIGHT_FORMAT: tl.constexpr, QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr):  # fmt: skip
    """W[rn64, rk64] (index tensors broadcast to the tile's shape, int64) where ``mask``, 0 elsewhere.
    Dense: W's own dtype. NF4: fp32 products, which the caller rounds to the compute dtype as
    bitsandbytes' dequantisation does."""
    if WEIGHT_FORMAT == 0:
        return tl.load(w_ptr + rn64 * stride_wn + rk64 * stride_wk, mask=mask, other=0.0)
    e = rn64 * K + rk64
    byte = tl.load(w_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
    code = tl.where((e & 1) == 0, byte >> 4, byte & 0xF)
    value = tl.load(nf4_ptr + code)  # a 16-entry table: stays in L1
    absmax = _absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, e // QBLOCK, mask, DOUBLE_QUANT)
    return tl.where(mask, value * absmax, 0.0)


@triton.jit
def _absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, block, mask, DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of blocks ``block`` (int64 tensor) where ``mask``."""
    # One return: Triton compiles every return of a function, constexpr branches included.
    if DOUBLE_QUANT:
        a8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_scale_ptr + block // 256, mask=mask, other=0.0)  # one scale per 256 absmax
        # bitsandbytes rounds the product and the sum separately; the compiler may contract them into
        # one FMA here, which moves absmax by at most one fp32 ulp (well under the compute dtype's).
        absmax = tl.load(absmax_code_ptr + a8) * scale + tl.load(absmax_offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def load_nf4_rows(w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, rn64, k0, N, K,
                  QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The (BLOCK_N, BLOCK_K) fp32 tile W[rn64, k0 : k0 + BLOCK_K] of an NF4 weight whose rows hold whole
    blocks (K % QBLOCK == 0, so K is even and no block crosses a row), 0 outside W. Row n's codes are the
    K / 2 bytes from n·K / 2: the tile's bytes load as a (BLOCK_N, BLOCK_K / 2) tile, each row contiguous,
    and their absmax as one value per (row, block), broadcast over the block."""
    half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    rows_in = rn64[:, None] < N
    byte = tl.load(w_ptr + rn64[:, None] * (K // 2) + half[None, :], mask=rows_in & (half[None, :] < K // 2),
                   other=0).to(tl.int32)  # fmt: skip
    # Element 2j is byte j's high nibble, 2j + 1 its low one: join along a new last axis, then flatten it.
    values = tl.reshape(tl.join(tl.load(nf4_ptr + (byte >> 4)), tl.load(nf4_ptr + (byte & 0xF))), (BLOCK_N, BLOCK_K))
    per_row = K // QBLOCK
    if BLOCK_K >= QBLOCK:
        nb: tl.constexpr = BLOCK_K // QBLOCK
        col = k0 // QBLOCK + tl.arange(0, nb)
        absmax = _absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                         rn64[:, None] * per_row + col[None, :], rows_in & (col[None, :] < per_row), DOUBLE_QUANT)
        values = tl.reshape(tl.reshape(values, (BLOCK_N, nb, QBLOCK)) * absmax[:, :, None], (BLOCK_N, BLOCK_K))
    else:  # the tile lies inside one block of each row (k0 < K: the main loops start tiles inside W)
        absmax = _absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                         rn64 * per_row + k0 // QBLOCK, rn64 < N, DOUBLE_QUANT)
        values = values * absmax[:, None]
    rk = k0 + tl.arange(0, BLOCK_K)
    return tl.where(rows_in & (rk[None, :] < K), values, 0.0)


_nf4_tables: dict[torch.device, torch.Tensor] = {}


def _nf4_table(device: torch.device) -> torch.Tensor:
    """The 16 NF4 values on ``device``, copied there once (no copy, no sync on later calls)."""
    table = _nf4_tables.get(device)
    if table is None:
        from fastlora.nf4 import nf4_code_table

        table = _nf4_tables[device] = nf4_code_table(device)
    return table


def weight_args(weight, like: torch.Tensor) -> tuple[tuple, dict]:
    """The kernel arguments for ``weight``: (w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,
    absmax_offset_ptr, nf4_ptr, stride_wn, stride_wk) and the constexprs (WEIGHT_FORMAT, QBLOCK,
    DOUBLE_QUANT). ``weight`` is a dense (N, K) tensor or a ``fastlora.nf4.NF4Weight``; unused pointers
    point at ``like``."""
    if isinstance(weight, torch.Tensor):
        return (weight, like, like, like, like, like, weight.stride(0), weight.stride(1)), dict(
            WEIGHT_FORMAT=DENSE, QBLOCK=1, DOUBLE_QUANT=False, NF4_ROWS=False
        )
    double = weight.absmax_code is not None
    pointers = (weight.packed, weight.absmax, weight.absmax_code if double else like,
                weight.absmax_scale if double else like, weight.absmax_offset if double else like,
                _nf4_table(weight.packed.device), 0, 0)  # fmt: skip
    # Rows of whole blocks (every model's K is a multiple of 64) take load_nf4_rows' tile loads; others
    # decode element by element.
    rows = weight.shape[1] % weight.blocksize == 0
    return pointers, dict(WEIGHT_FORMAT=NF4, QBLOCK=weight.blocksize, DOUBLE_QUANT=double, NF4_ROWS=rows)
