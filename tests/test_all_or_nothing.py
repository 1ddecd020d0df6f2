"""Every workflow call succeeds or raises a clear error (TypeError / ValueError naming the argument or config
key; FileNotFoundError / NotADirectoryError where that is the truth) with the model exactly as it was.

``snapshot.assert_unchanged`` compares the whole model: modules, parameters (values, requires_grad, which
tensor objects), buffers and every module attribute. The cases are the failures found from outside (an
error after a partial change, silently accepted input, unclear errors, valid input refused), plus
rollbacks of failures that can only show during a change (an allocation), simulated."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fastlora
from fastlora.layers import LoRALinear
from fastlora.model import lora_layers

from snapshot import assert_unchanged, snapshot

transformers = pytest.importorskip("transformers")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))


def two_adapters() -> nn.Module:
    model = fastlora.inject(mlp(), ["0", "2", "4"], r=2, lora_alpha=4, adapter_name="a")
    fastlora.inject(model, ["0", "2"], r=2, lora_alpha=2, adapter_name="b")
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for n in layer.adapters:
                layer.lora_B[n].normal_()
    return model


def refused(model, error, message, fn, *args, **kwargs):
    """``fn`` raises ``error`` matching ``message`` and leaves ``model`` as it was."""
    before = snapshot(model)
    with pytest.raises(error, match=message):
        fn(*args, **kwargs)
    assert_unchanged(model, before)


# --- changed after an error ------------------------------------------------------------------------------


def test_from_linear_checks_before_freezing():
    lin = nn.Linear(4, 3)
    refused(lin, ValueError, "adapter_name: expected a non-empty adapter name without dots", LoRALinear.from_linear,
            lin, adapter_name="a.b")  # fmt: skip


def test_inject_failing_on_a_later_target_changes_nothing():
    model = mlp()
    refused(model, ValueError, r"rank_pattern for 2: rank 300000000 gives an adapter of 3,000,000,000 elements",
            fastlora.inject, model, ["0", "2"], rank_pattern={"2": 3 * 10**8})  # fmt: skip
    refused(model, ValueError, r"rank_pattern\['2'\]: expected an integer rank >= 1 and below 2,147,483,648",
            fastlora.inject, model, ["0", "2"], rank_pattern={"2": 10**12})  # fmt: skip


def fail_second_call(monkeypatch, method: str) -> list:
    """Make the second call of ``LoRALinear.<method>`` raise, as a failed allocation in a change would.
    Returns the call log; clear it to arm the failure again."""
    calls = []
    original = getattr(LoRALinear, method)

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated allocation failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoRALinear, method, failing)
    return calls


def test_inject_and_combine_roll_back_a_failure_during_the_change(monkeypatch):
    """A failure only the change itself can show (here: the second layer's allocation) is rolled back."""
    model = two_adapters()
    calls = fail_second_call(monkeypatch, "add_adapter")
    refused(model, RuntimeError, "simulated", fastlora.inject, model, ["0", "2", "4"], adapter_name="c")
    calls.clear()
    refused(model, RuntimeError, "simulated", fastlora.combine, model, {"a": 1.0, "b": 1.0}, "mix", method="cat")


def test_merge_rolls_back_a_failure_during_the_change(monkeypatch):
    model = two_adapters()
    fastlora.merge(model, ["b"])
    fail_second_call(monkeypatch, "merge")
    refused(model, RuntimeError, "simulated", fastlora.merge, model, ["a"])


def test_load_adapter_with_modules_to_save_overlapping_targets(tmp_path):
    model = two_adapters()
    fastlora.save_adapter(model, tmp_path, adapter_name="a")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules_to_save"] = ["0"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = mlp()
    refused(fresh, ValueError, r"modules_to_save: \['0'\] are \(or contain, or lie inside\) LoRA targets",
            fastlora.load_adapter, fresh, tmp_path)  # fmt: skip


def test_combine_svd_rank_checked_before_any_layer():
    model = two_adapters()
    refused(model, ValueError, r"svd_rank: expected at most 3 \(the smallest layer's", fastlora.combine, model,
            {"a": 1.0}, "mix", method="svd", svd_rank=4)  # fmt: skip


# --- silently accepted before ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda m: fastlora.merge(m, []), ValueError, "adapter_names: expected at least one adapter name"),
        (lambda m: fastlora.merge(m, safe="yes"), TypeError, "safe: expected True or False, got 'yes'"),
        (lambda m: fastlora.unload(m, merge="no"), TypeError, "merge: expected True or False"),
        (lambda m: fastlora.set_adapter(m, []), ValueError, "names: expected at least one adapter name"),
        (lambda m: fastlora.combine(m, {"a": float("nan")}, "x"), ValueError, r"weights\['a'\]: expected a finite"),
        (lambda m: fastlora.combine(m, {"a": float("inf")}, "x"), ValueError, r"weights\['a'\]: expected a finite"),
        (lambda m: fastlora.combine(m, {"a": True}, "x"), TypeError, r"weights\['a'\]: expected a finite number"),
        (lambda m: fastlora.combine(m, {"a": 1.0}, "x", "svd", True), TypeError, "svd_rank: expected an integer"),
        (lambda m: fastlora.combine(m, {"a": 1.0}, "x", "svd", -1), ValueError, "svd_rank: expected an integer rank"),
        (lambda m: fastlora.combine(m, {"a": 1.0}, "x", "linear", 2), ValueError, "svd_rank: only used with"),
        (lambda m: fastlora.inject(m, ["0"], adapter_name="c", use_rslora="false"), TypeError, "use_rslora: expected"),
        (lambda m: fastlora.inject(m, ["0"], adapter_name="c", lora_dropout="0.1"), TypeError, "lora_dropout: expected"),
    ],
)
def test_no_longer_silently_accepted(call, error, message):
    model = two_adapters()
    refused(model, error, message, call, model)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,error,message",
    [
        ({"use_rslora": "false"}, TypeError, "use_rslora: expected True or False, got 'false'"),
        ({"lora_dropout": "abc"}, TypeError, "lora_dropout: expected a probability in \\[0, 1\\), got 'abc'"),
        ({"r": True}, TypeError, "r: expected an integer rank >= 1, got True"),
        ({"r": 2.0}, TypeError, "r: expected an integer rank >= 1, got 2.0"),
        ({"lora_alpha": "4"}, TypeError, "lora_alpha: expected a finite number, got '4'"),
        ({"target_modules": 5}, TypeError, "target_modules: expected a regular expression"),
        ({"target_modules": "("}, ValueError, "target_modules: '\\(' is not a valid regular expression"),
        ({"rank_pattern": {"0": "2"}}, TypeError, "rank_pattern\\['0'\\]: expected an integer rank"),
        ({"rank_pattern": {"[": 2}}, ValueError, "rank_pattern\\['\\['\\]: '\\[' is not a valid regular expression"),
        ({"fan_in_fan_out": 1}, TypeError, "fan_in_fan_out: expected True or False, got 1"),
        ({"init_lora_weights": 1}, ValueError, "init_lora_weights=1"),
    ],
)
def test_config_fields_are_strict(tmp_path, changes, error, message):
    fastlora.save_adapter(two_adapters(), tmp_path, adapter_name="a")
    _edit_config(tmp_path, **changes)
    fresh = mlp()
    refused(fresh, error, message, fastlora.load_adapter, fresh, tmp_path)


def test_file_tensors_must_be_finite(tmp_path):
    from safetensors.torch import load_file, save_file

    fastlora.save_adapter(two_adapters(), tmp_path, adapter_name="a")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    fresh = mlp()
    refused(fresh, ValueError, "tensors with NaN or Inf values", fastlora.load_adapter, fresh, tmp_path)


# --- unclear errors before --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda m: fastlora.inject(m, None), TypeError, "target_modules: expected a regular expression"),
        (lambda m: fastlora.inject(m, "("), ValueError, "target_modules: '\\(' is not a valid regular expression"),
        (lambda m: fastlora.inject(m, ["0"], exclude_modules=3), TypeError, "exclude_modules: expected"),
        (lambda m: fastlora.set_adapter(m, None), TypeError, "names: expected an adapter name or a list"),
        (lambda m: fastlora.set_adapter(m, 3), TypeError, "names: expected an adapter name or a list"),
        (lambda m: fastlora.delete_adapter(m, None), TypeError, "name: expected an adapter name"),
        (lambda m: fastlora.load_adapter(m, None), TypeError, "path: expected a folder path"),
        (lambda m: fastlora.save_adapter(m, None, adapter_name="a"), TypeError, "path: expected a folder path"),
        (lambda m: fastlora.combine(m, None, "x"), TypeError, "weights: expected a dict"),
        (lambda m: fastlora.merge(None), TypeError, "model: expected a torch.nn.Module"),
    ],
)
def test_clear_errors(call, error, message):
    model = two_adapters()
    refused(model, error, message, call, model)


def test_deeply_nested_config(tmp_path):
    fastlora.save_adapter(two_adapters(), tmp_path, adapter_name="a")
    (tmp_path / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    fresh = mlp()
    refused(fresh, ValueError, "nested deeper than 32 levels", fastlora.load_adapter, fresh, tmp_path)


def test_path_that_is_a_file(tmp_path):
    file = tmp_path / "f"
    file.write_text("x")
    model = two_adapters()
    refused(model, NotADirectoryError, "is not a folder", fastlora.load_adapter, model, file)
    refused(model, NotADirectoryError, "exists and is not a folder", fastlora.save_adapter, model, file, "a")
    refused(model, FileNotFoundError, "does not exist", fastlora.load_adapter, model, tmp_path / "missing")


# --- valid input that failed before, and what PEFT accepts -----------------------------------------------


def test_merge_safe_after_an_earlier_merge_counts_each_adapter_once():
    model = two_adapters()
    fastlora.set_adapter(model, ["a", "b"])
    x = torch.randn(2, 8)
    want = model(x)
    fastlora.merge(model, ["a"])
    fastlora.merge(model, ["a", "b"], safe=True)  # "a" is merged already: only "b" is added
    torch.testing.assert_close(model(x), want)
    assert all(layer.merged_adapters.count("a") == 1 for layer in lora_layers(model).values())


def test_meta_model_injected_then_materialised():
    with torch.device("meta"):
        model = mlp()
    fastlora.inject(model, ["0", "2"], r=2, lora_dropout=0.1)
    assert model(torch.randn(5, 8, device="meta")).shape == (5, 3)
    model.to_empty(device="cpu")
    assert model(torch.randn(5, 8)).shape == (5, 3)


def test_what_peft_accepts():
    model = two_adapters()
    fastlora.inject(model, ["0"], r=2, lora_alpha=-4, adapter_name="neg")  # negative alpha: negative scaling
    assert lora_layers(model)["0"].scaling["neg"] == -2.0
    fastlora.combine(model, {"a": 0.0, "b": 1.0}, "zero_weight", method="cat")  # a zero weight
    fastlora.set_adapter(model, "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastlora.delete_adapter(model, "a")  # the active one: as PEFT, another becomes active, with a warning
    assert any("is now active" in str(w.message) for w in caught)
    assert all(layer.active_adapters == ["b"] for layer in lora_layers(model).values() if "b" in layer.adapters)
