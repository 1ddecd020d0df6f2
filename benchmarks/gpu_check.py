"""The whole GPU check of the Triton backend in one run: numerics first (bf16 included), then timings.

1. Numerics: the "triton" backend's output and every gradient against float64, within twice PyTorch's own
   error in the same dtype (fp32, fp16, bf16, fp32 adapters on a bf16 base), on odd shapes, ranks 1 to 256,
   strided and 3-D inputs, dropout; gradients bitwise-reproducible. Memory is poisoned with NaN first, so a
   tile a kernel fails to write shows up.
2. Timings with ``fastlora.bench`` (Llama-2-7B q, gate and down layers, M = 4096 tokens, r = 16, bf16,
   dropout 0 and 0.05): forward, backward and forward+backward, each variant checked against the reference
   before it is timed, all measured in this one process, interleaved: bare F.linear (the floor: forward and
   input gradient of the frozen layer), PEFT's LoRA Linear (fp32 adapters, PEFT's default on a bf16 model),
   the reference eager and under torch.compile, fastlora's "torch" and "triton" backends. Median of
   triton.testing.do_bench; peak memory and saved activations per forward+backward; then the ratios against
   the targets.

Usage: python benchmarks/gpu_check.py OUT_DIR [--quick]
Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md and prints the table last. ``--quick`` runs small
shapes (for a CPU: numerics through whatever backends run there, timings with torch.utils.benchmark); it is
what the test suite runs to keep this script working.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import fastlora
from fastlora.backends import backend_status
from fastlora.bench import environment, grid, run
from fastlora.bench import to_markdown as bench_table
from fastlora.testing import check_case, make_case

TARGETS = {"fwd_bwd_vs_floor": 1.05, "fwd_bwd_vs_floor_mlp": 1.04, "fwd_vs_floor": 1.03,
           "speedup_vs_peft_p0": 1.25, "speedup_vs_peft_dropout": 1.35}  # fmt: skip

NUMERIC_CASES = [  # (lead, K, N, r, dropout_p, layout)
    ((37,), 29, 23, 5, 0.0, "contiguous"),
    ((17,), 130, 70, 20, 0.0, "contiguous"),
    ((3, 11), 33, 65, 8, 0.1, "contiguous"),
    ((5,), 96, 72, 64, 0.0, "contiguous"),
    ((4, 9), 37, 26, 6, 0.0, "strided"),
    ((4, 9), 37, 26, 6, 0.2, "transposed"),
    ((257,), 300, 200, 1, 0.0, "contiguous"),
    ((129,), 520, 260, 256, 0.1, "contiguous"),
    ((1,), 1024, 1024, 16, 0.0, "contiguous"),
    ((2, 333), 1024, 3000, 16, 0.05, "contiguous"),
]


def _environment(device: torch.device) -> dict:
    env = environment(device)
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()  # fmt: skip
        except OSError:
            env["driver"] = None
    return env


def _poison(device: torch.device) -> None:
    """Fill the caching allocator's free memory with NaN, so outputs allocated with torch.empty start as NaN."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        block = torch.full((min(free // 2, 8 << 30) // 4,), float("nan"), device=device)
        del block


def check_numerics(device: torch.device, backends: list[str], quick: bool) -> list[dict]:
    dtypes = [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]
    cases = NUMERIC_CASES[:4] if quick else NUMERIC_CASES
    rows = []
    for backend in backends:
        for lead, k, n, r, p, layout_kind in cases:
            for dtype, adapter in dtypes:
                if backend == "triton" and dtype == torch.bfloat16 and device.type == "cpu":
                    continue  # the interpreter computes bf16 wrongly; this is what the GPU run is for
                name = f"{backend} {'x'.join(map(str, lead))}x{k}->{n} r={r} p={p} {layout_kind} {dtype}"
                name += f" A/B {adapter}" if adapter else ""
                _poison(device)
                try:
                    with fastlora.use_backend(backend):
                        errors = check_case(make_case(lead, k, n, r, dropout_p=p), dtype, adapter, backend_name=backend,
                                            layout_kind=layout_kind, device=device)  # fmt: skip
                    worst = max(e / max(t, 1e-30) for e, t in errors.values())
                    rows.append({"case": name, "ok": True, "worst_error_over_pytorch": worst})
                except Exception as err:  # a failure is a result to report, not a reason to stop
                    rows.append({"case": name, "ok": False, "error": f"{type(err).__name__}: {err}"[:500]})
        rows.append(_determinism(device, backend))
    return rows


def _determinism(device: torch.device, backend: str) -> dict:
    case = make_case((3, 100), 256, 320, 16, dropout_p=0.1)
    grads = []
    with fastlora.use_backend(backend):
        for _ in range(2):
            t = case.tensors(torch.float16 if device.type == "cuda" else torch.float32, torch.float32, device)
            y = fastlora.lora_linear(**t, scaling=2.0, dropout_p=0.1, generator=torch.Generator().manual_seed(5))
            y.backward(torch.ones_like(y))
            grads.append([y.detach()] + [v.grad for v in t.values() if v is not None and v.requires_grad])
    same = all(torch.equal(a, b) for a, b in zip(*grads))
    return {"case": f"{backend} bitwise-reproducible gradients", "ok": same}


def _points(quick: bool, device: torch.device) -> list[dict]:
    if quick:  # tiny shapes: under the Triton interpreter every kernel runs in NumPy
        return [{"model": "quick", "layer": "q", "k": 96, "n": 80, "tokens": 64, "rank": 16,
                 "dtype": torch.float32, "dropout": p} for p in (0.0, 0.05)]  # fmt: skip
    return grid(False, device, models=["Llama-2-7B"], layers=["q", "gate", "down"], tokens=[4096], ranks=[16],
                dtypes=[torch.bfloat16], dropouts=[0.0, 0.05])  # fmt: skip


def _ratios(rows: list[dict]) -> list[dict]:
    """Per grid point: the fused backend's ratios to the floor and to PEFT, and the targets that apply."""
    out = []
    for r in rows:
        if r["variant"] != "fastlora triton" and not (r["variant"] == "fastlora torch" and not any(
                x["variant"] == "fastlora triton" for x in rows)):  # fmt: skip
            continue
        mlp = r["layer"] in ("gate", "up", "down")
        out.append({
            "layer": f"{r['layer']} {r['k']}->{r['n']}", "dropout": r["dropout"], "variant": r["variant"],
            "fwd_vs_floor": r.get("fwd_vs_floor"), "fwd_bwd_vs_floor": r.get("fwd_bwd_vs_floor"),
            "speedup_vs_peft": r.get("fwd_bwd_speedup_vs_peft"),
            "target_fwd_bwd_vs_floor": TARGETS["fwd_bwd_vs_floor_mlp" if mlp else "fwd_bwd_vs_floor"],
            "target_speedup_vs_peft": TARGETS["speedup_vs_peft_dropout" if r["dropout"] > 0 else "speedup_vs_peft_p0"],
        })  # fmt: skip
    return out


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# GPU check: {env['device']}", "",
             f"torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver')}, "
             f"fastlora {env['fastlora']} @ {env.get('git')}; {result['seconds']:.0f} s", ""]  # fmt: skip
    bad = [c for c in result["numerics"] if not c["ok"]]
    lines.append(f"Numerics: {len(result['numerics']) - len(bad)} of {len(result['numerics'])} checks passed.")
    lines += [f"- FAILED {c['case']}: {c.get('error', '')}" for c in bad]
    if result["timings"]:
        lines += ["", bench_table({"environment": env, "rows": result["timings"], "seconds": result["seconds"]})]

    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines += ["", "| layer | p | variant | fwd / floor | fwd+bwd / floor (target) | speed-up over PEFT, fwd+bwd (target) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for q in result["ratios"]:
        lines.append(f"| {q['layer']} | {q['dropout']} | {q['variant']} | {f(q['fwd_vs_floor'], '.3f')} (<= "
                     f"{TARGETS['fwd_vs_floor']}) | {f(q['fwd_bwd_vs_floor'], '.3f')} (<= {q['target_fwd_bwd_vs_floor']}) | "
                     f"{f(q['speedup_vs_peft'], '.2f')}x (>= {q['target_speedup_vs_peft']}x) |")  # fmt: skip
    lines += ["", "Targets: fwd+bwd <= 1.05x the floor (1.04x on the MLP shapes), fwd <= 1.03x, "
              ">= 1.25x faster than PEFT at p = 0 and 1.35x at p = 0.05."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--quick", action="store_true", help="small shapes, any device (for tests)")
    args = parser.parse_args(argv)
    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = [name for name, reason in backend_status(device).items() if reason is None]
    result = {"environment": _environment(device), "backends": backends}
    try:
        result["numerics"] = check_numerics(device, backends, args.quick)
        result["timings"] = run(_points(args.quick, device), device, backends, progress=False, rounds=1 if args.quick else 3)
        result["ratios"] = _ratios(result["timings"])
    except Exception:
        result["crash"] = traceback.format_exc()
        result.setdefault("numerics", [])
        result.setdefault("timings", [])
        result.setdefault("ratios", [])
    result["seconds"] = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = to_markdown(result)
    (args.out / "gpu_check.md").write_text(table + "\n")
    if "crash" in result:
        print(result["crash"], file=sys.stderr)
    print(table)
    return 1 if "crash" in result or not all(c["ok"] for c in result["numerics"]) else 0


if __name__ == "__main__":
    sys.exit(main())
