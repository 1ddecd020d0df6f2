"""fastlora: LoRA layers whose low-rank path is fused into the base GEMM, forward and backward."""

from fastlora.backends import BACKEND_NAMES, set_backend, use_backend
from fastlora.dora import dora_linear
from fastlora.env import info
from fastlora.functional import lora_linear, lora_linear_multi
from fastlora.grouping import RowGrouping, group_rows
from fastlora.io import load_adapter, save_adapter
from fastlora.layers import LoRALinear
from fastlora.mixed_batch import adapter_names
from fastlora.model import (
    combine,
    delete_adapter,
    disable_adapters,
    inject,
    list_adapters,
    merge,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from fastlora.peft_compat import accelerate
from fastlora.quantized import NF4Linear, from_bnb, quantize, to_bnb
from fastlora.tuning import load_tuning, save_tuning
from fastlora.variants import LoRAConv, LoRAEmbedding

__version__ = "0.1.0"



__all__ = [
    "BACKEND_NAMES",
    "LoRAConv",
    "LoRAEmbedding",
    "LoRALinear",
    "NF4Linear",
    "__version__",
    "accelerate",
    "adapter_names",
    "combine",
    "delete_adapter",
    "dora_linear",
    "disable_adapters",
    "info",
    "inject",
    "list_adapters",
    "load_adapter",
    "load_tuning",
    "lora_linear",
    "lora_linear_multi",
    "group_rows",
    "RowGrouping",
    "merge",
    "quantize",
    "from_bnb",
    "to_bnb",
    "save_adapter",
    "save_tuning",
    "set_adapter",
    "set_backend",
    "trainable_parameters",
    "unload",
    "unmerge",
    "use_backend",
]
