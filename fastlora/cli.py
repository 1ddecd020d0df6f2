"""The ``fastlora`` command (also ``python -m fastlora``): ``info``, ``bench`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]

USAGE = """usage: fastlora {info,bench,demo,build-cuda} [options]

  info    versions, devices, and which backend runs where (and why the others don't)
  build-cuda  build the CUDA extension (csrc/) just in time into the cache: nvcc, ninja, pybind11
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


def _build_cuda(argv: list[str]) -> int:
    from fastlora import cuda_build, cuda_ext

    parser = argparse.ArgumentParser(prog="fastlora build-cuda", description="Build the CUDA extension (csrc/) "
                                     "with nvcc and ninja into fastlora's cache; later imports find it there.")  # fmt: skip
    parser.add_argument("--archs", nargs="+", default=list(cuda_build.ARCHS),
                        help="compute capabilities to compile machine code for (PTX for the last)")  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    try:
        module = cuda_ext.build(archs=tuple(args.archs), verbose=args.verbose)
    except cuda_build.BuildError as err:
        print(f"fastlora build-cuda: {err}", file=sys.stderr)
        return 1
    reason = module.unavailable_reason()
    print(f"built {module.__file__} for {module.ARCHS}; " + ("it runs here" if not reason else f"it cannot run here: {reason}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        return _info(rest)
    if command == "build-cuda":
        return _build_cuda(rest)
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
