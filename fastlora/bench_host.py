"""Host time per call: what a LoRA layer costs the CPU thread that launches it, at a size where the
arithmetic is negligible (``fastlora bench --host``).

A 7B model has 224 LoRA-able linears; at 1 to 1,024 tokens a layer's GPU work takes tens of microseconds,
so host time above that leaves the GPU idle. Measured on a tiny layer (16 -> 8, r = 2, 4 rows) in one
thread: each variant runs ``calls`` calls in a row, the variants interleaved, ``repeats`` times; the best
repeat counts (the least disturbed by the rest of the machine). Forward, and forward + backward of
``y.sum()``, at dropout 0 and 0.1, in training mode (dropout on).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

import fastlora

__all__ = ["host_overhead", "to_markdown", "stubbed_triton_launches", "triton_launch_overhead"]

SHAPE = {"in_features": 16, "out_features": 8, "r": 2, "rows": 4}


def _variants(dropout: float) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    k, n, r = SHAPE["in_features"], SHAPE["out_features"], SHAPE["r"]
    torch.manual_seed(0)
    out: dict[str, Callable] = {"nn.Linear (bare)": nn.Linear(k, n).train()}
    peft = None
    try:
        from fastlora.peft_compat import peft_lora_linear

        peft = peft_lora_linear(nn.Linear(k, n), r=r, lora_alpha=2 * r, lora_dropout=dropout).train()
        out["PEFT"] = peft
    except ImportError:
        pass
    layer = fastlora.LoRALinear.from_linear(nn.Linear(k, n), r=r, lora_alpha=2 * r, lora_dropout=dropout).train()
    out["fastlora LoRALinear"] = layer
    w, b = layer.weight, layer.bias
    a, bb, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    out["fastlora.lora_linear"] = lambda x: fastlora.lora_linear(x, w, b, a, bb, s, dropout, True)
    if peft is not None:
        from fastlora.peft_compat import accelerate

        twin = nn.Sequential(peft_lora_linear(nn.Linear(k, n), r=r, lora_alpha=2 * r, lora_dropout=dropout)).train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            accelerate(twin)
        out["PEFT accelerated"] = twin[0]
    return out


_WARMUP_CALLS = 50


def _us_per_call(step: Callable[..., object], calls: int, *args) -> float:
    """Microseconds per call of ``calls`` calls of ``step(*args)`` in a row."""
    start = time.perf_counter()
    for _ in range(calls):
        step(*args)
    return (time.perf_counter() - start) / calls * 1e6


def host_overhead(calls: int = 1000, repeats: int = 31, dropouts=(0.0, 0.1), threads: int = 1) -> list[dict]:
    """Rows of {variant, dropout, mode, us_per_call} plus ``vs_peft`` (the ratio to PEFT in the same run)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for dropout in dropouts:
            variants = _variants(dropout)
            x = torch.randn(SHAPE["rows"], SHAPE["in_features"], requires_grad=True)
            modes = {"forward": lambda f: f(x), "forward+backward": lambda f: f(x).sum().backward()}
            for mode, step in modes.items():
                best = dict.fromkeys(variants, float("inf"))
                for f in variants.values():
                    _us_per_call(step, _WARMUP_CALLS, f)  # first calls allocate and import
                for _ in range(repeats):
                    for name, f in variants.items():
                        best[name] = min(best[name], _us_per_call(step, calls, f))
                for name, us in best.items():
                    rows.append({"variant": name, "dropout": dropout, "mode": mode, "us_per_call": us})
                peft = best.get("PEFT")
                for row in rows[-len(best):]:
                    if peft:
                        row["vs_peft"] = row["us_per_call"] / peft
    finally:
        torch.set_num_threads(previous)
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| variant | dropout | forward µs | vs PEFT | forward+backward µs | vs PEFT |", "|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["variant"], r["dropout"]) for r in rows))
    for variant, dropout in keys:
        cells = [variant, f"{dropout:g}"]
        for mode in ("forward", "forward+backward"):
            row = next(r for r in rows if r["variant"] == variant and r["dropout"] == dropout and r["mode"] == mode)
            cells += [f"{row['us_per_call']:.1f}", f"{row['vs_peft']:.2f}" if "vs_peft" in row else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def stubbed_triton_launches():
    """Run the Triton backend's host path on CPU tensors as if on a GPU, with every kernel launch replaced
    by nothing: launchers, tables and allocations run, kernels do not. For measuring the host time of the
    launch path (and checking it syncs nothing) on a machine without a GPU."""
    from unittest import mock

    from fastlora.backends import forget_resolved
    from fastlora.kernels import _launch

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(_launch, "interpreting", lambda: False))  # the GPU launch path
        stack.enter_context(mock.patch.object(_launch.Tunable, "_run", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(_launch, "capability", lambda device: 90))
        stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: 0))
        stack.enter_context(mock.patch.dict(os.environ, {_launch.AUTOTUNE_ENV: "heuristic"}))
        # The backend may be selected on CPU tensors (it checks for the interpreter there).
        stack.enter_context(mock.patch("fastlora.backends.triton_backend.interpreting", lambda: True))
        forget_resolved()
        try:
            yield
        finally:
            forget_resolved()


def triton_launch_overhead(calls: int = 1000, repeats: int = 31, dropout: float = 0.1) -> dict[str, float]:
    """Host µs per call of the Triton backend's forward and backward (kernel launches stubbed out), on the
    tiny layer of ``host_overhead``, dropout on."""
    from fastlora.backends import get_backend

    k, n, r, m = SHAPE["in_features"], SHAPE["out_features"], SHAPE["r"], SHAPE["rows"]
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    a, bb, g = torch.randn(r, k), torch.randn(n, r), torch.randn(m, n)
    seed = torch.tensor([7])
    needs = (True, True, True, False, False)
    out = {}
    with stubbed_triton_launches():
        backend = get_backend("triton")
        y, shrink = backend.forward(x, w, b, a, bb, 2.0, dropout, seed)
        steps = {"forward": lambda: backend.forward(x, w, b, a, bb, 2.0, dropout, seed),
                 "backward": lambda: backend.backward(g, x, w, a, bb, shrink, 2.0, dropout, seed, needs)}  # fmt: skip
        for name, step in steps.items():
            _us_per_call(step, _WARMUP_CALLS)
            out[name] = min(_us_per_call(step, calls) for _ in range(repeats))
    return out
