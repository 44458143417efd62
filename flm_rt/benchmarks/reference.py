"""The upstream sampler's computation, written the way the research code does it: a *baseline*, not a runtime.

This re-implements (from SPEC.md, not copied) what a user of the reference code runs to sample from an FMLM/FLM
checkpoint, so that the benchmark can compare flm_rt against it on the same weights and the same Gaussian draws:

- the state lives in V-space, fp32, [B, L, V];
- the embedding is an fp32 matmul ``x @ E`` of the dense state (autocast off);
- the time conditioning is fp32; the blocks and the output layer run under ``torch.autocast`` (bf16 by default on
  GPU; off, i.e. fp32, on CPU unless asked), with LayerNorm in fp32 and the weights kept in fp32 (autocast casts
  them on every call, as in the research code);
- attention is plain PyTorch: q.k^T / sqrt(d), soft-capped ``50 tanh(s / 50)``, softmax, @ v (the research code
  calls flash-attention with a soft-cap on GPU; plain PyTorch is what runs without it, and what produced the
  golden vectors on CPU);
- logits are soft-capped ``30 tanh(z / 30)``, then ``log_softmax``, then ``.exp()``: probabilities in the logits'
  dtype;
- the FMLM update is written as the two separate expressions of SPEC section 4 (z~, then z_{i+1}), FLM as the
  Euler update; the output is the argmax over the final probabilities.

It uses none of flm_rt.ops, flm_rt.samplers or flm_rt.model (only the weights of a loaded Model, the SPEC's
constants from flm_rt.spec and the float64 time schedule of flm_rt.schedule, which the reference evaluates once
per step with splines), and nothing beyond
``torch.no_grad``. When ``flm_rt.nvtx`` is enabled (``flm-rt profile --reference``) it marks the same named ranges
as flm_rt (embedding, block{i}, output_layer; "flow_map_step" = soft-cap + log_softmax + exp + the unfused
update, "argmax" = soft-cap + log_softmax + exp + argmax at the last step), so the two profiles compare directly.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .. import nvtx
from ..schedule import alpha_of_gamma, gamma_of_alpha
from ..spec import ATTN_SOFTCAP, FLM_EULER_EPS, LOGIT_SOFTCAP, ROTARY_BASE, TIME_FREQ_BASE

__all__ = ["ReferenceDenoiser", "reference_generate", "draws_needed"]


class ReferenceDenoiser:
    """f(x, t[, t']) as in the research code, over a plain dict of fp32 weights (published key names)."""

    def __init__(self, state_dict: dict, *, n_heads: int, autocast_dtype: Optional[torch.dtype] = None):
        self.w = {k: v.detach().float() for k, v in state_dict.items()}  # no copy when already fp32
        self.n_heads = n_heads
        self.n_blocks = 1 + max(int(k.split(".")[1]) for k in self.w if k.startswith("blocks."))
        self.two_time = "sigma_map_prime.mlp.0.weight" in self.w
        self.autocast_dtype = autocast_dtype

    # -- pieces, research-code style ------------------------------------------------------------------------
    def _timestep_embedding(self, t: torch.Tensor, prefix: str) -> torch.Tensor:
        half = 128
        freqs = torch.exp(-math.log(TIME_FREQ_BASE) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        h = F.linear(emb, self.w[f"{prefix}.mlp.0.weight"], self.w[f"{prefix}.mlp.0.bias"])
        h = F.silu(h)
        return F.linear(h, self.w[f"{prefix}.mlp.2.weight"], self.w[f"{prefix}.mlp.2.bias"])

    @staticmethod
    def _layer_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(x.float(), [x.shape[-1]])
        return x * weight[None, None, :]

    @staticmethod
    def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        d2 = x.shape[-1] // 2
        x1, x2 = x[..., :d2], x[..., d2:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def _block(self, i: int, x, c, cos, sin):
        w = self.w
        p = f"blocks.{i}."
        b, s, d = x.shape
        h = self.n_heads
        mod = F.linear(c, w[p + "adaLN_modulation.weight"], w[p + "adaLN_modulation.bias"])[:, None, :]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=2)

        x_skip = x
        x = self._layer_norm(x, w[p + "norm1.weight"])
        x = x * (1 + scale_msa) + shift_msa
        qkv = F.linear(x, w[p + "attn_qkv.weight"])
        qkv = qkv.view(b, s, 3, h, d // h)
        with torch.autocast(device_type=x.device.type, enabled=False):
            cos_, sin_ = cos.to(qkv.dtype)[None, :, None, :], sin.to(qkv.dtype)[None, :, None, :]
            q = self._rotary(qkv[:, :, 0], cos_, sin_)
            k = self._rotary(qkv[:, :, 1], cos_, sin_)
        v = qkv[:, :, 2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # b h s d
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d // h)
        scores = ATTN_SOFTCAP * torch.tanh(scores / ATTN_SOFTCAP)
        attn = torch.softmax(scores, dim=-1)
        o = torch.matmul(attn.to(v.dtype), v)
        o = o.transpose(1, 2).reshape(b, s, d)
        x = x_skip + gate_msa * F.linear(o, w[p + "attn_out.weight"])

        x_skip = x
        x = self._layer_norm(x, w[p + "norm2.weight"])
        x = x * (1 + scale_mlp) + shift_mlp
        x = F.linear(x, w[p + "mlp.0.weight"], w[p + "mlp.0.bias"])
        x = F.gelu(x, approximate="tanh")
        x = F.linear(x, w[p + "mlp.2.weight"], w[p + "mlp.2.bias"])
        return x_skip + gate_mlp * x

    def _output_layer(self, x, c):
        w = self.w
        shift, scale = F.linear(c, w["output_layer.adaLN_modulation.weight"],
                                w["output_layer.adaLN_modulation.bias"])[:, None, :].chunk(2, dim=2)
        x = self._layer_norm(x, w["output_layer.norm_final.weight"])
        x = x * (1 + scale) + shift
        return F.linear(x, w["output_layer.linear.weight"], w["output_layer.linear.bias"])

    def __call__(self, x: torch.Tensor, t: torch.Tensor, t_prime: Optional[torch.Tensor] = None) -> torch.Tensor:
        with nvtx.range("embedding"), torch.autocast(device_type=x.device.type, enabled=False):
            h = x @ self.w["vocab_embed.embedding"]  # fp32 embedding of the dense V-space state
        with nvtx.range("conditioning"):
            c = self._timestep_embedding(t, "sigma_map")
            if self.two_time:
                c = c + self._timestep_embedding(t_prime, "sigma_map_prime")
            c = F.silu(c)
        seq = h.shape[1]
        inv_freq = self.w.get("rotary_emb.inv_freq")
        if inv_freq is None:
            dh = h.shape[-1] // self.n_heads
            inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, dh, 2, device=h.device).float() / dh))
        freqs = torch.einsum("i,j->ij", torch.arange(seq, device=h.device).float(), inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        with torch.autocast(device_type=h.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            for i in range(self.n_blocks):
                with nvtx.range(f"block{i}"):
                    h = self._block(i, h, c, cos, sin)
            with nvtx.range("output_layer"):
                return self._output_layer(h, c)


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def reference_denoiser(model, autocast_dtype: Optional[torch.dtype] = None) -> ReferenceDenoiser:
    """The reference network over ``model``'s weights (fp32 copies when the model stores bf16/fp16)."""
    key = model.denoiser
    cached = _CACHE.get(key)
    if cached is None:
        cached = ReferenceDenoiser(model.denoiser.state_dict(), n_heads=model.config.n_heads)
        _CACHE[key] = cached
    cached.autocast_dtype = autocast_dtype
    return cached


def draws_needed(two_time: bool, steps: int, stochasticity: float) -> int:
    """z_0 plus one draw per non-final FMLM step when s > 0."""
    return 1 + (steps - 1 if (two_time and stochasticity > 0) else 0)


def _process_logits(logits: torch.Tensor) -> torch.Tensor:
    logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.exp()


def reference_generate(model, noise: Union[torch.Tensor, torch.Generator], steps: int, stochasticity: float = 0.0,
                       *, autocast_dtype: Union[torch.dtype, str, None] = "auto", batch: Optional[int] = None,
                       seq_len: Optional[int] = None) -> torch.Tensor:
    """Sample token ids [B, L] the research-code way.

    ``noise``: a float tensor [S, B, L, V] of standard-normal draws consumed in SPEC order (z_0, eps_0, ...), or
    a ``torch.Generator`` from which the draws are taken with ``torch.randn`` inside the loop, as the research
    code does (then ``batch``, and optionally ``seq_len``, give the shape).
    ``autocast_dtype``: "auto" = bf16 autocast on CUDA and none (fp32) elsewhere; None = fp32; or a dtype.
    """
    cfg = model.config
    dev = model.device
    if isinstance(autocast_dtype, str):
        autocast_dtype = torch.bfloat16 if dev.type == "cuda" else None
    if autocast_dtype == torch.float32:
        autocast_dtype = None
    net = reference_denoiser(model, autocast_dtype)
    two_time = net.two_time
    s = float(stochasticity)
    k = cfg.vocab_size

    if isinstance(noise, torch.Generator):
        gen = noise
        shape = (int(batch), int(seq_len or cfg.length), k)

        def draw(j):
            return torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32).to(dev)
    else:
        need = draws_needed(two_time, steps, s)
        if noise.shape[0] < need:
            raise ValueError(f"noise holds {noise.shape[0]} draws, {need} needed")

        def draw(j):
            return noise[j].to(device=dev, dtype=torch.float32)

    with torch.no_grad():
        z = draw(0)
        b = z.shape[0]
        used = 1
        taus = torch.arange(steps + 1, dtype=torch.float64) / steps
        gammas = gamma_of_alpha(taus, k)
        for i in range(steps):
            g_i, g_next = float(gammas[i]), float(gammas[i + 1])
            t = torch.full((b,), float(taus[i]), device=dev)
            if two_time:
                sig = 1.0 - g_next
                sig_tilde = sig * math.sqrt(1.0 - s ** 2)
                g_tilde = 1.0 - sig_tilde
                t_tilde = torch.full((b,), float(alpha_of_gamma(g_tilde, k)), device=dev)
                logits = net(z, t, t_tilde)
                if i == steps - 1:
                    with nvtx.range("argmax"):
                        return _process_logits(logits).argmax(dim=-1)  # z_n = D; argmax over it
                with nvtx.range("flow_map_step"):
                    probs = _process_logits(logits)
                    z_tilde = (1 - g_tilde) / (1 - g_i) * z + (g_tilde - g_i) / (1 - g_i) * probs
                    z = z_tilde + (sig_tilde - sig) * probs
                    if s > 0:
                        z = z + s * sig * draw(used)
                        used += 1
            else:
                logits = net(z, t)
                if i == steps - 1:
                    with nvtx.range("argmax"):
                        return _process_logits(logits).argmax(dim=-1)
                with nvtx.range("flow_map_step"):
                    probs = _process_logits(logits)
                    z = z + (g_next - g_i) * (probs - z) / (1 - g_i + FLM_EULER_EPS)
        raise AssertionError("unreachable: the last step returns")
