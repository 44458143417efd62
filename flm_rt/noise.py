"""Where a generation's Gaussian draws come from: explicit noise, a generator, or a seed.

``generate`` takes at most one of ``noise`` (the draws themselves, [S, B, L, V]), ``generator`` (one for the
batch, or one per sample) and ``seed``. :func:`draws_for` checks that choice against the model and the plan and
returns a :class:`Draws`: the batch size and length it implies, and a ``draw(j)`` function for the sampler loop
(:func:`flm_rt.samplers.run_plan`), j = 0 for z_0, then one per stochastic step.

Seeded draws are per sample: sample k of ``seed=s`` comes from a generator seeded with ``sample_seed(s, k)``, so
a sample does not depend on the batch it runs in (the server merges requests this way, and the CUDA graphs
replay the same draws). In embedding space (``space="embedding"``) every draw is mapped to eps @ E: explicit
noise by the product itself, generated draws as u @ C^T with C C^T = E^T E, u ~ N(0, I_D).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from . import ops
from .errors import GenerationError
from .limits import MAX_SAMPLES, MAX_SEED, brief

Draw = Callable[[int], torch.Tensor]
_M64 = 2**64 - 1


def sample_seed(seed: int, k: int) -> int:
    """Seed of sample k's private generator: its draws depend on (seed, k) only, not on the batch size.
    splitmix64 of seed + (k+1) * golden ratio: a bijection of [0, 2^64) for each k, so distinct seeds give
    distinct generator seeds, and every bit of the seed reaches the low 32 bits (all that PyTorch's CPU
    mt19937 uses)."""
    z = (seed + (k + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def seeded_draw(gens: list, shape: tuple, device: torch.device,
                finish: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Draw:
    """draw(j): one standard-normal draw [B, ...] with row k taken from ``gens[k]`` (then ``finish``, e.g. the
    embedding-space factor). The eager seeded path and the CUDA graphs both draw through this function. Row k is
    ``torch.randn(shape[1:], generator=gens[k])`` bit for bit (:func:`flm_rt.ops.normal_`)."""

    def draw(j: int) -> torch.Tensor:
        out = torch.empty(shape, device=device)
        for k, g in enumerate(gens):
            ops.normal_(out[k], g)
        return finish(out) if finish is not None else out

    return draw


def draw_layout(model, batch: int, length: int, space: str) -> tuple[tuple, Optional[Callable]]:
    """(shape, finish) of one generated draw: [B, L, V] used as drawn in vocabulary space; [B, L, D] mapped by
    u -> u @ C^T (C C^T = E^T E, so the result is distributed as eps @ E) in embedding space."""
    cfg = model.config
    if space != "embedding":
        return (batch, length, cfg.vocab_size), None
    factor = model.embedded_noise_factor()  # computed once per model, on the CPU (before any CUDA-graph capture)

    def finish(u: torch.Tensor) -> torch.Tensor:
        return u @ factor.T

    return (batch, length, cfg.hidden_size), finish


def check_int(name: str, v, lo: int = 1, hi: Optional[int] = None) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        bound = f" and <= {hi}" if hi is not None else ""
        raise GenerationError(f"{name} must be an int >= {lo}{bound}, got {brief(v)}")


@dataclass
class Draws:
    """The draws of one generate call. ``draw`` is None for a seeded call: :meth:`eager` makes the per-sample
    generators, unless a CUDA graph replays ``seed`` instead."""
    batch: int
    length: int
    seed: Optional[int]
    draw: Optional[Draw] = None
    generators: Optional[list] = None         # per-sample generators given by the caller
    shape: tuple = ()                         # one draw's shape [B, L, V or D]
    finish: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def seeded(self) -> bool:
        """Drawn from ``seed`` alone (what a captured CUDA graph can replay)."""
        return self.draw is None and self.generators is None

    def eager(self, device: torch.device) -> Draw:
        if self.draw is not None:
            return self.draw
        gens = self.generators or [torch.Generator(device=device).manual_seed(sample_seed(self.seed, k))
                                   for k in range(self.batch)]
        return seeded_draw(gens, self.shape, device, self.finish)


def draws_for(model, need: int, *, noise: Optional[torch.Tensor] = None, seed: Optional[int] = None,
              generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
              num_samples: Optional[int] = 1, seq_len: Optional[int] = None, space: str = "vocab",
              plan_name: str = "the plan") -> Draws:
    """Check the source of the draws against ``model`` (an :class:`flm_rt.Model`) and a plan (``plan_name``, for
    messages) that consumes ``need`` draws; GenerationError names what is wrong."""
    if sum(x is not None for x in (seed, generator, noise)) > 1:
        raise GenerationError("give at most one of seed, generator and noise")
    cfg, dev = model.config, model.device
    embedded = space == "embedding"
    if noise is not None:
        b, length = _check_noise(noise, cfg, need, num_samples, seq_len, plan_name)

        def draw(j: int) -> torch.Tensor:
            x = noise[j].to(device=dev, dtype=torch.float32)
            return x @ model.denoiser.vocab_embed.embedding.float() if embedded else x
        return Draws(b, length, None, draw=draw)

    per_sample = isinstance(generator, (list, tuple))
    if per_sample:
        if not generator or not all(isinstance(g, torch.Generator) for g in generator):
            raise GenerationError("generator must be a torch.Generator or a non-empty list of them")
        if num_samples not in (1, len(generator)):
            raise GenerationError(f"num_samples={num_samples} disagrees with the {len(generator)} generators")
        if any(g.device.type != dev.type for g in generator):
            raise GenerationError(f"per-sample generators must be on the model's device ({dev})")
        num_samples = len(generator)
    check_int("num_samples", num_samples, 1, MAX_SAMPLES)
    length = cfg.length if seq_len is None else seq_len
    check_int("seq_len", length, 1, cfg.length)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise GenerationError(f"seed must be an int in [0, 2^64), got {brief(seed)}")
    shape, finish = draw_layout(model, num_samples, length, space)
    if generator is not None and not per_sample:
        if not isinstance(generator, torch.Generator):
            raise GenerationError(f"generator must be a torch.Generator, got {type(generator).__name__}")

        def draw(j: int) -> torch.Tensor:
            u = ops.normal_(torch.empty(shape, device=generator.device), generator).to(dev)
            return finish(u) if finish is not None else u
        return Draws(num_samples, length, None, draw=draw)
    if seed is None and not per_sample:
        seed = int.from_bytes(os.urandom(7), "little")
    return Draws(num_samples, length, seed, generators=list(generator) if per_sample else None, shape=shape,
                 finish=finish)


def _check_noise(noise, cfg, need: int, num_samples, seq_len, plan_name: str) -> tuple[int, int]:
    """(batch, length) of explicit draws [S, B, L, V], after checking them against the model and the plan."""
    if not isinstance(noise, torch.Tensor) or noise.dim() != 4:
        raise GenerationError(f"noise must be a float tensor [S, B, L, V], got "
                              f"{type(noise).__name__}{list(noise.shape) if isinstance(noise, torch.Tensor) else ''}")
    if noise.device.type == "meta":
        raise GenerationError("noise is a meta tensor (no data); pass real draws")
    if not noise.is_floating_point():
        raise GenerationError(f"noise must be floating point (standard-normal draws), got {noise.dtype}")
    s_, b_, l_, v_ = noise.shape
    if v_ != cfg.vocab_size:
        raise GenerationError(f"noise has V={v_} but the model's vocabulary is {cfg.vocab_size}")
    if l_ < 1 or l_ > cfg.length:
        raise GenerationError(f"noise has L={l_}; it must be between 1 and the trained length {cfg.length}")
    if b_ < 1:
        raise GenerationError("noise has an empty batch dimension")
    if s_ < need:
        raise GenerationError(f"noise holds {s_} draws but {plan_name} need {need} (z_0 plus one per stochastic step)")
    if num_samples not in (1, b_) and num_samples is not None:
        raise GenerationError(f"num_samples={num_samples} disagrees with the noise batch size {b_}")
    if seq_len is not None and seq_len != l_:
        raise GenerationError(f"seq_len={seq_len} disagrees with the noise length {l_}")
    # A finite sum proves every draw finite (one cheap pass); only a non-finite sum needs the exact check.
    if not bool(torch.isfinite(noise[:need].sum())) and not bool(torch.isfinite(noise[:need]).all()):
        raise GenerationError("noise contains NaN or infinite values")
    return b_, l_
