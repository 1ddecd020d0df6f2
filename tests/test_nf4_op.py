"""The LoRA linear op over an NF4-quantised base weight (fastlora.nf4.NF4Weight): output and every gradient
against a float64 evaluation on the dequantised weight, on every backend that runs here (Triton through its
interpreter), as tests/test_functional.py checks the dense op."""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora import nf4

from conftest import check_case, cpu_backends, make_case


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_float64_on_the_dequantised_weight(backend, dtype, double_quant):
    # K = 100: not a multiple of the block size (blocks cross rows) nor of any tile; N = 37 odd.
    check_case(make_case((3, 7), 100, 37, 4), dtype, torch.float32, backend_name=backend, nf4_blocksize=64,
               double_quant=double_quant)  # fmt: skip


@pytest.mark.parametrize("r", [1, 16, 256])
def test_ranks(backend, r):
    check_case(make_case((9,), 128, 40, r), torch.float32, backend_name=backend, nf4_blocksize=64)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_block_sizes(backend, blocksize):
    check_case(make_case((5,), 96, 33, 3), torch.float16, torch.float32, backend_name=backend, nf4_blocksize=blocksize)


@pytest.mark.parametrize("layout_kind", ["strided", "transposed"])
def test_strided_inputs(backend, layout_kind):
    check_case(make_case((8, 5), 64, 24, 2), torch.float32, backend_name=backend, layout_kind=layout_kind,
               nf4_blocksize=64)  # fmt: skip


def test_dropout(backend):
    check_case(make_case((6, 5), 72, 30, 3, dropout_p=0.3), torch.float32, backend_name=backend, nf4_blocksize=64)


def test_empty_batch(backend):
    q = nf4.quantize(torch.randn(12, 64), 64)
    x = torch.randn(0, 64, requires_grad=True)
    a, b = torch.randn(2, 64, requires_grad=True), torch.randn(12, 2, requires_grad=True)
    y = fastlora.lora_linear(x, q, None, a, b, 1.0)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.all(a.grad == 0) and torch.all(b.grad == 0)


def test_bad_inputs_name_the_argument():
    q = nf4.quantize(torch.randn(12, 64), 64)
    a, b = torch.randn(2, 64), torch.randn(12, 2)
    with pytest.raises(ValueError, match="x: expected last dimension in_features=64"):
        fastlora.lora_linear(torch.randn(3, 65), q, None, torch.randn(2, 65), b, 1.0)
    with pytest.raises(TypeError, match="x: an NF4 weight computes in float16, bfloat16 or float32"):
        fastlora.lora_linear(torch.randn(3, 64, dtype=torch.float64), q, None, a.double(), b.double(), 1.0)
    with pytest.raises(TypeError, match=r"bias: expected dtype torch.float16 \(x's"):
        fastlora.lora_linear(torch.randn(3, 64, dtype=torch.float16), q, torch.randn(12), a, b, 1.0)
    with pytest.raises(ValueError, match="lora_B: expected shape"):
        fastlora.lora_linear(torch.randn(3, 64), q, None, a, torch.randn(13, 2), 1.0)
    with pytest.raises(ValueError, match="weight: expected device meta"):
        fastlora.lora_linear(torch.randn(3, 64, device="meta"), q, None, a.to("meta"), b.to("meta"), 1.0)


def test_no_full_precision_weight_in_the_torch_backend(monkeypatch):
    """The torch backend dequantises W in row chunks: no temporary as large as W in full precision."""
    from fastlora.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_DEQUANT_CHUNK", 64 * 16)  # 16 rows of 64 at a time
    largest = []
    real = nf4.dequantize_rows

    def spy(q, start, stop, dtype=None):
        largest.append(stop - start)
        return real(q, start, stop, dtype)

    monkeypatch.setattr(nf4, "dequantize_rows", spy)
    q = nf4.quantize(torch.randn(100, 64), 64)
    x = torch.randn(5, 64, requires_grad=True)
    a, b = torch.randn(2, 64, requires_grad=True), torch.randn(100, 2, requires_grad=True)
    with fastlora.use_backend("torch"):
        y = fastlora.lora_linear(x, q, None, a, b, 1.0)
        y.sum().backward()
    assert largest and max(largest) == 16 and sum(largest) == 2 * 100  # forward and dX each walk all rows
    want = x.detach() @ nf4.dequantize(q, torch.float32).t() + (x.detach() @ a.detach().t()) @ b.detach().t()
    torch.testing.assert_close(y.detach(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("amx", [False, True], ids=["fp32_gemms", "bf16_gemms"])
def test_bf16_gemm_dtype_on_the_cpu(monkeypatch, amx):
    """On a CPU without AMX the torch backend runs a quantised base's bf16 GEMMs in fp32 (twice as fast
    there), with AMX in bf16; either way forward and every gradient match float64 on the dequantised bf16
    weight, with dropout, and dX accumulated over several chunks of rows."""
    from fastlora.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_cpu_has_amx", lambda: amx)
    want = torch.bfloat16 if amx else torch.float32
    assert torch_backend._gemm_dtype(torch.device("cpu"), torch.bfloat16) == want
    assert torch_backend._gemm_dtype(torch.device("cpu"), torch.float16) == torch.float16
    monkeypatch.setattr(torch_backend, "_DEQUANT_CHUNK", 128 * 8)  # 8 rows of 128 at a time: 5 chunks
    check_case(make_case((6, 5), 128, 40, 3, dropout_p=0.2), torch.bfloat16, torch.float32, backend_name="torch",
               nf4_blocksize=64)  # fmt: skip


def test_the_op_saves_no_weight_copy(backend):
    """What backward keeps: x, S and the NF4 weight object (its own storage), no dequantised copy."""
    from fastlora.profiling import saved_activation_bytes

    q = nf4.quantize(torch.randn(48, 64), 64)
    x = torch.randn(20, 64, requires_grad=True)
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    _, saved = saved_activation_bytes(lambda: fastlora.lora_linear(x, q, None, a, b, 1.0), exclude=[a, b])
    assert saved == x.numel() * 4 + 20 * 4 * 4  # x and S (fp32)


@pytest.mark.parametrize("tile_k", [32, 64], ids=["tile_in_one_block", "two_blocks_per_tile"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double_quant"])
def test_row_tiles_of_whole_blocks(monkeypatch, tile_k, double_quant):
    """Rows of whole blocks (K a multiple of the block size) take load_nf4_rows' tile loads: a tile inside
    one block of each row, and (blocks of 32 in 64-wide tiles) two blocks per row of a tile; the last tile
    ragged in K (K = 96 = 1.5 tiles of 64) and in N."""
    pytest.importorskip("triton")
    from fastlora.kernels import lora_linear
    from fastlora.kernels.weight_tile import weight_args

    if "triton" not in cpu_backends():
        pytest.skip("the triton backend runs on the CPU only under TRITON_INTERPRET=1")
    q = nf4.quantize(torch.randn(3, 96), 32, double_quant)
    assert weight_args(q, torch.empty(0))[1]["NF4_ROWS"]
    assert not weight_args(nf4.quantize(torch.randn(3, 100), 32), torch.empty(0))[1]["NF4_ROWS"]
    config = lora_linear._cfg(16, 32, tile_k, 1, 1, group=2)
    monkeypatch.setattr(lora_linear._FWD, "interpreter_config", config)
    monkeypatch.setattr(lora_linear._BWD, "interpreter_config", lora_linear._cfg(16, tile_k, 32, 1, 1, group=2))
    with fastlora.use_backend("triton"):
        check_case(make_case((5, 7), 96, 45, 3, dropout_p=0.2), torch.float32, backend_name="triton", nf4_blocksize=32,
                   double_quant=double_quant)  # fmt: skip
