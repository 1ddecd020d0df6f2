"""The LoRA linear as a differentiable op, two ways over the same backend calls.

- ``torch.ops.fastlora.lora_linear`` / ``lora_linear_backward``: ``torch.library`` custom ops with fake
  (meta) implementations and a registered autograd formula, so ``torch.compile(fullgraph=True)`` traces
  through them and ``torch.library.opcheck`` passes.
- ``LoRALinearFunction``: an ``autograd.Function`` for eager calls. It runs the same backend methods
  without the custom-op dispatcher in between (``benchmarks/cpu_vs_peft.py`` measures what that saves).

``fastlora.functional.lora_linear`` picks the second in eager mode (``lora_linear_eager``) and the first
while compiling. In eager mode two cheaper ways come first: a backend with a ``compose`` method builds small
calls from stock differentiable ops, and a call that needs no gradient runs the backend's forward alone. Both
save exactly: x (the caller's tensor, not a copy), S = x̂·Aᵀ (..., r), the seed, and the weights; and
backward runs on the backend that ran forward (their dropout masks differ), whatever is selected by then.
"""

from __future__ import annotations

from typing import Any

import torch

from fastlora.backends import draw_seed, get_backend, resolve_backend

__all__ = ["LoRALinearFunction", "LoRALinearMultiFunction", "lora_linear_eager", "lora_linear_multi_eager", "lora_linear_op"]


def _backend(name: str, x: torch.Tensor):
    """The backend called ``name`` (chosen by the caller, and already checked to run here), or, for "",
    the one the current selection resolves to now."""
    return get_backend(name) if name else resolve_backend(x.device, x.dtype)


def _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return _run_forward(_backend(backend, x), x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _run_forward(backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    y, shrink = backend.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    # A backend may hand back its 2-D result reshaped to (..., N) with .view (the triton backend does; the
    # torch backend allocates y in its final shape instead). A custom Function's output that is a view
    # cannot be modified in place (autograd raises) and FSDP2 warns that an in-place op on it would skip its
    # pre-backward all-gather. F.linear's output is never a view (matmul folds its batch dimensions with
    # aten._unsafe_view, a non-view alias), so do the same; nothing else holds the 2-D base.
    if y._is_view():
        y = torch.ops.aten._unsafe_view(y, y.shape)
    return y, shrink


def _backward(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed, needs, backend):
    return _backend(backend, x).backward(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed,
                                         tuple(needs))  # fmt: skip


# --- custom ops (the path torch.compile sees) -------------------------------------------------------------


@torch.library.custom_op("fastlora::lora_linear", mutates_args=())
def lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y (..., N), S (..., r)); S is what backward needs, not differentiable. ``backend`` names the
    backend to run, or is "" to resolve the selection when the op runs (what compiled graphs do)."""
    return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)


@lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    lead = x.shape[:-1]
    return x.new_empty((*lead, weight.shape[0])), x.new_empty((*lead, lora_A.shape[0]))


@torch.library.custom_op("fastlora::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    shrink: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    needs: list[bool],
    backend: str,
) -> list[torch.Tensor]:
    """Returns [dx, dA, dB, dW, db]; an entry not asked for by ``needs`` is an empty (0,) tensor, since
    custom ops cannot return None."""
    grads = _backward(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed, needs, backend)
    return [g if g is not None else x.new_empty(0) for g in grads]


@lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed, needs, backend):
    shapes = [(x.shape, x.dtype), (lora_A.shape, lora_A.dtype), (lora_B.shape, lora_B.dtype),
              (weight.shape, weight.dtype), ((weight.shape[0],), weight.dtype)]  # fmt: skip
    return [x.new_empty(shape, dtype=dtype) if need else x.new_empty(0) for need, (shape, dtype) in zip(needs, shapes)]


def _needs(needs_input_grad: tuple[bool, ...]) -> list[bool]:
    """Inputs are ordered (x, weight, bias, lora_A, lora_B, ...); the backward returns (dx, dA, dB, dW, db)."""
    x, w, b, a, bb = needs_input_grad[:5]
    return [x, a, bb, w, b]


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.needs = _needs(ctx.needs_input_grad)
    ctx.mark_non_differentiable(output[1])


def _op_backward(ctx: Any, grad_y: torch.Tensor, _grad_shrink: torch.Tensor | None) -> tuple:
    x, weight, lora_A, lora_B, shrink, seed = ctx.saved_tensors
    grads = torch.ops.fastlora.lora_linear_backward(
        grad_y, x, weight, lora_A, lora_B, shrink, ctx.scaling, ctx.dropout_p, seed, ctx.needs, ctx.backend
    )
    dx, da, db_, dw, dbias = (g if need else None for g, need in zip(grads, ctx.needs))
    return dx, dw, dbias, da, db_, None, None, None, None


lora_linear_op.register_autograd(_op_backward, setup_context=_setup_context)


# --- eager fast path --------------------------------------------------------------------------------------


def _save(ctx: Any, x, weight, lora_A, lora_B, shrink, seed, params: tuple) -> None:
    """What the eager Functions keep for backward: x, the weights, S and the seed (the tensors), the
    non-tensor ``params`` and which inputs need gradients. A quantised weight (fastlora.nf4.NF4Weight) is not
    a tensor: it rides on ctx, holding only the frozen weight's own storage, nothing of this call's."""
    dense = isinstance(weight, torch.Tensor)
    ctx.save_for_backward(x, weight if dense else None, lora_A, lora_B, shrink, seed)
    ctx.quantized = None if dense else weight
    ctx.params = params
    ctx.needs = _needs(ctx.needs_input_grad)


def _saved(ctx: Any) -> tuple:
    """(x, weight, lora_A, lora_B, S, seed) as ``_save`` kept them."""
    x, weight, lora_A, lora_B, shrink, seed = ctx.saved_tensors
    return x, weight if ctx.quantized is None else ctx.quantized, lora_A, lora_B, shrink, seed


class LoRALinearFunction(torch.autograd.Function):
    """Same inputs, saved tensors and gradients as the custom op, without its dispatch overhead. The
    non-tensor arguments and the seed travel as one tuple ``params = (scaling, dropout_p, seed, backend)``:
    ``Function.apply`` spends host time on every positional argument."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, params):
        scaling, dropout_p, seed, backend = params
        y, shrink = _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
        _save(ctx, x, weight, lora_A, lora_B, shrink, seed, (scaling, dropout_p, backend))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, shrink, seed = _saved(ctx)
        scaling, dropout_p, backend = ctx.params
        dx, da, db_, dw, dbias = _backward(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed,
                                           ctx.needs, backend)  # fmt: skip
        return dx, dw, dbias, da, db_, None


def _needs_grad(x, weight, bias, lora_A, lora_B) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
        or getattr(weight, "requires_grad", False)  # an NF4Weight is frozen: it has no requires_grad
        or (bias is not None and bias.requires_grad)
    )  # fmt: skip


def lora_linear_eager(x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator, backend) -> torch.Tensor:
    """The eager call, in the cheapest form that gives the same result and gradients (host time decides
    at small sizes, see ``fastlora bench --host``). ``backend`` is a backend object that runs here; the
    dropout seed is drawn from ``generator`` (default: PyTorch's for x's device) only where one is needed."""
    compose = getattr(backend, "compose", None)
    if compose is not None:
        y = compose(x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator)
        if y is not None:
            return y
    seed = draw_seed(x.device, generator) if dropout_p > 0.0 else None
    if _needs_grad(x, weight, bias, lora_A, lora_B):
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, (scaling, dropout_p, seed, backend.name))
    # Nothing to differentiate (inference, no_grad): no Function, nothing saved.
    return _run_forward(backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)[0]


# --- mixed-adapter batches ---------------------------------------------------------------------------------


class LoRALinearMultiFunction(torch.autograd.Function):
    """``fastlora.lora_linear_multi``'s autograd: saves what the single op saves (x, the weights, S, the seed)
    and the row grouping. ``params = (scalings, dropout_ps, ranks, grouping, seed, backend)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, params):
        scalings, dropout_ps, ranks, grouping, seed, backend = params
        y, shrink = get_backend(backend).forward_multi(x, weight, bias, lora_A, lora_B, scalings, dropout_ps, ranks,
                                                       grouping, seed)  # fmt: skip
        _save(ctx, x, weight, lora_A, lora_B, shrink, seed, params)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, shrink, seed = _saved(ctx)
        scalings, dropout_ps, ranks, grouping, _, backend = ctx.params
        dx, da, db_, dw, dbias = get_backend(backend).backward_multi(
            grad_y, x, weight, lora_A, lora_B, shrink, scalings, dropout_ps, ranks, grouping, seed, tuple(ctx.needs)
        )
        return dx, dw, dbias, da, db_, None


def lora_linear_multi_eager(x, weight, bias, lora_A, lora_B, scalings, dropout_ps, ranks, grouping, generator,
                            backend) -> torch.Tensor:  # fmt: skip
    """As ``lora_linear_eager`` for a mixed-adapter batch: the Function when a gradient is needed, else the
    backend's forward alone."""
    seed = draw_seed(x.device, generator) if any(p > 0.0 for p in dropout_ps) else None
    if _needs_grad(x, weight, bias, lora_A, lora_B):
        params = (scalings, dropout_ps, ranks, grouping, seed, backend.name)
        return LoRALinearMultiFunction.apply(x, weight, bias, lora_A, lora_B, params)
    return backend.forward_multi(x, weight, bias, lora_A, lora_B, scalings, dropout_ps, ranks, grouping, seed,
                                 want_shrink=False)[0]  # fmt: skip
