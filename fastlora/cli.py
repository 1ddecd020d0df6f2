"""The ``fastlora`` command: ``fastlora info``."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _info(args: argparse.Namespace) -> int:
    from fastlora.env import format_info, info

    report = info()
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastlora", description="Fused LoRA layers for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, devices, and which backend runs where (and why not)")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    p_info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
