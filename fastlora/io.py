"""Adapters in PEFT's file format, both ways: ``adapter_model.safetensors`` + ``adapter_config.json``.

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (and
``base_model.model.<module path>.<param>`` for ``modules_to_save``), as ``PeftModel.save_pretrained``
writes them, so ``PeftModel.from_pretrained`` reads what ``save_adapter`` writes and ``load_adapter`` reads
what PEFT writes. Tensors are read with safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastlora.layers import DEFAULT_ADAPTER
from fastlora.model import apply_injection, lora_layers, plan_injection

__all__ = ["save_adapter", "load_adapter", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."

# PEFT config entries fastlora has no implementation for, with the value that means "not used". A file that
# sets one to anything else is refused by name: loading it without the feature would give another model.
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_bdlora": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "megatron_config": None,
    "loftq_config": {},  # LoftQ also rewrites the base weights
}
# Initialisations that rewrite the base weights too (PiSSA, OLoRA, CorDA, ...): the adapter alone is not
# the trained model. The ones below leave the base as it was.
_BASE_PRESERVING_INITS = (True, False, "gaussian", "eva")
# Entries fastlora reads or that describe nothing about the model's function.
_UNDERSTOOD = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "exclude_modules",
    "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out", "init_lora_weights", "task_type",
    "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version", "megatron_core",
    "qalora_group_size", "ensure_weight_tying", "eva_config", "corda_config", "lora_ga_config",
}  # fmt: skip


def _single(values: list, what: str, adapter_name: str):
    distinct = set(values)
    if len(distinct) > 1:
        raise ValueError(f"adapter {adapter_name!r}: PEFT's format holds one {what}, the layers have {sorted(distinct)}")
    return values[0]


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = DEFAULT_ADAPTER, task_type: str | None = None) -> None:
    """Write adapter ``adapter_name`` of ``model`` to the folder ``path`` in PEFT's format.

    Rank and alpha that differ between layers go to ``rank_pattern`` / ``alpha_pattern`` (by full module
    name) around the most common values, as PEFT writes them. Merged adapters are saved like unmerged ones.
    """
    layers = {name: layer for name, layer in lora_layers(model).items() if adapter_name in layer.lora_A}
    if not layers:
        raise ValueError(f"adapter_name: the model has no adapter named {adapter_name!r}")
    ranks = {name: layer.r[adapter_name] for name, layer in layers.items()}
    alphas = {name: layer.lora_alpha[adapter_name] for name, layer in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config_model = getattr(model, "config", None)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(config_model, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "target_modules": sorted(layers),
        "lora_dropout": _single([la.lora_dropout[adapter_name] for la in layers.values()], "lora_dropout", adapter_name),
        "use_rslora": _single([la.use_rslora[adapter_name] for la in layers.values()], "use_rslora", adapter_name),
        "fan_in_fan_out": _single([la.fan_in_fan_out for la in layers.values()], "fan_in_fan_out", adapter_name),
        "modules_to_save": list(getattr(model, "_fastlora_modules_to_save", [])) or None,
        "bias": "none",
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].detach().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].detach().contiguous().cpu()
    for module_name in config["modules_to_save"] or []:
        for pname, p in model.get_submodule(module_name).named_parameters():
            tensors[f"{PREFIX}{module_name}.{pname}"] = p.detach().contiguous().cpu()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _read_config(path: Path) -> dict:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"path: no {CONFIG_NAME} in {path}")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type: expected 'LORA', got {config.get('peft_type')!r}")
    refused = [f"{k}={config[k]!r}" for k, off in _UNSUPPORTED.items() if k in config and config[k] not in (off, None)]
    init = config.get("init_lora_weights", True)
    if init not in _BASE_PRESERVING_INITS:
        refused.append(f"init_lora_weights={init!r} (it rewrites the base weights)")
    unknown = [f"{k}={v!r}" for k, v in config.items()
               if k not in _UNDERSTOOD and k not in _UNSUPPORTED and v not in (None, False, {}, [])]  # fmt: skip
    if refused or unknown:
        raise ValueError(f"{file}: fastlora does not support {', '.join(refused + unknown)}")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"{file}: {key}: missing")
    if "target_modules" not in config or config["target_modules"] is None:
        raise ValueError(f"{file}: target_modules: missing")
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_NAME
    if not file.is_file():
        pickled = path / "adapter_model.bin"
        extra = f" ({pickled.name} is there, but fastlora never unpickles)" if pickled.exists() else ""
        raise FileNotFoundError(f"path: no {WEIGHTS_NAME} in {path}{extra}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file}: not a readable safetensors file, corrupt or truncated ({err})") from err


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Inject adapter ``adapter_name`` as ``path``'s config says and load its weights (files written by
    PEFT or by ``save_adapter``). The adapter becomes the active one.

    Everything (config, features, keys, shapes) is checked before the model changes: a bad file raises and
    leaves the model exactly as it was.
    """
    path = Path(path)
    config = _read_config(path)
    tensors = _read_tensors(path)
    dropout = float(config.get("lora_dropout", 0.0))
    plan = plan_injection(model, config["target_modules"], config["r"], config["lora_alpha"], dropout, adapter_name,
                          config.get("exclude_modules"), config.get("rank_pattern"), config.get("alpha_pattern"),
                          config.get("modules_to_save"))  # fmt: skip
    expected: dict[str, tuple[int, ...]] = {}
    for name, module, rank, _ in plan.targets:
        out_f, in_f = _features(module)
        expected[f"{PREFIX}{name}.lora_A.weight"] = (rank, in_f)
        expected[f"{PREFIX}{name}.lora_B.weight"] = (out_f, rank)
    for module_name in plan.modules_to_save:
        for pname, p in model.get_submodule(module_name).named_parameters():
            expected[f"{PREFIX}{module_name}.{pname}"] = tuple(p.shape)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{path / WEIGHTS_NAME}: keys do not match the model and config: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
                         f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''} ({len(extra)})")  # fmt: skip
    wrong = [f"{k}: expected {shape}, got {tuple(tensors[k].shape)}" for k, shape in expected.items()
             if tuple(tensors[k].shape) != shape]  # fmt: skip
    if wrong:
        raise ValueError(f"{path / WEIGHTS_NAME}: wrong shapes: {'; '.join(wrong[:5])}")
    bad = [k for k, t in tensors.items() if not t.is_floating_point()]
    if bad:
        raise ValueError(f"{path / WEIGHTS_NAME}: expected floating-point tensors, got {bad[:5]}")

    apply_injection(model, plan, adapter_name, dropout, bool(config.get("use_rslora", False)))
    layers = lora_layers(model)
    with torch.no_grad():
        for name, *_ in plan.targets:
            layers[name].lora_A[adapter_name].copy_(tensors[f"{PREFIX}{name}.lora_A.weight"])
            layers[name].lora_B[adapter_name].copy_(tensors[f"{PREFIX}{name}.lora_B.weight"])
        for module_name in plan.modules_to_save:
            for pname, p in model.get_submodule(module_name).named_parameters():
                p.copy_(tensors[f"{PREFIX}{module_name}.{pname}"])
    return model


def _features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer of any of the kinds ``inject`` takes."""
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return module.out_features, module.in_features
    return module.weight.shape[1], module.weight.shape[0]  # Conv1D stores (in, out)
