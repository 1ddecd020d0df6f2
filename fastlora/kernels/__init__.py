"""Triton kernels, one file per fused operation, each with its launcher.

- ``dropout.py``: the Philox keep-mask every kernel regenerates in registers (and a kernel that writes it
  out, for tests).
- ``lora_shrink.py``: S = x̂·Aᵀ (forward) and dA = dSᵀ·x̂ (its backward).
- ``lora_expand.py``: dS = s·G·B and dB = s·Gᵀ·S in one pass over G (the backward of S·Bᵀ).
- ``lora_linear.py``: the GEMMs with the rank-r term in their accumulator: Y = x·Wᵀ + b + s·S·Bᵀ and
  dX = G·W + (dS·A) ⊙ m / (1 − p); on sm_90 a persistent TMA main loop, elsewhere (and for inputs TMA
  cannot take) a pointer one.

Launchers check layouts and shapes and allocate outputs; kernels assume only what the launchers checked.
Importing this package imports triton; nothing here touches a GPU at import time.
"""
