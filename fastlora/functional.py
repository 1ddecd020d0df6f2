"""``lora_linear`` and ``lora_linear_multi``: argument checks with clear messages, autocast, the dropout seed, then the op."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastlora._checks import is_integer, is_real
from fastlora.backends import draw_seed, resolve_backend
from fastlora.grouping import RowGrouping, group_rows
from fastlora.nf4 import DTYPES as _NF4_DTYPES
from fastlora.nf4 import NF4Weight
from fastlora.ops import lora_linear_eager, lora_linear_multi_eager

__all__ = ["lora_linear", "lora_linear_multi"]

def _describe(t: torch.Tensor) -> str:
    return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    return t


_Tensor = torch.Tensor


def _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, generator) -> None:
    """Raise on any bad argument. A call costs a few microseconds of host time, which matters at decode
    sizes (issue: host time below PEFT's): one expression accepts the common, valid case; only when it is
    False do the checks below run one by one to say what is wrong. The fast test implies every one of them."""
    if (
        type(scaling) in (float, int) and type(dropout_p) in (float, int) and type(training) is bool
        and generator is None and isinstance(x, _Tensor) and (isinstance(weight, _Tensor) or type(weight) is NF4Weight)
        and isinstance(lora_A, _Tensor) and isinstance(lora_B, _Tensor) and (bias is None or isinstance(bias, _Tensor))
        and math.isfinite(scaling) and 0.0 <= dropout_p < 1.0
    ):  # fmt: skip
        w_shape, a_shape, b_shape = weight.shape, lora_A.shape, lora_B.shape  # each .shape builds a tuple
        # An NF4 weight computes in x's dtype (float16, bfloat16 or float32).
        base_dtype = x.dtype if type(weight) is NF4Weight and x.dtype in _NF4_DTYPES else weight.dtype
        if (
            len(w_shape) == 2 and len(a_shape) == 2 and len(b_shape) == 2 and x.ndim >= 1
            and x.shape[-1] == w_shape[1] == a_shape[1] and a_shape[0] >= 1
            and b_shape[0] == w_shape[0] and b_shape[1] == a_shape[0]
            and x.is_floating_point() and base_dtype == x.dtype
            and lora_A.is_floating_point() and lora_B.is_floating_point()
            and (bias is None or (bias.dtype == base_dtype and bias.shape == (w_shape[0],)))
        ):  # fmt: skip
            device = x.device
            if weight.device == device and lora_A.device == device and lora_B.device == device and (
                bias is None or bias.device == device
            ):
                return
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dimension (..., in_features), got a 0-d tensor")
    quantized = isinstance(weight, NF4Weight)  # checked at construction; dequantised in x's dtype
    if quantized:
        if weight.device != x.device:
            raise ValueError(f"weight: expected device {x.device} (x's), got {weight!r}")
        if x.dtype not in _NF4_DTYPES:
            raise TypeError(f"x: an NF4 weight computes in float16, bfloat16 or float32; got {_describe(x)}")
    else:
        _check_tensor("weight", weight)
        if weight.dim() != 2:
            raise ValueError(f"weight: expected 2-D (out_features, in_features), got {_describe(weight)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x: expected last dimension in_features={in_features} (weight is {tuple(weight.shape)}), "
            f"got {_describe(x)}"
        )
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's), got {_describe(t)}")
    base_dtype = x.dtype if quantized else weight.dtype
    if base_dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {x.dtype} (x's), got {_describe(weight)}")
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.shape != (out_features,):
            raise ValueError(f"bias: expected shape ({out_features},) or None, got {_describe(bias)}")
        if bias.dtype != base_dtype:
            whose = "x's: the NF4 weight computes in it" if quantized else "weight's"
            raise TypeError(f"bias: expected dtype {base_dtype} ({whose}), got {_describe(bias)}")
    _check_tensor("lora_A", lora_A)
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A: expected 2-D (r, in_features={in_features}), got {_describe(lora_A)}")
    rank = lora_A.shape[0]
    if rank < 1:
        raise ValueError(f"lora_A: expected rank r >= 1 rows, got r = {rank} ({_describe(lora_A)})")
    _check_tensor("lora_B", lora_B)
    if lora_B.shape != (out_features, rank):
        raise ValueError(
            f"lora_B: expected shape (out_features={out_features}, r={rank}), got {_describe(lora_B)}"
        )
    if not is_real(scaling):
        raise TypeError(f"scaling: expected a real number, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite number, got {scaling}")
    if not isinstance(training, bool):
        raise TypeError(f"training: expected True or False, got {training!r} ({type(training).__name__})")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if not is_real(dropout_p):
        raise TypeError(f"dropout_p: expected a real number in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # device types without autocast (e.g. "meta", for shape propagation)
        return False


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ, fused, with gradients for every input that requires them.

    Args:
        x: (..., K) input, any leading dimensions, any strides (never copied to change dtype).
        weight: (N, K) base weight, x's dtype; or a ``fastlora.nf4.NF4Weight`` of shape (N, K), dequantised
            tile by tile into x's dtype (float16, bfloat16 or float32) inside the GEMMs.
        bias: (N,) base bias in x's dtype, or None.
        lora_A: (r, K), r >= 1, any floating dtype (fp32 adapters on a bf16/fp16 base are fine).
        lora_B: (N, r), any floating dtype.
        scaling: the scalar s (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA), finite.
        dropout_p: drop probability in [0, 1) for the LoRA input only.
        training: dropout applies only when True and dropout_p > 0.
        generator: where the dropout seed comes from; default PyTorch's generator for x's device.

    Returns:
        (..., N) tensor in x's dtype (under autocast, in the autocast dtype, as ``F.linear``).
        Gradients come back in each input's own dtype.
    """
    _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, generator)
    p = float(dropout_p) if training else 0.0
    return _autocast_aware(_apply, x, weight, bias, lora_A, lora_B, float(scaling), p, generator)


# True when autocast is on for any device type (PyTorch >= 2.4's private query; else always asks per device).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_aware(run, x, weight, bias, *rest):
    """``run(x, weight, bias, *rest)``; under autocast, with x, W and b cast to the autocast dtype first, the
    way F.linear runs its GEMM there. Adapters keep their dtype (the backends cast those small tensors
    themselves); inside, autocast is off so no op recasts what was chosen."""
    if not _any_autocast():  # the common case, answered without x.device.type (half a microsecond)
        return run(x, weight, bias, *rest)
    device_type = x.device.type
    if not _autocast_enabled(device_type):
        return run(x, weight, bias, *rest)
    dtype = torch.get_autocast_dtype(device_type)
    x = x.to(dtype)
    weight = weight if isinstance(weight, NF4Weight) else weight.to(dtype)  # NF4 dequantises into x's dtype
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return run(x, weight, bias, *rest)


def _apply(x, weight, bias, lora_A, lora_B, scaling, p, generator):
    if torch.compiler.is_compiling():
        if isinstance(weight, NF4Weight):
            raise NotImplementedError("weight: torch.compile does not take an NF4 weight yet; run the layer eagerly")
        # The backend is resolved when the compiled graph runs, not when it is traced ("" = resolve then).
        seed = draw_seed(x.device, generator) if p > 0.0 else None
        return torch.ops.fastlora.lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, seed, "")[0]
    # Resolved once here: backward runs on the same backend even if the selection changes meanwhile.
    return lora_linear_eager(x, weight, bias, lora_A, lora_B, scaling, p, generator, resolve_backend(x.device, x.dtype))


def _per_adapter(name: str, value, n: int, kind: str) -> tuple:
    """A scalar or a sequence of n numbers, as a tuple of n Python numbers (checked by the caller)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise ValueError(f"{name}: expected a number or one {kind} per adapter ({n}), got a tensor of shape "
                             f"{tuple(value.shape)}")  # fmt: skip
        value = value.tolist() if value.dim() == 1 else value.item()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: expected one {kind} per adapter ({n}), got {len(value)}")
        return tuple(value)
    return (value,) * n


def _check_multi(x, weight, lora_A, lora_B, scaling, dropout_p, ranks, adapter_index):
    """The stacked adapters and per-adapter arguments of ``lora_linear_multi``, normalised:
    (scalings, dropout_ps, ranks) as tuples of n Python numbers."""
    _check_tensor("x", x)
    _check_tensor("lora_A", lora_A)
    _check_tensor("lora_B", lora_B)
    if lora_A.dim() != 3 or lora_A.shape[0] < 1 or lora_A.shape[1] < 1:
        raise ValueError(f"lora_A: expected 3-D (n adapters >= 1, r_max >= 1, in_features), got {_describe(lora_A)}")
    n, r_max, in_features = lora_A.shape
    if x.dim() >= 1 and x.shape[-1] != in_features:
        raise ValueError(f"lora_A: expected last dimension in_features={x.shape[-1]} (x's), got {_describe(lora_A)}")
    out_features = weight.shape[0] if isinstance(weight, (torch.Tensor, NF4Weight)) and len(weight.shape) == 2 else None
    if (lora_B.dim() != 3 or lora_B.shape[0] != n or lora_B.shape[2] != r_max
            or (out_features is not None and lora_B.shape[1] != out_features)):  # fmt: skip
        raise ValueError(f"lora_B: expected 3-D (n={n}, out_features={out_features}, r_max={r_max}) like lora_A's "
                         f"(n, r_max, in_features) and weight's (out_features, in_features), got {_describe(lora_B)}")  # fmt: skip
    scalings = _per_adapter("scaling", scaling, n, "scaling")
    for s in scalings:
        if not is_real(s) or not math.isfinite(s):
            raise ValueError(f"scaling: expected finite real numbers, got {s!r}")
    dropout_ps = _per_adapter("dropout_p", dropout_p, n, "probability")
    for p in dropout_ps:
        if not is_real(p) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout_p: expected probabilities in [0, 1), got {p!r}")
    if ranks is None:
        ranks = (r_max,) * n
    else:
        ranks = _per_adapter("ranks", ranks, n, "rank")
        for r in ranks:
            if not is_integer(r) or not 1 <= r <= r_max:
                raise ValueError(f"ranks: expected integers in [1, r_max={r_max}], got {r!r}")
    if isinstance(adapter_index, RowGrouping):
        if adapter_index.num_adapters != n or adapter_index.rows_shape != tuple(x.shape[:-1]):
            raise ValueError(f"adapter_index: a RowGrouping for {adapter_index.num_adapters} adapters and rows "
                             f"{adapter_index.rows_shape}, but lora_A stacks {n} and x's rows are "
                             f"{tuple(x.shape[:-1])}")  # fmt: skip
        if adapter_index.index.device != x.device:
            raise ValueError(f"adapter_index: expected device {x.device} (x's), got {adapter_index.index.device}")
    elif isinstance(adapter_index, torch.Tensor) and adapter_index.device != x.device:
        raise ValueError(f"adapter_index: expected device {x.device} (x's), got {_describe(adapter_index)}")
    return (tuple(float(s) for s in scalings), tuple(float(p) for p in dropout_ps), tuple(int(r) for r in ranks))


def lora_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | Sequence[float],
    adapter_index: torch.Tensor | RowGrouping,
    dropout_p: float | Sequence[float] = 0.0,
    training: bool = True,
    *,
    ranks: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A batch whose rows use different adapters: y = x·Wᵀ + b + s_a·(dropout_a(x)·A_aᵀ)·B_aᵀ, with a the
    row's adapter (no LoRA term where it is −1), fused, with gradients for x and every adapter.

    Args:
        x: (..., K) input.
        weight: (N, K) base weight in x's dtype, or an ``NF4Weight``.
        bias: (N,) in x's dtype, or None.
        lora_A: (n, r_max, K) stacked adapters' A; adapter a uses lanes [:ranks[a]].
        lora_B: (n, N, r_max) stacked adapters' B.
        scaling: s, one for all adapters or a sequence of n.
        adapter_index: integer tensor of each row's adapter in [−1, n), −1 = base only; its shape a prefix of
            x's leading dimensions (e.g. (B,) for x (B, T, K)) or broadcastable to them. Or a ``RowGrouping``
            from ``fastlora.group_rows`` (compute it once per batch and pass it to every layer).
        dropout_p: drop probability in [0, 1), one or a sequence of n; each row drops with its adapter's.
        training: dropout applies only when True.
        ranks: n ranks in [1, r_max] (default r_max each): lanes past an adapter's rank are never read,
            and their gradients are zero.
        generator: where the dropout seed comes from; default PyTorch's for x's device.

    Returns:
        (..., N) in x's dtype. Gradients: dA (n, r_max, K) and dB (n, N, r_max) in the adapters' dtype, zero
        for adapters without rows. Not traceable by ``torch.compile`` yet.
    """
    scalings, dropout_ps, ranks = _check_multi(x, weight, lora_A, lora_B, scaling, dropout_p, ranks, adapter_index)
    _check_args(x, weight, bias, lora_A[0], lora_B[0], scalings[0], dropout_ps[0], training, generator)
    if torch.compiler.is_compiling():
        raise NotImplementedError("lora_linear_multi: torch.compile does not trace mixed-adapter batches yet")
    if not training:
        dropout_ps = (0.0,) * len(dropout_ps)
    grouping = adapter_index
    if not isinstance(grouping, RowGrouping):
        grouping = group_rows(adapter_index, lora_A.shape[0], x.shape[:-1])
    return _autocast_aware(lora_linear_multi_eager, x, weight, bias, lora_A, lora_B, scalings, dropout_ps, ranks,
                           grouping, generator, resolve_backend(x.device, x.dtype))  # fmt: skip
