"""flm_rt::scaled_add -- base + x * w (torch.addcmul on float32 operands) stored in float32 / bf16 / fp16, each
operand [B, L, D] or [B, 1, D] -- against its PyTorch reference, and its use by the model (adaLN modulation,
gated residual).

Tolerance: none. The kernel computes what ATen's float32 addcmul computes at the same CPU capability (one fused
multiply-add with AVX2 / AVX512, a product and a sum in the DEFAULT copy, checked in tests/test_ops.py) and rounds
once to the output dtype, so results are equal bit for bit, NaN and infinities included.
"""
import pytest
import torch

import flm_rt
from flm_rt import _ext, ops
from flm_rt.model import preset_config

pytestmark = pytest.mark.skipif(not (_ext.EXT_LOADED and _ext.has_kernel("scaled_add", "cpu")),
                                reason="flm_rt._C without the scaled_add kernel")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (base, x, w) kinds as the model uses them: modulate (shift, LN(x) fp32, 1 + scale) and the gated residual
# (x fp32, y, gate), in fp32 and under bf16 autocast; and mixed ones
KINDS = [(F32, F32, F32), (BF16, F32, BF16), (F32, BF16, BF16), (F16, F32, F16), (BF16, F16, F32)]
# (B, L, D): D below one vector, with tails, the published width
SHAPES = [(1, 1, 1), (2, 7, 13), (3, 5, 40), (1, 128, 768), (2, 3, 1000)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


def operands(shape, kinds, seed, broadcast="w"):
    b, l, d = shape
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, kind in zip(("base", "x", "w"), kinds):
        rows = 1 if name in broadcast else l
        out.append((torch.randn(b, rows, d, generator=g, dtype=torch.float64) * 3).to(kind))
    return out


@pytest.mark.parametrize("out", [None, BF16, F16], ids=str)
@pytest.mark.parametrize("kinds", KINDS, ids=lambda k: "-".join(str(t).split(".")[1] for t in k))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_reference_bit_for_bit(shape, kinds, out):
    base, x, w = operands(shape, kinds, seed=sum(shape))
    got = ops.scaled_add(base, x, w, out, backend="ext")
    assert got.is_contiguous() and got.shape == shape and got.dtype == (out or F32)
    assert same_bits(got, ops.scaled_add_reference(base, x, w, out))


@pytest.mark.parametrize("broadcast", ["w", "base", "x", "bw", ""])
def test_broadcast_operands(broadcast):
    base, x, w = operands((2, 9, 24), (F32, BF16, F32), seed=4, broadcast=broadcast)
    assert same_bits(ops.scaled_add(base, x, w, backend="ext"), ops.scaled_add_reference(base, x, w))


def test_strided_views_nan_inf_and_overflow():
    b, l, d = 2, 6, 40
    wide = torch.randn(b, 1, 6 * d)
    shift, scale = wide.chunk(6, dim=2)[:2]  # the model's adaLN chunks: views with a row stride of 6 D
    x = torch.randn(b, l, d)
    x[0, 1, 3] = float("nan")
    x[1, 2, 5] = float("inf")
    x[1, 3, :] = 3e38  # x * w overflows to inf in float32 and in bf16
    got = ops.scaled_add(shift, x, 1 + scale, BF16, backend="ext")
    ref = ops.scaled_add_reference(shift, x, 1 + scale, BF16)
    assert torch.isnan(ref).any() and torch.isinf(ref).any() and same_bits(got, ref)
    x_t = torch.randn(b, d, l).transpose(1, 2)  # last dimension not contiguous: copied first
    assert same_bits(ops.scaled_add(shift, x_t, scale, backend="ext"), ops.scaled_add_reference(shift, x_t, scale))
    empty = ops.scaled_add(shift[:0], x[:0], scale[:0], backend="ext")
    assert empty.shape == (0, l, d)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("shape", [(1, 70, 40), (3, 33, 50), (2, 1, 37), (1, 1024, 768)],
                         ids=lambda s: "x".join(map(str, s)))
def test_transposed_operand_is_read_by_tiles(shape, dtype):
    """x as a bf16 product computed as W @ X^T leaves it (flm_rt.prepack): the transpose of a contiguous
    [D, B * L] matrix, copied to rows by tiles (sizes that do and do not divide the 32-wide tile)."""
    b, l, d = shape
    g = torch.Generator().manual_seed(d)
    base = torch.randn(b, l, d, generator=g)
    w = torch.randn(b, 1, d, generator=g).to(dtype)
    x = (torch.randn(d, b * l, generator=g) * 3).to(dtype).t().view(b, l, d)
    assert x.stride(-1) == b * l and not x.is_contiguous()
    got = ops.scaled_add(base, x, w, backend="ext")
    assert same_bits(got, ops.scaled_add_reference(base, x, w))
    assert same_bits(got, ops.scaled_add(base, x.contiguous(), w, backend="ext"))


@pytest.mark.parametrize("bad, match", [
    (lambda b, x, w: (b, x, w[0]), "must be 3-dimensional"),
    (lambda b, x, w: (b, x, w[..., :-1]), "w must be \\[B, L, D\\]"),
    (lambda b, x, w: (b[:1], x, w), "base must be \\[B, L, D\\]"),
    (lambda b, x, w: (b, x.to(torch.int32), w), "x must be float32, bfloat16 or float16"),
    (lambda b, x, w: (b, x, w, torch.float64), "dtype must be float32, bfloat16 or float16"),
])
def test_bad_arguments_raise_clear_errors(bad, match):
    base, x, w = operands((2, 5, 8), (F32, F32, F32), seed=1)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flm_rt.scaled_add(*bad(base, x, w))


def test_opcheck_and_not_differentiable():
    base, x, w = operands((2, 5, 8), (F32, BF16, F32), seed=2)
    torch.library.opcheck(torch.ops.flm_rt.scaled_add.default, (base, x, w))
    torch.library.opcheck(torch.ops.flm_rt.scaled_add.default, (base, x, w), {"dtype": BF16})
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.ops.flm_rt.scaled_add(base.requires_grad_(), x, w).sum().backward()


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_model_uses_it_and_output_is_unchanged(monkeypatch, dtype):
    model = flm_rt.random_model(preset_config("tiny"), seed=0, dtype=dtype)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(2, cfg.length, cfg.vocab_size, generator=g), -1)
    t = torch.full((2,), 0.7)
    calls = []
    real, real_cpu_op = ops.scaled_add, flm_rt.model._cpu_op
    monkeypatch.setattr(ops, "scaled_add", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    with torch.inference_mode():
        fused = model.denoiser(x, t, t)
        # bf16: per block two modulations (to the Linear's dtype) and two residuals (fp32), and the output layer's
        # modulation; fp32: none (every operand fp32: ATen's addcmul)
        assert len(calls) == (4 * cfg.n_blocks + 1 if dtype != F32 else 0)
        assert calls.count(dtype) == (2 * cfg.n_blocks + 1 if dtype != F32 else 0)
        monkeypatch.setattr(flm_rt.model, "_cpu_op", lambda x, op: op != "scaled_add" and real_cpu_op(x, op))
        plain = model.denoiser(x, t, t)
    assert torch.equal(fused, plain)  # the same bits through all blocks
