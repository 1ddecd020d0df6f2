"""PEFT's LoRA ``Linear`` with its forward on fastlora's fused op: what ``fastlora.accelerate`` swaps in.

This module imports PEFT, so nothing in ``import fastlora`` imports it; ``fastlora.peft_compat`` does, when
``accelerate`` is called. The classes live at module level so that pickle (and ``torch.save`` of a whole
model) finds them by their qualified names, ``fastlora.peft_fused.FusedLoraLinear`` and, when bitsandbytes is
installed, ``fastlora.peft_fused.FusedLoraLinear4bit``.

QLoRA: over a bitsandbytes ``Linear4bit`` base (wrapped by PEFT's ``lora.Linear4bit``, or by its plain
``lora.Linear`` when the model was not loaded by transformers) the op reads the ``Params4bit`` bytes and
``QuantState`` in place through a ``fastlora.nf4.NF4Weight`` (shared storage, no copy), built once per
weight and cached; NF4 only.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn
from peft.tuners.lora import Linear
from peft.tuners.tuners_utils import BaseTunerLayer

from fastlora import mixed_batch
from fastlora._checks import is_real
from fastlora.dora import dora_after, dora_linear, dora_norm
from fastlora.functional import lora_linear, lora_linear_multi
from fastlora.layers import as_one_adapter, is_conv1d
from fastlora.nf4 import NF4_BLOCKSIZES, NF4Weight

try:  # PEFT defines its 4-bit LoRA layer only when bitsandbytes is installed (and then imports it itself)
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    _BnbLinear4bit = bnb.nn.Linear4bit
except ImportError:
    bnb = PeftLinear4bit = _BnbLinear4bit = None

__all__ = ["FusedLoraLinear", "FusedLoraLinear4bit", "fused_class", "layer_name", "unfusable"]


class _FusedForward:
    """The forward shared by the fused classes; mixed in before PEFT's class, whose forward ``super()`` is."""

    _peft_name = "Linear"

    def forward(self, x, *args, **kwargs):
        # Submodules and parameters are read from Module's own dicts: the same objects as self.lora_A[name]
        # or base.weight, without Module.__getattr__'s host time (a dozen lookups per call otherwise).
        modules = self._modules
        lora_a = modules["lora_A"]._modules
        batch = mixed_batch.current()
        if kwargs.get("adapter_names") is not None or batch is not None:
            if not args and set(kwargs) <= {"adapter_names"}:
                names = kwargs.get("adapter_names")  # PEFT's own keyword (its forward hook passes it)
                return self._forward_mixed(x, batch if names is None else mixed_batch.MixedBatch(names))
        active = [a for a in self.active_adapters if a in lora_a]
        if args or kwargs or self._peft_forward_reason(active) is not None:
            return super().forward(x, *args, **kwargs)
        base = modules["base_layer"]
        params = base._parameters
        magnitudes = modules["lora_magnitude_vector"]._modules
        if magnitudes and any(a in magnitudes for a in active):  # DoRA adapters among the active ones
            return self._forward_dora(x, active)
        first, *rest = active
        lora_b_mods, dropouts = modules["lora_B"]._modules, modules["lora_dropout"]._modules
        if rest and not (self.training and any(_dropout_p(dropouts[n]) > 0.0 for n in active)):
            # Several adapters and no dropout applies: one adapter of their stacked ranks, B_a scaled by s_a.
            a, b = as_one_adapter([lora_a[n]._parameters["weight"] for n in active],
                                  [lora_b_mods[n]._parameters["weight"] for n in active],
                                  [self.scaling[n] for n in active])  # fmt: skip
            lora_args, rest = (a, b, 1.0, 0.0, self.training), []
        else:
            lora_b = lora_b_mods[first]._parameters["weight"]
            lora_args = (lora_a[first]._parameters["weight"], lora_b, self.scaling[first],
                         _dropout_p(dropouts[first]), self.training)  # fmt: skip
        if _BnbLinear4bit is not None and isinstance(base, _BnbLinear4bit):
            y = self._forward_4bit(base, x, lambda xc, weight, bias: lora_linear(xc, weight, bias, *lora_args),
                                   lora_args[0].dtype)  # fmt: skip
        else:
            weight = params["weight"].t() if is_conv1d(base) else params["weight"]  # Conv1D stores (in, out)
            y = lora_linear(x, weight, params["bias"], *lora_args)
        for name in rest:  # further adapters as PEFT runs them
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            dtype = lora_A.weight.dtype
            xa = self._cast_input_dtype(x, dtype) if hasattr(self, "_cast_input_dtype") else x.to(dtype)
            y = y + (lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]).to(y.dtype)
        return y

    def _forward_dora(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """Active adapters some of which are DoRA (``use_dora``), in order, with PEFT's rules: the first as one op
        (``fastlora.dora_linear`` or ``lora_linear``), each later one as PEFT's ``Linear.forward`` adds it (a DoRA
        adapter rescales the result so far: y + (c − 1)·(y − b) + c·s·(x·Aᵀ)·Bᵀ without dropout, y + (c − 1)·(x̂·Wᵀ)
        + c·s·(x̂·Aᵀ)·Bᵀ with it). The norm ‖W + s·B·A‖ is detached, as PEFT's."""
        modules = self._modules
        base = modules["base_layer"]
        params = base._parameters
        weight = params["weight"].t() if is_conv1d(base) else params["weight"]  # Conv1D stores (in, out)
        bias = params["bias"]
        lora_a, lora_b = modules["lora_A"]._modules, modules["lora_B"]._modules
        dropouts, mags = modules["lora_dropout"]._modules, modules["lora_magnitude_vector"]._modules
        first, *rest = active
        args = (lora_a[first]._parameters["weight"], lora_b[first]._parameters["weight"])
        p = _dropout_p(dropouts[first])
        if first in mags:
            y = dora_linear(x, weight, bias, *args, mags[first]._parameters["weight"], self.scaling[first], p,
                            self.training)  # fmt: skip
        else:
            y = lora_linear(x, weight, bias, *args, self.scaling[first], p, self.training)
        for name in rest:  # as PEFT's Linear.forward and DoraLinearVariant.forward add them
            a_mod, b_mod, dropout, s = lora_a[name], lora_b[name], dropouts[name], self.scaling[name]
            xa = self._cast_input_dtype(x, a_mod.weight.dtype)
            if name not in mags:
                y = y + (b_mod(a_mod(dropout(xa))) * s).to(y.dtype)
                continue
            dropped = not (isinstance(dropout, nn.Identity) or not self.training)
            x_hat = dropout(xa) if dropped else xa
            norm = dora_norm(weight.detach(), a_mod.weight, b_mod.weight, s)
            lora = (b_mod(a_mod(x_hat)) * s).to(y.dtype)
            y = dora_after(y, x_hat, weight, bias, lora, mags[name]._parameters["weight"], norm, dropped)
        return y

    def _forward_mixed(self, x: torch.Tensor, batch: mixed_batch.MixedBatch) -> torch.Tensor:
        """Each sample with its own adapter (PEFT's ``adapter_names``), fused in one ``lora_linear_multi``; PEFT's
        own loop where the layer cannot fuse."""
        if self.disable_adapters:
            return super().forward(x)
        if self.merged:
            raise ValueError(f"adapter_names: this layer has merged adapters {self.merged_adapters}; mixed batches "
                             "need every adapter unmerged (unmerge first)")  # fmt: skip
        local, grouping = batch.grouping(self.lora_A, x)
        if not local:
            return self._modules["base_layer"](x)
        dora = self._modules["lora_magnitude_vector"]._modules
        if unfusable(self, list(local)) is not None or any(n in dora for n in local):  # DoRA: PEFT's own loop
            return super().forward(x, adapter_names=list(batch.sample_names(x)))
        modules = self._modules  # read once: each nn.Module attribute lookup goes through __getattr__
        base, lora_a, lora_b = modules["base_layer"], modules["lora_A"]._modules, modules["lora_B"]._modules
        dropouts, scaling = modules["lora_dropout"]._modules, self.scaling
        pairs = [(lora_a[n]._parameters["weight"], lora_b[n]._parameters["weight"]) for n in local]
        a, b, ranks = mixed_batch.stack_adapters(self, pairs)
        multi_args = ([scaling[n] for n in local], grouping, [_dropout_p(dropouts[n]) for n in local], self.training)

        def run(xc, weight, bias):
            return lora_linear_multi(xc, weight, bias, a, b, *multi_args, ranks=ranks)

        if _BnbLinear4bit is not None and isinstance(base, _BnbLinear4bit):
            return self._forward_4bit(base, x, run, a.dtype)
        params = base._parameters
        return run(x, params["weight"].t() if is_conv1d(base) else params["weight"], params["bias"])

    def _forward_4bit(self, base: nn.Module, x: torch.Tensor, run, adapter_dtype: torch.dtype) -> torch.Tensor:
        """What PEFT computes over a bitsandbytes ``Linear4bit``, fused.

        bitsandbytes computes the base term in its ``compute_dtype`` (x, bias and the dequantised weight cast
        to it; when unset, its first call picks x's dtype for fp32/bf16 inputs, as done here too) and returns
        it in x's dtype. PEFT adds the LoRA term computed in the adapter's dtype, cast back to x's dtype (or,
        in ``lora.Linear4bit`` under autocast, not cast: the sum is promoted). The fused op computes both
        terms in the compute dtype, one rounding at the end; the result has PEFT's dtype.
        """
        nf4 = _NF4_CACHE[id(base._parameters["weight"])][3]  # unfusable() has just checked or built it
        if not base.compute_type_is_set:
            base.set_compute_type(x)
            base.compute_type_is_set = True
        compute = base.compute_dtype
        xc = x if compute is None or x.dtype == compute else x.to(compute)
        bias = base._parameters["bias"]
        if bias is not None and bias.dtype != xc.dtype:
            # bitsandbytes rewrites bias.data in the compute dtype on its first call; the values are the same
            bias = bias.to(xc.dtype)
        y = run(xc, nf4, bias)
        out_dtype = x.dtype
        if isinstance(self, PeftLinear4bit) and torch.is_autocast_enabled():  # PEFT's own test of autocast
            # lora.Linear4bit adds the LoRA term uncast under autocast: x's dtype + the autocast dtype
            device_type = x.device.type
            if torch.is_autocast_enabled(device_type):
                out_dtype = torch.promote_types(out_dtype, torch.get_autocast_dtype(device_type))
            else:
                out_dtype = torch.promote_types(out_dtype, adapter_dtype)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def _peft_forward_reason(self, active: list[str]) -> str | None:
        """Why a call without extra arguments runs PEFT's forward now, or None: it runs fused."""
        if self.disable_adapters:
            return "adapters disabled"
        if self.merged:
            return "merged"
        if not active:
            return "no active adapter"
        return unfusable(self, active)

    def extra_repr(self) -> str:
        reason = self._peft_forward_reason([a for a in self.active_adapters if a in self.lora_A])
        return "fastlora: fused" if reason is None else f"fastlora: PEFT's forward now ({reason})"

    def _get_name(self) -> str:
        # The printed model reads as PEFT's ("lora.Linear(" ...), the first line inside showing the fusion.
        return self._peft_name


class FusedLoraLinear(_FusedForward, Linear):
    """PEFT's LoRA ``Linear`` (a subclass: ``isinstance(m, peft.tuners.lora.Linear)`` holds) whose forward
    runs ``fastlora.functional.lora_linear``: the base GEMM and the active adapter in one op (several active
    adapters as one of their stacked ranks when no dropout applies; with dropout the first runs fused and the
    others are added as PEFT adds them). Everything else (merge, set_adapter, state_dict, ...) is
    PEFT's, inherited untouched, and so is the forward whenever ``unfusable`` finds a reason: the layer then
    computes exactly what PEFT computes. The base is a plain ``nn.Linear``/``Conv1D`` or a bitsandbytes NF4
    ``Linear4bit`` (PEFT wraps one in this class when the model was not loaded in 4-bit by transformers)."""


if PeftLinear4bit is not None:

    class FusedLoraLinear4bit(_FusedForward, PeftLinear4bit):
        """PEFT's QLoRA layer ``peft.tuners.lora.bnb.Linear4bit`` (a subclass) with the forward of
        ``FusedLoraLinear``: a bitsandbytes NF4 ``Linear4bit`` base and the first active adapter in one op."""

        _peft_name = "Linear4bit"

else:
    FusedLoraLinear4bit = None


def fused_class(module: nn.Module) -> tuple[type, type] | None:
    """``(PEFT's class, fastlora's fused subclass)`` when ``module`` is exactly one of the two, else None."""
    cls = type(module)
    if cls is Linear or cls is FusedLoraLinear:
        return Linear, FusedLoraLinear
    if PeftLinear4bit is not None and (cls is PeftLinear4bit or cls is FusedLoraLinear4bit):
        return PeftLinear4bit, FusedLoraLinear4bit
    return None


def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if type(module) is nn.Dropout else 0.0


def layer_name(module: nn.Module) -> str:
    """``loha.Linear`` for PEFT's tuner layers (as PEFT prints them), else the class name."""
    parts = type(module).__module__.split(".")
    if parts[:2] == ["peft", "tuners"] and len(parts) > 2:
        return f"{parts[2]}.{type(module).__name__}"
    return type(module).__name__


def _plain_base(base: nn.Module) -> str | None:
    """Why ``base`` is not a layer whose forward is exactly x·Wᵀ + b, or None."""
    if type(base) is nn.Linear:  # the common case, without the class checks below (host time, every call)
        return _replaced_forward(base)
    if isinstance(base, BaseTunerLayer):
        # A LoRA layer stacked on another tuner's layer (LoHa, LoKr, ... in a PeftMixedModel): that layer
        # adds its own term, so its output is not x·Wᵀ + b of a weight we could hand to the op.
        return f"base layer {layer_name(base)}, another tuner's layer"
    four_bit = _BnbLinear4bit is not None and isinstance(base, _BnbLinear4bit)
    if four_bit:
        if type(base).forward is not _BnbLinear4bit.forward:
            return f"base layer {layer_name(base)} with its own forward"
    elif isinstance(base, nn.Linear):
        if type(base).forward is not nn.Linear.forward:
            return f"base layer {layer_name(base)} with its own forward"
    elif not is_conv1d(base):
        return f"base layer {layer_name(base)}"
    reason = _replaced_forward(base)
    if reason is not None:
        return reason
    if four_bit:
        if torch.compiler.is_compiling():  # lora_linear refuses to trace an NF4 weight; bitsandbytes' forward traces
            return f"base layer {layer_name(base)} under torch.compile"
        nf4 = _nf4_weight(base)
        if isinstance(nf4, str):
            return f"base layer {layer_name(base)}: {nf4}"
    return None


def _replaced_forward(base: nn.Module) -> str | None:
    """Why ``base``'s call does not run its class's forward as it is, or None."""
    if "_hf_hook" in vars(base) or "forward" in vars(base):  # accelerate sets both as plain attributes
        return f"base layer {layer_name(base)} with a replaced forward"
    if base._forward_hooks or base._forward_pre_hooks:
        return f"base layer {layer_name(base)} with forward hooks"
    return None


# id(Params4bit) -> (weak reference to it, its data_ptr, its QuantState, the NF4Weight over both). Keyed by
# id with a weak reference (a WeakKeyDictionary would compare tensors with ==): an entry goes with its weight
# (e.g. the one merge_adapter replaces), and no model state, pickle or deepcopy carries it. The entry holds
# the bytes' storage (through the NF4Weight), so a different data_ptr always means different data.
_NF4_CACHE: dict[int, tuple] = {}
_DisableTorchFunctionSubclass = torch._C.DisableTorchFunctionSubclass


def _forget(ref: weakref.ref, key: int) -> None:
    entry = _NF4_CACHE.get(key)
    if entry is not None and entry[0] is ref:
        del _NF4_CACHE[key]


def _nf4_weight(base: nn.Module) -> NF4Weight | str:
    """The NF4Weight over a bitsandbytes ``Linear4bit``'s ``Params4bit`` data and quant state (shared, not
    copied), or why there is none. Built once per weight and reused while its data and quant state are the
    same objects: a forward does not rebuild or revalidate it."""
    weight = base._parameters["weight"]
    quant_state = getattr(weight, "quant_state", None)
    with _DisableTorchFunctionSubclass():
        # Params4bit's __torch_function__ costs every method call about 1.5 us of host time; this, 0.3
        data_ptr = weight.data_ptr()
    hit = _NF4_CACHE.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[2] is quant_state and hit[1] == data_ptr:
        return hit[3]
    # Not isinstance(weight, Params4bit): a pickled Params4bit comes back a plain Parameter with the same
    # attributes, which bitsandbytes' forward (and so this one) still reads.
    if not getattr(weight, "bnb_quantized", True) or quant_state is None:
        # bitsandbytes quantises when the layer moves to a device, and its forward restores a quant state
        # that FSDP dropped: PEFT's forward runs until then.
        return "weight without its quant_state (not quantised yet?)"
    if quant_state.quant_type != "nf4":
        return f"quant_type {quant_state.quant_type!r}: fastlora fuses NF4 only"
    if getattr(quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacks the weight for its AVX512-BF16 CPU kernel on its first inference call
        return "weight in bitsandbytes' CPU-packed layout"
    if quant_state.blocksize not in NF4_BLOCKSIZES:
        return f"blocksize {quant_state.blocksize}"
    if tuple(quant_state.shape) != (base.out_features, base.in_features):
        return f"quant_state.shape {tuple(quant_state.shape)}, not (out_features, in_features)"
    try:
        nf4 = NF4Weight.from_bnb(weight.data, quant_state)
    except (TypeError, ValueError) as e:
        return f"NF4 state fastlora cannot read ({e})"
    key = id(weight)
    _NF4_CACHE[key] = (weakref.ref(weight, lambda ref: _forget(ref, key)), data_ptr, quant_state, nf4)
    return nf4


def unfusable(layer: Linear, adapters=None) -> str | None:
    """Why this PEFT LoRA ``Linear`` cannot run its ``adapters`` (default: all of them) fused, or None.

    Only the layer it wraps directly counts (``layer.base_layer``, not ``get_base_layer()``, the innermost
    one): the fused op replaces that layer's call, so it must be the plain linear layer itself.
    """
    modules = layer._modules
    reason = _plain_base(modules["base_layer"])
    if reason is not None:
        return reason
    adapters = list(modules["lora_A"]) if adapters is None else adapters
    lora_variant = getattr(layer, "lora_variant", {})  # PEFT >= 0.15; before it, DoRA was the one variant
    use_dora = getattr(layer, "use_dora", {})
    # DoRA runs fused (fastlora.dora_linear) on a dense base; other variants are PEFT's.
    if lora_variant or any(map(use_dora.get, adapters)):  # (plain LoRA skips this: host time, every call)
        reason = _variant_reason(layer, adapters, lora_variant, use_dora)
        if reason is not None:
            return reason
    lora_b, lora_dropout = modules["lora_B"]._modules, modules["lora_dropout"]._modules
    for a in adapters:
        if lora_b[a]._parameters.get("bias") is not None:
            return "lora_bias"
        dropout = lora_dropout[a]
        if type(dropout) not in (nn.Dropout, nn.Identity):
            return f"dropout module {type(dropout).__name__}"
        if not 0.0 <= _dropout_p(dropout) < 1.0:
            return f"dropout p={dropout.p}"
        scaling = layer.scaling[a]
        if not is_real(scaling) or not math.isfinite(scaling):
            return f"scaling {scaling!r}"
    return None


def _variant_reason(layer: Linear, adapters, lora_variant: dict, use_dora: dict) -> str | None:
    """``unfusable``'s answer for layers with LoRA variants: DoRA runs fused on a dense base, others are PEFT's."""
    variants = [f"{a}: {type(lora_variant[a]).__name__}" for a in adapters
                if a in lora_variant and type(lora_variant[a]).__name__ != "DoraLinearVariant"]  # fmt: skip
    if variants:
        return "variant " + ", ".join(variants)
    dora = [a for a in adapters if use_dora.get(a) or a in lora_variant]
    if dora:
        modules = layer._modules
        if _BnbLinear4bit is not None and isinstance(modules["base_layer"], _BnbLinear4bit):
            return f"variant {', '.join(f'{a}: DoRA' for a in dora)} on a 4-bit base"
        if getattr(layer, "ephemeral_gpu_offload", False):
            return "DoRA with ephemeral_gpu_offload"
        mags = modules.get("lora_magnitude_vector")
        if mags is None or any(a not in mags._modules for a in dora):
            return "DoRA adapter without its magnitude"
    return None
