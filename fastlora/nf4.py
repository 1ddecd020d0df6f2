"""The 4-bit NormalFloat (NF4) weight format of QLoRA, byte for byte the one bitsandbytes stores.

``quantize`` gives the same packed bytes, absmax (and double-quantisation state) as
``bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics, quant_type="nf4")`` on the CPU,
and ``dequantize`` the same values as bitsandbytes' ``dequantize_4bit``, bit for bit, without importing
bitsandbytes. Only ``NF4Weight.from_bnb`` / ``to_bnb_quant_state`` import it, lazily.

Layout (what a kernel reads)
----------------------------
A weight W of shape (N, K) = (out_features, in_features) is flattened in row-major order: element (n, k)
is flat element ``e = n·K + k``. The flat weight is cut into blocks of ``blocksize`` consecutive elements,
**across row ends**: a row may start in the middle of a block when K is not a multiple of blocksize.

* ``packed``: uint8, shape (ceil(N·K / 2), 1), the shape bitsandbytes gives its ``Params4bit`` data.
  Element e is in byte ``e // 2``; the **high** nibble (bits 7..4) holds the even element, the low nibble
  (bits 3..0) the odd one: ``code = (packed[e // 2] >> (4 * (1 - e % 2))) & 0xF``. When N·K is odd the
  last low nibble is padding and holds code 7 (the value 0.0: bitsandbytes quantises a padded zero).
* ``nf4_code_table()[code]`` is the element's value in [-1, 1] (16 fp32 values, ascending).
* ``absmax``: one entry per block, block ``b = e // blocksize``, ceil(N·K / blocksize) entries. Without
  double quantisation it is fp32: the largest |w| of the block. (An all-zero full block stores 0; an
  all-zero ragged last block stores 1e-38 rounded to fp32, because bitsandbytes clamps that one only.)
* With double quantisation ``absmax`` holds uint8 codes instead, and the fp32 absmax is rebuilt as
  ``absmax_code[absmax[b]] * absmax_scale[b // 256] + absmax_offset`` — two separately rounded fp32
  operations (a fused multiply-add can differ in the last bit). ``absmax_offset`` is the mean of the
  fp32 absmax, ``absmax_scale`` the largest |absmax - offset| of each run of 256 blocks, and
  ``absmax_code`` bitsandbytes' 256-entry signed "dynamic" 8-bit table (``dynamic_code_table()``).
* The dequantised value is ``nf4[code] * absmax_fp32[b]`` computed in fp32 (one rounding), then rounded
  to the output dtype (round to nearest even).

``element_location(n, k, in_features, blocksize)`` returns these indices for one element.

Quantisation, as bitsandbytes does it on the CPU
------------------------------------------------
Each block is scaled by the reciprocal of its absmax (``w * (1 / absmax)``; the ragged last block is
divided instead, ``w / absmax``), clamped to [-1, 1] and given the code whose value is nearest; a value
exactly half-way between two codes gets the lower one. The input is converted to fp32 first, so fp16 and
bf16 weights are quantised exactly as their fp32 values would be. Double quantisation runs bitsandbytes'
8-bit blockwise quantiser (blocks of 256) on ``absmax - mean(absmax)``; that quantiser does not pick the
nearest code but looks it up in a 65536-entry table over [-1, 1], which ``_quantize_absmax`` reproduces.

Two things bitsandbytes 0.50.2 does on some CPUs that this module deliberately does not copy (both are
worked around or documented in tests/test_nf4.py): its AVX-512 dequantiser indexes absmax per row
instead of per flat block, so it returns wrong values when K is a multiple of 16 but not of blocksize
(its scalar CPU kernel, its PyTorch reference kernel and this module agree); and its AVX512-BF16 path flushes
subnormal products to zero when dequantising to bf16 (only reachable with blocks whose absmax is below
about 1e-38).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from fastlora._checks import check_bool

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState

__all__ = [
    "NF4_BLOCKSIZES",
    "ABSMAX_BLOCKSIZE",
    "DTYPES",
    "NF4Weight",
    "count_non_finite",
    "quantize",
    "dequantize",
    "dequantize_rows",
    "nf4_code_table",
    "dynamic_code_table",
    "element_location",
]

# The blocksizes bitsandbytes' quantize_4bit / dequantize_4bit accept (the CPU backend takes all of them).
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# bitsandbytes double-quantises absmax in blocks of 256, whatever the 4-bit blocksize.
ABSMAX_BLOCKSIZE = 256
# The dtypes NF4 quantises from and dequantises into (what the fused GEMMs compute in).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# bitsandbytes.functional.get_4bit_type("nf4"): the 16 NF4 values, as Python floats rounded to fp32.
_NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# Elements handled per step by quantize: bounds its temporaries (about 13 bytes an element) to some 13 MiB
# whatever the weight's size. A multiple of every blocksize, so steps end on block and byte boundaries.
_QUANTIZE_CHUNK = 1 << 20
# Size of bitsandbytes' CPU lookup table from a value in [-1, 1] to an 8-bit code (kLUTSize in cpu_ops.cpp).
_LUT_SIZE = 65536


def nf4_code_table(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values, ascending, exactly bitsandbytes' ``get_4bit_type("nf4")``.

    Returns:
        (16,) fp32 tensor; entry ``c`` is the value of 4-bit code ``c`` before scaling by absmax.
    """
    return torch.tensor(_NF4_VALUES, dtype=torch.float32, device=device)


@functools.cache
def _dynamic_code_cpu() -> torch.Tensor:
    # bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), the same
    # torch operations in the same order so that every entry rounds the same way: for each decimal exponent
    # 10^(i-6), the midpoints of 2^i equal steps of [0.1, 1], both signs; then 0 and 1.
    values: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist()
        values += (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_code_table(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" table (``create_dynamic_map()``), the code of double-quantised
    absmax.

    Returns:
        (256,) fp32 tensor, ascending, in [-0.993, 1.0].
    """
    # A copy: each weight owns its table (safetensors refuses tensors that share memory).
    return _dynamic_code_cpu().to(device, copy=True)


@functools.cache
def _nf4_midpoints(device: torch.device) -> torch.Tensor:
    # The bucket edges bitsandbytes' quantiser uses: fp32 midpoints of adjacent codes. Built on the CPU:
    # (15,) fp32.
    code = nf4_code_table()
    return ((code[:-1] + code[1:]) / 2).to(device)


@functools.cache
def _absmax_lut(device: torch.device) -> torch.Tensor:
    # build_quantize_lut in bitsandbytes' csrc/cpu_ops.cpp: grid point i stands for -1 + 2i / 65535 and
    # maps to the number of code midpoints strictly below it. Built on the CPU because CUDA turns a
    # division by a scalar into a multiplication by its reciprocal, which rounds differently. (65536,) int64.
    code = _dynamic_code_cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = torch.arange(_LUT_SIZE, dtype=torch.float32)
    values = -1.0 + (2.0 * grid) / torch.full_like(grid, _LUT_SIZE - 1)
    return torch.searchsorted(midpoints, values, side="left").to(device)


def element_location(n: int, k: int, in_features: int, blocksize: int) -> tuple[int, int, int, int]:
    """Where element (n, k) of an (out_features, in_features) NF4 weight lives.

    Returns:
        ``(byte, shift, block, scale_block)``: its code is ``(packed[byte] >> shift) & 0xF`` (shift 4 for
        the high nibble, which holds even flat elements, 0 for the low one); its absmax (fp32, or uint8 code
        when double-quantised) is ``absmax[block]``; with double quantisation the code is rescaled by
        ``absmax_scale[scale_block]``.
    """
    e = n * in_features + k
    block = e // blocksize
    return e // 2, 4 * (1 - e % 2), block, block // ABSMAX_BLOCKSIZE


def _describe(t: object) -> str:
    if not isinstance(t, torch.Tensor):
        return f"{type(t).__name__}"
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_blocksize(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in NF4_BLOCKSIZES:
        raise ValueError(f"{name}: expected one of {NF4_BLOCKSIZES} (the blocksizes bitsandbytes supports), "
                         f"got {value!r}")  # fmt: skip
    return int(value)


def _check_out_dtype(name: str, value: object) -> torch.dtype:
    if value not in DTYPES:
        raise TypeError(f"{name}: expected one of torch.float32, torch.float16, torch.bfloat16, got {value!r}")
    return value  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class NF4Weight:
    """An NF4-quantised (out_features, in_features) weight. See the module docstring for the layout.

    Fields (all tensors on one device, contiguous):
        packed: (ceil(numel / 2), 1) uint8, two 4-bit codes per byte, the even element in the high nibble.
        absmax: (n_blocks,) fp32 per-block absmax, or (n_blocks,) uint8 codes when double-quantised;
            n_blocks = ceil(numel / blocksize).
        shape: (out_features, in_features) of the original weight.
        blocksize: elements per absmax block, one of ``NF4_BLOCKSIZES``.
        dtype: the original weight's dtype, which ``dequantize`` returns by default.
        absmax_scale: (ceil(n_blocks / 256),) fp32, double quantisation only, else None.
        absmax_offset: () fp32, double quantisation only, else None.
        absmax_code: (256,) fp32 table of the uint8 absmax codes, double quantisation only, else None.

    The invariants (sizes, dtypes, devices, contiguity) are checked once, here; everything that takes an
    NF4Weight relies on them. Build one with ``quantize``, ``from_bnb`` or ``from_tensors``.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    blocksize: int
    dtype: torch.dtype
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    absmax_code: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shape = self.shape
        if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):  # fmt: skip
            raise ValueError(f"shape: expected (out_features, in_features), two integers >= 1, got {shape!r}")
        object.__setattr__(self, "shape", (int(shape[0]), int(shape[1])))
        object.__setattr__(self, "blocksize", _check_blocksize("blocksize", self.blocksize))
        _check_out_dtype("dtype", self.dtype)

        numel = self.numel
        device = self.packed.device if isinstance(self.packed, torch.Tensor) else None
        n_blocks = self.n_blocks
        double = self.absmax_scale is not None or self.absmax_offset is not None or self.absmax_code is not None
        if double and (self.absmax_scale is None or self.absmax_offset is None or self.absmax_code is None):
            missing = [f for f in ("absmax_scale", "absmax_offset", "absmax_code") if getattr(self, f) is None]
            raise ValueError(f"{', '.join(missing)}: double quantisation needs absmax_scale, absmax_offset and "
                             f"absmax_code together; got None for {', '.join(missing)}")  # fmt: skip
        expected = {
            "packed": ((numel + 1) // 2, 1, torch.uint8),
            "absmax": (n_blocks, None, torch.uint8 if double else torch.float32),
        }
        if double:
            expected["absmax_scale"] = (-(-n_blocks // ABSMAX_BLOCKSIZE), None, torch.float32)
            expected["absmax_offset"] = (None, None, torch.float32)
            expected["absmax_code"] = (256, None, torch.float32)
        for name, (rows, cols, dtype) in expected.items():
            t = getattr(self, name)
            want_shape = () if rows is None else (rows,) if cols is None else (rows, cols)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor of shape {want_shape}, got {type(t).__name__}")
            if t.dtype != dtype:
                raise TypeError(f"{name}: expected dtype {dtype}, got {_describe(t)}")
            if tuple(t.shape) != want_shape:
                raise ValueError(f"{name}: expected shape {want_shape} for a {self.shape[0]}x{self.shape[1]} "
                                 f"weight in blocks of {self.blocksize}, got {_describe(t)}")  # fmt: skip
            if t.device != device:
                raise ValueError(f"{name}: expected device {device} (packed's), got {_describe(t)}")
            if not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")

    @property
    def double_quant(self) -> bool:
        """Whether absmax is stored as 8-bit codes (bitsandbytes' ``compress_statistics``)."""
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes, absmax and, when double-quantised, scales, offset and code table."""
        return sum(t.nbytes for t in self._tensors().values())

    @property
    def bits_per_parameter(self) -> float:
        return self.nbytes * 8 / self.numel

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("packed", "absmax", "absmax_scale", "absmax_offset", "absmax_code")
        return {f: getattr(self, f) for f in names if getattr(self, f) is not None}

    def to(self, device: torch.device | str) -> NF4Weight:
        """The same weight with every tensor on ``device`` (tensors already there are shared, not copied)."""
        return dataclasses.replace(self, **{f: t.to(device) for f, t in self._tensors().items()})

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={self.shape}, blocksize={self.blocksize}, dtype={self.dtype}, "
                f"double_quant={self.double_quant}, device={self.device}, nbytes={self.nbytes})")  # fmt: skip

    # ---- safetensors-friendly form --------------------------------------------------------------------

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Every field as a tensor, keyed ``prefix + name``, for ``safetensors.torch.save_file``.

        Besides the tensor fields: ``shape`` (2,) int64, ``blocksize`` () int64 and ``dtype``, an empty
        tensor whose dtype is the weight's (safetensors keeps dtypes, not Python objects).
        """
        out = {prefix + f: t for f, t in self._tensors().items()}
        out[prefix + "shape"] = torch.tensor(self.shape, dtype=torch.int64)
        out[prefix + "blocksize"] = torch.tensor(self.blocksize, dtype=torch.int64)
        out[prefix + "dtype"] = torch.empty(0, dtype=self.dtype)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> NF4Weight:
        """Rebuild the weight ``to_tensors(prefix)`` wrote, without requantising. Keys without ``prefix``
        are ignored, so one file can hold many weights."""
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors: expected a mapping of names to tensors, got {type(tensors).__name__}")
        required = ("packed", "absmax", "shape", "blocksize", "dtype")
        missing = [prefix + k for k in required if prefix + k not in tensors]
        if missing:
            raise ValueError(f"tensors: expected keys {[prefix + k for k in required]}, missing {missing}")
        shape, blocksize = tensors[prefix + "shape"], tensors[prefix + "blocksize"]
        if shape.dtype != torch.int64 or tuple(shape.shape) != (2,):
            raise ValueError(f"{prefix}shape: expected a (2,) int64 tensor, got {_describe(shape)}")
        if blocksize.dtype != torch.int64 or blocksize.numel() != 1:
            raise ValueError(f"{prefix}blocksize: expected a () int64 tensor, got {_describe(blocksize)}")
        return cls(
            packed=tensors[prefix + "packed"],
            absmax=tensors[prefix + "absmax"],
            shape=tuple(shape.tolist()),
            blocksize=int(blocksize.item()),
            dtype=tensors[prefix + "dtype"].dtype,
            absmax_scale=tensors.get(prefix + "absmax_scale"),
            absmax_offset=tensors.get(prefix + "absmax_offset"),
            absmax_code=tensors.get(prefix + "absmax_code"),
        )

    # ---- bitsandbytes interchange (bitsandbytes imported lazily, here only) ----------------------------

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state: QuantState) -> NF4Weight:
        """Wrap bitsandbytes' NF4 data and ``QuantState`` (e.g. a ``Params4bit``'s ``.data`` and
        ``.quant_state``) without requantising; the tensors are shared, not copied.

        Args:
            packed: (ceil(numel / 2), 1) uint8, or another ``quant_storage`` dtype holding the same bytes.
            quant_state: a ``bitsandbytes.functional.QuantState`` with quant_type "nf4" and a 2-D shape.
        """
        from bitsandbytes.functional import QuantState

        if not isinstance(quant_state, QuantState):
            raise TypeError(f"quant_state: expected a bitsandbytes QuantState, got {type(quant_state).__name__}")
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"packed: expected a torch.Tensor, got {type(packed).__name__}")
        qs = quant_state
        if qs.quant_type != "nf4":
            raise ValueError(f"quant_state.quant_type: expected 'nf4', got {qs.quant_type!r}")
        if qs.shape is None or len(qs.shape) != 2:
            raise ValueError(f"quant_state.shape: expected a 2-D (out_features, in_features) weight, "
                             f"got {qs.shape!r}")  # fmt: skip
        code = qs.code
        if not isinstance(code, torch.Tensor) or not torch.equal(code.detach().cpu().float(), nf4_code_table()):
            raise ValueError(f"quant_state.code: expected the 16 NF4 values of nf4_code_table(), got {code!r}")
        if packed.dtype != torch.uint8:
            # A quant_storage other than uint8 (e.g. bf16 for FSDP) holds the same bytes, as bitsandbytes
            # reads them: A.view(torch.uint8).
            packed = packed.contiguous().view(torch.uint8).reshape(-1, 1)
        scale = offset = absmax_code = None
        if qs.nested:
            state2 = qs.state2
            if state2.blocksize != ABSMAX_BLOCKSIZE:
                raise ValueError(f"quant_state.state2.blocksize: expected {ABSMAX_BLOCKSIZE}, "
                                 f"got {state2.blocksize!r}")  # fmt: skip
            scale, absmax_code = state2.absmax, state2.code
            offset = qs.offset
            if not isinstance(offset, torch.Tensor):
                offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
            offset = offset.reshape(())
        return cls(packed=packed, absmax=qs.absmax, shape=tuple(qs.shape), blocksize=qs.blocksize,
                   dtype=qs.dtype, absmax_scale=scale, absmax_offset=offset, absmax_code=absmax_code)  # fmt: skip

    def to_bnb_quant_state(self) -> QuantState:
        """The ``bitsandbytes.functional.QuantState`` bitsandbytes would have made for this weight (use it
        with ``self.packed``); tensors are shared, not copied."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.absmax_scale, code=self.absmax_code, blocksize=ABSMAX_BLOCKSIZE,
                                dtype=torch.float32)  # fmt: skip
        return QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=nf4_code_table(self.device),
                          blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype, offset=self.absmax_offset,
                          state2=state2)  # fmt: skip


# ---- quantisation ----------------------------------------------------------------------------------------


def _quantize_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU 8-bit blockwise quantiser (quantize_cpu_impl) with the dynamic table, blocks of 256.

    Args:
        x: (m,) fp32, finite.

    Returns:
        codes (m,) uint8 and scales (ceil(m / 256),) fp32 (each block's largest |x|).
    """
    m = x.numel()
    n_scales = -(-m // ABSMAX_BLOCKSIZE)
    # Zero padding changes no block's max |x| (the C loop starts its max at 0) and is cut off below.
    blocks = torch.nn.functional.pad(x, (0, n_scales * ABSMAX_BLOCKSIZE - m)).view(n_scales, ABSMAX_BLOCKSIZE)
    scales = blocks.abs().amax(dim=1)
    zero = scales == 0
    inv = torch.ones_like(scales) / scales.masked_fill(zero, 1.0)  # 1.0f / absmax_block: a true division
    v = torch.clamp(blocks * inv[:, None], -1.0, 1.0)
    # norm_to_lut_index: (v + 1) * 0.5 * 65535 + 0.5, truncated. The C compiler may fuse the last multiply
    # and add; checked over every fp32 in [-1, 1], fused or not picks the same table entry.
    index = ((v + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _absmax_lut(x.device)[index]
    codes = codes.masked_fill(zero[:, None], 0)  # an all-zero block is written as code 0, not looked up
    return codes.to(torch.uint8).view(-1)[:m], scales


# Rows of a weight checked per step for NaN/Inf: torch.isfinite holds |W| and three boolean masks, so a
# whole-weight check would cost more than the quantisation's own temporaries (quantising a model holds at
# most one layer's full-precision weight extra); about a million elements at a time instead.
_FINITE_CHECK_CHUNK = 1 << 20


def _row_chunks(weight: torch.Tensor):
    """(first row, rows) of a 2-D weight, about _FINITE_CHECK_CHUNK elements at a time."""
    rows = max(1, _FINITE_CHECK_CHUNK // max(1, weight.shape[-1]))
    for start in range(0, weight.shape[0], rows):
        yield start, weight[start : start + rows]


@torch.no_grad()
def count_non_finite(weight: torch.Tensor) -> int:
    """How many NaN/Inf a 2-D weight holds, counted in row chunks (no mask of the whole weight)."""
    return sum(int((~torch.isfinite(chunk)).sum()) for _, chunk in _row_chunks(weight))


@torch.no_grad()
def quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantise a 2-D weight to NF4, bit for bit as bitsandbytes'
    ``quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")``
    on the CPU.

    Args:
        weight: (out_features, in_features) fp32, fp16 or bf16, finite. Only 2-D weights: fastlora's NF4
            weights are linear layers' (bitsandbytes also flattens other shapes; this module does not).
            numel need not be a multiple of blocksize: the last block is then shorter, as in bitsandbytes.
        blocksize: elements per absmax block, one of ``NF4_BLOCKSIZES``.
        double_quant: store absmax as 8-bit codes (bitsandbytes' ``compress_statistics``).

    Returns:
        An NF4Weight on weight's device whose ``dtype`` is weight's dtype.

    The bit-exact contract is with bitsandbytes on the CPU. On another device the same operations run,
    but the mean of absmax (the double-quantisation offset) is summed in that device's order.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in DTYPES:
        raise TypeError(f"weight: expected dtype torch.float32, torch.float16 or torch.bfloat16, "
                        f"got {_describe(weight)}")  # fmt: skip
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2-D (out_features, in_features), got {_describe(weight)}")
    if weight.numel() == 0:
        raise ValueError(f"weight: expected at least one element, got {_describe(weight)}")
    blocksize = _check_blocksize("blocksize", blocksize)
    double_quant = check_bool("double_quant", double_quant)
    count = count_non_finite(weight)
    if count:
        n, k = next((start + int(i), int(j)) for start, chunk in _row_chunks(weight)
                    for i, j in (~torch.isfinite(chunk)).nonzero()[:1])  # fmt: skip
        raise ValueError(f"weight: expected finite values, got {count} NaN/Inf, the first at ({n}, {k}) "
                         f"= {weight[n, k].item()}")  # fmt: skip

    flat = weight.reshape(-1)
    numel = flat.numel()
    full = numel - numel % blocksize
    n_blocks = -(-numel // blocksize)
    midpoints = _nf4_midpoints(weight.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=weight.device)
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=weight.device)

    def pack(scaled: torch.Tensor, start: int) -> None:
        # right=False: a value exactly on a midpoint takes the lower code, as bitsandbytes' bucketize does.
        q = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
        packed[start // 2 : start // 2 + q.numel() // 2] = (q[0::2] << 4) | q[1::2]

    # The expressions below are bitsandbytes' (backends/default/ops.py), operation for operation: multiply by
    # the reciprocal of the clamped absmax for full blocks, store the unclamped absmax.
    for start in range(0, full, _QUANTIZE_CHUNK):
        stop = min(start + _QUANTIZE_CHUNK, full)
        blocks = flat[start:stop].float().view(-1, blocksize)
        block_max = blocks.abs().amax(dim=-1)
        absmax[start // blocksize : stop // blocksize] = block_max
        pack(torch.clamp(blocks * (1.0 / block_max.clamp(min=1e-38).view(-1, 1)), -1, 1).view(-1), start)
    if full < numel:
        # The ragged last block: bitsandbytes divides by its absmax and stores it clamped.
        tail = flat[full:].float()
        tail_max = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = tail_max
        scaled = torch.clamp(tail / tail_max, -1, 1)
        if numel % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))  # the pad quantises to code 7 (0.0), as in bnb
        pack(scaled, full)

    common = dict(packed=packed.view(-1, 1), shape=tuple(weight.shape), blocksize=blocksize, dtype=weight.dtype)
    if not double_quant:
        return NF4Weight(absmax=absmax, **common)
    offset = absmax.mean()
    codes, scales = _quantize_absmax(absmax - offset)
    return NF4Weight(absmax=codes, absmax_scale=scales, absmax_offset=offset,
                     absmax_code=dynamic_code_table(weight.device), **common)  # fmt: skip


# ---- dequantisation --------------------------------------------------------------------------------------


def _absmax_fp32(q: NF4Weight, start: int, stop: int) -> torch.Tensor:
    """fp32 absmax of blocks [start, stop): (stop - start,)."""
    if not q.double_quant:
        return q.absmax[start:stop]
    first = start // ABSMAX_BLOCKSIZE
    scales = q.absmax_scale[first : -(-stop // ABSMAX_BLOCKSIZE)].repeat_interleave(ABSMAX_BLOCKSIZE)
    scales = scales[start - first * ABSMAX_BLOCKSIZE : stop - first * ABSMAX_BLOCKSIZE]
    # Two roundings, multiply then add, as bitsandbytes (dequantize_blockwise, then absmax += offset).
    return q.absmax_code[q.absmax[start:stop].int()] * scales + q.absmax_offset


@functools.lru_cache(maxsize=None)
def _byte_table(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: byte b -> (nf4[b >> 4], nf4[b & 0xF])."""
    nf4 = nf4_code_table(device)
    return torch.stack((nf4.repeat_interleave(16), nf4.repeat(16)), dim=1).contiguous()


def _dequantize_span(q: NF4Weight, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Flat elements [start, stop) of the weight: (stop - start,) in dtype. Decodes the whole blocks around
    the span: besides the result, at most about 9 bytes per element of the span plus two blocks."""
    bs = q.blocksize
    first, last = start // bs, -(-stop // bs)
    base = first * bs  # even: every blocksize is
    n_bytes = (last - first) * bs // 2
    raw = q.packed.view(-1)[base // 2 : base // 2 + n_bytes]
    if raw.numel() < n_bytes:  # the ragged last block; its padding nibbles are cut off below
        raw = torch.nn.functional.pad(raw, (0, n_bytes - raw.numel()))
    # One lookup per byte into a 256-entry table of both its values (high nibble first), read as one int64
    # each: on the CPU a tenth of the time of splitting nibbles and looking each up, and a third of a lookup
    # of two fp32 rows.
    pairs = torch.index_select(_byte_table(q.device).view(torch.int64).view(-1), 0, raw.int())
    values = pairs.view(torch.float32).view(last - first, bs)
    absmax = _absmax_fp32(q, first, last)[:, None]
    if start == base and stop == last * bs:  # whole blocks (the usual span): no trimming
        # The product is computed in fp32 (one rounding, as bitsandbytes) and rounded to dtype in the same
        # pass: mul with an output of another dtype promotes its inputs, then casts.
        return torch.mul(values, absmax, out=torch.empty(values.shape, dtype=dtype, device=values.device)).view(-1)
    values.mul_(absmax)
    return values.view(-1)[start - base : stop - base].to(dtype)


@torch.no_grad()
def dequantize(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole weight, bit for bit bitsandbytes' ``dequantize_4bit(q.packed, q.to_bnb_quant_state())``.

    Args:
        q: the NF4 weight.
        dtype: fp32, fp16 or bf16; default ``q.dtype``.

    Returns:
        (out_features, in_features) tensor of dtype on q's device.
    """
    if not isinstance(q, NF4Weight):
        raise TypeError(f"q: expected an NF4Weight, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else _check_out_dtype("dtype", dtype)
    return _dequantize_span(q, 0, q.numel, dtype).view(q.shape)


@torch.no_grad()
def dequantize_rows(q: NF4Weight, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows [start, stop) of the weight, equal to ``dequantize(q, dtype)[start:stop]`` without decoding the
    rest: temporary memory is proportional to the rows asked for (plus at most two blocks), so a GEMM can
    walk W in row chunks. Rows may begin or end inside a block.

    Args:
        q: the NF4 weight, shape (N, K).
        start, stop: 0 <= start <= stop <= N.
        dtype: fp32, fp16 or bf16; default ``q.dtype``.

    Returns:
        (stop - start, K) tensor of dtype on q's device.
    """
    if not isinstance(q, NF4Weight):
        raise TypeError(f"q: expected an NF4Weight, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else _check_out_dtype("dtype", dtype)
    rows, cols = q.shape
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}: expected an integer row index, got {value!r} ({type(value).__name__})")
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"start, stop: expected 0 <= start <= stop <= {rows} (out_features), "
                         f"got start={start}, stop={stop}")  # fmt: skip
    if start == stop:
        return torch.empty((0, cols), dtype=dtype, device=q.device)
    return _dequantize_span(q, start * cols, stop * cols, dtype).view(stop - start, cols)
