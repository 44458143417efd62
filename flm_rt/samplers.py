"""The FMLM (two-time flow map) and FLM (one-time Euler) samplers of SPEC section 4.

Both samplers are written as a *plan*: for each step the network times and three float64 coefficients
(a, b, c) such that the state update is one fused operation,

    z_{i+1} = a * z_i + b * P(f(z_i, ...)) + c * eps_i          (P = softmax of the 30-soft-capped logits)

FMLM, step i < n-1 (s = stochasticity, g_i = gamma(i/n), sig = 1 - g_{i+1}, sig~ = sig sqrt(1 - s^2),
g~ = 1 - sig~): expanding z~ = (1-g~)/(1-g_i) z_i + (g~-g_i)/(1-g_i) D and z_{i+1} = z~ + (sig~-sig) D + s sig eps
gives a = (1-g~)/(1-g_i), b = (g~-g_i)/(1-g_i) + (sig~-sig), c = s sig. The network is called at
(tau_i, alpha(g~)).
FLM, step i < n-1: h = (g_{i+1}-g_i)/(1-g_i+1e-5), a = 1-h, b = h, c = 0; the network is called at tau_i.
The last step of either sampler sets z_n = D, whose argmax over V is the output (see ``output_ids``).

Gaussian draws are consumed in SPEC order: z_0, then eps_0, eps_1, ... only for steps with c != 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from . import nvtx, ops, tracing
from .errors import GenerationError
from .limits import MAX_STEPS, brief, env_switch
from .model import Denoiser, softcap_logits
from .schedule import alpha_of_gamma, gamma_grid
from .spec import FLM_EULER_EPS, LOGIT_SOFTCAP


@dataclass(frozen=True)
class SamplerStep:
    t: float                  # network time tau_i
    t_prime: Optional[float]  # second network time (two-time models), else None
    a: float
    b: float
    c: float
    last: bool

    @property
    def uses_draw(self) -> bool:
        return not self.last and self.c != 0.0


class SamplerSettingsError(GenerationError):
    """Invalid steps or stochasticity (raised by :func:`check_settings`, for every entry point); ``param`` names
    which."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_settings(*, two_time: bool, steps, stochasticity) -> tuple[int, float]:
    """``(steps, stochasticity)`` checked for a model of this kind: steps an int in [1, MAX_STEPS], stochasticity
    a number in [0, 1] and 0 for one-time (FLM) models. The one place these rules live: generate, export, the
    CUDA graphs and the server all plan through :func:`make_plan` or call this first."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise SamplerSettingsError("steps", f"steps must be an int >= 1 and <= {MAX_STEPS}, got {brief(steps)}")
    s = stochasticity
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:  # NaN fails too
        raise SamplerSettingsError("stochasticity", f"stochasticity must be a number in [0, 1], got {brief(s)}")
    if not two_time and s != 0.0:
        raise SamplerSettingsError("stochasticity",
                                   "stochasticity applies to two-time (FMLM) models only; this is an FLM model")
    return steps, float(s)


def make_plan(*, two_time: bool, steps: int, stochasticity: float, vocab_size: int) -> tuple[SamplerStep, ...]:
    """The per-step times and coefficients for `steps` steps (checked by :func:`check_settings`); see the module
    docstring."""
    steps, s = check_settings(two_time=two_time, steps=steps, stochasticity=stochasticity)
    g = gamma_grid(steps, vocab_size)
    plan = []
    for i in range(steps):
        t = i / steps
        last = i == steps - 1
        if two_time:
            sig = 1.0 - g[i + 1]
            sig_t = sig * (1.0 - s * s) ** 0.5
            g_t = 1.0 - sig_t
            t_prime = float(alpha_of_gamma(g_t, vocab_size))
            if last:
                a, b, c = 0.0, 1.0, 0.0
            else:
                a = (1.0 - g_t) / (1.0 - g[i])
                b = (g_t - g[i]) / (1.0 - g[i]) + (sig_t - sig)
                c = s * sig
            plan.append(SamplerStep(t, t_prime, a, b, c, last))
        else:
            if last:
                a, b, c = 0.0, 1.0, 0.0
            else:
                h = (g[i + 1] - g[i]) / (1.0 - g[i] + FLM_EULER_EPS)
                a, b, c = 1.0 - h, h, 0.0
            plan.append(SamplerStep(t, None, a, b, c, last))
    return tuple(plan)


def draws_needed(plan: Sequence[SamplerStep]) -> int:
    return 1 + sum(st.uses_draw for st in plan)


def output_ids(logits: torch.Tensor, *, kernels: Optional[str] = None) -> torch.Tensor:
    """argmax_v of the last step's D = P(logits): token ids [B, L] (int64). Overwrites ``logits``.

    The 30-soft-cap is strictly increasing, so mathematically its argmax is the raw logits' argmax (SPEC 2.6).
    fp32 logits: the argmax is taken over them directly, which skips a tanh pass over [B, L, V] and the ties that
    rounding tanh to fp32 would add (the SPEC allows a runtime to be more precise than the reference here).
    bf16/fp16 logits: they are capped first (in place), as the reference does at that precision, so that its
    ties, frequent in 8 mantissa bits, resolve the same way (first index).
    """
    if logits.dtype != torch.float32:
        logits = softcap_logits(logits, LOGIT_SOFTCAP, inplace=True)
    ids, _ = ops.vocab_argmax(logits, backend=kernels)
    return ids


def fused_vocab_pass(fused: Optional[bool] = None) -> bool:
    """Whether run_plan uses the fused vocabulary pass: ``fused``, else env ``FLM_RT_FUSED_VOCAB`` (default 1)."""
    return bool(fused) if fused is not None else env_switch("FLM_RT_FUSED_VOCAB")


def _projection(denoiser: Denoiser, y: torch.Tensor):
    lin = denoiser.output_layer.linear
    return y.to(lin.weight.dtype), lin.weight, lin.bias  # (the cast autocast applies to the Linear's input)


def fused_output_ids(denoiser: Denoiser, y: torch.Tensor, *, kernels: Optional[str] = None) -> torch.Tensor:
    """``output_ids`` of the logits y @ W^T + b, through ``ops.vocab_pass_argmax`` (no [B, L, V] tensor), with
    output_ids' rule: fp32 logits uncapped, low-precision logits capped in their dtype."""
    y, w, b = _projection(denoiser, y)
    cap = 0.0 if w.dtype == torch.float32 else LOGIT_SOFTCAP
    ids, _ = ops.vocab_pass_argmax(y, w, b, cap, backend=kernels)
    return ids


def fused_softmax_embed(denoiser: Denoiser, y: torch.Tensor, *, kernels: Optional[str] = None) -> torch.Tensor:
    """P @ E (fp32 [B, L, D]) for the logits y @ W^T + b, through ``ops.vocab_pass_embed`` (online softmax)."""
    y, w, b = _projection(denoiser, y)
    return ops.vocab_pass_embed(y, w, b, denoiser.vocab_embed.embedding, LOGIT_SOFTCAP, backend=kernels)


SPACES = ("vocab", "embedding")


def run_plan(
    denoiser: Denoiser,
    plan: Sequence[SamplerStep],
    draw: Callable[[int], torch.Tensor],
    *,
    kernels: Optional[str] = None,
    space: str = "vocab",
    fused: Optional[bool] = None,
    coefficients: Optional[torch.Tensor] = None,
    on_step: Optional[Callable[[int], None]] = None,
    callback: Optional[Callable[[int, float, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Run the sampler; returns token ids [B, L] (int64, on the state's device).

    The one sampler loop: ``generate`` runs it eagerly, :mod:`flm_rt.cuda_graphs` captures it, and the exported
    generate graph (:class:`flm_rt.exporting.graphs.GenerateGraph`) is a trace of it. What differs between them
    are the arguments:

    draw(j): the j-th Gaussian draw in SPEC order (j = 0 is z_0). A seeded eager call draws from per-sample
    generators, an exported graph indexes its noise input, a captured graph draws from generators registered
    with the graph.
    space="vocab": the SPEC's process. The state z lives in R^V; draw(j) returns fp32 [B, L, V]; each update is
    one fused ``ops.flow_map_step`` pass.
    space="embedding": the same process observed through the embedding. The network sees z only as h = z @ E,
    and every update is linear in z, so h_{i+1} = a h_i + b (P_i @ E) + c (eps_i @ E) evolves on its own and
    the V-space state is never formed. draw(j) must then return eps_j @ E, i.e. draws of N(0, E^T E) [B, L, D].
    The final argmax needs only the logits. Same distribution of outputs, fewer FLOPs and bytes.
    kernels: the op backend ("auto" | "torch" | "ext"; None: env FLM_RT_KERNELS). Exported graphs use "torch".
    fused (default: env FLM_RT_FUSED_VOCAB, on): the last step's argmax and the embedding-space P @ E run as one
    pass over vocabulary chunks with the output projection (``ops.vocab_pass_*``), so no [B, L, V] logits exist
    there; vocabulary-space updates need the logits and are unchanged. Exported graphs pass False.
    coefficients: float32 [len(plan), 3] rows (a, b, c) on the state's device (an exported graph's buffer);
    default: filled on the device at each step (no host-to-device copy, so a CUDA graph can capture the loop).
    on_step(i): after step i. callback(i, t, ids): after step i with t = (i+1)/n and the argmax ids [B, L] (int64,
    CPU) of the state (V-space) or of the prediction (embedding space, whose state is not in R^V); the output ids at
    the last step. The argmax is computed only when a callback is given.
    Under a graph capturer every update writes a new tensor; eagerly, updates after the first write in place.
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    x = draw(0)
    forward = denoiser if space == "vocab" else denoiser.forward_embedded
    features = denoiser.features if space == "vocab" else denoiser.features_embedded
    fused = fused_vocab_pass(fused)
    in_place = not tracing.is_capturing()
    used = 1
    for i, st in enumerate(plan):
        t = torch.full_like(x[:, 0, 0], st.t, dtype=torch.float32)  # [B], batch size taken from the tensor
        tp = None if st.t_prime is None else torch.full_like(t, st.t_prime)
        if fused and (st.last or space == "embedding"):
            y, logits = features(x, t, tp), None
        else:
            y, logits = None, forward(x, t, tp)
        if st.last:
            with nvtx.range("argmax"):
                ids = output_ids(logits, kernels=kernels) if y is None else fused_output_ids(denoiser, y, kernels=kernels)
            if on_step is not None:
                on_step(i)
            if callback is not None:
                callback(i, 1.0, ids.to("cpu", torch.int64))
            return ids
        eps = None
        if st.uses_draw:
            eps = draw(used)
            used += 1
        with nvtx.range("flow_map_step"):
            if space == "vocab":
                if coefficients is not None:
                    coef = coefficients[i]
                else:
                    coef = torch.empty(3, dtype=torch.float32, device=x.device)
                    coef[0], coef[1], coef[2] = st.a, st.b, st.c
                # The first update writes a new tensor (draw(0) may be the caller's noise); later ones reuse it.
                step = ops.flow_map_step_ if (i > 0 and in_place) else ops.flow_map_step
                x = step(x, logits, coef[0:1], coef[1:2], coef[2:3], eps, LOGIT_SOFTCAP, backend=kernels)
            else:
                if y is not None:
                    pe = fused_softmax_embed(denoiser, y, kernels=kernels)
                else:
                    p = torch.softmax(softcap_logits(logits.float(), LOGIT_SOFTCAP, inplace=True), dim=-1)
                    pe = denoiser.vocab_embed(p)  # the network's own embedding product (fp32; prepacked on CPU)
                x = torch.add(st.a * x, pe, alpha=st.b)
                if eps is not None:
                    x = x + st.c * eps
        if on_step is not None:
            on_step(i)
        if callback is not None:
            if space == "vocab":
                now = ops.vocab_argmax(x, backend=kernels)[0]
            else:  # the prediction's ids (the embedding-space state has no vocabulary dimension)
                now = ops.vocab_argmax(logits, backend=kernels)[0] if y is None else fused_output_ids(
                    denoiser, y, kernels=kernels)
            callback(i, (i + 1) / len(plan), now.to("cpu", torch.int64))
    raise AssertionError("a plan always ends with a last step")
