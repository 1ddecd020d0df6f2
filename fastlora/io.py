"""Adapters in PEFT's file format, both ways: ``adapter_model.safetensors`` + ``adapter_config.json``.

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` for linear layers and
convolutions (a convolution's A (r, in_channels, *kernel_size), B (out_channels, r / groups, 1, ...)),
``.lora_embedding_A`` / ``.lora_embedding_B`` for embeddings (A (r, num_embeddings), B (embedding_dim, r)), and
``base_model.model.<module path>.<param>`` for ``modules_to_save``, as ``PeftModel.save_pretrained`` writes
them, so ``PeftModel.from_pretrained`` reads what ``save_adapter`` writes and ``load_adapter`` reads
what PEFT writes. Tensors are read with safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastlora._checks import (
    check_adapter_name,
    check_bool,
    check_module,
    check_module_names,
    check_pattern,
    check_probability,
    check_rank,
    check_real,
)
from fastlora import variants
from fastlora.layers import DEFAULT_ADAPTER
from fastlora.model import _check_dora_targets, _features, all_or_nothing, apply_injection, lora_layers, plan_injection

__all__ = ["save_adapter", "load_adapter", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
MAGNITUDE_KEY = "lora_magnitude_vector"

# PEFT config entries fastlora has no implementation for, with the value that means "not used". A file that
# sets one to anything else is refused by name: loading it without the feature would give another model.
_UNSUPPORTED = {
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
    "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules", "exclude_modules",
    "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out", "init_lora_weights", "task_type",
    "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version", "megatron_core",
    "qalora_group_size", "ensure_weight_tying", "eva_config", "corda_config", "lora_ga_config",
}  # fmt: skip


def _adapter_keys(module: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    """{key suffix: shape} of the two adapter tensors PEFT's files hold for a target (a base layer or a
    fastlora layer), in (A, B) order."""
    if variants.is_variant(module):
        return variants.adapter_shapes(module, rank)
    out_f, in_f = _features(module)
    return {"lora_A.weight": (rank, in_f), "lora_B.weight": (out_f, rank)}


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
    check_module("model", model)
    path = _check_path(path)
    check_adapter_name("adapter_name", adapter_name)
    if task_type is not None and not isinstance(task_type, str):
        raise TypeError(f"task_type: expected a string or None, got {task_type!r}")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"path: {path} exists and is not a folder")
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
        "use_dora": _single([bool(getattr(la, "use_dora", {}).get(adapter_name)) for la in layers.values()], "use_dora",
                            adapter_name),  # fmt: skip
        "fan_in_fan_out": _single([la.fan_in_fan_out for la in layers.values()], "fan_in_fan_out", adapter_name),
        "modules_to_save": list(getattr(model, "_fastlora_modules_to_save", [])) or None,
        "bias": "none",
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for name, layer in layers.items():
        key_a, key_b = _adapter_keys(layer, layer.r[adapter_name])
        tensors[f"{PREFIX}{name}.{key_a}"] = layer.lora_A[adapter_name].detach().contiguous().cpu()
        tensors[f"{PREFIX}{name}.{key_b}"] = layer.lora_B[adapter_name].detach().contiguous().cpu()
        if config["use_dora"]:  # PEFT's key: the module's lora_magnitude_vector, without adapter name or ".weight"
            magnitude = layer.lora_magnitude_vector[adapter_name]
            tensors[f"{PREFIX}{name}.{MAGNITUDE_KEY}"] = magnitude.detach().contiguous().cpu()
    for module_name in config["modules_to_save"] or []:
        for pname, p in model.get_submodule(module_name).named_parameters():
            tensors[f"{PREFIX}{module_name}.{pname}"] = p.detach().contiguous().cpu()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a folder path (str or os.PathLike), got {path!r} ({type(path).__name__})")
    return Path(path)


# Deeper JSON than this is no adapter config: refused before Python's parser recurses into it.
_MAX_JSON_DEPTH = 32


def _json_depth(text: str) -> int:
    """How deeply the JSON in ``text`` nests (brackets inside strings do not count)."""
    depth = most = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            most = max(most, depth)
        elif ch in "]}":
            depth -= 1
    return most


def _read_config(path: Path) -> dict:
    """``adapter_config.json``, every field fastlora reads checked for type and value (a string where a
    boolean belongs is an error, not a truthy value), and every PEFT feature fastlora lacks refused by name."""
    if not path.exists():
        raise FileNotFoundError(f"path: {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"path: {path} is not a folder (expected one holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"path: no {CONFIG_NAME} in {path}")
    try:
        text = file.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if _json_depth(text) > _MAX_JSON_DEPTH:
        raise ValueError(f"{file}: not an adapter config: nested deeper than {_MAX_JSON_DEPTH} levels")
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type: expected 'LORA', got {config.get('peft_type')!r}")
    refused = [f"{k}={config[k]!r}" for k, off in _UNSUPPORTED.items() if k in config and config[k] not in (off, None)]
    init = config.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in _BASE_PRESERVING_INITS):
        refused.append(f"init_lora_weights={init!r} (it rewrites the base weights)")
    unknown = [f"{k}={v!r}" for k, v in config.items()
               if k not in _UNDERSTOOD and k not in _UNSUPPORTED and v not in (None, False, {}, [])]  # fmt: skip
    if refused or unknown:
        raise ValueError(f"{file}: fastlora does not support {', '.join(refused + unknown)}")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise ValueError(f"{file}: {key}: missing")

    def field(key, check, default):
        value = config.get(key)
        if value is None:  # absent or null: PEFT's default
            value = default
        try:
            return check(key, value)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{file}: {err}") from None

    return {
        "r": field("r", check_rank, None),
        "lora_alpha": field("lora_alpha", check_real, None),
        "lora_dropout": field("lora_dropout", check_probability, 0.0),
        "use_rslora": field("use_rslora", check_bool, False),
        "use_dora": field("use_dora", check_bool, False),
        "fan_in_fan_out": field("fan_in_fan_out", check_bool, False),
        "inference_mode": field("inference_mode", check_bool, True),
        "target_modules": field("target_modules", check_module_names, None),
        "exclude_modules": field("exclude_modules", lambda k, v: check_module_names(k, v, allow_none=True), None),
        "rank_pattern": field("rank_pattern", lambda k, v: check_pattern(k, v, check_rank), {}),
        "alpha_pattern": field("alpha_pattern", lambda k, v: check_pattern(k, v, check_real), {}),
        "modules_to_save": field("modules_to_save", lambda k, v: check_module_names(k, v, allow_none=True), None),
    }


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
    PEFT or by ``save_adapter``). The adapter becomes the active one. Targets may be linear layers,
    embeddings and convolutions (``fastlora.variants``); an embedding's base weight saved beside its adapter
    (PEFT's ``save_embedding_layers``) is loaded into the base, as PEFT does.

    Everything (config fields and their types, features, keys, shapes, dtypes, finiteness) is checked before
    the model changes, and the change itself is all-or-nothing: a bad file raises and leaves the model
    exactly as it was.
    """
    check_module("model", model)
    path = _check_path(path)
    check_adapter_name("adapter_name", adapter_name)
    config = _read_config(path)
    tensors = _read_tensors(path)
    plan = plan_injection(model, config["target_modules"], config["r"], config["lora_alpha"], config["lora_dropout"],
                          adapter_name, config["exclude_modules"], config["rank_pattern"], config["alpha_pattern"],
                          config["modules_to_save"])  # fmt: skip
    if config["use_dora"]:
        try:
            _check_dora_targets(plan)
        except NotImplementedError as err:
            raise NotImplementedError(f"{path / CONFIG_NAME}: {err}") from None
    expected: dict[str, tuple[int, ...]] = {}
    adapter_keys: dict[str, tuple[str, str]] = {}
    # PEFT's save_embedding_layers (on by default when an embedding named embed_tokens / lm_head is a target)
    # adds the targeted embedding's whole base weight as <module>.base_layer.weight, which from_pretrained loads
    # into the base: optional here, and loaded the same way.
    base_weights: dict[str, nn.Parameter] = {}
    for name, module, rank, _ in plan.targets:
        keys = {f"{PREFIX}{name}.{suffix}": shape for suffix, shape in _adapter_keys(module, rank).items()}
        expected.update(keys)
        adapter_keys[name] = tuple(keys)
        if config["use_dora"]:
            expected[f"{PREFIX}{name}.{MAGNITUDE_KEY}"] = (_features(module)[0],)
        if isinstance(module, (nn.Embedding, variants.LoRAEmbedding)) and f"{PREFIX}{name}.base_layer.weight" in tensors:
            base = variants._base_of(module)
            if getattr(module, "merged_adapters", None):
                raise ValueError(f"{path / WEIGHTS_NAME}: {PREFIX}{name}.base_layer.weight replaces the base weight of "
                                 f"{name}, which has merged adapters {module.merged_adapters}; unmerge first")  # fmt: skip
            expected[f"{PREFIX}{name}.base_layer.weight"] = tuple(base.weight.shape)
            base_weights[f"{PREFIX}{name}.base_layer.weight"] = base.weight
    for module_name in plan.modules_to_save:
        for pname, p in model.get_submodule(module_name).named_parameters():
            expected[f"{PREFIX}{module_name}.{pname}"] = tuple(p.shape)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    # The DoRA magnitudes and the config's use_dora must agree: say which side is off, by the config key.
    magnitudes_missing = [k for k in missing if k.endswith(f".{MAGNITUDE_KEY}")]
    magnitudes_extra = [k for k in extra if k.endswith(f".{MAGNITUDE_KEY}")]
    if config["use_dora"] and magnitudes_missing:
        raise ValueError(f"{path / CONFIG_NAME}: use_dora is true but {path / WEIGHTS_NAME} lacks the DoRA "
                         f"magnitudes {magnitudes_missing[:3]}{'...' if len(magnitudes_missing) > 3 else ''} "
                         f"({len(magnitudes_missing)})")  # fmt: skip
    if not config["use_dora"] and magnitudes_extra:
        raise ValueError(f"{path / CONFIG_NAME}: use_dora is false but {path / WEIGHTS_NAME} holds DoRA magnitudes "
                         f"{magnitudes_extra[:3]}{'...' if len(magnitudes_extra) > 3 else ''} ({len(magnitudes_extra)})")  # fmt: skip
    if missing or extra:
        raise ValueError(f"{path / WEIGHTS_NAME}: keys do not match the model and config: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
                         f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''} ({len(extra)})")  # fmt: skip
    wrong = [f"{k}: expected {shape}, got {tuple(tensors[k].shape)}" for k, shape in expected.items()
             if tuple(tensors[k].shape) != shape]  # fmt: skip
    if wrong:
        raise ValueError(f"{path / WEIGHTS_NAME}: wrong shapes: {'; '.join(wrong[:5])}")
    bad = [f"{k} ({tensors[k].dtype})" for k in sorted(tensors) if not tensors[k].is_floating_point()]
    if bad:
        raise ValueError(f"{path / WEIGHTS_NAME}: expected floating-point tensors, got {bad[:5]}")
    nonfinite = [k for k in sorted(tensors) if not torch.isfinite(tensors[k]).all()]
    if nonfinite:
        raise ValueError(f"{path / WEIGHTS_NAME}: tensors with NaN or Inf values: {nonfinite[:5]}"
                         f"{'...' if len(nonfinite) > 5 else ''} ({len(nonfinite)})")  # fmt: skip

    # Injection allocates (and rolls itself back on failure); the copies into existing tensors come last,
    # once nothing can fail any more.
    with all_or_nothing(model):
        apply_injection(model, plan, adapter_name, config["lora_dropout"], config["use_rslora"], config["use_dora"])
        layers = lora_layers(model)
        with torch.no_grad():
            for name, *_ in plan.targets:
                key_a, key_b = adapter_keys[name]
                layers[name].lora_A[adapter_name].copy_(tensors[key_a])
                layers[name].lora_B[adapter_name].copy_(tensors[key_b])
                if config["use_dora"]:
                    layers[name].lora_magnitude_vector[adapter_name].copy_(tensors[f"{PREFIX}{name}.{MAGNITUDE_KEY}"])
            for key, weight in base_weights.items():
                weight.copy_(tensors[key])
            for module_name in plan.modules_to_save:
                for pname, p in model.get_submodule(module_name).named_parameters():
                    p.copy_(tensors[f"{PREFIX}{module_name}.{pname}"])
    return model
