"""Numerical checks shared by the test suite and the GPU check script.

Builds LoRA inputs with a float64 truth, and judges a backend's output and gradients against it: the
error must be at most twice PyTorch's own error in the same dtype, plus a unit-roundoff floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import fastlora
from fastlora import reference
from fastlora.backends import get_backend
from fastlora.backends import draw_seed

__all__ = ["FLOOR", "Case", "make_case", "layout", "run", "rel_err", "keep_mask_for", "check_case",
           "check_finite_differences"]  # fmt: skip

# Unit roundoff per dtype: the floor under the "2x PyTorch's own error" bar, for results whose
# reference error happens to be ~0 (e.g. an output that is exactly representable).
FLOOR = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}


@dataclass
class Case:
    """Leaf tensors of one LoRA linear call, in float64 (the truth); cast per run with ``.cast``."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout_p: float = 0.0
    train_base: bool = False  # weight and bias require grad (full fine-tuning)

    def tensors(self, dtype: torch.dtype, adapter_dtype: torch.dtype, device: torch.device | str = "cpu"
                ) -> dict[str, torch.Tensor | None]:  # fmt: skip
        def leaf(t, dt, grad):
            return None if t is None else t.detach().to(device=device, dtype=dt).requires_grad_(grad)

        return {
            "x": leaf(self.x, dtype, True),
            "weight": leaf(self.weight, dtype, self.train_base),
            "bias": leaf(self.bias, dtype, self.train_base),
            "lora_A": leaf(self.lora_A, adapter_dtype, True),
            "lora_B": leaf(self.lora_B, adapter_dtype, True),
        }


def make_case(lead, k, n, r, *, bias=True, scaling=0.5, dropout_p=0.0, train_base=False, seed=0) -> Case:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return Case(
        x=rand(*lead, k),
        weight=rand(n, k) / k**0.5,
        bias=rand(n) if bias else None,
        lora_A=rand(r, k) / k**0.5,
        lora_B=rand(n, r) / r**0.5,  # non-zero, so every gradient path carries signal
        scaling=scaling,
        dropout_p=dropout_p,
        train_base=train_base,
    )


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout, differentiable back to ``x``: "contiguous",
    "strided" (every other element of a wider buffer along the feature dim) or "transposed" (leading dims
    swapped in memory, so not viewable as 2-D)."""
    if kind == "contiguous":
        return x
    if kind == "strided":
        wide = torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)
        out = wide[..., ::2]
    elif kind == "transposed":
        out = x.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        raise ValueError(kind)
    assert not out.is_contiguous() or x.numel() <= 1
    return out


def run(fn, t: dict, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Call ``fn(**t)``, backpropagate ``grad_out``, return the output and every gradient."""
    y = fn(**t)
    y.backward(grad_out.to(y.dtype))
    result = {"y": y.detach()}
    for name, v in t.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:  # an NF4 weight is frozen
            result["d" + name] = v.grad
    return result


def rel_err(value: torch.Tensor, truth: torch.Tensor) -> float:
    assert value.shape == truth.shape, (value.shape, truth.shape)
    if truth.numel() == 0:
        return 0.0
    diff = (value.double() - truth).abs()
    if torch.isnan(diff).any():
        return float("inf")  # NaN never passes
    return (diff.max() / truth.abs().max().clamp_min(1e-30)).item()


def keep_mask_for(backend_name: str, gen_seed: int, shape, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep-mask the backend draws for a call made with generator=torch.Generator().manual_seed(gen_seed)."""
    device = torch.device(device)
    seed = draw_seed(device, torch.Generator().manual_seed(gen_seed))
    return get_backend(backend_name).keep_mask(seed, shape, p, device)


def check_case(case: Case, dtype, adapter_dtype=None, *, backend_name="torch", layout_kind="contiguous", gen_seed=7,
               device: torch.device | str = "cpu", nf4_blocksize: int | None = None, double_quant: bool = True):  # fmt: skip
    """Assert that fastlora's output and gradients are within 2x PyTorch's own same-dtype error (plus a
    unit-roundoff floor) of the float64 truth. Returns the errors, for tests that want to look further.

    With ``nf4_blocksize`` the base weight is NF4-quantised (``fastlora.nf4``) and fastlora gets the
    quantised weight; the truth and PyTorch's own run use its dequantised values (in float64, and rounded to
    ``dtype``), so the error measured is the op's, not the quantisation's."""
    adapter_dtype = adapter_dtype or dtype
    k = case.x.shape[-1]
    mask = None
    if case.dropout_p > 0:
        mask = keep_mask_for(backend_name, gen_seed, (case.x.numel() // max(k, 1), k), case.dropout_p, device)
        mask = mask.view(case.x.shape)
    grad_out = torch.randn(*case.x.shape[:-1], case.weight.shape[0], generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(device)  # fmt: skip

    def ref(**t):
        return reference.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], case.scaling,
                                     mask, case.dropout_p)  # fmt: skip

    def ours(**t):
        x = layout(t["x"], layout_kind)
        return fastlora.lora_linear(x, t["weight"], t["bias"], t["lora_A"], t["lora_B"], case.scaling,
                                    case.dropout_p, generator=torch.Generator().manual_seed(gen_seed))  # fmt: skip

    truth_t, pytorch_t = case.tensors(torch.float64, torch.float64, device), case.tensors(dtype, dtype, device)
    ours_t = case.tensors(dtype, adapter_dtype, device)
    if nf4_blocksize is not None:
        from fastlora import nf4

        q = nf4.quantize(case.weight.float(), nf4_blocksize, double_quant).to(device)
        truth_t["weight"], pytorch_t["weight"] = nf4.dequantize(q, torch.float32).double(), nf4.dequantize(q, dtype)
        ours_t["weight"] = q
    truth = run(ref, truth_t, grad_out)
    pytorch = run(ref, pytorch_t, grad_out)  # PyTorch's own error in this dtype
    got = run(ours, ours_t, grad_out)

    assert got["y"].dtype == dtype
    errors = {}
    for key, want in truth.items():
        assert key in got, f"missing gradient {key}"
        param = ours_t[key[1:]] if key != "y" else None  # (no gradient key exists for a frozen NF4 weight)
        if param is not None:
            assert got[key].dtype == param.dtype, f"{key}: dtype {got[key].dtype}, parameter is {param.dtype}"
        e_ours, e_torch = rel_err(got[key], want), rel_err(pytorch[key], want)
        bound = 2 * e_torch + FLOOR[dtype]
        errors[key] = (e_ours, e_torch)
        assert e_ours <= bound, f"{key}: error {e_ours:.3e} > 2 x PyTorch's {e_torch:.3e} + floor ({dtype})"
    return errors


def check_finite_differences(fn, inputs: dict[str, torch.Tensor], grad_out: torch.Tensor, seed: int = 0) -> None:
    """Directional derivatives of L = Σ fn(**inputs) ⊙ grad_out against central differences, one input at
    a time, in the inputs' own dtype.

    L is linear in each input separately (x, W, b, A, B; the dropout mask is fixed by the seed inside fn),
    so the central difference with a step as large as the input itself is exact up to rounding: any
    disagreement beyond fp32 rounding of the two sums is a wrong gradient, not truncation error.
    """
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    y = fn(**leaves)
    (y * grad_out.to(y.dtype)).sum().backward()
    g = torch.Generator().manual_seed(seed)
    for name, leaf in leaves.items():
        direction = torch.randn(leaf.shape, generator=g, dtype=torch.float64).to(leaf.device) * leaf.detach().double().std()
        analytic = (leaf.grad.double() * direction).sum().item()

        def loss(sign: float) -> float:
            moved = dict(leaves, **{name: (leaf.detach().double() + sign * direction).to(leaf.dtype)})
            return (fn(**moved).double() * grad_out.double()).sum().item()

        plus, minus = loss(1.0), loss(-1.0)
        numeric = (plus - minus) / 2
        scale = abs(plus) + abs(minus) + abs(analytic)
        assert abs(numeric - analytic) <= 1e-4 * scale, f"d{name}: analytic {analytic:.6g}, numeric {numeric:.6g}"
