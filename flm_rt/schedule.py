"""Time reparameterisation between network time tau ("alpha-time") and the interpolation coefficient gamma.

    x_gamma = (1 - gamma) * noise + gamma * onehot
    alpha(gamma) = K/(K-1) * (q(gamma) - 1/K),   q(gamma) = E_{z~N(0,1)}[Phi(z + gamma/(1-gamma))^(K-1)]

q is the probability that the correct token is the argmax of x_gamma. alpha is evaluated with 100-node
Gauss-Hermite quadrature in float64 (SPEC section 3); gamma(tau) is its inverse, found by bisection in float64
(alpha is strictly increasing on [0, 1]). Everything here is float64 and depends on K only.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

_QUAD_NODES = 100
_BISECT_ITERS = 80  # interval [0, 1] halves 80 times: far below float64 resolution


@functools.lru_cache(maxsize=None)
def _hermite_rule() -> tuple[torch.Tensor, torch.Tensor]:
    # Nodes/weights for E_{z~N(0,1)}[f(z)] = sum_i w_i f(z_i).
    x, w = np.polynomial.hermite.hermgauss(_QUAD_NODES)
    z = torch.tensor(x * math.sqrt(2.0), dtype=torch.float64)
    w = torch.tensor(w / math.sqrt(math.pi), dtype=torch.float64)
    return z, w


def _check_k(vocab_size: int) -> int:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 2:
        raise ValueError(f"vocabulary size must be an int >= 2, got {vocab_size!r}")
    return vocab_size


def alpha_of_gamma(gamma, vocab_size: int) -> torch.Tensor:
    """alpha(gamma) for vocabulary size K, elementwise, float64. gamma is clipped to [0, 1]."""
    k = _check_k(vocab_size)
    g = torch.as_tensor(gamma, dtype=torch.float64).clamp(0.0, 1.0)
    z, w = _hermite_rule()
    flat = g.reshape(-1)
    interior = flat < 1.0
    shift = torch.where(interior, flat / torch.where(interior, 1.0 - flat, 1.0), torch.zeros_like(flat))
    log_phi = torch.special.log_ndtr(z[None, :] + shift[:, None])
    q = (w[None, :] * torch.exp((k - 1) * log_phi)).sum(-1)
    # No special case at gamma = 0: like the reference, the quadrature value is used there too (it is within
    # ~2e-7 of 0 for large K) and the result is clipped to [0, 1].
    alpha = ((k / (k - 1)) * (q - 1.0 / k)).clamp(0.0, 1.0)
    alpha = torch.where(interior, alpha, torch.ones_like(alpha))
    return alpha.reshape(g.shape)


def gamma_of_alpha(tau, vocab_size: int) -> torch.Tensor:
    """gamma(tau): the inverse of alpha_of_gamma, elementwise, float64, by bisection. tau clipped to [0, 1]."""
    k = _check_k(vocab_size)
    t = torch.as_tensor(tau, dtype=torch.float64).clamp(0.0, 1.0)
    flat = t.reshape(-1)
    lo = torch.zeros_like(flat)
    hi = torch.ones_like(flat)
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        below = alpha_of_gamma(mid, k) < flat
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    g = 0.5 * (lo + hi)
    g = torch.where(flat <= 0.0, torch.zeros_like(g), g)
    g = torch.where(flat >= 1.0, torch.ones_like(g), g)
    return g.reshape(t.shape)


@functools.lru_cache(maxsize=256)
def gamma_grid(steps: int, vocab_size: int) -> tuple[float, ...]:
    """(gamma(tau_0), ..., gamma(tau_n)) for the uniform grid tau_i = i / n, as Python floats."""
    taus = torch.arange(steps + 1, dtype=torch.float64) / steps
    return tuple(float(v) for v in gamma_of_alpha(taus, vocab_size))
