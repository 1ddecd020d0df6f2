"""fastlora inside the training machinery around it: DDP and FSDP2 (two gloo processes on the loopback),
activation checkpointing, torch.compile of a whole transformers model, and transformers' Trainer."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch.nn as nn
import torch.utils.checkpoint
from torch._dynamo.utils import counters

import fastlora
from fastlora.model import lora_layers

import _distributed
from conftest import cpu_backends


def tiny_llama() -> nn.Module:
    """A 2-layer Llama with random weights (nothing downloaded), fastlora on every linear but the head."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    return fastlora.inject(model, "all-linear", r=4, lora_alpha=8, lora_dropout=0.05).train()


def adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def base(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}


# --- DDP and FSDP2 -----------------------------------------------------------------------------------------

# All cases run in the same two worker processes (one spawn per wrapper: starting the processes is most of
# the cost), on every backend that runs here (triton: through the interpreter, under TRITON_INTERPRET=1).
# With dropout the one-process run cannot take the whole batch in one call: the mask is a function of
# (seed, element index within the call), so rank 1's rows, at indices 0.. of its own call, would get other
# mask bits than as the second half of one call. The one-process run there is gradient accumulation over
# the two halves, each drawing its seed as its rank does, which is exactly what data-parallel training
# must equal.
DROPOUTS = [0.0, 0.1]
JOIN_TIMEOUT = 180.0  # seconds for both workers (about 10-20 s here); past it they are killed, the test fails


@functools.cache
def _one_process(backend: str, dropout: float, micro_batches: int, only: int | None = None) -> dict[str, torch.Tensor]:
    """The one-process result, computed once for both wrappers (the interpreter makes it cost seconds)."""
    with fastlora.use_backend(backend):
        return _distributed.train_one_process(dropout, micro_batches, only)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_data_parallel_gives_the_one_process_adapters(wrapper, tmp_path):
    cases = [(backend, dropout) for backend in cpu_backends() for dropout in DROPOUTS]
    with _distributed.loopback_store() as port:
        _distributed.run_workers((wrapper, port, str(tmp_path), cases), timeout=JOIN_TIMEOUT)
    initial_base = _distributed.base_state(_distributed.make_model(0.0))
    for backend, dropout in cases:
        want = _one_process(backend, dropout, micro_batches=1 if dropout == 0 else _distributed.WORLD_SIZE)
        initial = _distributed.adapter_state(_distributed.make_model(dropout))
        for rank in range(_distributed.WORLD_SIZE):
            where = f"{wrapper}, {backend} backend, dropout {dropout}, rank {rank}"
            got = torch.load(tmp_path / f"{wrapper}-{backend}-p{dropout}-rank{rank}.pt")
            assert got["adapters"].keys() == want.keys() and len(want) == 6  # A and B of three layers
            for name, value in want.items():
                # Same arithmetic up to how the per-row gradient terms are grouped (two half-batch GEMMs
                # and an all-reduce / reduce-scatter of their means instead of one full-batch GEMM):
                # fp32 rounding, measured at most 4e-9 absolute / 1.1e-7 relative after 4 steps. A real
                # error (ranks not averaged, a wrong mask, a missed step) is of order 1e-3 or more.
                torch.testing.assert_close(got["adapters"][name], value, rtol=1e-5, atol=1e-6, msg=f"{where}: {name}")
                assert not torch.allclose(value, initial[name], rtol=1e-3, atol=1e-4), f"{name} did not train"
            for name, value in initial_base.items():
                assert torch.equal(got["base"][name], value), f"{where}: the frozen {name} changed"
    # The check can see a difference: one rank's half alone learns other adapters.
    alone, want = _one_process("torch", 0.0, _distributed.WORLD_SIZE, only=0), _one_process("torch", 0.0, 1)
    assert any(not torch.allclose(alone[n], want[n], rtol=1e-3, atol=1e-4) for n in want)


# --- activation checkpointing ------------------------------------------------------------------------------


def _block() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(fastlora.LoRALinear(12, 10, r=3, lora_dropout=0.3), nn.GELU(),
                          fastlora.LoRALinear(10, 6, r=2, lora_alpha=4, lora_dropout=0.3))  # fmt: skip
    for layer in lora_layers(block).values():
        nn.init.normal_(layer.lora_B["default"])  # non-zero, so every gradient carries the masks
    return block.train()


def _run(block, x, grad_y, mode, preserve_rng_state=True):
    """Output, gradients (x, then each lora_A and lora_B) and the generator state afterwards."""
    block.zero_grad()
    x = x.detach().requires_grad_()
    torch.manual_seed(7)
    if mode is None:
        y = block(x)
    else:
        y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=mode == "reentrant",
                                              preserve_rng_state=preserve_rng_state)  # fmt: skip
    y.backward(grad_y)
    grads = [x.grad] + [p.grad.clone() for n, p in block.named_parameters() if ".lora_" in n]
    return y.detach(), grads, torch.get_rng_state()


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpoint_recomputes_the_same_dropout(backend, mode):
    """Checkpointing restores the generator before recomputing, so the recomputed forward draws the same
    dropout seeds: output and gradients bitwise those of the plain run (the same backend calls on the same
    inputs), and the generator is left where the plain run leaves it."""
    block = _block()
    x = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(1))
    grad_y = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))
    y, grads, rng = _run(block, x, grad_y, None)
    y_ck, grads_ck, rng_ck = _run(block, x, grad_y, mode)
    assert torch.equal(y, y_ck)
    assert len(grads) == 5 and all(g is not None and torch.equal(g, gc) for g, gc in zip(grads, grads_ck))
    assert torch.equal(rng, rng_ck)
    # Not vacuous: the masks change the output, and without restoring the generator the recomputation
    # draws other seeds and the gradients come out different.
    with torch.no_grad():
        assert not torch.allclose(y, block.eval()(x))
    block.train()
    _, grads_other, _ = _run(block, x, grad_y, mode, preserve_rng_state=False)
    assert not all(torch.equal(g, go) for g, go in zip(grads[1:], grads_other[1:]))


def test_output_is_not_a_view_and_takes_in_place_ops(backend):
    """As F.linear's: an in-place op on the output works (autograd refuses in-place ops on a view made
    inside a custom Function, and FSDP2 warns about a module returning a view) and gives the gradients of
    the out-of-place op."""
    layer = _block()[0]
    x = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(1), requires_grad=True)
    results = []
    for in_place in (True, False):
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(7)
        y = layer(x)
        assert not y._is_view()
        y = y.mul_(2) if in_place else y * 2
        y.sum().backward()
        results.append([y.detach(), x.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# --- torch.compile of a whole model ------------------------------------------------------------------------


def test_compile_llama_trains_in_one_graph_across_lengths():
    """Forward, loss and backward of a Llama with fastlora on every linear in one graph (fullgraph=True
    raises on any graph break) compiled once: the sequence dimension is marked dynamic, so lengths 8, 12
    and 16 reuse the one graph. aot_eager traces exactly what inductor gets (dynamo + AOT autograd, the
    custom ops through their fake implementations) without inductor's code generation, which would take
    minutes on this 2-core machine; tests/test_ops.py covers the op under inductor. About 10 s here."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_llama()
    eager = copy.deepcopy(model)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    initial_base = base(model)
    generator = torch.Generator().manual_seed(5)
    losses = {}
    with fastlora.use_backend("torch"):
        for length, steps in ((8, 3), (12, 2), (16, 2)):
            ids = torch.randint(0, 128, (2, length), generator=generator)
            torch._dynamo.mark_dynamic(ids, 1)
            for step in range(steps):
                torch.manual_seed(step)
                loss = compiled(input_ids=ids, labels=ids).loss
                if length == 8 and step == 0:  # the compiled model computes what the eager one does
                    torch.manual_seed(step)
                    torch.testing.assert_close(loss, eager(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
                loss.backward()
                assert all(p.grad is None for n, p in model.named_parameters() if n not in lora)
                assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)
                losses.setdefault(length, []).append(loss.item())
        # B starts at zero, so A's first gradient is zero; by now every adapter gets a signal.
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad.abs().sum() > 0 for p in lora.values())
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert all(math.isfinite(v) for values in losses.values() for v in values)
    for length, values in losses.items():  # the same batch again: the adapters learn it
        assert values[-1] < values[0], (length, values)
    assert all(torch.equal(p, initial_base[n]) for n, p in base(model).items())


# --- transformers' Trainer ---------------------------------------------------------------------------------


def test_trainer_steps_train_only_the_adapters(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_llama()
    before, before_base = adapters(model), base(model)
    generator = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (16, 8), generator=generator).tolist()]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    with fastlora.use_backend("torch"):
        result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert result.global_step == 4 and len(losses) == 4, trainer.state.log_history
    assert all(math.isfinite(v) for v in [*losses, result.training_loss])
    after, after_base = adapters(model), base(model)
    assert all(torch.equal(v, after_base[n]) for n, v in before_base.items())
    assert all(not torch.equal(v, after[n]) for n, v in before.items())
