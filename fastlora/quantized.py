"""QLoRA's frozen 4-bit base: ``NF4Linear`` (an ``nn.Linear`` whose weight is stored in NF4) and ``quantize``,
which swaps a model's linear layers (and the bases of its ``LoRALinear`` layers) for it.

The NF4 format is ``fastlora.nf4``'s, byte for byte bitsandbytes' (``NF4Weight.from_bnb`` /
``to_bnb_quant_state`` move weights between the two). ``NF4Linear`` keeps the weight's tensors as buffers, so
``state_dict`` / ``load_state_dict`` (and safetensors) save and restore the codes themselves: loading never
requantises.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlora import nf4
from fastlora._checks import check_bool, check_int, check_module, check_module_names
from fastlora.nf4 import NF4_BLOCKSIZES, NF4Weight

__all__ = ["NF4Linear", "quantize", "from_bnb", "to_bnb", "COMPUTE_DTYPES", "QUANTIZATION_METHODS"]

# The dtypes the fused kernels dequantise NF4 into.
COMPUTE_DTYPES = nf4.DTYPES
QUANTIZATION_METHODS = ("nf4",)
# NF4Weight field -> buffer name. The buffers are the state dict: "<layer>.weight_packed", ...
_BUFFERS = {
    "packed": "weight_packed",
    "absmax": "weight_absmax",
    "absmax_scale": "weight_absmax_scale",
    "absmax_offset": "weight_absmax_offset",
    "absmax_code": "weight_absmax_code",
}


def check_compute_dtype(name: str, value: object) -> torch.dtype:
    if not isinstance(value, torch.dtype) or value not in COMPUTE_DTYPES:
        raise TypeError(f"{name}: expected torch.float32, torch.float16 or torch.bfloat16 (the dtypes NF4 is "
                        f"dequantised into), got {value!r}")  # fmt: skip
    return value


def check_blocksize(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in NF4_BLOCKSIZES:
        raise ValueError(f"{name}: expected one of {NF4_BLOCKSIZES} (the blocksizes bitsandbytes supports), "
                         f"got {value!r}")  # fmt: skip
    return value


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight: y = x·Wᵀ + b with W dequantised into ``compute_dtype``, as
    bitsandbytes' ``Linear4bit``: x is cast to ``compute_dtype``, the output comes back in x's dtype.

    State (buffers, so they move with ``.to(device)`` and are in the state dict):
        weight_packed: (ceil(out·in / 2), 1) uint8, two 4-bit codes per byte.
        weight_absmax: (n_blocks,) fp32, or uint8 codes with double quantisation.
        weight_absmax_scale (ceil(n_blocks / 256),) fp32, weight_absmax_offset () fp32, weight_absmax_code
            (256,) fp32: double quantisation only.
    bias: (out_features,) Parameter or None, frozen, in the original layer's dtype (cast per call, like
    bitsandbytes). ``weight`` is the ``fastlora.nf4.NF4Weight`` over those buffers (what ``lora_linear``
    takes). The buffers keep their dtypes under ``model.to(dtype)`` / ``.half()``: only their device moves.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compute_dtype: torch.dtype = torch.float32,
        blocksize: int = 64,
        double_quant: bool = True,
        weight_dtype: torch.dtype | None = None,
        fan_in_fan_out: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        """An all-zero layer of the given layout (like ``nn.Linear(...)``, to load a state dict into; on the
        ``meta`` device nothing is allocated). ``weight_dtype`` is the original weight's dtype (default:
        ``compute_dtype``); ``fan_in_fan_out`` records that the original layer stored its weight (in, out), as
        GPT-2's ``Conv1D`` (only for adapter configs: the NF4 weight is always (out, in)).
        ``NF4Linear.from_linear`` quantises an existing layer."""
        in_features = check_int("in_features", in_features, minimum=1)
        out_features = check_int("out_features", out_features, minimum=1)
        check_bool("bias", bias)
        compute_dtype = check_compute_dtype("compute_dtype", compute_dtype)
        blocksize = check_blocksize("blocksize", blocksize)
        check_bool("double_quant", double_quant)
        check_bool("fan_in_fan_out", fan_in_fan_out)
        weight_dtype = compute_dtype if weight_dtype is None else check_compute_dtype("weight_dtype", weight_dtype)
        numel = in_features * out_features
        n_blocks = -(-numel // blocksize)
        device = torch.empty(0, device=device).device  # honours a `with torch.device(...)` default
        make = torch.empty if device.type == "meta" else torch.zeros
        fields = {
            "packed": make(((numel + 1) // 2, 1), dtype=torch.uint8, device=device),
            "absmax": make(n_blocks, dtype=torch.uint8 if double_quant else torch.float32, device=device),
        }
        if double_quant:
            fields["absmax_scale"] = make(-(-n_blocks // nf4.ABSMAX_BLOCKSIZE), dtype=torch.float32, device=device)
            fields["absmax_offset"] = make((), dtype=torch.float32, device=device)
            fields["absmax_code"] = nf4.dynamic_code_table(device)
        q = NF4Weight(shape=(out_features, in_features), blocksize=blocksize, dtype=weight_dtype, **fields)
        b = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device), requires_grad=False) if bias else None
        super().__init__()
        self._setup(q, b, compute_dtype, fan_in_fan_out)

    @classmethod
    def from_weight(cls, weight: NF4Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                    fan_in_fan_out: bool = False) -> NF4Linear:  # fmt: skip
        """A layer over an existing NF4 weight (its tensors are used, not copied) and bias (frozen, shared)."""
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight: expected a fastlora.nf4.NF4Weight, got {type(weight).__name__}")
        compute_dtype = check_compute_dtype("compute_dtype", compute_dtype)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (weight.shape[0],):
                raise ValueError(f"bias: expected a floating-point ({weight.shape[0]},) tensor or None, got {bias!r}")
            if not isinstance(bias, nn.Parameter):
                bias = nn.Parameter(bias, requires_grad=False)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(weight, bias, compute_dtype, check_bool("fan_in_fan_out", fan_in_fan_out))
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                    double_quant: bool = True) -> NF4Linear:  # fmt: skip
        """Quantise an ``nn.Linear`` (or transformers' ``Conv1D``, whose (in, out) weight is transposed
        first). The bias is shared, not copied; ``compute_dtype`` defaults to the weight's dtype."""
        from fastlora.layers import is_conv1d

        if not isinstance(linear, nn.Linear) and not is_conv1d(linear):
            raise TypeError(f"linear: expected an nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        weight = linear.weight.detach()
        compute_dtype = check_compute_dtype("compute_dtype", weight.dtype if compute_dtype is None else compute_dtype)
        q = nf4.quantize(weight.t() if is_conv1d(linear) else weight, check_blocksize("blocksize", blocksize),
                         check_bool("double_quant", double_quant))  # fmt: skip
        return cls.from_weight(q, linear.bias, compute_dtype, is_conv1d(linear))

    def _setup(self, q: NF4Weight, bias: nn.Parameter | None, compute_dtype: torch.dtype, fan_in_fan_out: bool) -> None:
        self.out_features, self.in_features = q.shape
        self.fan_in_fan_out = fan_in_fan_out
        self.blocksize = q.blocksize
        self.double_quant = q.double_quant
        self.weight_dtype = q.dtype
        self.compute_dtype = compute_dtype
        if bias is not None:
            bias.requires_grad_(False)
        self.register_parameter("bias", bias)
        self.set_weight(q)

    # --- the NF4 weight over the buffers --------------------------------------------------------------

    @property
    def weight(self) -> NF4Weight:
        """The NF4Weight over the current buffers. Cached: rebuilt (and its invariants checked) only when a
        buffer was replaced, e.g. by ``.to(device)`` or ``load_state_dict(assign=True)``."""
        q = self.__dict__["_nf4"]
        buffers = self._buffers
        if q.packed is buffers["weight_packed"] and q.absmax is buffers["weight_absmax"] and (
            not self.double_quant or (q.absmax_scale is buffers["weight_absmax_scale"]
                                      and q.absmax_offset is buffers["weight_absmax_offset"]
                                      and q.absmax_code is buffers["weight_absmax_code"])):  # fmt: skip
            return q
        return self._rebuild()

    def _rebuild(self) -> NF4Weight:
        fields = {f: self._buffers[b] for f, b in _BUFFERS.items() if b in self._buffers}
        q = NF4Weight(shape=(self.out_features, self.in_features), blocksize=self.blocksize, dtype=self.weight_dtype,
                      **fields)  # fmt: skip
        self.__dict__["_nf4"] = q
        return q

    def set_weight(self, q: NF4Weight) -> None:
        """Make ``q`` (same shape, blocksize and double quantisation) the layer's weight; its tensors become
        the buffers (not copied)."""
        if "_nf4" in self.__dict__ and (q.shape != (self.out_features, self.in_features) or q.blocksize != self.blocksize
                                        or q.double_quant != self.double_quant):  # fmt: skip
            raise ValueError(f"weight: expected an NF4Weight of shape {(self.out_features, self.in_features)}, blocksize "
                             f"{self.blocksize}, double_quant={self.double_quant}; got {q!r}")  # fmt: skip
        for field, name in _BUFFERS.items():
            t = getattr(q, field)
            if t is not None:
                self.register_buffer(name, t)
        self.__dict__["_nf4"] = q

    @torch.no_grad()
    def copy_weight_(self, q: NF4Weight) -> None:
        """Write ``q``'s codes and scales into the current buffers, in place (same layout required)."""
        current = self.weight
        if q.shape != current.shape or q.blocksize != current.blocksize or q.double_quant != current.double_quant:
            raise ValueError(f"weight: expected an NF4Weight laid out as {current!r}; got {q!r}")
        for field in _BUFFERS:
            t = getattr(q, field)
            if t is not None:
                getattr(current, field).copy_(t)

    def _apply(self, fn, recurse=True):
        # The codes and scales have fixed dtypes: model.half() / model.to(torch.bfloat16) would otherwise turn
        # fp32 absmax into bf16 (another, wrong weight). Keep each buffer's dtype, take only the new device.
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._rebuild()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        # load_state_dict would silently convert a tensor of another dtype (fp32 absmax into uint8 codes):
        # the dtypes are part of the format, so a mismatch is an error, not a conversion.
        for name, mine in self._buffers.items():
            theirs = state_dict.get(prefix + name)
            if isinstance(theirs, torch.Tensor) and theirs.dtype != mine.dtype:
                error_msgs.append(f"{prefix}{name}: expected dtype {mine.dtype} (NF4 blocksize {self.blocksize}, "
                                  f"double_quant={self.double_quant}), got {theirs.dtype}")  # fmt: skip
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip
        self._rebuild()  # assign=True puts new tensor objects in place

    # --- forward --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x's dtype; computed in ``compute_dtype``."""
        return nf4_linear(x, self.weight, self._parameters["bias"], self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")  # fmt: skip


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
    """x·Wᵀ + b with W dequantised into ``compute_dtype`` (x and b cast to it), returned in x's dtype.
    Holds one dequantised copy of W while it runs (what bitsandbytes' CPU path does too)."""
    dtype = x.dtype
    w = nf4.dequantize(weight, compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    return F.linear(x.to(compute_dtype), w, b).to(dtype)


# --- quantising a model -------------------------------------------------------------------------------


def _matches(name: str, targets: str | list[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def quantize(
    model: nn.Module,
    method: str = "nf4",
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    blocksize: int = 64,
    double_quant: bool = True,
    target_modules: str | Iterable[str] | None = None,
    exclude_modules: str | Iterable[str] | None = None,
) -> nn.Module:
    """Quantise ``model``'s linear layers to NF4 in place (QLoRA's base), before or after ``inject``.

    Every ``nn.Linear`` and transformers ``Conv1D`` (default: all but the output head, as bitsandbytes
    through transformers does; ``target_modules`` picks others with PEFT's matching rules, ``exclude_modules``
    leaves some out) becomes an ``NF4Linear``; a ``LoRALinear`` keeps its adapters and gets an ``NF4Linear``
    as ``base_layer``. Layers already quantised are left as they are.

    Args:
        model: the model, changed in place and returned.
        method: "nf4" (the only method).
        compute_dtype: what the weight is dequantised into and x is cast to: torch.bfloat16 (default),
            torch.float16 or torch.float32. One per model: a model already holding NF4 layers of another
            compute dtype is refused.
        blocksize: elements per absmax block, one of 32, 64 (default), 128, ..., 4096.
        double_quant: store absmax as 8-bit codes (about 4.13 instead of 4.5 bits per parameter at blocksize 64).
        target_modules, exclude_modules: a regular expression (full match) or a list of module names
            (exact or dotted suffix).

    Memory: layers are quantised one at a time, in chunks (``fastlora.nf4.quantize``); besides the codes it
    produces it never holds more than one layer's full-precision weight. The original weights stay
    referenced until the call returns (so a failure can put them back), then are freed unless something
    else holds them.

    Everything (arguments, each target's dtype, NaN/Inf in any weight, merged adapters) is checked before
    anything changes; on any error the model is as it was.
    """
    from fastlora.layers import LoRALinear, is_conv1d
    from fastlora.model import _output_head, _set_submodule, all_or_nothing

    check_module("model", model)
    if not isinstance(method, str) or method not in QUANTIZATION_METHODS:
        raise ValueError(f"method: expected one of {QUANTIZATION_METHODS}, got {method!r}")
    compute_dtype = check_compute_dtype("compute_dtype", compute_dtype)
    blocksize = check_blocksize("blocksize", blocksize)
    check_bool("double_quant", double_quant)
    target_modules = check_module_names("target_modules", target_modules, allow_none=True)
    exclude_modules = check_module_names("exclude_modules", exclude_modules, allow_none=True)

    existing = {m.compute_dtype for m in model.modules() if isinstance(m, NF4Linear)}
    if existing - {compute_dtype}:
        raise ValueError(f"compute_dtype: the model already has NF4 layers computing in {sorted(map(str, existing))}; "
                         f"got {compute_dtype} (one compute dtype per model)")  # fmt: skip

    def linear(m: nn.Module) -> bool:
        return isinstance(m, (nn.Linear, LoRALinear, NF4Linear)) or is_conv1d(m)

    head = _output_head(model) if target_modules is None else None
    # A LoRALinear's own submodules (its base_layer, once quantised) are its own business.
    lora_names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    matched = [n for n, m in model.named_modules() if n and linear(m) and m is not head
               and (target_modules is None or _matches(n, target_modules))
               and not any(n.startswith(p + ".") for p in lora_names)]  # fmt: skip
    if exclude_modules is not None:
        matched = [n for n in matched if not _matches(n, exclude_modules)]
    done = [n for n in matched if isinstance(model.get_submodule(n), NF4Linear)
            or getattr(model.get_submodule(n), "quantized", False)]  # fmt: skip
    names = [n for n in matched if n not in done]
    if not names and done:
        return model  # everything asked for is quantised already
    if not names:
        what = "no linear layer" if target_modules is None else f"no linear layer matching {target_modules!r}"
        raise ValueError(f"target_modules: the model has {what} left to quantise")

    for name in names:  # every check that can fail, before anything changes; one layer's temporaries at a time
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear) and module.merged_adapters:
            raise ValueError(f"model: {name} has merged adapters {module.merged_adapters}; unmerge before quantising")
        if isinstance(module, LoRALinear) and module.lora_magnitude_vector:
            raise NotImplementedError(f"model: {name} has DoRA adapters {list(module.lora_magnitude_vector)}; DoRA on a "
                                      "quantised (NF4) base is not implemented")  # fmt: skip
        weight = module.weight
        if weight.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"model: {name}.weight is {weight.dtype}; NF4 quantises float32, float16 or bfloat16 weights")
        if weight.device.type == "meta":
            continue
        bad = nf4.count_non_finite(weight)
        if bad:
            raise ValueError(f"model: {name}.weight has {bad} NaN/Inf values; NF4 quantises finite weights only")

    with all_or_nothing(model):
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, LoRALinear):
                module._quantize_base(_quantized(module.weight, module.bias, module.fan_in_fan_out, compute_dtype,
                                                 blocksize, double_quant))  # fmt: skip
            else:
                layer = _quantized(module.weight, module.bias, is_conv1d(module), compute_dtype, blocksize, double_quant)
                layer.train(module.training)
                _set_submodule(model, name, layer)
    return model


def _quantized(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool, compute_dtype: torch.dtype,
               blocksize: int, double_quant: bool) -> NF4Linear:  # fmt: skip
    """An NF4Linear for a weight stored (out, in), or (in, out) when ``transposed``. On the meta device, an
    empty layer of the same layout (shapes only, to load a state dict into)."""
    weight = weight.detach()
    w = weight.t() if transposed else weight
    if weight.device.type == "meta":
        q = NF4Linear(w.shape[1], w.shape[0], False, compute_dtype=compute_dtype, blocksize=blocksize,
                      double_quant=double_quant, weight_dtype=weight.dtype, device="meta").weight  # fmt: skip
    else:
        q = nf4.quantize(w, blocksize, double_quant)
    return NF4Linear.from_weight(q, bias, compute_dtype, transposed)


def from_bnb(model: nn.Module) -> nn.Module:
    """Convert ``model``'s bitsandbytes NF4 ``Linear4bit`` layers to ``NF4Linear`` in place, without
    requantising: each layer's packed codes and quant state are taken over as they are (shared, not
    copied), and its bias and compute dtype kept. Everything is checked first (FP4 layers, or layers
    bitsandbytes has repacked for its CPU kernels, are refused, naming the layer); on error the model is as it
    was. Returns ``model``."""
    from fastlora.model import _set_submodule, all_or_nothing

    check_module("model", model)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError(f"from_bnb needs bitsandbytes: {err}") from None
    names = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not names:
        raise ValueError("model: it has no bitsandbytes Linear4bit layer to convert")
    layers = {}
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError(f"model: {name} is not quantised yet (bitsandbytes quantises on the move to a device)")
        if getattr(weight, "packing_format_for_cpu", False):
            raise ValueError(f"model: {name}'s weight is in bitsandbytes' CPU-packed layout, not NF4's bytes")
        try:
            q = NF4Weight.from_bnb(weight.data, state)
        except (TypeError, ValueError) as err:
            raise ValueError(f"model: {name} cannot be converted: {err}") from None
        compute_dtype = module.compute_dtype if module.compute_dtype is not None else state.dtype
        bias = None if module.bias is None else nn.Parameter(module.bias.detach(), requires_grad=False)
        layers[name] = NF4Linear.from_weight(q, bias, compute_dtype)
        layers[name].train(module.training)
    with all_or_nothing(model):
        for name, layer in layers.items():
            _set_submodule(model, name, layer)
    return model


def to_bnb(model: nn.Module) -> nn.Module:
    """Convert ``model``'s ``NF4Linear`` layers to bitsandbytes ``Linear4bit`` in place, without requantising
    (the codes and statistics are shared, not copied). A LoRA layer's quantised base stays (fastlora's
    ``LoRALinear`` needs its own): unload the adapters first. On error the model is as it was. Returns
    ``model``."""
    from fastlora.layers import LoRALinear
    from fastlora.model import _set_submodule, all_or_nothing

    check_module("model", model)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError(f"to_bnb needs bitsandbytes: {err}") from None
    lora = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.quantized]
    if lora:
        raise ValueError(f"model: {lora} are LoRA layers over an NF4 base; unload the adapters first")
    names = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    if not names:
        raise ValueError("model: it has no NF4Linear layer to convert")
    layers = {}
    for name in names:
        module = model.get_submodule(name)
        if module.fan_in_fan_out:
            raise ValueError(f"model: {name} was a GPT-2 Conv1D; bitsandbytes' Linear4bit has no (in, out) layout")
        q = module.weight
        out_features, in_features = q.shape
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=module.bias is not None,
                                  compute_dtype=module.compute_dtype, compress_statistics=q.double_quant,
                                  quant_type="nf4", device="meta")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(q.packed, requires_grad=False, quant_state=q.to_bnb_quant_state(),
                                         blocksize=q.blocksize, compress_statistics=q.double_quant, quant_type="nf4",
                                         bnb_quantized=True, module=layer)  # fmt: skip
        layer.bias = module.bias
        layer.train(module.training)
        layers[name] = layer
    with all_or_nothing(model):
        for name, layer in layers.items():
            _set_submodule(model, name, layer)
    return model
