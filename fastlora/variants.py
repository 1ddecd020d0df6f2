"""LoRA on ``nn.Embedding`` and ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``, with PEFT's conventions.

``LoRAEmbedding`` and ``LoRAConv`` compute what PEFT's ``lora.Embedding`` and ``lora.Conv1d/2d/3d``
(``peft.tuners.lora.layer``) compute, hold the same tensors in the same shapes, and initialise them the same way,
so adapters move between the two in PEFT's file format (``fastlora.io``). Both run with plain PyTorch ops
(``F.embedding``, ``F.conv1d/2d/3d``, ``torch.matmul``): the fused kernels are for the linear layers, whose
GEMMs dominate a transformer; an embedding lookup or a convolution keeps cuDNN's / ATen's own kernels.

Where PEFT's forward disagrees with its own merge, these layers follow the merge (the exact weight the adapter
stands for): a convolution's ``lora_A`` uses the base's dilation and ``padding_mode`` (PEFT's uses dilation 1,
which fails on shapes for a dilated k > 1 base, and zero padding); an embedding's LoRA lookup never asks for
sparse gradients (PEFT's fails on a ``sparse=True`` base). For every other base the outputs are PEFT's.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlora import mixed_batch
from fastlora._checks import check_adapter_name, check_bool, check_hparams, check_module
from fastlora.layers import DEFAULT_ADAPTER, AdapterTables, _adapter_dtype

__all__ = ["LoRAEmbedding", "LoRAConv", "VARIANT_LAYERS", "is_variant", "is_variant_target", "wrap", "features", "adapter_shapes"]

_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _conv_class(module: nn.Module) -> type | None:
    return next((cls for cls in _CONVS if isinstance(module, cls)), None)


def is_variant_target(module: nn.Module) -> bool:
    """An ``nn.Embedding`` or ``nn.Conv1d/2d/3d`` (or a subclass of one: ``unsupported_reason`` tells whether it
    can be wrapped)."""
    return isinstance(module, nn.Embedding) or _conv_class(module) is not None


def is_variant(module: nn.Module) -> bool:
    """A layer whose adapters take PEFT's embedding or convolution shapes: a base ``is_variant_target`` module
    or a ``LoRAEmbedding`` / ``LoRAConv`` wrapping one."""
    return isinstance(module, VARIANT_LAYERS) or is_variant_target(module)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` (an embedding or a convolution) cannot get a LoRA layer here, or None."""
    cls = nn.Embedding if isinstance(module, nn.Embedding) else _conv_class(module)
    # The layers call F.embedding / F.conv with the base's weight (a merged one must be left out when adapters
    # are disabled): a subclass with its own forward (a scaled embedding, ...) would compute something else.
    if type(module).forward is not cls.forward:
        return f"a {type(module).__name__}, an {cls.__name__} subclass with its own forward"
    if not module.weight.is_floating_point():
        return f"a {module.weight.dtype} weight; LoRA needs a floating-point base"
    return None


def features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) as PEFT counts them: (embedding_dim, num_embeddings) for an embedding,
    (out_channels, in_channels) for a convolution; for the layers here too."""
    if isinstance(module, (LoRAEmbedding, LoRAConv)):
        return module.out_features, module.in_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, module.num_embeddings
    return module.out_channels, module.in_channels


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, (LoRAEmbedding, LoRAConv)) else module


def check_rank_for(argument: str, module: nn.Module, rank: int) -> None:
    """PEFT's limit on grouped convolutions: lora_B is a grouped 1x1 conv over the r channels lora_A makes."""
    base = _base_of(module)
    groups = getattr(base, "groups", 1)
    if _conv_class(base) is not None and rank % groups:
        raise ValueError(f"{argument}: a {type(base).__name__} with groups={groups} needs a rank divisible by "
                         f"{groups} (as PEFT requires), got {rank}")  # fmt: skip


def adapter_shapes(module: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    """The adapter tensors PEFT's files hold for ``module`` (a base embedding / convolution or a layer here),
    by key suffix: ``lora_embedding_A`` (r, num_embeddings) and ``lora_embedding_B`` (embedding_dim, r) for an
    embedding; ``lora_A.weight`` (r, in_channels, *kernel_size) and ``lora_B.weight`` (out_channels,
    r / groups, 1, ...) for a convolution."""
    base = _base_of(module)
    if isinstance(base, nn.Embedding):
        return {"lora_embedding_A": (rank, base.num_embeddings), "lora_embedding_B": (base.embedding_dim, rank)}
    ones = (1,) * len(base.kernel_size)
    return {"lora_A.weight": (rank, base.in_channels, *base.kernel_size),
            "lora_B.weight": (base.out_channels, rank // base.groups, *ones)}  # fmt: skip


class _AdapterLayer(AdapterTables, nn.Module):
    """What ``LoRAEmbedding`` and ``LoRAConv`` share: the frozen base module (``base_layer``), the adapters
    (``lora_A[name]``, ``lora_B[name]``, ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``scaling``),
    which are active, disabling, and merging into the base weight (and back, bit-exactly) — the same
    interface as ``LoRALinear``, so every ``fastlora.model`` function works on all three.

    Subclasses give the layer's own math: ``_new_adapter`` (shapes and initialisation), ``_base`` (the base op
    with a given weight), ``_lora`` (one adapter's term), ``_delta`` (one adapter's ΔW, shaped as the weight)."""

    fan_in_fan_out = False  # PEFT's config field: only GPT-2's Conv1D stores its weight transposed
    quantized = False  # no 4-bit base for these layers

    def _build(self, argument: str, base: nn.Module, in_features: int, out_features: int, r, lora_alpha, lora_dropout,
               use_rslora, adapter_name) -> None:  # fmt: skip
        """What the constructors share once ``base`` (passed as ``argument``) is of their kind: every argument
        checked before anything changes (building the layer freezes ``base``), then the first adapter."""
        reason = unsupported_reason(base)
        if reason is not None:
            raise TypeError(f"{argument}: got {reason}")
        out_f, _ = features(base)
        check_hparams(r, lora_alpha, lora_dropout, in_features=self._elements_in(base), out_features=out_f)
        check_bool("use_rslora", use_rslora)
        check_adapter_name("adapter_name", adapter_name)
        check_rank_for("r", base, r)
        nn.Module.__init__(self)
        for p in base.parameters():
            p.requires_grad_(False)
        self.base_layer = base
        self.in_features, self.out_features = in_features, out_features
        self._init_adapter_tables()
        # The base weight before the first merge, so that unmerge restores it bit-exactly (as LoRALinear).
        self._unmerged_weight: torch.Tensor | None = None
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)

    @staticmethod
    def _elements_in(base: nn.Module) -> int:
        return features(base)[1]

    @property
    def weight(self) -> torch.Tensor:
        """The base weight now in use (merged adapters included), as the base module stores it."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # --- adapters -------------------------------------------------------------------------------------

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> None:  # fmt: skip
        """Add a freshly initialised adapter (PEFT's initialisation for this layer type) and make it the active
        one. On error (bad argument, failed allocation) the layer is unchanged."""
        r, lora_alpha, lora_dropout = check_hparams(r, lora_alpha, lora_dropout, in_features=self._elements_in(
            self.base_layer), out_features=self.out_features)  # fmt: skip
        check_bool("use_rslora", use_rslora)
        check_adapter_name("adapter_name", name)
        check_rank_for("r", self, r)
        if name in self.lora_A:
            raise ValueError(f"adapter_name: this layer already has an adapter named {name!r}")
        weight = self.base_layer.weight
        lora_a, lora_b = self._new_adapter(r, weight.device, _adapter_dtype(weight.dtype))
        self._register_adapter(name, lora_a, lora_b, r, lora_alpha, lora_dropout, use_rslora)

    # --- weights --------------------------------------------------------------------------------------

    def _original_weight(self) -> torch.Tensor:
        return self._unmerged_weight if self._unmerged_weight is not None else self.base_layer.weight

    def _sum_dtype(self) -> torch.dtype:
        # fp32 at least (half-precision bases), and a float64 base's own precision
        return torch.promote_types(self.base_layer.weight.dtype, torch.float32)

    def delta_weight(self, names: list[str]) -> torch.Tensor:
        """Σ ΔW over ``names`` in fp32 (float64 on a float64 base), shaped as the base weight (see ``_delta``)."""
        weight = self.base_layer.weight
        delta = torch.zeros(weight.shape, device=weight.device, dtype=self._sum_dtype())
        for name in names:
            delta += self._delta(name)
        return delta

    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """W + ΣΔW for the already merged adapters and ``names``, summed in fp32 (float64 on a float64 base) from
        the original W and rounded once to W's dtype (a new tensor, shaped as the base weight)."""
        return self._weight_with([*self.merged_adapters, *names])

    def _weight_with(self, merged: list[str]) -> torch.Tensor:
        original = self._original_weight().detach()
        if not merged:
            return original.clone()
        return (original.to(self._sum_dtype()) + self.delta_weight(merged)).to(original.dtype)

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe: bool = False) -> None:
        """Fold adapters (default: the active ones not yet merged) into the base weight, in place. ``safe``
        refuses a non-finite result. On error the layer is unchanged: everything is computed before it
        changes."""
        names = self._to_merge(names, safe)
        if not names:
            return
        new = self.merged_weight(names)
        if safe and not torch.isfinite(new).all():
            raise ValueError(f"merge: merging {names} gives non-finite weights; the layer was left unchanged")
        weight = self.base_layer.weight
        backup = weight.detach().clone() if self._unmerged_weight is None else None
        weight.copy_(new)
        if backup is not None:
            self._unmerged_weight = backup
        self.merged_adapters = [*self.merged_adapters, *names]

    @torch.no_grad()
    def restore_merged(self, merged: list[str]) -> None:
        """Put the layer back to having exactly ``merged`` merged (a rollback of a failed model-wide merge)."""
        if not merged:
            self.unmerge()
            return
        self.base_layer.weight.copy_(self._weight_with(merged))
        self.merged_adapters = list(merged)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Give the base weight back bit-exactly and free the copy kept for it."""
        if self._unmerged_weight is not None:
            self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapters = []

    def unloaded(self, merge: bool) -> nn.Module:
        """The plain module ``fastlora.unload`` puts in this layer's place: the base module itself when its
        weight is the one wanted; else a shallow copy of it (same bias, same settings) holding the merged
        weight (``merge``: the active adapters folded in, as ``merged_weight``) or the original one."""
        base = self.base_layer
        if merge:
            pending = [n for n in self.active_adapters if n not in self.merged_adapters]
            if not pending and not self.merged_adapters:
                return base
            weight = self.merged_weight(pending)
        elif self._unmerged_weight is None:
            return base
        else:
            weight = self._unmerged_weight
        plain = copy.copy(base)
        # copy.copy shares the Module's dicts; the copy gets its own so that the new weight lands on it alone.
        plain._parameters = dict(base._parameters)
        plain._buffers = dict(base._buffers)
        plain._modules = dict(base._modules)
        plain.weight = nn.Parameter(weight, requires_grad=False)
        return plain

    # --- forward --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base module's output plus Σ over active, unmerged adapters of their terms (``_lora``), summed
        in the adapters' dtype and returned in the base output's dtype, as PEFT does."""
        if not self.disabled:
            batch = mixed_batch.current()
            if batch is not None:
                return self._forward_mixed(x, batch)
        if self.disabled:
            return self._base(x, self._original_weight())
        y = self._base(x, self.base_layer.weight)
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not pending:
            return y
        dtype = y.dtype
        for name in pending:
            y = y + self._lora(x, name)
        return y.to(dtype)

    def _forward_mixed(self, x: torch.Tensor, batch: mixed_batch.MixedBatch) -> torch.Tensor:
        """A mixed-adapter batch (``fastlora.adapter_names``): each sample's adapter term computed over the
        samples that use it and added to their rows (as PEFT's ``_mixed_batch_forward``)."""
        if self.merged_adapters:
            raise ValueError(f"adapter_names: this layer has merged adapters {self.merged_adapters}; mixed batches "
                             "need every adapter unmerged")  # fmt: skip
        unbatched = self._unbatched(x)
        if unbatched:  # one sample without its batch dimension
            x = x.unsqueeze(0)
        names = batch.sample_names(x)
        y = self._base(x, self.base_layer.weight)
        for name in batch.distinct:
            if name not in self.lora_A:
                continue
            rows = [i for i, n in enumerate(names) if n == name]
            if rows:
                index = torch.tensor(rows, device=x.device)
                term = self._lora(x.index_select(0, index), name)
                y = y.index_add(0, index, term.to(y.dtype))
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}, out_features={self.out_features}"]
        for name in self.adapters:
            parts.append(
                f"{name}: r={self.r[name]}, lora_alpha={self.lora_alpha[name]:g}, lora_dropout={self.lora_dropout[name]:g}"
                + (", use_rslora=True" if self.use_rslora[name] else "")
            )
        return "\n".join(parts)


class LoRAEmbedding(_AdapterLayer):
    """y = embedding(x, W) + Σ over active adapters of s·(embedding(x, Aᵀ)·Bᵀ), W frozen (PEFT's ``lora.Embedding``).

    Args:
        embedding: the base ``nn.Embedding`` (num_embeddings, embedding_dim), kept as ``base_layer`` and frozen;
            its ``padding_idx``, ``max_norm``, ``norm_type`` and ``scale_grad_by_freq`` apply to the LoRA lookup
            too, as in PEFT.
        r, lora_alpha, lora_dropout, use_rslora, adapter_name: the first adapter's, as ``LoRALinear``'s.

    Parameters, per adapter (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``; also reachable by those names):
        lora_A[name]: (r, num_embeddings), zeros.
        lora_B[name]: (embedding_dim, r), standard normal: with A zero a fresh adapter changes nothing.

    ``scaling[name]`` = lora_alpha / r (lora_alpha / √r with rsLoRA). ``lora_dropout`` is recorded (it goes to the
    file) but not applied: dropping token indices means nothing, and PEFT does not apply it either. Forward:
    x (...) integer indices -> (..., embedding_dim). Merge: W += s·(B·A)ᵀ. Ops: ``F.embedding`` and one matmul
    per adapter.
    """

    def __init__(self, embedding: nn.Embedding, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, adapter_name: str = DEFAULT_ADAPTER) -> None:  # fmt: skip
        check_module("embedding", embedding)
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding: expected an nn.Embedding, got {type(embedding).__name__}")
        self._build("embedding", embedding, embedding.num_embeddings, embedding.embedding_dim, r, lora_alpha,
                    lora_dropout, use_rslora, adapter_name)  # fmt: skip

    @property
    def lora_embedding_A(self) -> nn.ParameterDict:
        """PEFT's name for ``lora_A``."""
        return self.lora_A

    @property
    def lora_embedding_B(self) -> nn.ParameterDict:
        """PEFT's name for ``lora_B``."""
        return self.lora_B

    def _new_adapter(self, r: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # PEFT's (and the LoRA paper's) choice for embeddings: A zero, B as nn.Embedding initialises its weight.
        lora_a = torch.zeros((r, self.in_features), device=device, dtype=dtype)
        lora_b = torch.empty((self.out_features, r), device=device, dtype=dtype)
        nn.init.normal_(lora_b)
        return lora_a, lora_b

    def _lookup(self, x: torch.Tensor, weight: torch.Tensor, sparse: bool) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, sparse)

    def _base(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._lookup(x, weight, self.base_layer.sparse)

    def _lora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # Aᵀ is a transposed view, which cannot take a sparse gradient: the base's sparse flag is for its own
        # (frozen) weight, the adapter gets a dense one.
        after_a = self._lookup(x, self.lora_A[name].t(), sparse=False)
        return (after_a @ self.lora_B[name].t()) * self.scaling[name]

    def _unbatched(self, x: torch.Tensor) -> bool:
        return x.dim() < 2

    def _delta(self, name: str, argument: str = "merge") -> torch.Tensor:
        """s·(B·A)ᵀ in the summing dtype: (num_embeddings, embedding_dim), as the weight."""
        dtype = self._sum_dtype()
        return (self.lora_B[name].to(dtype) @ self.lora_A[name].to(dtype)).t() * self.scaling[name]

    def _from_matrices(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) from (r, num_embeddings) / (embedding_dim, r) matrices: already the adapter's shapes."""
        return a, b

    def _delta_matrix(self, name: str, argument: str = "merge") -> torch.Tensor:
        """s·B·A, (embedding_dim, num_embeddings), in the summing dtype."""
        return self._delta(name).t()


class LoRAConv(_AdapterLayer):
    """y = conv(x, W) + b + Σ over active adapters of s·conv1x1(conv(dropout(x), A), B), W, b frozen (PEFT's
    ``lora.Conv1d`` / ``Conv2d`` / ``Conv3d``).

    Args:
        conv: the base ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``, kept as ``base_layer`` and frozen.
        r: must be divisible by ``conv.groups`` (as PEFT requires). Other arguments as ``LoRALinear``'s.

    Parameters, per adapter (the weights of PEFT's ``lora_A[name]`` / ``lora_B[name]`` conv modules):
        lora_A[name]: (r, in_channels, *kernel_size), kaiming-uniform(a=√5): a conv with the base's kernel size,
            stride, padding, dilation and padding mode, and groups = 1 (every input channel).
        lora_B[name]: (out_channels, r / groups, 1, ...), zeros: a 1x1 conv with the base's groups, so output
            group g reads the g-th block of the r channels A made.

    x (N, C_in, *spatial) or unbatched (C_in, *spatial) -> the base's output shape. Dropout (elementwise, on x)
    applies to the adapter's input only. Merge (groups = 1): W += s·Σ_i B[:, i]·A[i] (for a 1x1 kernel the
    matrix product B·A); a grouped convolution cannot be merged, since ΔW reaches across groups (PEFT refuses
    too: NotImplementedError). Ops: two ``F.conv1d/2d/3d`` per adapter.
    """

    def __init__(self, conv: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, adapter_name: str = DEFAULT_ADAPTER) -> None:  # fmt: skip
        check_module("conv", conv)
        if _conv_class(conv) is None:
            raise TypeError(f"conv: expected an nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(conv).__name__}")
        self._build("conv", conv, conv.in_channels, conv.out_channels, r, lora_alpha, lora_dropout, use_rslora,
                    adapter_name)  # fmt: skip

    @staticmethod
    def _elements_in(base: nn.Module) -> int:
        return base.in_channels * math.prod(base.kernel_size)

    @property
    def groups(self) -> int:
        return self.base_layer.groups

    @property
    def _conv_fn(self):
        # Looked up, not stored: a module attribute holding F.conv2d would not pickle.
        return _CONVS[_conv_class(self.base_layer)]

    def _new_adapter(self, r: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.base_layer
        ones = (1,) * len(base.kernel_size)
        lora_a = torch.empty((r, base.in_channels, *base.kernel_size), device=device, dtype=dtype)
        lora_b = torch.zeros((base.out_channels, r // base.groups, *ones), device=device, dtype=dtype)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # as nn.Conv initialises PEFT's lora_A module
        return lora_a, lora_b

    def _base(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return base._conv_forward(x, weight, base.bias)

    def _lora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = F.dropout(x.to(lora_a.dtype), self.lora_dropout[name], self.training)
        if base.padding_mode != "zeros":  # as nn.Conv's own forward pads for these modes
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            h = self._conv_fn(x, lora_a, None, base.stride, 0, base.dilation, 1)
        else:
            h = self._conv_fn(x, lora_a, None, base.stride, base.padding, base.dilation, 1)
        return self._conv_fn(h, lora_b, None, 1, 0, 1, base.groups) * self.scaling[name]

    def _unbatched(self, x: torch.Tensor) -> bool:
        return x.dim() == len(self.base_layer.kernel_size) + 1

    def _check_mergeable(self, argument: str = "merge") -> None:
        if self.groups > 1:
            raise NotImplementedError(f"{argument}: this {type(self.base_layer).__name__} has groups={self.groups}; its "
                                      "LoRA term reaches across groups, which the grouped weight cannot hold (PEFT "
                                      "cannot merge it either). Run it unmerged, or unload(model, merge=False)")  # fmt: skip

    def _delta(self, name: str, argument: str = "merge") -> torch.Tensor:
        """s·Σ_i B[:, i]·A[i] in the summing dtype: (out_channels, in_channels, *kernel_size), as the weight
        (groups = 1)."""
        self._check_mergeable(argument)
        dtype = self._sum_dtype()
        a, b = self.lora_A[name].to(dtype), self.lora_B[name].to(dtype)
        return (b.flatten(1) @ a.flatten(1)).view(self.base_layer.weight.shape) * self.scaling[name]

    def merged_weight(self, names: list[str]) -> torch.Tensor:
        if names or self.merged_adapters:
            self._check_mergeable()
        return super().merged_weight(names)

    def _from_matrices(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in the adapter's shapes from (r, in_channels·prod(kernel)) / (out_channels, r) matrices."""
        base = self.base_layer
        ones = (1,) * len(base.kernel_size)
        return a.reshape(a.shape[0], base.in_channels, *base.kernel_size), b.reshape(b.shape[0], b.shape[1], *ones)

    def _delta_matrix(self, name: str, argument: str = "merge") -> torch.Tensor:
        """s·B·A, (out_channels, in_channels·prod(kernel)), in the summing dtype (groups = 1)."""
        return self._delta(name, argument).flatten(1)


VARIANT_LAYERS = (LoRAEmbedding, LoRAConv)


def wrap(module: nn.Module, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool,
         adapter_name: str) -> LoRAEmbedding | LoRAConv:  # fmt: skip
    """The LoRA layer for a base embedding or convolution."""
    cls = LoRAEmbedding if isinstance(module, nn.Embedding) else LoRAConv
    return cls(module, r, lora_alpha, lora_dropout, use_rslora, adapter_name)


def concat_adapters(layer: _AdapterLayer, names: list[str], weights: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``combine(method="cat")``: A = [wᵢsᵢ·Aᵢ], B = [Bᵢ] along the rank. For a grouped convolution each
    group's rank block is concatenated in turn, so that output group g still reads its own channels."""
    groups = layer.groups if isinstance(layer, LoRAConv) else 1
    a_parts = [layer.lora_A[n].data * (weights[n] * layer.scaling[n]) for n in names]
    a_parts = [a.reshape(groups, a.shape[0] // groups, *a.shape[1:]) for a in a_parts]
    a = torch.cat(a_parts, dim=1)
    a = a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])
    b = torch.cat([layer.lora_B[n].data for n in names], dim=1)
    return a, b
