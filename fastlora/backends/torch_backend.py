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
# The smallest composed calls take the low-rank product ΔW = s·B·A (N × K) as one tensor: fewer autograd
# nodes, whose host time is most of such a call's (``fastlora bench --host``). Without dropout, in fp32/fp64,
# it merges: y = x·(W + ΔW)ᵀ + b, three nodes instead of five; otherwise y = (x·Wᵀ + b) + x̂·ΔWᵀ, one fewer
# than through S. Not merged in 16-bit: rounding W + ΔW to bf16 would lose a young adapter's update
# altogether (ΔW alone keeps its own precision). Both cost more arithmetic than going through S:
# N·K·(M + 3r) multiply-adds for the LoRA term merged (ΔW, dW' = Gᵀ·x, dA and dB from it), N·K·(3M + 3r)
# unmerged (x̂·ΔWᵀ and dx̂ = G·ΔW too), and save ΔW or W' (N × K) instead of S (M × r): taken while that is
# at most _DELTA_MAX multiply-adds, a few microseconds on one core.
_DELTA_MAX = 1 << 16
_MERGE_DTYPES = (torch.float32, torch.float64)


# Inference over many small groups of rows (decode: a few rows per adapter) runs "stacked" instead: every
# row against all n adapters' r_max lanes in two GEMMs, M·n·r_max·(K + N) multiply-adds, taken when that is
# below what the per-group calls cost: about 30 µs of host time each on the CPU, some 2M multiply-adds there.
# Measured at K = N = 1024, r = 16, fp32, 32 one-row requests over 16 adapters: 1.8x the base layer stacked,
# 2.3x by groups.
_GROUP_MACS = 1 << 21


def _stacked_is_cheaper(grouping, r_max: int, in_features: int, out_features: int) -> bool:
    groups = sum(1 for *_, a in grouping.segments if a >= 0)
    stacked = grouping.num_rows * grouping.num_adapters * r_max * (in_features + out_features)
    return stacked < groups * _GROUP_MACS


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


def _add_base(out: torch.Tensor, lhs: torch.Tensor, weight, grad: bool = False) -> None:
    """In place: out (M, N) += lhs (M, K)·Wᵀ (forward), or with ``grad`` out (M, K) += lhs (M, N)·W (dX), for
    a dense W or a quantised one, dequantised a chunk of rows at a time with the GEMMs in ``_gemm_dtype``."""
    if isinstance(weight, torch.Tensor):
        out.addmm_(lhs, weight if grad else weight.t())
        return
    gemm_dtype = _gemm_dtype(out.device, out.dtype)
    acc = out if gemm_dtype == out.dtype else out.to(gemm_dtype)
    lhs = lhs.to(gemm_dtype)
    for start, w in _row_chunks(weight, out.dtype, gemm_dtype):
        stop = start + w.shape[0]
        if grad:  # + G[:, rows]·W[rows]
            acc.addmm_(lhs[:, start:stop], w)
        else:  # + x·W[rows]ᵀ into columns [rows]
            acc[:, start:stop].addmm_(lhs, w.t())
    if acc is not out:
        out.copy_(acc)


@functools.lru_cache(maxsize=64)
def _lane_table(scalings: tuple, ranks: tuple, r_max: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n + 1, r_max): row a holds s_a on lanes below rank_a, 0 past it; row n (base-only rows) is 0. Built
    once per set of values: the layers of a model and the batches of a run ask with the same ones."""
    lanes = [[s if j < r else 0.0 for j in range(r_max)] for s, r in zip(scalings, ranks)]
    return torch.tensor([*lanes, [0.0] * r_max], dtype=dtype, device=device)


def _rank_term_into(out: torch.Tensor, bias: torch.Tensor | None, shrink: torch.Tensor, lora_b: torch.Tensor,
                    scaling: float) -> None:
    """out (M, N) = b + s·S·Bᵀ (S (M, r), B (N, r)): the rank-r seed a base GEMM then accumulates onto, the
    scaling on the GEMM's alpha. Without a bias, beta = 0: out's uninitialised values are ignored."""
    if bias is None:
        out.addmm_(shrink, lora_b.t(), beta=0, alpha=scaling)
    else:
        torch.addmm(bias, shrink, lora_b.t(), alpha=scaling, out=out)


def _base_into(out: torch.Tensor, x2: torch.Tensor, weight, bias: torch.Tensor | None) -> None:
    """out (M, N) = x2 (M, K)·Wᵀ + b for a dense or quantised W: one GEMM with the bias as its addend."""
    if isinstance(weight, torch.Tensor):
        if bias is None:
            torch.mm(x2, weight.t(), out=out)
        else:
            torch.addmm(bias, x2, weight.t(), out=out)
        return
    if bias is None:
        out.zero_()
    else:
        out.copy_(bias.expand_as(out))
    _add_base(out, x2, weight)


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

        Three ops at p = 0: S = x·Aᵀ, base = x·Wᵀ + b, y = base + s·S·Bᵀ (one addmm); the smallest calls
        go through ΔW = s·B·A instead (see ``_DELTA_MAX``).
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
        rows, rank, size = x2.shape[0], lora_A.shape[0], out_features * in_features
        if dropout_p == 0.0 and dtype in _MERGE_DTYPES and size * (rows + 3 * rank) <= _DELTA_MAX:
            y = F.linear(x2, torch.addmm(weight, b, a, alpha=scaling), bias)  # x·(W + s·B·A)ᵀ + b
        else:
            if dropout_p == 0.0:
                x_hat = x2
            elif generator is None:
                x_hat = torch.dropout(x2, dropout_p, True)  # F.dropout without its Python wrapper
            else:
                # 0/1 mask; 1/(1 - p) rides on the last GEMM's alpha, where it costs no pass of its own.
                seed = draw_seed(x.device, generator)
                x_hat = x2 * self._keep(seed, x2.shape, dropout_p, x.device, dtype)
                scaling = scaling / (1.0 - dropout_p)
            if size * 3 * (rows + rank) <= _DELTA_MAX:
                y = torch.addmm(F.linear(x2, weight, bias), x_hat, torch.mm(b, a).t(), alpha=scaling)
            else:
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
        _rank_term_into(y2, bias, shrink, b, scaling)
        _add_base(y2, x2, weight)
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
            grad_x = torch.mm(d_shrink, a)  # (M, K)
            if keep is not None:
                grad_x.mul_(keep)
            _add_base(grad_x, g, weight, grad=True)
            grad_x = grad_x if flat else grad_x.view(x.shape)

        grad_a = None
        if need_a:
            x_hat = x2 if keep is None else keep.mul_(x2)  # the mask's last use: overwrite it with x ⊙ m
            grad_a = torch.mm(d_shrink.t(), x_hat)
            grad_a = grad_a if grad_a.dtype == lora_A.dtype else grad_a.to(lora_A.dtype)

        grad_w = torch.mm(g.t(), x2) if need_w else None
        grad_bias = g.sum(0) if need_bias else None
        return grad_x, grad_a, grad_b, grad_w, grad_bias

    # --- DoRA with dropout (fastlora.dora) ----------------------------------------------------------------

    def dora_dropout_forward(self, x2, weight, bias, lora_A, lora_B, c, scaling, dropout_p, seed):
        """DoRA's training forward with dropout, as stock ops: y = x·Wᵀ + b + (c − 1)·D + s·S·Bᵀ, which is
        PEFT's x·Wᵀ + b + (c − 1)·(x̂·Wᵀ) + c·s·S·Bᵀ with D = x̂·Wᵀ + s·S·Bᵀ, S = x̂·Aᵀ.

        Two GEMMs over W (x's and x̂'s), each accumulated onto its rank-r seed: no stacked copy of the rows
        (on the CPU the stacking's passes cost more than reading W twice saves; ``fastlora.dora`` stacks for
        the fused kernels instead).

        Shapes: x2 (M, K), weight (N, K), bias (N,) or None, lora_A (r, K), lora_B (N, r), c (N,) in x's dtype.
        Returns y (M, N), D (M, N), S (M, r) and the boolean keep-mask (M, K) (the same mask ``keep_mask``
        draws from ``seed``).
        """
        dtype = x2.dtype
        m, out_features = x2.shape[0], weight.shape[0]
        a = lora_A if lora_A.dtype == dtype else lora_A.to(dtype)
        b = lora_B if lora_B.dtype == dtype else lora_B.to(dtype)
        keep = self._keep(seed, tuple(x2.shape), dropout_p, x2.device, dtype)  # 0/1 in x's dtype
        mask = keep.to(torch.bool)  # what backward keeps: a byte an element
        x_hat = keep.mul_(x2).mul_(1.0 / (1.0 - dropout_p))  # the mask's float copy ends as x̂
        shrink = torch.mm(x_hat, a.t())
        d = torch.empty((m, out_features), dtype=dtype, device=x2.device)
        _rank_term_into(d, None, shrink, b, scaling)
        _add_base(d, x_hat, weight)  # D = x̂·Wᵀ + s·S·Bᵀ
        y = torch.empty((m, out_features), dtype=dtype, device=x2.device)
        _rank_term_into(y, bias, shrink, b, scaling)
        _add_base(y, x2, weight)
        y.addcmul_(d, c - 1)
        return y, d, shrink, mask

    def dora_dropout_backward(self, g, x2, weight, lora_A, lora_B, shrink, c, scaling, dropout_p, mask, needs):
        """Gradients (dx, dA, dB, dW) of ``dora_dropout_forward`` (c, the norm's scale, a constant); None where
        ``needs`` = (x, A, B, W) says not wanted.

            dS = s·(g ⊙ c)·B = s·g·(c ⊙ B)       dB = c ⊙ (s·gᵀ·S)        dA = dSᵀ·x̂
            dx = g·W + m/(1 − p) ⊙ (g·((c − 1) ⊙ W) + dS·A)
            dW = gᵀ·x + (c − 1) ⊙ (gᵀ·x̂)

        c is folded into W's and B's rows (N × K and N × r) rather than into g (M × N).
        """
        need_x, need_a, need_b, need_w = needs
        dtype = x2.dtype
        a = lora_A if lora_A.dtype == dtype else lora_A.to(dtype)
        b = lora_B if lora_B.dtype == dtype else lora_B.to(dtype)
        inv_keep = 1.0 / (1.0 - dropout_p)
        col = c[:, None]
        d_shrink = torch.mm(g, b * col).mul_(scaling)
        grad_b = None
        if need_b:
            grad_b = torch.mm(g.t(), shrink).mul_(col * scaling)
            grad_b = grad_b if grad_b.dtype == lora_B.dtype else grad_b.to(lora_B.dtype)
        keep = mask.to(dtype)  # one conversion, two uses
        grad_x = None
        if need_x:
            grad_x = torch.mm(d_shrink, a)
            _add_base(grad_x, g, weight * (col - 1), grad=True)
            grad_x.mul_(keep).mul_(inv_keep)
            _add_base(grad_x, g, weight, grad=True)
        grad_a = grad_w = None
        if need_a or need_w:
            x_hat = keep.mul_(x2).mul_(inv_keep)  # the mask's last use
            if need_a:
                grad_a = torch.mm(d_shrink.t(), x_hat)
                grad_a = grad_a if grad_a.dtype == lora_A.dtype else grad_a.to(lora_A.dtype)
            if need_w:
                grad_w = torch.mm(g.t(), x_hat).mul_(col - 1).addmm_(g.t(), x2)
        return grad_x, grad_a, grad_b, grad_w

    # --- mixed-adapter batches (fastlora.lora_linear_multi) ----------------------------------------------

    def _row_keep(self, seed, grouping, dropout_ps, in_features, device, dtype):
        """The keep-mask (M, K) as 0/1 in ``dtype``, rows in x's order, each row drawn with its adapter's p
        (base-only rows and p = 0 keep everything); None when nothing drops. A pure function of (seed, the
        rows' adapters, the p's), so forward and backward, on either path, draw the same mask."""
        if seed is None or not any(dropout_ps[a] > 0.0 for a in grouping.used):
            return None
        gen = self._generator(device)
        gen.manual_seed(int(seed.item()))
        thresholds = [round(p * (1 << _MASK_BITS)) for p in dropout_ps]
        row_threshold = torch.tensor([*thresholds, 0], dtype=torch.int32, device=device)[grouping.index]  # −1 → 0
        bits = torch.empty((grouping.num_rows, in_features), dtype=torch.int32, device=device).random_(generator=gen)
        return torch.ge(bits, row_threshold[:, None]).to(dtype)

    def multi_keep_mask(self, seed, grouping, dropout_ps, in_features, device) -> torch.Tensor:
        """The boolean keep-mask (M, K) ``forward_multi`` used, rows in x's order (base-only rows all kept)."""
        keep = self._row_keep(seed, grouping, dropout_ps, in_features, device, torch.bool)
        return torch.ones((grouping.num_rows, in_features), dtype=torch.bool, device=device) if keep is None else keep

    def forward_multi(self, x, weight, bias, lora_A, lora_B, scalings, dropout_ps, ranks, grouping, seed,
                      want_shrink=True):  # fmt: skip
        """y = x·Wᵀ + b + s_a·(x̂·A_aᵀ)·B_aᵀ with a = each row's adapter (none for base-only rows).

        Shapes: x (..., K), weight (N, K) or an NF4Weight, bias (N,), lora_A (n, r_max, K), lora_B
        (n, N, r_max); scalings, dropout_ps, ranks: n host numbers. Only lanes [:ranks[a]] of adapter a are
        read. Returns y (..., N) and S (M, r_max) in x's dtype, rows in the grouping's working order, lanes
        past an adapter's rank zero (None unless ``want_shrink``: inference keeps no S).

        The base GEMM runs once over all rows; the LoRA terms run per segment (a run of rows of one adapter,
        in place, or one adapter's rows gathered once), seeding y before the GEMM accumulates onto it.
        """
        in_features, out_features, r_max = x.shape[-1], lora_B.shape[1], lora_A.shape[1]
        x2 = x.reshape(-1, in_features)
        dtype = x.dtype
        a_all, b_all = lora_A.to(dtype), lora_B.to(dtype)  # n·r·(K + N) elements: small next to x
        if grouping.sample_index is not None:
            return self._forward_per_sample(x, x2, weight, bias, a_all, b_all, scalings, dropout_ps, ranks, grouping,
                                            seed)  # fmt: skip
        if not want_shrink and seed is None and _stacked_is_cheaper(grouping, r_max, in_features, out_features):
            return self._forward_stacked(x, x2, weight, bias, a_all, b_all, scalings, ranks, grouping), None
        order = grouping.order
        xs = x2 if order is None else x2.index_select(0, order)
        y = torch.empty((*x.shape[:-1], out_features), dtype=dtype, device=x.device)
        y2 = y.view(-1, out_features)
        ys = y2 if order is None else torch.empty_like(y2)
        shrink = torch.zeros((x2.shape[0], r_max), dtype=dtype, device=x.device) if want_shrink else None
        keep = self._row_keep(seed, grouping, dropout_ps, in_features, x.device, dtype)
        if keep is not None and order is not None:
            keep = keep.index_select(0, order)
        for lo, hi, a in grouping.segments:
            if a < 0:  # base-only rows start from the bias alone
                ys[lo:hi] = 0.0 if bias is None else bias
                continue
            r, rows = ranks[a], xs[lo:hi]
            seg_keep = None if keep is None or dropout_ps[a] == 0.0 else keep[lo:hi]
            if seg_keep is not None:
                rows = seg_keep.mul_(rows)  # the mask's last use here: overwrite it with x ⊙ m
            s_a = torch.mm(rows, a_all[a, :r].t())
            if seg_keep is not None:
                s_a.mul_(1.0 / (1.0 - dropout_ps[a]))
            if want_shrink:
                shrink[lo:hi, :r] = s_a
            _rank_term_into(ys[lo:hi], bias, s_a, b_all[a, :, :r], scalings[a])
        if order is not None:
            y2.index_copy_(0, order, ys)
        _add_base(y2, x2, weight)
        return y, shrink

    def backward_multi(self, grad_y, x, weight, lora_A, lora_B, shrink, scalings, dropout_ps, ranks, grouping,
                       seed, needs):  # fmt: skip
        """Gradients (dx, dA, dB, dW, db) of ``forward_multi``; None where ``needs`` says not wanted. dA and dB
        are (n, r_max, K) and (n, N, r_max) in the adapters' dtype: zero for adapters without rows and for
        lanes past an adapter's rank."""
        need_x, need_a, need_b, need_w, need_bias = needs
        in_features, out_features = x.shape[-1], lora_B.shape[1]
        x2, g = x.reshape(-1, in_features), grad_y.reshape(-1, out_features)
        dtype = x.dtype
        a_all, b_all = lora_A.to(dtype), lora_B.to(dtype)
        backward = self._backward_per_sample if grouping.sample_index is not None else self._backward_segments
        grad_x, grad_a, grad_b = backward(g, x2, weight, a_all, b_all, shrink, scalings, dropout_ps, ranks, grouping,
                                          seed, needs)  # fmt: skip
        return (grad_x if grad_x is None else grad_x.view(x.shape),
                grad_a if grad_a is None else grad_a.to(lora_A.dtype),
                grad_b if grad_b is None else grad_b.to(lora_B.dtype),
                torch.mm(g.t(), x2) if need_w else None, g.sum(0) if need_bias else None)  # fmt: skip

    def _backward_segments(self, g, x2, weight, a_all, b_all, shrink, scalings, dropout_ps, ranks, grouping, seed,
                           needs):  # fmt: skip
        """(dx (M, K), dA (n, r_max, K), dB (n, N, r_max)) in x's dtype for ``forward_multi``'s segments: each
        segment's dS, dB and dA with small GEMMs, dX's rank-r rows scattered back before G·W accumulates."""
        need_x, need_a, need_b = needs[:3]
        in_features = x2.shape[1]
        order = grouping.order
        gs = g if order is None else g.index_select(0, order)
        xs = None
        if need_a:
            xs = x2 if order is None else x2.index_select(0, order)
        # Accumulated in x's dtype (an adapter may have several runs), cast once by the caller.
        grad_a = torch.zeros_like(a_all) if need_a else None
        grad_b = torch.zeros_like(b_all) if need_b else None
        dxs = torch.empty_like(x2) if need_x else None  # every row written below: segments' terms, base-only 0
        keep = self._row_keep(seed, grouping, dropout_ps, in_features, x2.device, x2.dtype)
        if keep is not None and order is not None:
            keep = keep.index_select(0, order)
        for lo, hi, a in grouping.segments:
            if a < 0:
                if need_x:
                    dxs[lo:hi].zero_()  # base-only rows get G·W alone
                continue
            r, g_a = ranks[a], gs[lo:hi]
            seg_keep = None if keep is None or dropout_ps[a] == 0.0 else keep[lo:hi]
            factor = scalings[a] / (1.0 - dropout_ps[a]) if seg_keep is not None else scalings[a]
            d_s = torch.mm(g_a, b_all[a, :, :r]).mul_(factor)  # dS = s·G·B (rows, r), 1/(1-p) folded in
            if need_b:
                grad_b[a, :, :r].addmm_(g_a.t(), shrink[lo:hi, :r], alpha=scalings[a])
            if need_x:
                dx_a = torch.mm(d_s, a_all[a, :r], out=dxs[lo:hi])
                if seg_keep is not None:
                    dx_a.mul_(seg_keep)
            if need_a:
                rows = xs[lo:hi] if seg_keep is None else seg_keep.mul_(xs[lo:hi])
                grad_a[a, :r].addmm_(d_s.t(), rows)
        grad_x = None
        if need_x:
            grad_x = dxs if order is None else torch.empty_like(x2).index_copy_(0, order, dxs)
            _add_base(grad_x, g, weight, grad=True)
        return grad_x, grad_a, grad_b

    @staticmethod
    def _per_sample(grouping, a_all, b_all, scalings, dropout_ps, ranks):
        """Each sample's adapter: A_s (B, r_max, K), B_sᵀ (B, r_max, N), its lanes within rank (B, 1, r_max) as
        0/1, (B, 1, 1) its s (0 for base-only samples) and 1/(1 − p), and its slot (B,) in the stack (adapter 0
        for base-only samples). B_sᵀ is gathered from Bᵀ's layout,
        which ``stack_adapters`` stores contiguously. The small tables are built once per batch (for each
        set of ranks, scalings and probabilities) and shared by the layers."""
        dtype = a_all.dtype

        def tables():
            device, r_max, sample = a_all.device, a_all.shape[1], grouping.sample_index
            slot = sample.clamp_min(0)  # base-only samples take adapter 0's weights, times a coefficient of 0
            table = torch.tensor([[*scalings, 0.0], [*(1.0 / (1.0 - p) for p in dropout_ps), 1.0]], dtype=dtype,
                                 device=device)[:, sample]  # index −1 reads the trailing column  # fmt: skip
            lanes = torch.arange(r_max, device=device)[None, :] < torch.tensor([*ranks, 0], device=device)[sample][:, None]
            return slot, lanes.to(dtype)[:, None, :], table[0][:, None, None], table[1][:, None, None]

        slot, lanes, coef, inv_keep = grouping.cached(("torch per sample", scalings, dropout_ps, ranks, a_all.shape[1],
                                                       dtype), tables)  # fmt: skip
        return (a_all.index_select(0, slot), b_all.transpose(1, 2).index_select(0, slot), lanes, coef, inv_keep,
                slot)  # fmt: skip

    def _forward_per_sample(self, x, x2, weight, bias, a_all, b_all, scalings, dropout_ps, ranks, grouping, seed):
        """forward_multi for one adapter per sample of (B, T, K) x: the LoRA terms as batched GEMMs over the
        samples (S = x̂_b·A_bᵀ, then b + s_b·S·B_bᵀ seeding y), then the base GEMM over all rows."""
        samples, in_features, out_features, r_max = grouping.sample_index.shape[0], x2.shape[1], b_all.shape[1], a_all.shape[1]
        keep = self._row_keep(seed, grouping, dropout_ps, in_features, x.device, x.dtype)
        used = grouping.used
        if keep is None and len({scalings[a] for a in used}) == 1 and all(ranks[a] == r_max for a in used) and all(
            a >= 0 for *_, a in grouping.segments
        ):
            # Every sample has an adapter, all of full rank and one scaling, no dropout (serving, usually): the
            # gathered adapters as they are, s on the last GEMM's alpha; no per-sample tables to build.
            sample = grouping.sample_index
            a_s, b_t = a_all.index_select(0, sample), b_all.transpose(1, 2).index_select(0, sample)
            s3 = torch.bmm(x2.view(samples, -1, in_features), a_s.transpose(1, 2))
            y = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)
            _base_into(y.view(-1, out_features), x2, weight, bias)
            y.view(samples, -1, out_features).baddbmm_(s3, b_t, alpha=scalings[used[0]])
            return y, s3.view(-1, r_max)
        a_s, b_t, lanes, coef, inv_keep, _ = self._per_sample(grouping, a_all, b_all, scalings, dropout_ps, ranks)
        x_hat = x2 if keep is None else keep.mul_(x2)
        s3 = torch.bmm(x_hat.reshape(samples, -1, in_features), a_s.transpose(1, 2)).mul_(lanes).mul_(inv_keep)
        y = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)
        # The base GEMM first, then the rank-r terms onto it: seeding y with a broadcast bias through
        # baddbmm and the GEMM onto that cost 0.5 ms more at 512 × 1024 × 1024 on the CPU (y cold twice).
        _base_into(y.view(-1, out_features), x2, weight, bias)
        y.view(samples, -1, out_features).baddbmm_(s3 * coef, b_t)
        return y, s3.view(-1, r_max)

    def _backward_per_sample(self, g, x2, weight, a_all, b_all, shrink, scalings, dropout_ps, ranks, grouping, seed,
                             needs):  # fmt: skip
        """(dx (M, K), dA (n, r_max, K), dB (n, N, r_max)) in x's dtype for ``_forward_per_sample``: batched over
        the samples, each sample's dA and dB added to its adapter's."""
        need_x, need_a, need_b = needs[:3]
        samples, in_features, out_features = grouping.sample_index.shape[0], x2.shape[1], g.shape[1]
        a_s, b_t, lanes, coef, inv_keep, slot = self._per_sample(grouping, a_all, b_all, scalings, dropout_ps, ranks)
        g3 = g.reshape(samples, -1, out_features)
        d_s3 = torch.bmm(g3, b_t.transpose(1, 2)).mul_(lanes).mul_(coef * inv_keep)  # dS = s·G·B, 1/(1 − p) folded in
        keep = self._row_keep(seed, grouping, dropout_ps, in_features, x2.device, x2.dtype)
        grad_x = grad_a = grad_b = None
        if need_b:  # dB_b = s_b·Gᵀ·S per sample, summed per adapter (base-only samples add zeros)
            per_sample = torch.bmm(g3.transpose(1, 2), shrink.view(samples, -1, shrink.shape[1])).mul_(coef)
            grad_b = torch.zeros_like(b_all).index_add_(0, slot, per_sample)
        if need_x:
            grad_x = torch.bmm(d_s3, a_s).view(-1, in_features)
            if keep is not None:
                grad_x.mul_(keep)
            _add_base(grad_x, g, weight, grad=True)
        if need_a:
            x_hat = x2 if keep is None else keep.mul_(x2)
            per_sample = torch.bmm(d_s3.transpose(1, 2), x_hat.reshape(samples, -1, in_features))
            grad_a = torch.zeros_like(a_all).index_add_(0, slot, per_sample)
        return grad_x, grad_a, grad_b

    @staticmethod
    def _forward_stacked(x, x2, weight, bias, a_all, b_all, scalings, ranks, grouping):
        """Inference on many small groups (decode): every row against all n adapters in two GEMMs, S_all =
        x·[A_0; …; A_n−1]ᵀ (M, n·r_max), each row's own lanes kept and scaled, then y = b + S·[B_0ᵀ; …] and
        the base GEMM onto it. B reshapes for free when stored (n, r_max, N), as ``stack_adapters`` does."""
        n, r_max, in_features = a_all.shape
        out_features, m, device = b_all.shape[1], x2.shape[0], x2.device

        def select():  # (M, n, r_max): s_a on row i's own adapter's lanes within its rank, 0 elsewhere
            table = _lane_table(scalings, ranks, r_max, x2.dtype, device)
            index = grouping.index  # −1 picks slot n, dropped below
            kept = torch.zeros((m, n + 1, r_max), dtype=x2.dtype, device=device)
            kept[torch.arange(m, device=device), index] = table[index]
            return kept[:, :n]

        lanes_kept = grouping.cached(("torch stacked", scalings, ranks, r_max, x2.dtype), select)
        s_pad = torch.mm(x2, a_all.reshape(n * r_max, in_features).t()).view(m, n, r_max).mul_(lanes_kept)
        b_cat = b_all.transpose(1, 2).reshape(n * r_max, out_features)
        y = torch.empty((*x.shape[:-1], out_features), dtype=x2.dtype, device=device)
        y2 = y.view(-1, out_features)
        _base_into(y2, x2, weight, bias)  # base first, as in _forward_per_sample
        y2.addmm_(s_pad.view(m, n * r_max), b_cat)
        return y


BACKEND = TorchBackend()
