"""flm_rt::gelu_tanh_ -- in place x <- gelu(x, approximate="tanh") computed in float32, stored in float32 / bf16 /
fp16 -- against its PyTorch reference and against the formula in float64, and its use by flm_rt.prepack (the MLP's
first product, without oneDNN's fused GELU post-op).

Tolerance (flm_rt/ops.py): |kernel - reference| <= 4e-6 |reference| + 1e-7 |x| + eps(dtype) |reference|, eps 0 for
float32 (one rounding to bf16 / fp16 apart otherwise). The kernel evaluates x / (1 + exp(-2u)) with ATen's fast exp
(20 ulp); the reference's 1 + tanh(u) cancels for negative x (its error there is about 1e-7 |x|, absolute). Against
the formula in float64 the kernel is within 2e-5 relative wherever the result is a normal float and exp(-2u) is
finite in float32 (x > -9.9; below, both give about 0); the worst case, 1.3e-5 near x = -9.8, is the rounding of the
float32 argument 2u ~ 87 (1 ulp of it is 7.6e-6 relative in exp), which any float32 evaluation carries. 0, +-inf and NaN give what the reference gives.
"""
import pytest
import torch
import torch.nn.functional as F

from flm_rt import _ext, ops, prepack

pytestmark = pytest.mark.skipif(not (_ext.EXT_LOADED and _ext.has_kernel("gelu_tanh_", "cpu")),
                                reason="flm_rt._C without the gelu_tanh_ kernel")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SHAPES = [(1,), (7,), (3, 17), (2, 128, 3072), (33, 1000)]  # below one vector, tails, the MLP's width
SQRT_2_OVER_PI = 0.7978845608028654


def data(shape, dist, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if dist == "wide":
        x = x * 6
    elif dist == "uniform":
        x = torch.rand(shape, generator=g, dtype=torch.float64) * 24 - 12
    elif dist == "heavy":
        x = x / torch.rand(shape, generator=g, dtype=torch.float64).clamp_min(1e-3)
    return x


def within_bound(got: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    ref = ops.gelu_tanh_reference(x).float()
    eps = 0.0 if x.dtype == F32 else torch.finfo(x.dtype).eps
    bound = (4e-6 + eps) * ref.abs() + 1e-7 * x.float().abs()
    d = (got.float() - ref).abs()
    same_special = (got.float().isnan() == ref.isnan()) & ((got.float() == ref) | d.le(bound) | ref.isnan())
    return same_special


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("dist", ["normal", "wide", "uniform", "heavy"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_within_bound(shape, dist, dtype):
    x = data(shape, dist, seed=sum(shape)).to(dtype)
    got = x.clone()
    assert ops.gelu_tanh_(got, backend="ext") is got
    ok = within_bound(got, x)
    assert ok.all(), (x[~ok][:5], got[~ok][:5], ops.gelu_tanh_reference(x)[~ok][:5])
    if x.numel() >= 7:
        assert not torch.equal(got, x)  # it did write


def test_float32_against_the_formula_in_float64():
    x = torch.cat([torch.linspace(-12, 12, 400_001), torch.randn(50_000) * 3])
    xd = x.double()
    truth = xd / (1 + torch.exp(-2 * SQRT_2_OVER_PI * (xd + 0.044715 * xd**3)))
    got = ops.gelu_tanh_(x.clone(), backend="ext").double()
    # where the result is a normal float and exp(-2u) is finite in float32 (beyond, the kernel returns +-0)
    normal = (truth.abs() >= torch.finfo(F32).tiny) & (truth.abs() > 1e-37 * xd.abs())
    rel = ((got - truth).abs() / truth.abs())[normal]
    assert rel.max().item() < 2e-5
    assert (got[~normal].abs() <= truth[~normal].abs() + torch.finfo(F32).tiny).all()  # about 0, not garbage


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_specials(dtype):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([0.0, -0.0, inf, -inf, nan, 1e4, -1e4, 1e-30, -1e-30, 88.0, -88.0, 3.0, -3.0]).to(dtype)
    got = ops.gelu_tanh_(x.clone(), backend="ext")
    ref = ops.gelu_tanh_reference(x)
    assert torch.equal(got.isnan(), ref.isnan())
    assert within_bound(got, x).all(), (got, ref)
    assert got[2] == inf and got[3].isnan() and got[4].isnan()  # F.gelu: gelu(inf) = inf, gelu(-inf) = NaN


def test_strided_views_write_only_their_elements():
    base = torch.randn(40, 96) * 3
    poison = base.clone()
    view = poison[3:30:2, 5:80].t()  # neither contiguous nor a whole tensor
    want_view = ops.gelu_tanh_reference(view)
    ops.gelu_tanh_(view, backend="ext")
    assert within_bound(view, base[3:30:2, 5:80].t()).all()
    torch.testing.assert_close(view, want_view, rtol=4e-6, atol=1e-6)
    mask = torch.ones_like(base, dtype=torch.bool)
    mask[3:30:2, 5:80] = False
    assert torch.equal(poison[mask], base[mask])  # untouched outside the view
    empty = torch.empty(0, 5)
    assert ops.gelu_tanh_(empty, backend="ext").shape == (0, 5)


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.randn(4, dtype=torch.float64), "x must be float32, bfloat16 or float16"),
    (lambda: torch.arange(4), "x must be float32, bfloat16 or float16"),
])
def test_bad_arguments_raise_clear_errors(bad, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flm_rt.gelu_tanh_(bad())


def test_opcheck_and_not_differentiable():
    x = torch.randn(5, 19) * 2
    torch.library.opcheck(torch.ops.flm_rt.gelu_tanh_.default, (x.clone(),))
    torch.library.opcheck(torch.ops.flm_rt.gelu_tanh_.default, (x.clone().to(BF16),))
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.ops.flm_rt.gelu_tanh_(x.clone().requires_grad_())


def test_torch_backend_is_the_reference():
    x = torch.randn(3, 50) * 4
    assert torch.equal(ops.gelu_tanh_(x.clone(), backend="torch"), F.gelu(x, approximate="tanh"))


@pytest.mark.skipif(not prepack._HAVE_ONEDNN_LINEAR, reason="torch built without the oneDNN linear ops")
def test_prepack_runs_the_product_then_this_pass(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 64, 96, generator=g), torch.randn(384, 96, generator=g) / 10, torch.randn(384, generator=g)
    calls = []
    real = ops.gelu_tanh_
    monkeypatch.setattr(ops, "gelu_tanh_", lambda t, **k: calls.append(t.shape) or real(t, **k))
    with torch.inference_mode():
        got = prepack.linear(x, w, b, activation="gelu_tanh")
    assert calls == [torch.Size([2, 64, 384])]
    want = F.gelu(F.linear(x, w, b), approximate="tanh")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # without the kernel (FLM_RT_KERNELS=torch) or with FLM_RT_GELU_PASS=0, oneDNN's fused GELU post-op instead
    for var, value in (("FLM_RT_KERNELS", "torch"), ("FLM_RT_GELU_PASS", "0")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            prepack.clear_cache()
            calls.clear()
            with torch.inference_mode():
                fused = prepack.linear(x, w, b, activation="gelu_tanh")
            assert calls == [], var
            torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
    prepack.clear_cache()
