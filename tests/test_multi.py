"""Mixed-adapter batches (fastlora.lora_linear_multi): output and every gradient against a float64 loop over
adapters (fastlora.reference.lora_linear_multi), within 2x PyTorch's own same-dtype error plus a floor."""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora import nf4, reference
from fastlora.backends import draw_seed, get_backend
from fastlora.testing import FLOOR, layout, rel_err

from conftest import cpu_backends, launches_with_flag, skip_if_unsupported

GRAD_SEED, GEN_SEED = 1, 7


def _case(lead, k, n_out, n, r_max, index, *, ranks=None, ps=None, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    ranks = ranks or [r_max] * n
    a = rand(n, r_max, k) / k**0.5
    b = rand(n, n_out, r_max) / r_max**0.5
    for i, r in enumerate(ranks):  # lanes past an adapter's rank are zero, as a stack of ranks holds them
        a[i, r:] = 0
        b[i, :, r:] = 0
    return dict(x=rand(*lead, k), weight=rand(n_out, k) / k**0.5, bias=rand(n_out) if bias else None, lora_A=a,
                lora_B=b, scalings=[0.5 + 0.25 * i for i in range(n)], index=index, ranks=ranks,
                ps=ps or [0.0] * n)  # fmt: skip


@pytest.fixture(params=cpu_backends())
def backend(request):
    """Each backend that runs here (Triton through its interpreter)."""
    return request.param


def check_multi(case, dtype, adapter_dtype=None, *, backend="torch", layout_kind="contiguous", nf4_blocksize=None,
                grouping=None):  # fmt: skip
    skip_if_unsupported(backend, dtype, adapter_dtype or dtype)
    adapter_dtype = adapter_dtype or dtype
    x64 = case["x"]
    lead, k = x64.shape[:-1], x64.shape[-1]
    n = case["lora_A"].shape[0]
    grouping = grouping or fastlora.group_rows(case["index"], n, lead)
    rows = grouping.index
    mask = None
    if any(p > 0 for p in case["ps"]):
        seed = draw_seed(torch.device("cpu"), torch.Generator().manual_seed(GEN_SEED))
        mask = get_backend(backend).multi_keep_mask(seed, grouping, case["ps"], k, torch.device("cpu"))
    grad_out = torch.randn(*lead, case["weight"].shape[0], generator=torch.Generator().manual_seed(GRAD_SEED),
                           dtype=torch.float64)  # fmt: skip
    weight = case["weight"]
    if nf4_blocksize is not None:
        q = nf4.quantize(weight.float(), nf4_blocksize)
        weight = nf4.dequantize(q, torch.float32).double()

    def leaves(dt, a_dt, ours=False):
        t = {name: case[name].to(dt if name == "x" else a_dt, copy=True).requires_grad_()
             for name in ("x", "lora_A", "lora_B")}  # fmt: skip
        t["weight"] = q if (ours and nf4_blocksize is not None) else weight.to(dt)
        t["bias"] = None if case["bias"] is None else case["bias"].to(dt)
        return t

    def reference_run(t):
        y = reference.lora_linear_multi(t["x"].reshape(-1, k), t["weight"], t["bias"], t["lora_A"], t["lora_B"],
                                        case["scalings"], rows, case["ranks"], mask, case["ps"])  # fmt: skip
        return y.view(*lead, -1)

    def ours_run(t):
        with fastlora.use_backend(backend):
            return _ours(t)

    def _ours(t):
        return fastlora.lora_linear_multi(layout(t["x"], layout_kind), t["weight"], t["bias"], t["lora_A"],
                                          t["lora_B"], case["scalings"], grouping, case["ps"], ranks=case["ranks"],
                                          generator=torch.Generator().manual_seed(GEN_SEED))  # fmt: skip

    results = []
    for fn, t in ((reference_run, leaves(torch.float64, torch.float64)), (reference_run, leaves(dtype, dtype)),
                  (ours_run, leaves(dtype, adapter_dtype, ours=True))):  # fmt: skip
        y = fn(t)
        (y * grad_out.to(y.dtype)).sum().backward()
        # (the reference never touches an adapter without rows: no gradient there means zero)
        grads = {"d" + name: t[name].grad if t[name].grad is not None else torch.zeros_like(t[name])
                 for name in ("x", "lora_A", "lora_B")}  # fmt: skip
        results.append({"y": y.detach(), **grads})
    truth, pytorch, got = results
    assert got["y"].dtype == dtype and got["y"].shape == truth["y"].shape
    for key, want in truth.items():
        e_ours, e_torch = rel_err(got[key], want), rel_err(pytorch[key], want)
        assert e_ours <= 2 * e_torch + FLOOR[dtype], f"{key}: error {e_ours:.3e} > 2 x PyTorch's {e_torch:.3e} + floor"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rows_in_any_order_against_float64(backend, dtype):
    # K = 37, N = 29: odd; 41 rows over 4 adapters and the base, in random order.
    index = torch.randint(-1, 4, (41,), generator=torch.Generator().manual_seed(3))
    check_multi(_case((41,), 37, 29, 4, 6, index), dtype, torch.float32, backend=backend)


def test_ranks_differ_and_unused_lanes_get_no_gradient(backend):
    index = torch.tensor([2, 0, 1, 1, -1, 2, 0, 2, 1])
    got = check_multi(_case((9,), 24, 19, 3, 8, index, ranks=[1, 8, 3]), torch.float32, backend=backend)
    assert torch.all(got["dlora_A"][0, 1:] == 0) and torch.all(got["dlora_B"][2, :, 3:] == 0)


def test_rank_one_to_large(backend):
    index = torch.arange(20) % 3
    check_multi(_case((20,), 40, 33, 3, 64, index, ranks=[1, 64, 17]), torch.float32, backend=backend)


def test_runs_of_rows_are_worked_on_in_place():
    index = torch.tensor([-1, -1, 0, 0, 0, 1, 3, 3, 0])
    grouping = fastlora.group_rows(index, 4, (9,))
    assert grouping.order is None and grouping.used == (0, 1, 3)
    assert grouping.segments == ((0, 2, -1), (2, 5, 0), (5, 6, 1), (6, 8, 3), (8, 9, 0))
    check_multi(_case((9,), 16, 12, 4, 4, index, ps=[0.3, 0.0, 0.0, 0.2]), torch.float32, grouping=grouping)


def test_scattered_rows_are_gathered_by_adapter():
    index = torch.tensor([0, 1, 2, -1] * 12)  # 48 runs of one row: gathered into 4 groups
    grouping = fastlora.group_rows(index, 3, (48,))
    assert grouping.order is not None
    assert grouping.segments == ((0, 12, -1), (12, 24, 0), (24, 36, 1), (36, 48, 2))
    check_multi(_case((48,), 16, 12, 3, 4, index, ps=[0.3, 0.0, 0.2]), torch.float32, grouping=grouping)


def test_one_adapter_matches_the_single_op():
    case = _case((6, 5), 32, 24, 1, 4, torch.zeros(6, dtype=torch.long))
    x = case["x"].float()
    args = (x, case["weight"].float(), case["bias"].float())
    multi = fastlora.lora_linear_multi(*args, case["lora_A"].float(), case["lora_B"].float(), 0.5, torch.zeros(6, dtype=torch.long))
    single = fastlora.lora_linear(*args, case["lora_A"][0].float(), case["lora_B"][0].float(), 0.5)
    torch.testing.assert_close(multi, single, rtol=1e-5, atol=1e-5)


def test_all_rows_base_only(backend):
    got = check_multi(_case((7,), 16, 10, 2, 3, torch.full((7,), -1)), torch.float32, backend=backend)
    assert torch.all(got["dlora_A"] == 0) and torch.all(got["dlora_B"] == 0)


def test_empty_batch(backend):
    x = torch.randn(0, 16, requires_grad=True)
    a, b = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 10, 3, requires_grad=True)
    with fastlora.use_backend(backend):
        y = fastlora.lora_linear_multi(x, torch.randn(10, 16), None, a, b, 1.0, torch.zeros(0, dtype=torch.long))
        assert y.shape == (0, 10)
        y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.all(a.grad == 0) and torch.all(b.grad == 0)


def test_dropout_per_adapter():
    index = torch.randint(-1, 3, (30,), generator=torch.Generator().manual_seed(4))
    check_multi(_case((30,), 48, 20, 3, 4, index, ps=[0.0, 0.3, 0.6]), torch.float32)


@pytest.mark.parametrize("layout_kind", ["contiguous", "strided"])
def test_dropout_one_probability(backend, layout_kind):
    index = torch.randint(-1, 3, (6, 5), generator=torch.Generator().manual_seed(4))
    check_multi(_case((6, 5), 48, 20, 3, 4, index, ps=[0.25] * 3), torch.float32, backend=backend,
                layout_kind=layout_kind)  # fmt: skip


def test_dropout_masks_follow_each_adapters_probability():
    index = torch.tensor([0] * 200 + [1] * 200 + [-1] * 50)
    grouping = fastlora.group_rows(index, 2, (450,))
    seed = draw_seed(torch.device("cpu"), torch.Generator().manual_seed(0))
    mask = get_backend("torch").multi_keep_mask(seed, grouping, (0.1, 0.5), 256, torch.device("cpu"))
    kept = [mask[:200].float().mean().item(), mask[200:400].float().mean().item(), mask[400:].float().mean().item()]
    assert abs(kept[0] - 0.9) < 0.01 and abs(kept[1] - 0.5) < 0.01 and kept[2] == 1.0


@pytest.mark.parametrize("layout_kind", ["strided", "transposed"])
def test_per_sequence_index_on_3d_strided_x(layout_kind):
    index = torch.tensor([1, -1, 0, 1, 2])  # one adapter per sequence of (5, 7, K)
    check_multi(_case((5, 7), 24, 18, 3, 4, index, ps=[0.2, 0.0, 0.1]), torch.float32, layout_kind=layout_kind)


def test_nf4_base(backend):
    index = torch.randint(-1, 3, (12,), generator=torch.Generator().manual_seed(5))
    check_multi(_case((12,), 128, 40, 3, 4, index, ps=[0.2] * 3), torch.float32, backend=backend, nf4_blocksize=64)


def test_a_grouping_is_reused_across_layers(backend):
    index = torch.tensor([1, 0, 1, -1])
    grouping = fastlora.group_rows(index, 2, (4,))
    for seed in range(3):  # three layers of other shapes, one grouping
        check_multi(_case((4,), 16 + seed, 8 + seed, 2, 2, index, seed=seed), torch.float32, backend=backend,
                    grouping=grouping)  # fmt: skip


def test_bad_indices_and_arguments_name_the_argument():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    a, b = torch.randn(2, 3, 8), torch.randn(2, 6, 3)
    ok = torch.tensor([0, 1, -1, 0])

    def call(**kw):
        args = dict(x=x, weight=w, bias=None, lora_A=a, lora_B=b, scaling=1.0, adapter_index=ok)
        return fastlora.lora_linear_multi(**{**args, **kw})

    with pytest.raises(ValueError, match=r"adapter_index: expected values in \[-1, 2\).*\[2\]"):
        call(adapter_index=torch.tensor([0, 2, 1, 0]))
    with pytest.raises(ValueError, match=r"adapter_index: expected values.*\[-2\]"):
        call(adapter_index=torch.tensor([0, -2, 1, 0]))
    with pytest.raises(ValueError, match=r"adapter_index: expected a shape that is a prefix of x's leading"):
        call(adapter_index=torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="adapter_index: expected an integer dtype, got torch.float32"):
        call(adapter_index=torch.zeros(4))
    with pytest.raises(ValueError, match="adapter_index: expected device meta"):
        call(x=x.to("meta"), weight=w.to("meta"), lora_A=a.to("meta"), lora_B=b.to("meta"))
    with pytest.raises(ValueError, match="adapter_index: a RowGrouping for 2 adapters and rows \\(5,\\)"):
        call(adapter_index=fastlora.group_rows(torch.zeros(5, dtype=torch.long), 2, (5,)))
    with pytest.raises(ValueError, match="lora_A: expected 3-D"):
        call(lora_A=a[0])
    with pytest.raises(ValueError, match=r"lora_B: expected 3-D \(n=2, out_features=6, r_max=3\)"):
        call(lora_B=torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match=r"lora_B: expected 3-D \(n=2, out_features=6, r_max=3\)"):
        call(lora_B=torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"scaling: expected a number or one scaling per adapter \(2\), got a tensor"):
        call(scaling=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"scaling: expected one scaling per adapter \(2\), got 3"):
        call(scaling=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"dropout_p: expected probabilities in \[0, 1\), got 1.0"):
        call(dropout_p=[0.0, 1.0])
    with pytest.raises(ValueError, match=r"ranks: expected integers in \[1, r_max=3\], got 4"):
        call(ranks=[1, 4])
    with pytest.raises(ValueError, match="weight: expected 2-D|x: expected last dimension"):
        call(weight=torch.randn(6, 9))


def test_dropout_per_adapter_on_every_backend(backend):
    index = torch.randint(-1, 3, (30,), generator=torch.Generator().manual_seed(4))
    check_multi(_case((30,), 48, 20, 3, 4, index, ps=[0.0, 0.3, 0.6]), torch.float32, backend=backend)


@pytest.mark.parametrize("ps", [[0.0, 0.0, 0.0], [0.3, 0.0, 0.2]], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("layout_kind", ["contiguous", "strided"])
def test_one_adapter_per_sample_runs_batched(ps, layout_kind):
    """An index per sample of (B, T, K) x with T >= 16: the torch backend runs the LoRA terms as batched GEMMs
    over the samples (two samples share adapter 1, one runs the base alone, ranks differ)."""
    index = torch.tensor([1, -1, 0, 1, 2])
    grouping = fastlora.group_rows(index, 3, (5, 17))
    assert grouping.sample_index is not None
    assert fastlora.group_rows(index, 3, (5, 15)).sample_index is None  # short samples: segments
    check_multi(_case((5, 17), 24, 18, 3, 6, index, ranks=[6, 2, 4], ps=ps), torch.float32, layout_kind=layout_kind,
                grouping=grouping)  # fmt: skip


@pytest.mark.parametrize("layout_kind", ["contiguous", "strided"])
def test_per_sample_with_one_scaling_and_full_ranks(layout_kind):
    """Every sample with an adapter, all of full rank, one scaling, no dropout (serving): the torch backend
    skips its per-sample tables (s on the GEMM's alpha); forward and gradients against float64."""
    index = torch.tensor([2, 0, 1, 1, 0, 2])
    case = _case((6, 16), 24, 18, 3, 5, index)
    case["scalings"] = [0.75] * 3
    grouping = fastlora.group_rows(index, 3, (6, 16))
    assert grouping.sample_index is not None
    check_multi(case, torch.float32, layout_kind=layout_kind, grouping=grouping)


@pytest.mark.parametrize("rows", [(12, 3), (12, 17)])
@pytest.mark.parametrize("host_rows", [10**6, 0])
def test_a_per_sample_index_groups_as_its_rows_would(monkeypatch, rows, host_rows):
    """An index per sample is grouped by samples (B values read, not B·T): the same segments and gather order
    as the same index given for every row; here in many runs, so the rows are gathered."""
    from fastlora import grouping as grouping_module

    monkeypatch.setattr(grouping_module, "_HOST_ROWS", host_rows)
    index = torch.tensor([0, 2, -1, 1, 0, 2, 2, 1, -1, 0, 1, 2])
    per_sample = fastlora.group_rows(index, 3, rows)
    per_row = fastlora.group_rows(index[:, None].expand(rows).reshape(-1), 3, (rows[0] * rows[1],))
    assert per_sample.order is not None and per_sample.segments == per_row.segments
    assert torch.equal(per_sample.order, per_row.order) and torch.equal(per_sample.index, per_row.index)


@pytest.mark.skipif("triton" not in cpu_backends(), reason="runs the Triton kernels through the interpreter")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_mixed_batch_gemms_take_the_tma_main_loop_on_sm90(monkeypatch, tf32, arch, dtype):
    """A mixed batch's two GEMMs (the per-row adapters' prologue, MULTI) on the sm_90 main loop (TMA,
    persistent) where the inputs allow it, on the pointer one on sm_80; against float64 either way. K = 48
    and N = 32: rows of 16-element multiples, which every supported Triton's interpreter takes by TMA."""
    from fastlora.kernels import lora_linear

    monkeypatch.setattr(lora_linear, "INTERPRETED_ARCH", arch)
    multi_launches = launches_with_flag(monkeypatch, [(lora_linear, name) for name in ("_FWD", "_FWD_TMA", "_BWD", "_BWD_TMA")],
                                        "MULTI")  # fmt: skip
    index = torch.randint(-1, 4, (45,), generator=torch.Generator().manual_seed(8))
    check_multi(_case((45,), 48, 32, 4, 8, index, ranks=[8, 3, 5, 1], ps=[0.0, 0.3, 0.0, 0.2]), dtype,
                backend="triton")  # fmt: skip
    assert sorted(multi_launches) == (["lora_linear._BWD", "lora_linear._FWD"] if arch == 80
                                      else ["lora_linear._BWD_TMA", "lora_linear._FWD_TMA"])  # fmt: skip


@pytest.mark.parametrize("bias", [True, False])
def test_inference_on_many_small_groups_runs_stacked(monkeypatch, bias):
    """Inference with many groups of few rows: the torch backend multiplies every row by all adapters' lanes
    in two GEMMs and keeps each row's own (lanes past a rank and other adapters' zeroed); against float64."""
    from fastlora.backends import torch_backend

    calls = []
    real = torch_backend.TorchBackend._forward_stacked
    monkeypatch.setattr(torch_backend.TorchBackend, "_forward_stacked",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))  # fmt: skip
    index = torch.randint(-1, 5, (23,), generator=torch.Generator().manual_seed(6))
    case = _case((23,), 40, 36, 5, 6, index, ranks=[6, 1, 3, 6, 2], bias=bias)
    case["lora_A"][1, 1:] = 1.0  # lanes past a rank hold values: they must not count
    case["lora_B"][4, :, 2:] = 1.0
    grouping = fastlora.group_rows(index, 5, (23,))
    assert torch_backend._stacked_is_cheaper(grouping, 6, 40, 36)

    def run(dtype, ours):
        args = [case["x"], case["weight"], case["bias"], case["lora_A"], case["lora_B"]]
        args = [None if t is None else t.to(dtype) for t in args]
        if ours:
            with torch.no_grad():
                return fastlora.lora_linear_multi(*args, case["scalings"], grouping, ranks=case["ranks"])
        return reference.lora_linear_multi(*args, case["scalings"], grouping.index, case["ranks"])

    truth, pytorch, got = run(torch.float64, False), run(torch.float32, False), run(torch.float32, True)
    assert calls == [1]
    assert rel_err(got, truth) <= 2 * rel_err(pytorch, truth) + FLOOR[torch.float32]


def test_b_stored_rank_major_as_layers_stack_it(backend):
    """``stack_adapters`` stores B as (n, r_max, N) and passes the (n, N, r_max) view: every backend takes
    those strides (forward and gradients as with a contiguous B)."""
    index = torch.tensor([0, 2, 2, -1, 1, 0, 1])
    case = _case((7,), 24, 20, 3, 4, index, ranks=[4, 2, 3])
    case["lora_B"] = case["lora_B"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not case["lora_B"].is_contiguous()
    check_multi(case, torch.float32, backend=backend)


@pytest.mark.parametrize("pattern", ["runs", "scattered", "per sample", "base only"])
def test_grouping_on_the_host_matches_the_tensor_path(monkeypatch, pattern):
    """Small batches are grouped from one host read of the index, large ones with tensor ops: both give the
    same segments and order (checked by forcing each path on the same indices)."""
    from fastlora import grouping as grouping_module

    g = torch.Generator().manual_seed(5)
    shapes = {"runs": (6, 5), "scattered": (37,), "per sample": (4, 16), "base only": (9,)}
    rows = shapes[pattern]
    if pattern == "runs":
        index = torch.tensor([2, 2, 0, 0, -1, 2])
    elif pattern == "per sample":
        index = torch.tensor([1, -1, 1, 0])
    elif pattern == "base only":
        index = torch.full((9,), -1)
    else:
        index = torch.randint(-1, 3, (37,), generator=g)
    results = []
    for host_rows in (10**6, 0):
        monkeypatch.setattr(grouping_module, "_HOST_ROWS", host_rows)
        results.append(fastlora.group_rows(index, 3, rows))
    host, tensors = results
    assert host.segments == tensors.segments
    assert (host.order is None) == (tensors.order is None)
    if host.order is not None:
        assert torch.equal(host.order, tensors.order)
    assert (host.sample_index is None) == (tensors.sample_index is None)
    for host_rows in (10**6, 0):
        monkeypatch.setattr(grouping_module, "_HOST_ROWS", host_rows)
        with pytest.raises(ValueError, match=r"adapter_index: expected values in \[-1, 3\).*got \[3\]"):
            fastlora.group_rows(torch.tensor([0, 3, 1]), 3, (3,))
