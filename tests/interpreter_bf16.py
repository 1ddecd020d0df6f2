"""Test-only fix of bf16 in the Triton interpreter (triton-lang/triton#11584), applied by conftest.py under
TRITON_INTERPRET=1.

The interpreter stores a bf16 value as its uint16 bit pattern and then does arithmetic, comparisons and
``tl.dot`` on those integers; its casts to bf16 truncate (fp32) or reinterpret integers as bit patterns
(ints, bools). Loads, stores and pure data movement (reshape, trans, splat, select) are exact.

The fix widens bf16 operands to fp32 (exact: bf16 is the top half of an fp32), lets the interpreter compute
in fp32, and rounds results whose type is bf16 back with round-to-nearest-even, as the GPU does. ``tl.dot``
thus accumulates bf16 products in fp32 like tensor cores (the products are exact in fp32). For one
add/sub/mul/div, computing in fp32 and rounding to bf16 equals the correctly rounded bf16 result (fp32 has
at least 2·8 + 2 significand bits), so that double rounding is harmless.

Not covered, because no fastlora kernel does them on bf16: reductions (``tl.sum``/``tl.max`` of a bf16
tensor), atomics, histogram, ``tl.dot_scaled``, erf/rsqrt, fp8 conversions.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter as _interp

__all__ = ["apply", "remove", "is_applied", "to_bf16_bits"]

# Every path that can see a bf16 operand or produce a bf16 result, on Triton 3.4 and 3.9; the create_*
# methods reach these through self.<name>, so patching the class covers them all.
_METHODS = ("cast_impl", "binary_op", "ternary_op", "unary_op", "create_fma", "create_dot")
_originals: dict[str, object] = {}


def _is_bf16(h) -> bool:
    # Comparison results keep their operand's dtype with bool data: the data decides.
    return h.data.dtype == np.uint16 and getattr(h.dtype, "scalar", h.dtype) == tl.bfloat16


def _widen(h):
    """bf16 handle -> fp32 handle, same values. astype keeps the strides (order "K"): a transposed bf16 tile
    reaches np.matmul laid out like the same tile in an fp32 run, so BLAS cannot pick another summation order."""
    return _interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def to_bf16_bits(data) -> np.ndarray:
    """fp32 values -> bf16 bit patterns (uint16), round to nearest even; NaN stays NaN (quiet bit set, so
    dropping the low payload bits cannot turn it into Inf)."""
    data = np.asarray(data, dtype=np.float32)
    bits = data.view(np.uint32).astype(np.uint64)  # 64 bits: the rounding increment cannot wrap
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(data), (bits >> 16) | 0x40, rounded).astype(np.uint16)


def _narrow(h):
    if h.data.dtype != np.float32:  # rounding fp64 to fp32 first would round twice: not expected here
        raise TypeError(f"interpreter_bf16: expected an fp32 result to round to bf16, got {h.data.dtype}")
    return _interp.TensorHandle(to_bf16_bits(h.data), tl.bfloat16)


def _in_fp32(name, bf16_result):
    """A method wrapped to widen its bf16 operands, run in fp32, and narrow a float result back to bf16
    when ``bf16_result(args)`` says the result type is bf16."""
    original = _originals[name]

    def method(self, *args, **kwargs):
        handles = [_widen(a) if isinstance(a, _interp.TensorHandle) and _is_bf16(a) else a for a in args]
        if all(h is a for h, a in zip(handles, args)):
            return original(self, *args, **kwargs)
        out = original(self, *handles, **kwargs)
        return _narrow(out) if bf16_result(args) and out.data.dtype != np.bool_ else out  # bool: a comparison

    method.__name__ = name
    return method


def _cast_impl(self, src, dst_type):
    original = _originals["cast_impl"]
    if _is_bf16(src):
        wide = _widen(src)
        return wide if dst_type.scalar == tl.float32 else original(self, wide, dst_type)
    if dst_type.scalar == tl.bfloat16:
        # Anything (fp64, fp16, ints, bools) to fp32 first: exact except fp64 and ints above 2**24, which
        # then round twice, not once as on the GPU.
        wide = src if src.data.dtype == np.float32 else original(self, src, tl.float32)
        return _narrow(wide)
    return original(self, src, dst_type)


def _get_bf16(self, value):
    return _narrow(self.get_fp32(value))


def apply() -> None:
    """Patch InterpreterBuilder in place (idempotent). Raises if this Triton's interpreter does not look
    like the one the patch was written for, rather than leave bf16 silently wrong."""
    if _originals:
        return
    builder = _interp.InterpreterBuilder
    missing = [name for name in _METHODS if not callable(getattr(builder, name, None))]
    if missing:
        raise RuntimeError(f"interpreter_bf16: InterpreterBuilder has no {missing}; update tests/interpreter_bf16.py")
    if _interp._get_np_dtype(tl.bfloat16) != np.uint16:
        raise RuntimeError("interpreter_bf16: the interpreter no longer stores bf16 as uint16 bit patterns")
    _originals.update({name: getattr(builder, name) for name in _METHODS})
    patched = {
        "cast_impl": _cast_impl,
        "binary_op": _in_fp32("binary_op", lambda a: _is_bf16(a[0])),  # result typed like lhs
        "ternary_op": _in_fp32("ternary_op", lambda a: _is_bf16(a[2])),  # like the last operand
        "unary_op": _in_fp32("unary_op", lambda a: _is_bf16(a[0])),
        "create_fma": _in_fp32("create_fma", lambda a: _is_bf16(a[2])),  # rounds twice; the GPU's once
        "create_dot": _in_fp32("create_dot", lambda a: _is_bf16(a[2])),  # only a bf16 accumulator
    }
    if not hasattr(builder, "get_bf16"):  # Triton 3.4 has no bf16 constants (x * 2.0 with x bf16)
        _originals["get_bf16"] = None
        patched["get_bf16"] = _get_bf16
    for name, method in patched.items():
        setattr(builder, name, method)


def remove() -> None:
    """Undo ``apply`` (for the test that shows the unpatched interpreter is wrong)."""
    for name, method in _originals.items():
        if method is None:
            delattr(_interp.InterpreterBuilder, name)
        else:
            setattr(_interp.InterpreterBuilder, name, method)
    _originals.clear()


def is_applied() -> bool:
    return bool(_originals)
