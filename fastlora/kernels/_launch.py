"""How kernels are launched: autotuned on a GPU, one fixed config under the Triton interpreter."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import triton

__all__ = ["Tunable", "interpreting", "dot_precision", "rank_block", "SUPPORTED_TRITON", "triton_version",
           "unsupported_triton"]  # fmt: skip

# The Triton versions CI checks (pyproject.toml's `triton` extra says the same): [3.4, 3.10). Older ones are
# refused at run time, not only at install time, because a Triton that came with torch wins over the extra:
# 3.2 drew 64-bit dropout numbers for int64 offsets, 3.1's interpreter cannot run the mask at all, and
# their compilers give other register counts than the ones our configs were checked with.
SUPPORTED_TRITON = ((3, 4), (3, 10))


def triton_version() -> tuple[int, int]:
    """The installed Triton's (major, minor)."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def unsupported_triton() -> str | None:
    """Why the installed Triton cannot run fastlora's kernels, or None."""
    low, high = SUPPORTED_TRITON
    if triton_version() < low:
        return f"Triton {triton.__version__} is older than {low[0]}.{low[1]}, the oldest version fastlora is tested with"
    return None


def interpreting() -> bool:
    """True when kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for fp32 inputs, following PyTorch's own switch:
    ``torch.set_float32_matmul_precision("highest")`` (PyTorch's default) gives exact "ieee" dots; "high" or
    "medium" allow "tf32" (about 3e-4 relative error, ~8x the throughput). fp16/bf16 dots ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def rank_block(rank: int, most: int = 256) -> int:
    """The rank as a tile dimension: a power of two, at least 16 (``tl.dot`` needs every dimension >= 16)
    and at most ``most`` (larger ranks loop over tiles). Lanes past ``rank`` are masked to zero in
    registers; nothing is padded in memory."""
    return min(max(16, triton.next_power_of_2(rank)), most)


class Tunable:
    """A kernel with its GPU configs and its interpreter config.

    ``configs(flags, arch, itemsize)`` lists the GPU configs for a launch with the constexpr ``flags`` it
    sets itself (rank tile, dropout, ...), on a GPU of compute capability ``arch`` (90 for sm_90), with
    inputs of ``itemsize`` bytes: what fits in registers and shared memory depends on all three.
    ``tests/test_kernels_compile.py`` compiles every one of them for sm_90 and sm_80.

    ``launch(grid, *args, **flags)`` runs the kernel; ``grid`` maps a config's meta-parameters to the
    launch grid. On a GPU the configs are autotuned, keyed on ``key``; under the interpreter
    ``interpreter_config`` runs, since autotuning needs a GPU driver.
    """

    def __init__(self, kernel, configs: Callable[[dict, int, int], Sequence[triton.Config]], key: list[str],
                 interpreter_config: triton.Config):  # fmt: skip
        self.kernel = kernel
        self.configs = configs
        self.interpreter_config = interpreter_config
        self._key = key
        self._tuned: dict[tuple, object] = {}

    def launch(self, grid: Callable[[dict], tuple], *args, **flags) -> None:
        if interpreting():
            cfg = self.interpreter_config
            self.kernel[grid(cfg.kwargs)](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps,
                                          num_stages=cfg.num_stages)  # fmt: skip
            return
        first = next(a for a in args if isinstance(a, torch.Tensor))  # the kernel's main input
        major, minor = torch.cuda.get_device_capability(first.device)
        signature = (major, minor, first.element_size(), *sorted(flags.items()))
        tuned = self._tuned.get(signature)
        if tuned is None:
            configs = list(self.configs(flags, 10 * major + minor, first.element_size()))
            tuned = self._tuned[signature] = triton.autotune(configs, key=self._key)(self.kernel)
        tuned[grid](*args, **flags)
