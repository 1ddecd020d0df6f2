"""The outside-in sweep of the public API (``benchmarks/api_sweep.py``: 325 bad inputs, 89 extreme but
valid ones) holds: every bad input gets a clear error with the model unchanged, every valid one works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_api_sweep_all_clear(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the sweep expects a GPU-less triton
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "api_sweep.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["cases"] >= 400
    wrong = [r for r in result["results"] if (r["kind"], r["class"]) not in (("bad", "clear error"), ("valid", "ok"))]
    assert not wrong, "\n".join(f"{r['name']} ({r['kind']}): {r['class']}: {r['exception']}: {str(r['message'])[:200]}"
                                for r in wrong)  # fmt: skip
