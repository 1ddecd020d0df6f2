"""fastlora.nf4 against bitsandbytes (bit for bit) and against the layout its docstring promises.

The comparisons with bitsandbytes skip when it is not installed; the layout, chunking, serialisation and
error tests run without it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastlora import nf4
from fastlora.nf4 import NF4Weight, dequantize, dequantize_rows, quantize

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Odd row counts; in_features a multiple of every blocksize (4096), of some (64, 128), of none (96, 48: rows
# straddle blocks), odd (33: an odd numel, so a padding nibble) and a ragged last block for every blocksize.
SHAPES = ((7, 64), (33, 128), (64, 4096), (7, 96), (5, 48), (3, 33), (13, 200))


def _weight(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    # A few outliers, so that block absmax values spread out and the 8-bit absmax codes are not all alike.
    w.view(-1)[:: 97] *= 40
    return w.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that -0.0 != 0.0 and a comparison is truly bit for bit."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


@pytest.fixture
def bnb():
    """bitsandbytes.functional, with torch.compile off: bitsandbytes compiles its reference dequantiser
    (used on the CPU for odd in_features and blocksize >= 2048) once per shape and dtype, seconds each.
    Compiled and eager gave the same bits here (it is a gather, a multiply and a cast)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield F


def _bnb_dequantize(F, packed: torch.Tensor, qs) -> torch.Tensor:
    """bitsandbytes' dequantisation of (packed, qs). Its AVX-512 CPU kernel (0.50.2) looks absmax up per
    row, not per flat block, and returns wrong values when in_features is a multiple of 16 but not of the
    blocksize; for those shapes use bitsandbytes' own PyTorch reference kernel (flat blocks, like its scalar
    CPU kernel)."""
    in_features = qs.shape[1]
    if in_features % qs.blocksize == 0 or in_features % 16:
        return F.dequantize_4bit(packed, qs, quant_type="nf4")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    code = F.get_4bit_type("nf4", device=packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, qs.blocksize, qs.shape, qs.dtype)


# ---- bit for bit against bitsandbytes -------------------------------------------------------------------


def test_code_tables_match_bitsandbytes(bnb):
    assert torch.equal(nf4.nf4_code_table(), bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_code_table(), bnb.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax32", "double"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("blocksize", nf4.NF4_BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bit_exact_with_bitsandbytes(bnb, shape, blocksize, dtype, double_quant):
    w = _weight(shape, dtype, seed=blocksize)
    q = quantize(w, blocksize=blocksize, double_quant=double_quant)
    packed, qs = bnb.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")

    assert q.packed.shape == packed.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(q.packed, packed)
    assert q.absmax.dtype == qs.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    assert torch.equal(q.absmax, qs.absmax)
    assert q.double_quant is qs.nested is double_quant
    if double_quant:
        assert torch.equal(_bits(q.absmax_offset), _bits(qs.offset.reshape(())))
        assert torch.equal(_bits(q.absmax_scale), _bits(qs.state2.absmax))
        assert torch.equal(q.absmax_code, qs.state2.code)
    assert q.dtype == qs.dtype == dtype

    expected = _bnb_dequantize(bnb, packed, qs)
    got = dequantize(q)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(_bits(got), _bits(expected))
    # And in the other two dtypes, as dequantize_4bit(..., quant_state with another dtype) gives.
    for other in DTYPES:
        qs.dtype = other
        assert torch.equal(_bits(dequantize(q, other)), _bits(_bnb_dequantize(bnb, packed, qs)))


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax32", "double"])
@pytest.mark.parametrize(
    "case", ["zeros", "zero_blocks", "zero_ragged_tail", "equal_magnitudes", "ties", "tiny"]
)  # fmt: skip
def test_bit_exact_edge_cases(bnb, case, double_quant):
    blocksize = 64
    if case == "zeros":  # every absmax 0: offset 0, an all-zero 8-bit block (code 0 = -0.99 times 0)
        w = torch.zeros(9, 64)
    elif case == "zero_blocks":  # full zero blocks keep absmax 0 (unclamped)
        w = _weight((9, 128), torch.float32)
        w[2:5] = 0
    elif case == "zero_ragged_tail":  # the short last block stores its absmax clamped to 1e-38
        w = _weight((5, 100), torch.float32)
        w.view(-1)[-(500 % 64) :] = 0
    elif case == "equal_magnitudes":  # absmax - offset == 0 for every block
        w = torch.full((16, 64), 0.5)
        w[:, ::3] = -0.5
    elif case == "ties":  # values exactly on midpoints between NF4 codes go to the lower code
        code = nf4.nf4_code_table()
        mid = (code[:-1] + code[1:]) / 2
        w = torch.cat([torch.ones(1), mid, -mid, torch.zeros(64 - 31)]).repeat(4, 1)
    else:  # products near the bottom of the fp32 range (not bf16: bnb's AVX512-BF16 path flushes those)
        w = _weight((4, 64), torch.float32) * 1e-36
    q = quantize(w, blocksize=blocksize, double_quant=double_quant)
    packed, qs = bnb.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.absmax, qs.absmax)
    if double_quant:
        assert torch.equal(q.absmax_scale, qs.state2.absmax)
        assert torch.equal(q.absmax_offset, qs.offset)
    assert torch.equal(_bits(dequantize(q)), _bits(_bnb_dequantize(bnb, packed, qs)))
    if case == "ties":
        codes = torch.stack((q.packed.view(-1) >> 4, q.packed.view(-1) & 0xF), 1).view(-1)[:64].long()
        assert codes[1:16].tolist() == list(range(15))  # midpoint i between codes i and i+1 -> code i


def _division_sensitive_values(absmax: float) -> torch.Tensor:
    """fp32 values x in [-absmax, absmax] whose code differs between x * (1 / absmax) and x / absmax:
    bitsandbytes multiplies by the reciprocal in full blocks and divides in the ragged last one."""
    a = torch.tensor(absmax)
    code = nf4.nf4_code_table()
    mid = (code[:-1] + code[1:]) / 2
    centre = (mid * a).double()
    ulp = torch.finfo(torch.float32).eps * a.double()
    x = (centre[:, None] + torch.arange(-64, 65, dtype=torch.float64) * ulp / 4).float().view(-1).unique()
    by_reciprocal = torch.bucketize(x * (1.0 / a), mid)
    by_division = torch.bucketize(x / a, mid)
    return x[by_reciprocal != by_division]


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax32", "double"])
def test_bit_exact_where_reciprocal_and_division_differ(bnb, double_quant):
    # Full blocks and the ragged last block round differently (see above); build both from values where
    # that choice changes the code, each block holding its absmax so the scale is known.
    rows = []
    for absmax in (0.3, 0.7, 1.7, 3e-3, 11.0):
        x = _division_sensitive_values(absmax)
        assert x.numel() > 0  # or the test would prove nothing
        x = torch.cat([torch.tensor([absmax]), x, -x.flip(0)])[:64]
        rows.append(torch.nn.functional.pad(x, (0, 64 - x.numel())))
    full = torch.stack(rows)  # (5, 64): full blocks of 64
    w = torch.cat([full.view(-1), full[0, :40]]).view(-1, 24)  # 360 = 5 full blocks + a ragged one of 40
    w_tail = torch.cat([full.view(-1)[:64], full[1, :33]]).view(-1, 97)  # a ragged block starting at 64
    for weight in (w, w_tail):
        q = quantize(weight, blocksize=64, double_quant=double_quant)
        packed, qs = bnb.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        assert torch.equal(q.packed, packed)
        assert torch.equal(q.absmax, qs.absmax)
        assert torch.equal(_bits(dequantize(q)), _bits(_bnb_dequantize(bnb, packed, qs)))


def test_absmax_quantiser_matches_bitsandbytes_near_every_table_edge(bnb):
    # bitsandbytes' CPU 8-bit quantiser looks codes up in a 65536-entry table rather than taking the
    # nearest code; values just either side of each table step are where an emulation would go wrong.
    code = nf4.dynamic_code_table()
    lut = nf4._absmax_lut(torch.device("cpu"))
    steps = (torch.nonzero(lut[1:] != lut[:-1]).view(-1) + 1).double()
    centre = 2 * (steps - 0.5) / 65535 - 1
    offsets = torch.arange(-40, 41, dtype=torch.float64) * 2.0**-24
    values = (centre[:, None] + offsets[None, :]).float().clamp(-1, 1).view(-1)
    values = torch.cat([values, torch.rand(20000, generator=torch.Generator().manual_seed(1)) * 2 - 1])
    values[::255] = 1.0  # every block of 256 then has absmax 1: the values are quantised as they are
    codes, scales = nf4._quantize_absmax(values)
    expected, state = bnb.quantize_blockwise(values, code=code, blocksize=256)
    assert torch.equal(codes, expected)
    assert torch.equal(scales, state.absmax)
    # The table really differs from "nearest code" somewhere, or this test would prove little.
    nearest = torch.argmin((values[:, None] - code[None, :]).abs(), dim=1)
    assert (nearest != codes.long()).any()
    # With scales other than 1 (a ragged last block too).
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 3
    codes, scales = nf4._quantize_absmax(x)
    expected, state = bnb.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(codes, expected) and torch.equal(scales, state.absmax)


def test_from_bnb_and_to_bnb_round_trip(bnb):
    for double_quant in (False, True):
        w = _weight((33, 128), torch.bfloat16)
        packed, qs = bnb.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        q = NF4Weight.from_bnb(packed, qs)
        assert q.packed.data_ptr() == packed.data_ptr()  # wrapped, not copied
        assert torch.equal(_bits(dequantize(q)), _bits(bnb.dequantize_4bit(packed, qs, quant_type="nf4")))

        mine = quantize(w, blocksize=64, double_quant=double_quant).to_bnb_quant_state()
        assert isinstance(mine, bnb.QuantState)
        assert mine == qs
        assert torch.equal(mine.absmax, qs.absmax) and torch.equal(mine.code, qs.code)
        assert (mine.shape, mine.dtype, mine.blocksize, mine.quant_type, mine.nested) == (
            qs.shape, qs.dtype, qs.blocksize, qs.quant_type, qs.nested)  # fmt: skip
        if double_quant:
            assert torch.equal(mine.offset, qs.offset)
            assert torch.equal(mine.state2.absmax, qs.state2.absmax)
            assert torch.equal(mine.state2.code, qs.state2.code)
            assert (mine.state2.blocksize, mine.state2.dtype) == (qs.state2.blocksize, qs.state2.dtype)
        # bitsandbytes decodes fastlora's state to the same values fastlora does.
        assert torch.equal(_bits(bnb.dequantize_4bit(q.packed, mine, quant_type="nf4")), _bits(dequantize(q)))
        # And through bitsandbytes' own serialisation (what Linear4bit checkpoints hold).
        restored = bnb.QuantState.from_dict(mine.as_dict(packed=True), device=torch.device("cpu"))
        assert torch.equal(_bits(dequantize(NF4Weight.from_bnb(packed, restored))), _bits(dequantize(q)))


def test_from_bnb_accepts_other_quant_storage(bnb):
    w = _weight((16, 64), torch.bfloat16)
    packed, qs = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    q = NF4Weight.from_bnb(packed, qs)
    assert torch.equal(q.packed, quantize(w, blocksize=64).packed)


def test_from_bnb_refuses_mismatched_state(bnb):
    w = _weight((8, 64), torch.float32)
    packed, qs = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    other, other_qs = bnb.quantize_4bit(_weight((8, 128), torch.float32), blocksize=64, quant_type="nf4")
    with pytest.raises(ValueError, match=r"^packed: expected shape \(256, 1\)"):
        NF4Weight.from_bnb(other, qs)
    with pytest.raises(ValueError, match=r"^absmax: expected shape \(16,\)"):
        NF4Weight.from_bnb(other, bnb.QuantState(absmax=qs.absmax[:8].float(), shape=other_qs.shape,
                                                   code=other_qs.code, blocksize=64, quant_type="nf4",
                                                   dtype=torch.float32))  # fmt: skip
    _, fp4_qs = bnb.quantize_4bit(w, blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match=r"^quant_state.quant_type: expected 'nf4', got 'fp4'"):
        NF4Weight.from_bnb(packed, fp4_qs)
    fp4_qs.quant_type = "nf4"  # an FP4 table claiming to be NF4
    with pytest.raises(ValueError, match=r"^quant_state.code: expected the 16 NF4 values"):
        NF4Weight.from_bnb(packed, fp4_qs)
    _, flat_qs = bnb.quantize_4bit(w.view(-1), blocksize=64, quant_type="nf4")
    with pytest.raises(ValueError, match=r"^quant_state.shape: expected a 2-D"):
        NF4Weight.from_bnb(packed, flat_qs)
    qs.state2.blocksize = 128
    with pytest.raises(ValueError, match=r"^quant_state.state2.blocksize: expected 256, got 128"):
        NF4Weight.from_bnb(packed, qs)
    with pytest.raises(TypeError, match=r"^quant_state: expected a bitsandbytes QuantState"):
        NF4Weight.from_bnb(packed, {"absmax": qs.absmax})


# ---- layout, without bitsandbytes -----------------------------------------------------------------------


def test_layout_high_nibble_first_and_flat_blocks():
    # Weight values that are exactly NF4 codes times a known absmax, so the codes are known in advance.
    code = nf4.nf4_code_table()
    rows, cols, blocksize = 3, 48, 32  # rows straddle blocks: row 1 starts in the middle of block 1
    codes = torch.randint(0, 16, (rows * cols,), generator=torch.Generator().manual_seed(3))
    codes[::blocksize] = 15  # each block holds a 1.0, so its absmax is 1 x the block's scale
    scales = torch.tensor([0.5, 2.0, 0.25, 4.0, 1.0])  # exact powers of two: no rounding anywhere
    w = (code[codes] * scales.repeat_interleave(blocksize)[: rows * cols]).view(rows, cols)
    q = quantize(w, blocksize=blocksize, double_quant=False)
    assert torch.equal(q.absmax, scales)
    for n in range(rows):
        for k in range(cols):
            byte, shift, block, scale_block = nf4.element_location(n, k, cols, blocksize)
            assert (int(q.packed[byte, 0]) >> shift) & 0xF == codes[n * cols + k]
            assert q.absmax[block] == scales[(n * cols + k) // blocksize]
            assert scale_block == block // 256
    assert int(q.packed[0, 0]) == (int(codes[0]) << 4) | int(codes[1])  # the even element is the high nibble
    assert torch.equal(dequantize(q), w)


def test_flipping_one_nibble_changes_only_that_element():
    w = _weight((5, 33), torch.float32)
    q = quantize(w, blocksize=64, double_quant=True)
    before = dequantize(q)
    n, k = 3, 20
    byte, shift, _, _ = nf4.element_location(n, k, 33, 64)
    packed = q.packed.clone()
    packed[byte, 0] ^= 0x7 << shift
    after = dequantize(NF4Weight(packed, q.absmax, q.shape, q.blocksize, q.dtype, q.absmax_scale,
                                 q.absmax_offset, q.absmax_code))  # fmt: skip
    changed = (after != before).nonzero().tolist()
    assert changed == [[n, k]]


def test_odd_numel_pads_with_the_zero_code():
    q = quantize(_weight((3, 33), torch.float32), blocksize=32)
    assert q.packed.shape == (50, 1)
    assert int(q.packed[-1, 0]) & 0xF == 7 and nf4.nf4_code_table()[7] == 0.0


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax32", "double"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_quantisation_error_is_bounded(dtype, double_quant):
    # Independent of bitsandbytes. Each value lands within half the widest NF4 gap (0.304, between -1 and
    # -0.696) times its block's absmax A; double quantisation moves A by at most half the widest gap of the
    # 8-bit table (0.0141 / 2) times its 256-block scale max|A - mean(A)|.
    code = nf4.nf4_code_table()
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    w = _weight((32, 96), dtype)
    q = quantize(w, blocksize=64, double_quant=double_quant)
    err = (dequantize(q, torch.float32) - w.float()).view(-1, 64)
    absmax = w.float().view(-1, 64).abs().amax(1)
    bound = absmax * (half_gap + 1e-6)
    if double_quant:
        bound = bound + 0.0071 * (absmax - absmax.mean()).abs().max()
    assert (err.abs() <= bound[:, None]).all()
    assert err.abs().max() > 0  # and it is a quantisation, not a copy


# ---- chunked dequantisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax32", "double"])
@pytest.mark.parametrize("shape,blocksize", [((37, 33), 64), ((29, 96), 64), ((50, 40), 256), ((9, 1000), 4096)])
def test_dequantize_rows_equals_full_slices(shape, blocksize, double_quant):
    q = quantize(_weight(shape, torch.bfloat16), blocksize=blocksize, double_quant=double_quant)
    for dtype in (None, torch.float32):
        full = dequantize(q, dtype)
        # Chunks of 3 and 7 rows: boundaries fall inside blocks (and inside bytes when in_features is odd).
        for chunk in (1, 3, 7):
            parts = [dequantize_rows(q, s, min(s + chunk, shape[0]), dtype) for s in range(0, shape[0], chunk)]
            assert torch.equal(_bits(torch.cat(parts)), _bits(full))
        for start, stop in [(0, 1), (1, 2), (5, 6), (shape[0] - 1, shape[0]), (3, shape[0] - 2)]:
            rows = dequantize_rows(q, start, stop, dtype)
            assert rows.shape == (stop - start, shape[1])
            assert torch.equal(_bits(rows), _bits(full[start:stop]))
    assert dequantize_rows(q, 4, 4).shape == (0, shape[1])


def test_dequantize_rows_decodes_only_what_it_needs():
    # A weight whose absmax beyond the first rows is corrupted to NaN: rows that do not touch those
    # blocks must not see them, which would be impossible if the whole weight were decoded and sliced.
    q = quantize(_weight((64, 256), torch.float32), blocksize=64, double_quant=False)
    absmax = q.absmax.clone()
    absmax[40:] = float("nan")  # blocks 40.. are rows 10..
    poisoned = NF4Weight(q.packed, absmax, q.shape, q.blocksize, q.dtype)
    assert torch.equal(dequantize_rows(poisoned, 0, 10), dequantize(q)[:10])
    assert dequantize_rows(poisoned, 9, 11)[1].isnan().all()


def test_dequantize_rows_bad_ranges():
    q = quantize(_weight((8, 64), torch.float32))
    for start, stop in [(-1, 2), (3, 2), (0, 9)]:
        with pytest.raises(ValueError, match=r"^start, stop: expected 0 <= start <= stop <= 8"):
            dequantize_rows(q, start, stop)
    with pytest.raises(TypeError, match=r"^start: expected an integer"):
        dequantize_rows(q, 1.0, 2)
    with pytest.raises(TypeError, match=r"^dtype: expected one of"):
        dequantize_rows(q, 0, 2, torch.float64)


# ---- storage, serialisation, devices ---------------------------------------------------------------------


def _expected_nbytes(out_features: int, in_features: int, blocksize: int, double_quant: bool) -> int:
    numel = out_features * in_features
    n_blocks = math.ceil(numel / blocksize)
    if not double_quant:
        return math.ceil(numel / 2) + 4 * n_blocks
    return math.ceil(numel / 2) + n_blocks + 4 * math.ceil(n_blocks / 256) + 4 + 4 * 256


def test_bits_per_parameter_4096_square():
    # Built from zero tensors of the right sizes (the constructor checks them): the figure depends on the
    # sizes only. 4 bits + 8/64 (uint8 absmax) + 32/(64·256) (scales) + (4 + 1024 bytes) / 4096².
    n, bs = 4096, 64
    n_blocks = n * n // bs
    q = NF4Weight(
        packed=torch.zeros(n * n // 2, 1, dtype=torch.uint8),
        absmax=torch.zeros(n_blocks, dtype=torch.uint8),
        shape=(n, n),
        blocksize=bs,
        dtype=torch.bfloat16,
        absmax_scale=torch.zeros(n_blocks // 256),
        absmax_offset=torch.zeros(()),
        absmax_code=nf4.dynamic_code_table(),
    )
    assert q.nbytes == 8_388_608 + 262_144 + 4096 + 4 + 1024
    assert q.bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 1028 * 8 / n**2, abs=1e-12)
    assert q.bits_per_parameter <= 4.13
    plain = NF4Weight(torch.zeros(n * n // 2, 1, dtype=torch.uint8), torch.zeros(n_blocks), (n, n), bs,
                      torch.bfloat16)  # fmt: skip
    assert plain.bits_per_parameter == 4.5


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax32", "double"])
@pytest.mark.parametrize("shape,blocksize", [((7, 64), 64), ((3, 33), 32), ((300, 512), 64)])
def test_nbytes_of_quantised_weights(shape, blocksize, double_quant):
    q = quantize(_weight(shape, torch.float16), blocksize=blocksize, double_quant=double_quant)
    assert q.nbytes == _expected_nbytes(*shape, blocksize, double_quant)
    assert q.bits_per_parameter == q.nbytes * 8 / (shape[0] * shape[1])


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax32", "double"])
def test_safetensors_round_trip(tmp_path, double_quant):
    from safetensors.torch import load_file, save_file

    q1 = quantize(_weight((7, 96), torch.bfloat16), blocksize=32, double_quant=double_quant)
    q2 = quantize(_weight((4, 64), torch.float16, seed=5), blocksize=128, double_quant=True)
    save_file({**q1.to_tensors("a."), **q2.to_tensors("b.")}, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    for q, prefix in ((q1, "a."), (q2, "b.")):
        r = NF4Weight.from_tensors(loaded, prefix=prefix)
        assert (r.shape, r.blocksize, r.dtype, r.double_quant) == (q.shape, q.blocksize, q.dtype, q.double_quant)
        for name, t in q._tensors().items():
            assert torch.equal(getattr(r, name), t), name
        assert torch.equal(_bits(dequantize(r)), _bits(dequantize(q)))
    with pytest.raises(ValueError, match=r"^tensors: expected keys .* missing \['c.packed'"):
        NF4Weight.from_tensors(loaded, prefix="c.")
    partial = {k: v for k, v in q1.to_tensors().items() if k != "absmax_code"}
    if double_quant:
        with pytest.raises(ValueError, match=r"^absmax_code: double quantisation needs"):
            NF4Weight.from_tensors(partial)


def test_to_device():
    q = quantize(_weight((7, 64), torch.float32))
    m = q.to("meta")
    assert m.device.type == "meta" and all(t.device.type == "meta" for t in m._tensors().values())
    assert (m.shape, m.blocksize, m.dtype, m.double_quant) == (q.shape, q.blocksize, q.dtype, True)
    decoded = dequantize(m)  # decoding needs no host copy of the data
    assert decoded.device.type == "meta" and decoded.shape == (7, 64) and decoded.dtype == torch.float32
    assert q.to("cpu").packed is q.packed
    assert "shape=(7, 64)" in repr(q) and "double_quant=True" in repr(q)


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_quantize_refuses_non_finite(bad, dtype):
    w = _weight((4, 64), dtype)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"^weight: expected finite values, got 1 NaN/Inf, the first at \(2, 5\)"):
        quantize(w)


def test_quantize_refuses_bad_weights_and_blocksizes():
    with pytest.raises(TypeError, match=r"^weight: expected dtype torch.float32, torch.float16 or torch.bfloat16"):
        quantize(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"^weight: expected dtype .* got shape \(4, 64\), dtype torch.float64"):
        quantize(torch.ones(4, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^weight: expected a torch.Tensor, got ndarray"):
        quantize(np.ones((4, 64), dtype=np.float32))
    for shape in [(64,), (2, 4, 64), ()]:
        with pytest.raises(ValueError, match=r"^weight: expected 2-D \(out_features, in_features\)"):
            quantize(torch.ones(shape))
    with pytest.raises(ValueError, match=r"^weight: expected at least one element"):
        quantize(torch.ones(0, 64))
    for blocksize in [16, 100, 8192, 64.0, True, "64"]:
        with pytest.raises(ValueError, match=r"^blocksize: expected one of \(32, 64, 128, 256, 512, 1024, 2048, "
                                             r"4096\) .*, got " + repr(blocksize).replace("(", r"\(")):  # fmt: skip
            quantize(torch.ones(4, 64), blocksize=blocksize)
    with pytest.raises(TypeError, match=r"^double_quant: expected True or False"):
        quantize(torch.ones(4, 64), double_quant=1)


def test_constructor_checks_every_field():
    q = quantize(_weight((8, 96), torch.float32), blocksize=64, double_quant=True)
    fields = dict(packed=q.packed, absmax=q.absmax, shape=q.shape, blocksize=q.blocksize, dtype=q.dtype,
                  absmax_scale=q.absmax_scale, absmax_offset=q.absmax_offset, absmax_code=q.absmax_code)  # fmt: skip
    NF4Weight(**fields)  # the unchanged fields are accepted

    def refused(error, pattern, **changes):
        with pytest.raises(error, match=pattern):
            NF4Weight(**{**fields, **changes})

    refused(ValueError, r"^packed: expected shape \(384, 1\) for a 8x96 weight in blocks of 64, got shape \(383, 1\)",
            packed=q.packed[:-1])  # fmt: skip
    refused(ValueError, r"^packed: expected shape \(384, 1\) .* got shape \(384,\)", packed=q.packed.view(-1))
    refused(TypeError, r"^packed: expected dtype torch.uint8, got .* dtype torch.int8",
            packed=q.packed.view(torch.int8))  # fmt: skip
    refused(ValueError, r"^packed: expected shape \(192, 1\)", shape=(4, 96))
    refused(ValueError, r"^absmax: expected shape \(12,\) .* got shape \(11,\)", absmax=q.absmax[:-1])
    refused(TypeError, r"^absmax: expected dtype torch.uint8, got .* dtype torch.float32", absmax=q.absmax.float())
    refused(ValueError, r"^absmax_scale: expected shape \(1,\) .* got shape \(2,\)", absmax_scale=torch.ones(2))
    refused(TypeError, r"^absmax_scale: expected dtype torch.float32", absmax_scale=q.absmax_scale.half())
    refused(ValueError, r"^absmax_offset: expected shape \(\) .* got shape \(1,\)", absmax_offset=torch.zeros(1))
    refused(ValueError, r"^absmax_code: expected shape \(256,\)", absmax_code=nf4.nf4_code_table())
    refused(ValueError, r"^absmax_code: double quantisation needs", absmax_code=None)
    refused(ValueError, r"^absmax: expected device cpu \(packed's\), got .* device meta", absmax=q.absmax.to("meta"))
    refused(ValueError, r"^absmax_code: expected a contiguous tensor", absmax_code=torch.zeros(512)[::2])
    refused(ValueError, r"^shape: expected \(out_features, in_features\)", shape=(768,))
    refused(ValueError, r"^shape: expected \(out_features, in_features\)", shape=(0, 96))
    refused(ValueError, r"^blocksize: expected one of .* got 48", blocksize=48)
    refused(TypeError, r"^dtype: expected one of torch.float32, .* got torch.float64", dtype=torch.float64)
    refused(TypeError, r"^packed: expected a torch.Tensor of shape \(384, 1\), got list", packed=[0] * 384)
    # Without double quantisation absmax is fp32 and the three double-quant fields are absent.
    plain = dict(fields, absmax_scale=None, absmax_offset=None, absmax_code=None)
    with pytest.raises(TypeError, match=r"^absmax: expected dtype torch.float32, got .* dtype torch.uint8"):
        NF4Weight(**plain)
    assert not NF4Weight(**{**plain, "absmax": torch.ones(12)}).double_quant


def test_dequantize_refuses_bad_arguments():
    with pytest.raises(TypeError, match=r"^q: expected an NF4Weight, got Tensor"):
        dequantize(torch.ones(4, 64))
    with pytest.raises(TypeError, match=r"^dtype: expected one of"):
        dequantize(quantize(torch.ones(4, 64)), torch.int8)
