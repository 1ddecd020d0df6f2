"""pytest plugin: every PEFT model the tests build runs through ``fastlora.accelerate``.

Load it with ``-p peft_accelerate_plugin`` (this folder on ``PYTHONPATH``); ``benchmarks/peft_upstream.py``
does, to run PEFT's own test suite accelerated.

The hook is ``peft.tuners.tuners_utils.BaseTuner.inject_adapter``: every tuner model calls it when it puts
adapter layers into a model: ``get_peft_model``, ``PeftModel(...)``, ``PeftModel.from_pretrained`` and
``load_adapter``, ``PeftMixedModel``, ``add_adapter``, ``LoraModel(...)`` and ``inject_adapter_in_model``.
Right after it, ``fastlora.accelerate`` runs on that model, so layers added by a later ``add_adapter`` are
accelerated too, as a user calling ``accelerate`` after each change would have them. accelerate's warning
listing the layers it leaves to PEFT is silenced here (a user sees it once; in PEFT's tests it would trip
those that assert no warning).

At the end it prints one line, ``fastlora-accelerate: N accelerate calls, M layers fused, F fused forward
calls; PEFT's forward on fused layers: ...``, so a run shows how much went through the fused path: ``M``
sums the fused layers found after each call, ``F`` counts forwards that reached fastlora's op, and the
rest counts the calls on fused layers that ran PEFT's forward, by reason (merged, adapters disabled, ...).
"""

from __future__ import annotations

import functools
import warnings

_counts = {"calls": 0, "fused_layers": 0, "fused_forwards": 0}
_fallbacks: dict[str, int] = {}


def _install() -> None:
    from peft.tuners.tuners_utils import BaseTuner

    import fastlora

    if getattr(BaseTuner.inject_adapter, "_fastlora_accelerate", False):
        return
    original = BaseTuner.inject_adapter

    @functools.wraps(original)
    def inject_adapter(self, model, *args, **kwargs):
        result = original(self, model, *args, **kwargs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="fastlora.accelerate left")
            fastlora.accelerate(model)
        _counts["calls"] += 1
        _counts["fused_layers"] += sum(type(m).__name__.startswith("FusedLoraLinear") for m in model.modules())
        return result

    inject_adapter._fastlora_accelerate = True
    BaseTuner.inject_adapter = inject_adapter
    _install_counters()


def _install_counters() -> None:
    """Count the forwards that reach fastlora's op, and why the others on fused layers run PEFT's forward."""
    try:
        import fastlora.peft_fused as peft_fused
    except ImportError:  # a fastlora from before peft_fused: accelerate only, no counts
        return
    lora_linear = peft_fused.lora_linear

    @functools.wraps(lora_linear)
    def counted(*args, **kwargs):
        _counts["fused_forwards"] += 1
        return lora_linear(*args, **kwargs)

    peft_fused.lora_linear = counted  # the fused forward looks it up in the module at each call
    forward = peft_fused.FusedLoraLinear.forward

    @functools.wraps(forward)
    def counted_forward(self, x, *args, **kwargs):
        active = [a for a in self.active_adapters if a in self.lora_A]
        reason = "extra arguments" if args or kwargs else self._peft_forward_reason(active)
        if reason is not None:
            reason = next((k for k in ("variant", "base layer") if reason.startswith(k)), reason.split(" (")[0])
            _fallbacks[reason] = _fallbacks.get(reason, 0) + 1
        return forward(self, x, *args, **kwargs)

    peft_fused.FusedLoraLinear.forward = counted_forward


def pytest_configure(config):
    _install()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(
        f"fastlora-accelerate: {_counts['calls']} accelerate calls, {_counts['fused_layers']} layers fused, "
        f"{_counts['fused_forwards']} fused forward calls; PEFT's forward on fused layers: "
        + (", ".join(f"{n} {r}" for r, n in sorted(_fallbacks.items(), key=lambda kv: -kv[1])) or "none")
    )
