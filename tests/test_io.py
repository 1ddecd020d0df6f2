"""PEFT-format adapter files, both ways, and every kind of bad file."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

import fastlora
from fastlora.model import lora_layers

from test_model import LLAMA_TARGETS, copy_from_peft, gpt2, llama, logits, peft_twin, tokens


def _trained(base, targets, **kwargs):
    model = fastlora.inject(copy.deepcopy(base), targets, **kwargs)
    torch.manual_seed(7)
    for layer in lora_layers(model).values():
        for name in layer.adapters:
            nn.init.normal_(layer.lora_B[name], std=0.1)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fastlora_to_peft(tmp_path, arch):
    base = llama() if arch == "llama" else gpt2()
    targets = LLAMA_TARGETS if arch == "llama" else ["c_attn", "c_fc"]
    ours = _trained(base, targets, r=4, lora_alpha=8, rank_pattern={targets[0]: 6}, alpha_pattern={targets[1]: 3},
                    use_rslora=True, lora_dropout=0.1)  # fmt: skip
    fastlora.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is True and config["lora_dropout"] == 0.1
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = tokens()
    ours.eval()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_to_fastlora(tmp_path, arch):
    base = llama() if arch == "llama" else gpt2()
    targets = LLAMA_TARGETS if arch == "llama" else ["c_attn", "c_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={targets[0]: 2},
                        alpha_pattern={targets[1]: 16}, use_rslora=True, fan_in_fan_out=arch == "gpt2",
                        modules_to_save=["lm_head"] if arch == "llama" else None)  # fmt: skip
    theirs = peft_twin(base, config)
    if arch == "llama":
        with torch.no_grad():
            theirs.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    theirs.save_pretrained(tmp_path)
    ours = fastlora.load_adapter(copy.deepcopy(base), tmp_path)
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-4, atol=1e-5)


def test_round_trip_through_both(tmp_path):
    base = llama()
    ours = _trained(base, LLAMA_TARGETS, r=4, lora_alpha=8, adapter_name="task")
    fastlora.save_adapter(ours, tmp_path / "a", adapter_name="task")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    theirs.save_pretrained(tmp_path / "b")
    again = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "b", adapter_name="task")
    for name, layer in lora_layers(again).items():
        assert torch.equal(layer.lora_A["task"], lora_layers(ours)[name].lora_A["task"])
        assert torch.equal(layer.lora_B["task"], lora_layers(ours)[name].lora_B["task"])


def test_load_second_adapter_beside_first(tmp_path):
    base = llama()
    fastlora.save_adapter(_trained(base, LLAMA_TARGETS), tmp_path)
    model = fastlora.inject(copy.deepcopy(base), ["q_proj"], adapter_name="other")
    fastlora.load_adapter(model, tmp_path, adapter_name="loaded")
    assert fastlora.list_adapters(model) == ["other", "loaded"]


# --- bad files -------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    base = llama()
    fastlora.save_adapter(_trained(base, LLAMA_TARGETS, r=4), tmp_path)
    return base, tmp_path


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _edit_tensors(path, fn):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))


def _first_key(tensors, suffix):
    return sorted(k for k in tensors if k.endswith(suffix))[0]


BAD = {
    "missing key": (lambda p: _edit_tensors(p, lambda t: t.pop(_first_key(t, "lora_A.weight"))),
                    ValueError, r"keys do not match the model and config: missing \['base_model.model.model.layers.0"),
    "extra key": (lambda p: _edit_tensors(p, lambda t: t.update({"base_model.model.stray.lora_A.weight": torch.zeros(1)})),
                  ValueError, r"unexpected \['base_model.model.stray.lora_A.weight'\]"),
    "wrong shape": (lambda p: _edit_tensors(p, lambda t: t.update({_first_key(t, "lora_B.weight"): torch.zeros(3, 3)})),
                    ValueError, r"wrong shapes: base_model.model.model.layers.0.*expected \(\d+, 4\), got \(3, 3\)"),
    "truncated": (lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:200]),
                  ValueError, r"adapter_model.safetensors: not a readable safetensors file, corrupt or truncated"),
    "bad json": (lambda p: (p / "adapter_config.json").write_text("{not json"),
                 ValueError, r"adapter_config.json: not valid JSON"),
    "not lora": (lambda p: _edit_config(p, peft_type="IA3"), ValueError, r"peft_type: expected 'LORA', got 'IA3'"),
    # DoRA is supported: a config saying use_dora without the magnitudes in the file names the config key.
    "dora without magnitudes": (lambda p: _edit_config(p, use_dora=True), ValueError,
                                r"adapter_config.json: use_dora is true but .*adapter_model.safetensors lacks the DoRA "
                                r"magnitudes \['base_model.model.model.layers.0\.[a-z_.]+\.lora_magnitude_vector'"),
    "lora bias": (lambda p: _edit_config(p, lora_bias=True, bias="all"), ValueError,
                  r"fastlora does not support lora_bias=True, bias='all'"),
    "pissa": (lambda p: _edit_config(p, init_lora_weights="pissa"), ValueError,
              r"init_lora_weights='pissa' \(it rewrites the base weights\)"),
    "unknown feature": (lambda p: _edit_config(p, future_feature={"on": 1}), ValueError,
                        r"does not support future_feature=\{'on': 1\}"),
    "no target": (lambda p: _edit_config(p, target_modules=["gone"]), ValueError,
                  r"target_modules: no linear layer of the model matches \['gone'\]"),
    "pickle only": (lambda p: shutil.move(p / "adapter_model.safetensors", p / "adapter_model.bin"), FileNotFoundError,
                    r"no adapter_model.safetensors in .* \(adapter_model.bin is there, but fastlora never unpickles\)"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_file_raises_and_leaves_model(saved, kind):
    base, path = saved
    corrupt, error, message = BAD[kind]
    corrupt(path)
    model = fastlora.inject(copy.deepcopy(base), ["o_proj"], adapter_name="kept")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error, match=message):
        fastlora.load_adapter(model, path)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    assert fastlora.list_adapters(model) == ["kept"]


def test_save_unknown_adapter():
    with pytest.raises(ValueError, match="adapter_name: the model has no adapter named 'nope'"):
        fastlora.save_adapter(fastlora.inject(llama(), ["q_proj"]), "/tmp/unused", adapter_name="nope")
