"""The modules that get exported: the whole sampler (``GenerateGraph``) and one network call (``DenoiserGraph``).

``GenerateGraph`` is not a second sampler: its forward runs :func:`flm_rt.samplers.run_plan`, the loop every path
runs, with the draws taken from its noise input (or drawn inside the graph), the plan's coefficients as a buffer,
the reference ops (``kernels="torch"``) and no fused vocabulary pass, so that the exporters see plain tensor ops.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..model import softcap_logits
from ..samplers import draws_needed, run_plan
from ..spec import LOGIT_SOFTCAP


def _noise_check_ts(noise: torch.Tensor, draws: int, length: int, vocab: int, batch: int) -> torch.Tensor:
    # Compiled with torch.jit.script (below) so that the checks survive torch.jit.trace of the wrapper.
    if noise.dim() != 4:
        raise RuntimeError("flm_rt generate graph: noise must be [S, B, L, V] = [" + str(draws) + ", B, "
                           + str(length) + ", " + str(vocab) + "], got a " + str(noise.dim()) + "-d tensor")
    if noise.size(0) != draws or noise.size(2) != length or noise.size(3) != vocab:
        raise RuntimeError("flm_rt generate graph: noise must be [S, B, L, V] = [" + str(draws) + ", B, "
                           + str(length) + ", " + str(vocab) + "], got " + str(noise.size()))
    if batch > 0 and noise.size(1) != batch:
        raise RuntimeError("flm_rt generate graph: this graph was exported for batch " + str(batch)
                           + ", got " + str(noise.size(1)))
    if noise.size(1) < 1:
        raise RuntimeError("flm_rt generate graph: empty batch")
    return noise


def _denoiser_check_ts(x: torch.Tensor, t: torch.Tensor, length: int, vocab: int) -> torch.Tensor:
    if x.dim() != 3 or x.size(1) != length or x.size(2) != vocab:
        raise RuntimeError("flm_rt denoiser graph: x must be [B, " + str(length) + ", " + str(vocab) + "], got "
                           + str(x.size()))
    if t.dim() != 1 or t.size(0) != x.size(0):
        raise RuntimeError("flm_rt denoiser graph: t must be [B] with B = " + str(x.size(0)) + ", got "
                           + str(t.size()))
    return x


_SCRIPTED: dict = {}


def _scripted(fn):
    """torch.jit.script(fn), compiled lazily and once (TorchScript is only needed for that format)."""
    if fn.__name__ not in _SCRIPTED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _SCRIPTED[fn.__name__] = torch.jit.script(fn)
    return _SCRIPTED[fn.__name__]


class GenerateGraph(nn.Module):
    """The sampler unrolled over a plan: ``forward(noise [S, B, L, V]) -> ids [B, L]`` (int64), or with
    ``self_noise`` ``forward(batch_like [B]) -> ids``, drawing inside the graph."""

    def __init__(self, denoiser: nn.Module, plan, *, vocab_size: int, length: int, batch: Optional[int] = None,
                 self_noise: bool = False):
        super().__init__()
        self.denoiser = denoiser
        self.plan = tuple(plan)
        self.draws = draws_needed(self.plan)
        self.vocab_size = int(vocab_size)
        self.length = int(length)
        self.batch = int(batch) if batch else 0
        self.self_noise = bool(self_noise)
        # float32, as run_plan fills them on the device, so the graphs reproduce generate() bit for bit
        self.register_buffer("coefficients", torch.tensor([[st.a, st.b, st.c] for st in self.plan],
                                                          dtype=torch.float32).reshape(len(self.plan), 3))

    def _draws(self, x: torch.Tensor) -> torch.Tensor:
        if not self.self_noise:
            if torch.jit.is_tracing():
                _scripted(_noise_check_ts)(x, self.draws, self.length, self.vocab_size, self.batch)
            else:
                torch._check(x.dim() == 4, lambda: "noise must be [S, B, L, V]")
                torch._check(x.shape[0] == self.draws, lambda: f"noise must hold S={self.draws} draws")
                torch._check(x.shape[2] == self.length, lambda: f"noise must have L={self.length}")
                torch._check(x.shape[3] == self.vocab_size, lambda: f"noise must have V={self.vocab_size}")
            return x
        b = self.batch if self.batch else x.shape[0]
        return torch.randn((self.draws, b, self.length, self.vocab_size), dtype=torch.float32, device=x.device)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        noise = self._draws(noise)
        return run_plan(self.denoiser, self.plan, noise.__getitem__, kernels="torch", fused=False,
                        coefficients=self.coefficients)


class DenoiserGraph(nn.Module):
    """One network call returning the 30-soft-capped logits (the model's distribution is their softmax)."""

    def __init__(self, denoiser: nn.Module, *, vocab_size: int, length: int, two_time: bool):
        super().__init__()
        self.denoiser = denoiser
        self.vocab_size, self.length, self.two_time = int(vocab_size), int(length), bool(two_time)

    def _check(self, x, t):
        if torch.jit.is_tracing():
            _scripted(_denoiser_check_ts)(x, t, self.length, self.vocab_size)
        else:
            torch._check(x.shape[-1] == self.vocab_size, lambda: f"x must have V={self.vocab_size}")
            torch._check(x.shape[-2] == self.length, lambda: f"x must have L={self.length}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, t_prime: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check(x, t)
        return softcap_logits(self.denoiser(x, t, t_prime if self.two_time else None).float(), LOGIT_SOFTCAP)


class TorchScriptFacade(nn.Module):
    """What gets traced: forward, plus the same graph under a meaningful name: generate(noise) for the sampler,
    denoise(x, t[, t_prime]) for the denoiser."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)

    def generate(self, noise):
        return self.inner(noise)

    def denoise(self, *args):
        return self.inner(*args)
