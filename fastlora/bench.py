"""``fastlora bench``: fastlora against the floor, PEFT and the reference, measured in one process.

For every grid point (model layer shape × tokens × rank × dtype × dropout) and every variant:

- "F.linear (floor)": the frozen layer alone (forward; backward = the input gradient);
- "PEFT": PEFT's LoRA ``Linear`` (adapters in fp32 on a half-precision base, as ``get_peft_model`` keeps
  them), when PEFT is installed;
- "reference" and "reference (compiled)": ``fastlora.reference``'s formula eager and under ``torch.compile``;
- "fastlora <backend>": each backend that can run on the device.

it checks the variant's output against the fp32 reference (dropout off), then times forward, backward and
forward+backward (median; ``triton.testing.do_bench`` on a GPU, ``torch.utils.benchmark`` on the CPU), with
variants interleaved within each grid point, and reports ratios to the floor and to PEFT, TFLOP/s and GB/s
(against the device's ceilings when known), peak memory (CUDA) and the activation bytes saved for backward.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastlora
from fastlora import reference
from fastlora.backends import backend_status
from fastlora.profiling import saved_activation_bytes

__all__ = ["MODELS", "layer_shapes", "Variant", "variants", "run", "grid", "environment", "median_ms", "main"]

# (hidden, intermediate, attention heads, key/value heads) from each model's config.json.
MODELS = {
    "Llama-2-7B": (4096, 11008, 32, 32),
    "Llama-3-8B": (4096, 14336, 32, 8),
    "Mistral-7B": (4096, 14336, 32, 8),
    "Qwen2.5-7B": (3584, 18944, 28, 4),
}
LAYERS = ("q", "k", "v", "o", "gate", "up", "down")
# Measured ceilings (H200 figures from shared/docs/lora-math.md); other devices report no ceiling.
CEILINGS = {"H200": {"tflops": 790.0, "gbps": 4300.0}}


def layer_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(in_features K, out_features N) of each LoRA target in one decoder layer of ``model``."""
    hidden, inter, heads, kv = MODELS[model]
    kv_dim = hidden // heads * kv
    return {"q": (hidden, hidden), "k": (hidden, kv_dim), "v": (hidden, kv_dim), "o": (hidden, hidden),
            "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}  # fmt: skip


@dataclass
class Variant:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    module: nn.Module | None  # put in train() for timing, eval() for the check


def variants(k: int, n: int, rank: int, dropout: float, dtype: torch.dtype, device: torch.device,
             backends: list[str], compile_reference: bool = True) -> tuple[list[Variant], fastlora.LoRALinear]:  # fmt: skip
    """The competitors on one shared frozen layer and one shared adapter (B random, not zero)."""
    torch.manual_seed(0)
    base = nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
    ours = fastlora.LoRALinear.from_linear(base, r=rank, lora_alpha=2 * rank, lora_dropout=dropout)
    nn.init.normal_(ours.lora_B["default"], std=0.02)
    a, b, s = ours.lora_A["default"], ours.lora_B["default"], ours.scaling["default"]
    out = [Variant("F.linear (floor)", lambda x: F.linear(x, base.weight, base.bias), None)]
    try:
        from fastlora.peft_compat import peft_lora_linear

        peft = peft_lora_linear(base, r=rank, lora_alpha=2 * rank, lora_dropout=dropout).to(device)
        peft.lora_A.to(a.dtype)
        peft.lora_B.to(b.dtype)
        with torch.no_grad():
            peft.lora_A["default"].weight.copy_(a)
            peft.lora_B["default"].weight.copy_(b)
        out.append(Variant("PEFT", peft, peft))
    except ImportError:
        pass

    holder = nn.Module()  # train()/eval() switch for the reference's dropout

    def ref(x):
        x_hat = F.dropout(x, dropout, holder.training) if dropout > 0 else x
        return F.linear(x, base.weight, base.bias) + s * ((x_hat @ a.to(x.dtype).t()) @ b.to(x.dtype).t())

    out.append(Variant("reference", ref, holder))
    if compile_reference:
        out.append(Variant("reference (compiled)", torch.compile(ref), holder))
    for backend in backends:
        def run_backend(x, backend=backend):
            with fastlora.use_backend(backend):
                return ours(x)

        out.append(Variant(f"fastlora {backend}", run_backend, ours))
    return out, ours


def progress_bar(items=None, **kwargs):
    """tqdm's progress bar when tqdm is installed, else a silent stand-in with the same methods."""
    try:
        from tqdm import tqdm
    except ImportError:
        class _Silent(list):
            def set_postfix_str(self, *a, **k): ...
            def set_postfix(self, *a, **k): ...
            def update(self, *a, **k): ...
            def close(self): ...

        return _Silent(items or [])
    return tqdm(items, **kwargs)


def median_ms(fn: Callable[[], object], device: torch.device, grad_to_none: list[torch.Tensor] = (),
              min_run_time: float = 0.2) -> float:  # fmt: skip
    """Median milliseconds of ``fn()``, clearing the gradients of ``grad_to_none`` before each call:
    ``triton.testing.do_bench`` on a GPU, ``torch.utils.benchmark`` (at least ``min_run_time`` s) on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median")
    import torch.utils.benchmark as tb

    def step():
        for t in grad_to_none:
            t.grad = None
        fn()

    timer = tb.Timer("f()", globals={"f": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _times(v: Variant, x: torch.Tensor, g: torch.Tensor, device: torch.device, params: list[torch.Tensor]) -> dict:
    """Median milliseconds of forward, backward (on a retained graph) and forward+backward."""
    grads = [x, *params]
    out = {"fwd_ms": median_ms(lambda: v.fn(x), device, grads)}
    y = v.fn(x)
    out["bwd_ms"] = median_ms(lambda: y.backward(g, retain_graph=True), device, grads)
    del y
    out["fwd_bwd_ms"] = median_ms(lambda: v.fn(x).backward(g), device, grads)
    return out


def _memory(v: Variant, x: torch.Tensor, g: torch.Tensor, device: torch.device, weights: list[torch.Tensor]) -> dict:
    """Activation bytes saved for backward (``weights`` not counted) and, on CUDA, peak memory of a step."""
    out: dict = {}
    _, out["saved_bytes"] = saved_activation_bytes(lambda: v.fn(x), exclude=weights)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        v.fn(x).backward(g)
        torch.cuda.synchronize(device)
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return out


def run(points: list[dict], device: torch.device, backends: list[str], progress: bool = True,
        rounds: int = 3) -> list[dict]:  # fmt: skip
    """Measure every variant at every grid point. A point is dict(model, layer, k, n, tokens, rank, dtype,
    dropout). Returns one row per (point, variant)."""
    rows = []
    bar = progress_bar(points, desc="fastlora bench", disable=not progress, unit="point")
    # Backward is timed alone by re-running it on a retained graph; compiled graphs may only do that without
    # donated buffers (an AOTAutograd memory optimisation that frees saved tensors during backward).
    import torch._functorch.config as functorch_config

    with functorch_config.patch(donated_buffer=False):
        for point in bar:
            bar.set_postfix_str(f"{point['model']} {point['layer']} M={point['tokens']} r={point['rank']} p={point['dropout']}")
            rows += _run_point(point, device, backends, rounds)
    return rows


def _run_point(point: dict, device: torch.device, backends: list[str], rounds: int) -> list[dict]:
    """Check, then time, every variant at one grid point: one row per variant."""
    k, n, m, rank, dtype = point["k"], point["n"], point["tokens"], point["rank"], point["dtype"]
    vs, ours = variants(k, n, rank, point["dropout"], dtype, device, backends)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(m, n, device=device, dtype=dtype)
    exact = reference.lora_linear(x.detach().float(), ours.weight.float(), ours.bias.float(),
                                  ours.lora_A["default"].float(), ours.lora_B["default"].float(),
                                  ours.scaling["default"])  # fmt: skip
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    params = [ours.lora_A["default"], ours.lora_B["default"]]
    point_rows, ready = [], []
    for v in vs:
        row = {**point, "dtype": str(dtype).removeprefix("torch."), "variant": v.name}
        point_rows.append(row)
        try:
            if v.module is not None:
                v.module.eval()
            with torch.no_grad():
                got = v.fn(x).float()
            scale = exact.abs().max().clamp_min(1e-30)
            row["check_rel_err"] = ((got - exact).abs().max() / scale).item() if v.name != "F.linear (floor)" else None
            if row["check_rel_err"] is not None and not row["check_rel_err"] <= tolerance:
                raise AssertionError(f"output off the reference by {row['check_rel_err']:.3g} (> {tolerance})")
            if v.module is not None:
                v.module.train()
            vparams = params if v.name != "PEFT" else [p for p in v.module.parameters() if p.requires_grad]
            weights = [p for p in (ours.weight, ours.bias, *vparams) if p is not None]
            row.update(_memory(v, x, g, device, weights))
            ready.append((v, row, vparams))
        except Exception as err:  # a variant that fails is a result, reported in its row
            row["error"] = f"{type(err).__name__}: {err}"[:300]
    # Rounds interleave the variants, so that drift (clocks, other load) hits them all alike; each
    # time reported is the median over the rounds.
    samples: dict[int, list[dict]] = {id(row): [] for _, row, _ in ready}
    for _ in range(rounds):
        for v, row, vparams in ready:
            try:
                samples[id(row)].append(_times(v, x, g, device, vparams))
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"[:300]
    for _, row, _ in ready:
        if samples[id(row)] and "error" not in row:
            for key in samples[id(row)][0]:
                row[key] = statistics.median(t[key] for t in samples[id(row)])
    _add_ratios(point_rows, point, device)
    return point_rows


def _add_ratios(rows: list[dict], point: dict, device: torch.device) -> None:
    by = {r["variant"]: r for r in rows}
    floor, peft = by.get("F.linear (floor)", {}), by.get("PEFT", {})
    m, k, n, r = point["tokens"], point["k"], point["n"], point["rank"]
    item = torch.empty((), dtype=point["dtype"]).element_size()
    flops = {"fwd": 2 * m * k * n + 2 * m * r * (k + n), "bwd": 2 * m * k * n + 4 * m * r * (k + n)}
    flops["fwd_bwd"] = flops["fwd"] + flops["bwd"]
    # The fewest bytes each mode must move: x, W, y once forward; G, W, dX (and x for dA) backward.
    nbytes = {"fwd": item * (m * k + k * n + m * n), "bwd": item * (m * n + k * n + 2 * m * k)}
    nbytes["fwd_bwd"] = nbytes["fwd"] + nbytes["bwd"]
    ceiling = next((c for key, c in CEILINGS.items() if key in _device_name(device)), None)
    for row in rows:
        for mode in ("fwd", "bwd", "fwd_bwd"):
            ms = row.get(f"{mode}_ms")
            if ms is None:
                continue
            if floor.get(f"{mode}_ms"):
                row[f"{mode}_vs_floor"] = ms / floor[f"{mode}_ms"]
            if peft.get(f"{mode}_ms"):
                row[f"{mode}_speedup_vs_peft"] = peft[f"{mode}_ms"] / ms
            row[f"{mode}_tflops"] = flops[mode] / ms / 1e9
            row[f"{mode}_gbps"] = nbytes[mode] / ms / 1e6
            if ceiling:
                row[f"{mode}_of_peak"] = max(row[f"{mode}_tflops"] / ceiling["tflops"], row[f"{mode}_gbps"] / ceiling["gbps"])


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def grid(quick: bool, device: torch.device, models=None, layers=None, tokens=None, ranks=None, dtypes=None,
         dropouts=None) -> list[dict]:  # fmt: skip
    """The grid: the full one on a GPU; ``quick`` (or a CPU) a small one. Explicit lists override."""
    gpu = device.type == "cuda"
    if quick:
        defaults = (["Llama-2-7B"], ["q", "down"], [1, 128] if gpu else [64], [16],
                    [torch.bfloat16] if gpu else [torch.float32], [0.0, 0.05])  # fmt: skip
    else:
        defaults = (list(MODELS), list(LAYERS), [1, 128, 2048, 8192] if gpu else [1, 64, 256], [8, 16, 64],
                    [torch.bfloat16] if gpu else [torch.float32], [0.0, 0.05])  # fmt: skip
    models, layers, tokens, ranks, dtypes, dropouts = (
        given or default for given, default in zip((models, layers, tokens, ranks, dtypes, dropouts), defaults)
    )
    points, seen = [], set()
    for model, layer, m, r, dt, p in itertools.product(models, layers, tokens, ranks, dtypes, dropouts):
        k, n = layer_shapes(model)[layer]
        key = (k, n, m, r, dt, p)
        if key in seen:  # the same shape in another model (Llama-3-8B and Mistral-7B share all of theirs)
            continue
        seen.add(key)
        points.append({"model": model, "layer": layer, "k": k, "n": n, "tokens": m, "rank": r, "dtype": dt, "dropout": p})
    return points


def environment(device: torch.device) -> dict:
    """Device, versions and git revision, recorded with every result."""
    env = {"device": _device_name(device), "torch": torch.__version__, "fastlora": fastlora.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads()}  # fmt: skip
    for dist in ("triton", "peft"):
        try:
            env[dist] = __import__(dist).__version__
        except ImportError:
            env[dist] = None
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip() or None  # fmt: skip
    except OSError:
        env["git"] = None
    return env


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"Device: {env['device']} ({env['threads']} threads); torch {env['torch']}, triton {env['triton']}, "
             f"peft {env['peft']}; fastlora {env['fastlora']} @ {env['git']}; {result['seconds']:.0f} s.", "",
             "| model | layer | K→N | M | r | dtype | p | variant | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd / floor "
             "| speed-up vs PEFT | TFLOP/s | GB/s | saved MiB | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def f(v, spec):
        return "" if v is None else format(v, spec)

    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['layer']} | {r['k']}→{r['n']} | {r['tokens']} | {r['rank']} | {r['dtype']} "
                         f"| {r['dropout']} | {r['variant']} | error: {r['error']} |||||||||")  # fmt: skip
            continue
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['k']}→{r['n']} | {r['tokens']} | {r['rank']} | {r['dtype']} | {r['dropout']} "
            f"| {r['variant']} | {f(r.get('fwd_ms'), '.3f')} | {f(r.get('bwd_ms'), '.3f')} | {f(r.get('fwd_bwd_ms'), '.3f')} "
            f"| {f(r.get('fwd_bwd_vs_floor'), '.3f')} | {f(r.get('fwd_bwd_speedup_vs_peft'), '.2f')} "
            f"| {f(r.get('fwd_bwd_tflops'), '.2f')} | {f(r.get('fwd_bwd_gbps'), '.1f')} "
            f"| {f(r.get('saved_bytes', 0) / 2**20, '.2f')} | {f(r.get('peak_mib'), '.1f')} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    """Speed-up over PEFT (forward+backward) of each fastlora backend per shape, as a PNG. False when
    matplotlib is not installed (it is an optional extra: ``pip install fastlora[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["rows"] if r["variant"].startswith("fastlora") and r.get("fwd_bwd_speedup_vs_peft")]
    if not rows:
        return False
    labels = sorted({f"{r['layer']} {r['k']}→{r['n']}\nM={r['tokens']} r={r['rank']} p={r['dropout']}" for r in rows})
    backends = sorted({r["variant"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        values = {f"{r['layer']} {r['k']}→{r['n']}\nM={r['tokens']} r={r['rank']} p={r['dropout']}": r["fwd_bwd_speedup_vs_peft"]
                  for r in rows if r["variant"] == backend}  # fmt: skip
        ax.bar([j + i * width for j in range(len(labels))], [values.get(lab, 0) for lab in labels], width, label=backend)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=7)
    ax.set_ylabel("speed-up over PEFT (fwd+bwd)")
    ax.set_title(result["environment"]["device"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastlora bench", description="Benchmark fastlora against the floor, PEFT and the reference.")
    parser.add_argument("--quick", action="store_true", help="a small grid (a few minutes on a 2-core CPU)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for result.json, result.md, speedup.png")
    parser.add_argument("--models", nargs="+", choices=list(MODELS))
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS))
    parser.add_argument("--tokens", nargs="+", type=int)
    parser.add_argument("--ranks", nargs="+", type=int)
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--dropouts", nargs="+", type=float)
    parser.add_argument("--backends", nargs="+", help="fastlora backends to time (default: every one that runs "
                        "here, less the Triton interpreter on a CPU)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per grid point")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--host", action="store_true", help="measure host time per call at a tiny size instead "
                        "(fastlora, PEFT and the bare layer; see fastlora/bench_host.py)")  # fmt: skip
    # Many short timings, the best kept: on a shared machine a short window is more often undisturbed.
    parser.add_argument("--host-calls", type=int, default=1000, help="--host: calls per timing")
    parser.add_argument("--host-repeats", type=int, default=31, help="--host: timings per variant (the best counts)")
    parser.add_argument("--qlora", action="store_true", help="time one QLoRA layer instead (M=512, K=N=2048, r=16, "
                        "bf16): fastlora's, PEFT's over bitsandbytes' Linear4bit, and it accelerated; see "
                        "fastlora/bench_qlora.py")  # fmt: skip
    parser.add_argument("--multi", action="store_true", help="time mixed-adapter batches instead (serving and "
                        "training, K=N=1024, r=16, fp32): PEFT's adapter_names path, it accelerated, the base "
                        "layer; see fastlora/bench_multi.py")  # fmt: skip
    parser.add_argument("--dora", action="store_true", help="time DoRA instead (M=2048, K=N=1024, r=16, fp32, "
                        "forward+backward, dropout 0 and 0.1): fastlora's, PEFT's DoRA layer and the bare frozen "
                        "layer; see fastlora/bench_dora.py")  # fmt: skip
    args = parser.parse_args(argv)
    if args.dora:
        return _dora(args, argv)
    if args.multi:
        return _multi(args, argv)
    if args.host:
        return _host(args, argv)
    if args.qlora:
        return _qlora(args, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = [name for name, reason in backend_status(device).items() if reason is None]
    # On the CPU "triton" only runs through the interpreter (NumPy, minutes a call): no timing to be had.
    backends = args.backends or [b for b in available if not (device.type == "cpu" and b == "triton")]
    missing = [b for b in backends if b not in available]
    if missing:
        parser.error(f"--backends: {missing} cannot run on {device} (fastlora info says why)")
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else None
    points = grid(args.quick, device, args.models, args.layers, args.tokens, args.ranks, dtypes, args.dropouts)
    start = time.time()
    rows = run(points, device, backends, progress=not args.no_progress, rounds=args.rounds)
    result = {"environment": environment(device), "backends": backends, "quick": args.quick,
              "command": "fastlora bench " + " ".join(sys.argv[2:] if argv is None else argv), "rows": rows,
              "seconds": time.time() - start}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = to_markdown(result)
    (args.out / "result.md").write_text(table + "\n")
    plotted = plot(result, args.out / "speedup.png")
    print(table)
    print(f"\nwrote {args.out / 'result.json'}, {args.out / 'result.md'}"
          + (f", {args.out / 'speedup.png'}" if plotted else " (no plot: matplotlib is not installed)"))  # fmt: skip
    return 1 if any("error" in r for r in rows) else 0


def _qlora(args, argv) -> int:
    from fastlora.bench_qlora import qlora_side_by_side
    from fastlora.bench_qlora import to_markdown as qlora_markdown

    shape = {"m": (args.tokens or [512])[0], "k": 2048, "n": 2048, "r": (args.ranks or [16])[0]}
    start = time.time()
    rows = qlora_side_by_side(**shape, dtype=torch.bfloat16, rounds=args.rounds)
    result = {"environment": environment(torch.device("cpu")), "shape": shape, "rounds": args.rounds,
              "command": "fastlora bench " + " ".join(sys.argv[2:] if argv is None else argv), "rows": rows,
              "seconds": time.time() - start}  # fmt: skip
    return _write(args.out, result, qlora_markdown(rows, **shape, dtype=torch.bfloat16, rounds=args.rounds))


def _side_by_side(args, argv, rows_for, markdown) -> int:
    """A CPU comparison mode (``--multi``, ``--dora``): ``rows_for(rounds=...)`` measured, written with the
    environment and the command that produced it."""
    start = time.time()
    rows = rows_for(rounds=args.rounds)
    result = {"environment": environment(torch.device("cpu")), "rounds": args.rounds,
              "command": "fastlora bench " + " ".join(sys.argv[2:] if argv is None else argv), "rows": rows,
              "seconds": time.time() - start}  # fmt: skip
    return _write(args.out, result, markdown(rows, rounds=args.rounds))


def _multi(args, argv) -> int:
    from fastlora.bench_multi import multi_side_by_side, to_markdown

    return _side_by_side(args, argv, multi_side_by_side, to_markdown)


def _dora(args, argv) -> int:
    from fastlora.bench_dora import dora_side_by_side, to_markdown

    return _side_by_side(args, argv, dora_side_by_side, to_markdown)


def _write(out: Path, result: dict, table: str) -> int:
    """result.json and result.md into ``out``; the table printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "result.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out / 'result.json'}, {out / 'result.md'}")
    return 0


def _host(args, argv) -> int:
    from fastlora.bench_host import SHAPE, host_overhead
    from fastlora.bench_host import to_markdown as host_markdown

    device = torch.device("cpu")
    start = time.time()
    rows = host_overhead(calls=args.host_calls, repeats=args.host_repeats)
    launch = None
    try:
        from fastlora.bench_host import triton_launch_overhead

        launch = triton_launch_overhead(calls=args.host_calls, repeats=args.host_repeats)
    except ImportError:  # no triton
        pass
    result = {"environment": environment(device), "shape": SHAPE, "calls": args.host_calls, "triton_launch_us": launch,
              "repeats": args.host_repeats, "threads": 1,
              "command": "fastlora bench " + " ".join(sys.argv[2:] if argv is None else argv), "rows": rows,
              "seconds": time.time() - start}  # fmt: skip
    table = (f"Host time per call, µs (best of {args.host_repeats} × {args.host_calls} calls, one thread; "
             f"layer {SHAPE['in_features']} -> {SHAPE['out_features']}, r = {SHAPE['r']}, {SHAPE['rows']} rows, "
             "training mode)\n\n" + host_markdown(rows))  # fmt: skip
    if launch:
        table += (f"\n\nTriton backend's own host path, kernel launches stubbed out (dropout 0.1): forward "
                  f"{launch['forward']:.1f} µs, backward {launch['backward']:.1f} µs per call")  # fmt: skip
    return _write(args.out, result, table)
