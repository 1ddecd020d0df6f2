"""Ahead-of-time compilation of every Triton kernel variant for sm_90 (H100/H200) and sm_80 (A100).

What the interpreter cannot show: each config compiles for the real targets, fits in shared memory, does
not spill registers, the GEMMs use Hopper's wgmma, and their sm_90 kernels load through TMA. No GPU is
needed. Compiling runs in a process pool, so it does not need TRITON_INTERPRET either way (the pool's
workers compile, they launch nothing).
"""

from __future__ import annotations

import multiprocessing
import os

import pytest

triton = pytest.importorskip("triton")

from fastlora.kernels._aot import SHARED_MEMORY_LIMIT, compile_variant, variants  # noqa: E402


def _compile(job):
    arch, index = job
    variant = variants(arch)[index]
    try:
        return variant.name, compile_variant(variant, arch), None
    except Exception as err:  # reported with its variant below
        return variant.name, None, f"{type(err).__name__}: {str(err)[:2000]}"


@pytest.fixture(scope="module")
def reports():
    jobs = [(arch, i) for arch in (90, 80) for i in range(len(variants(arch)))]
    # spawn: the workers import triton afresh, without the interpreter flag the test process may carry.
    env = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with multiprocessing.get_context("spawn").Pool(max(1, min(4, os.cpu_count() or 1))) as pool:
            results = pool.map(_compile, jobs, chunksize=1)
    finally:
        if env is not None:
            os.environ["TRITON_INTERPRET"] = env
    return [(arch, *r) for (arch, _), r in zip(jobs, results)]


def test_every_variant_compiles(reports):
    failed = [f"sm_{arch} {name}: {error}" for arch, name, report, error in reports if error]
    assert not failed, "\n".join(failed)


def test_shared_memory_within_limit(reports):
    over = [f"sm_{arch} {name}: {r.shared} bytes > {SHARED_MEMORY_LIMIT[arch]}"
            for arch, name, r, _ in reports if r and r.shared > SHARED_MEMORY_LIMIT[arch]]  # fmt: skip
    assert not over, "\n".join(over)


def test_no_register_spills(reports):
    """Spill-free on every config a contiguous launch can take. Strided (unspecialised) tensors need
    full pointer tensors; they are only required to compile."""
    spills = [f"sm_{arch} {name}: {r.spill_bytes} bytes of stack, {r.registers} registers"
              for arch, name, r, _ in reports if r and r.contiguous and r.spill_bytes]  # fmt: skip
    assert not spills, "\n".join(spills)


def test_gemms_use_wgmma_on_sm90(reports):
    """Tensor-core GEMMs on Hopper: wgmma for 16-bit inputs and tf32, on tiles of 64+ rows (the decode
    tile of 16 rows uses mma)."""
    missing = [f"{name}" for arch, name, r, _ in reports
               if r and arch == 90 and r.gemm and r.block_m >= 64
               and not r.wgmma]  # fmt: skip
    assert not missing, "\n".join(missing)


def test_tma_gemms_load_through_tma_into_wgmma_on_sm90(reports):
    """The sm_90 main loop contiguous inputs take (both GEMMs, every config, fp16/bf16/tf32): tiles arrive by
    TMA (cp.async.bulk.tensor) and feed wgmma. Both kernels must be among the variants."""
    tma = [(name, r) for arch, name, r, _ in reports if r and arch == 90 and r.tma_kernel]
    kernels = {name.split("[")[0] for name, _ in tma}
    assert kernels == {"_lora_linear_fwd_tma_kernel", "_lora_linear_bwd_tma_kernel"}, kernels
    missing = [f"{name}: wgmma {r.wgmma}, TMA {r.tma}" for name, r in tma if not (r.wgmma and r.tma)]
    assert not missing, "\n".join(missing)
    assert not any(r.tma_kernel for arch, _, r, _ in reports if r and arch < 90), "TMA kernels are sm_90+ only"
