"""How the GEMMs' main loops read a tile of the base weight W: dense, or NF4 codes dequantised in registers.

A launcher passes the weight through ``weight_args`` and the kernel reads each W tile with ``load_w_tile``;
the constexpr WEIGHT_FORMAT picks the code path, so the dense kernels compile exactly as before and a
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

__all__ = ["DENSE", "NF4", "load_w_tile", "weight_args"]

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
    block = e // QBLOCK
    if DOUBLE_QUANT:
        a8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_scale_ptr + block // 256, mask=mask, other=0.0)  # one scale per 256 absmax
        # bitsandbytes rounds the product and the sum separately; the compiler may contract them into
        # one FMA here, which moves absmax by at most one fp32 ulp (well under the compute dtype's).
        absmax = tl.load(absmax_code_ptr + a8) * scale + tl.load(absmax_offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, value * absmax, 0.0)


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
            WEIGHT_FORMAT=DENSE, QBLOCK=1, DOUBLE_QUANT=False
        )
    double = weight.absmax_code is not None
    pointers = (weight.packed, weight.absmax, weight.absmax_code if double else like,
                weight.absmax_scale if double else like, weight.absmax_offset if double else like,
                _nf4_table(weight.packed.device), 0, 0)  # fmt: skip
    return pointers, dict(WEIGHT_FORMAT=NF4, QBLOCK=weight.blocksize, DOUBLE_QUANT=double)
