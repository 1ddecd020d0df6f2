"""fastlora's LoRA linear against PEFT's on the CPU: activation memory, time, and dispatch overhead.

Checks the foundation targets, all as ratios measured in this one process (M=2048, K=N=1024, r=16, fp32):

- activation bytes saved for backward: <= 0.55x PEFT's at dropout 0.1, <= 1.0x at dropout 0;
- forward+backward time: <= 1.0x PEFT's at dropout 0.1, <= 0.97x at dropout 0;
- eager dispatch overhead: the autograd.Function fast path against the torch.library custom op, on a
  tiny shape where the overhead is all there is.

Usage: python benchmarks/cpu_vs_peft.py [--out benchmarks/results/cpu_vs_peft] [--rounds 5]
Writes result.json and result.md to --out and prints the table. Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn

import fastlora
from fastlora.bench import environment, median_ms
from fastlora.ops import LoRALinearFunction
from fastlora.peft_compat import peft_lora_linear
from fastlora.profiling import saved_activation_bytes

M, K, N, R, ALPHA = 2048, 1024, 1024, 16, 16
CPU = torch.device("cpu")
TARGETS = {0.0: {"memory": 1.0, "time": 0.97}, 0.1: {"memory": 0.55, "time": 1.0}}


def _layers(p: float):
    torch.manual_seed(0)
    base = nn.Linear(K, N)
    theirs = peft_lora_linear(base, r=R, lora_alpha=ALPHA, lora_dropout=p)
    nn.init.normal_(theirs.lora_B["default"].weight, std=0.02)
    ours = fastlora.LoRALinear.from_linear(base, r=R, lora_alpha=ALPHA, lora_dropout=p)
    with torch.no_grad():
        ours.lora_A["default"].copy_(theirs.lora_A["default"].weight)
        ours.lora_B["default"].copy_(theirs.lora_B["default"].weight)
    return {"peft": theirs, "fastlora": ours}


def measure_layers(rounds: int) -> list[dict]:
    rows = []
    for p in TARGETS:
        layers = _layers(p)
        x = torch.randn(M, K, requires_grad=True)
        grad = torch.randn(M, N)
        params = [q for layer in layers.values() for q in layer.parameters()]
        saved = {}
        for name, layer in layers.items():
            _, saved[name] = saved_activation_bytes(lambda: layer(x), exclude=params)
        # Interleave the competitors round by round so drift (thermal, other load) hits both alike.
        times: dict[str, list[float]] = {name: [] for name in layers}
        for _ in range(rounds):
            for name, layer in layers.items():
                times[name].append(median_ms(lambda: layer(x).backward(grad), CPU, [x], min_run_time=0.5))
        med = {name: statistics.median(v) for name, v in times.items()}
        rows.append({
            "dropout": p,
            "saved_bytes": saved,
            "memory_ratio": saved["fastlora"] / saved["peft"],
            "fwd_bwd_ms": med,
            "time_ratio": med["fastlora"] / med["peft"],
            "targets": TARGETS[p],
        })  # fmt: skip
    return rows


def measure_dispatch() -> dict:
    """Per-call time of a tiny forward+backward through each entry point (pure overhead at this size)."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, requires_grad=True)
    w, b = torch.randn(8, 16), torch.randn(8)
    a, bb = torch.randn(2, 16, requires_grad=True), torch.randn(8, 2, requires_grad=True)
    calls = {
        "F.linear": lambda: torch.nn.functional.linear(x, w, b).sum().backward(),
        "autograd.Function (eager path)": lambda: LoRALinearFunction.apply(x, w, b, a, bb, (1.0, 0.0, None, "torch")).sum().backward(),
        "custom op (compile path)": lambda: torch.ops.fastlora.lora_linear(x, w, b, a, bb, 1.0, 0.0, None, "torch")[0].sum().backward(),
        "fastlora.lora_linear": lambda: fastlora.lora_linear(x, w, b, a, bb, 1.0).sum().backward(),
    }  # fmt: skip
    return {name: median_ms(fn, CPU, min_run_time=0.3) * 1e3 for name, fn in calls.items()}  # µs


def to_markdown(result: dict) -> str:
    lines = [
        f"CPU: {result['device']}, {result['threads']} threads; torch {result['torch']}; fastlora "
        f"{result['fastlora']} @ {result['git']}; M={M}, K={K}, N={N}, r={R}, fp32.",
        "",
        "| dropout | saved MiB peft | saved MiB fastlora | memory ratio (target) | fwd+bwd ms peft | "
        "fwd+bwd ms fastlora | time ratio (target) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["layers"]:
        s, t = row["saved_bytes"], row["fwd_bwd_ms"]
        lines.append(
            f"| {row['dropout']} | {s['peft'] / 2**20:.2f} | {s['fastlora'] / 2**20:.2f} | "
            f"{row['memory_ratio']:.3f} (<= {row['targets']['memory']}) | {t['peft']:.2f} | {t['fastlora']:.2f} | "
            f"{row['time_ratio']:.3f} (<= {row['targets']['time']}) |"
        )
    lines += ["", "| entry point (4x16 -> 8, r=2, fwd+bwd) | µs per call |", "|---|---|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in result["dispatch_us"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_vs_peft")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per competitor")
    args = parser.parse_args(argv)

    with fastlora.use_backend("torch"):
        result = {
            "device": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "fastlora": fastlora.__version__,
            "python": platform.python_version(),
            "git": environment(CPU)["git"],
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "layers": measure_layers(args.rounds),
            "dispatch_us": measure_dispatch(),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    table = to_markdown(result)
    (args.out / "result.md").write_text(table + "\n")
    print(table)
    missed = [
        f"dropout {row['dropout']}: {kind} ratio {row[kind + '_ratio']:.3f} > {row['targets'][kind]}"
        for row in result["layers"]
        for kind in ("memory", "time")
        if row[kind + "_ratio"] > row["targets"][kind]
    ]
    for line in missed:
        print("MISSED", line)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
