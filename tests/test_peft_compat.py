"""``fastlora.accelerate`` on PEFT models: the same outputs and gradients as PEFT's, on what it fuses and on
what it leaves to PEFT (LoRA stacked on LoHa/LoKr in a PeftMixedModel, AdaLoRA), in-place ops on the fused
output, pickling, repr, idempotence and bad arguments. Tiny models, nothing downloaded."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

import fastlora
from fastlora.peft_fused import FusedLoraLinear


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 6)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


def lora_config(**kwargs) -> LoraConfig:
    # init_lora_weights=False: B is random too, so the LoRA term is not zero.
    return LoraConfig(**{"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 8, "init_lora_weights": False,
                         **kwargs})  # fmt: skip


def twins(build):
    """(PEFT's model, the same model accelerated), built by ``build`` from the same seed."""
    torch.manual_seed(1)
    theirs = build()
    ours = copy.deepcopy(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert fastlora.accelerate(ours) is ours
    return theirs, ours


def x_input(*lead):
    return torch.randn(*(lead or (5,)), 10, generator=torch.Generator().manual_seed(2))


def fused(model) -> list[nn.Module]:
    return [m for m in model.modules() if type(m) is FusedLoraLinear]


def out_and_grads(model, x, inplace=False):
    """Output, and gradients of x and every trainable parameter, after a backward of a fixed loss."""
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    y = model(x)
    if inplace:
        y += 1.0
    (y * torch.linspace(-1, 1, y.shape[-1])).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def close(got, want, msg=""):
    """Equal to fp32 rounding, measured against the tensor's largest entry (sums of large terms cancel)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(want.abs().max().item(), 1e-1), msg=msg or None)


def assert_same(theirs, ours, x, inplace=False):
    y0, dx0, g0 = out_and_grads(theirs, x, inplace)
    y1, dx1, g1 = out_and_grads(ours, x, inplace)
    close(y1, y0)
    close(dx1, dx0)
    assert g1.keys() == g0.keys() and g0
    for name in g0:
        close(g1[name], g0[name], msg=name)


# --- LoRA stacked on another tuner's layer (PeftMixedModel) ----------------------------------------------


@pytest.mark.parametrize("other", ["loha", "lokr"])
def test_mixed_lora_over_other_tuner_is_left_to_peft(other):
    """LoRA added over LoHa/LoKr wraps their layer: fusing it would drop their term (it did: outputs off by
    0.03-0.2), so that LoRA layer keeps PEFT's forward."""
    config = {"loha": LoHaConfig, "lokr": LoKrConfig}[other](target_modules=["lin0", "lin1"], init_weights=False)

    def build():
        model = get_peft_model(mlp(), config, adapter_name="first", mixed=True)
        model.add_adapter("second", lora_config())
        model.set_adapter(["first", "second"])
        return model

    theirs, ours = twins(build)
    layer = ours.base_model.model.lin0
    assert isinstance(layer, PeftLoraLinear) and isinstance(layer.base_layer, BaseTunerLayer)  # loha/lokr.Linear
    assert not fused(ours)
    with pytest.warns(UserWarning, match=rf"left 2 LoRA layers to PEFT: .*lin0 \(base layer {other}.Linear, another"):
        fastlora.accelerate(ours)
    assert_same(theirs, ours, x_input())


@pytest.mark.parametrize("other", ["loha", "lokr"])
def test_mixed_other_tuner_over_lora_runs_fused(other):
    """The other way round LoHa/LoKr wraps the LoRA layer, whose base is the plain linear: that one fuses."""
    config = {"loha": LoHaConfig, "lokr": LoKrConfig}[other](target_modules=["lin0", "lin1"], init_weights=False)

    def build():
        model = get_peft_model(mlp(), lora_config(), adapter_name="first", mixed=True)
        model.add_adapter("second", config)
        model.set_adapter(["first", "second"])
        return model

    theirs, ours = twins(build)
    assert len(fused(ours)) == 2
    assert_same(theirs, ours, x_input())


# --- in-place ops on the fused output, AdaLoRA -------------------------------------------------------------


def test_inplace_op_on_accelerated_output_under_autograd(op_path):
    theirs, ours = twins(lambda: get_peft_model(mlp(), lora_config()))
    assert len(fused(ours)) == 2
    layer, x = ours.base_model.model.lin0, x_input(2, 3).requires_grad_(True)  # 3-D: the op folds (2, 3)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "LoRALinearFunctionBackward" and not y._is_view()
    y += 1.0  # raised "Output 0 of LoRALinearFunction is a view and is being modified inplace"
    y.sum().backward()

    class InPlace(nn.Module):  # the layer's output modified in place inside a model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)
            y += 1.0
            y.mul_(2.0)
            return y

    assert_same(InPlace(theirs), InPlace(ours), x_input(2, 3), inplace=True)


def test_inplace_op_on_fastlora_layer_output():
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(10, 20, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B["default"], std=0.1)
    x = x_input().requires_grad_(True)
    y = layer(x)
    y += 1.0
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    a, b = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    ref = x_ref @ layer.weight.t() + layer.bias + 2.0 * (x_ref @ a.t()) @ b.t() + 1.0
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_adalora_model_is_left_to_peft_and_matches():
    """AdaLoRA's layers (SVDLinear) are not PEFT's LoRA Linear: accelerate leaves them, and says so."""

    def build():
        model = get_peft_model(mlp(), AdaLoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False,
                                                    total_step=10))  # fmt: skip
        return model.train()

    theirs, ours = twins(build)
    assert not fused(ours)
    with pytest.warns(UserWarning, match=r"left 2 LoRA layers to PEFT: .*lin0 \(adalora.SVDLinear\)"):
        fastlora.accelerate(ours)
    assert_same(theirs, ours, x_input(), inplace=True)


def test_adalora_over_fused_lora_adds_in_place():
    """AdaLoRA over LoRA in a PeftMixedModel: AdaLoRA's forward does ``result += ...`` on the fused output."""

    def build():
        model = get_peft_model(mlp(), lora_config(), adapter_name="first", mixed=True)
        model.add_adapter("second", AdaLoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False,
                                               total_step=10))  # fmt: skip
        model.set_adapter(["first", "second"])
        return model.train()

    theirs, ours = twins(build)
    assert len(fused(ours)) == 2
    assert_same(theirs, ours, x_input())


# --- pickle, repr, idempotence, what is left to PEFT at call time ------------------------------------------


def test_accelerated_model_pickles_and_saves_whole(op_path):
    theirs, ours = twins(lambda: get_peft_model(mlp(), lora_config()))
    x = x_input()
    want = ours(x)
    again = pickle.loads(pickle.dumps(ours))
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for model in (again, loaded):
        assert len(fused(model)) == 2
        layer = model.base_model.model.lin0
        assert type(layer(x.requires_grad_(True)).grad_fn).__name__ == "LoRALinearFunctionBackward"
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    torch.testing.assert_close(want, theirs(x), rtol=1e-5, atol=1e-6)


def test_repr_reads_as_peft_with_the_fusion_shown():
    theirs, ours = twins(lambda: get_peft_model(mlp(), lora_config()))
    peft_repr, our_repr = repr(theirs.base_model.model.lin0), repr(ours.base_model.model.lin0)
    assert peft_repr.startswith("lora.Linear(\n")
    assert our_repr == peft_repr.replace("lora.Linear(\n", "lora.Linear(\n  fastlora: fused\n", 1)
    ours.merge_adapter()
    assert "fastlora: PEFT's forward now (merged)" in repr(ours.base_model.model.lin0)
    assert repr(ours).count("fastlora: ") == 2


def test_accelerate_is_idempotent():
    theirs, ours = twins(lambda: get_peft_model(mlp(), lora_config()))
    layers = fused(ours)
    keys = list(ours.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastlora.accelerate(fastlora.accelerate(ours)) is ours
    assert fused(ours) == layers and list(ours.state_dict()) == keys
    assert_same(theirs, ours, x_input())


def test_what_cannot_fuse_at_call_time_runs_peft_forward():
    """A DoRA adapter added after accelerate (fused too, through fastlora.dora_linear), adapter_names,
    disabled adapters, a hook on the base layer: the outputs stay PEFT's."""
    theirs, ours = twins(lambda: get_peft_model(mlp(), lora_config()))
    x = x_input()
    for model in (theirs, ours):
        torch.manual_seed(5)  # the same random DoRA adapter in both
        model.add_adapter("dora", lora_config(use_dora=True))
    for adapter in ("default", "dora"):
        theirs.set_adapter(adapter)
        ours.set_adapter(adapter)
        assert_same(theirs, ours, x)
    assert len(fused(ours)) == 2  # the layers stay fastlora's
    with theirs.disable_adapter(), ours.disable_adapter():
        torch.testing.assert_close(ours(x), theirs(x))
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(x, adapter_names=["default"] * 5), theirs(x, adapter_names=["default"] * 5))
    ours.set_adapter("default")
    theirs.set_adapter("default")
    for model in (theirs, ours):
        model.base_model.model.lin0.base_layer.register_forward_hook(lambda m, i, o: o * 2)
    assert "with forward hooks" in repr(ours.base_model.model.lin0)
    assert_same(theirs, ours, x)


def test_gpt2_conv1d_and_multiple_active_adapters():
    from transformers import GPT2Config, GPT2LMHeadModel

    def build():
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
        model = get_peft_model(base, LoraConfig(target_modules=["c_attn", "c_fc"], r=2, init_lora_weights=False,
                                                fan_in_fan_out=True))  # fmt: skip
        model.add_adapter("other", LoraConfig(target_modules=["c_attn"], r=3, init_lora_weights=False,
                                              fan_in_fan_out=True))  # fmt: skip
        model.base_model.set_adapter(["default", "other"])
        return model

    theirs, ours = twins(build)
    assert len(fused(ours)) == 2
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# --- bad arguments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, "model", 3, [nn.Linear(2, 2)]])
def test_accelerate_refuses_what_is_not_a_module(bad):
    with pytest.raises(TypeError, match=r"^peft_model: expected a PEFT model \(a torch.nn.Module.*got "):
        fastlora.accelerate(bad)


def test_accelerate_refuses_a_module_without_peft_layers_untouched():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^peft_model: expected a PEFT model, got a MLP with no PEFT layers"):
        fastlora.accelerate(model)
    assert [type(m) for m in model.modules()] == [MLP, nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ours = fastlora.inject(mlp(), ["lin0"], r=2)
    with pytest.raises(ValueError, match=r"fastlora's own LoRALinear"):
        fastlora.accelerate(ours)


def test_accelerate_leaves_a_peft_model_without_lora_as_it_is():
    model = get_peft_model(mlp(), IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    types = [type(m) for m in model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastlora.accelerate(model) is model
    assert [type(m) for m in model.modules()] == types


def test_import_fastlora_does_not_import_peft():
    code = "import sys, fastlora; assert 'peft' not in sys.modules, 'peft imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
