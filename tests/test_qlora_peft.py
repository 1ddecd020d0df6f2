"""``fastlora.accelerate`` on QLoRA models: PEFT LoRA over bitsandbytes ``Linear4bit`` bases, quantised on the
CPU (bitsandbytes >= 0.48 quantises and runs Linear4bit there). Both ways PEFT wraps a 4-bit base: its
``lora.Linear4bit`` (a model marked ``is_loaded_in_4bit``, as transformers marks it) and its plain
``lora.Linear`` (any other model). Outputs and gradients against PEFT's and an fp64 reference, the weight
read in place, the cache, FP4 left to PEFT, save/load, merge, pickle. Tiny models, nothing downloaded."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

bnb = pytest.importorskip("bitsandbytes")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as PeftLoraLinear  # noqa: E402
from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit  # noqa: E402

import fastlora  # noqa: E402
from fastlora.nf4 import NF4Weight, dequantize  # noqa: E402
from fastlora.peft_fused import FusedLoraLinear, FusedLoraLinear4bit, _nf4_weight, unfusable  # noqa: E402

from test_peft_compat import twins  # noqa: E402

NAMES = ("lin0", "lin1", "lin2")


# bitsandbytes 0.50.2 on CPUs with AVX-512 (see fastlora/nf4.py): its dequantiser is wrong when in_features is
# a multiple of 16 but not of the blocksize, and its eval-mode repacking needs out_features % 32 == 0. ALIGNED
# avoids both; RAGGED (rows that start inside a block) avoids the first and runs only in training mode.
ALIGNED = (128, 192, 64, 96)
RAGGED = (128, 72, 40, 48)


class MLP(nn.Module):
    def __init__(self, sizes=ALIGNED):
        super().__init__()
        self.lin0 = nn.Linear(sizes[0], sizes[1])
        self.lin1 = nn.Linear(sizes[1], sizes[2])
        self.lin2 = nn.Linear(sizes[2], sizes[3])

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def quantised_mlp(compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4", blocksize=64,
                  peft_4bit_class=True, fp4=(), sizes=ALIGNED, quant_storage=torch.uint8):  # fmt: skip
    """The MLP with every linear replaced by a bitsandbytes Linear4bit holding its weights (``fp4``: layers
    quantised to FP4 instead). ``peft_4bit_class``: mark it loaded in 4-bit, so PEFT wraps the layers in
    its lora.Linear4bit, as for a transformers model; otherwise PEFT wraps them in its plain lora.Linear."""
    torch.manual_seed(0)
    model = MLP(sizes)
    for name in NAMES:
        lin = getattr(model, name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=compute_dtype,
                              compress_statistics=compress_statistics,
                              quant_type="fp4" if name in fp4 else quant_type,
                              quant_storage=quant_storage)  # fmt: skip
        q.weight.blocksize = blocksize
        q.load_state_dict(lin.state_dict())
        setattr(model, name, q.to("cpu"))  # quantises
        assert q.weight.bnb_quantized and q.weight.dtype == quant_storage
    if peft_4bit_class:
        model.is_loaded_in_4bit = True
    return model


def lora_config(**kwargs) -> LoraConfig:
    # init_lora_weights=False: B is random too, so the LoRA term is not zero.
    return LoraConfig(**{"target_modules": list(NAMES), "r": 4, "lora_alpha": 8, "init_lora_weights": False,
                         **kwargs})  # fmt: skip


def qlora(peft_4bit_class=True, lora_dtype=None, config=None, **kwargs):
    model = get_peft_model(quantised_mlp(peft_4bit_class=peft_4bit_class, **kwargs), config or lora_config())
    if lora_dtype is not None:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(lora_dtype)
    return model


def lora_layers(model):
    return [getattr(model.base_model.model, name) for name in NAMES]


def fused(model) -> list[nn.Module]:
    return [m for m in model.modules() if type(m) in (FusedLoraLinear, FusedLoraLinear4bit)]


def x_input(dtype=torch.float32, rows=5):
    return torch.randn(rows, 128, generator=torch.Generator().manual_seed(2)).to(dtype)


def loss_of(y):
    return (y.float() * torch.linspace(-1, 1, y.shape[-1])).square().sum()


def out_and_grads(model, x):
    """Output, and gradients of x and every trainable parameter, after a backward of a fixed loss."""
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    y = model(x)
    loss_of(y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def reference(model, x, compute_dtype):
    """fp64 output and gradients of the model's function, with each weight as the GEMM sees it: dequantised
    into the compute dtype (both PEFT/bitsandbytes and fastlora dequantise straight into it), the bias
    rounded to it as bitsandbytes rounds it. What remains is arithmetic error."""
    x = x.double().requires_grad_(True)
    params, h = {}, x
    for name, layer in zip(NAMES, lora_layers(model)):
        base = layer.base_layer
        w = dequantize(NF4Weight.from_bnb(base.weight.data, base.weight.quant_state), compute_dtype).double()
        b = base.bias.detach().to(compute_dtype).double()
        a = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
        bb = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
        params[f"{name}.lora_A"], params[f"{name}.lora_B"] = a, bb
        h = h @ w.t() + b + layer.scaling["default"] * (h @ a.t()) @ bb.t()
        if name != NAMES[-1]:
            h = torch.relu(h)
    loss_of(h).backward()
    grads = {}
    for key, p in params.items():
        layer_name, which = key.split(".")
        grads[f"base_model.model.{layer_name}.{which}.default.weight"] = p.grad
    return h.detach(), x.grad, grads


def rel_err(got, want):
    """Largest error relative to the largest entry (sums of large terms cancel)."""
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def assert_as_peft(theirs, ours, x):
    """Output, dx and every LoRA gradient of the accelerated model as PEFT's."""
    y0, dx0, g0 = out_and_grads(theirs, x)
    y1, dx1, g1 = out_and_grads(ours, x)
    close(y1, y0)
    close(dx1, dx0)
    for k in g0:
        close(g1[k], g0[k], msg=k)


def close(got, want, msg=""):
    """Equal to fp32 rounding, measured against the tensor's largest entry."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(want.abs().max().item(), 1e-1), msg=msg or None)


# --- what accelerate does to a QLoRA model -----------------------------------------------------------------


@pytest.mark.parametrize("peft_4bit_class", [True, False], ids=["lora.Linear4bit", "lora.Linear"])
def test_accelerate_fuses_qlora_layers(peft_4bit_class):
    theirs, ours = twins(lambda: qlora(peft_4bit_class))
    peft_cls, fused_cls = (PeftLoraLinear4bit, FusedLoraLinear4bit) if peft_4bit_class else \
        (PeftLoraLinear, FusedLoraLinear)  # fmt: skip
    assert [type(m) for m in lora_layers(theirs)] == [peft_cls] * 3
    assert [type(m) for m in lora_layers(ours)] == [fused_cls] * 3
    assert all(isinstance(m, peft_cls) for m in lora_layers(ours))
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in lora_layers(ours))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to PEFT, so no warning
        assert fastlora.accelerate(ours) is ours
    for layer, peft_layer in zip(lora_layers(ours), lora_layers(theirs)):
        assert unfusable(layer) is None
        head = f"lora.{peft_cls.__name__}(\n"
        assert repr(peft_layer).startswith(head)
        assert repr(layer) == repr(peft_layer).replace(head, head + "  fastlora: fused\n", 1)
    assert repr(ours).count("fastlora: fused") == 3
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert type(ours(x_input()).grad_fn).__name__ == "LoRALinearFunctionBackward"


@pytest.mark.parametrize("sizes", [ALIGNED, RAGGED], ids=["aligned", "ragged"])
@pytest.mark.parametrize("peft_4bit_class", [True, False], ids=["lora.Linear4bit", "lora.Linear"])
@pytest.mark.parametrize("compress_statistics", [True, False], ids=["double-quant", "fp32-absmax"])
@pytest.mark.parametrize(
    "compute_dtype, x_dtype, lora_dtype",
    [
        (torch.float32, torch.float32, None),
        (torch.bfloat16, torch.bfloat16, None),  # QLoRA as usually run: bf16 compute and activations
        (torch.bfloat16, torch.float32, None),  # fp32 activations cast to bf16 by bitsandbytes
        (torch.float32, torch.bfloat16, None),  # bf16 activations computed in fp32, returned in bf16
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # bf16 adapters too
        (None, torch.float32, None),  # compute_dtype unset: bitsandbytes' first call picks x's dtype
        (None, torch.bfloat16, None),
        (torch.float16, torch.float16, None),
        (None, torch.float16, None),  # unset with fp16 input: bitsandbytes leaves it unset, computes in fp16
    ],
    ids=["fp32", "bf16", "fp32-x-bf16-compute", "bf16-x-fp32-compute", "bf16-lora", "unset-fp32", "unset-bf16",
         "fp16", "unset-fp16"],
)
def test_outputs_and_gradients_as_peft(sizes, peft_4bit_class, compress_statistics, compute_dtype, x_dtype,
                                       lora_dtype):  # fmt: skip
    """Same dtypes as PEFT's output and gradients. Values: in fp32 equal to fp32 rounding; otherwise at most
    2x PEFT's own error against an fp64 reference, plus one rounding of the lowest precision involved."""

    def build():
        return qlora(peft_4bit_class, lora_dtype, compute_dtype=compute_dtype,
                     compress_statistics=compress_statistics, sizes=sizes)  # fmt: skip

    theirs, ours = twins(build)
    assert len(fused(ours)) == 3
    x = x_input(x_dtype)
    y0, dx0, g0 = out_and_grads(theirs, x)
    y1, dx1, g1 = out_and_grads(ours, x)
    assert y1.dtype == y0.dtype == x_dtype and dx1.dtype == dx0.dtype == x_dtype
    assert g1.keys() == g0.keys() and len(g0) == 6
    assert all(g1[k].dtype == g0[k].dtype for k in g0)
    assert repr(ours).count("fastlora: fused") == 3  # what the call found too
    for layer, peft_layer in zip(lora_layers(ours), lora_layers(theirs)):  # bitsandbytes' first-call choice
        assert layer.base_layer.compute_dtype == peft_layer.base_layer.compute_dtype
    compute = ours.base_model.model.lin0.base_layer.compute_dtype or x_dtype
    if compute == x_dtype == torch.float32 and lora_dtype is None:
        close(y1, y0)
        close(dx1, dx0)
        for k in g0:
            close(g1[k], g0[k], msg=k)
        return
    yr, dxr, gr = reference(ours, x, compute)
    # One rounding in the lowest precision involved: fastlora computes the LoRA term (and its gradients) in
    # the compute dtype, where PEFT keeps the adapter's dtype.
    floor = max(torch.finfo(d).eps for d in (compute, x_dtype, lora_dtype or torch.float32))
    pairs = [("y", y1, y0, yr), ("dx", dx1, dx0, dxr)] + [(k, g1[k], g0[k], gr[k]) for k in g0]
    for name, ours_t, theirs_t, ref in pairs:
        ours_err, theirs_err = rel_err(ours_t, ref), rel_err(theirs_t, ref)
        assert ours_err <= 2 * theirs_err + floor, f"{name}: fastlora {ours_err:.2e}, PEFT {theirs_err:.2e}"


def test_every_backend_matches_peft(backend):
    theirs, ours = twins(lambda: qlora(compress_statistics=False))
    assert_as_peft(theirs, ours, x_input(rows=7))


def test_blocksize_and_3d_input():
    theirs, ours = twins(lambda: qlora(blocksize=32))
    assert ours.base_model.model.lin0.base_layer.weight.quant_state.blocksize == 32
    assert len(fused(ours)) == 3
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(3))
    close(ours(x), theirs(x))


def test_eval_no_grad_and_bitsandbytes_cpu_packing():
    """In eval without grad, bitsandbytes' forward repacks the weight for its AVX512-BF16 CPU kernel (where
    the CPU has one). The fused forward never calls it, so nothing is repacked; a layer whose weight PEFT's
    forward repacked (here under disable_adapter) is left to PEFT's forward, with that reason."""
    theirs, ours = twins(qlora)
    theirs.eval(), ours.eval()
    x = x_input()
    with torch.no_grad():
        y0, y1 = theirs(x), ours(x)
    # bitsandbytes' CPU-packed kernel computes in bf16 where the CPU has one: a bf16-sized tolerance.
    torch.testing.assert_close(y1, y0, rtol=0, atol=2 * torch.finfo(torch.bfloat16).eps * y0.abs().max().item())
    base = ours.base_model.model.lin0.base_layer
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    with torch.no_grad(), ours.disable_adapter():
        ours(x)
    if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack the weight on this CPU (no AVX512-BF16)")
    layer = ours.base_model.model.lin0
    assert "weight in bitsandbytes' CPU-packed layout" in unfusable(layer)
    assert "fastlora: PEFT's forward now (base layer Linear4bit: weight in bitsandbytes' CPU-packed" in repr(layer)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), y0, rtol=0, atol=0)


# --- the weight: read in place, cached ---------------------------------------------------------------------


@pytest.mark.parametrize("compress_statistics", [True, False], ids=["double-quant", "fp32-absmax"])
def test_nf4_weight_shares_the_params4bit_storage(compress_statistics):
    _, ours = twins(lambda: qlora(compress_statistics=compress_statistics))
    ours(x_input())
    for layer in lora_layers(ours):
        base = layer.base_layer
        nf4 = _nf4_weight(base)
        qs = base.weight.quant_state
        assert isinstance(nf4, NF4Weight) and nf4.double_quant == compress_statistics
        assert nf4.packed.data_ptr() == base.weight.data_ptr()
        assert nf4.absmax.data_ptr() == qs.absmax.data_ptr()
        if compress_statistics:
            assert nf4.absmax_scale.data_ptr() == qs.state2.absmax.data_ptr()
            assert nf4.absmax_code.data_ptr() == qs.state2.code.data_ptr()
        assert _nf4_weight(base) is nf4  # cached: built once, not per call


def test_quant_storage_bf16_is_read_in_place():
    """A quant_storage other than uint8 (bf16, as for FSDP) holds the same bytes: viewed, not copied."""
    theirs, ours = twins(lambda: qlora(quant_storage=torch.bfloat16))
    assert len(fused(ours)) == 3
    x = x_input()
    close(ours(x), theirs(x))
    for layer in lora_layers(ours):
        base = layer.base_layer
        assert base.weight.dtype == torch.bfloat16
        assert _nf4_weight(base).packed.data_ptr() == base.weight.data_ptr()


def test_nf4_weight_is_rebuilt_when_the_data_or_quant_state_changes():
    theirs, ours = twins(qlora)
    x = x_input()
    base = ours.base_model.model.lin0.base_layer
    first = _nf4_weight(base)
    # In place: the shared bytes see it, nothing to rebuild (and nothing stale).
    with torch.no_grad():
        for model in (theirs, ours):
            model.base_model.model.lin0.base_layer.weight.data[:10] ^= 0x11
    assert _nf4_weight(base) is first
    close(ours(x), theirs(x))
    # New data, same quant state object: rebuilt over the new bytes.
    for model in (theirs, ours):
        w = model.base_model.model.lin0.base_layer.weight
        w.data = w.data.clone()
        w.data[:5] ^= 0x22
    second = _nf4_weight(base)
    assert second is not first and second.packed.data_ptr() == base.weight.data_ptr()
    close(ours(x), theirs(x))
    # A new QuantState object (same data): rebuilt.
    for model in (theirs, ours):
        w = model.base_model.model.lin0.base_layer.weight
        w.quant_state = copy.deepcopy(w.quant_state)
    third = _nf4_weight(base)
    assert third is not second and third.absmax.data_ptr() == base.weight.quant_state.absmax.data_ptr()
    close(ours(x), theirs(x))


# --- what stays PEFT's -------------------------------------------------------------------------------------


@pytest.mark.parametrize("peft_4bit_class", [True, False], ids=["lora.Linear4bit", "lora.Linear"])
def test_fp4_layer_keeps_peft_forward_with_its_reason(peft_4bit_class):
    theirs, ours = twins(lambda: qlora(peft_4bit_class, fp4=("lin1",)))
    peft_cls = PeftLoraLinear4bit if peft_4bit_class else PeftLoraLinear
    layer = ours.base_model.model.lin1
    assert type(layer) is peft_cls and len(fused(ours)) == 2
    reason = "base layer Linear4bit: quant_type 'fp4': fastlora fuses NF4 only"
    assert unfusable(layer) == reason
    with pytest.warns(UserWarning, match=rf"left 1 LoRA layers to PEFT: base_model.model.lin1 \({reason}\)"):
        fastlora.accelerate(ours)
    assert "fastlora" not in repr(layer) and repr(ours).count("fastlora: fused") == 2
    assert_as_peft(theirs, ours, x_input())


def test_adapter_state_at_call_time_runs_peft_forward():
    """Disabled, merged, several active adapters: PEFT's outputs."""
    theirs, ours = twins(qlora)
    x = x_input()
    with theirs.disable_adapter(), ours.disable_adapter():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    for model in (theirs, ours):
        torch.manual_seed(5)
        model.add_adapter("other", lora_config(r=2))
        model.base_model.set_adapter(["default", "other"])
    assert len(fused(ours)) == 3
    close(ours(x), theirs(x))


# --- PEFT's own methods on the accelerated model ---------------------------------------------------------


@pytest.mark.parametrize("peft_4bit_class", [True, False], ids=["lora.Linear4bit", "lora.Linear"])
def test_save_pretrained_from_pretrained_round_trip(tmp_path, peft_4bit_class):
    theirs, ours = twins(lambda: qlora(peft_4bit_class))
    x = x_input()
    want = ours(x)
    ours.save_pretrained(tmp_path)
    torch.manual_seed(9)  # other LoRA weights would be drawn: the loaded ones must replace them
    loaded = PeftModel.from_pretrained(quantised_mlp(peft_4bit_class=peft_4bit_class), tmp_path)
    assert fastlora.accelerate(loaded) is loaded and len(fused(loaded)) == 3
    torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
    close(want, theirs(x))


def test_merge_unmerge_and_merge_and_unload():
    """PEFT's merge requantises the merged weight into a new Params4bit: the merged layer runs PEFT's forward,
    and after unmerge the fused forward reads the new weight, not the cached one."""
    theirs, ours = twins(qlora)
    x = x_input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that 4-bit merges round
        ours(x)  # the NF4 weights are cached
        for model in (theirs, ours):
            model.merge_adapter()
        assert "fastlora: PEFT's forward now (merged)" in repr(ours.base_model.model.lin0)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        for model in (theirs, ours):
            model.unmerge_adapter()
        assert repr(ours).count("fastlora: fused") == 3
        for layer in lora_layers(ours):
            assert _nf4_weight(layer.base_layer).packed.data_ptr() == layer.base_layer.weight.data_ptr()
        close(ours(x), theirs(x))
        merged_theirs, merged_ours = theirs.merge_and_unload(), ours.merge_and_unload()
    assert [type(m) for m in merged_ours.modules()] == [MLP] + [bnb.nn.Linear4bit] * 3
    torch.testing.assert_close(merged_ours(x), merged_theirs(x), rtol=0, atol=0)


def test_merge_of_plain_lora_linear_over_4bit_fails_as_in_peft():
    """PEFT's plain lora.Linear cannot merge into a 4-bit weight (it adds a float delta to the packed bytes);
    the accelerated layer inherits that merge and fails the same way."""
    theirs, ours = twins(lambda: qlora(peft_4bit_class=False))
    errors = []
    for model in (theirs, ours):
        with pytest.raises(RuntimeError) as info:
            model.merge_and_unload()
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_pickle_and_deepcopy():
    theirs, ours = twins(qlora)
    x = x_input()
    want = ours(x)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    for model in (pickle.loads(pickle.dumps(ours)), torch.load(buffer, weights_only=False), copy.deepcopy(ours)):
        assert len(fused(model)) == 3
        base = model.base_model.model.lin0.base_layer
        assert base.weight.data_ptr() != ours.base_model.model.lin0.base_layer.weight.data_ptr()
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
        assert _nf4_weight(base).packed.data_ptr() == base.weight.data_ptr()  # its own weight, not the original's


def test_dropout_runs_and_is_reproducible():
    """Fused dropout draws its own masks, so only its statistics could match PEFT's: it runs, a seed
    reproduces it, it changes the training output, and in eval it is off (PEFT's output)."""
    theirs, ours = twins(lambda: qlora(config=lora_config(lora_dropout=0.3)))
    assert len(fused(ours)) == 3
    x = x_input()
    torch.manual_seed(11)
    y1, dx1, g1 = out_and_grads(ours, x)
    torch.manual_seed(11)
    y2, dx2, g2 = out_and_grads(ours, x)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    torch.testing.assert_close(dx2, dx1, rtol=0, atol=0)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    theirs.eval(), ours.eval()
    # x requiring grad: bitsandbytes' forward does not take its bf16 CPU-packed inference path
    y_eval, y_peft = out_and_grads(ours, x)[0], out_and_grads(theirs, x)[0]
    assert not torch.allclose(y1, y_eval)
    close(y_eval, y_peft)


def test_autocast_bf16_matches_peft():
    """Under CPU autocast PEFT's lora.Linear4bit still casts (its test is torch.is_autocast_enabled(), CUDA's),
    so the output is x's dtype; values to bf16 rounding."""
    theirs, ours = twins(qlora)
    x = x_input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0, y1 = theirs(x), ours(x)
    assert y1.dtype == y0.dtype
    torch.testing.assert_close(y1.float(), y0.float(), rtol=0,
                               atol=4 * torch.finfo(torch.bfloat16).eps * y0.abs().max().item())  # fmt: skip


def test_torch_compile_traces_peft_forward():
    """lora_linear does not trace an NF4 weight yet: under torch.compile the 4-bit layers run PEFT's forward
    (traced), and the compiled model computes what PEFT's does."""
    theirs, ours = twins(qlora)
    x = x_input()
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="eager")
    torch.testing.assert_close(compiled(x), theirs(x), rtol=0, atol=0)
    assert type(ours(x).grad_fn).__name__ == "LoRALinearFunctionBackward"  # eager: fused again
