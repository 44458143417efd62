"""flm_rt::rotary_split -- a block's qkv [B, L, 3 H d] -> [3, B, H, L, d] with the rotary embedding of q and k --
against its PyTorch reference (ops.rotary_split_reference: permuted views, ops.rotary_reference, stacking).

Tolerance: none. The kernel rounds where the reference's ops round (cos and sin to the dtype of qkv, then every
product and every sum), so the outputs are equal bit for bit, NaN and infinities included; the per-capability
copies (DEFAULT / AVX2) are checked the same way in tests/test_ops.py.
"""
import pytest
import torch

import flm_rt
from flm_rt import _ext, ops
from flm_rt.model import Rotary, preset_config

pytestmark = pytest.mark.skipif(not (_ext.EXT_LOADED and _ext.has_kernel("rotary_split", "cpu")),
                                reason="flm_rt._C without the rotary_split kernel")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, L, H, d): d / 2 = 1, 3, 20 and 40 take the scalar tails; 32 (the published models) and 64 full vectors
SHAPES = [(1, 1, 1, 2), (2, 7, 3, 6), (3, 33, 4, 40), (1, 128, 12, 64), (2, 16, 2, 128), (1, 9, 5, 80)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


def data(b, l, h, d, dtype, seed, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(b, l, 3 * h * d, generator=g) * spread).to(dtype)
    cos, sin = Rotary(d).cos_sin(l, "cpu")
    return qkv, cos, sin


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_reference_bit_for_bit(shape, dtype):
    b, l, h, d = shape
    qkv, cos, sin = data(b, l, h, d, dtype, seed=sum(shape))
    got = ops.rotary_split(qkv, cos, sin, h, backend="ext")
    ref = ops.rotary_split_reference(qkv, cos, sin, h)
    assert got.is_contiguous() and got.shape == (3, b, h, l, d)
    assert same_bits(got, ref)
    if l > 1:  # position 0 is the identity
        assert not torch.equal(got[0], qkv.view(b, l, 3, h, d)[:, :, 0].transpose(1, 2))  # q was rotated
    assert torch.equal(got[2], qkv.view(b, l, 3, h, d)[:, :, 2].transpose(1, 2))  # v is copied as is


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_and_extremes_as_reference(dtype):
    b, l, h, d = 2, 11, 3, 64
    qkv, cos, sin = data(b, l, h, d, dtype, seed=5)
    big = torch.finfo(dtype).max
    qkv[0, 3, 5] = float("nan")
    qkv[1, 4, 70] = float("inf")
    qkv[1, 6, 10] = -float("inf")
    qkv[0, 8, 2 * h * d + 7] = float("nan")  # in v
    qkv[1, 9, :h * d] = big  # products and sums that overflow to inf
    got = ops.rotary_split(qkv, cos, sin, h, backend="ext")
    ref = ops.rotary_split_reference(qkv, cos, sin, h)
    assert torch.isnan(ref).any() and torch.isinf(ref).any()
    assert same_bits(got, ref)


def test_non_contiguous_input_and_empty_batch():
    qkv, cos, sin = data(2, 10, 4, 16, torch.bfloat16, seed=3)
    wide = torch.cat([qkv, qkv], dim=-1)[..., : qkv.shape[-1]]  # a strided view
    assert not wide.is_contiguous()
    assert same_bits(ops.rotary_split(wide, cos, sin, 4, backend="ext"), ops.rotary_split_reference(qkv, cos, sin, 4))
    empty = ops.rotary_split(qkv[:0], cos, sin, 4, backend="ext")
    assert empty.shape == (3, 0, 4, 10, 16)


@pytest.mark.parametrize("bad, match", [
    (lambda q, c, s: (q, c, s, 5), "not 3 \\* n_heads \\* head_dim"),
    (lambda q, c, s: (q, c, s, 0), "n_heads must be >= 1"),
    (lambda q, c, s: (q[..., :3 * 4 * 3], c[:, :1], s[:, :1], 4), "head_dim must be even"),
    (lambda q, c, s: (q, c[:-1], s[:-1], 4), "cos and sin must be \\[L, head_dim / 2\\]"),
    (lambda q, c, s: (q, c, s.double(), 4), "cos and sin must be float32"),
    (lambda q, c, s: (q.to(torch.int32), c, s, 4), "qkv must be float32, bfloat16 or float16"),
    (lambda q, c, s: (q[0], c, s, 4), "qkv must be \\[B, L, 3 \\* n_heads \\* head_dim\\]"),
])
def test_bad_arguments_raise_clear_errors(bad, match):
    qkv, cos, sin = data(2, 10, 4, 16, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flm_rt.rotary_split(*bad(qkv, cos, sin))


def test_opcheck_and_not_differentiable():
    qkv, cos, sin = data(2, 6, 2, 8, torch.float32, seed=2)
    torch.library.opcheck(torch.ops.flm_rt.rotary_split.default, (qkv, cos, sin, 2))
    q = qkv.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.ops.flm_rt.rotary_split(q, cos, sin, 2).sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_uses_it_and_output_is_unchanged(monkeypatch, dtype):
    model = flm_rt.random_model(preset_config("tiny"), seed=0, dtype=dtype)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(2, cfg.length, cfg.vocab_size, generator=g), -1)
    t = torch.full((2,), 0.4)
    calls = []
    real = ops.rotary_split
    monkeypatch.setattr(ops, "rotary_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.inference_mode():
        fused = model.denoiser(x, t, t)
        assert len(calls) == cfg.n_blocks
        monkeypatch.setattr(flm_rt.model, "_cpu_op", lambda x, op: op != "rotary_split" and real_cpu_op(x, op))
        plain = model.denoiser(x, t, t)
    assert len(calls) == cfg.n_blocks
    assert torch.equal(fused, plain)  # the same bits through all blocks


real_cpu_op = flm_rt.model._cpu_op
