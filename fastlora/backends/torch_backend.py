"""The "torch" backend: the best the LoRA linear gets from stock PyTorch ops, on any device.

It is not the reference (``fastlora/reference.py`` is): it orders the work to touch large tensors as
few times as PyTorch allows and saves as little as the math needs.

- Forward computes the tiny ``b + s·S·Bᵀ`` first and lets the big GEMM accumulate ``x·Wᵀ`` onto it
  (``addmm_`` with beta = 1): one pass over the (M, N) output, no separate add.
- Backward does the same for dX: ``(dS·A) ⊙ m`` first, then ``G·W`` accumulated onto it.
- Dropout keeps no mask: it is regenerated in backward from the seed. Drawing 31 random bits per
  element as int32 and comparing with a threshold is about 2.5x faster on the CPU than
  ``bernoulli_``, which is what makes regenerating cheaper than storing.
- Saved for backward (by the op, not here): x itself, S (M × r) and the seed.
- Small calls (``compose``) are built from stock differentiable ops instead of going through the op's
  ``autograd.Function``: at those sizes the arithmetic is negligible and host time decides, and autograd's
  own C++ nodes cost a fraction of a Python Function's forward and backward. They save the same tensors
  at p = 0 (x itself, S, the weights); with dropout the (small) mask and x̂ too.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F

from fastlora import nf4
from fastlora.backends import draw_seed

# Keep-mask resolution: an element is kept when its 31 uniform bits are >= round(p · 2³¹), so the
# realised drop probability is within 2⁻³² of p (finer than torch.rand's 24 bits).
_MASK_BITS = 31
# Up to this many elements the mask is one bernoulli_ call instead (same distribution, other numbers; the
# choice depends only on the shape, so forward and backward still draw the same mask).
_SMALL_MASK = 4096
# Calls with M·max(K, N) up to this many elements run as stock ops (``compose``): there host time decides
# (``fastlora bench --host``), above it the op's fewer passes over (M, K) in backward (dX accumulated in one
# GEMM) are worth its fixed host time. With dropout the composed call saves x̂ and the mask as PEFT does, so
# only calls with at most _COMPOSE_MAX_DROPOUT elements in x compose then: a few KiB, where the op saves
# neither.
_COMPOSE_MAX = 1 << 16
_COMPOSE_MAX_DROPOUT = 4096


# A quantised base is dequantised this many elements at a time (whole rows, at least one): 2 MiB in bf16,
# 1/16 of a 4096 × 4096 layer's full-precision weight, and large enough for the GEMM to run at speed.
_DEQUANT_CHUNK = 1 << 20


@functools.cache
def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, hence looked up defensively
    return bool(probe()) if probe is not None else False


def _gemm_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the quantised base's GEMMs run in for inputs of ``dtype``.

    On a CPU without AMX tiles, oneDNN's bf16 GEMM runs at half the speed of fp32 (measured on this
    project's 2-core AVX512-BF16 CI machine, 512 × 2048 × 2048: bf16 27 ms, fp32 14-16 ms, fp16 14 ms).
    A quantised base is decoded on every call anyway, so there the bf16 GEMMs run in fp32 instead: the
    decoded chunk is still rounded to bf16 (the layer's weight is the same bf16 values on every path) and
    x and G widen exactly, so only the accumulation differs, and it rounds once at the end instead of per
    chunk. A dense bf16 weight keeps the bf16 GEMM: widening it would cost a copy of W per call.
    """
    if dtype == torch.bfloat16 and device.type == "cpu" and not _cpu_has_amx():
        return torch.float32
    return dtype


def _row_chunks(weight, dtype: torch.dtype, gemm_dtype: torch.dtype):
    """(first row, rows of W dequantised into ``dtype``, held in ``gemm_dtype``) for consecutive chunks of a
    quantised (N, K) weight: only one chunk exists in full precision at a time."""
    n, k = weight.shape
    rows = max(1, _DEQUANT_CHUNK // k)
    for start in range(0, n, rows):
        chunk = nf4.dequantize_rows(weight, start, min(n, start + rows), dtype)
        yield start, chunk if gemm_dtype == dtype else chunk.to(gemm_dtype)


class TorchBackend:
    name = "torch"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        return None  # plain PyTorch ops run wherever tensors live

    def __init__(self) -> None:
        self._local = threading.local()

    def _generator(self, device: torch.device) -> torch.Generator:
        """One generator per device and thread, reseeded per call: making a generator costs more host time
        than the mask of a small call."""
        generators = self._local.__dict__.setdefault("generators", {})
        gen = generators.get(device)
        if gen is None:
            gen = generators[device] = torch.Generator(device=device)
        return gen

    def keep_mask(self, seed: torch.Tensor, shape: tuple[int, ...], dropout_p: float, device: torch.device) -> torch.Tensor:
        """Boolean keep-mask of ``shape`` (True = kept), a pure function of (seed, shape, p, device).

        Args:
            seed: (1,) int64 tensor.
        """
        return self._keep(seed, shape, dropout_p, device, torch.bool)

    def _keep(self, seed, shape, dropout_p, device, dtype) -> torch.Tensor:
        """The keep-mask as 0/1 in ``dtype``: compared straight into x's dtype, so multiplying by it needs
        no bool-to-float conversion pass."""
        if device.type == "meta":  # shape propagation: there are no values to draw
            return torch.empty(shape, dtype=dtype, device=device)
        gen = self._generator(device)
        gen.manual_seed(int(seed.item()))
        if math.prod(shape) <= _SMALL_MASK:
            # Few elements: host time decides, and one bernoulli_ is two ops fewer than bits + compare. Drawn
            # in fp32 whatever x's dtype, so the mask does not depend on it.
            mask = torch.empty(shape, dtype=torch.float32, device=device).bernoulli_(1.0 - dropout_p, generator=gen)
            return mask if dtype == torch.float32 else mask.to(dtype)
        bits = torch.empty(shape, dtype=torch.int32, device=device).random_(generator=gen)  # [0, 2³¹)
        return torch.ge(bits, round(dropout_p * (1 << _MASK_BITS)), out=torch.empty(shape, dtype=dtype, device=device))

    def compose(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator) -> torch.Tensor | None:
        """y (..., N) built from differentiable stock ops (autograd differentiates it), or None when the call
        is too large to be worth it (the caller runs the op instead). Inputs as ``forward``'s, except the
        dropout mask's source: with a ``generator``, the mask ``forward`` draws from a seed drawn from it;
        without one, ``F.dropout``'s from PyTorch's default generator (one op instead of five: seed, host
        read, reseed, draw, multiply; ``torch.manual_seed`` still reproduces it, but it is not the mask the
        op or a compiled graph would draw).

        Three ops at p = 0: S = x·Aᵀ, base = x·Wᵀ + b, y = base + s·S·Bᵀ (one addmm).
        """
        if not isinstance(weight, torch.Tensor):  # a quantised base: the op dequantises it in chunks
            return None
        in_features, out_features = x.shape[-1], weight.shape[0]
        numel = x.numel()
        if numel > (_COMPOSE_MAX if dropout_p == 0.0 else _COMPOSE_MAX_DROPOUT) or (
            numel // max(in_features, 1)
        ) * out_features > _COMPOSE_MAX:
            return None
        dtype = x.dtype
        a = lora_A if lora_A.dtype == dtype else lora_A.to(dtype)
        b = lora_B if lora_B.dtype == dtype else lora_B.to(dtype)
        x2 = x if x.dim() == 2 else x.reshape(-1, in_features)
        if dropout_p == 0.0:
            x_hat = x2
        elif generator is None:
            x_hat = torch.dropout(x2, dropout_p, True)  # F.dropout without its Python wrapper
        else:
            # 0/1 mask; 1/(1 - p) rides on the last GEMM's alpha, where it costs no pass of its own.
            seed = draw_seed(x.device, generator)
            x_hat = x2 * self._keep(seed, x2.shape, dropout_p, x.device, dtype)
            scaling = scaling / (1.0 - dropout_p)
        y = torch.addmm(F.linear(x2, weight, bias), F.linear(x_hat, a), b.t(), alpha=scaling)
        # Not a view (see ops._forward why): _unsafe_view is how matmul folds batch dimensions too.
        return y if x.dim() == 2 else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], out_features))

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        dropout_p: float,
        seed: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shapes: x (..., K), weight (N, K), bias (N,), lora_A (r, K), lora_B (N, r).

        Returns y (..., N) and the shrink S = x̂·Aᵀ (..., r), both in x's dtype.
        """
        in_features, out_features, rank = x.shape[-1], weight.shape[0], lora_A.shape[0]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features) if x.dim() != 2 else x
        # Adapters are often fp32 on a bf16/fp16 base: cast the (r × K, N × r) adapters, never x.
        dtype = x.dtype
        a = lora_A if lora_A.dtype == dtype else lora_A.to(dtype)
        b = lora_B if lora_B.dtype == dtype else lora_B.to(dtype)
        if dropout_p > 0.0:
            x_hat = self._keep(seed, x2.shape, dropout_p, x.device, dtype).mul_(x2)  # x ⊙ m, (M, K)
            shrink = torch.mm(x_hat, a.t()).mul_(1.0 / (1.0 - dropout_p))
            del x_hat
        else:
            shrink = torch.mm(x2, a.t())
        # y is allocated in its final shape and filled through a 2-D view: what we return is not a view, so
        # ops._forward has nothing to re-wrap (see there why outputs must not be views). The scaling rides
        # on the GEMM's alpha: no separate pass, no extra op's host time.
        y = torch.empty((*lead, out_features), dtype=dtype, device=x.device)
        y2 = y if y.dim() == 2 else y.view(-1, out_features)
        quantised = not isinstance(weight, torch.Tensor)
        gemm_dtype = _gemm_dtype(x.device, dtype) if quantised else dtype
        # acc: where the GEMMs accumulate, y2 itself unless they run in a wider dtype than y's.
        acc = y2 if gemm_dtype == dtype else torch.empty(y2.shape, dtype=gemm_dtype, device=x.device)
        s_acc, b_acc = shrink.to(gemm_dtype), b.to(gemm_dtype)  # no-ops unless widened
        if bias is None:
            acc.addmm_(s_acc, b_acc.t(), beta=0, alpha=scaling)  # beta=0: acc's uninitialised values are ignored
        else:
            torch.addmm(bias.to(gemm_dtype), s_acc, b_acc.t(), alpha=scaling, out=acc)
        if not quantised:
            acc.addmm_(x2, weight.t())
        else:
            x_acc = x2.to(gemm_dtype)
            for start, w in _row_chunks(weight, dtype, gemm_dtype):  # + x·W[rows]ᵀ, a chunk of rows at a time
                acc[:, start : start + w.shape[0]].addmm_(x_acc, w.t())
            if acc is not y2:
                y2.copy_(acc)
        return y, (shrink if x.dim() == 2 else shrink.view(*lead, rank))

    def backward(
        self,
        grad_y: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        shrink: torch.Tensor,
        scaling: float,
        dropout_p: float,
        seed: torch.Tensor | None,
        needs: tuple[bool, bool, bool, bool, bool],
    ) -> tuple[torch.Tensor | None, ...]:
        """Gradients (dx, dA, dB, dW, db); an entry is None where ``needs`` says it is not wanted.

        Shapes: grad_y (..., N), x (..., K), shrink (..., r). Each gradient has its input's shape and dtype.
        """
        need_x, need_a, need_b, need_w, need_bias = needs
        in_features, out_features, rank = x.shape[-1], weight.shape[0], lora_A.shape[0]
        flat = x.dim() == 2
        g = grad_y if flat else grad_y.reshape(-1, out_features)
        x2 = x if flat else x.reshape(-1, in_features)
        s2 = shrink if flat else shrink.reshape(-1, rank)
        dtype = x.dtype
        a = lora_A if lora_A.dtype == dtype else lora_A.to(dtype)
        b = lora_B if lora_B.dtype == dtype else lora_B.to(dtype)

        keep = None
        if dropout_p > 0.0:
            keep = self._keep(seed, x2.shape, dropout_p, x.device, dtype)
        # dS = s·G·B (M, r), with dropout's 1/(1-p) folded into the same small factor.
        d_shrink = torch.mm(g, b).mul_(scaling / (1.0 - dropout_p) if keep is not None else scaling)
        grad_b = None
        if need_b:
            grad_b = torch.mm(g.t(), s2).mul_(scaling)
            grad_b = grad_b if grad_b.dtype == lora_B.dtype else grad_b.to(lora_B.dtype)

        grad_x = None
        if need_x:
            quantised = not isinstance(weight, torch.Tensor)
            gemm_dtype = _gemm_dtype(x.device, dtype) if quantised else dtype
            # (M, K), accumulated in gemm_dtype (see forward).
            grad_x = torch.mm(d_shrink.to(gemm_dtype), a.to(gemm_dtype))
            if keep is not None:
                grad_x.mul_(keep)
            if not quantised:
                grad_x.addmm_(g, weight)  # + G·W, accumulated in the GEMM
            else:
                g_acc = g.to(gemm_dtype)
                for start, w in _row_chunks(weight, dtype, gemm_dtype):  # + G[:, rows]·W[rows]
                    grad_x.addmm_(g_acc[:, start : start + w.shape[0]], w)
                grad_x = grad_x.to(dtype)
            grad_x = grad_x if flat else grad_x.view(x.shape)

        grad_a = None
        if need_a:
            x_hat = x2 if keep is None else keep.mul_(x2)  # the mask's last use: overwrite it with x ⊙ m
            grad_a = torch.mm(d_shrink.t(), x_hat)
            grad_a = grad_a if grad_a.dtype == lora_A.dtype else grad_a.to(lora_A.dtype)

        grad_w = torch.mm(g.t(), x2) if need_w else None
        grad_bias = g.sum(0) if need_bias else None
        return grad_x, grad_a, grad_b, grad_w, grad_bias


BACKEND = TorchBackend()
