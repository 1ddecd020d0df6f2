"""The "triton" backend: the fused kernels of ``fastlora/kernels``.

Forward:  S = shrink(x, A)                 one pass over x, mask made in registers
          Y = x·Wᵀ + b + s·S·Bᵀ            one GEMM, the rank-r term in its accumulator
Backward: dS, dB = expand_bwd(G, B, S)      one pass over G
          dX = G·W + (dS·A) ⊙ m/(1 − p)     one GEMM, the masked rank-r term in its accumulator
          dA = dSᵀ·x̂                        one pass over x, mask regenerated
          dW = Gᵀ·x, db = Σ G               only for full fine-tuning, with PyTorch's GEMM

Mixed-adapter batches (``forward_multi``) run on the same kernels over the stacked adapters: the shrink for
every adapter's lanes (S_all = x̂·[A_0; …; A_n−1]ᵀ, one pass over x), each row's own lanes kept (S_pad), and
the fused GEMM with [s_0·B_0, …, s_n−1·B_n−1] as its B; backward likewise. Each row's other lanes cost
arithmetic (n·r_max lanes instead of r: 3 % of the GEMM's at n·r = 128, K = N = 4096) but no extra pass over
x, G or W, and no host sync. One dropout probability per call (the kernels' mask has one threshold).

Runs on CUDA GPUs of compute capability 8.0 or newer (bf16 tensor cores), and on the CPU only through the
Triton interpreter (TRITON_INTERPRET=1), which is how CI checks its numerics.
"""

from __future__ import annotations

import torch

from fastlora.kernels._launch import interpreting, unsupported_triton
from fastlora.kernels.dropout import dropout_mask
from fastlora.kernels.lora_expand import lora_expand_bwd
from fastlora.kernels.lora_linear import lora_linear_bwd, lora_linear_fwd
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


    # --- mixed-adapter batches ---------------------------------------------------------------------------

    def multi_unsupported_reason(self, dropout_ps, grouping) -> str | None:
        """None when ``forward_multi`` takes these adapters' dropout, else why not."""
        ps = sorted({dropout_ps[a] for a in grouping.used})
        if len(ps) > 1:
            return f"the kernels draw one dropout probability per call, these adapters have {ps}"
        return None

    @staticmethod
    def _common_p(dropout_ps, grouping) -> float:
        return next((dropout_ps[a] for a in grouping.used), 0.0)

    @staticmethod
    def _stacked(lora_A, lora_B, scalings, ranks, grouping, dtype):
        """(A_cat (n·r_max, K) a view, B_cat (N, n·r_max) = [s_a·B_a] a copy, own (M, n·r_max) 0/1 in ``dtype``:
        each row's own adapter lanes within its rank)."""
        n, r_max, k = lora_A.shape
        device = lora_A.device
        scale = torch.tensor(scalings, dtype=lora_B.dtype, device=device)
        b_cat = (lora_B * scale[:, None, None]).permute(1, 0, 2).reshape(lora_B.shape[1], n * r_max)
        lane_ok = torch.arange(r_max, device=device)[None, :] < torch.tensor(ranks, device=device)[:, None]
        own = (grouping.index[:, None, None] == torch.arange(n, device=device)[None, :, None]) & lane_ok[None]
        return lora_A.reshape(n * r_max, k), b_cat, own.view(-1, n * r_max).to(dtype)

    def multi_keep_mask(self, seed, grouping, dropout_ps, in_features, device) -> torch.Tensor:
        """The boolean keep-mask (M, K) ``forward_multi`` used, rows in x's order (base-only rows all kept)."""
        p = self._common_p(dropout_ps, grouping)
        m = grouping.num_rows
        if p == 0.0 or seed is None:
            return torch.ones((m, in_features), dtype=torch.bool, device=device)
        mask = dropout_mask(seed, (m, in_features), p, device)
        return mask | (grouping.index < 0)[:, None]

    def forward_multi(self, x, weight, bias, lora_A, lora_B, scalings, dropout_ps, ranks, grouping, seed,
                      want_shrink=True):  # fmt: skip
        """As the torch backend's ``forward_multi``; S comes back as (M, n·r_max), each row's own lanes."""
        k, n_out = x.shape[-1], lora_B.shape[1]
        x2 = x.reshape(-1, k)
        p = self._common_p(dropout_ps, grouping)
        a_cat, b_cat, own = self._stacked(lora_A, lora_B, scalings, ranks, grouping, x.dtype)
        s_pad = lora_shrink_fwd(x2, a_cat, p, seed).mul_(own)
        y = lora_linear_fwd(x2, weight, bias, s_pad, b_cat, 1.0)
        return y.view(*x.shape[:-1], n_out), s_pad

    def backward_multi(self, grad_y, x, weight, lora_A, lora_B, shrink, scalings, dropout_ps, ranks, grouping,
                       seed, needs):  # fmt: skip
        need_x, need_a, need_b, need_w, need_bias = needs
        n, r_max, k = lora_A.shape
        n_out = lora_B.shape[1]
        g, x2 = grad_y.reshape(-1, n_out), x.reshape(-1, k)
        p = self._common_p(dropout_ps, grouping)
        a_cat, b_cat, own = self._stacked(lora_A, lora_B, scalings, ranks, grouping, x.dtype)
        d_all, d_b_cat = lora_expand_bwd(g, b_cat, shrink, 1.0)
        d_shrink = d_all.mul_(own)  # the gradient of the rows' own lanes only
        grad_b = None
        if need_b:  # B_cat = s_a·B_a: dB_a = s_a·dB_cat's lanes of a
            scale = torch.tensor(scalings, dtype=torch.float32, device=x.device)
            grad_b = d_b_cat.view(n_out, n, r_max).permute(1, 0, 2).float().mul_(scale[:, None, None]).to(lora_B.dtype)
        grad_x = lora_linear_bwd(g, weight, d_shrink, a_cat, p, seed).view(x.shape) if need_x else None
        grad_a = lora_shrink_bwd(x2, d_shrink, a_cat, p, seed).view(n, r_max, k) if need_a else None
        grad_w = torch.mm(g.t(), x2) if need_w else None
        grad_bias = g.sum(0) if need_bias else None
        return grad_x, grad_a, grad_b, grad_w, grad_bias


BACKEND = TritonBackend()
