"""The CUDA extension (csrc/) without a GPU: the nvcc build and ptxas's report for sm_80 and sm_90, the
module imported on the CPU, the kernel's arithmetic replayed on the host against float64, and the Python
side (the custom op, its checks, the "cuda" backend's reasons). Tests that need a GPU skip with the reason;
benchmarks/gpu_check.py runs the kernel itself on one.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastlora
from fastlora import cuda_build, cuda_ext
from fastlora.backends import cuda_backend, forget_resolved, get_backend
from fastlora.testing import FLOOR, rel_err


def _nvcc_or_skip():
    try:
        cuda_build.find_nvcc()
    except cuda_build.BuildError as err:
        pytest.skip(f"no CUDA toolkit here: {err}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    _nvcc_or_skip()
    return cuda_build.build(tmp_path_factory.mktemp("cuda"))


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    lib = ctypes.CDLL(str(cuda_build.build_replay(tmp_path_factory.mktemp("replay"))))
    lib.fastlora_replay_decode.restype = ctypes.c_int
    lib.fastlora_replay_butterfly.restype = ctypes.c_float
    return lib


# --- the build and the assembler's report ----------------------------------------------------------------


def test_ptxas_report_every_variant_spill_free_within_the_launch_bounds(built):
    """Every kernel variant (5 row buckets x 2 dtypes x 3 adapter dtypes x 2 weight formats) for both
    architectures: no spills, no stack, registers within __launch_bounds__(128, 4) (65536 / (128 x 4) = 128);
    shared memory only for NF4's 16-value table (64 bytes: x and W stream through L1/L2)."""
    entries = cuda_build.parse_ptxas(built.ptxas_log.read_text())
    assert {e["arch"] for e in entries} == {"sm_80", "sm_90"}
    assert sum(e["arch"] == "sm_90" for e in entries) == 60 and len(entries) == 120
    for e in entries:
        assert e["spill_stores"] == 0 and e["spill_loads"] == 0 and e["stack"] == 0, e
        assert e["registers"] is not None and e["registers"] <= 128, e
        nf4 = e["kernel"].endswith("Li1EEEvNS_10DecodeArgsE")  # the weight-format template argument is 1
        assert e["shared"] == (64 if nf4 else 0), e
    assert sum(e["kernel"].endswith("Li1EEEvNS_10DecodeArgsE") for e in entries) == 60


def test_parse_ptxas_reads_spills():
    text = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 72 registers, used 1 barriers, 1024 bytes smem"""
    assert cuda_build.parse_ptxas(text) == [{"kernel": "_Z1kv", "arch": "sm_90", "registers": 72, "stack": 8,
                                             "spill_stores": 4, "spill_loads": 12, "shared": 1024}]  # fmt: skip


def test_module_imports_and_reports_without_a_gpu(built):
    module = cuda_ext._import_path(built.module)
    assert module.ARCHS == "sm_80,sm_90,compute_90"
    assert module.MAX_ROWS == cuda_backend.MAX_ROWS and module.MAX_RANK == cuda_backend.MAX_RANK
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-driver path is not reachable")
    reason = module.unavailable_reason()
    assert "driver" in reason or "device" in reason
    with pytest.raises(RuntimeError, match="fastlora CUDA extension: cudaGetDevice"):
        module.lora_decode(0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0, 1, 0, 0, 0, [1, 8, 8, 1, 1], [8] * 9, 1, 1, True, 0, 0)
    with pytest.raises(ValueError, match="sizes: expected"):
        module.lora_decode(0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0, 1, 0, 0, 0, [1], [8] * 9, 1, 1, True, 0, 0)


def test_a_missing_build_never_breaks_import(tmp_path):
    """In a fresh process with an empty cache: fastlora imports, the extension is None with the reason, and
    the "cuda" backend, asked for by name, raises saying why."""
    code = """
import torch, fastlora
from fastlora import cuda_ext
assert cuda_ext.load() is None
print(cuda_ext.unavailable_reason())
fastlora.set_backend("cuda")
x = torch.randn(2, 8)
try:
    fastlora.lora_linear(x, torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), 1.0)
except RuntimeError as err:
    print(err)
"""
    env = {"FASTLORA_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "not built: build it with `python -m fastlora build-cuda`" in out
    assert "fastlora backend 'cuda' was requested but cannot run on cpu" in out


# --- the arithmetic, replayed on the host ------------------------------------------------------------------


def _f(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.float().numpy())


def _ptr(a: np.ndarray, kind=ctypes.c_float):
    return a.ctypes.data_as(ctypes.POINTER(kind))


def _replay(lib, x, w, bias, a, b, index, ranks, scales):
    """The kernel's y (M, N) before rounding and S (M, r_max), replayed. b is (n, N, r_max)."""
    m, k = x.shape
    n_out, r_max = w.shape[0], a.shape[1]
    xs, ws, as_, bs = _f(x), _f(w), _f(a), _f(b)
    idx = None if index is None else np.ascontiguousarray(index.numpy().astype(np.int64))
    rk = np.ascontiguousarray(np.array(ranks, dtype=np.int32))
    sc = np.ascontiguousarray(np.array(scales, dtype=np.float32))
    s = np.zeros((m, r_max), dtype=np.float32)
    y = np.zeros((m, n_out), dtype=np.float32)
    idx_ptr = None if idx is None else _ptr(idx, ctypes.c_int64)
    lib.fastlora_replay_shrink(_ptr(xs), _ptr(as_), idx_ptr, _ptr(rk, ctypes.c_int32), ctypes.c_int64(m),
                               ctypes.c_int64(k), ctypes.c_int64(r_max), _ptr(s))  # fmt: skip
    bias_ptr = None if bias is None else _ptr(_f(bias))
    keep = _f(bias) if bias is not None else None  # noqa: F841 (kept alive during the call)
    rc = lib.fastlora_replay_decode(_ptr(xs), _ptr(ws), bias_ptr if bias is None else _ptr(keep), _ptr(bs), _ptr(s),
                                    idx_ptr, _ptr(rk, ctypes.c_int32), _ptr(sc), ctypes.c_int64(m),
                                    ctypes.c_int64(n_out), ctypes.c_int64(k), ctypes.c_int64(r_max), _ptr(y))  # fmt: skip
    assert rc == 0
    return torch.from_numpy(y), torch.from_numpy(s)


def _truth(x, w, bias, a, b, index, ranks, scales, dtype=torch.float64):
    """y = x·Wᵀ + b + s_a·(x·A_a[:r]ᵀ)·B_a[:, :r]ᵀ per row, computed in ``dtype``, returned in float64."""
    rows = []
    for m in range(x.shape[0]):
        ad = 0 if index is None else int(index[m])
        row = x[m].to(dtype) @ w.to(dtype).t()
        if bias is not None:
            row = row + bias.to(dtype)
        if ad >= 0:
            r = ranks[ad]
            s = x[m].to(dtype) @ a[ad, :r].to(dtype).t()
            if dtype != torch.float64:
                s = s.to(x.dtype).to(dtype)
            row = row + scales[ad] * (s @ b[ad, :, :r].to(dtype).t())
        rows.append(row.to(x.dtype) if dtype != torch.float64 else row)
    return torch.stack(rows).double()


CASES = [  # (M, N, K, ranks per adapter, index or None)
    (1, 37, 77, [1], None),
    (3, 41, 264, [7, 16], [1, -1, 0]),
    (5, 18, 1031, [16, 3, 5], [2, 2, -1, 0, 1]),
    (16, 33, 520, [256, 1], [0, 1, -1, 1, 0, 0, 1, -1, 1, 0, 1, 1, 0, -1, 0, 1]),
    (8, 9, 8, [2], [-1] * 8),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, "same"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_replay_matches_float64(replay, dtype, adapter_dtype, case):
    """The kernel's arithmetic in its own order, rounded to the output dtype as the kernel rounds (IEEE
    round-to-nearest-even: PyTorch's cast), within 2x PyTorch's own same-dtype error plus a floor."""
    m, n_out, k, ranks, index = CASES[case]
    adapter_dtype = dtype if adapter_dtype == "same" else adapter_dtype
    g = torch.Generator().manual_seed(case)
    n, r_max = len(ranks), max(ranks)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n_out, k, generator=g) / k**0.5).to(dtype)
    bias = torch.randn(n_out, generator=g).to(dtype)
    a = (torch.randn(n, r_max, k, generator=g) / k**0.5).to(adapter_dtype)
    b = torch.randn(n, n_out, r_max, generator=g).to(adapter_dtype)
    for ad, r in enumerate(ranks):  # lanes past the rank hold garbage: the kernel must not read them
        a[ad, r:] = float("nan")
        b[ad, :, r:] = float("nan")
    index_t = None if index is None else torch.tensor(index)
    scales = [0.5 + 0.25 * i for i in range(n)]
    y, s = _replay(replay, x, w, bias, a, b, index_t, ranks, scales)
    truth = _truth(x, w, bias, a, b, index_t, ranks, scales)
    ours = rel_err(y.to(dtype), truth)
    torch_err = rel_err(_truth(x, w, bias, a, b, index_t, ranks, scales, dtype=torch.float32), truth)
    assert ours <= 2 * torch_err + FLOOR[dtype], (ours, torch_err)
    for row in range(m):  # S: zero past each row's rank and for base-only rows, exact elsewhere up to fp32
        ad = 0 if index is None else index[row]
        r = ranks[ad] if ad >= 0 else 0
        assert torch.all(s[row, r:] == 0)
        if r:
            want = x[row].double() @ a[ad, :r].double().t()
            assert rel_err(s[row, :r], want) <= 1e-5


@pytest.mark.parametrize("shape, blocksize, double", [((37, 77), 64, True), ((16, 256), 32, False),
                                                      ((5, 1031), 4096, True), ((300, 600), 128, True)])
def test_nf4_decode_replayed_matches_dequantize(replay, shape, blocksize, double):
    """The kernel's NF4 decoding (code table, nibble order, plain and double-quantised absmax with two
    roundings) gives fastlora.nf4.dequantize's fp32 values bit for bit; rounded to bf16, its values."""
    from fastlora import nf4

    g = torch.Generator().manual_seed(3)
    q = nf4.quantize(torch.randn(*shape, generator=g) * torch.logspace(-2, 1, shape[1]), blocksize, double)
    out = np.zeros(q.numel, dtype=np.float32)
    packed = np.ascontiguousarray(q.packed.view(-1).numpy())
    if double:
        codes = np.ascontiguousarray(q.absmax.numpy())
        scale, table = _f(q.absmax_scale), _f(q.absmax_code)
        replay.fastlora_replay_nf4(_ptr(packed, ctypes.c_uint8), None, _ptr(codes, ctypes.c_uint8), _ptr(scale),
                                   ctypes.c_float(float(q.absmax_offset)), _ptr(table), ctypes.c_int64(q.numel),
                                   blocksize.bit_length() - 1, _ptr(out))  # fmt: skip
    else:
        absmax = _f(q.absmax)
        replay.fastlora_replay_nf4(_ptr(packed, ctypes.c_uint8), _ptr(absmax), None, None, ctypes.c_float(0.0), None,
                                   ctypes.c_int64(q.numel), blocksize.bit_length() - 1, _ptr(out))  # fmt: skip
    ours = torch.from_numpy(out).view(shape)
    assert torch.equal(ours, nf4.dequantize(q, torch.float32))
    assert torch.equal(ours.bfloat16(), nf4.dequantize(q, torch.bfloat16))


def test_reduction_tree_adds_as_the_butterfly(replay):
    """The transposing tree (31 shuffles for 32 values) adds each value in the plain butterfly's order: the
    same bits, lane by lane."""
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(32, 32, generator=g) * torch.logspace(-3, 3, 32)[None, :]).float().numpy()
    values = np.ascontiguousarray(values)
    out = np.zeros(32, dtype=np.float32)
    replay.fastlora_replay_tree32(_ptr(values), _ptr(out))
    for i in range(32):
        column = np.ascontiguousarray(values[:, i])
        assert out[i] == np.float32(replay.fastlora_replay_butterfly(_ptr(column)))
    exact, scale = values.astype(np.float64).sum(0), np.abs(values.astype(np.float64)).sum(0)
    assert np.all(np.abs(out - exact) <= 5 * 2.0**-24 * scale)  # five rounded additions deep


# --- the Python side ---------------------------------------------------------------------------------------


def _op_args(m=3, k=16, n_out=12, n=2, r_max=4, dtype=torch.bfloat16, adapter_dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(m, k, generator=g).to(dtype), torch.randn(n_out, k, generator=g).to(dtype),
            torch.randn(n_out, generator=g).to(dtype), torch.randn(n, r_max, k, generator=g).to(adapter_dtype),
            torch.randn(n, n_out, r_max, generator=g).to(adapter_dtype), torch.tensor([1, -1, 0][:m] + [0] * (m - 3)),
            torch.tensor([0.5, 2.0][:n], dtype=torch.float32), torch.tensor([4, 2][:n], dtype=torch.int32))  # fmt: skip


def test_custom_op_on_cpu_matches_float64_and_passes_opcheck():
    args = _op_args()
    x, w, bias, a, b, index, scales, ranks = args
    y = torch.ops.fastlora.cuda_lora_decode(*args)
    truth = _truth(x, w, bias, a, b, index, ranks.tolist(), scales.tolist())
    assert y.dtype == x.dtype and rel_err(y, truth) <= 2 * FLOOR[torch.bfloat16]
    torch.library.opcheck(torch.ops.fastlora.cuda_lora_decode, args)
    no_index = list(args)
    no_index[5] = None
    torch.library.opcheck(torch.ops.fastlora.cuda_lora_decode, tuple(no_index))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.__setitem__(0, torch.randn(17, 16).bfloat16()), ValueError, r"x: expected \(M, K\) with M <= 16"),
        (lambda a: a.__setitem__(0, a[0].float()), TypeError, "x: expected float16 or bfloat16, got torch.float32"),
        (lambda a: a.__setitem__(1, a[1][:, :8]), ValueError, r"weight: expected \(N, K=16\)"),
        (lambda a: a.__setitem__(1, a[1].half()), ValueError, "weight: expected .* in torch.bfloat16"),
        (lambda a: a.__setitem__(2, a[2][:5]), ValueError, r"bias: expected \(12,\)"),
        (lambda a: a.__setitem__(3, torch.randn(2, 257, 16)), ValueError, r"lora_A: expected \(n >= 1, r_max in 1..256"),
        (lambda a: a.__setitem__(3, a[3].double()), TypeError, "lora_A: expected float32, float16 or bfloat16"),
        (lambda a: a.__setitem__(4, a[4][:, :, :3]), ValueError, r"lora_B: expected \(2, 12, 4\)"),
        (lambda a: a.__setitem__(4, a[4].half()), ValueError, "lora_B: expected .* in torch.float32"),
        (lambda a: a.__setitem__(5, a[5].int()), ValueError, r"index: expected \(3,\) int64"),
        (lambda a: a.__setitem__(5, a[5][:2]), ValueError, r"index: expected \(3,\) int64"),
        (lambda a: a.__setitem__(6, a[6].double()), ValueError, r"scales: expected \(2,\) float32"),
        (lambda a: a.__setitem__(7, a[7].long()), ValueError, r"ranks: expected \(2,\) int32"),
        (lambda a: a.__setitem__(1, a[1].t().contiguous().t()), ValueError, "weight: expected a contiguous last"),
        (lambda a: a.__setitem__(5, a[5].to("meta")), ValueError, "index: expected device cpu"),
    ],
)
def test_custom_op_checks_name_the_argument(change, error, match):
    args = list(_op_args())
    change(args)
    with pytest.raises(error, match=match):
        torch.ops.fastlora.cuda_lora_decode(*args)


def test_cuda_backend_says_why_it_cannot_run_and_auto_passes_it_by():
    backend = get_backend("cuda")
    reason = backend.unavailable_reason(torch.device("cpu"))
    assert reason.startswith("the CUDA extension cannot run") or reason.startswith("the CUDA extension runs CUDA")
    forget_resolved()
    with fastlora.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="fastlora backend 'cuda' was requested but cannot run on cpu"):
            fastlora.lora_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), 1.0)
    forget_resolved()
    assert "cuda" in fastlora.BACKEND_NAMES


def test_decode_range():
    """The calls the decode kernel takes (else Triton): 1-16 rows, no dropout, fp16/bf16 with a dense weight
    of x's dtype or an NF4 one, adapters fp32/fp16/bf16, rank <= 256, contiguous last dimensions."""
    x, w = torch.randn(4, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    a, b = torch.randn(2, 16), torch.randn(8, 2)
    assert cuda_backend._takes(x, w, None, a, b, 0.0)
    assert cuda_backend._takes(x[:1], w, None, a, b, 0.0)
    assert not cuda_backend._takes(torch.randn(17, 16).bfloat16(), w, None, a, b, 0.0)
    assert not cuda_backend._takes(x[:0], w, None, a, b, 0.0)
    assert not cuda_backend._takes(x, w, None, a, b, 0.1)
    assert not cuda_backend._takes(x.float(), w.float(), None, a, b, 0.0)
    assert not cuda_backend._takes(x, w, None, torch.randn(257, 16), torch.randn(8, 257), 0.0)
    assert not cuda_backend._takes(torch.randn(16, 4).bfloat16().t(), w, None, a, b, 0.0)
    assert not cuda_backend._takes(x, w, None, a.double(), b.double(), 0.0)
    from fastlora import nf4

    assert cuda_backend._takes(x, nf4.quantize(w.float(), 64), None, a, b, 0.0)  # an NF4 base: decoded in the kernel
    assert not cuda_backend._takes(x.float(), nf4.quantize(w.float(), 64), None, a, b, 0.0)


def test_info_reports_the_extension():
    report = fastlora.env.info() if hasattr(fastlora, "env") else __import__("fastlora.env").env.info()
    ext = report["cuda_extension"]
    assert set(ext) >= {"built", "path", "archs", "reason"}
    assert ext["built"] or "not built" in ext["reason"] or "does not load" in ext["reason"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py runs these)")
def test_kernel_matches_the_replay_on_a_gpu(built):
    module = cuda_ext._import_path(built.module)
    if module.unavailable_reason():
        pytest.skip(module.unavailable_reason())
    args = [t.cuda() if t is not None else None for t in _op_args(m=3, k=264, n_out=37)]
    y = torch.ops.fastlora.cuda_lora_decode(*args)
    ref = torch.ops.fastlora.cuda_lora_decode(*[t.cpu() if t is not None else None for t in args])
    assert rel_err(y.cpu(), ref.double()) <= 4 * FLOOR[torch.bfloat16]
