"""The FLM / FMLM denoiser f(x, t[, t']) of SPEC section 2, one definition for every size.

Read top to bottom: config -> time embedding -> rotary -> attention with soft-capped scores -> block -> output
layer -> denoiser. Parameter names equal the published state-dict keys (without the ``backbone.`` prefix), so a
checkpoint loads with a plain ``load_state_dict``.

Precision: everything is written so that running it inside ``torch.autocast(dtype=torch.bfloat16)`` reproduces
the reference's mixed precision (embedding in fp32, matmuls in bf16, LayerNorm in fp32, residual stream in fp32).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import nvtx, ops, prepack, tracing
from .limits import brief
from .spec import (ATTN_SOFTCAP, LAYER_NORM_EPS, LOGIT_SOFTCAP, ROTARY_BASE, TIME_FREQ_BASE, TIME_FREQ_DIM,
                   rotary_inv_freq)


@dataclass
class ModelConfig:
    vocab_size: int
    length: int
    hidden_size: int = 768
    n_blocks: int = 12
    n_heads: int = 12
    cond_dim: int = 128
    two_time: bool = True
    # Not architecture, but travels with a checkpoint:
    tokenizer: Optional[str] = None  # "gpt2" | "bert-base-uncased" | None (unknown: ids only)
    default_stochasticity: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("vocab_size", "length", "hidden_size", "n_blocks", "n_heads", "cond_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {brief(v)}")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        if (self.hidden_size // self.n_heads) % 2:
            raise ValueError(f"head size {self.hidden_size // self.n_heads} must be even for rotary embeddings")
        s = self.default_stochasticity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:
            raise ValueError(f"default_stochasticity must be a number in [0, 1], got {brief(s)}")
        if not isinstance(self.two_time, bool):
            raise ValueError(f"ModelConfig.two_time must be true or false, got {brief(self.two_time)}")
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            raise ValueError(f"ModelConfig.tokenizer must be a string or null, got {type(self.tokenizer).__name__}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"ModelConfig.extra must be a mapping, got {type(self.extra).__name__}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


# Named architectures for random-weight models (benchmarks, profiling): the published LM1B and OWT networks, and a
# tiny one for smoke runs.
PRESET_SHAPES = {
    "tiny": dict(vocab_size=1000, length=32, hidden_size=64, n_blocks=2, n_heads=4, cond_dim=32),
    "lm1b": dict(vocab_size=30522, length=128, hidden_size=768, n_blocks=12, n_heads=12, cond_dim=128),
    "owt": dict(vocab_size=50258, length=1024, hidden_size=768, n_blocks=12, n_heads=12, cond_dim=128),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    """The two-time ModelConfig of a named shape in PRESET_SHAPES."""
    if name not in PRESET_SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(PRESET_SHAPES)}")
    return ModelConfig(**{"two_time": True, **PRESET_SHAPES[name], **overrides})


def timestep_features(t: torch.Tensor, dim: int = TIME_FREQ_DIM) -> torch.Tensor:
    """[B] -> [B, dim] sinusoidal features, cos first, w_i = exp(-ln(10000) i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(TIME_FREQ_BASE) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = ROTARY_BASE):
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(head_dim, base))

    def cos_sin(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(seq_len, dtype=torch.float32, device=device)
        angles = pos[:, None] * self.inv_freq.float()[None, :]  # [L, d/2]
        return torch.cos(angles), torch.sin(angles)


def split_heads(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int):
    """A block's qkv [B, L, 3D] -> q, k (with the rotary embedding of ``ops.rotary_reference``, halves
    convention), v, each [B, H, L, d]; in CPU inference one pass of ``ops.rotary_split`` (the same bits)."""
    if _cpu_op(qkv, "rotary_split"):
        return ops.rotary_split(qkv, cos, sin, n_heads).unbind(0)
    return ops.rotary_heads(qkv, cos, sin, n_heads)


class LayerNorm(nn.Module):
    """Mean/variance normalisation over D in fp32 (eps LAYER_NORM_EPS, no bias), then a learned scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fp32(lambda: F.layer_norm(x.float(), [self.dim], weight=self.weight.float(),
                                        eps=LAYER_NORM_EPS), x)


def _fp32(fn, like: torch.Tensor) -> torch.Tensor:
    """Run fn with autocast off (only entered when autocast is on, so exporters see plain ops)."""
    if torch.is_autocast_enabled(like.device.type):
        with torch.autocast(device_type=like.device.type, enabled=False):
            return fn()
    return fn()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x * (1 + scale) + shift in the dtype of x (1 + scale in the dtype of scale), returned as ``dtype`` (default:
    x's): the dtype of the Linear that reads it, so that under bf16 autocast the cast happens in the same pass."""
    s1 = 1 + scale
    if (dtype not in (None, x.dtype) or s1.dtype != x.dtype) and _cpu_op(x, "scaled_add"):
        return ops.scaled_add(shift, x, s1, dtype or x.dtype)
    out = torch.addcmul(shift.to(x.dtype), x, s1.to(x.dtype))
    return out if dtype is None else out.to(dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y in the dtype of x (the fp32 residual stream).

    Under bf16 autocast gate and y are bf16: they are upcast (exactly), which gives the values of the promoted
    mixed-dtype op at the speed of a plain fp32 one (ATen's mixed-dtype elementwise path is ~10x slower on CPU);
    in CPU inference ``ops.scaled_add`` does it in one pass. The same holds for ``modulate``. (Where every operand
    is x's dtype there is nothing to save: ATen's addcmul.)"""
    if (y.dtype != x.dtype or gate.dtype != x.dtype) and _cpu_op(x, "scaled_add"):
        return ops.scaled_add(x, y, gate, x.dtype)
    return torch.addcmul(x, gate.to(x.dtype), y.to(x.dtype))


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear applied to x computes in: the autocast dtype where autocast is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bidirectional attention with scores 50 * tanh(q.k / sqrt(d) / 50). q, k, v [B, H, L, d].

    ``workspace``: an fp32 [B, H, L, L] buffer for the scores and probabilities (fp32 CPU inference only; see
    ``Denoiser._body``). Every step then runs in place in it, so no block allocates (and page-faults) a fresh
    score matrix: at L = 1024 that halves the attention time again. In CPU inference the scores (fp32, bf16 or
    fp16) are capped and normalised by one in-place pass of ``ops.softcap_softmax_`` (float32 math; in fp32 within
    1e-5 relative of ATen's tanh and softmax, golden ids unchanged)."""
    scores = torch.matmul(q, k.transpose(-2, -1), out=workspace)
    scale = 1.0 / (math.sqrt(q.shape[-1]) * ATTN_SOFTCAP)
    if _fused_softmax(scores):
        # On the CPU one in-place pass in float32 (flm_rt.ops.softcap_softmax_) instead of four ATen passes (and,
        # in bf16/fp16, the capping in 8-bit arithmetic and the fp32 round trip around the softmax).
        return torch.matmul(ops.softcap_softmax_(scores, scale, ATTN_SOFTCAP), v)
    if scores.requires_grad:  # tanh's backward reads its output: no in-place cap after it
        scores = torch.tanh(scores * scale) * ATTN_SOFTCAP
    else:
        scores = scores.mul_(scale).tanh_().mul_(ATTN_SOFTCAP)
    if workspace is None:
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    else:
        probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    return torch.matmul(probs, v)


def _fused_softmax(scores: torch.Tensor) -> bool:
    """Whether softcapped_attention caps and normalises ``scores`` with ``ops.softcap_softmax_`` (CPU inference)."""
    return _cpu_op(scores, "softcap_softmax_")


def _cpu_op(x: torch.Tensor, op: str) -> bool:
    """x on the CPU outside autograd and graph capture, with the compiled ``op``: use the fused kernel."""
    return (x.device.type == "cpu" and not x.requires_grad and not tracing.is_capturing()
            and ops.kernels_backend("cpu", x.dtype, op) == "ext")


# softcapped_attention's signature: (q, k, v, workspace or None) -> o; Denoiser.set_attention swaps it.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _linear(layer: nn.Linear, x: torch.Tensor, activation: Optional[str] = None,
            any_layout: bool = False) -> torch.Tensor:
    """layer(x) (then GELU-tanh when asked), with the prepacked CPU GEMM where it applies (flm_rt.prepack);
    ``any_layout``: the result may be a transposed view (the consumer is ``gated_residual``)."""
    return prepack.linear(x, layer.weight, layer.bias, activation=activation, any_layout=any_layout)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.n_heads
        self.norm1 = LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        # Called as mlp[2](gelu(mlp[0](m))) with the GELU fused into mlp[0]'s GEMM; the Sequential keeps the
        # published key names (mlp.0.*, mlp.2.*).
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * d)
        self.attention: AttentionFn = softcapped_attention

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, l, d = x.shape
        h = self.n_heads
        shift1, scale1, gate1, shift2, scale2, gate2 = _linear(self.adaLN_modulation, c)[:, None, :].chunk(6, dim=2)

        a = modulate(self.norm1(x), shift1, scale1, _matmul_dtype(x))
        q, k, v = split_heads(_linear(self.attn_qkv, a), cos, sin, h)
        o = self.attention(q, k, v, workspace).transpose(1, 2).reshape(b, l, d)
        x = gated_residual(x, gate1, _linear(self.attn_out, o, any_layout=True))

        m = modulate(self.norm2(x), shift2, scale2, _matmul_dtype(x))
        y = _linear(self.mlp[0], m, activation="gelu_tanh")
        return gated_residual(x, gate2, _linear(self.mlp[2], y, any_layout=True))


class OutputLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_final = LayerNorm(cfg.hidden_size)
        self.linear = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_size)

    def features(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """y, the input of the final Linear: logits = y @ linear.weight^T + linear.bias."""
        shift, scale = _linear(self.adaLN_modulation, c)[:, None, :].chunk(2, dim=2)
        return modulate(self.norm_final(x), shift, scale, _matmul_dtype(x))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return _linear(self.linear, self.features(x, c))


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.normal_(self.embedding, std=dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.int64, torch.int32):
            return F.embedding(x, self.embedding).float()
        # x @ E, in fp32 as in the reference, always
        return _fp32(lambda: prepack.linear(x.float(), self.embedding.float(), transposed=True), x)


class Denoiser(nn.Module):
    """f(x, t[, t']) -> raw logits z [B, L, V] (before the 30-soft-cap; see ``softcap_logits``).

    x: float [B, L, V] (a point on the noisy one-hot path) or int ids [B, L]; t, t_prime: float [B] in [0, 1].
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.vocab_embed = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        if cfg.two_time:
            self.sigma_map_prime = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.head_dim)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_blocks)])
        self.output_layer = OutputLayer(cfg)
        self.compute_dtype = torch.float32

    def set_compute_dtype(self, dtype: torch.dtype) -> "Denoiser":
        """fp32, or bf16/fp16 mixed precision as the reference runs on GPU: embedding and time conditioning in
        fp32, blocks and output layer under autocast. The Linear weights there are stored in the low precision
        (exactly what autocast would cast them to on every call); LayerNorm weights stay fp32."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute dtype must be float32, bfloat16 or float16, got {dtype}")
        self.compute_dtype = dtype
        for part in (self.blocks, self.output_layer):
            for m in part.modules():
                if isinstance(m, nn.Linear):
                    m.to(dtype if dtype != torch.float32 else torch.float32)
        return self

    def set_attention(self, attention: Optional[AttentionFn] = None) -> "Denoiser":
        """The function every block computes its soft-capped attention with: ``softcapped_attention`` (None, the
        default), or one of the same signature and meaning, e.g. the exporter's ONNX Attention op."""
        for block in self.blocks:
            block.attention = softcapped_attention if attention is None else attention
        return self

    def conditioning(self, t: torch.Tensor, t_prime: Optional[torch.Tensor]) -> torch.Tensor:
        c = self.sigma_map(t)
        if self.config.two_time:
            if t_prime is None:
                raise ValueError("this is a two-time (FMLM) model: pass t_prime as well as t")
            c = c + self.sigma_map_prime(t_prime)
        return F.silu(c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, t_prime: Optional[torch.Tensor] = None) -> torch.Tensor:
        with nvtx.range("embedding"):
            h = self.vocab_embed(x)
        return self.forward_embedded(h, t, t_prime)

    def forward_embedded(self, h: torch.Tensor, t: torch.Tensor, t_prime: Optional[torch.Tensor] = None) -> torch.Tensor:
        """f given h = x @ E [B, L, D] (fp32): the network sees its input only through this projection."""
        return self._run(h, t, t_prime, features_only=False)

    def features(self, x: torch.Tensor, t: torch.Tensor, t_prime: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The output layer's y [B, L, D] for input x (f = y @ W^T + b with W, b = output_layer.linear): what the
        fused vocabulary pass (flm_rt.ops.vocab_pass_*) takes instead of the [B, L, V] logits."""
        with nvtx.range("embedding"):
            h = self.vocab_embed(x)
        return self._run(h, t, t_prime, features_only=True)

    def features_embedded(self, h: torch.Tensor, t: torch.Tensor, t_prime: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``features`` given h = x @ E."""
        return self._run(h, t, t_prime, features_only=True)

    def _run(self, h, t, t_prime, features_only: bool) -> torch.Tensor:
        with nvtx.range("conditioning"):
            c = self.conditioning(t, t_prime)
        cos, sin = self.rotary_emb.cos_sin(h.shape[1], h.device)
        if self.compute_dtype == torch.float32:
            return self._body(h, c, cos, sin, features_only)
        with torch.autocast(device_type=h.device.type, dtype=self.compute_dtype):
            return self._body(h, c, cos, sin, features_only)

    def _body(self, h, c, cos, sin, features_only: bool = False):
        # One attention score buffer for all blocks in fp32 CPU inference, where a fresh [B, H, L, L] matrix per
        # block costs as much in page faults as the softmax itself (elsewhere the allocator caches, or autograd
        # or an exporter needs the plain ops).
        workspace = None
        if prepack.cpu_fp32_inference(h):
            b, l = h.shape[:2]
            workspace = torch.empty((b, self.config.n_heads, l, l), dtype=torch.float32)
        for i, block in enumerate(self.blocks):
            with nvtx.range(f"block{i}"):
                h = block(h, c, cos, sin, workspace)
        with nvtx.range("output_layer"):
            return self.output_layer.features(h, c) if features_only else self.output_layer(h, c)


def softcap_logits(z: torch.Tensor, cap: float = LOGIT_SOFTCAP, *, inplace: bool = False) -> torch.Tensor:
    """The released revision's logit soft-cap: cap * tanh(z / cap). ``inplace`` overwrites z (same values)."""
    if inplace:
        return z.div_(cap).tanh_().mul_(cap)
    return cap * torch.tanh(z / cap)
