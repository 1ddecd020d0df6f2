"""The whole GPU check of the Triton backend in one run: numerics first (bf16 included), then timings.

1. Numerics: the "triton" backend's output and every gradient against float64, within twice PyTorch's own
   error in the same dtype (fp32, fp16, bf16, fp32 adapters on a bf16 base), on odd shapes, ranks 1 to 256,
   strided and 3-D inputs, dropout, a dense and an NF4-quantised base; gradients bitwise-reproducible. Memory is poisoned with NaN first, so a
   tile a kernel fails to write shows up.
2. Timings with ``fastlora.bench`` (Llama-2-7B q, gate and down layers, M = 4096 tokens, r = 16, bf16,
   dropout 0 and 0.05): forward, backward and forward+backward, each variant checked against the reference
   before it is timed, all measured in this one process, interleaved: bare F.linear (the floor: forward and
   input gradient of the frozen layer), PEFT's LoRA Linear (fp32 adapters, PEFT's default on a bf16 model),
   the reference eager and under torch.compile, fastlora's "torch" and "triton" backends. Median of
   triton.testing.do_bench; peak memory and saved activations per forward+backward; then the ratios against
   the targets.
3. The GEMM main loops alone: each fused GEMM with its rank-r prologue switched off (rank 0, the same kernel
   that runs with LoRA on) against PyTorch's GEMM (cuBLAS) on the same operands and shapes (Llama-2-7B q,
   gate and down, M = 4096, bf16): Y = x·Wᵀ against F.linear, dX = G·W against torch.mm; the ratio is the
   main loop's own gap, and the row says which main loop ran (TMA on sm_90, else pointers).
4. CUDA graph capture: forward+backward of a LoRALinear on the triton backend captured and replayed,
   against eager calls with the same seed (the path has no host sync; tests/test_no_host_sync.py).
5. QLoRA: the fused op over an NF4 weight against the bare bf16 layer at M = 4096 and 16 to 64, and against
   PEFT over bitsandbytes' Linear4bit where bitsandbytes imports on the GPU machine.
6. Mixed-adapter batches (``multi_timings``); DoRA (``dora_timings``).
7. The CUDA extension (``cuda_extension``): built here, its kernel's numerics against float64 and bit for bit
   against the host replay of its arithmetic, its decode timings, its CUDA graph capture.

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
import torch.nn.functional as F

import fastlora
from fastlora import nf4
from fastlora.backends import backend_status
from fastlora.bench import environment, grid, layer_shapes, median_ms, run
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
    # (name, lead, K, N, r, p, check_case options): dense cases in every layout, then an NF4 base.
    cases = [(layout_kind, lead, k, n, r, p, {"layout_kind": layout_kind})
             for lead, k, n, r, p, layout_kind in (NUMERIC_CASES[:4] if quick else NUMERIC_CASES)]
    cases += [("NF4", lead, k, n, r, p, {"nf4_blocksize": 64}) for lead, k, n, r, p in (NF4_CASES[:1] if quick else NF4_CASES)]
    rows = []
    for backend in backends:
        for kind, lead, k, n, r, p, options in cases:
            for dtype, adapter in dtypes:
                if backend == "triton" and dtype == torch.bfloat16 and device.type == "cpu":
                    continue  # the interpreter computes bf16 wrongly; this is what the GPU run is for
                name = f"{backend} {'x'.join(map(str, lead))}x{k}->{n} r={r} p={p} {kind} {dtype}"
                name += f" A/B {adapter}" if adapter else ""
                _poison(device)
                try:
                    with fastlora.use_backend(backend):
                        errors = check_case(make_case(lead, k, n, r, dropout_p=p), dtype, adapter, backend_name=backend,
                                            device=device, **options)  # fmt: skip
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


# An NF4-quantised base (double quantisation, blocks of 64; fastlora.testing.check_case's nf4_blocksize):
# blocks that cross rows (K not a multiple of 64), odd N, ranks 5 to 256, dropout.
NF4_CASES = [  # (lead, K, N, r, dropout_p)
    ((37,), 130, 70, 5, 0.0),
    ((3, 11), 96, 65, 8, 0.1),
    ((129,), 520, 260, 256, 0.1),
    ((2, 333), 1024, 3000, 16, 0.05),
]


def _points(quick: bool, device: torch.device) -> list[dict]:
    if quick:  # tiny shapes: under the Triton interpreter every kernel runs in NumPy
        return [{"model": "quick", "layer": "q", "k": 96, "n": 80, "tokens": 64, "rank": 16,
                 "dtype": torch.float32, "dropout": p} for p in (0.0, 0.05)]  # fmt: skip
    return grid(False, device, models=["Llama-2-7B"], layers=["q", "gate", "down"], tokens=[4096], ranks=[16],
                dtypes=[torch.bfloat16], dropouts=[0.0, 0.05])  # fmt: skip


def main_loop_gap(device: torch.device, backends: list[str], quick: bool, rounds: int) -> list[dict]:
    """The fused GEMMs with rank 0 (their rank loop takes no step, nothing else changes) against PyTorch's
    GEMM on the same operands, each checked against it first (outputs poisoned beforehand), then timed
    interleaved; medians over the rounds. One row per (layer, GEMM)."""
    if "triton" not in backends:
        return [{"gemm": "all", "skipped": "the triton backend cannot run here"}]
    from fastlora.kernels.lora_linear import lora_linear_bwd, lora_linear_fwd, uses_tma

    if quick:  # through the interpreter on a CPU: tiny, and shaped so that TMA can take it on every Triton
        shapes, m, dtype = {"quick": (96, 80)}, 64, torch.float16
    else:
        shapes = {layer: layer_shapes("Llama-2-7B")[layer] for layer in ("q", "gate", "down")}
        m, dtype = 4096, torch.bfloat16
    rows = []
    for layer, (k, n) in shapes.items():
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
        w = torch.randn(n, k, device=device, dtype=dtype, generator=g) / k**0.5
        grad_y = torch.randn(m, n, device=device, dtype=dtype, generator=g)
        # Rank 0 as empty views of allocated tensors, so that every pointer argument points somewhere.
        no_shrink, no_b, no_a = x[:, :0], w[:, :0], w[:0]
        no_d_shrink = torch.empty((m, 1), device=device, dtype=torch.float32)[:, :0]
        gemms = [
            ("Y = x·Wᵀ", uses_tma(x, w), 2 * m * n * k,
             lambda: lora_linear_fwd(x, w, None, no_shrink, no_b, 1.0), lambda: F.linear(x, w)),
            ("dX = G·W", uses_tma(grad_y, w), 2 * m * n * k,
             lambda: lora_linear_bwd(grad_y, w, no_d_shrink, no_a, 0.0, None), lambda: torch.mm(grad_y, w)),
        ]  # fmt: skip
        for name, tma, flops, ours, theirs in gemms:
            row = {"layer": f"{layer} {k}->{n}", "gemm": name, "m": m, "dtype": str(dtype).removeprefix("torch."),
                   "main_loop": "TMA" if tma else "pointers"}  # fmt: skip
            rows.append(row)
            try:
                _poison(device)
                got, want = ours().float(), theirs().float()
                row["check_rel_err"] = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
                if not row["check_rel_err"] <= (1e-5 if dtype == torch.float32 else 1e-2):
                    raise AssertionError(f"rank-0 output off PyTorch's by {row['check_rel_err']:.3g}")
                times: dict[str, list[float]] = {"fused_ms": [], "torch_ms": []}
                for _ in range(rounds):
                    times["fused_ms"].append(median_ms(ours, device))
                    times["torch_ms"].append(median_ms(theirs, device))
                row.update({key: sorted(v)[len(v) // 2] for key, v in times.items()})
                row["ratio"] = row["fused_ms"] / row["torch_ms"]
                row["fused_tflops"] = flops / row["fused_ms"] / 1e9
            except Exception as err:  # a failure is a result to report
                row["error"] = f"{type(err).__name__}: {err}"[:500]
    return rows


def graph_capture(device: torch.device, backends: list[str]) -> list[dict]:
    """Forward+backward of a LoRALinear (triton backend, dropout on) captured in a CUDA graph and replayed:
    the replay must give what eager calls give (same seed drawn inside the graph: the generator's offset is
    captured). Not run off a GPU (a row says so)."""
    if device.type != "cuda" or "triton" not in backends:
        return [{"case": "CUDA graph capture", "skipped": "needs a CUDA device with the triton backend"}]
    rows = []
    for dropout in (0.0, 0.1):
        try:
            torch.manual_seed(0)
            with fastlora.use_backend("triton"):
                layer = fastlora.LoRALinear(1024, 1024, r=16, lora_dropout=dropout, device=device, dtype=torch.bfloat16)
                with torch.no_grad():
                    layer.lora_B["default"].normal_()
                x = torch.randn(64, 1024, device=device, dtype=torch.bfloat16, requires_grad=True)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up on a side stream: tuning and compiling happen here
                    for _ in range(3):
                        layer(x).float().sum().backward()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                x.grad = None
                layer.zero_grad(set_to_none=True)
                with torch.cuda.graph(graph):
                    y = layer(x)
                    y.float().sum().backward()
                torch.manual_seed(1)
                graph.replay()
                torch.cuda.synchronize()
                got = (y.detach().clone(), x.grad.clone(), layer.lora_A["default"].grad.clone())
                torch.manual_seed(1)  # the same seed, eagerly: the replay drew its seed from this generator state
                x2 = x.detach().clone().requires_grad_()
                layer.zero_grad(set_to_none=True)
                y2 = layer(x2)
                y2.float().sum().backward()
                want = (y2.detach(), x2.grad, layer.lora_A["default"].grad)
            same = all(torch.equal(a, b) for a, b in zip(got, want))
            rows.append({"case": f"CUDA graph capture, dropout {dropout}", "ok": same,
                         **({} if same else {"error": "replay differs from eager calls"})})  # fmt: skip
        except Exception as err:
            rows.append({"case": f"CUDA graph capture, dropout {dropout}", "ok": False, "error": f"{type(err).__name__}: {err}"})
    return rows


QLORA_TARGETS = {"fwd_bwd_vs_bare_m4096": 1.15, "speedup_vs_peft_m4096": 1.5, "fwd_bwd_vs_bare_decode": 1.0}


def qlora_timings(device: torch.device, backends: list[str], quick: bool, rounds: int) -> list[dict]:
    """QLoRA on the Llama-2-7B q, gate and down shapes (bf16, r = 16, NF4 with double quantisation): the
    fused op over the NF4 weight (forward + backward: Y, then dX, dA, dB) against the bare bf16 layer
    (F.linear forward and its dX) at M = 4096 and at decode sizes M = 16, 32, 64 (where reading W decides:
    4x fewer weight bytes), and against PEFT over bitsandbytes' Linear4bit where bitsandbytes imports. Each
    variant checked against the bare layer's output first (a loose bound: NF4 is lossy); medians over the
    rounds, interleaved."""
    backend = "triton" if "triton" in backends else "torch"
    if quick:
        shapes, ms, dtype = {"quick": (128, 96)}, [8], torch.float32
    else:
        shapes = {layer: layer_shapes("Llama-2-7B")[layer] for layer in ("q", "gate", "down")}
        ms, dtype = [16, 32, 64, 4096], torch.bfloat16
    from fastlora.bench_qlora import _peft_over_bnb  # bitsandbytes and PEFT are imported when it runs

    rows = []
    for layer, (k, n) in shapes.items():
        g = torch.Generator(device=device).manual_seed(0)
        w = (torch.randn(n, k, device=device, generator=g) / k**0.5).to(dtype)
        q = nf4.quantize(w, 64, True)
        a = (torch.randn(16, k, device=device, generator=g) / k**0.5).requires_grad_()
        b = (torch.randn(n, 16, device=device, generator=g) * 0.01).requires_grad_()
        peft = None
        if device.type == "cuda":
            try:
                peft = _peft_over_bnb(w.cpu(), 16, dtype).to(device)
            except Exception as err:  # bitsandbytes missing or without this device: said in the row
                peft = f"{type(err).__name__}: {err}"[:200]
        for m in ms:
            row = {"layer": f"{layer} {k}->{n}", "m": m, "dtype": str(dtype).removeprefix("torch."), "backend": backend}
            rows.append(row)
            try:
                x = torch.randn(m, k, device=device, dtype=dtype, generator=g).requires_grad_()
                grad_y = torch.randn(m, n, device=device, dtype=dtype, generator=g)

                def ours():
                    with fastlora.use_backend(backend):
                        fastlora.lora_linear(x, q, None, a, b, 2.0).backward(grad_y)

                def bare():
                    torch.nn.functional.linear(x, w).backward(grad_y)

                with fastlora.use_backend(backend), torch.no_grad():
                    got = fastlora.lora_linear(x, q, None, a, b, 0.0).float()
                want = torch.nn.functional.linear(x, w).float()
                row["check_rel_err"] = ((got - want).abs().max() / want.abs().max()).item()
                if not row["check_rel_err"] < 0.2:  # NF4 keeps about 2 significant bits per weight
                    raise AssertionError(f"NF4 output off the bf16 layer's by {row['check_rel_err']:.3g}")
                variants = {"fastlora_ms": ours, "bare_ms": bare}
                if isinstance(peft, torch.nn.Module):
                    variants["peft_bnb_ms"] = lambda: peft(x).backward(grad_y)
                elif peft is not None:
                    row["peft"] = peft
                times: dict[str, list[float]] = {key: [] for key in variants}
                for _ in range(rounds):
                    for key, fn in variants.items():
                        times[key].append(median_ms(fn, device, [x, a, b]))
                row.update({key: sorted(v)[len(v) // 2] for key, v in times.items()})
                row["vs_bare"] = row["fastlora_ms"] / row["bare_ms"]
                if "peft_bnb_ms" in row:
                    row["speedup_vs_peft"] = row["peft_bnb_ms"] / row["fastlora_ms"]
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"[:500]
    return rows


def multi_timings(device: torch.device, backends: list[str], quick: bool, rounds: int) -> list[dict]:
    """Mixed-adapter batches (``lora_linear_multi``) on the Llama-2-7B q shape (bf16, r = 16; quick: small
    fp32): 4096 rows in 8 sequences of 512, one adapter each, forward and forward+backward against the
    single-adapter fused op on the same rows (targets <= 1.10x and <= 1.15x); decode batches of 16 and 64 rows
    over as many adapters, forward, against PEFT's ``adapter_names`` loop on the same layer (target >= 3x
    faster). Each output first checked against the torch backend's."""
    backend = "triton" if "triton" in backends else "torch"
    k, n = (96, 64) if quick else layer_shapes("Llama-2-7B")["q"]
    dtype = torch.float32 if quick else torch.bfloat16
    cases = [(64, 8, 8)] if quick else [(4096, 8, 8), (16, 16, 16), (64, 64, 64)]  # (rows, sequences, adapters)
    rows = []
    for m, seqs, adapters in cases:
        row = {"rows": m, "adapters": adapters, "dtype": str(dtype).removeprefix("torch."), "backend": backend}
        rows.append(row)
        try:
            g = torch.Generator(device=device).manual_seed(0)
            w = torch.randn(n, k, device=device, generator=g).div_(k**0.5).to(dtype)
            a = torch.randn(adapters, 16, k, device=device, generator=g).div_(k**0.5).requires_grad_()
            b = torch.randn(adapters, n, 16, device=device, generator=g).mul_(0.01).requires_grad_()
            x = torch.randn(m, k, device=device, generator=g).to(dtype).requires_grad_()
            grad_y = torch.randn(m, n, device=device, generator=g).to(dtype)
            index = (torch.arange(seqs, device=device) % adapters).repeat_interleave(m // seqs)
            grouping = fastlora.group_rows(index, adapters, (m,))
            with torch.no_grad():
                with fastlora.use_backend(backend):
                    got = fastlora.lora_linear_multi(x, w, None, a, b, 2.0, grouping).float()
                with fastlora.use_backend("torch"):
                    want = fastlora.lora_linear_multi(x, w, None, a, b, 2.0, grouping).float()
            row["check_rel_err"] = ((got - want).abs().max() / want.abs().max()).item()
            if not row["check_rel_err"] < 2e-2:
                raise AssertionError(f"mixed batch off the torch backend's by {row['check_rel_err']:.3g}")

            def multi(backward: bool):
                with fastlora.use_backend(backend):
                    y = fastlora.lora_linear_multi(x, w, None, a, b, 2.0, grouping)
                    if backward:
                        y.backward(grad_y)

            def single(backward: bool):
                with fastlora.use_backend(backend):
                    y = fastlora.lora_linear(x, w, None, a[0], b[0], 2.0)
                    if backward:
                        y.backward(grad_y)

            if m >= 1024:
                variants = {"multi_fwd_ms": lambda: multi(False), "single_fwd_ms": lambda: single(False),
                            "multi_fwd_bwd_ms": lambda: multi(True), "single_fwd_bwd_ms": lambda: single(True)}  # fmt: skip
            else:
                from fastlora.bench_multi import _peft_layer

                peft = _peft_layer(k, n, 16, adapters).to(device=device, dtype=dtype).eval()
                names = [f"task{i}" for i in index.tolist()]
                x_peft = x.detach()

                def peft_loop():
                    with torch.no_grad():
                        peft(x_peft, adapter_names=names)

                variants = {"multi_fwd_ms": lambda: multi(False), "peft_fwd_ms": peft_loop}
            times: dict[str, list[float]] = {key: [] for key in variants}
            for _ in range(rounds):
                for key, fn in variants.items():
                    times[key].append(median_ms(fn, device, [x, a, b]))
            row.update({key: sorted(v)[len(v) // 2] for key, v in times.items()})
            if "single_fwd_ms" in row:
                row["fwd_vs_single"] = row["multi_fwd_ms"] / row["single_fwd_ms"]
                row["fwd_bwd_vs_single"] = row["multi_fwd_bwd_ms"] / row["single_fwd_bwd_ms"]
            else:
                row["speedup_vs_peft"] = row["peft_fwd_ms"] / row["multi_fwd_ms"]
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:500]
    return rows


def dora_timings(device: torch.device, backends: list[str], quick: bool, rounds: int) -> list[dict]:
    """DoRA (``fastlora.dora_linear`` through an accelerated PEFT DoRA layer) at Llama-2-7B q and down shapes,
    M = 4096, r = 16, bf16, dropout 0 (quick: small fp32), forward+backward against bare ``F.linear`` (forward
    and input gradient; target <= 1.20x) and PEFT's DoRA layer (target >= 1.5x faster), output first checked
    against PEFT's."""
    from fastlora.bench_dora import _variants

    backend = "triton" if "triton" in backends else "torch"
    dtype = torch.float32 if quick else torch.bfloat16
    shapes = [("q", 64, 96, 64)] if quick else [(name, 4096, *layer_shapes("Llama-2-7B")[name]) for name in ("q", "down")]
    rows = []
    for layer, m, k, n in shapes:
        row = {"layer": layer, "m": m, "k": k, "n": n, "dtype": str(dtype).removeprefix("torch."), "backend": backend}
        rows.append(row)
        try:
            with fastlora.use_backend(backend):
                fns, params, x, (peft_model, ours_model) = _variants(m, k, n, 16, 0.0, device, dtype)
                with torch.no_grad():
                    want, got = peft_model(x).float(), ours_model(x).float()
                row["check_rel_err"] = _rel(got, want)
                if not row["check_rel_err"] < 2e-2:
                    raise AssertionError(f"DoRA off PEFT's output by {row['check_rel_err']:.3g}")
                times: dict[str, list[float]] = {key: [] for key in fns}
                for _ in range(rounds):
                    for key, fn in fns.items():
                        times[key].append(median_ms(fn, device, [x, *params]))
            med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
            row.update({"bare_ms": med["bare frozen layer"], "peft_ms": med["PEFT DoRA"], "fastlora_ms": med["fastlora DoRA"]})
            row["vs_bare"] = row["fastlora_ms"] / row["bare_ms"]
            row["speedup_vs_peft"] = row["peft_ms"] / row["fastlora_ms"]
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:500]
    return rows


def _extension_case(device, m, k, n, ranks, index, dtype, adapter_dtype, seed=0):
    """Operands of ``torch.ops.fastlora.cuda_lora_decode`` on ``device`` (lanes past a rank are NaN: never read)."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    a = (torch.randn(len(ranks), r_max, k, generator=g) / k**0.5).to(adapter_dtype)
    b = (torch.randn(len(ranks), n, r_max, generator=g) * 0.1).to(adapter_dtype)
    for ad, r in enumerate(ranks):
        a[ad, r:], b[ad, :, r:] = float("nan"), float("nan")
    args = (torch.randn(m, k, generator=g).to(dtype), (torch.randn(n, k, generator=g) / k**0.5).to(dtype),
            torch.randn(n, generator=g).to(dtype), a, b, None if index is None else torch.tensor(index),
            torch.tensor([0.5 + 0.25 * i for i in range(len(ranks))]), torch.tensor(ranks, dtype=torch.int32))  # fmt: skip
    return tuple(None if t is None else t.to(device) for t in args)


def cuda_extension(device: torch.device, quick: bool, rounds: int) -> dict:
    """The CUDA extension (csrc/): built here just in time (nvcc, ninja, pybind11), then
    1. numerics: the kernel against float64 (within 2x PyTorch's own error in the same dtype plus a floor)
       and bit for bit against the host replay of its arithmetic (tests/test_cuda_ext.py), odd shapes, ranks
       1-256, per-row adapters with -1, bf16 and fp16, fp32 and 16-bit adapters, a dense and an NF4 base;
    2. timings, Llama-2-7B q, gate and down shapes, bf16, M = 1, 4, 16, r = 16, inference: the whole call
       from Python (``fastlora.lora_linear`` on the "cuda" backend) against bare ``F.linear`` (target
       <= 1.10x), PEFT's LoRA Linear (target >= 3x faster) and the Triton backend; the kernel alone from a
       CUDA graph of 100 calls against the bandwidth floor (bytes of W, x, A, B, y at the copy bandwidth
       measured here; target >= 80 %); and the call captured in a CUDA graph, checked against eager.
    Skipped, with the reason, where the extension cannot be built or run."""
    from fastlora import cuda_build, cuda_ext
    from fastlora.backends import cuda_backend  # noqa: F401 (registers torch.ops.fastlora.cuda_lora_decode)

    out: dict = {}
    if device.type != "cuda":
        return {"skipped": "needs a CUDA device"}
    try:
        start = time.time()
        cuda_ext.build()
        out["build_s"] = time.time() - start
        built = cuda_build.build()  # up to date: nothing recompiles; its report
        report = cuda_build.parse_ptxas(built.ptxas_log.read_text())
        out["ptxas"] = {"variants": len(report), "max_registers": max(e["registers"] for e in report),
                        "spill_bytes": sum(e["spill_stores"] + e["spill_loads"] for e in report)}  # fmt: skip
    except Exception as err:
        return {"skipped": f"build failed: {type(err).__name__}: {err}"[:800]}
    reason = cuda_ext.unavailable_reason()
    if reason is not None:
        return {"skipped": reason, **out}
    checks = []
    try:
        import ctypes

        import numpy as np

        replay = ctypes.CDLL(str(cuda_build.build_replay()))
        cases = [(1, 4096, 4096, [16], None), (3, 1031, 517, [7, 16], [1, -1, 0]),
                 (16, 4096, 11008 if not quick else 1000, [256, 1], [0, 1, -1, 1] * 4), (5, 264, 37, [1], None)]  # fmt: skip
        for (m, k, n, ranks, index) in cases:
            for dtype, adapter_dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                         (torch.bfloat16, torch.bfloat16)):  # fmt: skip
                args = _extension_case(device, m, k, n, ranks, index, dtype, adapter_dtype)
                y = torch.ops.fastlora.cuda_lora_decode(*args)
                torch.cuda.synchronize()
                x, w, bias, a, b, idx, scales, rk = (None if t is None else t.cpu() for t in args)
                truth = _decode_truth(x, w, bias, a, b, idx, ranks, scales.tolist(), torch.float64)
                ours = _rel(y.cpu().double(), truth)
                torch_err = _rel(_decode_truth(x, w, bias, a, b, idx, ranks, scales.tolist(), torch.float32).double(), truth)
                replayed = _replay_decode(replay, np, ctypes, x, w, bias, a, b, idx, ranks, scales.tolist()).to(dtype)
                mismatches = int((replayed.view(torch.int16) != y.cpu().view(torch.int16)).sum())
                ok = ours <= 2 * torch_err + {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype] and mismatches == 0
                checks.append({"m": m, "k": k, "n": n, "ranks": ranks, "dtype": str(dtype), "adapter_dtype": str(adapter_dtype),
                               "rel_err": ours, "torch_rel_err": torch_err, "replay_mismatches": mismatches, "ok": ok})  # fmt: skip
        # An NF4 base (double-quantised, blocksize 64): the kernel decodes W as it reads it; the replay gets
        # fastlora.nf4.dequantize's values, which the kernel's decoding matches (tests/test_cuda_ext.py).
        for (m, k, n, ranks, index) in [(4, 4096, 4096, [16], None), (3, 1031, 517, [7, 16], [1, -1, 0])]:
            args = _extension_case(device, m, k, n, ranks, index, torch.bfloat16, torch.float32, seed=1)
            x, w, bias, a, b, idx, scales, rk = (None if t is None else t.cpu() for t in args)
            q = nf4.quantize(w, 64, True)
            w_q = nf4.dequantize(q, torch.bfloat16)
            y = cuda_backend.decode(args[0], q.to(device), args[2], args[3], args[4], args[5], args[6], args[7], 0.0, 0)
            torch.cuda.synchronize()
            truth = _decode_truth(x, w_q, bias, a, b, idx, ranks, scales.tolist(), torch.float64)
            ours = _rel(y.cpu().double(), truth)
            torch_err = _rel(_decode_truth(x, w_q, bias, a, b, idx, ranks, scales.tolist(), torch.float32).double(), truth)
            replayed = _replay_decode(replay, np, ctypes, x, w_q, bias, a, b, idx, ranks, scales.tolist()).bfloat16()
            mismatches = int((replayed.view(torch.int16) != y.cpu().view(torch.int16)).sum())
            checks.append({"m": m, "k": k, "n": n, "ranks": ranks, "dtype": "NF4 -> torch.bfloat16",
                           "adapter_dtype": "torch.float32", "rel_err": ours, "torch_rel_err": torch_err,
                           "replay_mismatches": mismatches, "ok": ours <= 2 * torch_err + 2.0**-8 and mismatches == 0})  # fmt: skip
    except Exception as err:
        checks.append({"ok": False, "error": f"{type(err).__name__}: {err}"[:500]})
    out["numerics"] = checks
    out["timings"] = _extension_timings(device, quick, rounds)
    return out


def _rel(value, truth) -> float:
    return ((value - truth).abs().max() / truth.abs().max().clamp_min(1e-30)).item()


def _decode_truth(x, w, bias, a, b, index, ranks, scales, dtype):
    """Row by row in ``dtype`` (S rounded to x's dtype as PyTorch's two-GEMM path does, unless float64)."""
    rows = []
    for m in range(x.shape[0]):
        ad = 0 if index is None else int(index[m])
        row = x[m].to(dtype) @ w.to(dtype).t() + bias.to(dtype)
        if ad >= 0:
            s = x[m].to(dtype) @ a[ad, : ranks[ad]].to(dtype).t()
            s = s if dtype == torch.float64 else s.to(x.dtype).to(dtype)
            row = row + scales[ad] * (s @ b[ad, :, : ranks[ad]].to(dtype).t())
        rows.append(row if dtype == torch.float64 else row.to(x.dtype))
    return torch.stack(rows)


def _replay_decode(lib, np, ctypes, x, w, bias, a, b, index, ranks, scales):
    """The host replay (csrc/replay.cpp) of the kernel's arithmetic: y (M, N) in fp32 before rounding."""
    def arr(t, kind=np.float32):
        return np.ascontiguousarray(t.float().numpy() if kind == np.float32 else t.numpy().astype(kind))

    def ptr(v, kind=ctypes.c_float):
        return None if v is None else v.ctypes.data_as(ctypes.POINTER(kind))

    m, k, n, r_max = x.shape[0], x.shape[1], w.shape[0], a.shape[1]
    xs, ws, bs_, as_, bb = arr(x), arr(w), arr(bias), arr(a), arr(b)
    idx = None if index is None else arr(index, np.int64)
    rk, sc = np.array(ranks, dtype=np.int32), np.array(scales, dtype=np.float32)
    s, y = np.zeros((m, r_max), dtype=np.float32), np.zeros((m, n), dtype=np.float32)
    i64 = ctypes.c_int64
    lib.fastlora_replay_shrink(ptr(xs), ptr(as_), ptr(idx, ctypes.c_int64), ptr(rk, ctypes.c_int32), i64(m), i64(k),
                               i64(r_max), ptr(s))  # fmt: skip
    lib.fastlora_replay_decode(ptr(xs), ptr(ws), ptr(bs_), ptr(bb), ptr(s), ptr(idx, ctypes.c_int64),
                               ptr(rk, ctypes.c_int32), ptr(sc), i64(m), i64(n), i64(k), i64(r_max), ptr(y))  # fmt: skip
    return torch.from_numpy(y)


def _extension_timings(device: torch.device, quick: bool, rounds: int) -> list[dict]:
    shapes = layer_shapes("Llama-2-7B")
    layers = ["q"] if quick else ["q", "gate", "down"]
    probe = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB: the copy bandwidth achievable here
    copy_ms = median_ms(lambda: probe.clone(), device)
    bandwidth = 2 * probe.numel() / (copy_ms * 1e-3)  # bytes per second, read + write
    del probe
    rows = []
    for layer in layers:
        k, n = shapes[layer]
        for m in (1, 4, 16):
            row = {"layer": layer, "m": m, "k": k, "n": n, "r": 16, "copy_GBps": bandwidth / 1e9}
            rows.append(row)
            try:
                from peft import LoraConfig, get_peft_model

                g = torch.Generator(device=device).manual_seed(0)
                base = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
                peft = get_peft_model(torch.nn.Sequential(base), LoraConfig(r=16, lora_alpha=32, target_modules=["0"]))
                peft = peft.to(torch.bfloat16).eval()
                lin = peft.base_model.model[0]
                torch.nn.init.normal_(lin.lora_B["default"].weight, std=0.02, generator=g)
                w, a, b = base.weight.detach(), lin.lora_A["default"].weight.detach(), lin.lora_B["default"].weight.detach()
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)

                def ours():
                    with fastlora.use_backend("cuda"):
                        return fastlora.lora_linear(x, w, None, a, b, 2.0, training=False)

                def triton_call():
                    with fastlora.use_backend("triton"):
                        return fastlora.lora_linear(x, w, None, a, b, 2.0, training=False)

                with torch.no_grad():
                    want = peft(x).float()
                    got = ours().float()
                    row["check_rel_err"] = _rel(got, want)
                    variants = {"bare_ms": lambda: F.linear(x, w), "cuda_ms": ours, "triton_ms": triton_call,
                                "peft_ms": lambda: peft(x)}  # fmt: skip
                    times: dict[str, list[float]] = {key: [] for key in variants}
                    for _ in range(rounds):
                        for key, fn in variants.items():
                            times[key].append(median_ms(fn, device))
                    row.update({key: sorted(v)[len(v) // 2] for key, v in times.items()})
                    # The kernel alone: 100 calls in a CUDA graph, replayed (no host time), and the same graph's
                    # output against an eager call.
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        ours()
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for _ in range(100):
                            captured = ours()
                    graph.replay()
                    torch.cuda.synchronize()
                    row["graph_same_as_eager"] = bool(torch.equal(captured, ours()))
                    row["kernel_us"] = median_ms(graph.replay, device) * 1e3 / 100
                nbytes = 2 * (n * k + m * k + 16 * k + n * 16 + m * n)
                row["floor_us"] = nbytes / bandwidth * 1e6
                row["floor_fraction"] = row["floor_us"] / row["kernel_us"]
                row["vs_bare"] = row["cuda_ms"] / row["bare_ms"]
                row["speedup_vs_peft"] = row["peft_ms"] / row["cuda_ms"]
                if not row["check_rel_err"] < 2e-2:
                    raise AssertionError(f"cuda backend off PEFT's output by {row['check_rel_err']:.3g}")
                if not row["graph_same_as_eager"]:
                    raise AssertionError("the CUDA graph's replay differs from an eager call")
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"[:500]
    return rows


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


def _table(lines: list[str], rows: list[dict], intro: str | None, header: list[str], keys: tuple[str, ...],
           cells) -> None:
    """Appends to ``lines`` a markdown table of ``rows`` (nothing when there are none), after ``intro`` when
    given: the first columns are each row's ``keys``, the rest ``cells(row)``; a row that failed (an "error"
    key) reads FAILED and its error, the other cells left empty."""
    if not rows:
        return
    lines += ["", *([intro, ""] if intro else []), "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for q in rows:
        lead = [str(q[k]) for k in keys]
        if "error" in q:
            lines.append("| " + " | ".join([*lead, f"FAILED {q['error']}"]) + " |" + " |" * (len(header) - len(keys) - 1))
        else:
            lines.append("| " + " | ".join([*lead, *cells(q)]) + " |")


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

    gap = result.get("main_loop_gap", [])
    if gap:
        lines += ["", "Main loop alone: the fused GEMM at rank 0 against PyTorch's GEMM on the same operands "
                  "(ratio > 1: slower than cuBLAS).", "",
                  "| layer | GEMM | M | dtype | main loop | fused ms | torch ms | fused / torch | fused TFLOP/s |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for g in gap:
            if "skipped" in g or "error" in g:
                lines.append(f"| {g.get('layer', '')} | {g['gemm']} | | | {g.get('main_loop', '')} | "
                             f"{g.get('skipped') or 'FAILED ' + g['error']} | | | |")  # fmt: skip
                continue
            lines.append(f"| {g['layer']} | {g['gemm']} | {g['m']} | {g['dtype']} | {g['main_loop']} | "
                         f"{g['fused_ms']:.3f} | {g['torch_ms']:.3f} | {g['ratio']:.3f} | "
                         f"{g['fused_tflops']:.0f} |")  # fmt: skip

    _table(lines, result.get("qlora", []), "QLoRA: the fused op over an NF4 weight (forward+backward) against the "
           "bare bf16 layer and PEFT over bitsandbytes' Linear4bit (targets: M = 4096 <= "
           f"{QLORA_TARGETS['fwd_bwd_vs_bare_m4096']}x bare and >= {QLORA_TARGETS['speedup_vs_peft_m4096']}x faster "
           "than PEFT; M = 16 to 64 below the bare layer).",
           ["layer", "M", "backend", "fastlora ms", "bare bf16 ms", "fastlora / bare", "PEFT+bnb ms", "speed-up over PEFT"],
           ("layer", "m", "backend"),
           lambda q: [f"{q['fastlora_ms']:.3f}", f"{q['bare_ms']:.3f}", f"{q['vs_bare']:.3f}",
                      f(q.get("peft_bnb_ms"), ".3f"), f(q.get("speedup_vs_peft"), ".2f")])  # fmt: skip
    _table(lines, result.get("multi", []), "Mixed-adapter batches (lora_linear_multi): 4096 rows against the "
           "single-adapter fused op (targets <= 1.10x forward, <= 1.15x forward+backward); decode against PEFT's "
           "adapter_names loop (target >= 3x faster).",
           ["rows", "adapters", "backend", "multi fwd ms", "vs single fwd", "vs single fwd+bwd", "PEFT fwd ms",
            "speed-up over PEFT"],
           ("rows", "adapters", "backend"),
           lambda q: [f"{q['multi_fwd_ms']:.3f}", f(q.get("fwd_vs_single"), ".3f"), f(q.get("fwd_bwd_vs_single"), ".3f"),
                      f(q.get("peft_fwd_ms"), ".3f"), f(q.get("speedup_vs_peft"), ".2f")])  # fmt: skip
    _table(lines, result.get("dora", []), "DoRA, forward+backward, dropout 0 (targets <= 1.20x bare F.linear, >= 1.5x "
           "faster than PEFT's DoRA).",
           ["layer", "M", "backend", "bare ms", "PEFT DoRA ms", "fastlora ms", "vs bare", "speed-up over PEFT"],
           ("layer", "m", "backend"),
           lambda q: [f"{q['bare_ms']:.3f}", f"{q['peft_ms']:.3f}", f"{q['fastlora_ms']:.3f}", f"{q['vs_bare']:.3f}",
                      f"{q['speedup_vs_peft']:.2f}"])  # fmt: skip
    ext = result.get("cuda_extension", {})
    lines += ["", "CUDA extension (csrc/, one-launch decode): " + (("skipped: " + ext["skipped"]) if "skipped" in ext else
              f"built in {ext.get('build_s', 0):.0f} s, ptxas {ext.get('ptxas')}")]  # fmt: skip
    for c in ext.get("numerics", []):
        lines.append(f"- numerics {c.get('m')}x{c.get('k')}->{c.get('n')} ranks {c.get('ranks')} {c.get('dtype')} / "
                     f"{c.get('adapter_dtype')}: " + ("ok" if c.get("ok") else "FAILED") + f" (rel err {c.get('rel_err')}, "
                     f"PyTorch's {c.get('torch_rel_err')}, replay mismatches {c.get('replay_mismatches')}) {c.get('error', '')}")  # fmt: skip
    _table(lines, ext.get("timings", []), None,
           ["layer", "M", "F.linear ms", "cuda ms", "vs F.linear (<= 1.10)", "PEFT ms", "speed-up over PEFT (>= 3)",
            "triton ms", "kernel us", "floor us", "of floor (>= 0.8)"],
           ("layer", "m"),
           lambda q: [f"{q['bare_ms']:.4f}", f"{q['cuda_ms']:.4f}", f"{q['vs_bare']:.3f}", f"{q['peft_ms']:.4f}",
                      f"{q['speedup_vs_peft']:.2f}", f"{q['triton_ms']:.4f}", f"{q['kernel_us']:.2f}",
                      f"{q['floor_us']:.2f}", f"{q['floor_fraction']:.2f}"])  # fmt: skip
    for g in result.get("graph_capture", []):
        lines.append(f"- {g['case']}: " + (g["skipped"] if "skipped" in g else "same as eager" if g["ok"] else "FAILED " + g["error"]))
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
        result["main_loop_gap"] = main_loop_gap(device, backends, args.quick, rounds=1 if args.quick else 3)
        result["graph_capture"] = graph_capture(device, backends)
        result["qlora"] = qlora_timings(device, backends, args.quick, rounds=1 if args.quick else 3)
        result["multi"] = multi_timings(device, backends, args.quick, rounds=1 if args.quick else 3)
        result["dora"] = dora_timings(device, backends, args.quick, rounds=1 if args.quick else 3)
        result["cuda_extension"] = cuda_extension(device, args.quick, rounds=1 if args.quick else 3)
    except Exception:
        result["crash"] = traceback.format_exc()
        result.setdefault("numerics", [])
        result.setdefault("timings", [])
        result.setdefault("ratios", [])
        result.setdefault("main_loop_gap", [])
        result.setdefault("graph_capture", [])
        result.setdefault("qlora", [])
        result.setdefault("multi", [])
        result.setdefault("dora", [])
        result.setdefault("cuda_extension", {"skipped": "the check crashed before it"})
    result["seconds"] = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = to_markdown(result)
    (args.out / "gpu_check.md").write_text(table + "\n")
    if "crash" in result:
        print(result["crash"], file=sys.stderr)
    print(table)
    failed = (not all(c["ok"] for c in result["numerics"]) or any("error" in g for g in result["main_loop_gap"])
              or any("error" in g for g in result["graph_capture"]) or any("error" in g for g in result["qlora"])
              or any("error" in g for g in result["multi"]) or any("error" in g for g in result["dora"])
              or not all(c.get("ok") for c in result["cuda_extension"].get("numerics", []))
              or any("error" in g for g in result["cuda_extension"].get("timings", [])))  # fmt: skip
    return 1 if "crash" in result or failed else 0


if __name__ == "__main__":
    sys.exit(main())
