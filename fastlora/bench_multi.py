"""Mixed-adapter batches side by side (``fastlora bench --multi``): one linear layer with n LoRA adapters,
each sample of the batch with its own, on the CPU.

Scenarios (K = N = 1024, r = 16, fp32, adapters with random B):
- "serve 512 rows / 8 adapters": 8 sequences of 64 tokens, one adapter each, eval under no_grad;
- "decode 32 rows / 16 adapters": 32 one-token requests over 16 adapters, eval under no_grad;
- "train 512 rows / 8 adapters": the serve batch in training mode, forward+backward, every adapter trained.

Variants: the base layer alone ("base only", ``F.linear``); PEFT's ``adapter_names`` path (its loop over the
batch's adapters; PEFT refuses it in training mode); the same PEFT model after ``fastlora.accelerate``
called with PEFT's ``adapter_names=`` keyword (which PEFT passes down through forward hooks it registers on
every module per call) and inside ``fastlora.adapter_names`` (the only way in training); and, for training, the
accelerated model with one adapter for the whole batch ("single adapter, fused"); for serving, the op alone on
the layer's adapters with the batch's grouping computed once beforehand (what each layer of a model pays, the
grouping and the name checks being per batch, not per layer). Each variant runs ``rounds``
times interleaved with the others; the median counts.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastlora

__all__ = ["SCENARIOS", "multi_side_by_side", "to_markdown"]

# name: (samples, tokens per sample, adapters, training)
SCENARIOS = {
    "serve 512 rows / 8 adapters": (8, 64, 8, False),
    "decode 32 rows / 16 adapters": (32, 1, 16, False),
    "train 512 rows / 8 adapters": (8, 64, 8, True),
}


def _peft_layer(k: int, n: int, r: int, adapters: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    names = [f"task{i}" for i in range(adapters)]
    model = get_peft_model(nn.Sequential(nn.Linear(k, n)), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]),
                           adapter_name=names[0])  # fmt: skip
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    for lin in model.base_model.model[0].lora_B.values():
        nn.init.normal_(lin.weight, std=0.02)
    return model


def _op_args(layer: nn.Module, names: list[str], x: torch.Tensor) -> tuple:
    """``lora_linear_multi``'s arguments for the accelerated ``layer``'s adapters, grouped for ``names`` once:
    the op as every layer of a model after the first runs it (the grouping is computed once per batch)."""
    local = sorted(set(names))
    index = torch.tensor([local.index(n) for n in names])
    pairs = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for n in local]
    a, b, ranks = fastlora.mixed_batch.stack_adapters(layer, pairs)
    grouping = fastlora.group_rows(index, len(local), tuple(x.shape[:-1]))
    base = layer.base_layer
    return x, base.weight, base.bias, a, b, [layer.scaling[n] for n in local], grouping, 0.0, False


def _ms(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def _variants(samples: int, tokens: int, adapters: int, training: bool, k: int, n: int, r: int):
    peft = _peft_layer(k, n, r, adapters)
    ours = copy.deepcopy(peft)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastlora.accelerate(ours)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(samples, tokens, k, generator=g)
    if samples >= adapters:  # every adapter used, in shuffled order
        order = torch.randperm(samples, generator=g) % adapters
    else:
        order = torch.randperm(adapters, generator=g)[:samples]
    names = [f"task{i}" for i in order.tolist()]
    base = peft.base_model.model[0].base_layer
    if not training:
        peft.eval(), ours.eval()
        def scoped():
            with fastlora.adapter_names(ours, names):
                return ours(x)

        layer = ours.base_model.model[0]
        with torch.no_grad():
            op_args = _op_args(layer, names, x)
        return {
            "base only": lambda: F.linear(x, base.weight, base.bias),
            "PEFT adapter_names": lambda: peft(x, adapter_names=names),
            "PEFT accelerated, adapter_names=": lambda: ours(x, adapter_names=names),
            "PEFT accelerated, fastlora.adapter_names": scoped,
            "fastlora.lora_linear_multi, batch grouped once": lambda: fastlora.lora_linear_multi(*op_args),
        }, names
    ours.train()
    for name, p in ours.named_parameters():
        p.requires_grad_("lora_" in name)
    x.requires_grad_()
    grad = torch.randn(samples, tokens, n, generator=g)
    single = copy.deepcopy(ours)
    single.base_model.set_adapter(names[0])

    def mixed():
        with fastlora.adapter_names(ours, names):
            ours(x).backward(grad)

    return {
        "base only": lambda: F.linear(x, base.weight, base.bias).backward(grad),
        "single adapter, fused": lambda: single(x).backward(grad),
        "PEFT accelerated, fastlora.adapter_names": mixed,
    }, names


def multi_side_by_side(rounds: int = 15, k: int = 1024, n: int = 1024, r: int = 16) -> list[dict]:
    """Rows of {scenario, variant, ms, vs_base, vs_peft (serving) or vs_single (training)}."""
    rows = []
    for scenario, (samples, tokens, adapters, training) in SCENARIOS.items():
        fns, _ = _variants(samples, tokens, adapters, training, k, n, r)
        times: dict[str, list[float]] = {name: [] for name in fns}
        context = torch.enable_grad() if training else torch.no_grad()
        with context:
            for fn in fns.values():  # warm-up
                fn()
            for _ in range(rounds):
                for name, fn in fns.items():
                    times[name].append(_ms(fn))
        med = {name: statistics.median(t) for name, t in times.items()}
        other = "single adapter, fused" if training else "PEFT adapter_names"
        for name, ms in med.items():
            rows.append({"scenario": scenario, "variant": name, "ms": ms, "vs_base": ms / med["base only"],
                         "vs_other": ms / med[other], "other": other})  # fmt: skip
    return rows


def to_markdown(rows: list[dict], rounds: int, k: int = 1024, n: int = 1024, r: int = 16) -> str:
    lines = [f"Mixed-adapter batches on the CPU: one linear layer K = {k}, N = {n}, r = {r}, fp32, "
             f"{torch.get_num_threads()} threads; median of {rounds} interleaved rounds (serving: eval under "
             "no_grad; training: forward+backward, every adapter trained)", "",
             "| scenario | variant | ms | vs base only | vs PEFT adapter_names / single adapter |",
             "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['scenario']} | {row['variant']} | {row['ms']:.3f} | {row['vs_base']:.2f} | "
                     f"{row['vs_other']:.2f} |")  # fmt: skip
    lines += ["", "The last column divides by PEFT's adapter_names path in the serving scenarios and by the "
              "single-adapter fused layer (the whole batch on one adapter) in training."]  # fmt: skip
    return "\n".join(lines)
