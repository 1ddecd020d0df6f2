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
    variants = result["timings"][0]["results"]
    for name in ("F.linear (floor)", "PEFT LoRA Linear", "reference (torch.compile)", "fastlora torch"):
        assert "fwd_bwd_ms" in variants[name], (name, variants[name])
    assert proc.stdout.rstrip().splitlines()[-1].startswith("Targets:")  # the table comes last
