"""The sm_90 main loop of both GEMMs (TMA descriptors, persistent programs: ``_lora_linear_*_tma_kernel``)
through the Triton interpreter, against float64 and the reference; and the launchers' choice between it and
the pointer main loop, which must keep taking strided and misaligned inputs.

Under the interpreter the launchers choose as on the GPU ``lora_linear.INTERPRETED_ARCH`` names (90 unless a
test sets 80). Every supported Triton (3.4 to 3.9) runs TMA descriptors in its interpreter; 3.4 and 3.5
check the row stride in elements (a multiple of 16) instead of bytes, so there the TMA kernels take only
such inputs, and the shapes below with K or N = 8 mod 16 run the pointer kernels.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

triton = pytest.importorskip("triton")

import fastlora  # noqa: E402
from conftest import check_case, interpreting, make_case  # noqa: E402
from fastlora import reference  # noqa: E402
from fastlora.kernels import lora_linear  # noqa: E402
from fastlora.kernels._launch import cdiv, triton_version  # noqa: E402
from fastlora.kernels.lora_linear import lora_linear_bwd, lora_linear_fwd, uses_tma  # noqa: E402

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="runs the Triton kernels through the "
                                       "interpreter (TRITON_INTERPRET=1)")  # fmt: skip
# Triton 3.4 and 3.5's interpreter: row strides in elements, a multiple of 16 (see the module docstring).
STRIDE_IN_ELEMENTS = triton_version() < (3, 6)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KERNELS = ("_FWD", "_BWD", "_FWD_TMA", "_BWD_TMA")


@pytest.fixture
def launches(monkeypatch):
    """How often each lora_linear kernel was launched during the test."""
    counts = Counter()
    for name in KERNELS:
        tunable = getattr(lora_linear, name)

        def launch(grid, *args, _name=name, _launch=tunable.launch, **flags):
            counts[_name] += 1
            return _launch(grid, *args, **flags)

        monkeypatch.setattr(tunable, "launch", launch)
    return counts


@pytest.fixture
def sm80(monkeypatch):
    monkeypatch.setattr(lora_linear, "INTERPRETED_ARCH", 80)


def _tma_expected(k: int, n: int) -> tuple[bool, bool]:
    """(forward, dX) take TMA on contiguous inputs with K and N columns: 16-byte rows for every dtype here
    when K and N are multiples of 8, and multiples of 16 on the old interpreters."""
    step = 16 if STRIDE_IN_ELEMENTS else 8
    return k % step == 0, k % step == 0 and n % step == 0


# (leading dims, K, N, rank, bias, dropout p). Odd row counts, several tiles per program (16 × 32 tiles,
# 3 programs), ranks 1 to 64 (1 to 4 prologue steps), the edge tiles partly out of bounds (TMA pads them
# with zeros). The last two have K or N = 8 mod 16: TMA from Triton 3.6's interpreter on.
SHAPES = [
    ((37,), 48, 80, 5, True, 0.0),
    ((3, 23), 64, 48, 16, False, 0.3),
    ((50,), 96, 32, 64, True, 0.0),
    ((9,), 32, 112, 1, False, 0.0),
    ((1,), 16, 16, 31, True, 0.2),
    ((21,), 40, 24, 3, True, 0.0),
    ((2, 7), 64, 56, 8, False, 0.1),
]


def _id(s):
    lead, k, n, r, bias, p = s
    return f"{'x'.join(map(str, lead))}x{k}->{n}-r{r}" + ("-bias" if bias else "") + (f"-p{p}" if p else "")


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_tma_main_loop_matches_float64(launches, tf32, shape, dtype):
    lead, k, n, r, bias, p = shape
    with fastlora.use_backend("triton"):
        check_case(make_case(lead, k, n, r, bias=bias, dropout_p=p, scaling=1.5), dtype, backend_name="triton")
    fwd, bwd = _tma_expected(k, n)
    assert (launches["_FWD_TMA"], launches["_FWD"]) == ((1, 0) if fwd else (0, 1)), launches
    assert (launches["_BWD_TMA"], launches["_BWD"]) == ((1, 0) if bwd else (0, 1)), launches


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tma_main_loop_fp32_adapters(launches, dtype):
    """PEFT's mixed precision (fp32 A and B on a 16-bit base): the prologue casts them in registers."""
    with fastlora.use_backend("triton"):
        check_case(make_case((2, 13), 48, 64, 8, dropout_p=0.25), dtype, torch.float32, backend_name="triton")
    assert launches["_FWD_TMA"] == launches["_BWD_TMA"] == 1 and not launches["_FWD"] + launches["_BWD"]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sm80_takes_the_pointer_main_loop(launches, sm80, dtype):
    """The same aligned inputs on an sm_80: pointer kernels, same numerics."""
    with fastlora.use_backend("triton"):
        check_case(make_case((37,), 48, 80, 5, dropout_p=0.2), dtype, backend_name="triton")
    assert launches["_FWD"] == launches["_BWD"] == 1 and not launches["_FWD_TMA"] + launches["_BWD_TMA"]


@needs_interpreter
@pytest.mark.parametrize("layout_kind", ["strided", "transposed"])
def test_strided_input_takes_the_pointer_main_loop(launches, layout_kind):
    """x[..., ::2] reaches the forward GEMM as a strided view: pointer kernel. A transposed 3-D x is copied
    to a contiguous 2-D one by the backend's reshape: TMA. dX runs on G, contiguous either way: TMA."""
    with fastlora.use_backend("triton"):
        check_case(make_case((4, 9), 48, 32, 6, dropout_p=0.2), torch.float16, backend_name="triton",
                   layout_kind=layout_kind)  # fmt: skip
    strided = layout_kind == "strided"
    assert (launches["_FWD"], launches["_FWD_TMA"]) == ((1, 0) if strided else (0, 1)), launches
    assert (launches["_BWD"], launches["_BWD_TMA"]) == (0, 1), launches


def _misaligned(t: torch.Tensor, elements: int = 1) -> torch.Tensor:
    """The same values at a base ``elements`` past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype)
    start = (-buf.data_ptr() // t.element_size()) % (16 // t.element_size()) + elements
    out = buf[start:start + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_misaligned_and_transposed_operands_take_the_pointer_main_loop(launches, tf32, dtype):
    """A base off a 16-byte boundary or a weight stored transposed: pointer kernels, giving the TMA kernels'
    results on the aligned copies (up to the summation order inside a tile) and float64's."""
    g = torch.Generator().manual_seed(0)
    m, k, n, r = 37, 48, 80, 5
    x, w, bias = (torch.randn(*s, generator=g).to(dtype) for s in ((m, k), (n, k), (n,)))
    shrink, lora_b = torch.randn(m, r, generator=g).to(dtype), torch.randn(n, r, generator=g)
    grad_y = torch.randn(m, n, generator=g).to(dtype)
    d_shrink, lora_a = torch.randn(m, r, generator=g), torch.randn(r, k, generator=g)

    y_tma = lora_linear_fwd(x, w, bias, shrink, lora_b, 0.5)
    dx_tma = lora_linear_bwd(grad_y, w, d_shrink, lora_a, 0.0, None)
    assert launches["_FWD_TMA"] == launches["_BWD_TMA"] == 1
    w_t = w.t().contiguous().t()  # same values, column-major
    for args in [(_misaligned(x), w), (x, w_t)]:
        assert not uses_tma(*args)
        torch.testing.assert_close(lora_linear_fwd(*args, bias, shrink, lora_b, 0.5), y_tma)
    for args in [(_misaligned(grad_y), w), (grad_y, w_t)]:
        assert not uses_tma(*args)
        torch.testing.assert_close(lora_linear_bwd(*args, d_shrink, lora_a, 0.0, None), dx_tma)
    assert launches["_FWD"] == launches["_BWD"] == 2

    want = x.double() @ w.double().t() + bias.double() + 0.5 * shrink.double() @ lora_b.double().t()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    assert ((y_tma.double() - want).abs().max() / want.abs().max()).item() < tolerance
    want = grad_y.double() @ w.double() + d_shrink.double() @ lora_a.double()
    assert ((dx_tma.double() - want).abs().max() / want.abs().max()).item() < tolerance


@needs_interpreter
def test_more_tiles_than_programs():
    """The interpreter runs few programs, so each walks several tiles (the persistent loop), on the
    shapes above."""
    meta = lora_linear._INTERPRETER_CONFIG.kwargs
    assert cdiv(37, meta["BLOCK_M"]) * cdiv(80, meta["BLOCK_N"]) > 2 * lora_linear.INTERPRETER_PROGRAMS


@needs_interpreter
def test_stale_descriptor_box_is_refused(monkeypatch):
    """A descriptor whose box is not the launched config's tile fails at compile time instead of loading
    other tiles."""
    monkeypatch.setattr(lora_linear, "_fwd_boxes", lambda meta: {"x_desc": [meta["BLOCK_M"], 16],
                                                                 "w_desc": [meta["BLOCK_N"], 16]})  # fmt: skip
    x, w = torch.randn(20, 64, dtype=torch.float16), torch.randn(32, 64, dtype=torch.float16)
    assert uses_tma(x, w)
    with pytest.raises(Exception, match="(?i)assert"):
        lora_linear_fwd(x, w, None, torch.randn(20, 2, dtype=torch.float16), torch.randn(32, 2), 1.0)


def test_main_loop_choice(monkeypatch):
    """TMA exactly when the GPU is sm_90+, the dots run on tensor cores (16-bit, or fp32 with tf32 allowed)
    and both inputs are 2-D, non-empty, with unit last stride and a 16-byte aligned base and row stride (in
    elements, a multiple of 16, under Triton 3.4/3.5's interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # uses_tma reads the flag at each call; nothing is launched
    w = torch.randn(40, 48, dtype=torch.float16)
    x = torch.randn(7, 48, dtype=torch.float16)
    assert uses_tma(x, w) and uses_tma(x.bfloat16(), w.bfloat16())
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")  # exact fp32 dots: CUDA cores, pointers
        assert not uses_tma(x.float(), w.float())
        torch.set_float32_matmul_precision("high")  # tf32 allowed: tensor cores, TMA
        assert uses_tma(x.float(), w.float())
    finally:
        torch.set_float32_matmul_precision(before)
    assert not uses_tma(torch.randn(7, 96, dtype=torch.float16)[:, ::2], w)  # unit last stride
    assert not uses_tma(_misaligned(x), w) and not uses_tma(x, _misaligned(w))  # 16-byte aligned base
    assert not uses_tma(x, w.t().contiguous().t())  # W stored transposed
    half = torch.float16
    assert not uses_tma(torch.randn(7, 20, dtype=half), torch.randn(40, 20, dtype=half))  # 40-byte rows
    assert uses_tma(torch.randn(7, 40, dtype=half), torch.randn(3, 40, dtype=half)) != STRIDE_IN_ELEMENTS  # 80
    assert not uses_tma(torch.randn(0, 48).half(), w) and not uses_tma(x, torch.randn(0, 48).half())  # empty
    monkeypatch.setattr(lora_linear, "INTERPRETED_ARCH", 80)
    assert not uses_tma(x, w)


def test_descriptor_boxes_are_valid_tma_boxes():
    """Every box a TMA config gives a descriptor: powers of two, at most 256 per dimension (the hardware's
    limit), at least 16 bytes along the contiguous one; and the interpreter config's too."""
    for tunable, boxes in lora_linear.TMA_BOXES.items():
        for itemsize in (2, 4):
            configs = [c for dropout in (False, True) for c in tunable.configs({"DROPOUT": dropout}, 90, itemsize)]
            assert configs, (tunable.kernel.__name__, itemsize)
            for config in [*configs, tunable.interpreter_config]:
                for name, box in boxes(config.kwargs).items():
                    assert all(d & (d - 1) == 0 and 0 < d <= 256 for d in box), (name, box)
                    assert box[-1] * itemsize >= 16, (name, box)
        assert not tunable.configs({"DROPOUT": False}, 80, 2), "no TMA before sm_90"
