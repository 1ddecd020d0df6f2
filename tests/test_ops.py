"""The op layer: torch.library registration (opcheck), torch.compile, autocast, and the eager fast path."""

from __future__ import annotations

import collections

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch._inductor.config
import torch.nn as nn

import fastlora
from fastlora import reference
from fastlora.ops import LoRALinearFunction

from conftest import make_case, skip_if_unsupported


def _op_args(p, bias=True, train_base=False, lead=(2, 5), backend=""):
    t = make_case(lead, 12, 9, 3, bias=bias, train_base=train_base).tensors(torch.float32, torch.float32)
    seed = torch.tensor([17]) if p > 0 else None
    return (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.5, p, seed, backend)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias,train_base", [(True, False), (False, False), (True, True)])
def test_opcheck(backend, p, bias, train_base):
    torch.library.opcheck(torch.ops.fastlora.lora_linear.default, _op_args(p, bias, train_base))


def test_opcheck_empty_batch(backend):
    torch.library.opcheck(torch.ops.fastlora.lora_linear.default, _op_args(0.0, lead=(0,)))


def test_custom_op_matches_eager_function(backend):
    """The compile path and the eager path run the same backend: identical outputs and gradients."""
    results = []
    for use_op in (True, False):
        args = _op_args(0.3, train_base=True, backend=backend)
        if use_op:
            y = torch.ops.fastlora.lora_linear(*args)
        else:
            y = LoRALinearFunction.apply(*args[:5], tuple(args[5:]))
        y = y[0] if use_op else y
        y.backward(torch.ones_like(y))
        results.append([y] + [a.grad for a in args[:5] if isinstance(a, torch.Tensor) and a.requires_grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_eager_calls_skip_the_dispatcher(request, backend):
    t = make_case((4,), 6, 5, 2).tensors(torch.float32, torch.float32)
    y = fastlora.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0)
    # Composed calls are stock ops: their last is the addmm that adds s·S·Bᵀ onto the base GEMM.
    composed = request.node.callspec.id.startswith("torch-composed")
    assert type(y.grad_fn).__name__ == ("AddmmBackward0" if composed else "LoRALinearFunctionBackward")


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_small_torch_calls_compose_large_ones_run_the_op(dropout_p):
    """The torch backend's size thresholds (elements of x, and of y): stock ops up to them, the op above."""
    from fastlora.backends import torch_backend

    limit = torch_backend._COMPOSE_MAX if dropout_p == 0 else torch_backend._COMPOSE_MAX_DROPOUT
    with fastlora.use_backend("torch"):
        for rows, k, n, want in ((limit // 64, 64, 8, "AddmmBackward0"), (limit // 64 + 1, 64, 8, "LoRALinearFunctionBackward"),
                                 (torch_backend._COMPOSE_MAX // 64 + 1, 8, 64, "LoRALinearFunctionBackward")):  # fmt: skip
            t = make_case((rows,), k, n, 2).tensors(torch.float32, torch.float32)
            y = fastlora.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0, dropout_p)
            assert type(y.grad_fn).__name__ == want, (rows, k, n)


def _graph_nodes(y: torch.Tensor) -> collections.Counter:
    """How many autograd nodes of each kind y's graph has (AccumulateGrad left out)."""
    seen, stack, names = set(), [y.grad_fn], collections.Counter()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ != "AccumulateGrad":
            names[type(node).__name__] += 1
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("dtype,dropout_p", [(torch.float32, 0.0), (torch.float32, 0.1), (torch.bfloat16, 0.0)])
def test_smallest_torch_calls_go_through_delta_w(dtype, dropout_p):
    """Up to _DELTA_MAX multiply-adds, N·K·(M + 3r) merged (fp32 without dropout) or N·K·3·(M + r), a
    composed call builds ΔW = s·B·A: x·(W + ΔW)ᵀ + b is two GEMM nodes and a transpose; (x·Wᵀ + b) + x̂·ΔWᵀ
    adds one GEMM, not two, for the LoRA term. Past the threshold it goes through S (two GEMMs)."""
    from fastlora.backends import torch_backend

    merged = dtype == torch.float32 and dropout_p == 0.0
    k, n, r = 16, 8, 2
    per_row = n * k if merged else 3 * n * k
    fixed = 3 * n * k * r
    largest = (torch_backend._DELTA_MAX - fixed) // per_row
    with fastlora.use_backend("torch"):
        for rows, delta in ((largest, True), (largest + 1, False)):
            t = make_case((rows,), k, n, r).tensors(dtype, torch.float32)
            y = fastlora.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.5, dropout_p)
            nodes = _graph_nodes(y)
            if merged and delta:
                assert nodes == {"AddmmBackward0": 2, "TBackward0": 1}, rows
            elif delta:  # mm(B, A), its transpose; the base GEMM and the one adding x̂·ΔWᵀ
                assert nodes["MmBackward0"] == 1 and nodes["TBackward0"] == 1 and nodes["AddmmBackward0"] == 2, rows
            else:  # through S: x̂·Aᵀ (mm, A's transpose), then S·Bᵀ (B's transpose) added onto the base GEMM
                assert nodes["MmBackward0"] == 1 and nodes["TBackward0"] == 2 and nodes["AddmmBackward0"] == 2, rows


def test_calls_without_gradients_save_nothing(backend):
    """No input requires grad (or grad mode is off): the output has no autograd graph at all."""
    t = make_case((5,), 6, 7, 3).tensors(torch.float32, torch.float32)
    plain = {k: (v.detach() if v is not None else None) for k, v in t.items()}
    y = fastlora.lora_linear(plain["x"], plain["weight"], plain["bias"], plain["lora_A"], plain["lora_B"], 0.5)
    assert y.grad_fn is None and not y.requires_grad
    with torch.no_grad():
        y2 = fastlora.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.5)
    assert y2.grad_fn is None
    torch.testing.assert_close(y, y2)


def _model(dropout):
    torch.manual_seed(0)
    model = nn.Sequential(
        fastlora.LoRALinear(24, 40, r=4, lora_dropout=dropout),
        nn.GELU(),
        fastlora.LoRALinear(40, 16, r=8, lora_alpha=16, lora_dropout=dropout, bias=False),
    )
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B["default"])  # non-zero, so the adapter path shows in the output
    return model


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compile_fullgraph_one_frame_no_recompiles(request, backend, compile_backend, dropout):
    # Composed torch calls draw their mask with F.dropout (TorchBackend.compose), compiled ones from a seed.
    same_masks = dropout == 0 or not request.node.callspec.id.startswith("torch-composed")
    torch._dynamo.reset()
    model = _model(dropout)
    counter = torch._dynamo.testing.CompileCounterWithBackend(compile_backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    # Inductor draws random numbers (here: the dropout seed) with its own generator unless told to fall
    # back to eager's; falling back lets the compiled model be compared with the eager one.
    with torch._dynamo.config.patch(error_on_recompile=True), torch._inductor.config.patch(fallback_random=True):
        for step in range(3):
            x = torch.randn(3, 7, 24, requires_grad=True)
            torch.manual_seed(step)
            y = compiled(x)
            y.sum().backward()
            grads = [x.grad] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
            model.zero_grad()
            x.grad = None
            torch.manual_seed(step)
            y_eager = model(x)
            y_eager.sum().backward()
            grads_eager = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
            # Inductor re-fuses the GELU and its backward around the op, reordering fp32 arithmetic
            # there: a few ulps of difference that accumulate through the second layer's dX.
            if same_masks:
                torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
                for g, ge in zip(grads, grads_eager):
                    torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-5)
            model.zero_grad()
    assert counter.frame_count == 1


def test_compiled_graph_calls_the_custom_op(backend):
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(_model(0.0), backend=capture, fullgraph=True)
    compiled(torch.randn(5, 24))
    assert "fastlora.lora_linear" in graphs[0].code


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast(backend, dtype):
    """Under autocast the base runs in the autocast dtype like F.linear; fp32 adapters stay fp32 and get
    fp32 gradients; x keeps its fp32 gradient."""
    skip_if_unsupported(backend, dtype)
    case = make_case((2, 9), 32, 20, 4)
    t = case.tensors(torch.float32, torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        y = fastlora.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], case.scaling)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert t["x"].grad.dtype == t["lora_A"].grad.dtype == t["lora_B"].grad.dtype == torch.float32
    low = case.tensors(dtype, dtype)
    want = reference.lora_linear(low["x"], low["weight"], low["bias"], low["lora_A"], low["lora_B"], case.scaling)
    truth = reference.lora_linear(*case.tensors(torch.float64, torch.float64).values(), case.scaling)
    err = ((y.double() - truth).abs().max() / truth.abs().max()).item()
    err_ref = ((want.double() - truth).abs().max() / truth.abs().max()).item()
    assert err <= 2 * err_ref + 2.0**-8


def test_double_backward_raises(request, backend):
    t = make_case((3,), 4, 5, 2).tensors(torch.float32, torch.float32)
    y = fastlora.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0)
    (gx,) = torch.autograd.grad((y * y).sum(), t["x"], create_graph=True)
    if not request.node.callspec.id.startswith("torch-composed"):
        with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
            gx.sum().backward()
        return
    # Composed calls are stock ops, so twice differentiable: second derivatives as the reference's.
    gx.sum().backward()
    ref = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in t.items()}
    y_ref = reference.lora_linear(ref["x"], ref["weight"], ref["bias"], ref["lora_A"], ref["lora_B"], 1.0, None, 0.0)
    (gx_ref,) = torch.autograd.grad((y_ref * y_ref).sum(), ref["x"], create_graph=True)
    gx_ref.sum().backward()
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(t[name].grad, ref[name].grad, rtol=1e-5, atol=1e-6)
