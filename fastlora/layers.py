"""``LoRALinear``: a drop-in ``nn.Linear`` (or GPT-2 ``Conv1D``) with one or more fused LoRA adapters."""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlora._checks import check_adapter_name, check_bool, check_hparams, check_int, check_names
from fastlora import nf4
from fastlora import mixed_batch
from fastlora.dora import dora_after, dora_linear, dora_norm
from fastlora.functional import lora_linear, lora_linear_multi
from fastlora.nf4 import NF4Weight
from fastlora.quantized import NF4Linear, nf4_linear

__all__ = ["AdapterTables", "LoRALinear", "as_one_adapter", "is_conv1d"]

DEFAULT_ADAPTER = "default"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: a linear layer whose weight is stored (in, out). Recognised
    without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def as_one_adapter(lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor],
                   scalings: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several adapters applied to the same input without dropout, as one of their stacked ranks: A = [A_1; …]
    (Σr, K) and B = [s_1·B_1, …] (N, Σr), to run with s = 1. Differentiable (each adapter gets its gradient)."""
    return torch.cat(lora_As), torch.cat([b * s for b, s in zip(lora_Bs, scalings)], dim=1)


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    # As PEFT does by default: half-precision bases get fp32 adapters (the optimizer state stays
    # accurate); the op casts the small adapters per call, never the activations.
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class AdapterTables:
    """The named adapters of a LoRA layer, the same for ``LoRALinear``, ``LoRAEmbedding`` and ``LoRAConv``:
    ``lora_A[name]``, ``lora_B[name]``, DoRA's ``lora_magnitude_vector[name]`` (DoRA adapters only), and per
    name ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``use_dora``, ``scaling``; which are active,
    disabling, and which are merged. The layer gives ``merged_adapters`` its meaning."""

    def _init_adapter_tables(self) -> None:
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        # DoRA adapters' magnitudes m (out_features,), PEFT's lora_magnitude_vector; only DoRA adapters have one.
        self.lora_magnitude_vector = nn.ParameterDict()
        self.use_dora: dict[str, bool] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged_adapters: list[str] = []

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    def _register_adapter(self, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, r: int, lora_alpha: float,
                          lora_dropout: float, use_rslora: bool, magnitude: torch.Tensor | None = None) -> None:
        """Store a new adapter (checked and built by the caller) and make it the active one."""
        self.lora_A[name] = lora_a if isinstance(lora_a, nn.Parameter) else nn.Parameter(lora_a)
        self.lora_B[name] = lora_b if isinstance(lora_b, nn.Parameter) else nn.Parameter(lora_b)
        if magnitude is not None:
            self.lora_magnitude_vector[name] = magnitude
        self.use_dora[name] = magnitude is not None
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.lora_dropout[name], self.use_rslora[name] = lora_dropout, use_rslora
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.set_active([name])

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (it may be active; it must not be merged)."""
        check_adapter_name("adapter_name", name)
        if name not in self.lora_A:
            raise ValueError(f"adapter_name: no adapter named {name!r} in this layer (it has {self.adapters})")
        if name in self.merged_adapters:
            raise ValueError(f"adapter_name: {name!r} is merged into the weight; unmerge before deleting it")
        for table in (self.lora_A, self.lora_B, self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.scaling,
                      self.use_dora):  # fmt: skip
            del table[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _to_merge(self, names: list[str] | None, safe: bool) -> list[str]:
        """``merge``'s arguments checked: the adapters it folds in (default: the active ones), less those
        already merged."""
        check_bool("safe", safe)
        if names is not None:
            names = check_names("adapter_names", names)
            missing = [n for n in names if n not in self.lora_A]
            if missing:
                raise ValueError(f"adapter_names: this layer has no adapter {missing} (it has {self.adapters})")
        return [n for n in (self.active_adapters if names is None else names) if n not in self.merged_adapters]

    def set_active(self, names: list[str]) -> None:
        """Make ``names`` (those this layer has) the active adapters, trainable; freeze the others."""
        names = check_names("names", names, allow_empty=True)
        self.active_adapters = [n for n in names if n in self.lora_A]
        for name in self.lora_A:
            trainable = name in self.active_adapters
            self.lora_A[name].requires_grad_(trainable)
            self.lora_B[name].requires_grad_(trainable)
            if name in self.lora_magnitude_vector:
                self.lora_magnitude_vector[name].requires_grad_(trainable)


class LoRALinear(AdapterTables, nn.Module):
    """y = x·Wᵀ + b + Σ over active adapters of s·(dropout(x)·Aᵀ)·Bᵀ, with W, b frozen.

    Parameters (PEFT's layout, so adapters move between the two without transposes):
        weight: (out_features, in_features), frozen; stored (in, out) when built from a GPT-2 ``Conv1D``
            (``fan_in_fan_out``), exactly as the original module stored it.
        bias: (out_features,) or None, frozen.
        lora_A[name]: (r, in_features), kaiming-uniform(a=√5).
        lora_B[name]: (out_features, r), zeros, so a fresh adapter leaves the output unchanged.

    Per adapter: ``r[name]``, ``lora_alpha[name]``, ``lora_dropout[name]``, ``use_rslora[name]`` and
    ``scaling[name]`` = lora_alpha / r (lora_alpha / √r with rsLoRA). Adapters are fp32 on an fp16/bf16
    base (as PEFT keeps them) and in the base dtype otherwise.

    Active adapters run fused into the base GEMM: several at once as one adapter of their stacked ranks
    when no dropout applies (eval, or every p = 0); in training with dropout the first runs fused and the
    others add their terms with plain PyTorch ops (each needs its own dropout draw). Merged adapters live in
    ``weight`` (see ``merge``); a layer whose active adapters
    are all merged costs what the plain layer costs.

    QLoRA: on a quantised base (``from_linear(NF4Linear)``, or ``fastlora.quantize`` after ``inject``) the base
    is the submodule ``base_layer`` (an ``NF4Linear``: codes and bias), ``weight`` and ``bias`` are None, and
    ``quantized`` is True. x is cast to the base's ``compute_dtype`` and the output comes back in x's dtype;
    adapters are fp32 on a bf16/fp16 compute dtype. Merging requantises (see ``merge``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
        use_dora: bool = False,
    ) -> None:
        in_features = check_int("in_features", in_features, minimum=1)
        out_features = check_int("out_features", out_features, minimum=1)
        check_hparams(r, lora_alpha, lora_dropout, in_features=in_features, out_features=out_features)
        check_bool("bias", bias)
        check_bool("use_rslora", use_rslora)
        check_bool("use_dora", use_dora)
        check_adapter_name("adapter_name", adapter_name)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating-point torch.dtype or None, got {dtype!r}")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device: expected a torch.device or a device string, got {device!r} ({err})") from None
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        bias_p = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        # nn.Linear's own initialisation, so a LoRALinear built from scratch is a plain Linear plus adapter.
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias_p is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(bias_p, -bound, bound)
        self._setup_base(weight, bias_p, fan_in_fan_out=False)
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, use_dora)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_name: str = DEFAULT_ADAPTER,
        use_dora: bool = False,
    ) -> LoRALinear:
        """Wrap an ``nn.Linear`` (or transformers' ``Conv1D``): the new layer shares (does not copy) its
        weight and bias, which get frozen. An ``fastlora.NF4Linear`` becomes the layer's ``base_layer``."""
        if isinstance(linear, NF4Linear):
            check_hparams(r, lora_alpha, lora_dropout, in_features=linear.in_features, out_features=linear.out_features)
            check_bool("use_rslora", use_rslora)
            check_adapter_name("adapter_name", adapter_name)
            if check_bool("use_dora", use_dora):
                raise NotImplementedError("use_dora: DoRA on a quantised (NF4) base is not implemented")
            layer = cls.__new__(cls)
            nn.Module.__init__(layer)
            layer._setup_base(None, None, fan_in_fan_out=linear.fan_in_fan_out, base_layer=linear)
            layer.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)
            return layer
        if not isinstance(linear, nn.Linear) and not is_conv1d(linear):
            raise TypeError(f"linear: expected an nn.Linear or transformers Conv1D, got {type(linear).__name__} "
                            "(a fastlora.NF4Linear is taken too)")  # fmt: skip
        if not linear.weight.is_floating_point():
            raise TypeError(f"linear: expected a floating-point weight, got dtype {linear.weight.dtype}")
        in_f, out_f = linear.weight.shape if is_conv1d(linear) else linear.weight.shape[::-1]
        # Every argument is checked before the layer is built: building freezes linear's parameters.
        check_hparams(r, lora_alpha, lora_dropout, in_features=in_f, out_features=out_f)
        check_bool("use_rslora", use_rslora)
        check_bool("use_dora", use_dora)
        check_adapter_name("adapter_name", adapter_name)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup_base(linear.weight, linear.bias, fan_in_fan_out=is_conv1d(linear))
        layer.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, use_dora)
        return layer

    def _setup_base(self, weight: nn.Parameter | None, bias: nn.Parameter | None, fan_in_fan_out: bool,
                    base_layer: NF4Linear | None = None) -> None:  # fmt: skip
        self.fan_in_fan_out = fan_in_fan_out
        if base_layer is not None:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
            self.base_layer = base_layer
        else:
            self.in_features, self.out_features = weight.shape if fan_in_fan_out else weight.shape[::-1]
            weight.requires_grad_(False)
            self.weight = weight
            if bias is not None:
                bias.requires_grad_(False)
            self.register_parameter("bias", bias)
        self._init_adapter_tables()
        # The base weight as it was before the first merge, kept so that unmerge restores it bit-exactly
        # (subtracting a rounded delta would not). Costs one copy of the weight while anything is merged; on a
        # quantised base, the original NF4Weight (4-bit: cheap).
        self._unmerged_weight: torch.Tensor | NF4Weight | None = None
        # Quantised base only: the largest |requantised - exact| element of the merged weight now in the base
        # (None while nothing is merged).
        self.merge_error: float | None = None

    @property
    def quantized(self) -> bool:
        """Whether the base is 4-bit (``base_layer``, an NF4Linear)."""
        return self._parameters["weight"] is None

    def _quantize_base(self, base_layer: NF4Linear) -> None:
        """Replace the dense base by ``base_layer`` (fastlora.quantize does this; nothing may be merged)."""
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        self.base_layer = base_layer

    def _factory(self) -> tuple[torch.device, torch.dtype]:
        """(device, dtype) of the base: the one adapters are built on and their dtype follows."""
        if self.quantized:
            base = self._modules["base_layer"]
            return base.weight.device, base.compute_dtype
        return self.weight.device, self.weight.dtype

    # --- adapters -------------------------------------------------------------------------------------

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False) -> None:  # fmt: skip
        """Add a freshly initialised adapter (A kaiming-uniform, B zeros) and make it the active one.
        ``use_dora``: a DoRA adapter (see ``fastlora.dora_linear``), its magnitude m (out_features,) initialised
        as PEFT does to ‖W + s·B·A‖ per output row (= ‖W‖, B being 0), from the unmerged base weight.
        On error (bad argument, failed allocation) the layer is unchanged."""
        r, lora_alpha, lora_dropout = check_hparams(r, lora_alpha, lora_dropout, in_features=self.in_features,
                                                    out_features=self.out_features)  # fmt: skip
        check_bool("use_rslora", use_rslora)
        check_bool("use_dora", use_dora)
        check_adapter_name("adapter_name", name)
        if name in self.lora_A:
            raise ValueError(f"adapter_name: this layer already has an adapter named {name!r}")
        if use_dora and self.quantized:
            raise NotImplementedError("use_dora: DoRA on a quantised (NF4) base is not implemented")
        device, base_dtype = self._factory()
        factory = {"device": device, "dtype": _adapter_dtype(base_dtype)}
        lora_a = nn.Parameter(torch.empty((r, self.in_features), **factory))
        lora_b = nn.Parameter(torch.zeros((self.out_features, r), **factory))
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # PEFT's default init for lora_A
        scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        magnitude = None
        if use_dora:
            with torch.no_grad():
                w = self._original_weight().detach()
                m = dora_norm(w, lora_a, lora_b, scaling)
            magnitude = nn.Parameter(m.to(factory["dtype"]).clone())
        self._register_adapter(name, lora_a, lora_b, r, lora_alpha, lora_dropout, use_rslora, magnitude)

    # --- weights --------------------------------------------------------------------------------------

    def base_weight(self) -> torch.Tensor:
        """The (out_features, in_features) weight the layer computes with now (merged adapters included);
        on a quantised base, dequantised into the compute dtype."""
        if self.quantized:
            base = self._modules["base_layer"]
            return nf4.dequantize(base.weight, base.compute_dtype)
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _original_nf4(self) -> NF4Weight:
        return self._unmerged_weight if self._unmerged_weight is not None else self._modules["base_layer"].weight

    def _original_weight(self) -> torch.Tensor:
        if self.quantized:  # exact fp32 values of the original codes
            return nf4.dequantize(self._original_nf4(), torch.float32)
        w = self._unmerged_weight if self._unmerged_weight is not None else self.weight
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self, names: list[str]) -> torch.Tensor:
        """Σ s·B·A over ``names``, (out_features, in_features), in fp32."""
        delta = torch.zeros((self.out_features, self.in_features), device=self._factory()[0], dtype=torch.float32)
        for name in names:
            delta.addmm_(self.lora_B[name].float(), self.lora_A[name].float(), alpha=self.scaling[name])
        return delta

    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """W + Σ s·B·A for the already merged adapters and ``names``, summed in fp32 from the original W and
        rounded once to W's dtype; shaped as ``weight`` is stored. On a quantised base: the exact sum in fp32,
        (out_features, in_features), before any requantisation."""
        return self._weight_with([*self.merged_adapters, *names])

    def _weight_with(self, merged: list[str]) -> torch.Tensor:
        """The stored weight with exactly the adapters ``merged`` folded in (a new tensor)."""
        if self.quantized:
            with torch.no_grad():  # the dequantised weight is a fresh fp32 tensor, made under no_grad
                w = self._original_weight()
                return w.add_(self.delta_weight(merged)) if merged else w
        if not merged:
            w = self._original_weight().detach().clone()
            return w.t() if self.fan_in_fan_out else w
        if any(self.use_dora.get(n) for n in merged):
            total = self._dora_folded(merged).to(self.weight.dtype)
        else:
            total = (self._original_weight().float() + self.delta_weight(merged)).to(self.weight.dtype)
        return total.t() if self.fan_in_fan_out else total

    @torch.no_grad()
    def _dora_folded(self, merged: list[str]) -> torch.Tensor:
        """W with ``merged`` folded in one after another as PEFT merges them, in fp32: a LoRA adapter adds
        s·B·A; a DoRA adapter makes the weight so far W' = c ⊙ (W' + s·B·A) per row, with c = m / ‖W + s·B·A‖
        and W the unmerged base (PEFT's ``_unmerged_base_weight``), as its forward scales all before it."""
        original = self._original_weight().detach().float()
        total = original.clone()
        for name in merged:
            delta = self.delta_weight([name])
            total.add_(delta)
            if self.use_dora.get(name):
                norm = torch.linalg.vector_norm(original + delta, dim=1)
                total.mul_((self.lora_magnitude_vector[name].detach().float() / norm)[:, None])
        return total

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe: bool = False) -> None:
        """Fold adapters (default: the active ones not yet merged) into ``weight``. ``safe`` refuses a
        non-finite result. On error the layer is unchanged: everything is allocated before it changes."""
        names = self._to_merge(names, safe)
        if not names:
            return
        if self.quantized:
            self._merge_quantized(names)
            return
        new = self.merged_weight(names)
        if safe and not torch.isfinite(new).all():
            raise ValueError(f"merge: merging {names} gives non-finite weights; the layer was left unchanged")
        backup = self.weight.detach().clone() if self._unmerged_weight is None else None
        self.weight.copy_(new)
        if backup is not None:
            self._unmerged_weight = backup
        self.merged_adapters = [*self.merged_adapters, *names]

    def requantized(self, merged: list[str]) -> tuple[NF4Weight, float]:
        """Quantised base: the NF4 weight with exactly the adapters ``merged`` folded in (the original codes
        dequantised to fp32, plus Σ s·B·A in fp32, requantised with the same blocksize and double
        quantisation), and the largest absolute error requantising introduced against that exact sum."""
        exact = self._weight_with(merged)
        if not torch.isfinite(exact).all():
            raise ValueError(f"merge: merging {merged} gives non-finite weights; the layer was left unchanged")
        original = self._original_nf4()
        q = dataclasses.replace(nf4.quantize(exact, original.blocksize, original.double_quant), dtype=original.dtype)
        error = (nf4.dequantize(q, torch.float32) - exact).abs().max().item()
        return q, error

    @torch.no_grad()
    def _merge_quantized(self, names: list[str]) -> None:
        # As PEFT merges into a bitsandbytes 4-bit base (dequantise, add, requantise), but summed in fp32 from
        # the original codes, which are kept (4 bits a weight) so that unmerge gives them back exactly.
        merged = [*self.merged_adapters, *names]
        q, error = self.requantized(merged)
        self._install_merged(q)
        self.merged_adapters = merged
        self.merge_error = error
        warnings.warn(f"merge: {merged} merged into a 4-bit (NF4) base by requantising; that changed the merged "
                      f"weight by up to {error:.3g} (absolute) against the exact sum (recorded as "
                      f"layer.merge_error); unmerge restores the original codes exactly", stacklevel=3)  # fmt: skip

    def _install_merged(self, q: NF4Weight) -> None:
        """Put merged codes ``q`` in the base. The first merge keeps the original tensors aside and installs
        q's; later ones write into the merged tensors in place (as a dense merge does), so a rolled-back
        merge leaves the same tensor objects it found."""
        base = self._modules["base_layer"]
        if self._unmerged_weight is None:
            original = base.weight
            base.set_weight(q)
            self._unmerged_weight = original
        else:
            base.copy_weight_(q)

    @torch.no_grad()
    def restore_merged(self, merged: list[str]) -> None:
        """Put the layer back to having exactly ``merged`` merged (a rollback of a failed model-wide merge):
        the weight is recomputed as ``merge`` computed it, so it comes back bit for bit."""
        if not merged:
            self.unmerge()
            return
        if self.quantized:
            q, error = self.requantized(merged)
            self._install_merged(q)
            self.merged_adapters, self.merge_error = list(merged), error
            return
        self.weight.copy_(self._weight_with(merged))
        self.merged_adapters = list(merged)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Give the base weight back bit-exactly and free the copy kept for it."""
        if self._unmerged_weight is not None:
            if self.quantized:
                self._modules["base_layer"].set_weight(self._unmerged_weight)
            else:
                self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merge_error = None
        self.merged_adapters = []

    # --- forward --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), in x's dtype."""
        # Parameters and submodules are read from Module's own dicts (_parameters, _modules): the same
        # objects as self.weight or self.lora_A[name], without Module.__getattr__'s host time on every call.
        params = self._parameters
        if not self.disabled:
            batch = mixed_batch.current()
            if batch is not None:
                return self._forward_mixed(x, batch)
        if params["weight"] is None:
            return self._forward_quantized(x)
        bias = params["bias"]
        if self.disabled:
            return F.linear(x, self._original_weight(), bias)
        weight = params["weight"].t() if self.fan_in_fan_out else params["weight"]
        pending = self.active_adapters
        if self.merged_adapters:
            pending = [n for n in pending if n not in self.merged_adapters]
        if not pending:
            return F.linear(x, weight, bias)
        return self._with_adapters(x, weight, bias, pending)

    def _with_adapters(self, x: torch.Tensor, weight, bias, pending: list[str]) -> torch.Tensor:
        """x·Wᵀ + b + the ``pending`` adapters' terms. One adapter: one fused op. Several: one fused op over their
        stacked ranks (A = [A_1; …], B = [s_1·B_1, …], s = 1) when no dropout applies (eval, or every p = 0);
        with dropout each adapter needs its own draw, so the first runs fused and the others add plain ops."""
        modules = self._modules
        lora_a, lora_b = modules["lora_A"]._parameters, modules["lora_B"]._parameters
        dropout = self.lora_dropout
        if len(modules["lora_magnitude_vector"]) and any(self.use_dora[n] for n in pending):  # any DoRA adapter
            return self._with_dora(x, weight, bias, pending)
        if len(pending) > 1 and not (self.training and any(dropout[n] > 0.0 for n in pending)):
            a, b = as_one_adapter([lora_a[n] for n in pending], [lora_b[n] for n in pending],
                                  [self.scaling[n] for n in pending])  # fmt: skip
            return lora_linear(x, weight, bias, a, b, 1.0, 0.0, self.training)
        first = pending[0]
        y = lora_linear(x, weight, bias, lora_a[first], lora_b[first], self.scaling[first], dropout[first],
                        self.training)  # fmt: skip
        for name in pending[1:]:  # further adapters: their own dropout draw, added with plain ops
            x_hat = F.dropout(x, dropout[name], self.training)
            a, b = lora_a[name].to(x.dtype), lora_b[name].to(x.dtype)
            y = y + self.scaling[name] * ((x_hat @ a.t()) @ b.t())
        return y

    def _with_dora(self, x: torch.Tensor, weight, bias, pending: list[str]) -> torch.Tensor:
        """``pending`` adapters, some DoRA, in order, with PEFT's rules: the first runs as one op (``dora_linear``
        or ``lora_linear``); each later LoRA adapter adds s·(x̂·Aᵀ)·Bᵀ; each later DoRA adapter, as PEFT's
        ``DoraLinearVariant.forward`` on the result so far y: without dropout y + (c − 1)·(y − b) + c·s·(x·Aᵀ)·Bᵀ
        (it rescales the earlier adapters' terms too), with dropout y + (c − 1)·(x̂·Wᵀ) + c·s·(x̂·Aᵀ)·Bᵀ. The norm
        is always that of the unmerged base weight plus the adapter's own s·B·A, detached."""
        lora_a, lora_b, mags = self.lora_A, self.lora_B, self.lora_magnitude_vector
        original = weight
        if self.merged_adapters:  # the weight holds merged adapters; the norm is the base's (PEFT's rule)
            original = self._original_weight()
            y = F.linear(x, weight, bias)
            rest = pending
        else:
            first, rest = pending[0], pending[1:]
            args = (lora_a[first], lora_b[first])
            if self.use_dora[first]:
                y = dora_linear(x, weight, bias, *args, mags[first], self.scaling[first], self.lora_dropout[first],
                                self.training)  # fmt: skip
            else:
                y = lora_linear(x, weight, bias, *args, self.scaling[first], self.lora_dropout[first], self.training)
        for name in rest:
            p = self.lora_dropout[name] if self.training else 0.0
            x_hat = F.dropout(x, p, True) if p > 0.0 else x
            a, b, s = lora_a[name], lora_b[name], self.scaling[name]
            lora = s * ((x_hat @ a.to(x.dtype).t()) @ b.to(x.dtype).t())
            if not self.use_dora[name]:
                y = y + lora
                continue
            y = dora_after(y, x_hat, weight, bias, lora, mags[name], dora_norm(original.detach(), a, b, s), p > 0.0)
        return y

    def _forward_mixed(self, x: torch.Tensor, batch: mixed_batch.MixedBatch) -> torch.Tensor:
        """A mixed-adapter batch (``fastlora.adapter_names``): each sample with its own adapter of this layer,
        or the base alone, in one ``lora_linear_multi``."""
        if self.merged_adapters:
            raise ValueError(f"adapter_names: this layer has merged adapters {self.merged_adapters}; mixed batches "
                             "need every adapter unmerged")  # fmt: skip
        local, grouping = batch.grouping(self.lora_A, x)
        dora = [n for n in local if self.use_dora[n]]
        if dora:
            raise NotImplementedError(f"adapter_names: mixed batches with DoRA adapters ({dora}) are not implemented")
        quantized = self.quantized
        if quantized:
            base = self._modules["base_layer"]
            weight, bias, dtype = base.weight, base._parameters["bias"], x.dtype
            x = x.to(base.compute_dtype)
            bias = None if bias is None else bias.to(base.compute_dtype)
        else:
            weight = self.weight.t() if self.fan_in_fan_out else self.weight
            bias = self.bias
        if not local:
            y = nf4_linear(x, weight, bias, x.dtype) if quantized else F.linear(x, weight, bias)
        else:
            lora_a, lora_b = self.lora_A, self.lora_B
            a, b, ranks = mixed_batch.stack_adapters(self, [(lora_a[n], lora_b[n]) for n in local])
            y = lora_linear_multi(x, weight, bias, a, b, [self.scaling[n] for n in local], grouping,
                                  [self.lora_dropout[n] for n in local], self.training, ranks=ranks)  # fmt: skip
        return y.to(dtype) if quantized else y

    def _forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        # As bitsandbytes' Linear4bit: compute in the base's compute dtype, return in x's dtype.
        base = self._modules["base_layer"]
        compute_dtype, bias = base.compute_dtype, base._parameters["bias"]
        if self.disabled:
            return nf4_linear(x, self._original_nf4(), bias, compute_dtype)
        pending = self.active_adapters
        if self.merged_adapters:
            pending = [n for n in pending if n not in self.merged_adapters]
        if not pending:
            return nf4_linear(x, base.weight, bias, compute_dtype)
        dtype = x.dtype
        x = x.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
        return self._with_adapters(x, base.weight, bias, pending).to(dtype)

    def extra_repr(self) -> str:
        has_bias = (self.base_layer.bias if self.quantized else self.bias) is not None
        parts = [f"in_features={self.in_features}, out_features={self.out_features}, bias={has_bias}"]
        for name in self.adapters:
            parts.append(
                f"{name}: r={self.r[name]}, lora_alpha={self.lora_alpha[name]:g}, lora_dropout={self.lora_dropout[name]:g}"
                + (", use_rslora=True" if self.use_rslora[name] else "")
                + (", use_dora=True" if self.use_dora[name] else "")
            )
        if self.fan_in_fan_out:
            parts.append("fan_in_fan_out=True")
        return "\n".join(parts) if len(parts) > 1 else parts[0]
