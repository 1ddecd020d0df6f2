"""QLoRA: LoRA on a 4-bit (NF4) base. The layer's numerics against float64 on the dequantised weight, the
whole workflow on a quantised model, state dicts without requantisation, merging into a 4-bit base, the
all-or-nothing checks of ``quantize`` and its memory claims."""

from __future__ import annotations

import copy
import json
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastlora
from fastlora import nf4, reference
from fastlora.layers import LoRALinear
from fastlora.model import lora_layers
from fastlora.quantized import NF4Linear

from conftest import FLOOR, rel_err, run
from snapshot import assert_unchanged, snapshot
from test_model import llama, logits, tokens

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _randomise_b(model: nn.Module, seed: int = 3) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name in layer.adapters:
                layer.lora_B[name].normal_(std=0.1)


def _qlora(base: nn.Module, compute_dtype=torch.float32, **inject_kwargs) -> nn.Module:
    model = fastlora.quantize(copy.deepcopy(base), compute_dtype=compute_dtype)
    torch.manual_seed(2)  # A's initialisation
    fastlora.inject(model, TARGETS, r=4, lora_alpha=8, **inject_kwargs)
    _randomise_b(model)
    return model


def _codes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".weight_" in k}


# --- the layer's numerics -------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,k,n,r", [((5,), 64, 48, 4), ((2, 3), 100, 33, 3), ((7,), 33, 17, 1)])
def test_layer_output_and_gradients_against_float64(backend, compute_dtype, lead, k, n, r):
    """y, dx, dA, dB against a float64 evaluation on the dequantised weight: error at most 2x PyTorch's own
    error in the compute dtype plus a unit-roundoff floor. K need not be a multiple of the blocksize (blocks
    run across row ends)."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        linear.bias.copy_(torch.randn(n, generator=g))
    base = NF4Linear.from_linear(linear, compute_dtype=compute_dtype, blocksize=32 if k == 33 else 64)
    layer = LoRALinear.from_linear(base, r=r, lora_alpha=2 * r)
    assert layer.quantized and layer.weight is None and layer.base_layer is base
    assert layer.lora_A["default"].dtype == torch.float32  # fp32 adapters, as PEFT keeps them
    with torch.no_grad():
        layer.lora_B["default"].normal_(generator=g)
    w = nf4.dequantize(base.weight, torch.float32).double()
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64)
    grad_out = torch.randn(*lead, n, generator=g, dtype=torch.float64)
    s = layer.scaling["default"]

    def ref(x, weight, bias, lora_A, lora_B):
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, s)

    def leaves(dtype, adapter_dtype):
        def leaf(t, dt):
            return t.detach().to(dt, copy=True).requires_grad_()

        return {"x": leaf(x, dtype), "weight": w.to(dtype), "bias": linear.bias.detach().to(dtype),
                "lora_A": leaf(layer.lora_A["default"], adapter_dtype),
                "lora_B": leaf(layer.lora_B["default"], adapter_dtype)}  # fmt: skip

    truth = run(ref, leaves(torch.float64, torch.float64), grad_out)
    pytorch = run(ref, leaves(compute_dtype, compute_dtype), grad_out)
    xs = x.to(compute_dtype).requires_grad_()
    y = layer(xs)
    y.backward(grad_out.to(y.dtype))
    got = {"y": y.detach(), "dx": xs.grad, "dlora_A": layer.lora_A["default"].grad, "dlora_B": layer.lora_B["default"].grad}
    assert y.dtype == compute_dtype and got["dlora_A"].dtype == torch.float32
    for key, value in got.items():
        e_ours, e_torch = rel_err(value, truth[key]), rel_err(pytorch[key], truth[key])
        assert e_ours <= 2 * e_torch + FLOOR[compute_dtype], f"{key}: {e_ours:.3e} > 2 x {e_torch:.3e} + floor"


def test_compute_dtype_cast_like_bitsandbytes():
    """x is cast to the compute dtype, the output comes back in x's dtype; the plain NF4Linear is
    F.linear on the dequantised weight, bit for bit."""
    torch.manual_seed(0)
    linear = nn.Linear(70, 20)
    base = NF4Linear.from_linear(linear, compute_dtype=torch.bfloat16)
    assert base.bias is linear.bias and base.compute_dtype == torch.bfloat16
    x = torch.randn(3, 70)
    want = F.linear(x.bfloat16(), nf4.dequantize(base.weight, torch.bfloat16), linear.bias.bfloat16()).float()
    assert base(x).dtype == torch.float32 and torch.equal(base(x), want)
    layer = LoRALinear.from_linear(base, r=2)
    assert torch.equal(layer(x), want)  # B = 0: the base alone
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_nf4linear_errors():
    with pytest.raises(TypeError, match="compute_dtype"):
        NF4Linear(8, 4, compute_dtype=torch.float64)
    with pytest.raises(ValueError, match="blocksize"):
        NF4Linear(8, 4, blocksize=48)
    with pytest.raises(TypeError, match="linear"):
        NF4Linear.from_linear(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="weight"):
        NF4Linear.from_linear(nn.Linear(8, 4).requires_grad_(False).apply(lambda m: m.weight.fill_(float("nan"))))


# --- the workflow on a quantised model -----------------------------------------------------------------


def test_quantize_before_or_after_inject_gives_the_same_model():
    base = llama()
    before = _qlora(base)
    torch.manual_seed(2)
    after = fastlora.inject(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8)
    _randomise_b(after)
    fastlora.quantize(after, compute_dtype=torch.float32)
    a, b = before.state_dict(), after.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.layers.0.self_attn.q_proj.base_layer.weight_packed" in a
    assert isinstance(before.lm_head, nn.Linear)  # the output head stays full precision, as bitsandbytes does
    ids = tokens()
    assert torch.equal(logits(before, ids), logits(after, ids))
    trainable = {n for n, p in before.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_several_adapters_switch_disable_delete():
    base = llama()
    model = _qlora(base)
    fastlora.inject(model, ["q_proj"], r=2, lora_alpha=2, adapter_name="other")
    _randomise_b(model, seed=5)
    ids = tokens()
    plain = fastlora.quantize(copy.deepcopy(base), compute_dtype=torch.float32)
    want_base = logits(plain, ids)
    with fastlora.disable_adapters(model):
        assert torch.equal(logits(model, ids), want_base)
    out_other = logits(model, ids)
    fastlora.set_adapter(model, "default")
    out_default = logits(model, ids)
    fastlora.set_adapter(model, ["default", "other"])
    both = logits(model, ids)
    for a, b in [(out_other, out_default), (both, out_default), (both, out_other)]:
        assert not torch.allclose(a, b)
    # Each adapter's term is the float64 one, through a single layer: several adapters add up.
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, layer.in_features)
    w = nf4.dequantize(layer.base_layer.weight, torch.float32).double()
    want = x.double() @ w.t()
    for n in ("default", "other"):
        want += layer.scaling[n] * (x.double() @ layer.lora_A[n].double().t()) @ layer.lora_B[n].double().t()
    assert rel_err(layer(x), want) < 1e-5
    fastlora.delete_adapter(model, "other")
    assert fastlora.list_adapters(model) == ["default"]
    assert torch.equal(logits(model, ids), out_default)


def test_training_with_dropout_and_all_linear():
    """Dropout in training mode runs through the fused op on the NF4 base (reproducible under a seed); a
    second "all-linear" injection puts its adapter beside the first, never on a LoRA layer's base_layer."""
    model = _qlora(llama(), compute_dtype=torch.bfloat16, lora_dropout=0.1)
    fastlora.inject(model, "all-linear", r=2, adapter_name="all", lora_dropout=0.2)
    assert not any(isinstance(m, LoRALinear) for layer in lora_layers(model).values() for m in layer.base_layer.modules())
    assert isinstance(model.lm_head, nn.Linear)
    fastlora.set_adapter(model, ["default", "all"])
    _randomise_b(model)
    model.train()
    ids = tokens()

    def step():
        torch.manual_seed(5)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (loss1, grads1), (loss2, grads2) = step(), step()
    assert torch.isfinite(loss1) and torch.equal(loss1, loss2)
    assert grads1 and all(torch.equal(grads1[n], grads2[n]) and g.abs().sum() > 0 for n, g in grads1.items())
    assert all(g.dtype == torch.float32 for g in grads1.values())
    model.eval()
    assert not torch.equal(logits(model, ids), model.train()(input_ids=ids).logits)


def test_adapter_files_are_plain_lora_files(tmp_path):
    """A QLoRA run's adapter files are ordinary LoRA files: they load into a quantised model (same output)
    and into a full-precision one."""
    from peft import PeftModel

    base = llama()
    model = _qlora(base, lora_dropout=0.05)
    fastlora.save_adapter(model, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_dropout"] == 0.05
    ids = tokens()
    model.eval()
    fresh = fastlora.load_adapter(fastlora.quantize(copy.deepcopy(base), compute_dtype=torch.float32), tmp_path)
    assert torch.equal(logits(fresh.eval(), ids), logits(model, ids))
    dense = fastlora.load_adapter(copy.deepcopy(base), tmp_path).eval()
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert torch.allclose(logits(dense, ids), logits(theirs, ids), atol=1e-5)


def test_gpt2_conv1d_quantised_before_or_after_inject(tmp_path):
    """GPT-2's Conv1D layers (weights stored (in, out)) are quantised transposed; the adapter config still
    says fan_in_fan_out, as for the full-precision model."""
    from test_model import gpt2

    base = gpt2()
    ids = tokens()
    torch.manual_seed(2)
    before = fastlora.inject(fastlora.quantize(copy.deepcopy(base), compute_dtype=torch.float32), ["c_attn", "c_fc"], r=2)
    torch.manual_seed(2)
    after = fastlora.quantize(fastlora.inject(copy.deepcopy(base), ["c_attn", "c_fc"], r=2), compute_dtype=torch.float32)
    _randomise_b(before), _randomise_b(after)
    assert torch.equal(logits(before, ids), logits(after, ids))
    layer = before.transformer.h[0].attn.c_attn
    want = nf4.quantize(base.transformer.h[0].attn.c_attn.weight.detach().t().contiguous())
    assert torch.equal(layer.base_layer.weight.packed, want.packed)
    fastlora.save_adapter(after, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_combine_on_a_quantised_base():
    model = _qlora(llama())
    fastlora.inject(model, TARGETS, r=4, lora_alpha=4, adapter_name="b")
    _randomise_b(model, seed=9)
    fastlora.combine(model, {"default": 0.5, "b": 0.5}, "mix", method="cat")
    layer = model.model.layers[0].self_attn.v_proj
    want = 0.5 * layer.delta_weight(["default"]) + 0.5 * layer.delta_weight(["b"])
    assert torch.allclose(layer.delta_weight(["mix"]), want, atol=1e-6)
    fastlora.set_adapter(model, "mix")
    assert torch.isfinite(logits(model, tokens())).all()


# --- state dict and safetensors ------------------------------------------------------------------------


def test_state_dict_round_trip_through_safetensors_without_requantising(tmp_path, monkeypatch):
    base = llama()
    model = _qlora(base)
    file = str(tmp_path / "model.safetensors")
    save_file(model.state_dict(), file)
    ids = tokens()
    want = logits(model, ids)

    def refuse(*args, **kwargs):
        raise AssertionError("requantised")

    # Into a model quantised from other weights: the codes are copied in, identical bytes.
    torch.manual_seed(11)
    other = fastlora.inject(fastlora.quantize(llama().apply(_reinit), compute_dtype=torch.float32), TARGETS, r=4,
                            lora_alpha=8)  # fmt: skip
    monkeypatch.setattr(nf4, "quantize", refuse)
    loaded = load_file(file)
    other.load_state_dict(loaded)
    got = other.state_dict()
    assert all(torch.equal(got[k], loaded[k]) for k in loaded)
    assert torch.equal(logits(other, ids), want)

    # Into a skeleton on the meta device (nothing allocated, nothing quantised), assigned.
    with torch.device("meta"):
        skeleton = type(base)(base.config)
    fastlora.quantize(skeleton, compute_dtype=torch.float32)
    fastlora.inject(skeleton, TARGETS, r=4, lora_alpha=8)
    skeleton.load_state_dict(loaded, assign=True)
    skeleton.model.rotary_emb.inv_freq = base.model.rotary_emb.inv_freq  # a non-persistent buffer
    assert torch.equal(logits(skeleton.eval(), ids), want)


def _reinit(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.05)


def test_dtype_casts_keep_the_codes_and_bad_state_dicts_are_refused():
    model = fastlora.quantize(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), compute_dtype=torch.float32,
                              double_quant=False)  # fmt: skip
    before = _codes(model)
    model.to(torch.bfloat16)  # the bias follows; the codes and fp32 absmax keep their dtypes
    assert all(torch.equal(before[k], v) for k, v in _codes(model).items())
    assert model[0].bias.dtype == torch.bfloat16
    assert model(torch.randn(2, 64)).dtype == torch.float32
    sd = model.state_dict()
    sd["0.weight_absmax"] = sd["0.weight_absmax"].bfloat16()
    with pytest.raises(RuntimeError, match="weight_absmax: expected dtype torch.float32"):
        model.load_state_dict(sd)
    double = fastlora.quantize(nn.Sequential(nn.Linear(64, 32)), compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="0.weight_absmax: expected dtype torch.float32"):
        model[0:1].load_state_dict(double.state_dict())


# --- merging into a 4-bit base -------------------------------------------------------------------------


def test_merge_requantises_reports_the_error_and_unmerge_restores_the_codes():
    base = llama()
    model = _qlora(base)
    codes = _codes(model)
    ids = tokens()
    unmerged = logits(model, ids)
    with pytest.warns(UserWarning, match=r"requantising; that changed the merged weight by up to"):
        fastlora.merge(model)
    for layer in lora_layers(model).values():
        exact = nf4.dequantize(layer._unmerged_weight, torch.float32) + layer.delta_weight(["default"])
        error = (nf4.dequantize(layer.base_layer.weight, torch.float32) - exact).abs().max().item()
        assert layer.merge_error == error and 0 < error < 0.2 * exact.abs().max().item()
        assert torch.equal(layer.merged_weight([]), exact)
    merged = logits(model, ids)
    assert torch.allclose(merged, unmerged, atol=0.5) and not torch.equal(merged, unmerged)
    fastlora.unmerge(model)
    after = _codes(model)
    assert all(torch.equal(codes[k], after[k]) for k in codes)  # the original codes, bit for bit
    assert torch.equal(logits(model, ids), unmerged)


@pytest.mark.parametrize("already_merged", [False, True])
def test_failed_merge_rolls_back(monkeypatch, already_merged):
    """A model-wide merge that fails half-way leaves the model as it was (codes, tensor objects, merge
    state), whether the layers had nothing merged or an earlier merge in place."""
    model = _qlora(llama())
    fastlora.inject(model, TARGETS, r=2, lora_alpha=2, adapter_name="b")
    _randomise_b(model, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if already_merged:
            fastlora.merge(model, "default")
        snap = snapshot(model)
        calls = {"n": 0}
        original = LoRALinear.merge

        def flaky(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise MemoryError("simulated")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(LoRALinear, "merge", flaky)
        with pytest.raises(MemoryError):
            fastlora.merge(model, "b")
    assert_unchanged(model, snap)


def test_unload_quantized():
    model = _qlora(llama())

    plain_codes = _codes(fastlora.quantize(llama(), compute_dtype=torch.float32))
    dropped = fastlora.unload(copy.deepcopy(model), merge=False)
    assert not lora_layers(dropped) and isinstance(dropped.model.layers[0].self_attn.q_proj, NF4Linear)
    got = _codes(dropped)
    assert sorted(got) == sorted(plain_codes) and all(torch.equal(got[k], plain_codes[k]) for k in got)
    ids = tokens()
    with pytest.warns(UserWarning, match="unload"):
        kept = fastlora.unload(copy.deepcopy(model), merge=True)
    assert isinstance(kept.model.layers[1].mlp.down_proj, NF4Linear)
    assert torch.allclose(logits(kept, ids), logits(model, ids), atol=0.5)


# --- quantize: bad input, all or nothing ---------------------------------------------------------------


def _mixed_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 8))
    return fastlora.inject(model, ["2"], r=2)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"blocksize": 48}, ValueError, "blocksize"),
        ({"blocksize": True}, ValueError, "blocksize"),
        ({"compute_dtype": torch.float64}, TypeError, "compute_dtype"),
        ({"compute_dtype": "bfloat16"}, TypeError, "compute_dtype"),
        ({"compute_dtype": torch.int8}, TypeError, "compute_dtype"),
        ({"method": "int8"}, ValueError, "method"),
        ({"double_quant": "yes"}, TypeError, "double_quant"),
        ({"target_modules": ["nothing"]}, ValueError, "target_modules"),
        ({"exclude_modules": 3}, TypeError, "exclude_modules"),
    ],
)
def test_quantize_bad_arguments_leave_the_model_untouched(kwargs, error, match):
    model = _mixed_model()
    snap = snapshot(model)
    method = kwargs.pop("method", "nf4")
    with pytest.raises(error, match=match):
        fastlora.quantize(model, method, **kwargs)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["4", "2"])  # a plain Linear, the base of a LoRALinear
def test_quantize_non_finite_weight_names_the_layer(value, where):
    model = _mixed_model()
    with torch.no_grad():
        model.get_submodule(where).weight[3, 5] = value
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"model: {where}\.weight has 1 NaN/Inf"):
        fastlora.quantize(model)
    assert_unchanged(model, snap)


def test_quantize_refusals_and_a_failure_during_the_change(monkeypatch):
    model = _mixed_model()
    fastlora.merge(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="merged adapters"):
        fastlora.quantize(model)
    assert_unchanged(model, snap)
    fastlora.unmerge(model)

    fastlora.quantize(model, compute_dtype=torch.float32, target_modules=["0"])
    snap = snapshot(model)
    with pytest.raises(ValueError, match="compute_dtype: the model already has NF4 layers"):
        fastlora.quantize(model, compute_dtype=torch.bfloat16)
    assert_unchanged(model, snap)
    with pytest.raises(TypeError, match=r"model: 2\.weight is torch.float64"):
        fastlora.quantize(model.double(), compute_dtype=torch.float32)
    model.float()
    snap = snapshot(model)

    real = nf4.quantize
    for failing_call in (1, 2):  # "0" is done; "2" (a LoRALinear) has its base swapped before "4" fails
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == failing_call:
                raise MemoryError("simulated")
            return real(*args, **kwargs)

        monkeypatch.setattr(nf4, "quantize", flaky)
        with pytest.raises(MemoryError):
            fastlora.quantize(model, compute_dtype=torch.float32)
        assert calls["n"] == failing_call
        assert_unchanged(model, snap)
    monkeypatch.undo()
    fastlora.quantize(model, compute_dtype=torch.float32)
    assert isinstance(model[4], NF4Linear) and model[2].quantized
    assert fastlora.quantize(model, compute_dtype=torch.float32, target_modules=["0"]) is model  # already done


# --- memory ----------------------------------------------------------------------------------------------


def test_storage_bits_per_parameter():
    """4096 x 4096 with double quantisation: at most 4.13 bits a parameter, from the bytes stored (shapes
    are the format's, so a meta layer gives the same bytes; checked against a real one of another size)."""
    big = NF4Linear(4096, 4096, bias=False, device="meta")
    assert big.weight.nbytes == sum(b.nbytes for b in big.buffers())
    assert big.weight.bits_per_parameter <= 4.13
    assert NF4Linear(4096, 4096, bias=False, double_quant=False, device="meta").weight.bits_per_parameter == 4.5
    real = NF4Linear.from_linear(nn.Linear(1024, 768, bias=False)).weight
    assert real.nbytes == NF4Linear(1024, 768, bias=False, device="meta").weight.nbytes


class _LiveBytes(TorchDispatchMode):
    """Bytes held by tensors created under this mode that are still alive, and their peak. A storage counts
    while any tensor made on it is alive; storages that existed before (the model's own) never count."""

    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing = existing
        self.storages: dict[int, tuple[int, list]] = {}
        self.peak = 0

    def live(self) -> int:
        total = 0
        for ptr in list(self.storages):
            size, refs = self.storages[ptr]
            if any(r() is not None for r in refs):
                total += size
            else:
                del self.storages[ptr]
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr in self.existing or storage.nbytes() == 0:
                    continue
                size, refs = self.storages.get(ptr, (0, []))
                if not any(r() is not None for r in refs):
                    refs = []
                self.storages[ptr] = (max(size, storage.nbytes()), [*refs, weakref.ref(t)])
        self.peak = max(self.peak, self.live())
        return out


def _peak_extra_bytes(fn, model: nn.Module) -> int:
    existing = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    with _LiveBytes(existing) as tracker:
        fn(model)
    return tracker.peak


def _stack(n: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(1024, 4096, bias=False) if i % 2 == 0 else nn.Linear(4096, 1024, bias=False)
                        for i in range(n)])  # fmt: skip
    if n > 1:
        fastlora.inject(m, ["1"], r=2)  # a LoRALinear's base goes the same way
    return m.to(dtype)


def _extra(fn, m: nn.Module) -> int:
    """Peak bytes allocated by ``fn(m)`` beyond the NF4 storage it leaves in the model."""
    peak = _peak_extra_bytes(fn, m)
    return peak - sum(b.nbytes for b in m.buffers() if b.dtype == torch.uint8 or b.dim() <= 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_works_one_layer_at_a_time(dtype):
    """Peak bytes of everything quantize allocates and has not handed to the model, over the whole call: the
    same for four layers as for one (one layer's temporaries at a time, nothing accumulates), and within one
    layer's quantisation transient, (itemsize + 3) bytes per element (the strict bound, one fp32 copy of a
    layer, is the next test). The same probe on a quantiser that converts the whole model to
    fp32 first exceeds the bound, so the check can fail."""
    one = _extra(lambda m: fastlora.quantize(m), _stack(1, dtype))
    m = _stack(4, dtype)
    four = _extra(lambda m: fastlora.quantize(m), m)
    assert all(isinstance(x, NF4Linear) or x.quantized for x in m)
    assert four <= one + 4096, (four, one)
    assert one <= 4096 * 1024 * (dtype.itemsize + 3), one

    def wasteful(m):
        full = [layer.weight.detach().to(torch.float32, copy=True) for layer in m]
        fastlora.quantize(m)
        del full

    assert _extra(wasteful, _stack(4, dtype)) > one + 4096


def test_quantize_holds_at_most_one_fp32_layer_extra():
    """The strict claim: never more than one layer's weight in fp32 beyond the NF4 storage."""
    assert _extra(lambda m: fastlora.quantize(m), _stack(4, torch.bfloat16)) <= 4096 * 1024 * 4


# --- bitsandbytes models, both ways ----------------------------------------------------------------------


def _bnb_mlp(quant_type="nf4", compute_dtype=torch.bfloat16):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 192), nn.ReLU(), nn.Linear(192, 64, bias=False))
    for i in (0, 2):
        lin = m[i]
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=i == 0,
                              quant_type=quant_type if i == 2 else "nf4")  # fmt: skip
        q.load_state_dict(lin.state_dict())
        m[i] = q.to("cpu")  # bitsandbytes quantises here
    return m


def test_bitsandbytes_model_converts_both_ways_without_requantising():
    m = _bnb_mlp()
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    want = m(x)
    pointers = [m[i].weight.data_ptr() for i in (0, 2)]
    fastlora.from_bnb(m)
    assert all(isinstance(m[i], NF4Linear) for i in (0, 2))
    assert [m[i].weight.packed.data_ptr() for i in (0, 2)] == pointers  # the codes are shared, not copied
    assert m[0].weight.double_quant and not m[2].weight.double_quant
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    fastlora.inject(m, ["0", "2"], r=4)  # QLoRA on the converted model
    m(x).sum().backward()
    fastlora.unload(m, merge=False)
    bnb = pytest.importorskip("bitsandbytes")
    fastlora.to_bnb(m)
    assert all(type(m[i]) is bnb.nn.Linear4bit for i in (0, 2))
    assert [m[i].weight.data_ptr() for i in (0, 2)] == pointers
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)


def test_bitsandbytes_conversion_refusals_leave_the_model_as_it_was():
    m = _bnb_mlp(quant_type="fp4")
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"model: 2 cannot be converted: quant_state.quant_type: expected 'nf4'"):
        fastlora.from_bnb(m)
    assert_unchanged(m, before)
    with pytest.raises(ValueError, match="model: it has no NF4Linear layer to convert"):
        fastlora.to_bnb(m)
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="model: it has no bitsandbytes Linear4bit layer to convert"):
        fastlora.from_bnb(plain)
    q = fastlora.quantize(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)), compute_dtype=torch.float32)
    fastlora.inject(q, ["0"], r=2)
    before = snapshot(q)
    with pytest.raises(ValueError, match=r"model: \['0'\] are LoRA layers over an NF4 base; unload the adapters"):
        fastlora.to_bnb(q)
    assert_unchanged(q, before)
