"""DoRA (fastlora.dora_linear, LoRALinear/inject with use_dora, PEFT's files, accelerate) against a float64
evaluation of PEFT's formula and against PEFT's own DoRA layers."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as PeftLinear
from transformers import LlamaConfig, LlamaForCausalLM

import fastlora
from fastlora import reference
from fastlora.backends import draw_seed, get_backend
from fastlora.dora import clear_norm_cache, dora_norm
from fastlora.testing import FLOOR, keep_mask_for, layout, rel_err
from conftest import cpu_backends, launches_with_flag
from snapshot import assert_unchanged, snapshot

BACKENDS = cpu_backends()


def _inputs(lead, k, n, r, *, bias=True, train_base=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(*lead, k, generator=g),
        "weight": torch.randn(n, k, generator=g) / k**0.5,
        "bias": torch.randn(n, generator=g) if bias else None,
        "lora_A": torch.randn(r, k, generator=g) / k**0.5,
        "lora_B": torch.randn(n, r, generator=g) * 0.5,
        "magnitude": torch.rand(n, generator=g) + 0.5,
    }
    grads = {"x", "lora_A", "lora_B", "magnitude"} | ({"weight", "bias"} if train_base else set())
    return t, grads


def _grads(fn, t: dict, wanted: set, grad_out_seed=1):
    leaves = {k: (v.detach().clone().requires_grad_(k in wanted) if v is not None else None) for k, v in t.items()}
    y = fn(**leaves)
    # Drawn in float64 and rounded: randn draws other numbers in other dtypes (past 16 elements), and every
    # run compared must see the same gradient.
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_out_seed), dtype=torch.float64).to(y.dtype)
    keys = sorted(wanted)
    gs = torch.autograd.grad(y, [leaves[k] for k in keys], g, allow_unused=False) if y.numel() else [
        torch.zeros_like(leaves[k]) for k in keys]  # fmt: skip
    return {"y": y.detach(), **dict(zip(keys, gs))}


def _reference(mask, p, s):
    def fn(x, weight, bias, lora_A, lora_B, magnitude):
        return reference.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, s, mask, p)

    return fn


def _assert_exact(ours: dict, t: dict, wanted: set, mask, p, s):
    """Each output is within 2x PyTorch's own fp32 error (the reference in fp32) plus a floor, against fp64."""
    t64 = {k: (None if v is None else v.double()) for k, v in t.items()}
    m64 = None if mask is None else mask
    truth = _grads(_reference(m64, p, s), t64, wanted)
    torch32 = _grads(_reference(mask, p, s), t, wanted)
    for key, value in truth.items():
        got, own = rel_err(ours[key], value), rel_err(torch32[key], value)
        assert got <= 2 * own + 16 * FLOOR[torch.float32], (key, got, own)


CASES = [  # (lead, K, N, r)
    ((1,), 1, 1, 1),
    ((5,), 7, 3, 1),
    ((2, 9), 13, 11, 4),
    ((3, 5), 33, 17, 16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,k,n,r", CASES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["contiguous", "strided"])
def test_op_matches_float64(backend, lead, k, n, r, p, kind):
    t, wanted = _inputs(lead, k, n, r, train_base=(kind == "strided"), seed=k + r)
    t["x"] = layout(t["x"], kind)
    s = 0.7

    def ours(x, weight, bias, lora_A, lora_B, magnitude):
        gen = torch.Generator().manual_seed(7)
        return fastlora.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, s, p, True, generator=gen)

    with fastlora.use_backend(backend):
        got = _grads(ours, t, wanted)
    mask = keep_mask_for(backend, 7, t["x"].shape, p) if p > 0 else None
    _assert_exact(got, t, wanted, mask, p, s)
    if p > 0 and mask.numel() >= 30:
        assert not mask.all() and mask.any()  # the dropout case really dropped


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(6,), (2, 3)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_output_can_be_modified_in_place(backend, lead, p):
    """As F.linear's: the output is not a view, so an in-place op on it keeps the gradients right."""
    t, wanted = _inputs(lead, 8, 5, 2)
    for name in wanted:
        t[name].requires_grad_()
    with fastlora.use_backend(backend):
        y = fastlora.dora_linear(*t.values(), 0.5, p)
        assert not y._is_view()
        y.mul_(2.0).sum().backward()
    assert t["x"].grad is not None and t["lora_A"].grad is not None


@pytest.mark.skipif("triton" not in BACKENDS, reason="runs the Triton kernels through the interpreter")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("bias,rank", [(True, 5), (False, 5), (True, 130)])
def test_triton_dora_epilogue_against_float64(monkeypatch, tf32, arch, dtype, bias, rank):
    """At dropout 0 the Triton kernels take DoRA's scale c themselves (DORA): the forward GEMM stores D and
    y = c ⊙ D + b from one epilogue, the pass over G gives Σ g ⊙ D beside dS and dB, dX scales G's tiles in
    its main loop; on the pointer main loops (sm_80) and the TMA ones (sm_90). Output and every gradient
    within 2x PyTorch's own same-dtype error (plus a floor) of float64."""
    from fastlora.kernels import lora_expand, lora_linear

    monkeypatch.setattr(lora_linear, "INTERPRETED_ARCH", arch)
    dora_launches = launches_with_flag(monkeypatch, [(lora_linear, "_FWD"), (lora_linear, "_FWD_TMA"), (lora_linear, "_BWD"),
                                                     (lora_linear, "_BWD_TMA"), (lora_expand, "_BWD")], "DORA")  # fmt: skip
    # rank 130: the pass over G runs the rank in two programs; Σ g ⊙ D comes from the first alone.
    # K = N = 48: rows of 16-element multiples, which every supported Triton's interpreter takes by TMA.
    t, wanted = _inputs((3, 13), 48, 48, rank, bias=bias, seed=3)
    s = 0.8
    with fastlora.use_backend("triton"):
        got = _grads(lambda **a: fastlora.dora_linear(**a, scaling=s), {k: _cast(v, dtype) for k, v in t.items()},
                     wanted)  # fmt: skip
    truth = _grads(lambda **a: reference.dora_linear(**a, scaling=s), {k: _cast(v, torch.float64) for k, v in t.items()},
                   wanted)  # fmt: skip
    own = _grads(lambda **a: reference.dora_linear(**a, scaling=s), {k: _cast(v, dtype) for k, v in t.items()}, wanted)
    gemms = ["lora_linear._FWD", "lora_linear._BWD"] if arch == 80 else ["lora_linear._FWD_TMA", "lora_linear._BWD_TMA"]
    assert sorted(dora_launches) == sorted([*gemms, "lora_expand._BWD"])
    for key, value in truth.items():
        e_got, e_own = rel_err(got[key], value), rel_err(own[key], value)
        assert e_got <= 2 * e_own + FLOOR[dtype], (key, e_got, e_own)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_eval_and_no_grad(backend):
    t, _ = _inputs((4,), 10, 6, 2, bias=False)
    s = 1.5
    with fastlora.use_backend(backend), torch.no_grad():
        y = fastlora.dora_linear(*t.values(), s, 0.5, training=False)  # eval: no dropout
    truth = reference.dora_linear(*(None if v is None else v.double() for v in t.values()), s)
    torch32 = reference.dora_linear(*t.values(), s)
    assert rel_err(y, truth) <= 2 * rel_err(torch32, truth) + 16 * FLOOR[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_empty_batch(backend, p):
    t, _ = _inputs((0,), 6, 5, 2)
    x = t.pop("x").requires_grad_()
    m = t["magnitude"].requires_grad_()
    with fastlora.use_backend(backend):
        y = fastlora.dora_linear(x, *t.values(), 0.5, p)
        y.sum().backward()
    assert y.shape == (0, 5) and x.grad.shape == (0, 6)
    assert torch.equal(m.grad, torch.zeros(5))


def test_norm_without_the_sum_and_its_cache():
    clear_norm_cache()
    t, _ = _inputs((1,), 19, 7, 3)
    w = t["weight"].clone()
    a = nn.Parameter(t["lora_A"].clone())
    b = nn.Parameter(t["lora_B"].clone())

    def direct(s=0.9):
        return torch.linalg.norm(w.double() + s * (b.double() @ a.double()), dim=1)

    first = dora_norm(w, a, b, 0.9)
    assert rel_err(first, direct()) <= 1e-6
    assert dora_norm(w, a, b, 0.9) is first  # unchanged W, A, B: the cached norm
    with torch.no_grad():
        a[0, 0] += 1.0  # in place on A
    assert rel_err(dora_norm(w, a, b, 0.9), direct()) <= 1e-6
    b.grad = torch.ones_like(b)
    torch.optim.SGD([b], lr=0.1).step()  # an optimizer step on B
    assert rel_err(dora_norm(w, a, b, 0.9), direct()) <= 1e-6
    w.mul_(2.0)  # in place on the frozen W: its cached ‖W‖² must go too
    assert rel_err(dora_norm(w, a, b, 0.9), direct()) <= 1e-6
    w.t().mul_(0.5)  # through a view: the version counter is shared
    assert rel_err(dora_norm(w, a, b, 0.9), direct()) <= 1e-6
    assert rel_err(dora_norm(w, a, b, 0.3), direct(0.3)) <= 1e-6  # another scaling, another norm


def test_layer_norm_follows_training_steps():
    """A DoRA layer trained with an optimizer: every step's output equals a fresh evaluation (no stale norm)."""
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(12, 9, r=2, lora_alpha=4, use_dora=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    x = torch.randn(6, 12)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
        want = reference.dora_linear(x, layer.weight, layer.bias, layer.lora_A["default"], layer.lora_B["default"],
                                     layer.lora_magnitude_vector["default"], layer.scaling["default"])  # fmt: skip
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


def test_errors():
    t, _ = _inputs((3,), 6, 5, 2)
    x, w, b, a, bb, m = t.values()
    with pytest.raises(ValueError, match=r"magnitude: expected shape \(out_features=5,\), got tensor of shape \(4,\)"):
        fastlora.dora_linear(x, w, b, a, bb, m[:4], 1.0)
    with pytest.raises(TypeError, match=r"magnitude: expected a floating-point tensor, got dtype torch.int64"):
        fastlora.dora_linear(x, w, b, a, bb, torch.ones(5, dtype=torch.long), 1.0)
    with pytest.raises(TypeError, match=r"magnitude: expected a torch.Tensor, got list"):
        fastlora.dora_linear(x, w, b, a, bb, [1.0] * 5, 1.0)
    with pytest.raises(ValueError, match=r"lora_B: expected shape \(out_features=5, r=2\)"):
        fastlora.dora_linear(x, w, b, a, bb[:3], m, 1.0)
    with pytest.raises(ValueError, match=r"dropout_p: expected a probability in \[0, 1\), got 1.0"):
        fastlora.dora_linear(x, w, b, a, bb, m, 1.0, 1.0)
    nf4 = fastlora.nf4.quantize(torch.randn(5, 64), 64, False) if hasattr(fastlora, "nf4") else None
    if nf4 is not None:
        with pytest.raises(NotImplementedError, match=r"weight: DoRA on a quantised \(NF4\) base"):
            fastlora.dora_linear(torch.randn(3, 64), nf4, None, torch.randn(2, 64), torch.randn(5, 2), m, 1.0)


# --- against PEFT's layer -------------------------------------------------------------------------------


def _twins(k=14, n=10, r=3, alpha=5, p=0.0, bias=True):
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, use_dora=True, init_lora_weights=False)
    theirs = PeftLinear(copy.deepcopy(linear), "default", config, r=r, lora_alpha=alpha, lora_dropout=p, use_dora=True,
                        init_lora_weights=False)  # fmt: skip
    with torch.no_grad():  # m away from its initial ‖W + s·B·A‖, so that c ≠ 1 carries signal
        theirs.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, n))
    ours = fastlora.LoRALinear.from_linear(copy.deepcopy(linear), r, alpha, p, use_dora=True)
    with torch.no_grad():
        ours.lora_A["default"].copy_(theirs.lora_A["default"].weight)
        ours.lora_B["default"].copy_(theirs.lora_B["default"].weight)
        ours.lora_magnitude_vector["default"].copy_(theirs.lora_magnitude_vector["default"].weight)
    return theirs, ours


def _pairs(theirs, ours):
    return [
        (theirs.lora_A["default"].weight, ours.lora_A["default"]),
        (theirs.lora_B["default"].weight, ours.lora_B["default"]),
        (theirs.lora_magnitude_vector["default"].weight, ours.lora_magnitude_vector["default"]),
    ]


def _compare(theirs, ours, x, run_theirs=None, run_ours=None):
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt = (run_theirs or theirs)(xt)
    yo = (run_ours or ours)(xo)
    torch.testing.assert_close(yo, yt, rtol=1e-5, atol=1e-6)
    g = torch.randn(yt.shape, generator=torch.Generator().manual_seed(4))
    yt.backward(g), yo.backward(g)
    torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-5, atol=1e-6)
    for pt, po in _pairs(theirs, ours):
        torch.testing.assert_close(po.grad, pt.grad, rtol=1e-5, atol=1e-6)
        pt.grad = po.grad = None


def test_magnitude_initialised_as_peft():
    torch.manual_seed(0)
    linear = nn.Linear(9, 6)
    theirs = PeftLinear(copy.deepcopy(linear), "default", LoraConfig(r=2, use_dora=True), r=2, use_dora=True)
    ours = fastlora.LoRALinear.from_linear(copy.deepcopy(linear), 2, use_dora=True)
    torch.testing.assert_close(ours.lora_magnitude_vector["default"], theirs.lora_magnitude_vector["default"].weight)
    assert ours.lora_magnitude_vector["default"].requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_peft(backend, bias):
    theirs, ours = _twins(bias=bias)
    x = torch.randn(2, 5, 14)
    with fastlora.use_backend(backend):
        _compare(theirs, ours, x)
        theirs.eval(), ours.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


class _SharedMask(nn.Module):
    """PEFT's dropout module replaced by one applying a given keep-mask, the one fastlora's backend drew."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.to(x.dtype) / (1 - self.p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_peft_under_a_shared_dropout_mask(backend):
    p = 0.25
    theirs, ours = _twins(p=p)
    x = torch.randn(3, 7, 14)
    with fastlora.use_backend(backend):
        torch.manual_seed(21)
        seed = draw_seed(torch.device("cpu"), None)  # what the op draws after the same manual_seed
        mask = get_backend(backend).keep_mask(seed, (21, 14), p, torch.device("cpu")).view(3, 7, 14)
        assert not mask.all()
        theirs.lora_dropout["default"] = _SharedMask(mask, p)

        def run_ours(xo):
            torch.manual_seed(21)
            return ours(xo)

        _compare(theirs, ours, x, run_ours=run_ours)


def test_merge_unmerge_as_peft():
    theirs, ours = _twins()
    x = torch.randn(4, 14)
    original = ours.weight.detach().clone()
    theirs.merge()
    ours.merge()
    torch.testing.assert_close(ours.weight, theirs.base_layer.weight, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    ours.unmerge()
    assert torch.equal(ours.weight, original)  # bit for bit


def test_several_adapters_follow_peft():
    """A LoRA adapter and a DoRA adapter active together, either order: PEFT's DoRA rescales the result so far."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 8))
    lora_cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False)
    dora_cfg = LoraConfig(r=3, lora_alpha=3, target_modules=["0"], use_dora=True, init_lora_weights=False)
    theirs = get_peft_model(copy.deepcopy(base), lora_cfg, adapter_name="plain")
    theirs.add_adapter("dora", dora_cfg)
    layer = theirs.base_model.model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["dora"].weight.mul_(1.3)
    ours = fastlora.inject(copy.deepcopy(base), ["0"], r=2, lora_alpha=4, adapter_name="plain")
    fastlora.inject(ours, ["0"], r=3, lora_alpha=3, adapter_name="dora", use_dora=True)
    mine = ours[0]
    with torch.no_grad():
        for name in ("plain", "dora"):
            mine.lora_A[name].copy_(layer.lora_A[name].weight)
            mine.lora_B[name].copy_(layer.lora_B[name].weight)
        mine.lora_magnitude_vector["dora"].copy_(layer.lora_magnitude_vector["dora"].weight)
    x = torch.randn(5, 12)
    for order in (["plain", "dora"], ["dora", "plain"]):
        layer.set_adapter(order)
        mine.set_active(order)
        with torch.no_grad():
            torch.testing.assert_close(mine(x), layer(x), rtol=1e-5, atol=1e-6)
    # merged in turn as PEFT merges them, unmerged exactly
    original = mine.weight.detach().clone()
    layer.set_adapter(["plain", "dora"]), mine.set_active(["plain", "dora"])
    layer.merge(), mine.merge()
    torch.testing.assert_close(mine.weight, layer.base_layer.weight, rtol=1e-6, atol=1e-7)
    mine.unmerge()
    assert torch.equal(mine.weight, original)


# --- models: inject, PEFT files, accelerate ---------------------------------------------------------------


def _llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _peft_dora(base):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.linspace(0.7, 1.3, p.numel()))
    return model


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


def test_peft_files_both_ways(tmp_path):
    base = _llama()
    theirs = _peft_dora(base)
    want = theirs(input_ids=IDS).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert any(getattr(m, "use_dora", {}).get("default") for m in ours.modules())
    torch.testing.assert_close(ours(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
    fastlora.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(reloaded(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
    # magnitudes really travel: a model injected afresh (m = ‖W‖) computes something else
    fresh = fastlora.inject(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=8, use_dora=True)
    assert not torch.allclose(fresh(input_ids=IDS).logits, want)


def test_bad_dora_files_leave_the_model_untouched(tmp_path):
    from safetensors.torch import load_file, save_file

    base = _llama()
    _peft_dora(base).save_pretrained(tmp_path / "ok")
    model = fastlora.inject(copy.deepcopy(base), ["k_proj"], r=2)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    for name, edit, error, message in [
        ("short", lambda t: t.update({key: t[key][:5]}), ValueError, r"wrong shapes: .*q_proj.lora_magnitude_vector: "
         r"expected \(32,\), got \(5,\)"),
        ("nan", lambda t: t[key].fill_(float("nan")), ValueError, r"NaN or Inf values: \[.*lora_magnitude_vector"),
        ("missing", lambda t: t.pop(key), ValueError, r"use_dora is true but .* lacks the DoRA magnitudes \['.*q_proj.lora_magnitude_vector'\]"),
    ]:  # fmt: skip
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
        tensors = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))
        edit(tensors)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        before = snapshot(model)
        with pytest.raises(error, match=message):
            fastlora.load_adapter(model, folder, adapter_name="d")
        assert_unchanged(model, before)
    # The magnitudes of a DoRA file under a config that says use_dora is false: named by the config key.
    config = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    folder = tmp_path / "not dora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    (folder / "adapter_model.safetensors").write_bytes((tmp_path / "ok" / "adapter_model.safetensors").read_bytes())
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"use_dora is false but .* holds DoRA magnitudes \['.*lora_magnitude_vector'"):
        fastlora.load_adapter(model, folder, adapter_name="d")
    assert_unchanged(model, before)


def test_inject_refuses_dora_where_not_implemented():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match=r"use_dora: DoRA on 0 \(Embedding\) is not implemented"):
        fastlora.inject(model, ["0", "1"], r=2, use_dora=True)
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match=r"use_dora: expected"):
        fastlora.inject(model, ["1"], r=2, use_dora="yes")
    assert_unchanged(model, before)
    fastlora.inject(model, ["1"], r=2, use_dora=True)
    with pytest.raises(NotImplementedError, match=r"weights: combining DoRA adapters \(\['default'\]"):
        fastlora.combine(model, {"default": 1.0}, "sum")
    with pytest.raises(NotImplementedError, match=r"adapter_names: mixed batches with DoRA adapters"):
        with fastlora.adapter_names(model, ["default"]):
            model(torch.tensor([1]))


def test_accelerate_runs_peft_dora_fused():
    base = _llama()
    theirs = _peft_dora(base)
    ours = copy.deepcopy(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to PEFT
        fastlora.accelerate(ours)
    layers = [m for n, m in ours.named_modules() if n.endswith(("q_proj", "v_proj"))]
    assert layers and all(type(m).__name__ == "FusedLoraLinear" for m in layers)
    ours.train(), theirs.train()  # dropout 0: PEFT's "no dropout" branch in training too
    yt, yo = theirs(input_ids=IDS).logits, ours(input_ids=IDS).logits
    assert type(layers[0](torch.randn(1, 32, requires_grad=True)).grad_fn).__name__ == "DoRALinearFunctionBackward"
    torch.testing.assert_close(yo, yt, rtol=1e-5, atol=1e-5)
    yt.square().sum().backward()
    yo.square().sum().backward()
    checked = 0
    for (name, pt), (_, po) in zip(theirs.named_parameters(), ours.named_parameters()):
        if pt.requires_grad:
            torch.testing.assert_close(po.grad, pt.grad, rtol=1e-4, atol=1e-6, msg=name)
            checked += "lora_magnitude_vector" in name
    assert checked == 4  # every magnitude's gradient compared
    # merge / unmerge stay PEFT's, and the fused forward comes back after unmerge
    ours.eval(), theirs.eval()
    ours.merge_adapter(), theirs.merge_adapter()
    torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
