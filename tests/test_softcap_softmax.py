"""flm_rt::softcap_softmax(_) -- the blocks' attention probabilities softmax(cap * tanh(scale * x)) -- against its
PyTorch reference, and its use by the bf16 model on the CPU.

Tolerances: float32 storage |kernel - reference| <= 1e-6 + 1e-5 |reference| (SLEEF 1-ULP tanh and exp against
ATen's; different summation order). bf16 / fp16 storage: within one unit in the last place of the exactly
computed (float64) probabilities, i.e. no worse than rounding the exact value (the kernel's fast exp/tanh have
~2e-6 relative error, far below 2^-8 / 2^-11), except that probabilities near float32's smallest normal
(from 2^-124 ~ 4.7e-38 down: exp(y) for y < -87) may flush to zero.
"""
import pytest
import torch

import flm_rt
from flm_rt import _ext, ops

needs_op = pytest.mark.skipif(not (_ext.EXT_LOADED and _ext.has_kernel("softcap_softmax", "cpu")),
                              reason="flm_rt._C without the softcap_softmax kernel")
pytestmark = needs_op

CAP = 50.0
SCALE = 1.0 / (8.0 * CAP)  # head_dim 64
ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
SHAPES = [(1, 1), (3, 7), (2, 3, 5, 17), (4, 130), (2, 1024), (1, 2, 3, 4113)]
SCALES_OF_X = (0.01, 3.0, 60.0, 1e4)  # |scale * x| around 1e-5 (tanh ~ linear), 0.02, 0.4 (tanh's two branches), 50


def sample(shape, spread, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * spread).to(dtype)


def check_close(got, x, scale, cap):
    exact = ops.softcap_softmax_reference(x.double(), scale, cap)
    assert got.dtype == x.dtype and got.shape == x.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, atol=1e-6, rtol=1e-5)
    else:
        err = (got.double() - exact).abs()
        # one ulp of the exact value; probabilities below ~4x float32's smallest normal (2^-124) may flush to 0
        tiny = max(4 * torch.finfo(torch.float32).smallest_normal, torch.finfo(x.dtype).smallest_normal * ULP[x.dtype])
        bound = (exact.abs() * ULP[x.dtype]).clamp_min(tiny) * 1.01  # + the kernel's ~2e-6 relative error at a rounding tie
        assert bool((err <= bound).all()), f"max error {float((err / bound).max()):.3f} ulp"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spread", SCALES_OF_X)
def test_matches_reference(dtype, shape, spread):
    x = sample(shape, spread, dtype, seed=len(shape) * 7 + int(spread))
    for cap in (CAP, 0.0):
        got = torch.ops.flm_rt.softcap_softmax(x, SCALE, cap)
        if cap == 0.0 and spread > 100:
            # no cap: scale * x up to ~100, exp overflows nowhere (max subtracted), still a valid softmax
            assert torch.isfinite(got).all()
        check_close(got, x, SCALE, cap)
        assert torch.allclose(got.float().sum(-1), torch.ones(shape[:-1]), atol=1e-5 if dtype == torch.float32
                              else shape[-1] * ULP[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_equals_functional_and_writes_only_x(dtype):
    x = sample((3, 12, 40), 30.0, dtype, seed=1)
    want = torch.ops.flm_rt.softcap_softmax(x, SCALE, CAP)
    buf = torch.full((3 * 12 * 40 + 8,), -7.0, dtype=dtype)  # poison around a view
    view = buf[4:-4].view(3, 12, 40)
    view.copy_(x)
    assert ops.softcap_softmax_(view, SCALE, CAP, backend="ext") is view
    assert torch.equal(view, want)
    assert bool((buf[:4] == -7).all() and (buf[-4:] == -7).all())


def test_non_contiguous_input():
    x = sample((6, 33, 20), 5.0, torch.bfloat16, seed=2)
    xt = x.transpose(1, 2)  # [6, 20, 33], rows not contiguous
    want = ops.softcap_softmax_reference(xt, SCALE, CAP)
    got = torch.ops.flm_rt.softcap_softmax(xt, SCALE, CAP)
    check_close(got, xt, SCALE, CAP)
    y = xt.clone().transpose(1, 2).contiguous().transpose(1, 2)  # same values, same strides as xt
    torch.ops.flm_rt.softcap_softmax_(y, SCALE, CAP)
    assert torch.equal(y, got) and y.stride() == xt.stride()
    assert (want.float() - got.float()).abs().max() <= 2 ** -8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_like_torch_softmax(dtype):
    x = sample((5, 37), 10.0, dtype, seed=3)
    x[1, 5] = float("nan")
    x[2, 0] = float("inf")
    x[3, 36] = float("-inf")
    x[4, :] = float("-inf")
    for cap in (CAP, 0.0):
        got = torch.ops.flm_rt.softcap_softmax(x, SCALE, cap).float()
        want = ops.softcap_softmax_reference(x, SCALE, cap).float()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), cap
        ok = ~torch.isnan(want)
        torch.testing.assert_close(got[ok], want[ok], atol=2 ** -8, rtol=0)
    # with the cap, +-inf scores are +-cap: the rows stay finite; a NaN poisons its row only
    capped = torch.ops.flm_rt.softcap_softmax(x, SCALE, CAP).float()
    assert torch.isnan(capped[1]).all() and torch.isfinite(capped[[0, 2, 3, 4]]).all()


def test_empty_and_bad_inputs():
    assert torch.ops.flm_rt.softcap_softmax(torch.empty(0, 5), SCALE, CAP).shape == (0, 5)
    assert torch.ops.flm_rt.softcap_softmax(torch.empty(3, 0), SCALE, CAP).shape == (3, 0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.flm_rt.softcap_softmax(torch.ones(2, 3, dtype=torch.int32), SCALE, CAP)
    with pytest.raises(RuntimeError, match="at least one dimension"):
        torch.ops.flm_rt.softcap_softmax(torch.tensor(1.0), SCALE, CAP)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        torch.ops.flm_rt.softcap_softmax(torch.ones(2, 3), float("nan"), CAP)
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="derivative for flm_rt::softcap_softmax is not implemented"):
        torch.ops.flm_rt.softcap_softmax(x, SCALE, CAP).sum().backward()
    with pytest.raises(NotImplementedError, match="not differentiable"):
        torch.ops.flm_rt.softcap_softmax_(x.clone(), SCALE, CAP)


def test_opcheck():
    x = sample((2, 3, 9), 20.0, torch.float32, seed=4)
    torch.library.opcheck(torch.ops.flm_rt.softcap_softmax.default, (x, SCALE, CAP))
    torch.library.opcheck(torch.ops.flm_rt.softcap_softmax.default, (x.bfloat16(), SCALE, 0.0))
    torch.library.opcheck(torch.ops.flm_rt.softcap_softmax_.default, (x.clone(), SCALE, CAP))


def test_compile_traces_through_the_op():
    x = sample((2, 4, 33), 20.0, torch.bfloat16, seed=5)
    fn = torch.compile(lambda t: torch.ops.flm_rt.softcap_softmax(t, SCALE, CAP), fullgraph=True, backend="eager")
    assert torch.equal(fn(x), torch.ops.flm_rt.softcap_softmax(x, SCALE, CAP))


def _count_calls(monkeypatch) -> list:
    """Replace ops.softcap_softmax_ by a wrapper recording (dtype, shape) of each call; returns the record."""
    calls = []
    real = ops.softcap_softmax_

    def counting(s, scale, cap, **kw):
        calls.append((s.dtype, tuple(s.shape)))
        return real(s, scale, cap, **kw)

    monkeypatch.setattr(ops, "softcap_softmax_", counting)
    return calls


def test_bf16_model_uses_the_fused_pass(monkeypatch):
    """The bf16 denoiser on the CPU calls the op once per block, and its output stays within bf16 noise of the plain
    path (which caps in bf16 arithmetic and round-trips the softmax through fp32)."""
    from flm_rt.api import random_model
    from flm_rt.model import preset_config

    model = random_model(preset_config("tiny"), seed=0, dtype=torch.bfloat16)
    cfg = model.config
    x = torch.randn(2, 16, cfg.vocab_size, generator=torch.Generator().manual_seed(6))
    t = torch.full((2,), 0.3)
    calls = _count_calls(monkeypatch)
    with torch.inference_mode():
        fused = model.denoiser(x, t, t if cfg.two_time else None).float()
        assert len(calls) == cfg.n_blocks and all(c[0] == torch.bfloat16 for c in calls)
        monkeypatch.setattr(flm_rt.model, "_cpu_op", lambda x, op: False)
        plain = model.denoiser(x, t, t if cfg.two_time else None).float()
    assert len(calls) == cfg.n_blocks
    rel = (fused - plain).norm() / plain.norm()
    assert 0 < rel < 2e-2, rel  # different rounding (fp32 capping), same function


def test_fp32_model_uses_the_fused_pass_with_the_same_logits_and_ids(monkeypatch):
    """In fp32 CPU inference each block's probabilities are one in-place pass of the op over the shared score
    buffer (1.8x ATen's four passes at [8, 12, 128, 128] on a Zen 5): logits within 1e-5 of ATen's tanh and
    softmax, same argmax ids, and not used where autograd needs the plain ops."""
    from flm_rt.api import random_model
    from flm_rt.model import preset_config

    model = random_model(preset_config("tiny"), seed=1, output_scale=8.0)
    cfg = model.config
    x = torch.randn(3, cfg.length, cfg.vocab_size, generator=torch.Generator().manual_seed(7))
    t = torch.full((3,), 0.4)
    calls = _count_calls(monkeypatch)
    with torch.inference_mode():
        fused = model.denoiser(x, t, t)
        assert calls == [(torch.float32, (3, cfg.n_heads, cfg.length, cfg.length))] * cfg.n_blocks
        monkeypatch.setattr(flm_rt.model, "_fused_softmax", lambda s: False)
        plain = model.denoiser(x, t, t)
    assert len(calls) == cfg.n_blocks
    rel = ((fused - plain).norm() / plain.norm()).item()
    assert 0 <= rel < 1e-5, rel
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))
    monkeypatch.undo()
    calls = _count_calls(monkeypatch)
    xg = x.clone().requires_grad_(True)
    model.denoiser(xg, t, t).sum().backward()  # autograd: the plain ops, differentiable
    assert calls == [] and xg.grad is not None and xg.grad.abs().sum() > 0
