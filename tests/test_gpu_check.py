"""benchmarks/gpu_check.py stays runnable: its quick mode runs every part of it on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path), "--quick"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "crash" not in result
    assert result["numerics"] and all(c["ok"] for c in result["numerics"])
    rows = {(r["variant"], r["dropout"]): r for r in result["timings"]}
    for name in ("F.linear (floor)", "PEFT", "reference", "reference (compiled)", "fastlora torch"):
        for p in (0.0, 0.05):
            assert "fwd_bwd_ms" in rows[name, p], rows[name, p]
    assert len(result["ratios"]) == 2 and all(q["speedup_vs_peft"] for q in result["ratios"])
    gap = result["main_loop_gap"]  # the GEMMs at rank 0 against PyTorch's: checked, timed, main loop named
    assert gap and not any("error" in g for g in gap), gap
    if "triton" in result["backends"]:
        assert [g["gemm"] for g in gap] == ["Y = x·Wᵀ", "dX = G·W"]
        assert all(g["ratio"] > 0 and g["main_loop"] in ("TMA", "pointers") for g in gap), gap
    multi = result["multi"]  # mixed-adapter batches: checked against the torch backend, then timed
    assert multi and all("multi_fwd_ms" in r and r["speedup_vs_peft"] > 0 for r in multi), multi
    capture = result["graph_capture"]  # a GPU-only part: off a GPU, one row says it was not run and why
    assert capture and all("skipped" in g or g["ok"] for g in capture), capture
    dora = result["dora"]  # DoRA: checked against PEFT's layer, then timed
    assert dora and all("fastlora_ms" in r and r["speedup_vs_peft"] > 0 for r in dora), dora
    ext = result["cuda_extension"]  # GPU-only: off a GPU it says it was not run and why
    assert "skipped" in ext or (all(c["ok"] for c in ext["numerics"]) and ext["timings"]), ext
    assert proc.stdout.rstrip().splitlines()[-1].startswith("Targets:")  # the table comes last
