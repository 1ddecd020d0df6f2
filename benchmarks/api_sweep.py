"""An outside-in sweep of fastlora's public API with bad inputs and extreme-but-valid ones.

Usage: python benchmarks/api_sweep.py [--out DIR] [--verbose] [--only SUBSTRING] [--timeout SECONDS]

Each case builds a fresh small model (a tiny nn.Sequential of nn.Linear, or a small transformers Llama /
GPT-2 / PEFT model from a config: random weights, nothing downloaded), makes one call and is classified:

- a "bad" case must raise. It is
  - "clear error": ValueError or TypeError (or FileNotFoundError / NotADirectoryError / RuntimeError where
    the case allows it because it is the truth) whose message names the argument or config key the case
    declares, and the model (every parameter and buffer, the module tree, every module's state: see
    tests/snapshot.py) and any watched files and global settings are exactly as before;
  - "changed after error": it raised, but the model / files / settings changed;
  - "unclear error": it raised, but another exception type (AttributeError, KeyError, IndexError, re.error,
    RecursionError, json / Unicode errors, PyTorch's RuntimeError, ...) or a message that does not name the
    argument; also a case that ran past the time limit;
  - "silently accepted": no exception.
- a "valid" case must succeed (with a cheap consistency check of its result where there is one): "ok" or
  "valid failing".

Details of the rules: a name counts as named when it appears in the message as a whole word (so "r" in
"r: expected ..." but not in "error"); a bad case that changed anything is "changed after error" however good
its message; an argument given inside another one names the outer one (rank_pattern={"v": 0} must say
rank_pattern, combine's new_name must say new_name); json.JSONDecodeError, UnicodeError, RecursionError and
NotImplementedError count as unclear although they subclass ValueError / RuntimeError. Each case runs under
a SIGALRM time limit (--timeout), which interrupts Python code but not a single long call into C.

It prints counts per class and, per class, each case with its exception type and the start of its message
(--verbose: every case, every change); with --out DIR it also writes DIR/result.json. The exit status is 0
whatever the counts (it is a measurement), non-zero only if the script itself breaks. It measures whichever
fastlora Python imports: to measure another checkout, put it first on PYTHONPATH (the header line says which
one ran). Run it with TRITON_INTERPRET unset (the backend cases expect the triton backend to be unable to run
on the CPU). It takes about 10 s on one CPU thread.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import fastlora  # noqa: E402
from fastlora import backends  # noqa: E402
from snapshot import diff, snapshot  # noqa: E402

# --- the case registry --------------------------------------------------------------------------------

E = (ValueError, TypeError)
E_FILE = (ValueError, TypeError, FileNotFoundError, NotADirectoryError)
E_PATH = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, FileExistsError)
E_RUNTIME = (ValueError, TypeError, RuntimeError)
E_ALLOC = (ValueError, TypeError, RuntimeError, MemoryError)
# Subclasses of the accepted types that still say nothing useful to a user who passed a bad argument.
DENIED = (json.JSONDecodeError, UnicodeError, RecursionError, NotImplementedError)

CLASSES_BAD = ("clear error", "changed after error", "unclear error", "silently accepted")
CLASSES_VALID = ("ok", "valid failing")


@dataclass
class Case:
    name: str
    kind: str  # "bad" or "valid"
    api: str
    build: Callable[[Setup], Callable[[], Any]]
    names: tuple[str, ...] = ()
    errors: tuple[type[BaseException], ...] = E
    doc: str = ""


CASES: list[Case] = []
_SECTION = ["?"]


def section(api: str) -> None:
    _SECTION[0] = api


def _register(case: Case) -> None:
    if any(c.name == case.name for c in CASES):
        raise RuntimeError(f"duplicate case name {case.name}")
    CASES.append(case)


def bad(name: str, names: str | tuple[str, ...], errors: tuple[type[BaseException], ...] = E, doc: str = ""):
    """A case that must raise one of ``errors`` with a message naming one of ``names``, model unchanged."""
    names = (names,) if isinstance(names, str) else tuple(names)

    def register(build):
        _register(Case(name, "bad", _SECTION[0], build, names, errors, doc or (build.__doc__ or "").strip()))
        return build

    return register


def valid(name: str, doc: str = ""):
    """A case that must succeed (and pass its own consistency checks)."""

    def register(build):
        _register(Case(name, "valid", _SECTION[0], build, doc=doc or (build.__doc__ or "").strip()))
        return build

    return register


class Setup:
    """What a case's build step registers: objects whose state must not change, files, global values."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.watched: dict[str, Any] = {}
        self.values: dict[str, Callable[[], Any]] = {}

    def watch(self, obj, name: str = "model"):
        self.watched[name] = obj
        return obj

    def watch_value(self, name: str, read: Callable[[], Any]) -> None:
        self.values[name] = read

    def watch_path(self, path: Path) -> None:
        self.values[f"files under {path.name}"] = lambda: _path_state(path)

    def dir(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def _path_state(path: Path) -> Any:
    if not path.exists():
        return "missing"
    if path.is_file():
        return ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return {str(p.relative_to(path)): ("file", hashlib.sha256(p.read_bytes()).hexdigest()) if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}  # fmt: skip


class Name(str):
    """A placeholder shown as written (no quotes) in case descriptions."""

    def __repr__(self) -> str:
        return str(self)


MODEL = Name("model")


def _show(value: Any) -> str:
    """A short form of an argument for case descriptions (lambdas building a value are called)."""
    if callable(value) and not isinstance(value, (torch.Tensor, type, nn.Module)):
        try:
            value = value()
        except TypeError:
            return lambda_text(value) or repr(value)
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)} {value.dtype} {value.device}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_LAMBDAS: dict[str, list[ast.Lambda]] = {}


def lambda_text(fn: Callable) -> str:
    """The body of a lambda as written in its file ("" when it cannot be told)."""
    code = getattr(fn, "__code__", None)
    if code is None or getattr(fn, "__name__", "") != "<lambda>" or not hasattr(code, "co_positions"):
        return ""
    file = code.co_filename
    if file not in _LAMBDAS:
        try:
            _LAMBDAS[file] = [n for n in ast.walk(ast.parse(Path(file).read_text())) if isinstance(n, ast.Lambda)]
        except (OSError, SyntaxError):
            _LAMBDAS[file] = []
    spans = [(l0, c0) for l0, _, c0, _ in code.co_positions() if l0 is not None and c0 is not None]
    candidates = [n for n in _LAMBDAS[file] if n.lineno == code.co_firstlineno]

    def inside(node: ast.Lambda) -> int:
        body = node.body
        return sum((body.lineno, body.col_offset) <= sp <= (body.end_lineno, body.end_col_offset) for sp in spans)

    if not candidates:
        return ""
    best = max(candidates, key=inside)
    text = ast.get_source_segment(Path(file).read_text(), best.body) or ""
    return " ".join(text.split())


def call_repr(function: str, *args: Any, **kwargs: Any) -> str:
    return f"{function}({', '.join([*map(_show, args), *(f'{k}={_show(v)}' for k, v in kwargs.items())])})"


class Inconsistent(AssertionError):
    """A valid case ran but its result is wrong."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Inconsistent(message)


def check_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol=1e-4, atol=1e-5) -> None:
    check(tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    check(bool(torch.isfinite(actual).all()), f"{what}: non-finite values")
    a, e = actual.detach().double(), expected.detach().double()
    err = float((a - e).abs().max()) if a.numel() else 0.0
    check(torch.allclose(a, e, rtol=rtol, atol=atol), f"{what}: max abs error {err:.3g}")


def check_finite(t: torch.Tensor, what: str) -> None:
    check(bool(torch.isfinite(t).all()), f"{what}: non-finite values")


# --- fixtures -----------------------------------------------------------------------------------------

LINEARS = ["q", "v"]


def tiny(device=None, dtype=None) -> nn.Module:
    """q: 8->8, v: 8->6, out: 6->4, in a row."""
    torch.manual_seed(0)
    f = {"device": device, "dtype": dtype}
    return nn.Sequential(OrderedDict(q=nn.Linear(8, 8, **f), v=nn.Linear(8, 6, **f), out=nn.Linear(6, 4, **f)))


def X(n: int = 3, dtype=torch.float32, device=None) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device or "cpu")


def lora_modules(model: nn.Module) -> dict[str, fastlora.LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, fastlora.LoRALinear)}


def randomize_b(model: nn.Module, std: float = 0.1) -> nn.Module:
    """Non-zero B for every adapter, so that each adapter changes the output."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            for name in layer.lora_B:
                b = layer.lora_B[name]
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float32) * std)
    return model


def lora_tiny(adapters=("default",), r=2, alpha=4, targets=LINEARS, **kwargs) -> nn.Module:
    """tiny() with each of ``adapters`` injected on ``targets``, random non-zero B, the first one active."""
    model = tiny()
    for name in adapters:
        fastlora.inject(model, list(targets), r=r, lora_alpha=alpha, adapter_name=name, **kwargs)
    randomize_b(model)
    fastlora.set_adapter(model, adapters[0])
    return model


def _original_weight(layer: fastlora.LoRALinear) -> torch.Tensor:
    """The layer's (out, in) weight without merged adapters."""
    w = getattr(layer, "_unmerged_weight", None)
    w = layer.weight if w is None else w
    return w.t() if getattr(layer, "fan_in_fan_out", False) else w


def with_adapters(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The output of tiny-shaped ``model`` with ``names`` active, computed by hand in float64 from its
    original weights and each adapter's A, B and scaling."""
    x = x.double()
    for _, module in model.named_children():
        if isinstance(module, fastlora.LoRALinear):
            y = x @ _original_weight(module).double().t() + (0 if module.bias is None else module.bias.double())
            for n in names:
                if n in module.lora_A:
                    y = y + module.scaling[n] * (x @ module.lora_A[n].double().t()) @ module.lora_B[n].double().t()
            x = y
        elif isinstance(module, nn.Linear):
            x = x @ module.weight.double().t() + (0 if module.bias is None else module.bias.double())
        else:
            x = module(x)
    return x


def llama(dtype=torch.float32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))


def peft_tiny(r=2, **config) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(), LoraConfig(r=r, lora_alpha=4, target_modules=LINEARS, **config))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def saved(s: Setup, model: nn.Module | None = None, name: str = "adapter", **kwargs) -> Path:
    """A folder holding an adapter of lora_tiny() (r=2, alpha=4 on q and v) in PEFT's format."""
    path = s.tmp / name
    fastlora.save_adapter(model if model is not None else lora_tiny(), path, **kwargs)
    return path


CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def edit_config(path: Path, drop=(), **changes) -> None:
    config = json.loads((path / CONFIG).read_text())
    for key in drop:
        config.pop(key, None)
    config.update(changes)
    (path / CONFIG).write_text(json.dumps(config))


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]) -> None:
    tensors = load_file(str(path / WEIGHTS))
    tensors = edit(tensors) or tensors
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})


def _load_case(s: Setup, prepare: Callable[[Path], Any], model_fn=tiny, path_of=None, **load_kwargs):
    """Save lora_tiny()'s adapter, let ``prepare`` spoil the folder, then load it into a fresh model."""
    path = saved(s)
    prepare(path)
    model = model_fn()
    if isinstance(model, nn.Module):
        s.watch(model)
    target = path if path_of is None else path_of(path)
    return lambda: fastlora.load_adapter(model, target, **load_kwargs)


def load_bad(name: str, names, prepare: Callable[[Path], Any], errors=E_FILE, model_fn=tiny, doc="", **load_kwargs):
    if not doc:
        kwargs = {k: v for k, v in load_kwargs.items() if k != "path_of"}
        path = re.sub(r"\bp\b", "folder", lambda_text(load_kwargs["path_of"])) if "path_of" in load_kwargs else "folder"
        prepared = lambda_text(prepare)
        prepared = re.sub(r"\bp\b", "folder", prepared)
        doc = " ".join(filter(None, [f"folder prepared by {prepared};" if prepared not in ("", "None") else "",
                                     call_repr("load_adapter", MODEL, Name(path), **kwargs)]))  # fmt: skip

    @bad(name, names, errors, doc)
    def build(s):
        return _load_case(s, prepare, model_fn, **load_kwargs)


def config_bad(name: str, names=None, errors=E_FILE, drop=(), **changes):
    """load_adapter of a file whose config has ``changes`` (key -> value) and lacks ``drop``."""
    key = names or (tuple(changes) + tuple(drop))
    load_bad(name, key, lambda p: edit_config(p, drop=drop, **changes), errors,
             doc=f"adapter_config.json with {', '.join(f'{k}={v!r}' for k, v in changes.items())}"
             + (f" without {', '.join(drop)}" if drop else ""))  # fmt: skip


def config_raw(name: str, names, text: str | bytes, errors=E_FILE, doc=""):
    def prepare(p: Path):
        if isinstance(text, bytes):
            (p / CONFIG).write_bytes(text)
        else:
            (p / CONFIG).write_text(text)

    load_bad(name, names, prepare, errors, doc=doc)


# --- lora_linear --------------------------------------------------------------------------------------

section("lora_linear")


def ll_args(**change) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    args = {
        "x": torch.randn(4, 6, generator=g),
        "weight": torch.randn(5, 6, generator=g),
        "bias": torch.randn(5, generator=g),
        "lora_A": torch.randn(3, 6, generator=g),
        "lora_B": torch.randn(5, 3, generator=g),
        "scaling": 0.5,
    }
    args.update({k: v() if callable(v) and not isinstance(v, torch.Tensor) else v for k, v in change.items()})
    return args


def ll_reference(x, weight, bias, lora_A, lora_B, scaling, **_):
    x64 = x.double()
    y = x64 @ weight.double().t() + (0 if bias is None else bias.double())
    return y + scaling * (x64 @ lora_A.double().t()) @ lora_B.double().t()


def ll_bad(name: str, names, errors=E, **change):
    @bad(name, names, errors, doc="lora_linear(good arguments but " + call_repr("", **change)[1:-1] + ")")
    def build(s):
        args = ll_args(**change)
        s.watch({k: v for k, v in args.items() if isinstance(v, torch.Tensor)}, "inputs")
        return lambda: fastlora.lora_linear(**args)


ll_bad("ll_x_list", "x", x=lambda: [[1.0] * 6] * 4)
ll_bad("ll_x_none", "x", x=None)
ll_bad("ll_x_int64", "x", x=lambda: torch.ones(4, 6, dtype=torch.int64))
ll_bad("ll_x_bool", "x", x=lambda: torch.ones(4, 6, dtype=torch.bool))
ll_bad("ll_x_complex", "x", x=lambda: torch.ones(4, 6, dtype=torch.complex64))
ll_bad("ll_x_0d", "x", x=lambda: torch.tensor(1.0))
ll_bad("ll_x_wrong_in_features", ("x", "in_features"), x=lambda: torch.randn(4, 7))
ll_bad("ll_weight_none", "weight", weight=None)
ll_bad("ll_weight_3d", "weight", weight=lambda: torch.randn(5, 6, 1))
ll_bad("ll_weight_1d", "weight", weight=lambda: torch.randn(6))
ll_bad("ll_weight_float64", ("weight", "dtype"), weight=lambda: torch.randn(5, 6, dtype=torch.float64))
ll_bad("ll_weight_meta", ("weight", "device"), weight=lambda: torch.randn(5, 6, device="meta"))
ll_bad("ll_bias_wrong_shape", "bias", bias=lambda: torch.randn(4))
ll_bad("ll_bias_2d", "bias", bias=lambda: torch.randn(1, 5))
ll_bad("ll_bias_float16", "bias", bias=lambda: torch.randn(5, dtype=torch.float16))
ll_bad("ll_bias_int", "bias", bias=lambda: torch.ones(5, dtype=torch.int32))
ll_bad("ll_bias_list", "bias", bias=lambda: [0.0] * 5)
ll_bad("ll_bias_meta", "bias", bias=lambda: torch.randn(5, device="meta"))
ll_bad("ll_lora_A_none", "lora_A", lora_A=None)
ll_bad("ll_lora_A_wrong_in_features", "lora_A", lora_A=lambda: torch.randn(3, 7))
ll_bad("ll_lora_A_1d", "lora_A", lora_A=lambda: torch.randn(6))
ll_bad("ll_lora_A_meta", "lora_A", lora_A=lambda: torch.randn(3, 6, device="meta"))
ll_bad("ll_rank_0", ("lora_A", "r"), lora_A=lambda: torch.randn(0, 6), lora_B=lambda: torch.randn(5, 0))
ll_bad("ll_lora_B_wrong_rank", "lora_B", lora_B=lambda: torch.randn(5, 4))
ll_bad("ll_lora_B_transposed", "lora_B", lora_B=lambda: torch.randn(3, 5))
ll_bad("ll_lora_B_int", "lora_B", lora_B=lambda: torch.ones(5, 3, dtype=torch.int32))
ll_bad("ll_scaling_bool", "scaling", scaling=True)
ll_bad("ll_scaling_nan", "scaling", scaling=float("nan"))
ll_bad("ll_scaling_inf", "scaling", scaling=float("-inf"))
ll_bad("ll_scaling_str", "scaling", scaling="0.5")
ll_bad("ll_scaling_none", "scaling", scaling=None)
ll_bad("ll_scaling_tensor", "scaling", scaling=lambda: torch.tensor(0.5))
ll_bad("ll_scaling_complex", "scaling", scaling=1 + 2j)
ll_bad("ll_dropout_1", "dropout_p", dropout_p=1.0)
ll_bad("ll_dropout_negative", "dropout_p", dropout_p=-0.1)
ll_bad("ll_dropout_nan", "dropout_p", dropout_p=float("nan"))
ll_bad("ll_dropout_bool", "dropout_p", dropout_p=True)
ll_bad("ll_dropout_str", "dropout_p", dropout_p="0.1")
ll_bad("ll_training_str", "training", training="no", dropout_p=0.5)
ll_bad("ll_training_none", "training", training=None, dropout_p=0.5)
ll_bad("ll_generator_str", "generator", generator="seed", dropout_p=0.5)
ll_bad("ll_generator_int", "generator", generator=1234, dropout_p=0.5)


@valid("ll_meta_forward")
def _(s):
    """lora_linear on meta tensors: output shape only."""
    args = ll_args(**{k: (lambda v=v: v.to("meta")) for k, v in ll_args().items() if isinstance(v, torch.Tensor)})

    def call():
        y = fastlora.lora_linear(**args, dropout_p=0.1)
        check(y.shape == (4, 5) and y.device.type == "meta", f"got {tuple(y.shape)} on {y.device}")

    return call


@valid("ll_empty_batch")
def _(s):
    """x with zero rows."""
    args = ll_args(x=lambda: torch.randn(0, 6))
    return lambda: check(fastlora.lora_linear(**args).shape == (0, 5), "shape")


@valid("ll_strided_3d_input")
def _(s):
    """3-D, non-contiguous x (a transposed view)."""
    args = ll_args(x=lambda: torch.randn(6, 2, 3).transpose(0, 2))
    return lambda: check_close(fastlora.lora_linear(**args), ll_reference(**args), "output")


@valid("ll_negative_and_int_scaling")
def _(s):
    """scaling given as a negative int."""
    args = ll_args(scaling=-3)
    return lambda: check_close(fastlora.lora_linear(**args), ll_reference(**args), "output")


@valid("ll_numpy_scaling")
def _(s):
    """scaling given as a numpy float32."""
    import numpy as np

    args = ll_args(scaling=np.float32(0.25))
    return lambda: check_close(fastlora.lora_linear(**args), ll_reference(**args), "output")


@valid("ll_dropout_099_eval")
def _(s):
    """dropout_p 0.99 with training=False: no dropout at all."""
    args = ll_args(dropout_p=0.99, training=False)
    return lambda: check_close(fastlora.lora_linear(**args), ll_reference(**args), "output")


@valid("ll_fp64_adapters_fp32_base")
def _(s):
    """fp64 adapters on an fp32 base and input."""
    args = ll_args(lora_A=lambda: torch.randn(3, 6, dtype=torch.float64), lora_B=lambda: torch.randn(5, 3, dtype=torch.float64))

    def call():
        y = fastlora.lora_linear(**args)
        check(y.dtype == torch.float32, f"dtype {y.dtype}")
        check_close(y, ll_reference(**args), "output")

    return call


@valid("ll_bf16_base_fp32_adapters")
def _(s):
    """bf16 base and input, fp32 adapters: output in bf16."""
    args = ll_args()
    for k in ("x", "weight", "bias"):
        args[k] = args[k].bfloat16()

    def call():
        y = fastlora.lora_linear(**args)
        check(y.dtype == torch.bfloat16, f"dtype {y.dtype}")
        check_close(y.float(), ll_reference(**args), "output", rtol=3e-2, atol=3e-2)

    return call


@valid("ll_generator_dropout")
def _(s):
    """generator= reproduces the dropout draw."""
    args = ll_args(dropout_p=0.5)

    def call():
        a = fastlora.lora_linear(**args, generator=torch.Generator().manual_seed(5))
        b = fastlora.lora_linear(**args, generator=torch.Generator().manual_seed(5))
        check(torch.equal(a, b), "same generator seed, different outputs")

    return call


# --- backend selection --------------------------------------------------------------------------------

section("backends")


def selected():
    return getattr(backends, "_selected", None)


def set_backend_bad(name: str, value, names=("name",)):
    @bad(name, names, doc=f"set_backend({value!r})")
    def build(s):
        s.watch_value("selected backend", selected)
        return lambda: fastlora.set_backend(value)


set_backend_bad("set_backend_unknown", "cuda_fast")
set_backend_bad("set_backend_empty", "")
set_backend_bad("set_backend_int", 5)
set_backend_bad("set_backend_list", ["torch"])
set_backend_bad("set_backend_bytes", b"torch")


@bad("set_backend_bad_keeps_previous", "name")
def _(s):
    """set_backend("torch") then set_backend("nope"): the selection stays "torch"."""
    fastlora.set_backend("torch")
    s.watch_value("selected backend", selected)
    return lambda: fastlora.set_backend("nope")


@bad("use_backend_unknown", "name")
def _(s):
    """with use_backend("nope"): after set_backend("torch")."""
    fastlora.set_backend("torch")
    s.watch_value("selected backend", selected)

    def call():
        with fastlora.use_backend("nope"):
            pass

    return call


@bad("use_backend_int", "name")
def _(s):
    """with use_backend(3): ..."""
    s.watch_value("selected backend", selected)

    def call():
        with fastlora.use_backend(3):
            pass

    return call


@bad("triton_selected_on_cpu", ("triton",), E_RUNTIME)
def _(s):
    """use_backend("triton") then lora_linear on CPU tensors: the backend cannot run there."""
    args = ll_args()

    def call():
        with fastlora.use_backend("triton"):
            fastlora.lora_linear(**args)

    return call


def env_bad(name: str, value: str, names=("FASTLORA_BACKEND",), errors=E, layer=False):
    @bad(name, names, errors, doc=f"$FASTLORA_BACKEND={value!r}, then {'a LoRALinear forward' if layer else 'lora_linear'}")
    def build(s):
        os.environ["FASTLORA_BACKEND"] = value
        if layer:
            module = s.watch(fastlora.LoRALinear(8, 4))
            return lambda: module(X())
        args = ll_args()
        return lambda: fastlora.lora_linear(**args)


env_bad("env_backend_unknown", "nope")
env_bad("env_backend_unknown_layer", "fast", layer=True)
env_bad("env_backend_numeric", "1")
env_bad("env_backend_triton_on_cpu", "triton", names=("triton",), errors=E_RUNTIME)


def env_valid(name: str, value: str):
    @valid(name, doc=f"$FASTLORA_BACKEND={value!r}")
    def build(s):
        os.environ["FASTLORA_BACKEND"] = value
        args = ll_args()
        return lambda: check_close(fastlora.lora_linear(**args), ll_reference(**args), "output")


env_valid("env_backend_mixed_case", "  Torch ")
env_valid("env_backend_empty", "")
env_valid("env_backend_auto", "auto")


@valid("set_backend_none_resets")
def _(s):
    """set_backend("torch"), then None: back to auto."""
    fastlora.set_backend("torch")

    def call():
        fastlora.set_backend(None)
        check(backends.selected_backend_name() == "auto", backends.selected_backend_name())

    return call


@valid("use_backend_nested_restores")
def _(s):
    def call():
        fastlora.set_backend("auto")
        with fastlora.use_backend("torch"):
            with fastlora.use_backend("auto"):
                pass
            check(backends.selected_backend_name() == "torch", "inner block did not restore")
        check(backends.selected_backend_name() == "auto", "outer block did not restore")

    return call


# --- LoRALinear ---------------------------------------------------------------------------------------

section("LoRALinear")


def ctor_bad(name: str, names, errors=E, in_features=8, out_features=4, **kwargs):
    @bad(name, names, errors, doc=call_repr("LoRALinear", in_features, out_features, **kwargs))
    def build(s):
        return lambda: fastlora.LoRALinear(in_features, out_features, **kwargs)


ctor_bad("ctor_in_features_negative", "in_features", in_features=-1)
ctor_bad("ctor_out_features_negative", "out_features", out_features=-3)
ctor_bad("ctor_in_features_zero", "in_features", in_features=0)
ctor_bad("ctor_in_features_bool", "in_features", in_features=True)
ctor_bad("ctor_in_features_float", "in_features", in_features=2.5)
ctor_bad("ctor_in_features_str", "in_features", in_features="8")
ctor_bad("ctor_in_features_none", "in_features", in_features=None)
ctor_bad("ctor_r_0", "r", r=0)
ctor_bad("ctor_r_negative", "r", r=-1)
ctor_bad("ctor_r_bool", "r", r=True)
ctor_bad("ctor_r_float", "r", r=2.5)
ctor_bad("ctor_r_str", "r", r="8")
ctor_bad("ctor_r_huge", "r", E_ALLOC, r=10**12)
ctor_bad("ctor_alpha_nan", "lora_alpha", lora_alpha=float("nan"))
ctor_bad("ctor_alpha_inf", "lora_alpha", lora_alpha=float("inf"))
ctor_bad("ctor_alpha_str", "lora_alpha", lora_alpha="8")
ctor_bad("ctor_alpha_bool", "lora_alpha", lora_alpha=True)
ctor_bad("ctor_alpha_none", "lora_alpha", lora_alpha=None)
ctor_bad("ctor_dropout_1", "lora_dropout", lora_dropout=1.0)
ctor_bad("ctor_dropout_negative", "lora_dropout", lora_dropout=-0.1)
ctor_bad("ctor_dropout_str", "lora_dropout", lora_dropout="abc")
ctor_bad("ctor_dropout_nan", "lora_dropout", lora_dropout=float("nan"))
ctor_bad("ctor_bias_str", "bias", bias="yes")
ctor_bad("ctor_use_rslora_str", "use_rslora", use_rslora="false")
ctor_bad("ctor_dtype_int32", "dtype", dtype=torch.int32)
ctor_bad("ctor_dtype_str", "dtype", dtype="float32")
ctor_bad("ctor_dtype_complex", "dtype", dtype=torch.complex64)
ctor_bad("ctor_device_bad_str", "device", device="nope")
ctor_bad("ctor_adapter_name_empty", "adapter_name", adapter_name="")
ctor_bad("ctor_adapter_name_dot", "adapter_name", adapter_name="a.b")
ctor_bad("ctor_adapter_name_none", "adapter_name", adapter_name=None)
ctor_bad("ctor_adapter_name_int", "adapter_name", adapter_name=5)


def from_linear_bad(name: str, names, errors=E, make=lambda: nn.Linear(8, 4), **kwargs):
    @bad(name, names, errors, doc=call_repr("LoRALinear.from_linear", make, **kwargs))
    def build(s):
        linear = make()
        if isinstance(linear, nn.Module):
            s.watch(linear, "linear")
        return lambda: fastlora.LoRALinear.from_linear(linear, **kwargs)


from_linear_bad("from_linear_adapter_name_dot", "adapter_name", adapter_name="a.b")
from_linear_bad("from_linear_adapter_name_empty", "adapter_name", adapter_name="")
from_linear_bad("from_linear_adapter_name_none", "adapter_name", adapter_name=None)
from_linear_bad("from_linear_r_0", "r", r=0)
from_linear_bad("from_linear_r_huge", "r", E_ALLOC, r=10**12)
from_linear_bad("from_linear_use_rslora_str", "use_rslora", use_rslora="no")
from_linear_bad("from_linear_conv2d", "linear", make=lambda: nn.Conv2d(3, 4, 1))
from_linear_bad("from_linear_none", "linear", make=lambda: None)
from_linear_bad("from_linear_lora_layer", "linear", make=lambda: fastlora.LoRALinear(8, 4))


def layer_with_two() -> fastlora.LoRALinear:
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(8, 4, r=2, lora_alpha=4)
    layer.add_adapter("other", 2, 4)
    layer.set_active(["default"])
    with torch.no_grad():
        for n in layer.lora_B:
            layer.lora_B[n].normal_(std=0.1)
    return layer


def layer_bad(name: str, names, call: Callable[[fastlora.LoRALinear], Any], errors=E, prepare=None, doc=""):
    @bad(name, names, errors, doc or "layer with adapters default (active) and other: " + lambda_text(call))
    def build(s):
        layer = layer_with_two()
        if prepare is not None:
            prepare(layer)
        s.watch(layer, "layer")
        return lambda: call(layer)


layer_bad("layer_add_adapter_existing", ("name", "adapter_name"), lambda l: l.add_adapter("other"))
layer_bad("layer_add_adapter_dot", ("name", "adapter_name"), lambda l: l.add_adapter("x.y"))
layer_bad("layer_add_adapter_int_name", ("name", "adapter_name"), lambda l: l.add_adapter(7))
layer_bad("layer_add_adapter_r_0", "r", lambda l: l.add_adapter("new", r=0))
layer_bad("layer_add_adapter_r_huge", "r", lambda l: l.add_adapter("new", r=10**12), E_ALLOC)
layer_bad("layer_add_adapter_use_rslora_str", "use_rslora", lambda l: l.add_adapter("new", use_rslora="no"))
layer_bad("layer_delete_adapter_unknown", ("name", "adapter_name"), lambda l: l.delete_adapter("nope"))
layer_bad("layer_delete_adapter_merged", ("name", "adapter_name"), lambda l: l.delete_adapter("default"), prepare=lambda l: l.merge())
layer_bad("layer_set_active_none", "names", lambda l: l.set_active(None))
layer_bad("layer_merge_unknown", ("names", "adapter_names"), lambda l: l.merge(["nope"]))
layer_bad("layer_merge_safe_str", "safe", lambda l: l.merge(safe="no"))
layer_bad("layer_forward_wrong_features", ("x", "in_features"), lambda l: l(torch.randn(3, 7)))
layer_bad("layer_forward_int_input", "x", lambda l: l(torch.ones(3, 8, dtype=torch.int64)))


@valid("layer_set_active_str_is_one_name")
def _(s):
    """layer.set_active("other"): one name, as fastlora.set_adapter takes one (not the letters o, t, h, e, r)."""
    layer = layer_with_two()

    def call():
        layer.set_active("other")
        check(layer.active_adapters == ["other"], f"active adapters {layer.active_adapters}")
        check(layer.lora_A["other"].requires_grad and not layer.lora_A["default"].requires_grad, "trainable flags")

    return call


@valid("ctor_rank_above_features")
def _(s):
    """r = 64 on a 8 -> 4 layer (PEFT allows r above the layer's dimensions)."""

    def call():
        layer = fastlora.LoRALinear(8, 4, r=64, lora_alpha=16)
        check_close(layer(X()), torch.nn.functional.linear(X(), layer.weight, layer.bias), "output (B is zero)")

    return call


@valid("ctor_one_by_one")
def _(s):
    """LoRALinear(1, 1, r=1)."""
    return lambda: check(fastlora.LoRALinear(1, 1, r=1)(torch.randn(5, 1)).shape == (5, 1), "shape")


@valid("ctor_negative_alpha")
def _(s):
    """lora_alpha = -8 (PEFT accepts it): scaling -1, the adapter term subtracts."""

    def call():
        layer = fastlora.LoRALinear(8, 4, r=8, lora_alpha=-8)
        with torch.no_grad():
            layer.lora_B["default"].normal_()
        check(layer.scaling["default"] == -1.0, f"scaling {layer.scaling['default']}")
        expected = ll_reference(X(), layer.weight, layer.bias, layer.lora_A["default"], layer.lora_B["default"], -1.0)
        check_close(layer(X()), expected, "output")

    return call


@valid("ctor_zero_alpha_rslora")
def _(s):
    """lora_alpha = 0 with rsLoRA: scaling 0."""

    def call():
        layer = fastlora.LoRALinear(8, 4, lora_alpha=0, use_rslora=True)
        check(layer.scaling["default"] == 0.0, f"scaling {layer.scaling['default']}")
        check_finite(layer(X()), "output")

    return call


@valid("ctor_dropout_0999")
def _(s):
    """lora_dropout = 0.999 in training mode: finite output."""
    return lambda: check_finite(fastlora.LoRALinear(8, 4, lora_dropout=0.999).train()(X()), "output")


@valid("ctor_float64")
def _(s):
    return lambda: check(fastlora.LoRALinear(8, 4, dtype=torch.float64)(X(dtype=torch.float64)).dtype == torch.float64, "dtype")


@valid("ctor_bf16_fp32_adapters")
def _(s):
    """A bf16 layer gets fp32 adapters and gives bf16 outputs."""

    def call():
        layer = fastlora.LoRALinear(8, 4, dtype=torch.bfloat16)
        check(layer.lora_A["default"].dtype == torch.float32, f"adapter dtype {layer.lora_A['default'].dtype}")
        check(layer(X(dtype=torch.bfloat16)).dtype == torch.bfloat16, "output dtype")

    return call


@valid("ctor_meta_forward_backward")
def _(s):
    """A LoRALinear on the meta device: forward and backward (shapes only)."""

    def call():
        layer = fastlora.LoRALinear(8, 4, lora_dropout=0.1, device="meta").train()
        y = layer(torch.randn(3, 8, device="meta"))
        check(y.shape == (3, 4) and y.device.type == "meta", f"{tuple(y.shape)} on {y.device}")
        y.sum().backward()
        check(layer.lora_A["default"].grad is not None, "no gradient for lora_A")

    return call


@valid("ctor_meta_to_empty")
def _(s):
    """Built on meta, materialised with to_empty(device="cpu"), initialised, run."""

    def call():
        layer = fastlora.LoRALinear(8, 4, device="meta")
        layer.to_empty(device="cpu")
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_()
        check_finite(layer(X()), "output")

    return call


@valid("from_linear_conv1d")
def _(s):
    """from_linear on GPT-2's Conv1D: same output as the Conv1D while B is zero."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(4, 8)
    expected = conv(X()).detach()
    return lambda: check_close(fastlora.LoRALinear.from_linear(conv, r=2)(X()), expected, "output")


@valid("from_linear_meta")
def _(s):
    """from_linear on a meta nn.Linear, then a meta forward."""
    linear = nn.Linear(8, 4, device="meta")
    return lambda: check(fastlora.LoRALinear.from_linear(linear)(torch.randn(2, 8, device="meta")).shape == (2, 4), "shape")


@valid("layer_delete_active_adapter")
def _(s):
    """Delete the active adapter of a layer: the layer computes the base alone."""
    layer = layer_with_two()

    def call():
        layer.delete_adapter("default")
        check(layer.adapters == ["other"] and layer.active_adapters == [], f"{layer.adapters} {layer.active_adapters}")
        check_close(layer(X()), torch.nn.functional.linear(X(), layer.weight, layer.bias), "output")

    return call


# --- inject -------------------------------------------------------------------------------------------

section("inject")


def inject_bad(name: str, names, errors=E, model_fn=tiny, target_modules=LINEARS, doc="", **kwargs):
    @bad(name, names, errors, doc or call_repr("inject", MODEL, target_modules, **kwargs))
    def build(s):
        model = model_fn()
        if isinstance(model, nn.Module):
            s.watch(model)
        return lambda: fastlora.inject(model, target_modules, **kwargs)


inject_bad("inject_model_none", "model", model_fn=lambda: None)
inject_bad("inject_model_str", "model", model_fn=lambda: "model")
inject_bad("inject_targets_none", "target_modules", target_modules=None)
inject_bad("inject_targets_int", "target_modules", target_modules=5)
inject_bad("inject_targets_empty_list", "target_modules", target_modules=[])
inject_bad("inject_targets_empty_str", "target_modules", target_modules="")
inject_bad("inject_targets_invalid_regex", "target_modules", target_modules="q(")
inject_bad("inject_targets_no_match", "target_modules", target_modules=["nope"])
inject_bad("inject_targets_list_of_int", "target_modules", target_modules=[1, 2])
inject_bad("inject_targets_non_linear", "target_modules", target_modules=["act"],
           model_fn=lambda: nn.Sequential(OrderedDict(q=nn.Linear(8, 8), act=nn.ReLU())))  # fmt: skip
inject_bad("inject_all_linear_no_linear", "target_modules", target_modules="all-linear", model_fn=lambda: nn.Sequential(nn.Conv2d(3, 3, 1)))
inject_bad("inject_r_0", "r", r=0)
inject_bad("inject_r_negative", "r", r=-4)
inject_bad("inject_r_bool", "r", r=True)
inject_bad("inject_r_float", "r", r=2.5)
inject_bad("inject_r_str", "r", r="8")
inject_bad("inject_r_none", "r", r=None)
inject_bad("inject_r_huge", "r", E_ALLOC, r=10**12)
inject_bad("inject_alpha_nan", "lora_alpha", lora_alpha=float("nan"))
inject_bad("inject_alpha_str", "lora_alpha", lora_alpha="16")
inject_bad("inject_alpha_bool", "lora_alpha", lora_alpha=False)
inject_bad("inject_dropout_1", "lora_dropout", lora_dropout=1.0)
inject_bad("inject_dropout_negative", "lora_dropout", lora_dropout=-0.1)
inject_bad("inject_dropout_str", "lora_dropout", lora_dropout="abc")
inject_bad("inject_adapter_name_dot", "adapter_name", adapter_name="a.b")
inject_bad("inject_adapter_name_empty", "adapter_name", adapter_name="")
inject_bad("inject_adapter_name_none", "adapter_name", adapter_name=None)
inject_bad("inject_adapter_name_int", "adapter_name", adapter_name=5)
inject_bad("inject_adapter_name_existing", "adapter_name", model_fn=lora_tiny, adapter_name="default")
inject_bad("inject_use_rslora_str", "use_rslora", use_rslora="false")
inject_bad("inject_exclude_invalid_regex", "exclude_modules", exclude_modules="v(")
inject_bad("inject_exclude_int", "exclude_modules", exclude_modules=5)
inject_bad("inject_exclude_everything", ("target_modules", "exclude_modules"), exclude_modules=LINEARS)
inject_bad("inject_rank_pattern_zero", "rank_pattern", rank_pattern={"v": 0})
inject_bad("inject_rank_pattern_str_value", "rank_pattern", rank_pattern={"v": "4"})
inject_bad("inject_rank_pattern_float", "rank_pattern", rank_pattern={"v": 2.5})
inject_bad("inject_rank_pattern_huge", "rank_pattern", E_ALLOC, rank_pattern={"v": 10**12},
           doc="rank_pattern={'v': 10**12}: q (first) is fine, v's allocation fails")  # fmt: skip
inject_bad("inject_rank_pattern_invalid_regex", "rank_pattern", rank_pattern={"(": 4})
inject_bad("inject_rank_pattern_list", "rank_pattern", rank_pattern=["v"])
inject_bad("inject_alpha_pattern_nan", "alpha_pattern", alpha_pattern={"v": float("nan")})
inject_bad("inject_alpha_pattern_str", "alpha_pattern", alpha_pattern={"v": "x"})
inject_bad("inject_alpha_pattern_invalid_regex", "alpha_pattern", alpha_pattern={"[": 4})
inject_bad("inject_alpha_pattern_int", "alpha_pattern", alpha_pattern=5)
inject_bad("inject_modules_to_save_no_match", "modules_to_save", modules_to_save=["nope"])
inject_bad("inject_modules_to_save_int", "modules_to_save", modules_to_save=5)
inject_bad("inject_modules_to_save_overlap", "modules_to_save", modules_to_save=["q"],
           doc="modules_to_save=['q'] while q is a target: q would be both trained whole and adapted")  # fmt: skip


@valid("inject_meta_model_forward")
def _(s):
    """inject into a model built on the meta device, then a meta forward."""

    def call():
        model = fastlora.inject(tiny("meta"), LINEARS, r=2, lora_dropout=0.1)
        y = model(X(device="meta"))
        check(y.shape == (3, 4) and y.device.type == "meta", f"{tuple(y.shape)} on {y.device}")

    return call


@valid("inject_meta_then_to_empty")
def _(s):
    """Build and inject under torch.device("meta"), materialise with to_empty, initialise, train a step."""

    def call():
        with torch.device("meta"):
            model = fastlora.inject(tiny(), LINEARS, r=2)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(std=0.1)
        y = model(X())
        check_finite(y, "output")
        y.sum().backward()
        check(all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n), "missing adapter gradients")

    return call


@valid("inject_rank_above_features")
def _(s):
    """r = 64 on 8 -> 8 and 8 -> 6 layers."""
    model = tiny()
    expected = model(X()).detach()
    return lambda: check_close(fastlora.inject(model, LINEARS, r=64)(X()), expected, "output (B is zero)")


@valid("inject_negative_alpha")
def _(s):
    """lora_alpha = -16 (PEFT accepts it)."""

    def call():
        model = randomize_b(fastlora.inject(tiny(), LINEARS, r=4, lora_alpha=-16))
        check(all(layer.scaling["default"] == -4.0 for layer in lora_modules(model).values()), "scaling")
        check_close(model(X()), with_adapters(model, X(), ["default"]), "output")

    return call


@valid("inject_alpha_zero")
def _(s):
    model = tiny()
    expected = model(X()).detach()
    return lambda: check_close(randomize_b(fastlora.inject(model, LINEARS, lora_alpha=0))(X()), expected, "output")


@valid("inject_rank_pattern_unmatched")
def _(s):
    """A rank_pattern key that matches no module changes nothing."""

    def call():
        model = fastlora.inject(tiny(), LINEARS, r=2, rank_pattern={"nothing_here": 5})
        check({layer.r["default"] for layer in lora_modules(model).values()} == {2}, "ranks")

    return call


@valid("inject_regex_and_exclude")
def _(s):
    def call():
        model = fastlora.inject(tiny(), r"q|v|out", exclude_modules=["out"])
        check(set(lora_modules(model)) == {"q", "v"}, str(set(lora_modules(model))))

    return call


@valid("inject_all_linear_llama")
def _(s):
    """"all-linear" on a Llama: every linear layer but lm_head."""

    def call():
        model = fastlora.inject(llama(), "all-linear", r=2)
        check("lm_head" not in lora_modules(model) and len(lora_modules(model)) == 14, f"{len(lora_modules(model))} layers")
        check_finite(model(input_ids=ids()).logits, "logits")

    return call


@valid("inject_gpt2_conv1d")
def _(s):
    """GPT-2's Conv1D layers; the output is unchanged while B is zero."""
    model = gpt2()
    expected = model(input_ids=ids()).logits.detach()
    return lambda: check_close(fastlora.inject(model, ["c_attn", "c_fc"])(input_ids=ids()).logits, expected, "logits")


@valid("inject_bf16_llama")
def _(s):
    def call():
        model = fastlora.inject(llama(torch.bfloat16), ["q_proj", "v_proj"], r=2)
        check(model(input_ids=ids()).logits.dtype == torch.bfloat16, "dtype")

    return call


@valid("inject_dropout_0999_train")
def _(s):
    return lambda: check_finite(fastlora.inject(tiny(), LINEARS, lora_dropout=0.999).train()(X()), "output")


# --- set_adapter / delete_adapter / disable_adapters / list_adapters / trainable_parameters ------------

section("set_adapter")


def two_adapters() -> nn.Module:
    return lora_tiny(("default", "other"))


def model_bad(name: str, names, call: Callable[[nn.Module], Any], errors=E, model_fn=two_adapters, prepare=None, doc=""):
    @bad(name, names, errors, doc or lambda_text(call))
    def build(s):
        model = model_fn()
        if prepare is not None:
            prepare(model)
        if isinstance(model, nn.Module):
            s.watch(model)
        return lambda: call(model)


model_bad("set_adapter_none", "names", lambda m: fastlora.set_adapter(m, None))
model_bad("set_adapter_empty_list", "names", lambda m: fastlora.set_adapter(m, []),
          doc="set_adapter(model, []): every adapter off, silently")  # fmt: skip
model_bad("set_adapter_unknown", "names", lambda m: fastlora.set_adapter(m, "nope"))
model_bad("set_adapter_partly_unknown", "names", lambda m: fastlora.set_adapter(m, ["other", "nope"]))
model_bad("set_adapter_int", "names", lambda m: fastlora.set_adapter(m, 5))
model_bad("set_adapter_nested_list", "names", lambda m: fastlora.set_adapter(m, [["other"]]))
model_bad("set_adapter_no_adapters", "names", lambda m: fastlora.set_adapter(m, "default"), model_fn=tiny)
model_bad("set_adapter_model_none", "model", lambda m: fastlora.set_adapter(m, "default"), model_fn=lambda: None)


@valid("set_adapter_tuple_of_two")
def _(s):
    """A tuple of two names: both active, their terms add up."""
    model = two_adapters()

    def call():
        fastlora.set_adapter(model, ("default", "other"))
        check_close(model(X()), with_adapters(model, X(), ["default", "other"]), "output")

    return call


@valid("set_adapter_duplicate_names")
def _(s):
    """["other", "other"] means "other" once: the output is that of "other" alone."""
    model = two_adapters()

    def call():
        fastlora.set_adapter(model, ["other", "other"])
        check_close(model(X()), with_adapters(model, X(), ["other"]), "output")

    return call


section("delete_adapter")

model_bad("delete_adapter_unknown", "name", lambda m: fastlora.delete_adapter(m, "nope"))
model_bad("delete_adapter_none", "name", lambda m: fastlora.delete_adapter(m, None))
model_bad("delete_adapter_int", "name", lambda m: fastlora.delete_adapter(m, 3))
model_bad("delete_adapter_list", "name", lambda m: fastlora.delete_adapter(m, ["other"]))
model_bad("delete_adapter_merged", "name", lambda m: fastlora.delete_adapter(m, "default"), prepare=lambda m: fastlora.merge(m))
model_bad("delete_adapter_model_none", "model", lambda m: fastlora.delete_adapter(m, "default"), model_fn=lambda: None)


@valid("delete_adapter_active")
def _(s):
    """Delete the active adapter (PEFT accepts it): "other" remains, and the output is that of whatever the
    layers now report active (nothing, or "other" as PEFT does)."""
    model = two_adapters()

    def call():
        fastlora.delete_adapter(model, "default")
        check(fastlora.list_adapters(model) == ["other"], str(fastlora.list_adapters(model)))
        active = {tuple(layer.active_adapters) for layer in lora_modules(model).values()}
        check(len(active) == 1 and set(next(iter(active))) <= {"other"}, f"active adapters {active}")
        check_close(model(X()), with_adapters(model, X(), list(next(iter(active)))), "output")

    return call


@valid("delete_adapter_only_one")
def _(s):
    """Delete the only adapter, then inject a new one under the same name."""
    model = lora_tiny()

    def call():
        fastlora.delete_adapter(model, "default")
        check(fastlora.list_adapters(model) == [], str(fastlora.list_adapters(model)))
        fastlora.inject(model, LINEARS, r=3)
        check({layer.r["default"] for layer in lora_modules(model).values()} == {3}, "ranks")

    return call


section("disable_adapters")

model_bad("disable_adapters_model_none", "model", lambda m: fastlora.disable_adapters(m).__enter__(), model_fn=lambda: None)


@valid("disable_adapters_nested_and_raising")
def _(s):
    """Nested blocks, the inner one left by an exception: adapters come back after both."""
    model = two_adapters()

    def call():
        expected = model(X()).detach()
        with fastlora.disable_adapters(model):
            with contextlib.suppress(KeyError), fastlora.disable_adapters(model):
                raise KeyError("inside")
            check_close(model(X()), with_adapters(model, X(), []), "base output inside the block")
        check_close(model(X()), expected, "output after the blocks")

    return call


@valid("disable_adapters_plain_model")
def _(s):
    model = tiny()

    def call():
        with fastlora.disable_adapters(model):
            model(X())

    return call


section("misc")

model_bad("list_adapters_none", "model", lambda m: fastlora.list_adapters(m), model_fn=lambda: None)
model_bad("trainable_parameters_none", "model", lambda m: fastlora.trainable_parameters(m), model_fn=lambda: None)


@valid("trainable_parameters_meta")
def _(s):
    def call():
        counts = fastlora.trainable_parameters(fastlora.inject(tiny("meta"), LINEARS, r=2))
        check(counts.trainable == (2 * 8 + 8 * 2) + (2 * 8 + 6 * 2), str(counts))  # q: A 2x8, B 8x2; v: A 2x8, B 6x2

    return call


# --- merge / unmerge / unload -------------------------------------------------------------------------

section("merge")

model_bad("merge_empty_list", "adapter_names", lambda m: fastlora.merge(m, []),
          doc="merge(model, []): merges every active adapter")  # fmt: skip
model_bad("merge_unknown", "adapter_names", lambda m: fastlora.merge(m, ["nope"]))
model_bad("merge_int", "adapter_names", lambda m: fastlora.merge(m, 5))
model_bad("merge_none_element", "adapter_names", lambda m: fastlora.merge(m, [None]))
model_bad("merge_safe_str", "safe", lambda m: fastlora.merge(m, safe="no"))
model_bad("merge_model_none", "model", lambda m: fastlora.merge(m), model_fn=lambda: None)


def _poison(model: nn.Module, layer_name: str, adapter: str = "default", value: float = float("inf")) -> None:
    with torch.no_grad():
        lora_modules(model)[layer_name].lora_B[adapter][0, 0] = value


model_bad("merge_safe_nonfinite_later_layer", ("safe", "merge", "non-finite"), lambda m: fastlora.merge(m, safe=True),
          prepare=lambda m: _poison(m, "v"), doc="merge(safe=True) where only v's merge overflows")  # fmt: skip


@valid("merge_none_is_active")
def _(s):
    """merge(model, None) folds the active adapter in: same output."""
    model = two_adapters()

    def call():
        expected = with_adapters(model, X(), ["default"])
        fastlora.merge(model, None)
        check(all(layer.merged_adapters == ["default"] for layer in lora_modules(model).values()), "merged lists")
        check_close(model(X()), expected, "output")

    return call


@valid("merge_twice")
def _(s):
    """merge twice: the second one has nothing left to do."""
    model = two_adapters()

    def call():
        expected = with_adapters(model, X(), ["default"])
        fastlora.merge(model)
        fastlora.merge(model)
        check_close(model(X()), expected, "output")

    return call


@valid("merge_safe_after_merge")
def _(s):
    """fp16 base: merge "default" (weights 0 + 40000, finite), then merge(safe=True) with "default" and
    "other" (B = 0) active: nothing overflows, "default" must not be counted twice (0 + 80000 = inf in fp16)."""
    model = tiny(dtype=torch.float16)
    for name in ("default", "other"):
        fastlora.inject(model, LINEARS, r=2, lora_alpha=4, adapter_name=name)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.weight.zero_()
            layer.lora_A["default"].fill_(1.0)
            layer.lora_B["default"].fill_(10000.0)  # scaling 2, r 2: delta 40000 per element
            layer.lora_B["other"].zero_()

    def call():
        fastlora.merge(model, ["default"])
        fastlora.set_adapter(model, ["default", "other"])
        fastlora.merge(model, safe=True)
        check(all(bool(torch.isfinite(layer.weight).all()) for layer in lora_modules(model).values()), "weights")

    return call


@valid("merge_string_is_one_name")
def _(s):
    """merge(model, "other"): one name, as set_adapter takes one (not the letters o, t, h, e, r)."""
    model = two_adapters()

    def call():
        expected = with_adapters(model, X(), ["default", "other"])
        fastlora.merge(model, "other")
        check(all(layer.merged_adapters == ["other"] for layer in lora_modules(model).values()), "merged lists")
        check_close(model(X()), expected, "output")

    return call


@valid("merge_inactive_adapter")
def _(s):
    """merge(["other"]) while "default" is active: the weight now holds "other"; the output has both."""
    model = two_adapters()

    def call():
        expected = with_adapters(model, X(), ["default", "other"])
        fastlora.merge(model, ["other"])
        check_close(model(X()), expected, "output")

    return call


@valid("merge_meta_model")
def _(s):
    def call():
        model = fastlora.inject(tiny("meta"), LINEARS, r=2)
        fastlora.merge(model)
        fastlora.unmerge(model)
        check(model(X(device="meta")).shape == (3, 4), "shape")

    return call


section("unmerge")

model_bad("unmerge_model_none", "model", lambda m: fastlora.unmerge(m), model_fn=lambda: None)


@valid("unmerge_bit_exact")
def _(s):
    """merge then unmerge gives the base weights back bit for bit (bf16 base)."""
    model = lora_tiny(("default", "other"))
    model.to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def call():
        fastlora.set_adapter(model, ["default", "other"])
        fastlora.merge(model)
        fastlora.unmerge(model)
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        check(not changed, f"changed: {changed}")

    return call


@valid("unmerge_nothing_merged")
def _(s):
    model = two_adapters()
    return lambda: fastlora.unmerge(model)


section("unload")

model_bad("unload_merge_str", "merge", lambda m: fastlora.unload(m, merge="no"),
          doc="unload(model, merge='no'): a truthy string")  # fmt: skip
model_bad("unload_merge_none", "merge", lambda m: fastlora.unload(m, merge=None))
model_bad("unload_model_none", "model", lambda m: fastlora.unload(m), model_fn=lambda: None)


@valid("unload_merge_true")
def _(s):
    model = two_adapters()

    def call():
        expected = with_adapters(model, X(), ["default"])
        plain = fastlora.unload(model, merge=True)
        check(not lora_modules(plain) and all(type(plain.get_submodule(n)) is nn.Linear for n in LINEARS), "types")
        check_close(plain(X()), expected, "output")

    return call


@valid("unload_merge_false_after_merge")
def _(s):
    """merge, then unload(merge=False): the base weights come back."""
    model = two_adapters()

    def call():
        expected = with_adapters(model, X(), [])
        fastlora.merge(model)
        check_close(fastlora.unload(model, merge=False)(X()), expected, "output")

    return call


@valid("unload_gpt2_conv1d")
def _(s):
    model = randomize_b(fastlora.inject(gpt2(), ["c_attn", "c_proj"], r=2))

    def call():
        expected = model(input_ids=ids()).logits.detach()
        plain = fastlora.unload(model)
        check(type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D", "type")
        check_close(plain(input_ids=ids()).logits, expected, "logits", rtol=1e-3, atol=1e-4)

    return call


@valid("unload_meta_model")
def _(s):
    def call():
        plain = fastlora.unload(fastlora.inject(tiny("meta"), LINEARS, r=2))
        check(plain(X(device="meta")).shape == (3, 4), "shape")

    return call


# --- combine ------------------------------------------------------------------------------------------

section("combine")


def combine_bad(name: str, names, weights, new_name="mix", errors=E, model_fn=two_adapters, prepare=None, doc="", **kwargs):
    model_bad(name, names, lambda m: fastlora.combine(m, weights, new_name, **kwargs), errors, model_fn, prepare,
              doc or call_repr("combine", MODEL, weights, new_name, **kwargs))  # fmt: skip


combine_bad("combine_weights_empty", "weights", {})
combine_bad("combine_weights_nan", "weights", {"default": float("nan"), "other": 0.5})
combine_bad("combine_weights_inf", "weights", {"default": float("inf")})
combine_bad("combine_weights_nan_svd", "weights", {"default": float("nan")}, method="svd")
combine_bad("combine_weights_str", "weights", {"default": "0.5"})
combine_bad("combine_weights_bool", "weights", {"default": True})
combine_bad("combine_weights_none_value", "weights", {"default": None})
combine_bad("combine_weights_list", "weights", ["default", "other"])
combine_bad("combine_weights_int", "weights", 5)
combine_bad("combine_weights_unknown", "weights", {"nope": 1.0})
combine_bad("combine_method_unknown", "method", {"default": 1.0}, method="sum")
combine_bad("combine_method_none", "method", {"default": 1.0}, method=None)
combine_bad("combine_svd_rank_true", "svd_rank", {"default": 1.0}, method="svd", svd_rank=True)
combine_bad("combine_svd_rank_negative", "svd_rank", {"default": 1.0}, method="svd", svd_rank=-1)
combine_bad("combine_svd_rank_zero", "svd_rank", {"default": 1.0}, method="svd", svd_rank=0)
combine_bad("combine_svd_rank_float", "svd_rank", {"default": 1.0}, method="svd", svd_rank=2.5)
combine_bad("combine_svd_rank_huge", "svd_rank", {"default": 1.0}, method="svd", svd_rank=10**6,
            doc="svd_rank=10**6 on 8 x 8 and 6 x 8 layers")  # fmt: skip
combine_bad("combine_svd_rank_negative_linear", "svd_rank", {"default": 1.0}, method="linear", svd_rank=-1)
combine_bad("combine_new_name_existing", "new_name", {"default": 1.0}, new_name="other")
combine_bad("combine_new_name_empty", "new_name", {"default": 1.0}, new_name="")
combine_bad("combine_new_name_dot", "new_name", {"default": 1.0}, new_name="a.b")
combine_bad("combine_new_name_none", "new_name", {"default": 1.0}, new_name=None)
combine_bad("combine_new_name_int", "new_name", {"default": 1.0}, new_name=7)
combine_bad("combine_linear_different_ranks", "method", {"default": 1.0, "r4": 1.0},
            model_fn=lambda: randomize_b(fastlora.inject(lora_tiny(), LINEARS, r=4, adapter_name="r4")))  # fmt: skip
combine_bad("combine_svd_fails_later_layer", ("v", "default", "svd"), {"default": 1.0}, method="svd",
            prepare=lambda m: _poison(m, "v", value=float("nan")), errors=E_RUNTIME,
            doc="combine(method='svd') where v's delta is non-finite: the SVD fails on the second layer")  # fmt: skip
combine_bad("combine_model_none", "model", {"default": 1.0}, model_fn=lambda: None)


def _cat_delta(model, layer_name, name):
    layer = lora_modules(model)[layer_name]
    return layer.scaling[name] * layer.lora_B[name].double() @ layer.lora_A[name].double()


def combine_valid(name: str, weights, method: str, exact: bool, model_fn=two_adapters, doc=""):
    @valid(name, doc or f"combine(model, {weights!r}, 'mix', method={method!r})")
    def build(s):
        model = model_fn()

        def call():
            fastlora.combine(model, weights, "mix", method=method)
            for layer_name, layer in lora_modules(model).items():
                check("mix" in layer.lora_A and "mix" not in layer.active_adapters, f"{layer_name}: adapters")
                delta = _cat_delta(model, layer_name, "mix")
                check_finite(delta, f"{layer_name}: combined delta")
                if exact:
                    expected = sum(w * _cat_delta(model, layer_name, n) for n, w in weights.items() if n in layer.lora_A)
                    check_close(delta, expected, f"{layer_name}: combined delta", rtol=1e-4, atol=1e-6)

        return call


combine_valid("combine_zero_weight_linear", {"default": 0.0, "other": 1.0}, "linear", exact=False)
combine_valid("combine_all_zero_svd", {"default": 0.0, "other": 0.0}, "svd", exact=True)
combine_valid("combine_zero_weight_cat", {"default": 0.0, "other": 2.0}, "cat", exact=True)
combine_valid("combine_negative_weight_cat", {"default": -1.5, "other": 0.5}, "cat", exact=True)
combine_valid("combine_negative_weight_linear", {"default": -1.5}, "linear", exact=False)
combine_valid("combine_svd_two_adapters", {"default": 1.0, "other": -2.0}, "svd", exact=False)
combine_valid("combine_cat_different_ranks", {"default": 1.0, "r4": 0.5}, "cat", exact=True,
              model_fn=lambda: randomize_b(fastlora.inject(lora_tiny(), LINEARS, r=4, adapter_name="r4")))  # fmt: skip
combine_valid("combine_negative_alpha_svd", {"neg": 1.0}, "svd", exact=True,
              model_fn=lambda: randomize_b(fastlora.inject(lora_tiny(), LINEARS, r=2, lora_alpha=-4, adapter_name="neg")))  # fmt: skip
combine_valid("combine_subset_of_layers", {"default": 1.0, "qonly": 1.0}, "cat", exact=True,
              model_fn=lambda: randomize_b(fastlora.inject(lora_tiny(), ["q"], r=2, adapter_name="qonly")))  # fmt: skip


@valid("combine_svd_rank_1")
def _(s):
    model = two_adapters()

    def call():
        fastlora.combine(model, {"default": 1.0, "other": 1.0}, "mix", method="svd", svd_rank=1)
        check({layer.r["mix"] for layer in lora_modules(model).values()} == {1}, "ranks")

    return call


# --- save_adapter -------------------------------------------------------------------------------------

section("save_adapter")


def save_bad(name: str, names, path_of: Callable[[Setup], Any], errors=E_PATH, model_fn=lora_tiny, doc="", **kwargs):
    @bad(name, names, errors, doc or call_repr("save_adapter", MODEL, Name(
        re.sub(r"\bs\.tmp\b", "tmp", lambda_text(path_of) or "a path to an existing file")), **kwargs))  # fmt: skip
    def build(s):
        model = model_fn()
        if isinstance(model, nn.Module):
            s.watch(model)
        path = path_of(s)
        if isinstance(path, Path):
            s.watch_path(path)
        return lambda: fastlora.save_adapter(model, path, **kwargs)


def _a_file(s: Setup) -> Path:
    path = s.tmp / "a_file"
    path.write_text("precious\n")
    return path


save_bad("save_unknown_adapter", "adapter_name", lambda s: s.tmp / "out", adapter_name="nope")
save_bad("save_adapter_name_none", "adapter_name", lambda s: s.tmp / "out", adapter_name=None)
save_bad("save_path_none", "path", lambda s: None)
save_bad("save_path_int", "path", lambda s: 5)
save_bad("save_path_is_file", ("path", "a_file"), _a_file)
save_bad("save_path_under_file", ("path", "a_file"), lambda s: _a_file(s) / "sub", doc="save_adapter(model, <existing file>/sub)")
save_bad("save_task_type_int", "task_type", lambda s: s.tmp / "out", task_type=5)
save_bad("save_model_none", "model", lambda s: s.tmp / "out", model_fn=lambda: None)


def _mixed_dropout():
    model = fastlora.inject(tiny(), ["q"], lora_dropout=0.1, adapter_name="a")
    return fastlora.inject(model, ["v"], lora_dropout=0.2, adapter_name="a")


save_bad("save_mixed_dropout", "lora_dropout", lambda s: s.tmp / "out", model_fn=_mixed_dropout, adapter_name="a",
         doc="one adapter with lora_dropout 0.1 on q and 0.2 on v: PEFT's format holds one value")  # fmt: skip


def _roundtrip(model: nn.Module, path: Path, base_fn=tiny, adapter_name="default", x=None) -> None:
    x = X() if x is None else x
    expected = model(x).detach()
    fastlora.save_adapter(model, path, adapter_name=adapter_name)
    other = fastlora.load_adapter(base_fn(), path, adapter_name=adapter_name)
    check_close(other(x), expected, "reloaded output")


@valid("save_into_nested_new_folder")
def _(s):
    return lambda: _roundtrip(lora_tiny(), s.tmp / "a" / "b" / "ü ñ")


@valid("save_into_existing_folder_with_files")
def _(s):
    path = s.dir("busy")
    (path / "README.md").write_text("other files stay\n")

    def call():
        _roundtrip(lora_tiny(), path)
        check((path / "README.md").read_text() == "other files stay\n", "README.md changed")

    return call


@valid("save_path_as_str")
def _(s):
    return lambda: _roundtrip(lora_tiny(), str(s.tmp / "as_str"))


@valid("save_merged_adapter")
def _(s):
    """A merged adapter saves like an unmerged one."""
    model = lora_tiny()
    fastlora.merge(model)
    return lambda: _roundtrip(model, s.tmp / "merged")


@valid("save_rank_and_alpha_patterns")
def _(s):
    model = randomize_b(fastlora.inject(tiny(), LINEARS, r=2, lora_alpha=4, rank_pattern={"v": 5}, alpha_pattern={"q": -3}, use_rslora=True))
    return lambda: _roundtrip(model, s.tmp / "patterns")


@valid("save_gpt2_roundtrip")
def _(s):
    model = randomize_b(fastlora.inject(gpt2(), ["c_attn", "c_fc"], r=2))
    model.eval()

    def call():
        expected = model(input_ids=ids()).logits.detach()
        fastlora.save_adapter(model, s.tmp / "gpt2")
        other = fastlora.load_adapter(gpt2(), s.tmp / "gpt2")
        check_close(other(input_ids=ids()).logits, expected, "logits")

    return call


# --- load_adapter -------------------------------------------------------------------------------------

section("load_adapter: config")

config_bad("config_peft_type_missing", "peft_type", drop=("peft_type",))
config_bad("config_peft_type_ia3", peft_type="IA3")
config_bad("config_peft_type_int", peft_type=5)
config_bad("config_r_missing", "r", drop=("r",))
config_bad("config_r_zero", r=0)
config_bad("config_r_negative", r=-2)
config_bad("config_r_bool", r=True)
config_bad("config_r_float", r=2.5)
config_bad("config_r_float_integral", r=2.0)
config_bad("config_r_str", r="2")
config_bad("config_r_null", r=None)
config_bad("config_r_list", r=[2])
config_bad("config_r_nan", r=float("nan"))
config_bad("config_r_huge", ("r", "lora_A", WEIGHTS), E_ALLOC + (FileNotFoundError,), r=10**12)
config_bad("config_alpha_missing", "lora_alpha", drop=("lora_alpha",))
config_bad("config_alpha_nan", lora_alpha=float("nan"))
config_bad("config_alpha_inf", lora_alpha=float("inf"))
config_bad("config_alpha_str", lora_alpha="4")
config_bad("config_alpha_bool", lora_alpha=True)
config_bad("config_alpha_null", lora_alpha=None)
config_bad("config_dropout_str_abc", lora_dropout="abc")
config_bad("config_dropout_str_number", lora_dropout="0.1")
config_bad("config_dropout_1", lora_dropout=1.0)
config_bad("config_dropout_negative", lora_dropout=-0.1)
config_bad("config_dropout_bool", lora_dropout=True)
config_bad("config_dropout_list", lora_dropout=[0.1])
config_bad("config_use_rslora_str_false", use_rslora="false")
config_bad("config_use_rslora_str_true", use_rslora="true")
config_bad("config_use_rslora_int", use_rslora=2)
config_bad("config_target_modules_missing", "target_modules", drop=("target_modules",))
config_bad("config_target_modules_null", target_modules=None)
config_bad("config_target_modules_int", target_modules=5)
config_bad("config_target_modules_empty", target_modules=[])
config_bad("config_target_modules_invalid_regex", target_modules="q(")
config_bad("config_target_modules_no_match", target_modules=["nope"])
config_bad("config_target_modules_list_of_int", target_modules=[1])
config_bad("config_target_modules_dict", target_modules={"q": 1, "v": 1})
config_bad("config_exclude_modules_int", exclude_modules=5)
config_bad("config_exclude_modules_invalid_regex", exclude_modules="(")
config_bad("config_exclude_modules_everything", ("exclude_modules", "target_modules"), exclude_modules=["q", "v"])
config_bad("config_rank_pattern_zero", rank_pattern={"v": 0})
config_bad("config_rank_pattern_str", rank_pattern={"v": "2"})
config_bad("config_rank_pattern_invalid_regex", rank_pattern={"(": 2})
config_bad("config_rank_pattern_list", rank_pattern=["v"])
config_bad("config_rank_pattern_str_whole", rank_pattern="v")
config_bad("config_rank_pattern_mismatch", ("rank_pattern", "lora_A", "lora_B", WEIGHTS), rank_pattern={"v": 3})
config_bad("config_alpha_pattern_nan", alpha_pattern={"v": float("nan")})
config_bad("config_alpha_pattern_str", alpha_pattern={"v": "x"})
config_bad("config_alpha_pattern_invalid_regex", alpha_pattern={"[": 2})
config_bad("config_alpha_pattern_int", alpha_pattern=5)
config_bad("config_modules_to_save_no_match", modules_to_save=["nope"])
config_bad("config_modules_to_save_int", modules_to_save=5)
config_bad("config_init_pissa", init_lora_weights="pissa")
config_bad("config_init_int", init_lora_weights=5)
config_bad("config_use_dora", use_dora=True)
config_bad("config_use_dora_str", use_dora="false")
config_bad("config_lora_bias", lora_bias=True)
config_bad("config_bias_all", bias="all")
config_bad("config_layers_to_transform", layers_to_transform=[0])
config_bad("config_unknown_key", foo_bar=1)
config_bad("config_fan_in_fan_out_str", fan_in_fan_out="yes")


def _overlap(path: Path) -> None:
    """modules_to_save=["q"] while q is a target, with q's weight and bias in the file as PEFT would write them."""
    edit_config(path, modules_to_save=["q"])
    base = tiny()

    def add(tensors):
        tensors[f"{PREFIX}q.weight"] = base.q.weight.detach().clone()
        tensors[f"{PREFIX}q.bias"] = base.q.bias.detach().clone()

    edit_tensors(path, add)


load_bad("config_modules_to_save_overlap", ("modules_to_save", "q"), _overlap,
         doc="modules_to_save=['q'] with q also in target_modules (tensors for both present)")  # fmt: skip

section("load_adapter: config file")

DEPTH = 100_000
config_raw("config_not_json", CONFIG, "{ not json")
config_raw("config_empty_file", CONFIG, "")
config_raw("config_not_utf8", CONFIG, b"\xff\xfe\x00garbage")
config_raw("config_json_list", CONFIG, "[1, 2]")
config_raw("config_json_null", CONFIG, "null")
config_raw("config_deeply_nested_list", CONFIG, "[" * DEPTH + "]" * DEPTH, doc=f"a JSON array nested {DEPTH} deep")
config_raw("config_deeply_nested_object", CONFIG, '{"a":' * DEPTH + "1" + "}" * DEPTH, doc=f"a JSON object nested {DEPTH} deep")
config_raw("config_deeply_nested_field", ("foo", CONFIG),
           '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q", "v"], "foo": ' + "[" * DEPTH + "]" * DEPTH + "}",
           doc="a valid config with an unknown key holding an array nested 100000 deep")  # fmt: skip
load_bad("config_is_directory", ("path", CONFIG), lambda p: ((p / CONFIG).unlink(), (p / CONFIG).mkdir()))
load_bad("config_missing", ("path", CONFIG), lambda p: (p / CONFIG).unlink())

section("load_adapter: weights file")


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: int(len(data) * keep)])


def _set(key_part: str, fn):
    def edit(tensors):
        for k in list(tensors):
            if key_part in k:
                tensors[k] = fn(tensors[k])

    return lambda p: edit_tensors(p, edit)


def _first(fn):
    """Apply fn to the first tensor only (by sorted key)."""

    def edit(tensors):
        k = sorted(tensors)[-1]
        tensors[k] = fn(tensors[k])

    return lambda p: edit_tensors(p, edit)


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[-1] = float("-inf")
    return t


load_bad("weights_truncated", WEIGHTS, _truncate, doc="adapter_model.safetensors cut to half its bytes")
load_bad("weights_header_only", WEIGHTS, lambda p: _truncate(p, 0.05))
load_bad("weights_empty_file", WEIGHTS, lambda p: (p / WEIGHTS).write_bytes(b""))
load_bad("weights_garbage", WEIGHTS, lambda p: (p / WEIGHTS).write_bytes(b"\x00" * 8 + b"{}{}{}{}" * 64))
load_bad("weights_huge_header_length", WEIGHTS, lambda p: (p / WEIGHTS).write_bytes((2**62).to_bytes(8, "little") + b"{}"))
load_bad("weights_int_tensors", ("lora_A", "lora_B", WEIGHTS), _set("lora_A", lambda t: (t * 10).to(torch.int32)),
         doc="every lora_A stored as int32")  # fmt: skip
load_bad("weights_bool_tensors", ("lora_A", "lora_B", WEIGHTS), _set("lora_B", lambda t: t > 0), doc="every lora_B stored as bool")
load_bad("weights_nan", ("lora_A", "lora_B", WEIGHTS, "NaN", "non-finite"), _first(_nan), doc="one NaN in v.lora_B")
load_bad("weights_inf", ("lora_A", "lora_B", WEIGHTS, "inf", "non-finite"), _first(_inf), doc="one -inf in v.lora_B")
load_bad("weights_extra_key", ("unexpected", WEIGHTS), lambda p: edit_tensors(p, lambda t: {**t, f"{PREFIX}out.lora_A.weight": torch.zeros(2, 6)}))
load_bad("weights_missing_key", ("missing", WEIGHTS), lambda p: edit_tensors(p, lambda t: {k: v for k, v in t.items() if "v.lora_B" not in k}))
load_bad("weights_wrong_shape", ("lora_A", WEIGHTS), _set("q.lora_A", lambda t: torch.zeros(2, 9)), doc="q.lora_A stored (2, 9) for (2, 8)")
load_bad("weights_transposed_b", ("lora_B", WEIGHTS), _set("v.lora_B", lambda t: t.t().contiguous()), doc="v.lora_B stored transposed")
load_bad("weights_keys_without_prefix", ("missing", "unexpected", WEIGHTS),
         lambda p: edit_tensors(p, lambda t: {k.removeprefix(PREFIX): v for k, v in t.items()}))  # fmt: skip
load_bad("weights_keys_with_adapter_name", ("missing", "unexpected", WEIGHTS),
         lambda p: edit_tensors(p, lambda t: {k.replace(".weight", ".default.weight"): v for k, v in t.items()}))  # fmt: skip
load_bad("weights_pickle_only", ("adapter_model.bin", WEIGHTS),
         lambda p: (torch.save(load_file(str(p / WEIGHTS)), p / "adapter_model.bin"), (p / WEIGHTS).unlink()))  # fmt: skip
load_bad("weights_missing", (WEIGHTS, "path"), lambda p: (p / WEIGHTS).unlink())
load_bad("weights_is_directory", (WEIGHTS, "path"), lambda p: ((p / WEIGHTS).unlink(), (p / WEIGHTS).mkdir()))

section("load_adapter: arguments")

load_bad("load_path_none", "path", lambda p: None, path_of=lambda p: None)
load_bad("load_path_int", "path", lambda p: None, path_of=lambda p: 5)
load_bad("load_path_bytes", "path", lambda p: None, path_of=lambda p: bytes(p))
load_bad("load_path_missing", "path", lambda p: None, path_of=lambda p: p.parent / "no_such_folder")
load_bad("load_path_is_file", "path", lambda p: None, path_of=lambda p: p / CONFIG)
load_bad("load_adapter_name_existing", "adapter_name", lambda p: None, model_fn=lora_tiny,
         doc="load_adapter into a model that already has an adapter 'default'")  # fmt: skip
load_bad("load_adapter_name_dot", "adapter_name", lambda p: None, adapter_name="a.b")
load_bad("load_adapter_name_empty", "adapter_name", lambda p: None, adapter_name="")
load_bad("load_adapter_name_none", "adapter_name", lambda p: None, adapter_name=None)
load_bad("load_adapter_name_int", "adapter_name", lambda p: None, adapter_name=5)
load_bad("load_model_none", "model", lambda p: None, model_fn=lambda: None, doc="load_adapter(None, folder)")
load_bad("load_other_architecture", ("target_modules",), lambda p: None, doc="load_adapter into a model with layers a, b (no q, v)",
         model_fn=lambda: nn.Sequential(OrderedDict(a=nn.Linear(8, 8), b=nn.Linear(8, 4))))  # fmt: skip
load_bad("load_wrong_layer_sizes", ("lora_A", "lora_B", WEIGHTS), lambda p: None, doc="load_adapter into a model whose q, v have other sizes",
         model_fn=lambda: nn.Sequential(OrderedDict(q=nn.Linear(8, 10), v=nn.Linear(10, 6))))  # fmt: skip


def load_valid(name: str, prepare: Callable[[Path], Any], expect: Callable[[nn.Module, nn.Module], None] | None = None, doc=""):
    """Save lora_tiny()'s adapter, change the folder with ``prepare``, load it into tiny(); by default the
    output must match the saved model's."""

    prepared = re.sub(r"\bp\b", "folder", lambda_text(prepare))

    @valid(name, doc or f"folder prepared by {prepared}; load_adapter(tiny(), folder)")
    def build(s):
        source = lora_tiny()
        path = saved(s, source)
        prepare(path)

        def call():
            loaded = fastlora.load_adapter(tiny(), path)
            if expect is None:
                check_close(loaded(X()), source(X()), "output")
            else:
                expect(loaded, source)

        return call


def _scalings(value):
    def expect(loaded, source):
        got = {layer.scaling["default"] for layer in lora_modules(loaded).values()}
        check(got == {value}, f"scaling {got}, expected {value}")
        check_finite(loaded(X()), "output")

    return expect


load_valid("load_fp16_tensors", _set("lora_", lambda t: t.half()),
           lambda loaded, source: check_close(loaded(X()), source(X()), "output", rtol=1e-2, atol=1e-3))  # fmt: skip
load_valid("load_bf16_and_fp64_tensors", lambda p: (_set("lora_A", lambda t: t.bfloat16())(p), _set("lora_B", lambda t: t.double())(p)),
           lambda loaded, source: check_close(loaded(X()), source(X()), "output", rtol=2e-2, atol=1e-2))  # fmt: skip
load_valid("load_no_metadata", lambda p: save_file(load_file(str(p / WEIGHTS)), str(p / WEIGHTS)))
load_valid("load_negative_alpha", lambda p: edit_config(p, lora_alpha=-4), _scalings(-2.0))
load_valid("load_zero_alpha", lambda p: edit_config(p, lora_alpha=0), _scalings(0.0))
load_valid("load_use_rslora", lambda p: edit_config(p, use_rslora=True), _scalings(4 / math.sqrt(2)))
load_valid("load_target_regex", lambda p: edit_config(p, target_modules="q|v"))
load_valid("load_minimal_config", lambda p: (p / CONFIG).write_text(json.dumps(
    {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q", "v"]})))  # fmt: skip
load_valid("load_unknown_key_falsy", lambda p: edit_config(p, some_future_option=None, another_one=False))


@valid("load_rank_above_features")
def _(s):
    """An adapter of rank 16 on 8 -> 8 and 8 -> 6 layers."""
    source = randomize_b(fastlora.inject(tiny(), LINEARS, r=16, lora_alpha=4))
    path = saved(s, source)
    return lambda: check_close(fastlora.load_adapter(tiny(), path)(X()), source(X()), "output")


@valid("load_second_adapter")
def _(s):
    """Load an adapter beside an existing one: both present, the loaded one active."""
    path = saved(s)
    model = lora_tiny(("first",))

    def call():
        fastlora.load_adapter(model, path)
        check(fastlora.list_adapters(model) == ["first", "default"], str(fastlora.list_adapters(model)))
        check_close(model(X()), lora_tiny()(X()), "output")

    return call


@valid("load_from_peft")
def _(s):
    """A folder written by PEFT's save_pretrained."""
    theirs = peft_tiny(use_rslora=True)
    theirs.save_pretrained(s.tmp / "peft")

    def call():
        ours = fastlora.load_adapter(tiny(), s.tmp / "peft")
        check_close(ours(X()), theirs(X()), "output")

    return call


@valid("load_meta_model")
def _(s):
    """Load into a model on the meta device (a dry run of the structure)."""
    path = saved(s)
    return lambda: check(fastlora.load_adapter(tiny("meta"), path)(X(device="meta")).shape == (3, 4), "shape")


# --- accelerate ---------------------------------------------------------------------------------------

section("accelerate")

model_bad("accelerate_none", ("peft_model", "model"), lambda m: fastlora.accelerate(m), model_fn=lambda: None)
model_bad("accelerate_str", ("peft_model", "model"), lambda m: fastlora.accelerate(m), model_fn=lambda: "model")
model_bad("accelerate_plain_model", ("peft_model", "PEFT"), lambda m: fastlora.accelerate(m), model_fn=tiny,
          doc="accelerate(nn.Sequential of Linear): no PEFT layer at all")  # fmt: skip
model_bad("accelerate_fastlora_model", ("peft_model", "PEFT"), lambda m: fastlora.accelerate(m), model_fn=lora_tiny,
          doc="accelerate(a model made by fastlora.inject)")  # fmt: skip


@valid("accelerate_peft_model")
def _(s):
    model = peft_tiny()
    expected = model(X()).detach()
    return lambda: check_close(fastlora.accelerate(model)(X()), expected, "output")


@valid("accelerate_twice")
def _(s):
    """An already accelerated model, accelerated again."""
    model = peft_tiny()
    expected = model(X()).detach()
    fastlora.accelerate(model)
    return lambda: check_close(fastlora.accelerate(model)(X()), expected, "output")


@valid("accelerate_dora")
def _(s):
    """DoRA layers run fused (fastlora.dora_linear); the output is PEFT's."""
    model = peft_tiny(use_dora=True)
    expected = model(X()).detach()

    def call():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = fastlora.accelerate(model)(X())
        check_close(y, expected, "output")

    return call


# --- the runner ---------------------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised in a case that runs past the limit (BaseException so that no `except Exception` eats it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def handler(signum, frame):
        raise CaseTimeout(f"ran past {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _names_in(message: str, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message)]


def _type_ok(exc: BaseException, allowed: tuple[type[BaseException], ...]) -> bool:
    return isinstance(exc, allowed) and not isinstance(exc, DENIED)


def _message(exc: BaseException) -> str:
    return str(exc) if not isinstance(exc, KeyError) else f"KeyError {exc}"


@dataclass
class Result:
    name: str
    api: str
    kind: str
    cls: str
    doc: str
    exception: str | None = None
    message: str | None = None
    expected_names: list[str] = field(default_factory=list)
    names_found: list[str] = field(default_factory=list)
    type_ok: bool | None = None
    changes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    where: str | None = None  # the innermost frame of the exception, file:line function


def _where(exc: BaseException) -> str | None:
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return None
    frame = tb[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"


def _global_state() -> dict[str, Any]:
    return {"selected": selected(), "env": os.environ.get("FASTLORA_BACKEND"), "dtype": torch.get_default_dtype(),
            "grad": torch.is_grad_enabled()}  # fmt: skip


def _restore(state: dict[str, Any]) -> None:
    if hasattr(backends, "_selected"):
        backends._selected = state["selected"]
    if state["env"] is None:
        os.environ.pop("FASTLORA_BACKEND", None)
    else:
        os.environ["FASTLORA_BACKEND"] = state["env"]
    torch.set_default_dtype(state["dtype"])
    torch.set_grad_enabled(state["grad"])


def run_case(case: Case, timeout: float) -> Result:
    result = Result(case.name, case.api, case.kind, "?", case.doc, expected_names=list(case.names))
    state = _global_state()
    tmp = Path(tempfile.mkdtemp(prefix="sweep_"))
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            s = Setup(tmp)
            try:
                with time_limit(timeout):
                    thunk = case.build(s)
                    before = snapshot(s.watched) if s.watched else None
                    values_before = {k: read() for k, read in s.values.items()}
            except BaseException as exc:  # noqa: BLE001 - the sweep's own fault, reported as such
                if isinstance(exc, KeyboardInterrupt):
                    raise
                result.cls = "harness error"
                result.exception, result.message = type(exc).__name__, _message(exc)
                result.where = "".join(traceback.format_exception(exc)[-3:])
                return result
            error: BaseException | None = None
            try:
                with time_limit(timeout):
                    thunk()
            except (Exception, CaseTimeout) as exc:  # noqa: BLE001
                error = exc
            changes: list[str] = []
            if case.kind == "bad":
                try:
                    if before is not None:
                        changes += diff(s.watched, before)
                    for key, read in s.values.items():
                        now = read()
                        if now != values_before[key]:
                            changes.append(f"{key}: {values_before[key]!r} -> {now!r}")
                except Exception as exc:  # noqa: BLE001 - a model left unreadable has changed
                    changes.append(f"the state could not be read back: {type(exc).__name__}: {exc}")
            result.changes = changes
            if error is not None:
                result.exception = type(error).__name__ if not isinstance(error, CaseTimeout) else "Timeout"
                result.message = _message(error)
                result.where = _where(error)
            if case.kind == "valid":
                result.cls = "ok" if error is None else "valid failing"
            elif error is None:
                result.cls = "silently accepted"
            else:
                result.type_ok = _type_ok(error, case.errors) and not isinstance(error, CaseTimeout)
                result.names_found = _names_in(result.message or "", case.names)
                if changes:
                    result.cls = "changed after error"
                elif result.type_ok and result.names_found:
                    result.cls = "clear error"
                else:
                    result.cls = "unclear error"
            return result
    finally:
        result.seconds = time.perf_counter() - start
        _restore(state)
        shutil.rmtree(tmp, ignore_errors=True)


def _git_rev() -> str | None:
    src = Path(fastlora.__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "fastlora"], capture_output=True,
                               text=True, timeout=10).stdout.strip()  # fmt: skip
        return out.stdout.strip() + (" (fastlora/ modified)" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _excerpt(text: str | None, n: int = 150) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 3] + "..."


def report(results: list[Result], verbose: bool) -> str:
    lines = []
    bad = [r for r in results if r.kind == "bad"]
    good = [r for r in results if r.kind == "valid"]
    lines.append(f"fastlora from {Path(fastlora.__file__).resolve().parent} (git {_git_rev() or 'unknown'})")
    lines.append(f"{len(results)} cases: {len(bad)} bad inputs (must raise), {len(good)} extreme-but-valid (must succeed)")
    lines.append("")
    lines.append(f"{'class':<24}{'cases':>6}")
    for cls in CLASSES_BAD:
        lines.append(f"{'bad: ' + cls:<24}{sum(r.cls == cls for r in bad):>6}")
    for cls in CLASSES_VALID:
        lines.append(f"{'valid: ' + cls:<24}{sum(r.cls == cls for r in good):>6}")
    harness = [r for r in results if r.cls == "harness error"]
    if harness:
        lines.append(f"{'harness error':<24}{len(harness):>6}")
    for cls in ("changed after error", "silently accepted", "unclear error", "valid failing", "harness error", "clear error", "ok"):
        group = [r for r in results if r.cls == cls]
        if not group or (cls in ("clear error", "ok") and not verbose):
            continue
        lines.append("")
        lines.append(f"== {cls} ({len(group)}) ==")
        for r in group:
            head = f"{r.name} [{r.api}]"
            if r.exception:
                head += f": {r.exception}: {_excerpt(r.message)}"
            lines.append(head)
            if cls == "unclear error" and r.exception and r.exception != "Timeout":
                why = []
                if not r.type_ok:
                    why.append(f"type {r.exception}")
                if not r.names_found:
                    why.append(f"names none of {r.expected_names}")
                lines.append(f"    why unclear: {'; '.join(why)}" + (f" (raised at {r.where})" if r.where else ""))
            if cls == "silently accepted" and r.doc:
                lines.append(f"    case: {_excerpt(r.doc, 140)}")
            if r.changes:
                shown = r.changes if verbose else r.changes[:3]
                for change in shown:
                    lines.append(f"    changed: {_excerpt(change, 140)}")
                if len(r.changes) > len(shown):
                    lines.append(f"    ... {len(r.changes) - len(shown)} more changes")
            if cls == "harness error" and r.where:
                lines.append("    " + r.where.replace("\n", "\n    "))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write result.json to this folder")
    parser.add_argument("--verbose", action="store_true", help="list every case, every change")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case (default 60)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1 lets the triton backend run on the CPU; the triton backend cases will not "
              "measure what they are meant to", file=sys.stderr)  # fmt: skip
    torch.set_num_threads(1)
    cases = [c for c in CASES if not args.only or args.only in c.name]
    results = []
    start = time.perf_counter()
    for i, case in enumerate(cases):
        result = run_case(case, args.timeout)
        results.append(result)
        if args.verbose:
            print(f"[{i + 1}/{len(cases)}] {case.name}: {result.cls} ({result.seconds:.2f} s)", file=sys.stderr)
    text = report(results, args.verbose)
    print(text)
    print(f"\n({time.perf_counter() - start:.1f} s)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        counts = {f"bad: {c}": sum(r.kind == "bad" and r.cls == c for r in results) for c in CLASSES_BAD}
        counts |= {f"valid: {c}": sum(r.kind == "valid" and r.cls == c for r in results) for c in CLASSES_VALID}
        counts["harness error"] = sum(r.cls == "harness error" for r in results)
        payload = {
            "fastlora": str(Path(fastlora.__file__).resolve().parent),
            "git": _git_rev(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cases": len(results),
            "counts": counts,
            "results": [vars(r) | {"class": r.cls} for r in results],
        }
        for r in payload["results"]:
            r.pop("cls")
        (args.out / "result.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
