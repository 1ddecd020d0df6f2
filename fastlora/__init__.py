"""fastlora: LoRA layers whose low-rank path is fused into the base GEMM, forward and backward."""

from fastlora.backends import BACKEND_NAMES, set_backend, use_backend
from fastlora.env import info
from fastlora.functional import lora_linear
from fastlora.layers import LoRALinear

__version__ = "0.1.0"

__all__ = ["BACKEND_NAMES", "LoRALinear", "info", "lora_linear", "set_backend", "use_backend", "__version__"]
