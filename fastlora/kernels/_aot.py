"""Ahead-of-time compilation of every kernel variant for a GPU that need not be present.

``variants()`` lists each kernel with each config its launcher can pick and each flag it can set;
``compile_variant`` compiles one for a target (``GPUTarget("cuda", 90, 32)`` is an H100/H200) and reports
what the interpreter cannot show: shared memory, registers, spills, and whether the PTX uses wgmma and TMA
(``cp.async.bulk.tensor``).
``tests/test_kernels_compile.py`` runs this on every CI run; ``python -m fastlora.kernels._aot`` prints a
table.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastlora.kernels import lora_expand, lora_linear, lora_multi, lora_shrink, weight_tile
from fastlora.kernels._launch import Tunable

__all__ = ["Variant", "Report", "variants", "compile_variant", "SHARED_MEMORY_LIMIT"]

SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes a block may use (sm_90: H100/H200, sm_80: A100)

_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
# (c_ptr and d_ptr: DoRA's column scale and its unscaled output, in the data's dtype.)
_DATA_POINTERS = {"x_ptr", "w_ptr", "bias_ptr", "g_ptr", "s_ptr", "y_ptr", "dx_ptr", "c_ptr", "d_ptr"}
_WEIGHT_TILE_POINTERS = ("w_ptr", "absmax_ptr", "absmax_code_ptr", "absmax_scale_ptr", "absmax_offset_ptr", "nf4_ptr")
_ADAPTER_POINTERS = {"a_ptr", "b_ptr"}
_FP32_POINTERS = {"ds_ptr", "db_ptr", "da_ptr", "out_ptr", "gd_ptr"}  # d_shrink and the reductions' fp32 outputs
# Mixed-adapter batches: each row's adapter, the per-adapter tables (kernels/lora_multi.py), sorted rows.
_MULTI_POINTERS = {"idx_ptr": "*i64", "rank_ptr": "*i32", "scale_ptr": "*fp32", "thr_ptr": "*i64",
                   "inv_ptr": "*fp32", "coef_ptr": "*fp32", "order_ptr": "*i64", "offsets_ptr": "*i64"}  # fmt: skip
# The segment sums' operands: x or G on the left, S or dS on the right (typed as the data).
_SEGMENT_POINTERS = {"l_ptr", "r_ptr"}


@dataclass(frozen=True)
class Variant:
    tunable: Tunable
    config: triton.Config
    dtype: str  # "float16" | "bfloat16" | "float32"
    adapter_dtype: str
    flags: tuple[tuple[str, object], ...]
    gemm: bool  # a tensor-core GEMM: must show wgmma on sm_90 for 16-bit inputs and tf32
    contiguous: bool = True  # specialised as a launch on contiguous tensors is (see _specialisation)

    @property
    def tma(self) -> bool:
        """A kernel whose inputs arrive through TMA descriptors (its arguments named ``*_desc``)."""
        return any(name.endswith("_desc") for name in self.tunable.kernel.arg_names)

    @property
    def name(self) -> str:
        kw = ",".join(f"{k}={v}" for k, v in (*self.config.kwargs.items(), *self.flags))
        cfg = f"w{self.config.num_warps}s{self.config.num_stages}"
        layout = "" if self.contiguous else ",strided"
        return f"{self.tunable.kernel.__name__}[{kw},{cfg}]({self.dtype},A/B {self.adapter_dtype}{layout})"


@dataclass
class Report:
    """What compiling one variant showed (plain fields: it crosses process boundaries)."""

    name: str
    contiguous: bool
    gemm: bool
    block_m: int
    arch: int
    shared: int
    registers: int
    spill_bytes: int
    wgmma: bool
    tma_kernel: bool  # launched with TMA descriptors: its PTX must load through TMA
    tma: bool  # the PTX has cp.async.bulk.tensor (a TMA copy)


def _specialisation(kernel, contiguous: bool) -> tuple[dict[str, int], dict[tuple[int], list]]:
    """What a launch on contiguous, 16-aligned tensors gives the compiler: Triton turns an integer argument
    equal to 1 into a constant (each tensor's innermost stride) and marks pointers and multiples of 16 as
    16-divisible. Compiling without this (strided tensors) needs full pointer tensors and more registers."""
    if not contiguous:
        return {}, {}
    names = kernel.arg_names
    strides = [n for n in names if n.startswith("stride_")]
    inner = {n for n in strides if not any(o[:-1] == n[:-1] and names.index(o) > names.index(n) for o in strides)}
    divisible = [n for n in names if n.endswith("_ptr") or (n in strides and n not in inner) or n in ("N", "K")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    return {n: 1 for n in inner}, attrs


def _boxes(variant: Variant) -> dict[str, list[int]]:
    """The box of each descriptor argument under the variant's config, as its launcher sets it."""
    boxes = lora_linear.TMA_BOXES.get(variant.tunable)
    return boxes(variant.config.kwargs) if boxes else {}


def _weight_pointers(flags: dict, dtype: str) -> dict[str, str]:
    """The types of the weight-tile arguments (kernels/weight_tile.py): an NF4 weight's codes and tables, or
    for a dense weight W itself and unused pointers at the main input (what ``weight_args`` passes)."""
    data = "*" + _TRITON_TYPES[dtype]
    if flags.get("WEIGHT_FORMAT", weight_tile.DENSE) == weight_tile.DENSE:
        return dict.fromkeys(_WEIGHT_TILE_POINTERS, data)
    return {**dict.fromkeys(_WEIGHT_TILE_POINTERS, "*fp32"), "w_ptr": "*u8",
            "absmax_ptr": "*u8" if flags["DOUBLE_QUANT"] else "*fp32"}  # fmt: skip


def _signature(kernel, dtype: str, adapter_dtype: str, boxes: dict[str, list[int]], flags: dict) -> dict[str, str]:
    sig = {}
    weight = _weight_pointers(flags, dtype)
    for i, name in enumerate(kernel.arg_names):
        if i in kernel.constexprs:
            sig[name] = "constexpr"
        elif name in weight:
            sig[name] = weight[name]
        elif name in _MULTI_POINTERS:
            sig[name] = _MULTI_POINTERS[name]
        elif name in _SEGMENT_POINTERS:
            sig[name] = "*" + _TRITON_TYPES[dtype]
        elif name in boxes:  # what the JIT makes of a host-side TensorDescriptor
            sig[name] = f"tensordesc<{_TRITON_TYPES[dtype]}{boxes[name]}>"
        elif name in _DATA_POINTERS:
            sig[name] = "*" + _TRITON_TYPES[dtype]
        elif name in _ADAPTER_POINTERS:
            sig[name] = "*" + _TRITON_TYPES[adapter_dtype]
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name == "seed_ptr":
            sig[name] = "*i64"
        elif name in ("scaling", "inv_keep"):
            sig[name] = "fp32"
        elif name == "threshold":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


# Each kernel with the flags its launcher can set; the last value of each is the heaviest (most registers).
# The pointer GEMMs three times: with a dense W, and with an NF4 W dequantised in their main loop, element by
# element and (rows of whole blocks) by row tiles. Blocks of 64, bitsandbytes' default: the block size
# changes only shifts.
# MULTI (a mixed-adapter batch's prologue, kernels/lora_multi.py) last: its loop over a block's adapters is
# the heavier prologue.
_DENSE = {"WEIGHT_FORMAT": [weight_tile.DENSE], "QBLOCK": [1], "DOUBLE_QUANT": [False], "NF4_ROWS": [False],
          "MULTI": [False, True]}  # fmt: skip
_NF4 = {"WEIGHT_FORMAT": [weight_tile.NF4], "QBLOCK": [64], "DOUBLE_QUANT": [False, True], "NF4_ROWS": [False],
        "MULTI": [False, True]}  # fmt: skip
_NF4_ROWS = {**_NF4, "NF4_ROWS": [True]}
# DoRA's epilogue (DORA) is launched on a dense W with one adapter only.
_NO_DORA = {"DORA": [False]}
_KERNELS = [
    (lora_linear._FWD, {"HAS_BIAS": [False, True], **_NO_DORA, **_DENSE, "BLOCK_R": [lora_linear.PROLOGUE_BLOCK_R]},
     True),  # fmt: skip
    (lora_linear._FWD, {"HAS_BIAS": [False, True], "DORA": [True], **_DENSE, "MULTI": [False],
                        "BLOCK_R": [lora_linear.PROLOGUE_BLOCK_R]}, True),  # fmt: skip
    (lora_linear._BWD, {"DROPOUT": [False, True], **_NO_DORA, **_DENSE, "BLOCK_R": [lora_linear.PROLOGUE_BLOCK_R]},
     True),  # fmt: skip
    (lora_linear._BWD, {"DROPOUT": [False], "DORA": [True], **_DENSE, "MULTI": [False],
                        "BLOCK_R": [lora_linear.PROLOGUE_BLOCK_R]}, True),  # fmt: skip
    (lora_linear._FWD, {"HAS_BIAS": [False, True], **_NO_DORA, **_NF4, "BLOCK_R": [lora_linear.PROLOGUE_BLOCK_R]},
     True),  # fmt: skip
    (lora_linear._BWD, {"DROPOUT": [False, True], **_NO_DORA, **_NF4, "BLOCK_R": [lora_linear.PROLOGUE_BLOCK_R]},
     True),  # fmt: skip
    (lora_linear._FWD, {"HAS_BIAS": [False, True], **_NO_DORA, **_NF4_ROWS,
                        "BLOCK_R": [lora_linear.PROLOGUE_BLOCK_R]}, True),  # fmt: skip
    (lora_linear._BWD, {"DROPOUT": [False, True], **_NO_DORA, **_NF4_ROWS,
                        "BLOCK_R": [lora_linear.PROLOGUE_BLOCK_R]}, True),  # fmt: skip
    (lora_linear._FWD_TMA, {"HAS_BIAS": [False, True], **_NO_DORA, "MULTI": [False, True],
                            "BLOCK_R": [lora_linear.PROLOGUE_BLOCK_R]}, True),  # fmt: skip
    (lora_linear._FWD_TMA, {"HAS_BIAS": [False, True], "DORA": [True], "MULTI": [False],
                            "BLOCK_R": [lora_linear.PROLOGUE_BLOCK_R]}, True),  # fmt: skip
    (lora_linear._BWD_TMA, {"DROPOUT": [False, True], **_NO_DORA, "MULTI": [False, True],
                            "BLOCK_R": [lora_linear.PROLOGUE_BLOCK_R]}, True),  # fmt: skip
    (lora_linear._BWD_TMA, {"DROPOUT": [False], "DORA": [True], "MULTI": [False],
                            "BLOCK_R": [lora_linear.PROLOGUE_BLOCK_R]}, True),  # fmt: skip
    (lora_shrink._FWD, {"DROPOUT": [False, True], "BLOCK_R": [16, 32, lora_shrink.FWD_MAX_BLOCK_R]}, False),
    (lora_shrink._BWD, {"DROPOUT": [False, True], "BLOCK_R": [16, 32, 64, 128, 256]}, False),
    (lora_expand._BWD, {"DORA": [False], "BLOCK_R": [16, 32, 64, 128, 256]}, False),
    (lora_expand._BWD, {"DORA": [True], "BLOCK_R": [16, 32, 64, lora_expand.DORA_MAX_BLOCK_R]}, False),
    (lora_multi._SHRINK, {"DROPOUT": [False, True], "BLOCK_R": [16, 32, lora_multi.MAX_BLOCK_R]}, False),
    (lora_multi._DS, {"BLOCK_R": [16, 32, lora_multi.MAX_BLOCK_R]}, False),
    (lora_multi._SEGMENT, {"DROPOUT": [False, True], "BLOCK_R": [16, 32, 64, 128, 256]}, False),
]


def _extra_constexprs(tunable: Tunable, flags: dict) -> dict:
    if tunable is lora_expand._BWD:  # its row block is fixed by the rank, not autotuned
        return {"BLOCK_M": lora_expand._block_m(flags["BLOCK_R"], flags["DORA"])}
    return {}


def variants(arch: int) -> list[Variant]:
    """What CI compiles for sm_``arch``.

    sm_90: every config of every kernel in each dtype, with fp32 adapters (converted in registers: the
    heavier case) and the heaviest flags that config can be launched with (largest rank tile, dropout on);
    then every other flag combination, adapters in the base dtype, and strided (unspecialised) tensors,
    each on the kernel's first config. sm_80: every config with its heaviest flags, in bf16 (the GEMMs' TMA
    kernels have none: they launch on sm_90 and newer only).
    """
    dtypes = ("float16", "bfloat16", "float32") if arch >= 90 else ("bfloat16",)
    out = []
    for tunable, flag_space, gemm in _KERNELS:
        combos = [dict(zip(flag_space, values)) for values in itertools.product(*flag_space.values())]
        for dtype in dtypes:
            itemsize = _ITEMSIZE[dtype]
            heaviest_for: dict[int, dict] = {}  # config index -> heaviest flags that launch it
            configs: list[triton.Config] = []
            for flags in combos:  # ordered lightest to heaviest: later combos overwrite
                for config in tunable.configs(flags, arch, itemsize):
                    if config not in configs:
                        configs.append(config)
                    heaviest_for[configs.index(config)] = flags
            for i, config in enumerate(configs):
                out.append(Variant(tunable, config, dtype, "float32", tuple(heaviest_for[i].items()), gemm))
        if arch < 90:
            continue
        for flags in combos[:-1]:
            first = tunable.configs(flags, arch, 2)[0]
            out.append(Variant(tunable, first, "bfloat16", "float32", tuple(flags.items()), gemm))
        heaviest = combos[-1]
        first = tunable.configs(heaviest, arch, 4)[0]
        for dtype in dtypes:
            out.append(Variant(tunable, first, dtype, dtype, tuple(heaviest.items()), gemm))
        out.append(Variant(tunable, first, "float16", "float32", tuple(heaviest.items()), gemm, contiguous=False))
    return out



def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) from the cubin, via the cuobjdump Triton ships (works on cached kernels,
    whose ptxas report is not rerun). A Triton kernel has no stack of its own: stack bytes are spills."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(m.group(1)), int(m.group(2))


def compile_variant(variant: Variant, arch: int) -> Report:
    """Compile ``variant`` for sm_``arch`` and read its resources."""
    flags = dict(variant.flags)
    kernel = variant.tunable.kernel
    precision = "tf32" if variant.dtype == "float32" else "ieee"
    ones, attrs = _specialisation(kernel, variant.contiguous)
    constexprs = {**variant.config.kwargs, **flags, **_extra_constexprs(variant.tunable, flags),
                  "DOT_PRECISION": precision, **ones}  # fmt: skip
    signature = _signature(kernel, variant.dtype, variant.adapter_dtype, _boxes(variant), flags)
    signature.update({n: "constexpr" for n in ones})
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": variant.config.num_warps, "num_stages": variant.config.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    registers, stack = _resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return Report(variant.name, variant.contiguous, variant.gemm, variant.config.kwargs.get("BLOCK_M", 0), arch,
                  compiled.metadata.shared, registers, stack, "wgmma" in ptx, variant.tma,
                  "cp.async.bulk.tensor" in ptx)  # fmt: skip


def main() -> int:
    for arch in (90, 80):
        for variant in variants(arch):
            r = compile_variant(variant, arch)
            print(f"sm_{arch} regs {r.registers:3d} spill {r.spill_bytes:4d} smem {r.shared:6d} "
                  f"wgmma {int(r.wgmma)} tma {int(r.tma)} {variant.name}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
