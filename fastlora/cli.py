"""The ``fastlora`` command (also ``python -m fastlora``): ``info``, ``bench`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]

USAGE = """usage: fastlora {info,bench,demo} [options]

  info    versions, devices, and which backend runs where (and why the others don't)
  bench   fastlora against bare F.linear, PEFT and the reference, measured in one process
  demo    LoRA fine-tuning of a small pretrained model, offline: train, save, reload, merge, switch

'fastlora COMMAND --help' describes a command's options."""


def _info(argv: list[str]) -> int:
    from fastlora.env import format_info, info

    parser = argparse.ArgumentParser(prog="fastlora info", description="Versions, devices and backends.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = info()
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        return _info(rest)
    if command == "bench":
        from fastlora.bench import main as bench

        return bench(rest)
    if command == "demo":
        from fastlora.demo import main as demo

        return demo(rest)
    print(f"fastlora: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
