"""LoRA on nn.Embedding and nn.Conv1d/2d/3d (fastlora.variants): against a float64 evaluation written out here
and against PEFT's own lora.Embedding / lora.Conv*d layers (outputs, every gradient, merge / unmerge), the model
workflow, PEFT's adapter files both ways, a small UNet-like model trained and reloaded, and bad inputs."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastlora
from fastlora import LoRAConv, LoRAEmbedding
from fastlora.model import lora_layers

from snapshot import assert_unchanged, snapshot

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as peft_lora  # noqa: E402

ATOL64 = 1e-10  # float64 fastlora against float64 PEFT: the same ops, in a possibly different order


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns on grouped convs ("merging is not supported")
        return fn(*args, **kwargs)


def peft_layer(base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0, use_rslora: bool = False):
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
    cls = {nn.Embedding: peft_lora.Embedding, nn.Conv1d: peft_lora.Conv1d, nn.Conv2d: peft_lora.Conv2d,
           nn.Conv3d: peft_lora.Conv3d}[type(base)]  # fmt: skip
    return _quiet(cls, base, "default", config=config, r=r, lora_alpha=lora_alpha)


def peft_tensors(layer, name="default"):
    """PEFT's (A, B) for adapter ``name``."""
    if isinstance(layer, peft_lora.Embedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def randomize(layer, seed=1):
    """Non-zero A and B (a fresh adapter has one of them zero, which would hide half the math)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in layer.adapters:
            for t in (layer.lora_A[name], layer.lora_B[name]):
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.3)


def pair(base: nn.Module, r=4, lora_alpha=6.0, lora_dropout=0.0, use_rslora=False):
    """(fastlora layer, PEFT layer) on copies of ``base`` with the same random adapter."""
    ours = (LoRAEmbedding if isinstance(base, nn.Embedding) else LoRAConv)(
        copy.deepcopy(base), r, lora_alpha, lora_dropout, use_rslora)
    theirs = peft_layer(copy.deepcopy(base), r, lora_alpha, lora_dropout, use_rslora)
    randomize(ours)
    a, b = peft_tensors(theirs)
    with torch.no_grad():
        a.copy_(ours.lora_A["default"])
        b.copy_(ours.lora_B["default"])
    return ours, theirs


# --- float64 evaluation, written independently of the layers -------------------------------------------


def reference_conv(layer: LoRAConv, x: torch.Tensor) -> torch.Tensor:
    """The base conv plus each active adapter's term, in float64, with lora_B applied as an explicit
    per-group matrix product over channels (not a conv)."""
    base = layer.base_layer
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(base.kernel_size)]
    x = x.double()

    def padded(x):
        if base.padding_mode == "zeros":
            return x, base.padding
        return F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode), 0

    xp, pad = padded(x)
    bias = None if base.bias is None else base.bias.double()
    y = conv(xp, layer._original_weight().double(), bias, base.stride, pad, base.dilation, base.groups)
    for name in layer.active_adapters:
        a, b = layer.lora_A[name].double(), layer.lora_B[name].double().flatten(1)  # b: (out, r / groups)
        h = conv(xp, a, None, base.stride, pad, base.dilation, 1)  # (N, r, *spatial)
        g = base.groups
        hg = h.unflatten(1, (g, h.shape[1] // g))  # (N, g, r/g, ...)
        bg = b.unflatten(0, (g, b.shape[0] // g))  # (g, out/g, r/g)
        term = torch.einsum("gor,ngr...->ngo...", bg, hg).flatten(1, 2)
        y = y + layer.scaling[name] * term
    return y


def reference_embedding(layer: LoRAEmbedding, x: torch.Tensor) -> torch.Tensor:
    """W[x] + Σ s·(Aᵀ[x])·Bᵀ in float64, by indexing."""
    y = layer._original_weight().double()[x]
    for name in layer.active_adapters:
        a, b = layer.lora_A[name].double(), layer.lora_B[name].double()
        y = y + layer.scaling[name] * (a.t()[x] @ b.t())
    return y


CONVS = [
    pytest.param(lambda: nn.Conv2d(5, 7, 3), 4, id="2d-k3"),
    pytest.param(lambda: nn.Conv2d(5, 7, 1), 3, id="2d-k1"),
    pytest.param(lambda: nn.Conv2d(5, 7, 3, stride=2, padding=1), 4, id="2d-k3-stride2-pad1"),
    pytest.param(lambda: nn.Conv2d(6, 9, (3, 2), stride=(2, 1), padding=(1, 0), bias=False), 5, id="2d-k3x2-nobias"),
    pytest.param(lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2), 4, id="2d-groups2"),
    pytest.param(lambda: nn.Conv2d(6, 9, 1, groups=3), 3, id="2d-k1-groups3"),
    pytest.param(lambda: nn.Conv2d(5, 7, 1, stride=2), 3, id="2d-k1-stride2"),
    pytest.param(lambda: nn.Conv2d(5, 7, 3, padding="same"), 3, id="2d-k3-same"),
    pytest.param(lambda: nn.Conv1d(5, 7, 3), 4, id="1d-k3"),
    pytest.param(lambda: nn.Conv1d(5, 7, 1), 2, id="1d-k1"),
    pytest.param(lambda: nn.Conv1d(5, 7, 3, stride=2, padding=2), 4, id="1d-k3-stride2-pad2"),
    pytest.param(lambda: nn.Conv1d(4, 6, 3, padding=1, groups=2), 2, id="1d-groups2"),
    pytest.param(lambda: nn.Conv3d(3, 5, 3, padding=1), 2, id="3d-k3"),
]
# PEFT's lora_A ignores the base's dilation (a shape error for k > 1) and padding_mode (zeros): these are checked
# against the float64 evaluation and the merged weight only.
CONVS_NOT_PEFT = [
    pytest.param(lambda: nn.Conv2d(5, 7, 3, padding=2, dilation=2), 4, id="2d-dilation2"),
    pytest.param(lambda: nn.Conv1d(5, 7, 3, stride=2, dilation=3), 3, id="1d-dilation3-stride2"),
    pytest.param(lambda: nn.Conv2d(5, 7, 3, padding=1, padding_mode="reflect"), 4, id="2d-reflect"),
    pytest.param(lambda: nn.Conv1d(5, 7, 3, padding=1, padding_mode="circular"), 2, id="1d-circular"),
]


def conv_input(conv: nn.Module, batch=3, seed=0, dtype=torch.float64) -> torch.Tensor:
    spatial = {1: (13,), 2: (11, 9), 3: (5, 6, 7)}[len(conv.kernel_size)]
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, conv.in_channels, *spatial), generator=g, dtype=dtype)


def _grads(layer, x, grad_out, names=("default",)):
    tensors = [t for n in names for t in (layer_tensors(layer, n))]
    if x.is_floating_point():
        x = x.detach().clone().requires_grad_(True)
        tensors = [x, *tensors]
    y = layer(x)
    grads = torch.autograd.grad(y, tensors, grad_out)
    return y.detach(), grads


def layer_tensors(layer, name):
    if isinstance(layer, (LoRAConv, LoRAEmbedding)):
        return layer.lora_A[name], layer.lora_B[name]
    return peft_tensors(layer, name)


@pytest.mark.parametrize("make, r", CONVS)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_conv_matches_peft_outputs_and_every_gradient(make, r, use_rslora):
    torch.manual_seed(0)
    base = make().double()
    ours, theirs = pair(base, r=r, use_rslora=use_rslora)
    assert [tuple(t.shape) for t in peft_tensors(theirs)] == [tuple(t.shape) for t in layer_tensors(ours, "default")]
    assert ours.scaling == theirs.scaling
    x = conv_input(base)
    y_ref = theirs(x)
    grad_out = torch.randn_like(y_ref)
    y, grads = _grads(ours, x, grad_out)
    y_p, grads_p = _grads(theirs, x, grad_out)
    torch.testing.assert_close(y, y_p, atol=ATOL64, rtol=0)
    for g, gp in zip(grads, grads_p):  # x, A, B
        torch.testing.assert_close(g, gp, atol=ATOL64, rtol=0)
    torch.testing.assert_close(y, reference_conv(ours, x), atol=ATOL64, rtol=0)


@pytest.mark.parametrize("make, r", CONVS + CONVS_NOT_PEFT)
def test_conv_float32_against_float64(make, r):
    """The float32 layer against the float64 evaluation of the same parameters, within a few float32 ulps of
    the output's scale."""
    torch.manual_seed(0)
    layer = LoRAConv(make(), r, 6.0)
    randomize(layer)
    x = conv_input(layer.base_layer, dtype=torch.float32)
    y = layer(x)
    assert y.dtype == torch.float32
    truth = reference_conv(layer, x)
    assert (y.double() - truth).abs().max() <= 1e-5 * truth.abs().max()


@pytest.mark.parametrize("make, r", CONVS_NOT_PEFT)
def test_conv_dilation_and_padding_modes_against_float64_and_merge(make, r):
    torch.manual_seed(0)
    layer = LoRAConv(make().double(), r, 6.0)
    randomize(layer)
    x = conv_input(layer.base_layer)
    y = layer(x)
    torch.testing.assert_close(y, reference_conv(layer, x), atol=ATOL64, rtol=0)
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-10, rtol=0)  # the merged weight is exactly what runs


@pytest.mark.parametrize("make, r", [p for p in CONVS if "groups" not in p.id])
def test_conv_merge_unmerge_matches_peft(make, r):
    torch.manual_seed(0)
    base = make().double()
    ours, theirs = pair(base, r=r)
    original = ours.base_layer.weight.detach().clone()
    x = conv_input(base)
    y = ours(x)
    ours.merge()
    theirs.merge()
    assert ours.merged_adapters == ["default"]
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, atol=ATOL64, rtol=0)
    torch.testing.assert_close(ours(x), y, atol=ATOL64, rtol=0)
    torch.testing.assert_close(ours(x), theirs(x), atol=ATOL64, rtol=0)
    ours.unmerge()
    assert torch.equal(ours.base_layer.weight, original)  # bit-exact
    assert ours.merged_adapters == []
    torch.testing.assert_close(ours(x), y, atol=0, rtol=0)


def test_grouped_conv_cannot_merge_and_is_left_unchanged():
    layer = LoRAConv(nn.Conv2d(4, 6, 3, groups=2), r=2)
    randomize(layer)
    before = snapshot(layer)
    with pytest.raises(NotImplementedError, match="merge: this Conv2d has groups=2"):
        layer.merge()
    assert_unchanged(layer, before)
    # Model-wide: a later grouped layer rolls back the earlier merged ones.
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 6, 3, groups=2))
    fastlora.inject(model, ["0", "1"], r=2)
    randomize(model[0])
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match="groups=2"):
        fastlora.merge(model)
    assert_unchanged(model, before)
    with pytest.raises(NotImplementedError, match="groups=2"):
        fastlora.unload(model, merge=True)
    assert_unchanged(model, before)


def test_conv_dropout_matches_peft_with_the_same_generator_state():
    base = nn.Conv2d(4, 6, 3, padding=1).double()
    ours, theirs = pair(base, r=2, lora_dropout=0.3)
    ours.train(), theirs.train()
    x = conv_input(base)
    torch.manual_seed(5)
    y = ours(x)
    torch.manual_seed(5)
    y_p = theirs(x)
    torch.testing.assert_close(y, y_p, atol=ATOL64, rtol=0)
    ours.eval()
    assert not torch.allclose(ours(x), y)  # dropout did drop something in training


def test_conv_unbatched_input():
    layer = LoRAConv(nn.Conv1d(3, 4, 3).double(), r=2)
    randomize(layer)
    x = conv_input(layer.base_layer, batch=1)
    torch.testing.assert_close(layer(x[0]), layer(x)[0], atol=ATOL64, rtol=0)


# --- embeddings --------------------------------------------------------------------------------------------


EMBEDDINGS = [
    pytest.param(lambda: nn.Embedding(37, 11), id="plain"),
    pytest.param(lambda: nn.Embedding(23, 5, padding_idx=3), id="padding_idx"),
    pytest.param(lambda: nn.Embedding(19, 7, scale_grad_by_freq=True), id="scale_grad_by_freq"),
]


def embedding_input(emb: nn.Embedding, shape=(3, 8), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, emb.num_embeddings, shape, generator=g)
    if emb.padding_idx is not None:
        x[:, ::3] = emb.padding_idx
    else:
        x[0, :2] = x[1, 0]  # a repeated index, so scale_grad_by_freq has something to scale
    return x


@pytest.mark.parametrize("make", EMBEDDINGS)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_embedding_matches_peft_outputs_and_every_gradient(make, use_rslora):
    torch.manual_seed(0)
    base = make().double()
    ours, theirs = pair(base, r=4, use_rslora=use_rslora)
    assert [tuple(t.shape) for t in peft_tensors(theirs)] == [(4, base.num_embeddings), (base.embedding_dim, 4)]
    x = embedding_input(base)
    grad_out = torch.randn(*x.shape, base.embedding_dim, dtype=torch.float64)
    y, grads = _grads(ours, x, grad_out)
    y_p, grads_p = _grads(theirs, x, grad_out)
    torch.testing.assert_close(y, y_p, atol=ATOL64, rtol=0)
    for g, gp in zip(grads, grads_p):  # A, B
        torch.testing.assert_close(g, gp, atol=ATOL64, rtol=0)
    if base.padding_idx is not None:
        assert grads[0][:, base.padding_idx].abs().max() == 0  # as the base: no gradient for the padding row
    if not base.scale_grad_by_freq:
        torch.testing.assert_close(y, reference_embedding(ours, x), atol=ATOL64, rtol=0)


@pytest.mark.parametrize("make", EMBEDDINGS)
def test_embedding_float32_against_float64_and_merge(make):
    torch.manual_seed(0)
    layer = LoRAEmbedding(make(), r=3, lora_alpha=5.0)
    randomize(layer)
    x = embedding_input(layer.base_layer)
    y = layer(x)
    truth = reference_embedding(layer, x)
    assert (y.double() - truth).abs().max() <= 1e-5 * truth.abs().max()
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert (layer(x).double() - truth).abs().max() <= 1e-5 * truth.abs().max()
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_embedding_merge_matches_peft_and_1d_input():
    base = nn.Embedding(13, 6, padding_idx=0).double()
    ours, theirs = pair(base, r=2)
    ours.merge(), theirs.merge()
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, atol=ATOL64, rtol=0)
    x = torch.tensor([0, 5, 12, 5])
    ours.unmerge()
    torch.testing.assert_close(ours(x), theirs(x), atol=ATOL64, rtol=0)


def test_embedding_sparse_base():
    """PEFT's LoRA lookup fails on a sparse embedding (a sparse gradient for Aᵀ); here the frozen base keeps its
    flag and the adapter gets a dense gradient."""
    layer = LoRAEmbedding(nn.Embedding(10, 4, sparse=True).double(), r=2)
    randomize(layer)
    x = torch.tensor([[1, 2, 2, 9]])
    y = layer(x)
    torch.testing.assert_close(y, reference_embedding(layer, x), atol=ATOL64, rtol=0)
    y.sum().backward()
    assert not layer.lora_A["default"].grad.is_sparse


def test_initialisation_is_peft_s():
    emb = LoRAEmbedding(nn.Embedding(9, 4), r=3)
    assert emb.lora_A["default"].abs().max() == 0 and emb.lora_B["default"].abs().min() > 0
    assert emb.lora_embedding_A is emb.lora_A and emb.lora_embedding_B is emb.lora_B
    conv = LoRAConv(nn.Conv2d(4, 6, 3), r=2)
    assert conv.lora_B["default"].abs().max() == 0
    bound = 1 / math.sqrt(4 * 9)  # kaiming-uniform(a=√5) over fan_in = in_channels · kernel elements
    assert 0 < conv.lora_A["default"].abs().max() <= bound
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(conv(x), conv.base_layer(x))
    ids = torch.tensor([[1, 2]])
    torch.testing.assert_close(emb(ids), emb.base_layer(ids))
    half = LoRAConv(nn.Conv1d(2, 2, 1).to(torch.bfloat16), r=1)
    assert half.lora_A["default"].dtype == torch.float32  # as PEFT: fp32 adapters on a half base
    assert half(torch.randn(1, 2, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --- the model workflow --------------------------------------------------------------------------------


class Mixed(nn.Module):
    """An embedding, a Conv1d over the sequence, a grouped Conv2d over an image, and a linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(17, 6, padding_idx=0)
        self.seq = nn.Conv1d(6, 6, 3, padding=1)
        self.img = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(6, 5)

    def forward(self, ids, image):
        h = self.seq(self.emb(ids).transpose(1, 2)).mean(-1)
        return self.head(h + self.img(image).mean((-1, -2)))


def mixed_inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 17, (batch, 7), generator=g), torch.randn(batch, 4, 9, 9, generator=g)


def new_mixed():
    torch.manual_seed(0)
    return Mixed()


def randomize_model(model, seed=1):
    for i, layer in enumerate(lora_layers(model).values()):
        randomize(layer, seed + i)


def test_workflow_several_adapters_set_disable_merge_unload():
    model = new_mixed()
    x = mixed_inputs()
    base_out = model(*x)
    fastlora.inject(model, ["emb", "seq", "img", "head"], r=2, lora_alpha=4, adapter_name="a")
    fastlora.inject(model, ["emb", "seq"], r=4, lora_alpha=4, adapter_name="b")
    assert type(model.emb) is LoRAEmbedding and type(model.seq) is LoRAConv and type(model.img) is LoRAConv
    assert fastlora.list_adapters(model) == ["a", "b"]
    randomize_model(model)
    fastlora.set_adapter(model, "a")
    out_a = model(*x)
    fastlora.set_adapter(model, "b")
    out_b = model(*x)
    assert not torch.allclose(out_a, out_b)
    seq_in = torch.randn(2, 6, 5)
    fastlora.set_adapter(model, ["a", "b"])
    both = model.seq(seq_in)
    base_seq = model.seq.base_layer(seq_in)
    terms = []
    for name in ("a", "b"):
        fastlora.set_adapter(model, name)
        terms.append(model.seq(seq_in) - base_seq)
    torch.testing.assert_close(both - base_seq, terms[0] + terms[1], atol=1e-5, rtol=1e-5)  # the terms add up
    fastlora.set_adapter(model, ["a", "b"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}.{a}" for m in ("emb", "seq") for ab in "AB" for a in "ab"} | {
        f"{m}.lora_{ab}.a" for m in ("img", "head") for ab in "AB"}
    with fastlora.disable_adapters(model):
        torch.testing.assert_close(model(*x), base_out, atol=0, rtol=0)
    # Merge what can be merged: the grouped conv cannot; merging the others leaves the output as it was.
    fastlora.set_adapter(model, "b")  # "b" is on emb and seq only
    fastlora.merge(model)
    assert model.emb.merged_adapters == ["b"] and model.seq.merged_adapters == ["b"]
    torch.testing.assert_close(model(*x), out_b, atol=1e-5, rtol=1e-5)
    with fastlora.disable_adapters(model):
        torch.testing.assert_close(model(*x), base_out, atol=0, rtol=0)  # the original weight, not the merged
    fastlora.unmerge(model)
    torch.testing.assert_close(model(*x), out_b, atol=0, rtol=0)
    with pytest.warns(UserWarning, match="'a' is now active"):
        fastlora.delete_adapter(model, "b")
    assert fastlora.list_adapters(model) == ["a"]
    torch.testing.assert_close(model(*x), out_a, atol=1e-6, rtol=1e-6)
    unloaded = fastlora.unload(copy.deepcopy(model), merge=False)
    assert type(unloaded.emb) is nn.Embedding and type(unloaded.img) is nn.Conv2d
    torch.testing.assert_close(unloaded(*x), base_out, atol=0, rtol=0)


def test_unload_merged_gives_plain_layers_with_the_adapters_in():
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 1))
    fastlora.inject(model, ["0", "2"], r=2)
    randomize_model(model)
    x = torch.randn(2, 3, 6, 6)
    y = model(x)
    weights = [model[0].base_layer.weight, model[2].base_layer.weight]
    plain = fastlora.unload(model, merge=True)
    assert [type(m) for m in plain] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert plain[0].padding == (1, 1) and plain[0].bias is not None
    torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=1e-5)
    assert plain[0].weight is not weights[0]  # a new weight: the original tensors are not written


def test_combine_on_embeddings_and_convs():
    model = new_mixed()
    x = mixed_inputs()
    for name in ("a", "b"):
        fastlora.inject(model, ["emb", "seq", "img"], r=2, lora_alpha=3, adapter_name=name)
    randomize_model(model)
    ids, image = x
    inputs = {"emb": ids, "seq": torch.randn(3, 6, 5), "img": image}

    def term(layer_name, adapter):
        layer = getattr(model, layer_name)
        layer.set_active([adapter])
        return layer(inputs[layer_name]) - layer.base_layer(inputs[layer_name])

    fastlora.combine(model, {"a": 0.7, "b": -0.4}, "cat", method="cat")
    for layer_name in inputs:  # the grouped conv too: each group's rank block concatenated in turn
        torch.testing.assert_close(term(layer_name, "cat"), 0.7 * term(layer_name, "a") - 0.4 * term(layer_name, "b"),
                                   atol=1e-5, rtol=1e-4)  # fmt: skip
    assert model.img.r["cat"] == 4
    fastlora.combine(model, {"a": 0.5, "b": 0.5}, "lin", method="linear")
    assert model.img.lora_B["lin"].shape == model.img.lora_B["a"].shape
    with pytest.raises(NotImplementedError, match="method: this Conv2d has groups=2"):
        fastlora.combine(model, {"a": 1.0}, "svd", method="svd")
    model.img = model.img.base_layer  # no grouped conv left: svd works
    fastlora.combine(model, {"a": 0.7, "b": -0.4}, "svd", method="svd", svd_rank=4)
    for layer in (model.emb, model.seq):
        exact = 0.7 * layer.delta_weight(["a"]) - 0.4 * layer.delta_weight(["b"])
        torch.testing.assert_close(layer.delta_weight(["svd"]) * layer.r["svd"] / layer.lora_alpha["svd"], exact,
                                   atol=1e-5, rtol=1e-4)  # fmt: skip


def test_mixed_batch_per_sample_adapters():
    model = new_mixed()
    for name in ("a", "b"):
        fastlora.inject(model, ["emb", "seq", "img", "head"], r=2, adapter_name=name)
    randomize_model(model)
    ids, image = mixed_inputs(batch=3)
    names = ["a", "__base__", "b"]
    with fastlora.adapter_names(model, names):
        y = model(ids, image)
    for i, name in enumerate(names):
        if name == "__base__":
            with fastlora.disable_adapters(model):
                want = model(ids[i:i + 1], image[i:i + 1])
        else:
            fastlora.set_adapter(model, name)
            want = model(ids[i:i + 1], image[i:i + 1])
        torch.testing.assert_close(y[i:i + 1], want, atol=1e-5, rtol=1e-5)


# --- PEFT's files, both ways ----------------------------------------------------------------------------


def peft_model_of(base, **config):
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["emb", "seq", "img", "head"], **config})
    model = _quiet(get_peft_model, base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("config", [{}, {"rank_pattern": {"img": 2}, "alpha_pattern": {"emb": 3.0}},
                                    {"use_rslora": True, "lora_dropout": 0.1}])  # fmt: skip
def test_peft_file_loads_into_fastlora(tmp_path, config):
    theirs = peft_model_of(new_mixed(), **config).eval()
    _quiet(theirs.save_pretrained, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    ours = fastlora.load_adapter(new_mixed(), tmp_path).eval()
    assert type(ours.emb) is LoRAEmbedding and type(ours.img) is LoRAConv
    x = mixed_inputs()
    torch.testing.assert_close(ours(*x), theirs(*x), atol=1e-5, rtol=1e-5)


def test_fastlora_file_loads_into_peft(tmp_path):
    ours = fastlora.inject(new_mixed(), ["emb", "seq", "img", "head"], r=4, lora_alpha=8, rank_pattern={"seq": 2})
    randomize_model(ours)
    fastlora.save_adapter(ours, tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {"base_model.model.emb.lora_embedding_A", "base_model.model.emb.lora_embedding_B",
                    *(f"base_model.model.{m}.lora_{ab}.weight" for m in ("seq", "img", "head") for ab in "AB")}
    theirs = _quiet(PeftModel.from_pretrained, new_mixed(), tmp_path)
    assert isinstance(theirs.base_model.model.emb, peft_lora.Embedding)
    assert isinstance(theirs.base_model.model.img, peft_lora.Conv2d)
    x = mixed_inputs()
    torch.testing.assert_close(ours(*x), theirs(*x), atol=1e-5, rtol=1e-5)
    # And back: the fastlora file read again gives the same model.
    again = fastlora.load_adapter(new_mixed(), tmp_path)
    torch.testing.assert_close(again(*x), ours(*x), atol=0, rtol=0)


def test_peft_file_with_the_embedding_base_weight(tmp_path):
    """PEFT saves a targeted embed_tokens' base weight beside its adapter (save_embedding_layers): loaded into
    the base, as PEFT does."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    theirs = peft_model_of(copy.deepcopy(base), target_modules=["embed_tokens", "q_proj"])
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.base_layer.weight.add_(0.5)  # a trained / changed base
    _quiet(theirs.save_pretrained, tmp_path)
    from safetensors.torch import load_file

    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))
    ours = fastlora.load_adapter(copy.deepcopy(base), tmp_path)
    ids = torch.tensor([[1, 5, 9, 31]])
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_accelerate_leaves_peft_embeddings_and_convs_to_peft():
    theirs = peft_model_of(new_mixed()).eval()
    x = mixed_inputs()
    before = theirs(*x)
    with pytest.warns(UserWarning, match=r"left 3 LoRA layers to PEFT: .*emb \(lora\.Embedding\).*seq \(lora\.Conv1d\)"):
        fastlora.accelerate(theirs)
    assert type(theirs.base_model.model.img) is peft_lora.Conv2d
    torch.testing.assert_close(theirs(*x), before, atol=1e-5, rtol=1e-5)


# --- a small UNet-like model: convolutions and an attention block ------------------------------------------


class TinyUNet(nn.Module):
    def __init__(self, channels=8, heads=2):
        super().__init__()
        self.heads = heads
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)
        self.up = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_out = nn.Conv2d(2 * channels, 3, 1)

    def forward(self, x):
        skip = F.silu(self.conv_in(x))
        h = F.silu(self.down(skip))
        n, c, height, width = h.shape
        t = h.flatten(2).transpose(1, 2)  # (N, H·W, C) tokens

        def split(z):
            return z.unflatten(-1, (self.heads, c // self.heads)).transpose(1, 2)

        att = F.scaled_dot_product_attention(split(self.to_q(t)), split(self.to_k(t)), split(self.to_v(t)))
        t = t + self.to_out(att.transpose(1, 2).flatten(2))
        h = t.transpose(1, 2).reshape(n, c, height, width)
        h = F.silu(self.up(F.interpolate(h, scale_factor=2.0, mode="nearest")))
        return self.conv_out(torch.cat([h, skip], dim=1))


def test_unet_trains_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    base = TinyUNet()
    targets = ["conv_in", "down", "up", "conv_out", "to_q", "to_k", "to_v", "to_out"]
    model = fastlora.inject(copy.deepcopy(base), targets, r=4, lora_alpha=8)
    assert {type(m).__name__ for n, m in model.named_children()} == {"LoRAConv", "LoRALinear"}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    target = torch.randn(4, 3, 8, 8, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * len(targets)
    optimizer = torch.optim.SGD(params, lr=0.05)
    losses = []
    for _ in range(6):
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(layer.lora_B["default"].abs().max() > 0 for layer in lora_layers(model).values())
    model.eval()
    fastlora.save_adapter(model, tmp_path)
    reloaded = fastlora.load_adapter(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), atol=0, rtol=0)
        theirs = _quiet(PeftModel.from_pretrained, copy.deepcopy(base), tmp_path).eval()
        torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)
        merged = fastlora.unload(copy.deepcopy(model), merge=True)
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)


# --- bad inputs: clear errors, nothing changed -----------------------------------------------------------


def refused(model, error, message, fn, *args, **kwargs):
    before = snapshot(model)
    with pytest.raises(error, match=message):
        fn(*args, **kwargs)
    assert_unchanged(model, before)


def test_rank_not_divisible_by_groups():
    model = new_mixed()
    refused(model, ValueError, r"^r: a Conv2d with groups=2 needs a rank divisible by 2 \(as PEFT requires\), got 3",
            fastlora.inject, model, ["emb", "img"], r=3)  # fmt: skip
    refused(model, ValueError, r"^rank_pattern for img: a Conv2d with groups=2 needs a rank divisible by 2",
            fastlora.inject, model, ["emb", "img"], r=2, rank_pattern={"img": 5})  # fmt: skip
    with pytest.raises(ValueError, match="^r: a Conv1d with groups=3"):
        LoRAConv(nn.Conv1d(3, 6, 1, groups=3), r=2)


def test_bad_layer_arguments_name_the_argument():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(TypeError, match="^conv: expected an nn.Conv1d, nn.Conv2d or nn.Conv3d, got Linear"):
        LoRAConv(nn.Linear(3, 4))
    with pytest.raises(TypeError, match="^embedding: expected an nn.Embedding, got Conv2d"):
        LoRAEmbedding(conv)
    refused(conv, ValueError, "^r: expected an integer rank >= 1, got 0", LoRAConv, conv, r=0)
    refused(conv, TypeError, "^r: expected an integer rank >= 1, got 2.0", LoRAConv, conv, r=2.0)
    refused(conv, ValueError, r"^lora_dropout: expected a probability in \[0, 1\), got 1.5", LoRAConv, conv,
            lora_dropout=1.5)  # fmt: skip
    refused(conv, ValueError, "^adapter_name: expected a non-empty adapter name without dots", LoRAConv, conv,
            adapter_name="a.b")  # fmt: skip
    layer = LoRAConv(conv, r=2)
    refused(layer, ValueError, "^adapter_name: this layer already has an adapter named 'default'",
            layer.add_adapter, "default")  # fmt: skip
    refused(layer, ValueError, r"^adapter_names: this layer has no adapter \['nope'\]", layer.merge, ["nope"])


def test_embedding_subclass_with_its_own_forward_is_refused_by_name():
    class Scaled(nn.Embedding):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = nn.Sequential(Scaled(5, 3), nn.Linear(3, 2))
    refused(model, TypeError, r"^target_modules: 0 is a Scaled, an Embedding subclass with its own forward",
            fastlora.inject, model, ["0", "1"])  # fmt: skip
    with pytest.raises(TypeError, match="^embedding: got a Scaled"):
        LoRAEmbedding(model[0])


def test_bad_names_and_mismatched_files_leave_the_model_untouched(tmp_path):
    model = new_mixed()
    refused(model, ValueError, r"^target_modules: no linear layer of the model matches \['nothing'\] \(nor any "
            r"nn.Embedding", fastlora.inject, model, ["nothing"])  # fmt: skip
    source = fastlora.inject(new_mixed(), ["emb", "seq", "img"], r=2)
    fastlora.save_adapter(source, tmp_path / "ok")

    # A model whose convolution has another kernel size: the file's shapes are wrong for it.
    other = new_mixed()
    other.seq = nn.Conv1d(6, 6, 5, padding=2)
    refused(other, ValueError, r"wrong shapes: base_model.model.seq.lora_A.weight: expected \(2, 6, 5\), got "
            r"\(2, 6, 3\)", fastlora.load_adapter, other, tmp_path / "ok")  # fmt: skip

    # An embedding adapter stored under linear-layer key names.
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "renamed"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))
    tensors["base_model.model.emb.lora_A.weight"] = tensors.pop("base_model.model.emb.lora_embedding_A")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    refused(model, ValueError, r"keys do not match the model and config: missing \['base_model.model.emb."
            r"lora_embedding_A'\] \(1\), unexpected \['base_model.model.emb.lora_A.weight'\]",
            fastlora.load_adapter, model, bad)  # fmt: skip

    # DoRA on the convolutions: refused by name (fastlora's DoRA covers linear layers only).
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((tmp_path / "ok" / "adapter_model.safetensors").read_bytes())
    refused(model, NotImplementedError, r"use_dora: DoRA on \w+ \((Conv2d|Embedding|LoRAConv|LoRAEmbedding)\) is not "
            r"implemented, only on linear layers", fastlora.load_adapter, model, dora)  # fmt: skip

    # A grouped convolution given a rank its groups do not divide, by the file's rank_pattern.
    grouped = tmp_path / "grouped"
    grouped.mkdir()
    (grouped / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"img": 3}}))
    (grouped / "adapter_model.safetensors").write_bytes((tmp_path / "ok" / "adapter_model.safetensors").read_bytes())
    refused(model, ValueError, "rank_pattern for img: a Conv2d with groups=2 needs a rank divisible by 2",
            fastlora.load_adapter, model, grouped)  # fmt: skip


def test_all_linear_stays_linear_and_models_pickle(tmp_path):
    model = fastlora.inject(new_mixed(), "all-linear", r=2)
    assert [type(m).__name__ for m in (model.emb, model.seq, model.img)] == ["Embedding", "Conv1d", "Conv2d"]
    model = fastlora.inject(new_mixed(), r".*(emb|seq|img)", r=2)  # a regular expression selects them
    randomize_model(model)
    x = mixed_inputs()
    torch.save(model, tmp_path / "model.pt")  # whole-module pickling: no unpicklable attribute on the layers
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(again(*x), model(*x), atol=0, rtol=0)
    assert type(again.img) is LoRAConv and again.img.base_layer.groups == 2
