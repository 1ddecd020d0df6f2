"""QLoRA side by side (``fastlora bench --qlora``): one layer with an NF4 base, forward and forward+backward.

Variants, built from one bf16 weight quantised once by bitsandbytes (the same 4-bit codes for all):
- "bf16 F.linear (bare)": the full-precision frozen layer, for scale (no LoRA, no quantisation);
- "PEFT over bnb Linear4bit": PEFT's LoRA layer over bitsandbytes' ``Linear4bit`` (what QLoRA users run);
- "PEFT accelerated": the same PEFT layer after ``fastlora.accelerate`` (fused, reading bitsandbytes' codes);
- "fastlora QLoRA layer": ``fastlora.quantize`` + ``LoRALinear`` on fastlora's own NF4 base, converted from
  the bitsandbytes weight (no requantisation).
Adapters are fp32 (PEFT's default on a bf16 model), r = 16, dropout 0, training mode. Each variant runs
``rounds`` times interleaved with the others; the median counts. Ratios are to PEFT in the same run.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

import fastlora

__all__ = ["qlora_side_by_side", "to_markdown"]


def _peft_over_bnb(weight: torch.Tensor, r: int, dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    n, k = weight.shape
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    base.weight.blocksize = 64
    base.load_state_dict({"weight": weight})
    model = nn.Sequential(base.to("cpu"))  # bitsandbytes quantises on the move to a device
    model.is_loaded_in_4bit = True  # as transformers marks it: PEFT wraps the layer in its lora.Linear4bit
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    layer = model.base_model.model[0]
    torch.manual_seed(1)
    for name in layer.lora_B:  # non-zero B: the LoRA path carries signal (PEFT initialises it to zeros)
        nn.init.normal_(layer.lora_B[name].weight, std=0.02)
    return model


def _variants(m: int, k: int, n: int, r: int, dtype: torch.dtype) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    weight = (torch.randn(n, k) / k**0.5).to(dtype)
    bare = nn.Linear(k, n, bias=False, dtype=dtype).requires_grad_(False)
    bare.weight.copy_(weight)
    out: dict[str, nn.Module] = {"bf16 F.linear (bare)": bare}
    peft = _peft_over_bnb(weight, r, dtype)
    out["PEFT over bnb Linear4bit"] = peft
    accelerated = copy.deepcopy(peft)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastlora.accelerate(accelerated)
    out["PEFT accelerated"] = accelerated
    out["fastlora QLoRA layer"] = _fastlora_layer(peft)
    return out


def _fastlora_layer(peft: nn.Module) -> nn.Module:
    """fastlora's own QLoRA layer over the same 4-bit codes and the same adapter values as ``peft``."""
    layer = peft.base_model.model[0]
    ours = fastlora.from_bnb(copy.deepcopy(nn.Sequential(layer.base_layer)))[0]
    ours = fastlora.LoRALinear.from_linear(ours, r=layer.r["default"], lora_alpha=layer.lora_alpha["default"])
    with torch.no_grad():
        ours.lora_A["default"].copy_(layer.lora_A["default"].weight)
        ours.lora_B["default"].copy_(layer.lora_B["default"].weight)
    return ours.train()


def _ms(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def qlora_side_by_side(m: int = 512, k: int = 2048, n: int = 2048, r: int = 16, dtype: torch.dtype = torch.bfloat16,
                       rounds: int = 5) -> list[dict]:  # fmt: skip
    """Rows of {variant, forward_ms, fwd_bwd_ms, vs_peft_fwd, vs_peft_fwd_bwd, check_rel_err}."""
    variants = _variants(m, k, n, r, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(m, n, generator=g).to(dtype)
    outputs = {}
    for name, module in variants.items():  # warm-up, and every output checked against PEFT's
        module.train()
        outputs[name] = module(x).detach().float()
    want = outputs["PEFT over bnb Linear4bit"]
    times: dict[str, dict[str, list[float]]] = {name: {"forward": [], "fwd_bwd": []} for name in variants}
    for _ in range(rounds):
        for name, module in variants.items():
            with torch.no_grad():
                times[name]["forward"].append(_ms(lambda: module(x)))
            times[name]["fwd_bwd"].append(_ms(lambda: module(x).backward(grad_out)))
            x.grad = None
    rows = []
    for name in variants:
        row = {"variant": name, "forward_ms": statistics.median(times[name]["forward"]),
               "fwd_bwd_ms": statistics.median(times[name]["fwd_bwd"])}  # fmt: skip
        if name != "bf16 F.linear (bare)":
            err = (outputs[name] - want).abs().max() / want.abs().max()
            row["check_rel_err"] = err.item()
        rows.append(row)
    peft = next(row for row in rows if row["variant"] == "PEFT over bnb Linear4bit")
    for row in rows:
        row["vs_peft_fwd"] = row["forward_ms"] / peft["forward_ms"]
        row["vs_peft_fwd_bwd"] = row["fwd_bwd_ms"] / peft["fwd_bwd_ms"]
    return rows


def to_markdown(rows: list[dict], m: int, k: int, n: int, r: int, dtype: torch.dtype, rounds: int) -> str:
    lines = [f"QLoRA layer on the CPU: M = {m}, K = {k}, N = {n}, r = {r}, {str(dtype).removeprefix('torch.')}, "
             f"NF4 with double quantisation (blocks of 64), fp32 adapters, {torch.get_num_threads()} threads; "
             f"median of {rounds} interleaved rounds (forward under no_grad; forward+backward of a random "
             "output gradient, x requiring grad)", "",
             "| variant | forward ms | vs PEFT | forward+backward ms | vs PEFT | output vs PEFT |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        check = f"{row['check_rel_err']:.1e}" if "check_rel_err" in row else "-"
        lines.append(f"| {row['variant']} | {row['forward_ms']:.1f} | {row['vs_peft_fwd']:.2f} | "
                     f"{row['fwd_bwd_ms']:.1f} | {row['vs_peft_fwd_bwd']:.2f} | {check} |")  # fmt: skip
    lines += ["", "The bare row is the full-precision layer without LoRA, for scale (it reads 4x the weight bytes "
              "and dequantises nothing)."]  # fmt: skip
    return "\n".join(lines)
