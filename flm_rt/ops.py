"""The two hot operators of the samplers, their meaning, and the one place that chooses how they run.

* ``flow_map_step(z, logits, a, b, c, eps=None, cap=LOGIT_SOFTCAP)`` -- one sampler update::

      z_out = a * z + b * softmax(cap * tanh(logits / cap), dim=-1) + c * eps        (all in float32)

* ``vocab_argmax(x)`` -- ``(indices int64, values)`` of the maximum over the last dimension, exactly
  ``torch.max(x, dim=-1)`` (ties -> lowest index; NaN is the maximum and the first NaN wins).

* ``softcap_softmax(x, scale, cap)`` / ``softcap_softmax_`` -- the blocks' attention probabilities,
  ``softmax(cap * tanh(scale * x), dim=-1)`` computed in float32 and stored in the dtype of x (in place for the
  ``_`` variant): one pass over the [B, H, L, L] scores instead of four.

* ``rotary_split(qkv, cos, sin, n_heads)`` -- a block's qkv Linear output [B, L, 3 * H * d] to
  [3, B, H, L, d]: q and k with the rotary embedding (``rotary_reference``, in the dtype of qkv), and v, in one
  pass instead of permuted views, six elementwise ops, a concatenation and a copy.

* ``scaled_add(base, x, w, dtype=None)`` -- ``base + x * w`` as ``torch.addcmul`` on float32 operands, stored in
  ``dtype`` (float32 by default); each operand [B, L, D] or [B, 1, D]: the blocks' adaLN modulation (straight to
  the dtype of the Linear that reads it) and gated residual, in one pass without float32 copies of bf16 operands.

* ``vocab_pass_argmax(y, weight, bias, cap)`` / ``vocab_pass_embed(y, weight, bias, embed, cap)`` -- the fused
  vocabulary pass: the output projection ``logits = y @ weight^T + bias`` followed by, respectively, the argmax of
  the (soft-capped) logits and ``softmax(cap*tanh(logits/cap)) @ embed``, computed over vocabulary chunks so that
  no [..., V] logits tensor is ever built (ids: exactly the reference's; softmax @ E: float32 rounding, see
  docs/KERNELS.md).

* ``gelu_tanh_(x)`` -- ``x <- gelu(x, approximate="tanh")`` in place, computed in float32 and stored in x's dtype:
  the blocks' MLP activation on the output of the first MLP product (flm_rt.prepack computes that product without
  oneDNN's fused GELU and runs this pass after it). The kernel evaluates ``x / (1 + exp(-2u))`` with a fast exp;
  it agrees with the reference to ``|d| <= 4e-6 |ref| + 1e-7 |x|`` in float32 (the reference's ``1 + tanh(u)``
  cancels for negative x), to 1 unit in the last place of bf16 / fp16, and exactly on 0, +-inf and NaN.

* ``normal_(out, generator=None)`` -- standard-normal draws into a float32 tensor: exactly
  ``out.normal_(0, 1, generator=generator)`` (= ``torch.randn(..., generator=generator, out=out)``), the same bits
  and the generator left in the same state (the sampler's noise in vocabulary space, [B, L, V] per step). The
  kernel fills the tensor on x86-64 at the CPU capabilities DEFAULT, AVX2 and AVX512 (~4x faster than torch with
  2 threads at AVX512); elsewhere (other architectures, CUDA) torch's own path runs.

Each has a pure-PyTorch reference (``*_reference``) that DEFINES the result, and a compiled kernel
(``torch.ops.flm_rt.*`` from flm_rt._C, CPU always, CUDA when built with nvcc) that must agree with it
(step: to float32 rounding, ~1e-6 relative; argmax: exactly).

Choosing the implementation (``backend`` argument, else env ``FLM_RT_KERNELS``, default ``auto``):
  ``auto``  compiled kernel when the extension is loaded and has a kernel for that device and dtype,
            otherwise the reference (also the reference while torch.jit / torch.onnx / torch.export trace);
  ``ext``   compiled kernel, or a RuntimeError saying why it cannot run;
  ``torch`` the reference (plain tensor ops; what the exporters use: traceable by torch.export, ONNX,
            TorchScript tracing).

Where a, b, c come from: the sampler's plan (:func:`flm_rt.samplers.make_plan`, SPEC section 4); the last step
of either sampler is a = 0, b = 1, c = 0.

a, b, c may be Python floats or float tensors broadcastable to ``z.shape[:-1]`` (e.g. [B, 1] for
z of shape [B, L, V]: one coefficient per sequence).
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Optional, Union

import torch

from . import _ext, prepack, tracing
from .errors import ConfigError, DeviceError
from .limits import env_switch
from .spec import LOGIT_SOFTCAP

__all__ = [
    "flow_map_step",
    "flow_map_step_",
    "vocab_argmax",
    "vocab_pass_argmax",
    "vocab_pass_embed",
    "softcap_softmax",
    "softcap_softmax_",
    "normal_",
    "gelu_tanh_",
    "flow_map_step_reference",
    "vocab_argmax_reference",
    "vocab_pass_argmax_reference",
    "vocab_pass_embed_reference",
    "softcap_softmax_reference",
    "normal_reference",
    "gelu_tanh_reference",
    "vocab_chunk",
    "kernels_backend",
    "ext_available",
    "BACKENDS",
]

Coef = Union[float, int, torch.Tensor]

BACKENDS = ("auto", "torch", "ext")
STEP_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ARGMAX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PASS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Vocabulary entries per chunk of the fused pass, by default as many as keep the [rows, chunk] fp32 logits block
# within VOCAB_CHUNK_BYTES (at least MIN_VOCAB_CHUNK): few, large GEMMs where rows are few (on the AVX-512/AMX
# development machine chunking the LM1B [128, 30522] product only added overhead), bounded memory where they are
# many (OWT, L 1024: 4096 entries, 16 MiB instead of 196 MiB).
VOCAB_CHUNK_BYTES = 16 << 20
MIN_VOCAB_CHUNK = 2048


# --------------------------------------------------------------------------------------------------
# References (these define the operators)
# --------------------------------------------------------------------------------------------------
def _ref_coef(v: Coef, z: torch.Tensor) -> Union[float, torch.Tensor]:
    if isinstance(v, (int, float)):
        return float(v)
    t = v.to(torch.float32)
    # Only rank tests below (Python ints even while tracing): no data-dependent control flow.
    if t.dim() == 0:
        return t
    if z.dim() == 1:  # a single row: exactly one coefficient (reshape raises otherwise)
        return t.reshape(())
    # one value per row of z: broadcast to z.shape[:-1] (raises if impossible), constant along V
    return t.broadcast_to(z.shape[:-1]).unsqueeze(-1)


def flow_map_step_reference(z: torch.Tensor, logits: torch.Tensor, a: Coef, b: Coef, c: Coef,
                            eps: Optional[torch.Tensor] = None, cap: float = LOGIT_SOFTCAP) -> torch.Tensor:
    """``a*z + b*softmax(cap*tanh(logits/cap), -1) + c*eps`` computed in float32 (cap <= 0: no soft-cap).

    z, eps: [..., V] (used as float32); logits: [..., V] any float dtype (upcast to float32 first);
    a, b, c: floats or tensors broadcastable to z.shape[:-1]; eps=None drops the c term.
    A row of logits that are all -inf gives NaN without a cap (as torch.softmax) and a uniform
    distribution with a cap (tanh(-inf) = -1). Plain tensor ops only: traceable / exportable.
    """
    x = logits.to(torch.float32)
    cap = float(cap)
    if cap > 0:
        x = cap * torch.tanh(x / cap)
    p = torch.softmax(x, dim=-1)
    out = _ref_coef(a, z) * z.to(torch.float32) + _ref_coef(b, z) * p
    if eps is not None:
        out = out + _ref_coef(c, z) * eps.to(torch.float32)
    return out


def vocab_argmax_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices int64, values)`` over the last dimension: exactly ``torch.max(x, dim=-1)``."""
    values, indices = torch.max(x, dim=-1)
    return indices, values


def vocab_pass_argmax_reference(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                                cap: float = LOGIT_SOFTCAP) -> tuple[torch.Tensor, torch.Tensor]:
    """``vocab_argmax(cap * tanh((y @ weight^T + bias) / cap))`` with the whole logits tensor, in the dtype of y
    (cap <= 0: of the raw logits). The soft-cap is the same three ops as ``flm_rt.model.softcap_logits``."""
    logits = torch.nn.functional.linear(y, weight, bias)
    cap = float(cap)
    if cap > 0:
        logits = logits.div(cap).tanh_().mul_(cap)
    return vocab_argmax_reference(logits)


def vocab_pass_embed_reference(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               embed: torch.Tensor, cap: float = LOGIT_SOFTCAP) -> torch.Tensor:
    """``softmax(cap * tanh(logits / cap)) @ embed`` in float32, logits = y @ weight^T + bias (upcast to float32
    first, as the samplers do); cap <= 0: no soft-cap."""
    x = torch.nn.functional.linear(y, weight, bias).to(torch.float32)
    cap = float(cap)
    if cap > 0:
        x = cap * torch.tanh(x / cap)
    return torch.softmax(x, dim=-1) @ embed.to(torch.float32)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding, halves convention: x = [x1, x2] -> [x1 cos - x2 sin, x1 sin + x2 cos], in the dtype
    of x (cos and sin rounded to it first). x [..., L, d], cos/sin [L, d/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def rotary_heads(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int):
    """qkv [B, L, 3 * n_heads * d] -> q, k, v, each [B, n_heads, L, d]: ``rotary_reference`` of q and k (computed
    together), v a view of qkv. The plain ops (what autograd and the exporters see)."""
    b, l, width = qkv.shape
    x = qkv.view(b, l, 3, n_heads, width // (3 * n_heads)).permute(2, 0, 3, 1, 4)  # [3, B, H, L, d]
    qk = rotary_reference(x[:2], cos, sin)
    return qk[0], qk[1], x[2]


def rotary_split_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int) -> torch.Tensor:
    """qkv [B, L, 3 * n_heads * d] -> [3, B, n_heads, L, d]: ``rotary_heads`` stacked."""
    return torch.stack(rotary_heads(qkv, cos, sin, n_heads))


def scaled_add_reference(base: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                         dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.addcmul(base, x, w)`` on the float32 values of the operands (exact upcasts), as ``dtype``
    (default float32)."""
    f = torch.float32
    out = torch.addcmul(base.to(f), x.to(f), w.to(f))
    return out if dtype is None else out.to(dtype)


def softcap_softmax_reference(x: torch.Tensor, scale: float, cap: float) -> torch.Tensor:
    """``softmax(cap * tanh(scale * x), dim=-1)`` in float32 (cap <= 0: ``softmax(scale * x)``), returned in the
    dtype of x: multiply by scale, tanh, multiply by cap, softmax, in that order."""
    y = x.to(torch.float32) * float(scale)
    if float(cap) > 0:
        y = y.tanh_().mul_(float(cap))
    return torch.softmax(y, dim=-1).to(x.dtype)


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` on the float32 values of x, as a new tensor of x's dtype."""
    return torch.nn.functional.gelu(x.to(torch.float32), approximate="tanh").to(x.dtype)


def normal_reference(out: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``out.normal_(0, 1, generator=generator)``: torch's standard-normal draws, written into out (returned)."""
    return out.normal_(0.0, 1.0, generator=generator)


# --------------------------------------------------------------------------------------------------
# Fake (meta) implementations, for torch.compile / torch.export / opcheck
# --------------------------------------------------------------------------------------------------
def _fake_check_step(op: str, z, logits, a, b, c, eps) -> None:
    torch._check(z.dtype == torch.float32, lambda: f"{op}: z must be float32, got {z.dtype}")
    torch._check(logits.dtype in STEP_LOGITS_DTYPES,
                 lambda: f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    torch._check(z.dim() >= 1, lambda: f"{op}: z must have at least one dimension [..., V]")
    torch._check(z.shape[-1] != 0, lambda: f"{op}: the vocabulary (last) dimension must be non-empty, "
                                           f"got shape {tuple(z.shape)}")
    torch._check(tuple(z.shape) == tuple(logits.shape),
                 lambda: f"{op}: z and logits must have the same shape, got {tuple(z.shape)} and {tuple(logits.shape)}")
    torch._check(logits.device == z.device, lambda: f"{op}: logits must be on the device of z")
    if eps is not None:
        torch._check(eps.dtype == torch.float32, lambda: f"{op}: eps must be float32, got {eps.dtype}")
        torch._check(tuple(eps.shape) == tuple(z.shape), lambda: f"{op}: eps must have the shape of z")
        torch._check(eps.device == z.device, lambda: f"{op}: eps must be on the device of z")
    for name, t in (("a", a), ("b", b), ("c", c)):
        torch._check(t.dtype == torch.float32, lambda: f"{op}: coefficient {name} must be float32, got {t.dtype}")
        torch._check(t.device == z.device, lambda: f"{op}: coefficient {name} must be on the device of z")


if _ext.EXT_LOADED:

    @torch.library.register_fake("flm_rt::flow_map_step")
    def _flow_map_step_fake(z, logits, a, b, c, eps, cap):
        _fake_check_step("flm_rt::flow_map_step", z, logits, a, b, c, eps)
        return torch.empty(z.shape, dtype=torch.float32, device=z.device)

    @torch.library.register_fake("flm_rt::flow_map_step_")
    def _flow_map_step_inplace_fake(z, logits, a, b, c, eps, cap):
        _fake_check_step("flm_rt::flow_map_step_", z, logits, a, b, c, eps)
        return None

    @torch.library.register_fake("flm_rt::vocab_argmax")
    def _vocab_argmax_fake(x):
        torch._check(x.dtype in ARGMAX_DTYPES,
                     lambda: f"flm_rt::vocab_argmax: x must be float32, bfloat16 or float16, got {x.dtype}")
        torch._check(x.dim() >= 1, lambda: "flm_rt::vocab_argmax: x must have at least one dimension [..., V]")
        torch._check(x.shape[-1] != 0, lambda: "flm_rt::vocab_argmax: cannot take the argmax over an empty "
                                              f"vocabulary (last) dimension, got shape {tuple(x.shape)}")
        shape = x.shape[:-1]
        return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape)


if _ext.EXT_LOADED and hasattr(torch.ops.flm_rt, "softcap_softmax"):

    def _fake_check_softmax(op: str, x) -> None:
        torch._check(x.dtype in STEP_LOGITS_DTYPES,
                     lambda: f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
        torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least one dimension [..., L]")

    @torch.library.register_fake("flm_rt::softcap_softmax")
    def _softcap_softmax_fake(x, scale, cap):
        _fake_check_softmax("flm_rt::softcap_softmax", x)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @torch.library.register_fake("flm_rt::softcap_softmax_")
    def _softcap_softmax_inplace_fake(x, scale, cap):
        _fake_check_softmax("flm_rt::softcap_softmax_", x)
        return None


if _ext.EXT_LOADED and hasattr(torch.ops.flm_rt, "rotary_split"):

    @torch.library.register_fake("flm_rt::rotary_split")
    def _rotary_split_fake(qkv, cos, sin, n_heads):
        op = "flm_rt::rotary_split"
        torch._check(qkv.dtype in STEP_LOGITS_DTYPES,
                     lambda: f"{op}: qkv must be float32, bfloat16 or float16, got {qkv.dtype}")
        torch._check(qkv.dim() == 3, lambda: f"{op}: qkv must be [B, L, 3 * n_heads * head_dim]")
        torch._check(n_heads >= 1 and qkv.shape[2] % (3 * n_heads) == 0,
                     lambda: f"{op}: the last dimension of qkv is not 3 * n_heads * head_dim")
        hd = qkv.shape[2] // (3 * n_heads)
        torch._check(hd >= 2 and hd % 2 == 0, lambda: f"{op}: head_dim must be even and >= 2, got {hd}")
        torch._check(cos.dtype == torch.float32 and sin.dtype == torch.float32,
                     lambda: f"{op}: cos and sin must be float32")
        torch._check(tuple(cos.shape) == (qkv.shape[1], hd // 2) and tuple(sin.shape) == tuple(cos.shape),
                     lambda: f"{op}: cos and sin must be [L, head_dim / 2]")
        return qkv.new_empty((3, qkv.shape[0], n_heads, qkv.shape[1], hd))


if _ext.EXT_LOADED and hasattr(torch.ops.flm_rt, "scaled_add"):

    @torch.library.register_fake("flm_rt::scaled_add")
    def _scaled_add_fake(base, x, w, dtype=None):
        op = "flm_rt::scaled_add"
        torch._check(base.dim() == 3 and x.dim() == 3 and w.dim() == 3,
                     lambda: f"{op}: base, x and w must be 3-dimensional ([B, L, D] or [B, 1, D])")
        L = max(base.shape[1], x.shape[1], w.shape[1])
        for name, t in (("base", base), ("x", x), ("w", w)):
            torch._check(t.dtype in STEP_LOGITS_DTYPES, lambda: f"{op}: {name} must be float32, bfloat16 or float16")
            torch._check(t.shape[0] == x.shape[0] and t.shape[1] in (1, L) and t.shape[2] == x.shape[2],
                         lambda: f"{op}: {name} must be [B, L, D] or [B, 1, D]")
        out = torch.float32 if dtype is None else dtype
        torch._check(out in STEP_LOGITS_DTYPES, lambda: f"{op}: dtype must be float32, bfloat16 or float16")
        return x.new_empty((x.shape[0], L, x.shape[2]), dtype=out)


if _ext.EXT_LOADED and hasattr(torch.ops.flm_rt, "normal_"):

    @torch.library.register_fake("flm_rt::normal_")
    def _normal_inplace_fake(out, generator):
        op = "flm_rt::normal_"
        torch._check(out.dtype == torch.float32, lambda: f"{op}: out must be float32, got {out.dtype}")
        torch._check(out.is_contiguous(), lambda: f"{op}: out must be contiguous")
        return None


if _ext.EXT_LOADED and hasattr(torch.ops.flm_rt, "gelu_tanh_"):

    @torch.library.register_fake("flm_rt::gelu_tanh_")
    def _gelu_tanh_inplace_fake(x):
        torch._check(x.dtype in STEP_LOGITS_DTYPES,
                     lambda: f"flm_rt::gelu_tanh_: x must be float32, bfloat16 or float16, got {x.dtype}")
        return None


if _ext.EXT_LOADED and hasattr(torch.ops.flm_rt, "vocab_pass_argmax"):  # (an older flm_rt._C lacks the pass)

    def _fake_check_pass(op: str, y, weight, bias, chunk) -> None:
        torch._check(y.dtype in PASS_DTYPES, lambda: f"{op}: y must be float32, bfloat16 or float16, got {y.dtype}")
        torch._check(weight.dtype == y.dtype, lambda: f"{op}: weight must have the dtype of y ({y.dtype})")
        torch._check(y.dim() >= 1, lambda: f"{op}: y must have at least one dimension [..., D]")
        torch._check(weight.dim() == 2 and weight.shape[1] == y.shape[-1],
                     lambda: f"{op}: weight must be [V, D] with D = y.shape[-1], got {tuple(weight.shape)}")
        torch._check(weight.shape[0] != 0, lambda: f"{op}: the vocabulary (weight.shape[0]) must be non-empty")
        if bias is not None:
            torch._check(bias.dtype == y.dtype and tuple(bias.shape) == (weight.shape[0],),
                         lambda: f"{op}: bias must be [V] with the dtype of y")
        torch._check(chunk >= 1, lambda: f"{op}: chunk must be >= 1, got {chunk}")

    @torch.library.register_fake("flm_rt::vocab_pass_argmax")
    def _vocab_pass_argmax_fake(y, weight, bias, cap, chunk, prepacked, screen=False):
        _fake_check_pass("flm_rt::vocab_pass_argmax", y, weight, bias, chunk)
        shape = y.shape[:-1]
        return y.new_empty(shape, dtype=torch.int64), y.new_empty(shape)

    @torch.library.register_fake("flm_rt::vocab_pass_embed")
    def _vocab_pass_embed_fake(y, weight, bias, embed, cap, chunk, prepacked):
        _fake_check_pass("flm_rt::vocab_pass_embed", y, weight, bias, chunk)
        torch._check(embed.dtype == torch.float32, lambda: "flm_rt::vocab_pass_embed: embed must be float32")
        torch._check(embed.dim() == 2 and embed.shape[0] == weight.shape[0],
                     lambda: "flm_rt::vocab_pass_embed: embed must be [V, De]")
        return y.new_empty((*y.shape[:-1], embed.shape[1]), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------------
def ext_available() -> bool:
    """True when flm_rt._C is loaded (compiled operators registered)."""
    return _ext.EXT_LOADED


def _requested_backend(backend: Optional[str]) -> str:
    b = backend if backend is not None else (os.environ.get("FLM_RT_KERNELS", "auto").strip().lower() or "auto")
    if b not in BACKENDS:
        src = "backend" if backend is not None else "FLM_RT_KERNELS"
        raise ConfigError(f"flm_rt: {src} must be one of {', '.join(BACKENDS)}; got {b!r}")
    return b


def kernels_backend(device: Union[str, torch.device], dtype: torch.dtype, op: str = "flow_map_step",
                    backend: Optional[str] = None) -> str:
    """Which implementation ``op`` (a name in flm_rt._ext.OPS) would use for inputs on ``device``
    with (logits / x) ``dtype``: "ext" or "torch". ``backend`` as in the ops (None: FLM_RT_KERNELS).

    Raises RuntimeError when ``ext`` is requested but not possible.
    """
    b = _requested_backend(backend)
    if b == "torch":
        return "torch"
    dev = torch.device(device).type
    dtypes = ((torch.float32,) if op == "normal_" else
              STEP_LOGITS_DTYPES if op.startswith("flow_map_step") else ARGMAX_DTYPES)  # == PASS_DTYPES
    if b == "ext":
        if not _ext.EXT_LOADED:
            raise DeviceError(f"flm_rt: backend 'ext' requested for {op} but the compiled extension is not loaded "
                               f"({_ext.EXT_ERROR})")
        if not _ext.has_kernel(op, dev):
            raise DeviceError(f"flm_rt: backend 'ext' requested for {op} but flm_rt._C has no {dev} kernel "
                               f"(built: {_ext.build_info().get('ops', {}).get(op)})")
        if dtype not in dtypes:
            raise DeviceError(f"flm_rt: backend 'ext' requested for {op} but its kernels take "
                               f"{', '.join(str(d) for d in dtypes)}, got {dtype}")
        return "ext"
    if _ext.EXT_LOADED and dtype in dtypes and _ext.has_kernel(op, dev) and not tracing.is_exporting():
        return "ext"
    return "torch"


def _rows_coef(v: Coef, z: torch.Tensor, name: str) -> torch.Tensor:
    """a/b/c as a contiguous float32 tensor on z's device with 1 element or one per row of z."""
    if isinstance(v, (int, float)):
        return torch.full((1,), float(v), dtype=torch.float32, device=z.device)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"flm_rt.ops.flow_map_step: coefficient {name} must be a float or a tensor, got {type(v)}")
    if v.numel() == 1:
        return v.reshape(1).to(device=z.device, dtype=torch.float32)
    rows_shape = z.shape[:-1]
    try:
        t = v.broadcast_to(rows_shape)
    except RuntimeError as e:
        raise RuntimeError(f"flm_rt.ops.flow_map_step: coefficient {name} of shape {tuple(v.shape)} is not "
                           f"broadcastable to z.shape[:-1] = {tuple(rows_shape)}") from e
    return t.to(device=z.device, dtype=torch.float32).reshape(-1).contiguous()


# --------------------------------------------------------------------------------------------------
# The dispatch points the samplers use
# --------------------------------------------------------------------------------------------------
def flow_map_step(z: torch.Tensor, logits: torch.Tensor, a: Coef, b: Coef, c: Coef,
                  eps: Optional[torch.Tensor] = None, cap: float = LOGIT_SOFTCAP, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """``a*z + b*softmax(cap*tanh(logits/cap), -1) + c*eps`` as a new float32 tensor (see module doc).

    z: float32 [..., V]; logits: float32/bfloat16/float16 [..., V]; eps: float32 [..., V] or None;
    a, b, c: floats or tensors broadcastable to z.shape[:-1]; cap <= 0 disables the soft-cap.
    """
    be = kernels_backend(z.device, logits.dtype, "flow_map_step", backend)
    if be == "ext" and backend is None and (z.dtype != torch.float32 or (eps is not None and eps.dtype != torch.float32)):
        be = "torch"  # auto: the kernels take float32 state only
    if be == "torch":
        return flow_map_step_reference(z, logits, a, b, c, eps, cap)
    return torch.ops.flm_rt.flow_map_step(z, logits, _rows_coef(a, z, "a"), _rows_coef(b, z, "b"),
                                          _rows_coef(c, z, "c"), eps, float(cap))


def flow_map_step_(z: torch.Tensor, logits: torch.Tensor, a: Coef, b: Coef, c: Coef,
                   eps: Optional[torch.Tensor] = None, cap: float = LOGIT_SOFTCAP, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """In-place ``flow_map_step``: writes the result into z (float32) and returns z."""
    be = kernels_backend(z.device, logits.dtype, "flow_map_step_", backend)
    if be == "ext" and backend is None and (z.dtype != torch.float32 or (eps is not None and eps.dtype != torch.float32)):
        be = "torch"
    if be == "torch":
        return z.copy_(flow_map_step_reference(z, logits, a, b, c, eps, cap))
    torch.ops.flm_rt.flow_map_step_(z, logits, _rows_coef(a, z, "a"), _rows_coef(b, z, "b"),
                                    _rows_coef(c, z, "c"), eps, float(cap))
    return z


def vocab_argmax(x: torch.Tensor, *, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices int64 [...], values x.dtype [...])`` of the maximum over the last dim; == torch.max(x, -1)."""
    if kernels_backend(x.device, x.dtype, "vocab_argmax", backend) == "torch":
        return vocab_argmax_reference(x)
    return torch.ops.flm_rt.vocab_argmax(x)


def vocab_chunk(chunk: Optional[int] = None, rows: int = 1) -> int:
    """The fused pass's chunk: ``chunk``, else env ``FLM_RT_VOCAB_CHUNK``, else sized for ``rows`` rows (see
    VOCAB_CHUNK_BYTES)."""
    default = max(MIN_VOCAB_CHUNK, VOCAB_CHUNK_BYTES // (4 * max(int(rows), 1)) // 256 * 256)
    v = chunk if chunk is not None else os.environ.get("FLM_RT_VOCAB_CHUNK", "").strip() or default
    try:
        n = int(v)
    except (TypeError, ValueError):
        n = 0
    if isinstance(v, bool) or n < 1 or (isinstance(v, float) and v != n):
        src = "chunk" if chunk is not None else "FLM_RT_VOCAB_CHUNK"
        raise ValueError(f"flm_rt: {src} must be a positive int, got {v!r}")
    return n


def _pass_prepacked(dtype: torch.dtype) -> bool:
    """Whether the kernel may use (and cache) oneDNN-reordered weight chunks: as flm_rt.prepack decides, for fp32,
    and for bf16 where the CPU has native bf16 (oneDNN refuses to reorder bf16 weights below AVX512-BW)."""
    from .cpu_features import native_bf16

    if not prepack.is_enabled() or torch.is_grad_enabled() or tracing.is_capturing():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and native_bf16())


def screen_enabled(screen: Optional[bool] = None) -> bool:
    """The switch of the screened fp32 argmax: ``screen``, else env ``FLM_RT_SCREEN`` (default 1)."""
    return bool(screen) if screen is not None else env_switch("FLM_RT_SCREEN")


def _pass_screen(y: torch.Tensor, cap: float, prepacked: bool, screen: Optional[bool]) -> bool:
    """Whether the kernel screens the fp32 argmax with a bf16 product (see vocab_pass_argmax)."""
    if not screen_enabled(screen):
        return False
    from .cpu_features import native_bf16

    return y.device.type == "cpu" and y.dtype == torch.float32 and cap <= 0 and prepacked and native_bf16()


def vocab_pass_argmax(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      cap: float = LOGIT_SOFTCAP, *, chunk: Optional[int] = None,
                      backend: Optional[str] = None,
                      screen: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices int64 [...], values [...])`` of the maximum over V of ``cap*tanh((y @ weight^T + bias)/cap)``
    (cap <= 0: raw logits), without building the [..., V] logits (compiled kernel); the reference builds them.

    y [..., D] and weight [V, D] (bias [V]) share one dtype; values have that dtype.

    screen: the fp32, uncapped case on the CPU (the fp32 sampler's last step) may find the argmax candidates with
    a bf16 product (AMX) and a rigorous error bound, then compute the fp32 logits of the candidates only: the same
    ids as the exact pass (values: the winners' fp32 logits), several times faster; rows it cannot settle take
    the exact pass (docs/KERNELS.md, "Screened argmax"). None: on when y is float32, cap <= 0, prepacking is on,
    the CPU has native bf16 and env ``FLM_RT_SCREEN`` is not 0; False: off; True: on wherever it applies
    (float32, cap <= 0, prepacking on), also without native bf16."""
    if kernels_backend(y.device, y.dtype, "vocab_pass_argmax", backend) == "torch":
        return vocab_pass_argmax_reference(y, weight, bias, cap)
    rows = y.numel() // max(y.shape[-1], 1)
    prepacked = _pass_prepacked(y.dtype)
    if screen is None:
        use_screen = _pass_screen(y, float(cap), prepacked, None)
    else:
        use_screen = bool(screen) and y.dtype == torch.float32 and float(cap) <= 0 and prepacked
    return torch.ops.flm_rt.vocab_pass_argmax(y, weight, bias, float(cap), vocab_chunk(chunk, rows), prepacked,
                                              use_screen)


def vocab_pass_embed(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], embed: torch.Tensor,
                     cap: float = LOGIT_SOFTCAP, *, chunk: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``softmax(cap*tanh((y @ weight^T + bias)/cap)) @ embed`` in float32 [..., De], by an online softmax over
    vocabulary chunks (compiled kernel); embed float32 [V, De]."""
    if kernels_backend(y.device, y.dtype, "vocab_pass_embed", backend) == "torch":
        return vocab_pass_embed_reference(y, weight, bias, embed, cap)
    rows = y.numel() // max(y.shape[-1], 1)
    return torch.ops.flm_rt.vocab_pass_embed(y, weight, bias, embed, float(cap), vocab_chunk(chunk, rows),
                                             _pass_prepacked(y.dtype))


def softcap_softmax(x: torch.Tensor, scale: float, cap: float, *, backend: Optional[str] = None) -> torch.Tensor:
    """``softmax(cap * tanh(scale * x), dim=-1)`` as a new tensor of x's dtype, computed in float32 (see
    ``softcap_softmax_reference``); x: float32/bfloat16/float16 [..., L]."""
    if kernels_backend(x.device, x.dtype, "softcap_softmax", backend) == "torch":
        return softcap_softmax_reference(x, scale, cap)
    return torch.ops.flm_rt.softcap_softmax(x, float(scale), float(cap))


def rotary_split(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, *,
                 backend: Optional[str] = None) -> torch.Tensor:
    """qkv [B, L, 3 * n_heads * d] -> contiguous [3, B, n_heads, L, d]: q and k with the rotary embedding
    (``rotary_reference``: the same bits), and v; cos/sin float32 [L, d/2]."""
    if kernels_backend(qkv.device, qkv.dtype, "rotary_split", backend) == "torch":
        return rotary_split_reference(qkv, cos, sin, n_heads)
    return torch.ops.flm_rt.rotary_split(qkv, cos, sin, int(n_heads))


def scaled_add(base: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dtype: Optional[torch.dtype] = None, *,
               backend: Optional[str] = None) -> torch.Tensor:
    """``base + x * w`` computed as ``torch.addcmul`` on float32 operands, returned as ``dtype`` (default float32);
    each operand [B, L, D] or [B, 1, D] in float32, bfloat16 or float16 (``scaled_add_reference``: the same bits)."""
    if kernels_backend(x.device, x.dtype, "scaled_add", backend) == "torch":
        return scaled_add_reference(base, x, w, dtype)
    return torch.ops.flm_rt.scaled_add(base, x, w, dtype)


def softcap_softmax_(x: torch.Tensor, scale: float, cap: float, *, backend: Optional[str] = None) -> torch.Tensor:
    """In-place ``softcap_softmax``: writes the probabilities into x and returns x."""
    if kernels_backend(x.device, x.dtype, "softcap_softmax_", backend) == "torch":
        return x.copy_(softcap_softmax_reference(x, scale, cap))
    torch.ops.flm_rt.softcap_softmax_(x, float(scale), float(cap))
    return x


def gelu_tanh_(x: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """In place ``x <- gelu(x, approximate="tanh")`` computed in float32 (``gelu_tanh_reference``; the kernel's
    tolerance is in the module docstring); x: float32/bfloat16/float16. Returns x."""
    if kernels_backend(x.device, x.dtype, "gelu_tanh_", backend) == "torch":
        return x.copy_(gelu_tanh_reference(x))
    torch.ops.flm_rt.gelu_tanh_(x)
    return x


@functools.lru_cache(maxsize=1)
def _normal_kernel_isa() -> bool:
    """Whether flm_rt::normal_ reproduces torch's float32 normal_ at this CPU capability: x86-64 at DEFAULT
    (torch's scalar Box-Muller, libm) and, where the build has its AVX2 kernels, at AVX2 and AVX512 (torch's
    NormalFill16 with avx_mathfun.h's log256_ps / sincos256_ps; torch 2.14.1 runs it at AVX512 too). Other
    architectures are not checked."""
    caps = ("DEFAULT",)
    if _ext.EXT_LOADED and "AVX2" in _ext.build_info()["cpu_capabilities_compiled"]:
        caps += ("AVX2", "AVX512")
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in caps


def _normal_kernel_applies(out: torch.Tensor, generator: Optional[torch.Generator]) -> bool:
    """Where the compiled normal_ fills with its own kernel: a contiguous float32 CPU tensor of >= 16 elements, a
    CPU generator (or None) and ``_normal_kernel_isa()``. (Elsewhere the kernel calls torch's normal_ itself.)"""
    return (out.device.type == "cpu" and out.dtype == torch.float32 and out.numel() >= 16 and out.is_contiguous()
            and (generator is None or generator.device.type == "cpu") and _normal_kernel_isa())


def normal_(out: torch.Tensor, generator: Optional[torch.Generator] = None, *,
            backend: Optional[str] = None) -> torch.Tensor:
    """Standard-normal draws into ``out`` from ``generator`` (None: torch's default CPU generator), returns out:
    exactly ``normal_reference`` (``out.normal_(0, 1, generator=generator)``), the same bits and the generator
    left in the same state. The compiled kernel takes a contiguous float32 CPU tensor (a clear error otherwise
    with backend="ext") and hands over to torch where it cannot reproduce it (small tensors, CPU capabilities
    other than those of ``_normal_kernel_isa``); ``auto`` (and env FLM_RT_KERNELS=ext) call it only where it
    fills the tensor itself (``_normal_kernel_applies``), torch's own path elsewhere, CUDA included."""
    if backend is None and not _normal_kernel_applies(out, generator):
        _requested_backend(None)  # an invalid FLM_RT_KERNELS is reported here too
        return normal_reference(out, generator)
    if kernels_backend(out.device, out.dtype, "normal_", backend) == "torch":
        return normal_reference(out, generator)
    torch.ops.flm_rt.normal_(out, generator)
    return out
