"""How kernels are launched: a tuned config per shape bucket on a GPU, one fixed config under the Triton
interpreter."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import triton

__all__ = ["Tunable", "interpreting", "dot_precision", "rank_block", "SUPPORTED_TRITON", "triton_version",
           "unsupported_triton", "cdiv", "next_power_of_2", "m_bucket", "capability", "sm_count", "save_tuning", "load_tuning", "AUTOTUNE_ENV"]  # fmt: skip

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
    low = SUPPORTED_TRITON[0]
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


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), in plain Python, as ``cdiv``."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for launch grids. Plain Python: ``triton.cdiv`` and ``triton.next_power_of_2`` are jitted
    functions whose Python call costs more host time than the arithmetic, several times per launch."""
    return -(-a // b)


def rank_block(rank: int, most: int = 256) -> int:
    """The rank as a tile dimension: a power of two, at least 16 (``tl.dot`` needs every dimension >= 16)
    and at most ``most`` (larger ranks loop over tiles). Lanes past ``rank`` are masked to zero in
    registers; nothing is padded in memory."""
    return min(max(16, next_power_of_2(rank)), most)


# How a launch picks its config on a GPU, the first time a (kernel, shape bucket, flags) is seen:
# "tune" (default) times every candidate config on the call's own tensors and keeps the fastest; "heuristic"
# takes the first candidate (each kernel lists its configs best-first for large problems), with no timing.
AUTOTUNE_ENV = "FASTLORA_AUTOTUNE"
AUTOTUNE_MODES = ("tune", "heuristic")


def m_bucket(m: int) -> int:
    """The bucket a row count M falls in for tuning: the next power of two (M = 1 … 8,192 gives 14 buckets).
    Every config is valid for every M (tiles are masked), so a bucket only groups problems alike enough to
    share their fastest config."""
    return next_power_of_2(m)


_capabilities: dict[int, int] = {}


def capability(device: torch.device) -> int:
    """Compute capability as 10·major + minor (90 for sm_90), asked of the driver once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    arch = _capabilities.get(index)
    if arch is None:
        major, minor = torch.cuda.get_device_capability(index)
        arch = _capabilities[index] = 10 * major + minor
    return arch


_sm_counts: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, asked of the driver once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _sm_counts.get(index)
    if count is None:
        count = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def _autotune_mode() -> str:
    mode = os.environ.get(AUTOTUNE_ENV, "tune")
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"${AUTOTUNE_ENV}: expected one of {list(AUTOTUNE_MODES)}, got {mode!r}")
    return mode


_TUNABLES: dict[str, Tunable] = {}


class Tunable:
    """A kernel with its GPU configs and its interpreter config.

    ``configs(flags, arch, itemsize)`` lists the GPU configs for a launch with the constexpr ``flags`` it
    sets itself (rank tile, dropout, ...), on a GPU of compute capability ``arch`` (90 for sm_90), with
    inputs of ``itemsize`` bytes: what fits in registers and shared memory depends on all three.
    ``tests/test_kernels_compile.py`` compiles every one of them for sm_90 and sm_80.

    ``launch(grid, *args, **flags)`` runs the kernel; ``grid`` maps a config's meta-parameters to the
    launch grid. Under the interpreter ``interpreter_config`` runs (autotuning needs a GPU). On a GPU the
    config comes from a table keyed on (device, flags, itemsize, the ``key`` sizes with M bucketed by
    ``m_bucket``): filled on a bucket's first call ($FASTLORA_AUTOTUNE: "tune" or "heuristic"), saved and
    reloaded with ``save_tuning`` / ``load_tuning``. A launch then costs a dict lookup: no driver query, no
    sorting, no per-call dict building. Launchers pass their flags in a fixed order.

    ``grid(meta)`` is evaluated immediately before each launch with that config (timing runs included):
    launchers may set per-config state there, such as the block shape of a TMA descriptor.
    """

    def __init__(self, kernel, configs: Callable[[dict, int, int], Sequence[triton.Config]], key: list[str],
                 interpreter_config: triton.Config):  # fmt: skip
        self.kernel = kernel
        self.configs = configs
        self.interpreter_config = interpreter_config
        self.key = list(key)
        self._key_index = [kernel.arg_names.index(name) for name in key]
        self.table: dict[tuple, triton.Config] = {}
        self.tunings = 0  # how many times a config was chosen by timing (tests count it)
        _TUNABLES[kernel.__name__] = self

    def table_key(self, args: Sequence, flags: dict, device_index: int, itemsize: int) -> tuple:
        sizes = [args[i] for i in self._key_index]
        if self.key[0] == "M":
            sizes[0] = m_bucket(sizes[0])
        return (device_index, itemsize, *flags.values(), *sizes)

    def choose(self, key: tuple, flags: dict, arch: int, itemsize: int, timer: Callable[[triton.Config], float]
               ) -> triton.Config:  # fmt: skip
        """The config for ``key``: from the table, else chosen now (by ``timer``, the time of one launch
        with a config, in "tune" mode) and kept."""
        config = self.table.get(key)
        if config is None:
            candidates = list(self.configs(flags, arch, itemsize))
            if _autotune_mode() == "heuristic" or len(candidates) == 1:
                config = candidates[0]
            else:
                times = [timer(c) for c in candidates]
                config = candidates[times.index(min(times))]
                self.tunings += 1
            self.table[key] = config
        return config

    def launch(self, grid: Callable[[dict], tuple], *args, **flags) -> None:
        if interpreting():
            cfg = self.interpreter_config
            self.kernel[grid(cfg.kwargs)](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps,
                                          num_stages=cfg.num_stages)  # fmt: skip
            return
        first = next(a for a in args if isinstance(a, torch.Tensor))  # the kernel's main input
        device = first.device
        itemsize = first.element_size()
        key = self.table_key(args, flags, device.index if device.index is not None else torch.cuda.current_device(),
                             itemsize)  # fmt: skip
        config = self.table.get(key)
        if config is None:

            def timer(c: triton.Config) -> float:
                import triton.testing

                return triton.testing.do_bench(lambda: self._run(c, grid, args, flags), warmup=5, rep=20)

            config = self.choose(key, flags, capability(device), itemsize, timer)
        self._run(config, grid, args, flags)

    def _run(self, c: triton.Config, grid, args, flags) -> None:
        # The kernels write every output element exactly once (no atomics, no accumulation into an
        # output), so timing a config by running it on the call's own tensors is harmless.
        self.kernel[grid(c.kwargs)](*args, **flags, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def _config_to_json(c: triton.Config) -> dict:
    return {"kwargs": dict(c.kwargs), "num_warps": c.num_warps, "num_stages": c.num_stages}


def _device_name(index: int) -> str | None:
    return torch.cuda.get_device_name(index) if torch.cuda.is_available() else None


def save_tuning(path) -> None:
    """Write every kernel's chosen configs (this process's tuning) to the JSON file ``path``, with the GPU
    names and Triton version they were tuned on."""
    import json

    names = {i: _device_name(i) for t in _TUNABLES.values() for (i, *_) in t.table}
    data = {"triton": triton.__version__, "devices": {str(i): n for i, n in names.items()},
            "kernels": {name: [[list(k), _config_to_json(c)] for k, c in t.table.items()]
                        for name, t in _TUNABLES.items()}}  # fmt: skip
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def load_tuning(path) -> int:
    """Read a file written by ``save_tuning`` into the tables, so that a job does not tune again. Entries
    for another GPU model (by name, per device index) or another Triton version are refused with
    ValueError. Returns the number of entries loaded."""
    import json

    with open(path) as f:
        data = json.load(f)
    if data.get("triton") != triton.__version__:
        raise ValueError(f"path: tuned with Triton {data.get('triton')}, this is Triton {triton.__version__}")
    for index, name in data.get("devices", {}).items():
        here = _device_name(int(index))
        if here != name:
            raise ValueError(f"path: tuned on device {index} = {name!r}, here it is {here!r}")
    count = 0
    for kernel, entries in data["kernels"].items():
        tunable = _TUNABLES.get(kernel)
        if tunable is None:
            raise ValueError(f"path: unknown kernel {kernel!r}")
        for key, c in entries:
            config = triton.Config(c["kwargs"], num_warps=c["num_warps"], num_stages=c["num_stages"])
            tunable.table[tuple(key)] = config
            count += 1
    return count
