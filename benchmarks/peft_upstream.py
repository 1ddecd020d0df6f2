"""PEFT's own LoRA tests, run on PEFT alone and again with every PEFT model passed through fastlora.accelerate.

Reports the counts of both runs and every test that passes on PEFT alone but fails accelerated, with its
error. Nothing of PEFT is kept in this repository: point ``--peft-src`` at a PEFT source checkout (its
``tests/`` folder is what runs; the PEFT that is imported is the installed one, whose version is reported
beside the checkout's). PEFT's tests need a few packages beyond fastlora's test extras: ``pip install
parameterized datasets diffusers`` (the last two are imported by PEFT's test helpers).

The selection, as PEFT's LoRA tests: ``tests/test_custom_models.py -k lora`` and all of ``tests/test_mixed.py``
(``--select`` replaces it). The accelerated run loads ``benchmarks/peft_accelerate_plugin.py`` with ``-p``,
which wraps ``BaseTuner.inject_adapter`` so that every model PEFT builds or extends is accelerated.

Usage:
    python benchmarks/peft_upstream.py --peft-src /path/to/peft [--out benchmarks/results/peft_upstream]
        [--timeout 2400] [--select "tests/test_mixed.py" ...] [--pytest-args "-x"] [--offline] [--raw DIR]
        [--peft-ref "huggingface/peft@<commit>"]
        [--plain-xml FILE] [--accelerated-xml FILE]   # reuse earlier runs' JUnit files instead of running

Writes ``result.json`` and ``result.md`` to ``--out``, the JUnit files and pytest logs of each run to ``--raw``
(default: a new temporary folder, printed), prints the summary, and exits 1 if any test passes on PEFT alone
but fails accelerated. ``--offline`` sets ``HF_HUB_OFFLINE=1`` for machines without the Hub (the two tests
that load a Hub model then fail at once in both runs instead of after network timeouts).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_SELECT = ["tests/test_custom_models.py -k lora", "tests/test_mixed.py"]


def run_pytest(peft_src: Path, selection: str, xml: Path, log, accelerated: bool, timeout: float, extra: list[str],
               offline: bool):  # fmt: skip
    """One pytest run of ``selection`` in ``peft_src``; returns (returncode, seconds)."""
    env = dict(os.environ)
    if offline:  # tests that load a model from the Hub fail at once instead of waiting on the network
        env["HF_HUB_OFFLINE"] = "1"
    # fastlora (this checkout) and the plugin importable; PEFT's checkout has a src/ layout, so the installed
    # peft is the one imported.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-rN",
           f"--junitxml={xml}"]  # fmt: skip
    if accelerated:
        cmd += ["-p", "peft_accelerate_plugin"]
    cmd += shlex.split(selection) + extra
    log.write(f"$ cd {peft_src} && {shlex.join(cmd)}\n")
    log.flush()
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=peft_src, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
        log.write(f"\n[peft_upstream] timed out after {timeout:.0f} s\n")
    return rc, time.perf_counter() - start


def read_junit(paths: list[Path]) -> dict[str, dict]:
    """test id -> {"outcome": passed|failed|error|skipped, "message": ...} from JUnit files."""
    results = {}
    for path in paths:
        if not path.exists():
            continue
        for case in ET.parse(path).getroot().iter("testcase"):
            test_id = f"{case.get('classname')}::{case.get('name')}"
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    message = (node.get("message") or node.text or "").strip()
                    break
            results[test_id] = {"outcome": outcome, "message": message}
    return results


def counts(results: dict[str, dict]) -> dict[str, int]:
    out = {"total": len(results), "passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for r in results.values():
        out[r["outcome"]] += 1
    return out


def first_line(message: str, width: int = 300) -> str:
    line = next((ln.strip() for ln in message.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[: width - 1] + "…"


def installed_versions() -> dict[str, str]:
    code = "import peft, torch, transformers, fastlora\nfor m in (peft, torch, transformers, fastlora): print(m.__version__)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env)
    peft, torch, transformers, fastlora = out.stdout.split() if out.returncode == 0 else ["?"] * 4
    return {"peft": peft, "torch": torch, "transformers": transformers, "fastlora": fastlora}


def checkout_description(peft_src: Path, ref: str) -> dict[str, str]:
    init = peft_src / "src" / "peft" / "__init__.py"
    version = next((ln.split("=")[1].strip().strip("\"'") for ln in init.read_text().splitlines()
                    if ln.startswith("__version__")), "?") if init.exists() else "?"  # fmt: skip
    commit = subprocess.run(["git", "-C", str(peft_src), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = commit.stdout.strip() if commit.returncode == 0 else ""
    return {"path": str(peft_src), "version": version, "commit": commit or ref or "unknown (not a git checkout)"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peft-src", required=True, type=Path, help="a PEFT source checkout (with tests/)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "peft_upstream",
                        help="where result.json and result.md go (default: %(default)s)")  # fmt: skip
    parser.add_argument("--raw", type=Path, help="where the JUnit files and logs go (default: a new temporary folder)")
    parser.add_argument("--peft-ref", default="", help="what the checkout is, when it is not a git checkout")
    parser.add_argument("--select", nargs="+", default=DEFAULT_SELECT,
                        help="pytest selections, each run on its own (default: %(default)s)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=2400, help="seconds for each pytest run")
    parser.add_argument("--pytest-args", default="", help="more pytest arguments for every run")
    parser.add_argument("--offline", action="store_true",
                        help="HF_HUB_OFFLINE=1: on a machine without the Hub, tests that download fail at once")  # fmt: skip
    parser.add_argument("--plain-xml", type=Path, nargs="*", help="reuse these JUnit files for the plain run")
    parser.add_argument("--accelerated-xml", type=Path, nargs="*", help="reuse these for the accelerated run")
    args = parser.parse_args(argv)

    peft_src = args.peft_src.resolve()
    if not (peft_src / "tests" / "test_custom_models.py").exists():
        parser.error(f"--peft-src: {peft_src} has no tests/test_custom_models.py (not a PEFT source checkout?)")
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.plain_xml and args.accelerated_xml):
        raw = args.raw or Path(tempfile.mkdtemp(prefix="peft_upstream-"))
        raw.mkdir(parents=True, exist_ok=True)
        print(f"[peft_upstream] JUnit files and logs in {raw}", flush=True)
    extra = shlex.split(args.pytest_args)

    runs, seconds, returncodes, plugin = {}, {}, {}, []
    for mode, reuse in (("plain", args.plain_xml), ("accelerated", args.accelerated_xml)):
        if reuse:
            runs[mode] = read_junit(reuse)
            continue
        xmls, seconds[mode], returncodes[mode] = [], 0.0, []
        with open(raw / f"{mode}.log", "w") as log:
            for i, selection in enumerate(args.select):
                xml = raw / f"{mode}-{i}.xml"
                xml.unlink(missing_ok=True)
                print(f"[peft_upstream] {mode}: {selection} ...", flush=True)
                rc, secs = run_pytest(peft_src, selection, xml, log, mode == "accelerated", args.timeout, extra,
                                      args.offline)  # fmt: skip
                seconds[mode] += secs
                returncodes[mode].append(rc)
                xmls.append(xml)
                print(f"[peft_upstream] {mode}: {selection}: exit {rc}, {secs:.0f} s", flush=True)
        runs[mode] = read_junit(xmls)
        if mode == "accelerated":  # the plugin's own lines: how much of the run went through the fused op
            log_lines = (raw / f"{mode}.log").read_text().splitlines()
            plugin = [ln for ln in log_lines if ln.startswith("fastlora-accelerate:")]

    plain, accel = runs["plain"], runs["accelerated"]
    regressions = sorted(t for t, r in plain.items() if r["outcome"] == "passed" and t in accel
                         and accel[t]["outcome"] in ("failed", "error"))  # fmt: skip
    fixed = sorted(t for t, r in plain.items() if r["outcome"] in ("failed", "error")
                   and accel.get(t, {}).get("outcome") == "passed")  # fmt: skip
    missing = sorted(set(plain) ^ set(accel))
    result = {
        "peft_checkout": checkout_description(peft_src, args.peft_ref),
        "installed": installed_versions(),
        "selection": args.select,
        "pytest_args": extra,
        "hf_hub_offline": args.offline,
        "counts": {"plain": counts(plain), "accelerated": counts(accel)},
        "seconds": seconds,
        "returncodes": returncodes,
        "plugin": plugin,
        "pass_plain_fail_accelerated": [{"test": t, "error": first_line(accel[t]["message"])} for t in regressions],
        "fail_plain_pass_accelerated": fixed,
        "fail_plain": [{"test": t, "error": first_line(r["message"])} for t, r in sorted(plain.items())
                       if r["outcome"] in ("failed", "error")],  # fmt: skip
        "in_one_run_only": missing,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")

    c = result["counts"]
    lines = [
        "# PEFT's LoRA tests, PEFT alone and through fastlora.accelerate",
        "",
        f"PEFT tests from {result['peft_checkout']['path']} (version {result['peft_checkout']['version']}, commit "
        f"{result['peft_checkout']['commit'] or 'unknown'}); installed: "
        + ", ".join(f"{k} {v}" for k, v in result["installed"].items()),
        f"Selection: {' + '.join(args.select)}" + (f"; pytest args {shlex.join(extra)}" if extra else ""),
        "",
        "| run | total | passed | failed | error | skipped |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("plain", "accelerated"):
        k = c[mode]
        lines.append(f"| {mode} | {k['total']} | {k['passed']} | {k['failed']} | {k['error']} | {k['skipped']} |")
    if seconds:
        lines += ["", "Time: " + ", ".join(f"{mode} {secs:.0f} s" for mode, secs in seconds.items())]
    if plugin:
        lines += ["", "Accelerated run, per selection: " + "; ".join(ln.split(":", 1)[1].strip() for ln in plugin)]
    lines += ["", f"Pass on PEFT alone, fail accelerated: {len(regressions)}"]
    lines += [f"- `{t}`: {first_line(accel[t]['message'])}" for t in regressions]
    if fixed:
        lines += ["", f"Fail on PEFT alone, pass accelerated: {len(fixed)}"] + [f"- `{t}`" for t in fixed]
    # What fails on PEFT alone here (a checkout newer or older than the installed PEFT, tests that need the Hub,
    # ...), grouped by test function and error: not fastlora's, but worth knowing.
    groups = Counter((e["test"].split("::")[-1].split("[")[0], e["error"][:160]) for e in result["fail_plain"])
    if groups:
        lines += ["", f"Fail on PEFT alone: {len(result['fail_plain'])}, by test and error:"]
        lines += [f"- {n} × `{name}`: {error}" for (name, error), n in groups.most_common()]
    if missing:
        lines += ["", f"In one run only: {len(missing)}"] + [f"- `{t}`" for t in missing[:50]]
    text = "\n".join(lines) + "\n"
    (args.out / "result.md").write_text(text)
    print(text)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
