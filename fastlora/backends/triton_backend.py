"""The "triton" backend: the fused kernels of ``fastlora/kernels``.

Forward:  S = shrink(x, A)                 one pass over x, mask made in registers
          Y = x·Wᵀ + b + s·S·Bᵀ            one GEMM, the rank-r term in its accumulator
Backward: dS, dB = expand_bwd(G, B, S)      one pass over G
          dX = G·W + (dS·A) ⊙ m/(1 − p)     one GEMM, the masked rank-r term in its accumulator
          dA = dSᵀ·x̂                        one pass over x, mask regenerated
          dW = Gᵀ·x, db = Σ G               only for full fine-tuning, with PyTorch's GEMM

Mixed-adapter batches (``forward_multi``, kernels/lora_multi.py): the shrink per row with its own adapter,
the forward and dX GEMMs with each row's term in their accumulators (a row block loops over the adapters
it holds), dS per row, and dA, dB per adapter over the rows sorted by adapter on the device (no host sync,
no atomics). Two passes over G (dS, then dB) where the single-adapter op makes one.

Runs on CUDA GPUs of compute capability 8.0 or newer (bf16 tensor cores), and on the CPU only through the
Triton interpreter (TRITON_INTERPRET=1), which is how CI checks its numerics.
"""

from __future__ import annotations

import torch

from fastlora.kernels._launch import interpreting, unsupported_triton
from fastlora.kernels.dropout import dropout_mask
from fastlora.kernels.lora_expand import lora_expand_bwd
from fastlora.kernels.lora_linear import lora_linear_bwd, lora_linear_fwd
from fastlora.kernels.lora_multi import adapter_tables, lora_multi_ds, lora_multi_segment_sum, lora_multi_shrink, sorted_rows
from fastlora.kernels.lora_shrink import lora_shrink_bwd, lora_shrink_fwd

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonBackend:
    name = "triton"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        too_old = unsupported_triton()
        if too_old:
            return too_old
        if dtype is not None and dtype not in _DTYPES:
            return f"kernels take float16, bfloat16 and float32 inputs, not {dtype}"
        if device.type == "cpu":
            return None if interpreting() else "CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)"
        if device.type != "cuda":
            return f"no Triton kernels for {device.type} devices"
        if interpreting():
            return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only"
        if torch.version.hip is None and torch.cuda.get_device_capability(device) < (8, 0):
            return f"needs compute capability 8.0 or newer, {torch.cuda.get_device_name(device)} has " + ".".join(
                map(str, torch.cuda.get_device_capability(device))
            )
        return None

    def keep_mask(self, seed: torch.Tensor, shape: tuple[int, ...], dropout_p: float, device: torch.device) -> torch.Tensor:
        return dropout_mask(seed, shape, dropout_p, device)

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        """Shapes: x (..., K), weight (N, K), bias (N,), lora_A (r, K), lora_B (N, r).
        Returns y (..., N) and S (..., r), both in x's dtype."""
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)  # a view whenever x's layout allows one (strides go to the kernels)
        shrink = lora_shrink_fwd(x2, lora_A, dropout_p, seed)
        y = lora_linear_fwd(x2, weight, bias, shrink, lora_B, scaling)
        return y.view(*lead, weight.shape[0]), shrink.view(*lead, lora_A.shape[0])

    def backward(self, grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed, needs):
        """Gradients (dx, dA, dB, dW, db), None where ``needs`` says not wanted."""
        need_x, need_a, need_b, need_w, need_bias = needs
        k, n, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
        g = grad_y.reshape(-1, n)
        x2 = x.reshape(-1, k)
        d_shrink, grad_b = lora_expand_bwd(g, lora_B, shrink.reshape(-1, r), scaling)
        grad_x = lora_linear_bwd(g, weight, d_shrink, lora_A, dropout_p, seed).view(x.shape) if need_x else None
        grad_a = lora_shrink_bwd(x2, d_shrink, lora_A, dropout_p, seed) if need_a else None
        grad_w = torch.mm(g.t(), x2) if need_w else None
        grad_bias = g.sum(0) if need_bias else None
        return grad_x, grad_a, grad_b if need_b else None, grad_w, grad_bias


    def dora_forward(self, x2, weight, bias, lora_A, lora_B, c, scaling):
        """DoRA at dropout 0 (fastlora.dora): y = c ⊙ D + b with D = x·Wᵀ + s·S·Bᵀ, D stored by the same GEMM's
        epilogue (m's gradient needs it): no pass of its own over the output.

        Shapes: x2 (M, K), weight (N, K) dense, bias (N,) or None, lora_A (r, K), lora_B (N, r), c (N,) in x's
        dtype. Returns y (M, N), D (M, N), S (M, r)."""
        shrink = lora_shrink_fwd(x2, lora_A, 0.0, None)
        d = torch.empty((x2.shape[0], weight.shape[0]), dtype=x2.dtype, device=x2.device)
        y = lora_linear_fwd(x2, weight, bias, shrink, lora_B, scaling, dora=(c, d))
        return y, d, shrink

    def dora_backward(self, g, x2, weight, lora_A, lora_B, shrink, d, c, scaling, needs):
        """Gradients of ``dora_forward`` (c a constant): (dx, dA, dB, dW, Σ_rows g ⊙ D (N,) fp32). c reaches
        the kernels, not g: dS = s·g·(c ⊙ B) and Σ g ⊙ D come from the one pass over G, dX = (g ⊙ c)·W + dS·A
        scales each G tile in its main loop, and dB = c ⊙ (s·gᵀ·S). ``needs`` = (x, A, B, W)."""
        need_x, need_a, need_b, need_w = needs
        col = c[:, None]
        d_shrink, grad_b, g_d = lora_expand_bwd(g, lora_B * col.to(lora_B.dtype), shrink, scaling, dora_d=d)
        grad_b = grad_b.mul_(col.to(grad_b.dtype)) if need_b else None
        grad_x = lora_linear_bwd(g, weight, d_shrink, lora_A, 0.0, None, dora_c=c) if need_x else None
        grad_a = lora_shrink_bwd(x2, d_shrink, lora_A, 0.0, None) if need_a else None
        grad_w = torch.mm(torch.mul(g, c).t(), x2) if need_w else None
        return grad_x, grad_a, grad_b, grad_w, g_d

    # --- mixed-adapter batches ---------------------------------------------------------------------------

    @staticmethod
    def _multi_args(x, scalings, dropout_ps, ranks, grouping):
        """(index, tables): what the kernels take for a mixed batch."""
        return grouping.index, adapter_tables(tuple(scalings), tuple(dropout_ps), tuple(ranks), x.device)

    def multi_keep_mask(self, seed, grouping, dropout_ps, in_features, device) -> torch.Tensor:
        """The boolean keep-mask (M, K) ``forward_multi`` used, rows in x's order (base-only rows all kept):
        row m kept where the kernels' Philox draw passes its adapter's threshold."""
        m = grouping.num_rows
        mask = torch.ones((m, in_features), dtype=torch.bool, device=device)
        if seed is None:
            return mask
        for a in grouping.used:
            if dropout_ps[a] > 0.0:
                rows = grouping.index == a
                mask[rows] = dropout_mask(seed, (m, in_features), dropout_ps[a], device)[rows]
        return mask

    def forward_multi(self, x, weight, bias, lora_A, lora_B, scalings, dropout_ps, ranks, grouping, seed,
                      want_shrink=True):  # fmt: skip
        """As the torch backend's ``forward_multi``: S (M, R) in x's row order, each row's own adapter."""
        k, n_out = x.shape[-1], lora_B.shape[1]
        x2 = x.reshape(-1, k)
        multi = self._multi_args(x, scalings, dropout_ps, ranks, grouping)
        shrink = lora_multi_shrink(x2, lora_A, *multi, seed)
        y = lora_linear_fwd(x2, weight, bias, shrink, lora_B, 1.0, multi=multi)
        return y.view(*x.shape[:-1], n_out), shrink

    def backward_multi(self, grad_y, x, weight, lora_A, lora_B, shrink, scalings, dropout_ps, ranks, grouping,
                       seed, needs):  # fmt: skip
        need_x, need_a, need_b, need_w, need_bias = needs
        n, r_max, k = lora_A.shape
        n_out = lora_B.shape[1]
        g, x2 = grad_y.reshape(-1, n_out), x.reshape(-1, k)
        multi = index, tables = self._multi_args(x, scalings, dropout_ps, ranks, grouping)
        d_shrink = lora_multi_ds(g, lora_B, index, tables)  # s_a·G·B_a, fp32
        order, offsets = grouping.device_sorted(sorted_rows)
        grad_b = grad_a = None
        if need_b:  # dB_a = s_a·Σ Gᵀ·S over adapter a's rows
            out = torch.empty((n, n_out, r_max), dtype=torch.float32, device=x.device)
            grad_b = lora_multi_segment_sum(g, shrink, order, offsets, tables, tables.scale, out, False).to(lora_B.dtype)
        grad_x = lora_linear_bwd(g, weight, d_shrink, lora_A, 0.0, seed, multi=multi) if need_x else None
        if need_a:  # dA_a = Σ dSᵀ·x̂ over adapter a's rows, x̂ = x ⊙ m_a / (1 − p_a)
            out = torch.empty((n, r_max, k), dtype=torch.float32, device=x.device)
            grad_a = lora_multi_segment_sum(x2, d_shrink, order, offsets, tables, tables.inv_keep, out, True, seed,
                                            masked=True).to(lora_A.dtype)  # fmt: skip
        grad_x = grad_x if grad_x is None else grad_x.view(x.shape)
        grad_w = torch.mm(g.t(), x2) if need_w else None
        grad_bias = g.sum(0) if need_bias else None
        return grad_x, grad_a, grad_b, grad_w, grad_bias


BACKEND = TritonBackend()
