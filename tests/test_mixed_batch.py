"""Mixed-adapter batches in models: ``model(..., adapter_names=[...])``, ``fastlora.adapter_names`` and
``generate(..., adapter_names=...)`` on fastlora models and accelerated PEFT models, against per-sample runs
and against PEFT's own ``adapter_names`` path (small Llama, GPT-2)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fastlora
from fastlora.model import lora_layers

from snapshot import assert_unchanged, snapshot

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

NAMES = ["cat", "__base__", "dog", "cat"]


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def fastlora_model(base=None):
    """Two adapters of different ranks on different layers (dog also on o_proj), non-zero B."""
    model = base or tiny_llama()
    fastlora.inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8, adapter_name="cat", lora_dropout=0.1)
    fastlora.inject(model, ["q_proj", "v_proj", "o_proj"], r=8, lora_alpha=8, adapter_name="dog")
    torch.manual_seed(1)
    for layer in lora_layers(model).values():
        for name in layer.lora_B:
            nn.init.normal_(layer.lora_B[name], std=0.2)
    return model


def per_sample(model, ids, names):
    """Each sample run alone with its adapter active (or the adapters disabled), stacked."""
    out = []
    for i, name in enumerate(names):
        if name == "__base__":
            with fastlora.disable_adapters(model):
                out.append(model(input_ids=ids[i : i + 1]).logits)
        else:
            fastlora.set_adapter(model, name)
            out.append(model(input_ids=ids[i : i + 1]).logits)
    return torch.cat(out)


def test_model_keyword_matches_per_sample_runs():
    model = fastlora_model()
    ids = torch.randint(0, 64, (4, 9))
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=NAMES).logits
        with fastlora.adapter_names(model, NAMES):
            got_ctx = model(input_ids=ids).logits
        want = per_sample(model, ids, NAMES)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_ctx, got, rtol=0, atol=0)


def test_training_mode_gradients_match_per_sample_runs():
    model = fastlora_model()
    fastlora.set_adapter(model, ["cat", "dog"])  # both trainable
    for layer in lora_layers(model).values():
        layer.lora_dropout = {n: 0.0 for n in layer.lora_dropout}  # deterministic: compare gradients exactly
    model.train()
    ids = torch.randint(0, 64, (4, 9))
    loss = model(input_ids=ids, labels=ids, adapter_names=NAMES).logits.sum()
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    total = 0
    for i, name in enumerate(NAMES):
        if name == "__base__":
            continue
        fastlora.set_adapter(model, [name])
        total = total + model(input_ids=ids[i : i + 1]).logits.sum()
    fastlora.set_adapter(model, ["cat", "dog"])
    total.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got[n], want, rtol=1e-4, atol=1e-5, msg=n)


def test_generate_with_adapter_names_and_beams():
    model = fastlora_model()
    ids = torch.randint(0, 64, (4, 5))
    mask = torch.ones_like(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = model.generate(ids, attention_mask=mask, adapter_names=NAMES, max_new_tokens=3, do_sample=False)
        for i, name in enumerate(NAMES):
            if name == "__base__":
                with fastlora.disable_adapters(model):
                    want = model.generate(ids[i : i + 1], attention_mask=mask[i : i + 1], max_new_tokens=3, do_sample=False)
            else:
                fastlora.set_adapter(model, name)
                want = model.generate(ids[i : i + 1], attention_mask=mask[i : i + 1], max_new_tokens=3, do_sample=False)
            assert torch.equal(got[i : i + 1], want), name
        beams = model.generate(ids, attention_mask=mask, adapter_names=NAMES, max_new_tokens=3, num_beams=2,
                               do_sample=False)  # fmt: skip
    assert beams.shape == (4, 8)


def test_unknown_names_merged_adapters_and_wrong_lengths_raise_model_untouched():
    model = fastlora_model()
    ids = torch.randint(0, 64, (4, 5))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no adapter named \['c', 'd'\] in the model \(it has \['cat', 'dog'\]"):
        model(input_ids=ids, adapter_names=["cat", "c", "d", "cat"])
    with pytest.raises(ValueError, match="expected one name per sample, 4 .*got 3"):
        model(input_ids=ids, adapter_names=["cat", "dog", "cat"])
    with pytest.raises(TypeError, match="adapter_names: expected a list of adapter names"):
        model(input_ids=ids, adapter_names="cat")
    with pytest.raises(ValueError, match="adapter_names\\[1\\]: expected a non-empty adapter name"):
        with fastlora.adapter_names(model, ["cat", ""]):
            pass
    assert_unchanged(model, before)
    fastlora.merge(model, ["cat"])
    with pytest.raises(ValueError, match="merged adapters \\['cat'\\]"):
        model(input_ids=ids, adapter_names=NAMES)
    fastlora.unmerge(model)
    assert fastlora.mixed_batch.current() is None  # every failed call left the context as it was


def test_disabled_adapters_run_the_base_for_every_sample():
    model = fastlora_model()
    ids = torch.randint(0, 64, (4, 5))
    with torch.no_grad(), fastlora.disable_adapters(model):
        got = model(input_ids=ids, adapter_names=NAMES).logits
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unload_removes_the_keyword():
    model = fastlora_model()
    fastlora.unload(model, merge=False)
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks and not model._forward_hooks
    assert "_fastlora_mixed_tokens" not in model.__dict__


def _peft_model(base, targets):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets), adapter_name="cat")
    model.add_adapter("dog", LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    torch.manual_seed(1)
    for module in model.modules():
        if hasattr(module, "lora_B") and isinstance(module.lora_B, nn.ModuleDict):
            for lin in module.lora_B.values():
                nn.init.normal_(lin.weight, std=0.2)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_accelerated_peft_matches_peft_adapter_names(arch):
    base, targets = (tiny_llama(), ["q_proj", "v_proj"]) if arch == "llama" else (tiny_gpt2(), ["c_attn"])
    theirs = _peft_model(base, targets)
    ours = copy.deepcopy(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastlora.accelerate(ours)
    ids = torch.randint(0, 64, (4, 6))
    with torch.no_grad():
        want = theirs(input_ids=ids, adapter_names=NAMES).logits
        got = ours(input_ids=ids, adapter_names=NAMES).logits  # PEFT's keyword, reaching the fused layers
        with fastlora.adapter_names(ours, NAMES):
            got_ctx = ours(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_ctx, want, rtol=1e-5, atol=1e-5)


def test_accelerated_peft_trains_a_mixed_batch():
    """PEFT refuses adapter_names in training mode; fastlora.adapter_names trains both adapters at once."""
    theirs = _peft_model(tiny_llama(), ["q_proj", "v_proj"])
    ours = copy.deepcopy(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastlora.accelerate(ours)
    for model in (theirs, ours):
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    ids = torch.randint(0, 64, (4, 6))
    ours.train()
    with fastlora.adapter_names(ours, NAMES):
        ours(input_ids=ids).logits.sum().backward()
    theirs.eval()  # PEFT's loop, eval mode (no dropout is configured), as the reference
    theirs(input_ids=ids, adapter_names=NAMES).logits.sum().backward()
    for (name, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters()):
        if p.requires_grad:
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            got = q.grad if q.grad is not None else torch.zeros_like(q)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_quantized_base():
    model = fastlora.quantize(tiny_llama(), "nf4", compute_dtype=torch.float32, blocksize=32)
    model = fastlora_model(model)
    ids = torch.randint(0, 64, (4, 5))
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=NAMES).logits
        want = per_sample(model, ids, NAMES)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_peft_over_bitsandbytes_4bit():
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4"))
    base = base.to("cpu")
    theirs = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), adapter_name="cat")
    theirs.add_adapter("dog", LoraConfig(r=2, lora_alpha=8, target_modules=["0"]))
    for lin in [*theirs.base_model.model[0].lora_B.values()]:
        nn.init.normal_(lin.weight, std=0.2)
    ours = copy.deepcopy(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastlora.accelerate(ours)
    # x requiring grad: otherwise bitsandbytes repacks the weight for a bf16 CPU kernel in eval mode; PEFT's own
    # adapter_names path then fails (an in-place add on bitsandbytes' output view), so the reference is PEFT
    # run sample by sample.
    x = torch.randn(4, 3, 64, requires_grad=True)
    theirs.eval()
    want = []
    for i, name in enumerate(NAMES):
        if name == "__base__":
            with theirs.disable_adapter():
                want.append(theirs(x[i : i + 1]))
        else:
            theirs.set_adapter(name)
            want.append(theirs(x[i : i + 1]))
    got = ours.eval()(x, adapter_names=NAMES)
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)


def test_adapters_loaded_from_files_take_adapter_names(tmp_path):
    """load_adapter injects as inject does: a model given its adapters from files takes the keyword too."""
    trained = fastlora_model()
    for name in ("cat", "dog"):
        fastlora.save_adapter(trained, tmp_path / name, adapter_name=name)
    model = tiny_llama()
    for name in ("cat", "dog"):
        fastlora.load_adapter(model, tmp_path / name, adapter_name=name)
    ids = torch.randint(0, 64, (4, 5))
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=NAMES).logits
        want = trained(input_ids=ids, adapter_names=NAMES).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
