"""The numbers SPEC.md fixes, each stated once. Every other module imports them from here."""
from __future__ import annotations

import torch

LOGIT_SOFTCAP = 30.0   # D = softmax(30 tanh(f / 30)) (SPEC 2, item 6)
ATTN_SOFTCAP = 50.0    # attention scores 50 tanh(q.k / sqrt(d) / 50) (SPEC 2, item 4)
TIME_FREQ_DIM = 256    # sinusoidal time features fed to the time MLP (SPEC 2, item 2)
TIME_FREQ_BASE = 10000.0  # their frequencies w_i = exp(-ln(base) i / (dim / 2))
ROTARY_BASE = 10000.0  # rotary embedding base (SPEC 2, item 3)
LAYER_NORM_EPS = 1e-5  # SPEC 2, item 4
FLM_EULER_EPS = 1e-5   # FLM Euler step h = (g_{i+1} - g_i) / (1 - g_i + eps) (SPEC 4, FLM)


def rotary_inv_freq(head_dim: int, base: float = ROTARY_BASE) -> torch.Tensor:
    """The rotary buffer ``inv_freq`` [head_dim / 2] (fp32): base^(-2i / head_dim)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
