"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as PEFT computes it, composed from the fused LoRA backend calls.

    c  = m / ‖W + s·B·A‖            (N,)   per output row, the norm over in_features, DETACHED (a constant
                                           in backward, as PEFT does after section 4.3 of the DoRA paper)
    y  = x·Wᵀ + b + (c − 1)·(x̂·Wᵀ) + c·s·(x̂·Aᵀ)·Bᵀ          x̂ = dropout(x), the bias not scaled

At dropout 0 (or in eval) x̂ = x and this is y = c ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b: a backend with ``dora_forward``
/ ``dora_backward`` (Triton) takes c into its kernels; otherwise the backend's fused forward without bias
(y0), scaled per column, plus b. With dropout, y = (x − x̂)·Wᵀ + b + c ⊙ (x̂·Wᵀ + s·x̂·Aᵀ·Bᵀ): a backend with
``dora_dropout_forward`` / ``dora_dropout_backward`` (torch: stock ops) runs it itself; otherwise the rows
[x̂; x − x̂] stacked run as ONE mixed-adapter call of the backend (``forward_multi``: the top half with the
adapter, the bottom half base only), so W is read once for both products, and backward likewise runs one
``backward_multi`` over [g ⊙ c; g].

The norm never materialises the N×K sum W + s·B·A:
    ‖W_n + s·B_n·A‖² = ‖W_n‖² + 2s·B_n·(A·W_nᵀ) + s²·B_n·(A·Aᵀ)·B_nᵀ
one pass over W per step (A·Wᵀ, r×N), r×r and N×r work besides. ‖W‖² is cached per weight (W is frozen)
and the whole norm while W, A and B are unchanged (their storage and version counters are the keys, so an
in-place change, an optimizer step included, invalidates it).
"""

from __future__ import annotations

import weakref

import torch

from fastlora.backends import draw_seed, get_backend, resolve_backend
from fastlora.functional import _autocast_aware, _check_args, _describe
from fastlora.grouping import group_rows
from fastlora.nf4 import NF4Weight
from fastlora.ops import _needs_grad

__all__ = ["DoRALinearFunction", "dora_after", "dora_linear", "dora_norm", "clear_norm_cache"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # The norm and the column scale are computed in fp32 (fp64 for fp64 weights) whatever the base dtype:
    # they are N numbers, and PEFT's bf16 norm loses 3 digits for nothing.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's current values without reading them: storage address, layout and the
    version counter (bumped by every in-place write, to views too)."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


def _owner(t: torch.Tensor) -> torch.Tensor:
    # A view made per call (Conv1D's weight.t()) is a new object each time; its base is the stable one.
    return t._base if t._base is not None else t


# id(owner of W) -> (weak reference to it, _key(W), ‖W‖² (N,), {(id A, id B, s): (refs, keys, norm)}). Keyed
# by id with a weak reference, as peft_fused's NF4 cache: an entry goes with its weight.
_CACHE: dict[int, list] = {}
# Norms kept per weight: one per (A, B, s) in use (a few adapters); more than this and the oldest goes.
_NORMS_PER_WEIGHT = 8


def clear_norm_cache() -> None:
    """Forget every cached ‖W‖² and norm (tests; nothing else needs it: stale entries are never used)."""
    _CACHE.clear()


def _forget(ref: weakref.ref, key: int) -> None:
    entry = _CACHE.get(key)
    if entry is not None and entry[0] is ref:
        del _CACHE[key]


def _weight_entry(weight: torch.Tensor) -> list:
    owner = _owner(weight)
    key, wkey = id(owner), _key(weight)
    entry = _CACHE.get(key)
    if entry is not None and entry[0]() is owner and entry[1] == wkey:
        return entry
    acc = _acc_dtype(weight.dtype)
    with torch.no_grad():
        w = weight if weight.dtype == acc else weight.to(acc)
        sq = torch.linalg.vector_norm(w, dim=1).square_()
    entry = _CACHE[key] = [weakref.ref(owner, lambda ref: _forget(ref, key)), wkey, sq, {}]
    return entry


def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B·A‖ per output row (norm over in_features), detached, without forming W + s·B·A.

    Args:
        weight: (N, K) dense base weight (any strides).
        lora_A: (r, K). lora_B: (N, r). scaling: s.

    Returns:
        (N,) in fp32 (fp64 for an fp64 weight), no grad. Cached while W, A and B keep their storage and
        version counters (an in-place update, e.g. an optimizer step, makes the next call recompute).
    """
    entry = _weight_entry(weight)
    norms = entry[3]
    nkey = (id(lora_A), id(lora_B), float(scaling))
    hit = norms.get(nkey)
    akey, bkey = _key(lora_A), _key(lora_B)
    if hit is not None and hit[0]() is lora_A and hit[1]() is lora_B and hit[2] == (akey, bkey):
        return hit[3]
    acc = entry[2].dtype
    with torch.no_grad():
        a = lora_A.detach().to(acc)
        b = lora_B.detach().to(acc)
        w = weight if weight.dtype == acc else weight.to(acc)
        aw = torch.mm(a, w.t())  # (r, N): the one pass over W
        gram = torch.mm(a, a.t())  # (r, r)
        cross = (b * aw.t()).sum(1)  # B_n·(A·W_nᵀ)
        quad = (torch.mm(b, gram) * b).sum(1)  # B_n·(A·Aᵀ)·B_nᵀ
        sq = entry[2] + (2.0 * scaling) * cross + (scaling * scaling) * quad
        # Rounding can take an exactly-zero row's square a hair below 0.
        norm = sq.clamp_min_(0.0).sqrt_()
    if len(norms) >= _NORMS_PER_WEIGHT:
        norms.pop(next(iter(norms)))
    try:
        refs = (weakref.ref(lora_A), weakref.ref(lora_B))
    except TypeError:
        return norm
    norms[nkey] = (*refs, (akey, bkey), norm)
    return norm


# --- the op ---------------------------------------------------------------------------------------------


def _stacked(x2: torch.Tensor, keep: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """[x̂; x − x̂] (2M, K) with x̂ = x ⊙ m / (1 − p), from the keep-mask ``keep`` (M, K), boolean or 0/1."""
    m = x2.shape[0]
    out = torch.empty((2 * m, x2.shape[1]), dtype=x2.dtype, device=x2.device)
    torch.mul(x2, keep, out=out[:m]).mul_(1.0 / (1.0 - dropout_p))
    torch.sub(x2, out[:m], out=out[m:])
    return out


def _halves(m: int, device: torch.device):
    """The row grouping of [x̂; x − x̂]: the first m rows with adapter 0, the next m base only."""
    index = torch.full((2 * m,), -1, dtype=torch.int64, device=device)
    index[:m] = 0
    return group_rows(index, 1, (2 * m,))


def _as_output(y: torch.Tensor) -> torch.Tensor:
    # Not a view (see ops._forward why): _unsafe_view is how matmul returns its folded results too.
    return torch.ops.aten._unsafe_view(y, y.shape) if y._is_view() else y


def _dora_forward(backend, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed):
    """(y (..., N), c (N,) in x's dtype, D (M, N), extra) where D is the unscaled pre-bias DoRA term
    (x̂·Wᵀ + s·x̂·Aᵀ·Bᵀ) that dm needs and ``extra`` what backward needs: S (M, r) at p = 0; with dropout
    (the stacked input [x̂; x − x̂], its S, its grouping)."""
    in_features, out_features = x.shape[-1], weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    c = (magnitude.detach().to(norm.dtype) / norm).to(x.dtype)
    if dropout_p == 0.0:
        fused = getattr(backend, "dora_forward", None)
        if fused is not None:  # Triton: D and y = c ⊙ D + b from the one GEMM's epilogue
            y, y0, shrink = fused(x2, weight, bias, lora_A, lora_B, c, scaling)
            return y.view(*lead, out_features), c, y0, shrink
        y0, shrink = backend.forward(x2, weight, None, lora_A, lora_B, scaling, 0.0, None)  # y0 = x·Wᵀ + s·S·Bᵀ
        y = torch.mul(y0, c) if bias is None else torch.addcmul(bias, y0, c)  # one pass, a fresh tensor
        return y.view(*lead, out_features), c, y0, shrink
    direct = getattr(backend, "dora_dropout_forward", None)
    if direct is not None:  # stock ops (the torch backend): two GEMMs, no stacked rows
        y, d, shrink, mask = direct(x2, weight, bias, lora_A, lora_B, c, scaling, dropout_p, seed)
        return y.view(*lead, out_features), c, d, (mask, shrink, None)
    m = x2.shape[0]
    mask = backend.keep_mask(seed, tuple(x2.shape), dropout_p, x.device)  # bool (M, K)
    stacked = _stacked(x2, mask, dropout_p)
    grouping = _halves(m, x.device)
    both, shrink = backend.forward_multi(stacked, weight, None, lora_A[None], lora_B[None], (scaling,), (0.0,),
                                         (lora_A.shape[0],), grouping, None)  # fmt: skip
    d, e = both[:m], both[m:]  # D = x̂·Wᵀ + s·x̂·Aᵀ·Bᵀ, E = (x − x̂)·Wᵀ
    if bias is not None:
        e.add_(bias)
    y = _as_output(e.addcmul_(d, c))  # E + b + c ⊙ D, in E's rows (D stays intact for dm)
    return y.view(*lead, out_features), c, d, (mask, shrink, grouping)


class DoRALinearFunction(torch.autograd.Function):
    """The DoRA linear's autograd. ``params = (scaling, dropout_p, seed, backend name, norm)``; the norm is
    an input of no gradient (detached, as PEFT's). Saved: x, W, A, B, S, the unscaled pre-bias term D (M, N),
    c (N,) and, with dropout, the boolean keep-mask (M, K)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, params):
        scaling, dropout_p, seed, backend, norm = params
        y, c, d, extra = _dora_forward(get_backend(backend), x, weight, bias, lora_A, lora_B, magnitude, norm, scaling,
                                       dropout_p, seed)  # fmt: skip
        if dropout_p == 0.0:
            ctx.save_for_backward(x, weight, lora_A, lora_B, extra, d, c, norm, None)
            ctx.grouping = None
        else:
            # x itself and the boolean mask (one byte an element), not the stacked rows (two x-sized tensors):
            # backward rebuilds them. Keeping the mask costs what drawing it again would save in time (on the
            # CPU, drawing an (M, K) mask takes about a fifth of one M×K×N GEMM's time).
            mask, shrink, grouping = extra
            ctx.save_for_backward(x, weight, lora_A, lora_B, shrink, d, c, norm, mask)
            ctx.grouping = grouping
        ctx.params = (scaling, dropout_p, backend, x.shape, magnitude.dtype)
        x_, w_, b_, a_, bb_, m_ = ctx.needs_input_grad[:6]
        ctx.needs = (x_, a_, bb_, w_, b_, m_)
        return _as_output(y)  # an output that is a view could not be modified in place (see ops._forward)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, shrink, d, c, norm, mask = ctx.saved_tensors
        scaling, dropout_p, backend_name, x_shape, m_dtype = ctx.params
        need_x, need_a, need_b, need_w, need_bias, need_m = ctx.needs
        backend = get_backend(backend_name)
        out_features = weight.shape[0]
        g = grad_y.reshape(-1, out_features)
        x2 = x.reshape(-1, x.shape[-1])
        grad_bias = g.sum(0) if need_bias else None
        fused = getattr(backend, "dora_backward", None) if dropout_p == 0.0 else None
        if fused is not None:  # Triton: c inside the kernels, Σ g ⊙ D from the pass over G
            dx, da, db_, dw, g_d = fused(g, x2, weight, lora_A, lora_B, shrink, d, c, scaling,
                                         (need_x, need_a, need_b, need_w))  # fmt: skip
            grad_m = (g_d.to(norm.dtype) / norm).to(m_dtype) if need_m else None
            return (None if dx is None else dx.view(x_shape)), dw, grad_bias, da, db_, grad_m, None
        grad_m = None
        if need_m:  # dm_n = Σ_rows g ⊙ D / ‖·‖_n, summed in the norm's precision
            if g.dtype == norm.dtype:  # one fused multiply-and-sum per column, no (M, N) product in between
                grad_m = (torch.linalg.vecdot(g.t(), d.t()) / norm).to(m_dtype)
            else:
                grad_m = (torch.mul(g, d).sum(0, dtype=norm.dtype) / norm).to(m_dtype)
        if dropout_p == 0.0:
            needs = (need_x, need_a, need_b, need_w, False)
            if g.shape[0] <= weight.shape[1] or need_w:
                gc = torch.mul(g, c)  # the gradient reaching D
                dx, da, db_, dw, _ = backend.backward(gc, x2, weight, lora_A, lora_B, shrink, scaling, 0.0, None,
                                                      needs)  # fmt: skip
            else:
                # More rows than in_features: scale W's and B's rows by c (N × K and N × r) instead of g
                # (M × N): (g ⊙ c)·W = g·(c ⊙ W), s·(g ⊙ c)·B = s·g·(c ⊙ B), and dB = c ⊙ (s·gᵀ·S).
                cw = torch.mul(weight, c[:, None])
                cb = torch.mul(lora_B, c[:, None].to(lora_B.dtype))
                dx, da, db_, dw, _ = backend.backward(g, x2, cw, lora_A, cb, shrink, scaling, 0.0, None, needs)
                if db_ is not None:
                    db_.mul_(c[:, None].to(db_.dtype))
            return (None if dx is None else dx.view(x_shape)), dw, grad_bias, da, db_, grad_m, None
        direct = getattr(backend, "dora_dropout_backward", None)
        if direct is not None:
            dx, da, db_, dw = direct(g, x2, weight, lora_A, lora_B, shrink, c, scaling, dropout_p, mask,
                                     (need_x, need_a, need_b, need_w))  # fmt: skip
            return (None if dx is None else dx.view(x_shape)), dw, grad_bias, da, db_, grad_m, None
        m = g.shape[0]
        stacked = _stacked(x2, mask, dropout_p)
        g2 = torch.empty((2 * m, out_features), dtype=g.dtype, device=g.device)  # [g ⊙ c; g] against [x̂; x − x̂]
        torch.mul(g, c, out=g2[:m])  # the gradient reaching D
        g2[m:].copy_(g)
        dx2, da, db_, dw, _ = backend.backward_multi(g2, stacked, weight, lora_A[None], lora_B[None], shrink,
                                                     (scaling,), (0.0,), (lora_A.shape[0],), ctx.grouping, None,
                                                     (need_x, need_a, need_b, need_w, False))  # fmt: skip
        del stacked, g2
        dx = None
        if need_x:
            # x̂ = k ⊙ x and x − x̂ = (1 − k) ⊙ x, k = m/(1 − p): dx = k ⊙ d_top + (1 − k) ⊙ d_bot
            #                                                      = d_bot + k ⊙ (d_top − d_bot).
            top, bot = dx2[:m], dx2[m:]
            dx = top.sub_(bot).mul_(mask).mul_(1.0 / (1.0 - dropout_p)).add_(bot)
            dx = _as_output(dx).view(x_shape)
        return (dx, dw, grad_bias, None if da is None else da[0], None if db_ is None else db_[0], grad_m,
                None)  # fmt: skip


def dora_after(y: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               lora: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, dropped: bool) -> torch.Tensor:
    """PEFT's rule for a DoRA adapter that comes after others (``DoraLinearVariant.forward`` on the result so
    far, y (..., N)): y + (c − 1)·(y − b) + c·lora without dropout (it rescales the earlier adapters' terms
    too), y + (c − 1)·(x̂·Wᵀ) + c·lora with it; c = m / norm, the norm detached and m not. ``lora`` is the
    adapter's s·(x̂·Aᵀ)·Bᵀ in y's dtype, ``norm`` its ``dora_norm``."""
    c = (magnitude / norm).to(y.dtype)
    base = torch.nn.functional.linear(x_hat, weight) if dropped else (y if bias is None else y - bias)
    return y + (c - 1) * base + c * lora


# --- the functional API ---------------------------------------------------------------------------------


def _check_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, generator) -> None:
    if isinstance(weight, NF4Weight):
        raise NotImplementedError("weight: DoRA on a quantised (NF4) base is not implemented; dequantise it or use "
                                  "plain LoRA")  # fmt: skip
    _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, generator)
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"magnitude: expected a torch.Tensor, got {type(magnitude).__name__}")
    if not magnitude.is_floating_point():
        raise TypeError(f"magnitude: expected a floating-point tensor, got dtype {magnitude.dtype}")
    out_features = weight.shape[0]
    if tuple(magnitude.shape) != (out_features,):
        raise ValueError(f"magnitude: expected shape (out_features={out_features},), got {_describe(magnitude)}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude: expected device {x.device} (x's), got {_describe(magnitude)}")


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DoRA as PEFT computes it: y = x·Wᵀ + b + (c − 1)·(x̂·Wᵀ) + c·s·(x̂·Aᵀ)·Bᵀ with c = m / ‖W + s·B·A‖ per
    output row (norm over in_features) and x̂ = dropout(x); at dropout 0, y = c ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b.

    The norm is DETACHED: treated as a constant in backward (PEFT's choice, after section 4.3 of the DoRA
    paper), so no gradient flows through it into A, B or W.

    Args:
        x: (..., K) input, any leading dimensions and strides.
        weight: (N, K) dense base weight in x's dtype (an NF4 weight is refused).
        bias: (N,) in x's dtype, or None; not scaled by c.
        lora_A: (r, K), r >= 1. lora_B: (N, r). Any floating dtype.
        magnitude: (N,) the DoRA magnitude m (PEFT's ``lora_magnitude_vector``), any floating dtype.
        scaling: s, finite.
        dropout_p: in [0, 1), on the adapter's input only (and on x̂·Wᵀ, as PEFT).
        training: dropout applies only when True.
        generator: where the dropout seed comes from; default PyTorch's for x's device.

    Returns:
        (..., N) in x's dtype. Gradients for x, A, B, m, and W and b when they require grad (dW = (g ⊙ c)ᵀ·x̂ +
        gᵀ·(x − x̂), db = Σ g), each in its input's dtype.

    Costs: forward the backend's fused LoRA GEMM, at p = 0 with c applied in its epilogue on Triton (one pass
    to scale by c elsewhere); with dropout two GEMMs (torch) or one over the 2M stacked rows [x̂; x − x̂]. Saved for backward: x, S (M, r), D = x̂·Wᵀ + s·x̂·Aᵀ·Bᵀ (M, N),
    which dm needs, and with dropout the boolean keep-mask (M, K).
    """
    _check_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, generator)
    p = float(dropout_p) if training else 0.0
    return _autocast_aware(_apply, x, weight, bias, lora_A, lora_B, magnitude, float(scaling), p, generator)


def _apply(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, generator):
    if torch.compiler.is_compiling():
        raise NotImplementedError("dora_linear: torch.compile does not trace DoRA yet; run the layer eagerly")
    backend = resolve_backend(x.device, x.dtype)
    norm = dora_norm(weight, lora_A, lora_B, scaling)
    seed = draw_seed(x.device, generator) if p > 0.0 else None
    if _needs_grad(x, weight, bias, lora_A, lora_B) or (torch.is_grad_enabled() and magnitude.requires_grad):
        return DoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, (scaling, p, seed, backend.name, norm))
    return _dora_forward(backend, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, p, seed)[0]
