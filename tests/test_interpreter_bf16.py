"""The bf16 patch of the Triton interpreter (tests/interpreter_bf16.py): right, needed, and active.

Each kernel's bf16 run must reproduce its fp32 run on the same bf16-rounded inputs. Both runs put the same
products (exact in fp32) into the same fp32 accumulator, in the same order, and scale it with the same
fp32 operations; a bf16 output is that accumulator rounded once, as ``.to(torch.bfloat16)`` rounds it. So
equality is exact: a bf16 output equals the fp32 run's output rounded to bf16, an fp32 output is identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

import interpreter_bf16
from conftest import interpreting
from fastlora.kernels.lora_expand import lora_expand_bwd
from fastlora.kernels.lora_linear import lora_linear_bwd, lora_linear_fwd
from fastlora.kernels.lora_shrink import lora_shrink_bwd, lora_shrink_fwd

pytestmark = pytest.mark.skipif(not interpreting(), reason="checks the Triton interpreter (TRITON_INTERPRET=1)")

BF16 = torch.bfloat16


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Same dtype, same bits (so -0.0 is not 0.0); any NaN matches any NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN in different places"
    as_int = torch.int16 if want.element_size() == 2 else torch.int32
    bad = got.view(as_int)[~nan] != want.view(as_int)[~nan]
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} differ, e.g. "
                           f"{got[~nan][bad][:4].tolist()} vs {want[~nan][bad][:4].tolist()}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Every launcher: bf16 run against the fp32 run on the same bf16-rounded values.

# (M, K, N, R), odd. The first has two column splits in lora_expand_bwd (N > 64) and two rank steps in the
# lora_linear prologues (R > 16); the second has two row splits in lora_shrink_bwd (M > 256); the third
# runs both lora_linear GEMMs through their TMA kernels (K and N multiples of 16; the others take the
# pointer kernels).
SHAPES = [(45, 37, 70, 19), (261, 21, 13, 3), (45, 48, 80, 19)]


def _tensors(m, k, n, r):
    g = torch.Generator().manual_seed(m * 1000 + k)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    return {"x": rand(m, k), "weight": rand(n, k, scale=k**-0.5), "bias": rand(n),
            "lora_A": rand(r, k, scale=k**-0.5), "lora_B": rand(n, r, scale=r**-0.5),
            "shrink": rand(m, r), "grad_y": rand(m, n), "d_shrink": rand(m, r)}  # fmt: skip


def _runs(m, k, n, r, adapter):
    """(bf16 run's inputs, fp32 run's inputs). d_shrink is fp32 in both: the kernels round it to bf16 in
    registers, so the bf16 run gets it unrounded. Adapters are bf16, or fp32 unrounded (the kernels cast
    them to x's dtype in registers), which also checks the interpreter's fp32 -> bf16 rounding."""
    t = _tensors(m, k, n, r)
    low = {name: v if name == "d_shrink" or (adapter == "fp32" and name.startswith("lora")) else v.to(BF16)
           for name, v in t.items()}  # fmt: skip
    ref = {name: v.to(BF16).float() for name, v in t.items()}
    return low, ref


def _launch(name, t, p):
    seed = torch.tensor([12345], dtype=torch.int64) if p > 0 else None
    if name == "lora_shrink_fwd":
        return {"S": lora_shrink_fwd(t["x"], t["lora_A"], p, seed)}
    if name == "lora_shrink_bwd":
        return {"dA": lora_shrink_bwd(t["x"], t["d_shrink"], t["lora_A"], p, seed)}
    if name == "lora_linear_fwd":
        return {"Y": lora_linear_fwd(t["x"], t["weight"], t["bias"], t["shrink"], t["lora_B"], 0.75)}
    if name == "lora_linear_bwd":
        return {"dX": lora_linear_bwd(t["grad_y"], t["weight"], t["d_shrink"], t["lora_A"], p, seed)}
    if name == "lora_expand_bwd":
        d_shrink, d_b = lora_expand_bwd(t["grad_y"], t["lora_B"], t["shrink"], 0.75)
        return {"dS": d_shrink, "dB": d_b}
    raise ValueError(name)


# (launcher, dropout p): with and without dropout wherever the launcher takes it.
LAUNCHES = [("lora_shrink_fwd", 0.0), ("lora_shrink_fwd", 0.3), ("lora_shrink_bwd", 0.0), ("lora_shrink_bwd", 0.3),
            ("lora_linear_fwd", 0.0), ("lora_linear_bwd", 0.0), ("lora_linear_bwd", 0.3),
            ("lora_expand_bwd", 0.0)]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("adapter", ["bf16", "fp32"])
@pytest.mark.parametrize("launcher,p", LAUNCHES, ids=[f"{n}-p{p}" for n, p in LAUNCHES])
def test_kernel_bf16_run_is_its_fp32_run_rounded(launcher, p, adapter, shape):
    low, ref = _runs(*shape, adapter)
    got, want = _launch(launcher, low, p), _launch(launcher, ref, p)
    for key, value in got.items():
        # bf16 outputs (S, Y, dX; dA and dB with bf16 adapters) are the fp32 accumulator rounded once;
        # fp32 outputs (dS; dA and dB with fp32 adapters) are the accumulator itself.
        assert value.dtype in (BF16, torch.float32)
        assert_bits_equal(value, want[key].to(value.dtype), f"{launcher} {key}")


# ---------------------------------------------------------------------------------------------------------
# The patched interpreter's bf16 arithmetic, casts and dot against PyTorch's bf16.

N = 32


@triton.jit
def _elementwise_kernel(a_ptr, b_ptr, f_ptr, out_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r)
    b = tl.load(b_ptr + r)
    tl.store(out_ptr + 0 * N + r, a + b)
    tl.store(out_ptr + 1 * N + r, a - b)
    tl.store(out_ptr + 2 * N + r, a * b)
    tl.store(out_ptr + 3 * N + r, a / b)
    tl.store(out_ptr + 4 * N + r, -a)
    tl.store(out_ptr + 5 * N + r, tl.maximum(a, b))
    tl.store(out_ptr + 6 * N + r, tl.where(a < b, a, b))
    tl.store(out_ptr + 7 * N + r, a * 3.0 + 1.0)
    tl.store(out_ptr + 8 * N + r, tl.load(f_ptr + r).to(tl.bfloat16))  # fp32 -> bf16, ties included
    tl.store(out_ptr + 9 * N + r, (r - N // 2).to(tl.bfloat16) * (a > 0).to(tl.bfloat16))  # int, bool -> bf16


def _elementwise_inputs():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(N, generator=g).to(BF16)
    b = torch.randn(N, generator=g).to(BF16)
    inf, nan = float("inf"), float("nan")
    a[:8] = torch.tensor([inf, -inf, nan, -0.0, 1e-39, 3e38, 2.0, -1.0])  # 1e-39: a bf16 subnormal
    b[:8] = torch.tensor([inf, 1.0, 1.0, 0.0, 1e-39, 3e38, 0.0, -0.0])
    # fp32 bit patterns around bf16 rounding points: ties to even (down, up), just off a tie, overflow to
    # +-Inf, a NaN whose payload is only in the dropped bits, a subnormal tie; then random values.
    patterns = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800001, 0x00018000,
                0x80008000, 0xBF818000]  # fmt: skip
    f = torch.randn(N, generator=g)
    f.view(torch.int32)[: len(patterns)] = torch.tensor(np.array(patterns, dtype=np.uint32).view(np.int32))
    return a, b, f


def _elementwise(a, b, f):
    out = torch.empty(10, N, dtype=BF16)
    with np.errstate(all="ignore"):  # 1/0, Inf - Inf: the warnings are expected
        _elementwise_kernel[(1,)](a, b, f, out, N=N)
    return out


def test_elementwise_matches_torch_bf16():
    a, b, f = _elementwise_inputs()
    out = _elementwise(a, b, f)
    r = torch.arange(N)
    want = [a + b, a - b, a * b, a / b, -a, torch.fmax(a, b), torch.where(a < b, a, b), a * 3.0 + 1.0, f.to(BF16),
            (r - N // 2).to(BF16) * (a > 0).to(BF16)]  # fmt: skip
    names = ["add", "sub", "mul", "div", "neg", "maximum", "where(<)", "a*3+1", "fp32->bf16", "int*bool->bf16"]
    for name, got, w in zip(names, out, want):
        if name == "maximum":  # Triton 3.4's interpreter propagates NaN in maxnum, in fp32 too: not for here
            ok = ~(a.isnan() | b.isnan())
            got, w = got[ok], w[ok]
        assert_bits_equal(got, w, name)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, out32_ptr, out16_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    tile = r[:, None] * N + r[None, :]
    acc = tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile), tl.load(c_ptr + tile))  # fp32 accumulator
    tl.store(out32_ptr + tile, acc)
    tl.store(out16_ptr + tile, acc.to(tl.bfloat16))


def _dot(a, b, c):
    out32, out16 = torch.empty(a.shape), torch.empty(a.shape, dtype=BF16)
    _dot_kernel[(1,)](a, b, c, out32, out16, N=a.shape[0])
    return out32, out16


def test_dot_accumulates_in_fp32():
    g = torch.Generator().manual_seed(5)
    # Multiples of 1/8 up to 2: every product and partial sum is exact in fp32, so any summation order
    # gives the exact result, and its bf16 rounding must equal PyTorch's.
    a, b = (torch.randint(-16, 17, (16, 16), generator=g).to(BF16) / 8 for _ in range(2))
    c = torch.randint(-64, 65, (16, 16), generator=g).float() / 64
    out32, out16 = _dot(a, b, c)
    exact = a.double() @ b.double() + c.double()
    assert_bits_equal(out32, exact.float(), "dot, exact case")
    assert_bits_equal(out16, exact.float().to(BF16), "dot rounded to bf16")
    # Random values: within fp32 accumulation error (16 terms) of the exact dot of the bf16 values.
    a, b = (torch.randn(16, 16, generator=g).to(BF16) for _ in range(2))
    out32, _ = _dot(a, b, torch.zeros(16, 16))
    bound = 16 * 2.0**-24 * (a.double().abs() @ b.double().abs())
    assert ((out32.double() - a.double() @ b.double()).abs() <= bound).all()


# ---------------------------------------------------------------------------------------------------------
# The patch is active in this suite, and needed.


@pytest.fixture
def unpatched():
    assert interpreter_bf16.is_applied(), "conftest.py applies the patch under TRITON_INTERPRET=1"
    interpreter_bf16.remove()
    try:
        yield
    finally:
        interpreter_bf16.apply()


@triton.jit
def _add_mul_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r)
    b = tl.load(b_ptr + r)
    tl.store(out_ptr + r, a + b)
    tl.store(out_ptr + N + r, a * b)


def test_interpreter_is_wrong_without_the_patch(unpatched):
    a, b = (torch.randn(N, generator=torch.Generator().manual_seed(seed)).to(BF16) for seed in (1, 2))
    out = torch.empty(2, N, dtype=BF16)
    _add_mul_kernel[(1,)](a, b, out, N=N)
    assert not torch.equal(out[0], a + b) and not torch.equal(out[1], a * b)
    a, b = (torch.full((16, 16), 1.5, dtype=BF16) for _ in range(2))
    out32, _ = _dot(a, b, torch.zeros(16, 16))
    assert not torch.equal(out32, torch.full((16, 16), 16 * 2.25))
    low, ref = _runs(*SHAPES[0], "bf16")
    y = _launch("lora_linear_fwd", low, 0.0)["Y"].float()
    assert not torch.allclose(y, _launch("lora_linear_fwd", ref, 0.0)["Y"], rtol=0.1, atol=0.1)


def test_apply_fails_loudly_on_an_unknown_interpreter(unpatched, monkeypatch):
    monkeypatch.delattr(interpreter.InterpreterBuilder, "create_dot")
    with pytest.raises(RuntimeError, match="create_dot"):
        interpreter_bf16.apply()
    assert not interpreter_bf16.is_applied()
