"""The LoRA workflow on whole models, checked against PEFT on real transformers architectures (random
weights from small configs, nothing downloaded)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import fastlora
from fastlora.model import lora_layers

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tokens(batch=2, length=11):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(1))


def peft_twin(base: nn.Module, config: LoraConfig, adapter_name="default"):
    """PEFT's model on a copy of ``base``, with non-zero random B (so every path carries signal)."""
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name)
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model


def copy_from_peft(ours: nn.Module, peft_model: nn.Module, adapter_name="default", peft_adapter=None) -> None:
    """Copy PEFT's A and B into our layers of the same module names."""
    peft_adapter = peft_adapter or adapter_name
    peft_modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            if adapter_name in layer.lora_A:
                layer.lora_A[adapter_name].copy_(peft_modules[name].lora_A[peft_adapter].weight)
                layer.lora_B[adapter_name].copy_(peft_modules[name].lora_B[peft_adapter].weight)


def logits(model, ids):
    return model(input_ids=ids).logits


# --- injection -------------------------------------------------------------------------------------------


def test_inject_matches_like_peft():
    base = llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    theirs = peft_twin(base, config)
    ours = fastlora.inject(copy.deepcopy(base), LLAMA_TARGETS, r=4, lora_alpha=8)
    peft_names = {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert set(lora_layers(ours)) == peft_names
    assert fastlora.trainable_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize(
    "targets,exclude,expect",
    [
        (r".*\.(q|k)_proj", None, {"q_proj", "k_proj"}),
        ("all-linear", None, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("all-linear", ["k_proj", "o_proj"], {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_inject_regex_all_linear_and_exclude(targets, exclude, expect):
    model = fastlora.inject(llama(), targets, exclude_modules=exclude)
    assert {n.rsplit(".", 1)[1] for n in lora_layers(model)} == expect  # lm_head never in all-linear
    assert not isinstance(model.lm_head, fastlora.LoRALinear)


def test_rank_and_alpha_patterns():
    model = fastlora.inject(llama(), LLAMA_TARGETS, r=4, lora_alpha=8, rank_pattern={"v_proj": 2},
                            alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32}, use_rslora=True)  # fmt: skip
    layers = lora_layers(model)
    assert layers["model.layers.0.self_attn.v_proj"].r["default"] == 2
    assert layers["model.layers.0.self_attn.q_proj"].r["default"] == 4
    assert layers["model.layers.1.self_attn.q_proj"].scaling["default"] == pytest.approx(32 / 2)


def test_freezes_everything_but_adapter_and_modules_to_save():
    model = fastlora.inject(llama(), LLAMA_TARGETS, modules_to_save=["lm_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n} | {"lm_head.weight"}
    assert any(".lora_A.default" in n for n in trainable)
    counts = fastlora.trainable_parameters(model)
    assert 0 < counts.share < 1 and counts.total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"target_modules": ["nothing_here"]}, "target_modules: no linear layer of the model matches"),
        ({"target_modules": LLAMA_TARGETS, "rank_pattern": {"down_proj": 0}}, r"rank_pattern\['down_proj'\]: expected an integer rank >= 1, got 0"),
        ({"target_modules": LLAMA_TARGETS, "modules_to_save": ["nope"]}, "modules_to_save: no module"),
        ({"target_modules": LLAMA_TARGETS, "lora_dropout": 1.5}, r"lora_dropout: expected a probability"),
    ],
)
def test_bad_injection_leaves_model_unchanged(kwargs, message):
    model = llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        fastlora.inject(model, **kwargs)
    assert not lora_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


# --- same numbers as PEFT --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_outputs_and_gradients_match_peft(arch):
    base = llama() if arch == "llama" else gpt2()
    targets = LLAMA_TARGETS if arch == "llama" else ["c_attn", "c_fc"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=arch == "gpt2")
    theirs = peft_twin(base, config)
    ours = fastlora.inject(copy.deepcopy(base), targets, r=4, lora_alpha=8)
    copy_from_peft(ours, theirs)
    ids = tokens()
    y_theirs, y_ours = logits(theirs, ids), logits(ours, ids)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-4, atol=1e-5)
    y_theirs.square().mean().backward()
    y_ours.square().mean().backward()
    peft_grads = {n.removeprefix("base_model.model.").replace(".default.weight", ".default"): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}  # fmt: skip
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(peft_grads) == set(ours_grads)
    for name, g in ours_grads.items():
        torch.testing.assert_close(g, peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# --- several adapters ------------------------------------------------------------------------------------


def _two_adapters():
    base = llama()
    theirs = peft_twin(base, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), "a")
    theirs.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]))
    torch.manual_seed(4)
    for name, p in theirs.named_parameters():
        if "lora_B.b" in name:
            nn.init.normal_(p, std=0.1)
    ours = fastlora.inject(copy.deepcopy(base), LLAMA_TARGETS, r=4, lora_alpha=8, adapter_name="a")
    fastlora.inject(ours, ["q_proj", "o_proj"], r=2, lora_alpha=4, adapter_name="b")
    copy_from_peft(ours, theirs, "a")
    copy_from_peft(ours, theirs, "b")
    return base, ours, theirs


def test_switch_combine_disable_delete():
    base, ours, theirs = _two_adapters()
    ids = tokens()
    assert fastlora.list_adapters(ours) == ["a", "b"]
    for active in (["a"], ["b"], ["a", "b"]):
        fastlora.set_adapter(ours, active)
        theirs.base_model.set_adapter(active)
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-4, atol=1e-5)
        trainable = {n.split(".lora_")[1].split(".")[1] for n, p in ours.named_parameters() if p.requires_grad}
        assert trainable == set(active)
    with fastlora.disable_adapters(ours):
        torch.testing.assert_close(logits(ours, ids), logits(base, ids), rtol=0, atol=0)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-4, atol=1e-5)
    fastlora.delete_adapter(ours, "b")
    assert fastlora.list_adapters(ours) == ["a"]
    with pytest.raises(ValueError, match=r"names: no adapter named \['b'\] in the model \(it has \['a'\]\)"):
        fastlora.set_adapter(ours, "b")


# --- merge -----------------------------------------------------------------------------------------------


def test_merge_rounds_once_and_unmerge_is_exact():
    model = fastlora.inject(llama(torch.bfloat16), LLAMA_TARGETS, r=4, lora_alpha=8)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B["default"], std=0.01)
    ids = tokens()
    before = {n: layer.weight.detach().clone() for n, layer in lora_layers(model).items()}
    with torch.no_grad():
        unmerged = logits(model, ids)
        fastlora.merge(model)
        for name, layer in lora_layers(model).items():
            a, b = layer.lora_A["default"].double(), layer.lora_B["default"].double()
            want = (before[name].double() + layer.scaling["default"] * (b @ a)).float().to(torch.bfloat16)
            assert torch.equal(layer.weight, want), name  # fp32 sum, one rounding (equal to the fp64 one here)
        merged = logits(model, ids)
        fastlora.unmerge(model)
        for name, layer in lora_layers(model).items():
            assert torch.equal(layer.weight, before[name]), name
        assert torch.equal(logits(model, ids), unmerged)
    torch.testing.assert_close(merged.float(), unmerged.float(), rtol=0.05, atol=0.05)  # bf16 model


def test_merged_layer_runs_the_plain_linear():
    layer = fastlora.LoRALinear(16, 8, r=2)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(3, 16)
    fastlora.merge(nn.Sequential(layer))
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_safe_merge_refuses_non_finite_and_leaves_model():
    model = fastlora.inject(llama(), LLAMA_TARGETS)
    layers = list(lora_layers(model).values())
    with torch.no_grad():
        layers[-1].lora_B["default"][0, 0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="merge: merging \\['default'\\] gives non-finite weights"):
        fastlora.merge(model, safe=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not layer.merged_adapters for layer in layers)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unload_gives_plain_layers(arch):
    base = llama() if arch == "llama" else gpt2()
    targets = LLAMA_TARGETS if arch == "llama" else ["c_attn", "c_proj"]
    model = fastlora.inject(copy.deepcopy(base), targets)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B["default"], std=0.05)
    ids = tokens()
    with torch.no_grad():
        want = logits(model, ids)
        plain = fastlora.unload(model, merge=True)
        assert not lora_layers(plain)
        assert {type(m).__name__ for n, m in plain.named_modules() if n.endswith(tuple(targets))} <= {"Linear", "Conv1D"}
        torch.testing.assert_close(logits(plain, ids), want, rtol=1e-5, atol=1e-5)
        dropped = fastlora.unload(fastlora.inject(copy.deepcopy(base), targets), merge=False)
        torch.testing.assert_close(logits(dropped, ids), logits(base, ids), rtol=0, atol=0)


# --- combine ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_combine_like_peft_add_weighted_adapter(method):
    base = llama()
    theirs = peft_twin(base, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), "a")
    rank_b = 4 if method == "linear" else 2
    theirs.add_adapter("b", LoraConfig(r=rank_b, lora_alpha=6, target_modules=LLAMA_TARGETS))
    torch.manual_seed(5)
    for name, p in theirs.named_parameters():
        if "lora_B.b" in name:
            nn.init.normal_(p, std=0.1)
    ours = fastlora.inject(copy.deepcopy(base), LLAMA_TARGETS, r=4, lora_alpha=8, adapter_name="a")
    fastlora.inject(ours, LLAMA_TARGETS, r=rank_b, lora_alpha=6, adapter_name="b")
    copy_from_peft(ours, theirs, "a")
    copy_from_peft(ours, theirs, "b")
    weights = {"a": 0.7, "b": -0.4}
    theirs.base_model.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type=method)
    fastlora.combine(ours, weights, "mix", method=method)
    peft_modules = dict(theirs.base_model.model.named_modules())
    for name, layer in lora_layers(ours).items():
        peer = peft_modules[name]
        assert layer.r["mix"] == peer.r["mix"] and layer.scaling["mix"] == peer.scaling["mix"]
        torch.testing.assert_close(layer.delta_weight(["mix"]), peer.get_delta_weight("mix"), rtol=1e-5, atol=1e-6)
        if method != "svd":  # SVD factors are unique only up to signs; their product is compared above
            torch.testing.assert_close(layer.lora_A["mix"], peer.lora_A["mix"].weight)
    assert fastlora.list_adapters(ours)[-1] == "mix"
    assert all(layer.active_adapters == ["b"] for layer in lora_layers(ours).values())  # unchanged


def test_combine_errors():
    _, ours, _ = _two_adapters()
    with pytest.raises(ValueError, match=r"method: 'linear' needs adapters of one rank, these have ranks \[2, 4\]"):
        fastlora.combine(ours, {"a": 1.0, "b": 1.0}, "mix")
    with pytest.raises(ValueError, match=r"method: expected 'linear', 'cat' or 'svd', got 'ties'"):
        fastlora.combine(ours, {"a": 1.0}, "mix", method="ties")
    with pytest.raises(ValueError, match=r"new_name: the model already has an adapter named 'a'"):
        fastlora.combine(ours, {"b": 1.0}, "a", method="cat")


# --- accelerate an existing PEFT model -------------------------------------------------------------------


def test_accelerate_peft_model_keeps_peft_api(tmp_path, op_path):
    base = llama()
    theirs = peft_twin(base, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.0))
    ids = tokens()
    want = logits(theirs, ids)
    keys = set(theirs.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to leave behind here: no warning
        fastlora.accelerate(theirs)
    fused = [m for m in theirs.modules() if type(m).__name__ == "FusedLoraLinear"]
    assert len(fused) == 6
    x = torch.randn(2, 48, requires_grad=True)
    assert type(fused[0](x).grad_fn).__name__ == "LoRALinearFunctionBackward"  # the fused op ran
    torch.testing.assert_close(logits(theirs, ids), want, rtol=1e-4, atol=1e-5)
    assert set(theirs.state_dict()) == keys
    theirs.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), want, rtol=1e-4, atol=1e-5)
    merged = theirs.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-4, atol=1e-5)


def test_accelerate_leaves_variants_with_one_warning():
    from peft.tuners.lora.config import VeloraConfig

    # DoRA runs fused now (tests/test_dora.py); VeLoRA is a variant fastlora leaves to PEFT.
    theirs = peft_twin(llama(), LoraConfig(r=4, target_modules=["q_proj"], velora_config=VeloraConfig(num_groups=2)))
    with pytest.warns(UserWarning, match=r"fastlora.accelerate left 2 LoRA layers to PEFT: .*q_proj \(variant"):
        fastlora.accelerate(theirs)
    assert not [m for m in theirs.modules() if type(m).__name__ == "FusedLoraLinear"]
