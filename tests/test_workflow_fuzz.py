"""Random sequences of workflow calls, valid and invalid, on a small model (hypothesis' stateful testing).

After every call:
- a call that raised raised TypeError / ValueError (or FileNotFoundError / NotADirectoryError) and left
  the model exactly as it was (``snapshot.assert_unchanged``);
- the model is consistent: its output equals a float64 recomputation from its original weights and
  adapters (the merged ones folded in, the active ones added), and merging everything active then
  unmerging gives the weights back bit for bit.

Bounded for CI by a fixed number of examples and steps (``FASTLORA_FUZZ_EXAMPLES`` raises it locally);
derandomised, so a CI run is reproducible.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings

import pytest
import torch
import torch.nn as nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

import fastlora  # noqa: E402
from fastlora.model import lora_layers  # noqa: E402

from snapshot import assert_unchanged, snapshot  # noqa: E402

CLEAR_ERRORS = (TypeError, ValueError, FileNotFoundError, NotADirectoryError)

NAMES = st.sampled_from(["a", "b", "c", "", "a.b", None, 3])
TARGETS = st.sampled_from([["0"], ["2"], ["0", "2"], "all-linear", r"\d", [], None, 5, "(", ["nothing"]])
RANKS = st.sampled_from([1, 2, 3, 0, -1, True, 2.5, 10**12])
ALPHAS = st.sampled_from([1.0, 4, -2.0, 0.0, float("nan"), "x"])
DROPOUTS = st.sampled_from([0.0, 0.1, 1.0, "0.1"])
NAME_LISTS = st.one_of(NAMES, st.lists(st.sampled_from(["a", "b", "c", "zz"]), max_size=3))
WEIGHTS = st.sampled_from([1.0, 0.5, 0.0, -1.0, float("nan"), float("inf"), True, "1"])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).eval()


def _expected(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output recomputed in float64 from the original weights and the adapters."""
    h = x.double()
    for module in model:
        if isinstance(module, fastlora.LoRALinear):
            w = module._original_weight().double()
            y = h @ w.t() + (module.bias.double() if module.bias is not None else 0)
            if not module.disabled:
                folded = list(module.merged_adapters)
                folded += [n for n in module.active_adapters if n not in folded]
                for n in folded:
                    a, b = module.lora_A[n].double(), module.lora_B[n].double()
                    y = y + module.scaling[n] * (h @ a.t()) @ b.t()
            h = y
        elif isinstance(module, nn.Linear):
            h = h @ module.weight.double().t() + module.bias.double()
        else:
            h = module(h)
    return h


class Workflow(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = _model()
        self.folder = tempfile.mkdtemp()
        self.x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))

    def _call(self, fn, *args, **kwargs):
        """Run one workflow call; an error must be a clear one and change nothing."""
        before = snapshot(self.model)
        try:
            fn(*args, **kwargs)
        except CLEAR_ERRORS:
            assert_unchanged(self.model, before)
        # Any other exception type propagates: hypothesis reports it as a failure (an unclear error).

    @rule(name=NAMES, modules=TARGETS, r=RANKS, alpha=ALPHAS, dropout=DROPOUTS)
    def inject(self, name, modules, r, alpha, dropout):
        self._call(fastlora.inject, self.model, modules, r=r, lora_alpha=alpha, lora_dropout=dropout,
                   adapter_name=name)  # fmt: skip

    @rule(names=NAME_LISTS)
    def set_adapter(self, names):
        self._call(fastlora.set_adapter, self.model, names)

    @rule(name=NAMES)
    def delete_adapter(self, name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deleting the only active adapter activates another, with a warning
            self._call(fastlora.delete_adapter, self.model, name)

    @rule(names=st.one_of(st.none(), NAME_LISTS), safe=st.sampled_from([False, True, "yes"]))
    def merge(self, names, safe):
        self._call(fastlora.merge, self.model, names, safe=safe)

    @rule()
    def unmerge(self):
        self._call(fastlora.unmerge, self.model)

    @rule(w1=WEIGHTS, w2=WEIGHTS, name=NAMES, method=st.sampled_from(["linear", "cat", "svd", "ties", None]),
          svd_rank=st.sampled_from([None, 1, 2, 0, -1, True, 99]))  # fmt: skip
    def combine(self, w1, w2, name, method, svd_rank):
        self._call(fastlora.combine, self.model, {"a": w1, "b": w2}, name, method=method, svd_rank=svd_rank)

    @rule(seed=st.integers(0, 2**16))
    def train_step(self, seed):
        """Stand-in for training: give every adapter non-zero random weights (B starts at zero)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(self.model).values():
                if layer.merged_adapters:
                    continue  # a merged adapter's weights are in W: changing them would desynchronise it
                for n in layer.adapters:
                    layer.lora_A[n].copy_(torch.randn(layer.lora_A[n].shape, generator=g))
                    layer.lora_B[n].copy_(torch.randn(layer.lora_B[n].shape, generator=g))

    @precondition(lambda self: fastlora.list_adapters(self.model))
    @rule(name=NAMES, new_name=NAMES)
    def save_and_load(self, name, new_name):
        """Save one adapter and load it back under another name (both names drawn, valid or not)."""
        before = snapshot(self.model)
        try:
            fastlora.save_adapter(self.model, self.folder, adapter_name=name)
        except CLEAR_ERRORS:
            assert_unchanged(self.model, before)
            return
        self._call(fastlora.load_adapter, self.model, self.folder, adapter_name=new_name)

    @invariant()
    def output_is_the_float64_recomputation(self):
        got = self.model(self.x).double()
        want = _expected(self.model, self.x)
        assert torch.isfinite(got).all()
        scale = want.abs().max().item() + 1e-30
        assert (got - want).abs().max().item() <= 1e-5 * scale, "output differs from the float64 recomputation"

    @invariant()
    def merge_then_unmerge_restores_bits(self):
        """Merging the active adapters keeps the output; unmerging gives every original weight back, bit for
        bit (also where adapters had been merged before)."""
        twin = copy.deepcopy(self.model)
        layers = lora_layers(twin)
        originals = {n: (layer._unmerged_weight if layer._unmerged_weight is not None else layer.weight).clone()
                     for n, layer in layers.items()}  # fmt: skip
        fastlora.merge(twin)
        got = twin(self.x).double()
        want = _expected(self.model, self.x)
        assert (got - want).abs().max().item() <= 1e-5 * (want.abs().max().item() + 1e-30)
        fastlora.unmerge(twin)
        for n, layer in layers.items():
            assert torch.equal(layer.weight, originals[n]), n
            assert layer._unmerged_weight is None and not layer.merged_adapters


_EXAMPLES = int(os.environ.get("FASTLORA_FUZZ_EXAMPLES", "150"))
Workflow.TestCase.settings = settings(max_examples=_EXAMPLES, stateful_step_count=12, deadline=None,
                                      derandomize=True, database=None)  # fmt: skip
test_workflow = Workflow.TestCase
