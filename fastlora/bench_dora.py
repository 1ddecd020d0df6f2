"""DoRA side by side (``fastlora bench --dora``): one linear layer on the CPU, forward+backward.

Shape: M = 2048 rows, K = N = 1024, r = 16, fp32, at dropout 0 and 0.1 (training mode). Variants:
- "bare frozen layer": ``F.linear`` forward and the input gradient (what a frozen base costs, the floor);
- "PEFT DoRA": PEFT's ``lora.Linear`` with ``use_dora=True``, gradients for x, A, B and m;
- "fastlora DoRA": the same PEFT layer after ``fastlora.accelerate`` (``fastlora.dora_linear`` on the torch
  backend), the same gradients.
B and m are random (non-zero B, m away from ‖W‖), so every term carries work. Each variant runs ``rounds``
times interleaved with the others; the median counts.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastlora

__all__ = ["dora_side_by_side", "to_markdown"]


def _ms(step) -> float:
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def _variants(m: int, k: int, n: int, r: int, dropout: float, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32):  # fmt: skip
    """The three variants as closures (forward+backward each), their trainable parameters, x, and the two
    models (PEFT's, and the accelerated copy); the layer and x in ``dtype`` on ``device`` (the GPU check runs
    them in bf16)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft = get_peft_model(nn.Sequential(nn.Linear(k, n)), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"],
                          lora_dropout=dropout, use_dora=True, init_lora_weights=False))  # fmt: skip
    peft = peft.to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.linspace(0.8, 1.2, p.numel()))
    ours = copy.deepcopy(peft)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastlora.accelerate(ours)
    peft.train(), ours.train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)
    base = peft.base_model.model[0].base_layer
    params = [p for model in (peft, ours) for p in model.parameters() if p.requires_grad]

    def step(model):
        def run():
            model(x).backward(grad)
        return run

    return {
        "bare frozen layer": lambda: F.linear(x, base.weight, base.bias).backward(grad),
        "PEFT DoRA": step(peft),
        "fastlora DoRA": step(ours),
    }, params, x, (peft, ours)


def dora_side_by_side(rounds: int = 15, m: int = 2048, k: int = 1024, n: int = 1024, r: int = 16,
                      dropouts: tuple[float, ...] = (0.0, 0.1)) -> list[dict]:  # fmt: skip
    """Rows of {dropout, variant, ms, vs_bare, vs_peft}."""
    rows = []
    with fastlora.use_backend("torch"):
        for p in dropouts:
            fns, params, x, _ = _variants(m, k, n, r, p)
            times: dict[str, list[float]] = {name: [] for name in fns}

            def reset():
                x.grad = None
                for q in params:
                    q.grad = None

            for fn in fns.values():  # warm-up
                fn(), reset()
            for _ in range(rounds):
                for name, fn in fns.items():
                    times[name].append(_ms(fn))
                    reset()
            med = {name: statistics.median(t) for name, t in times.items()}
            for name, ms in med.items():
                rows.append({"dropout": p, "variant": name, "ms": ms, "vs_bare": ms / med["bare frozen layer"],
                             "vs_peft": ms / med["PEFT DoRA"]})  # fmt: skip
    return rows


def to_markdown(rows: list[dict], rounds: int, m: int = 2048, k: int = 1024, n: int = 1024, r: int = 16) -> str:
    lines = [f"DoRA on the CPU: one linear layer M = {m}, K = {k}, N = {n}, r = {r}, fp32, forward+backward "
             f"(x, A, B and m gradients; the bare layer: x's), {torch.get_num_threads()} threads; median of {rounds} "
             "interleaved rounds", "",
             "| dropout | variant | ms | vs bare frozen layer | vs PEFT DoRA |", "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['dropout']:g} | {row['variant']} | {row['ms']:.2f} | {row['vs_bare']:.2f} | "
                     f"{row['vs_peft']:.2f} |")  # fmt: skip
    return "\n".join(lines)
