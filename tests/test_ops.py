"""Compiled operators (flm_rt._C) against their PyTorch references (flm_rt.ops.*_reference).

Tolerances: flow_map_step agrees with the reference to float32 rounding: rtol 1e-5, atol 1e-6 on z_out
(rtol 3e-5 for V > 4096, where torch's own float32 softmax drifts), and the probabilities alone (a=0, b=1)
are within rtol 5e-6 of a float64 evaluation for every element. vocab_argmax must equal torch.max /
torch.argmax exactly (indices and values, NaN included).

Decisions tested here: non-contiguous inputs are supported (copied to contiguous); an empty vocabulary
(V == 0) or a 0-dim tensor is an error, zero rows give empty results (as torch); with no soft-cap a row of
all -inf logits gives NaN (as torch.softmax), with a soft-cap it gives a uniform distribution.
Every test runs on CPU and, when a GPU is present, on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flm_rt import _ext, ops

# Every test of a compiled kernel needs flm_rt._C; the reference path (test_reference_path_is_exportable) does not.
needs_ext = pytest.mark.skipif(not _ext.EXT_LOADED, reason=f"flm_rt._C not loaded: {_ext.EXT_ERROR}")
HAS_CUDA = torch.cuda.is_available()
CUDA_BUILT = _ext.EXT_LOADED and _ext.has_kernel("flow_map_step", "cuda")
DEVICES = [
    pytest.param("cpu", id="cpu", marks=needs_ext),
    pytest.param("cuda", id="cuda", marks=[
        needs_ext,
        pytest.mark.cuda,
        pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available"),
        pytest.mark.skipif(HAS_CUDA and not CUDA_BUILT, reason="flm_rt._C built without CUDA kernels"),
    ]),
]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
RTOL, ATOL = 1e-5, 1e-6
RTOL_TRUE = 5e-6  # probabilities vs a float64 evaluation of the same float32 inputs


def rtol_vs_reference(V: int) -> float:
    # The reference's own float32 softmax (torch) loses ~1e-5 relative at V ~ 1e5 in its row sum
    # (measured 1.1e-5 at V = 131075 against float64, where the kernel is at 1.4e-6: compensated sums).
    return RTOL if V <= 4096 else 3e-5


def softmax64(logits: torch.Tensor, cap: float) -> torch.Tensor:
    x = logits.double()
    if cap > 0:
        x = cap * torch.tanh(x / cap)
    return torch.softmax(x, dim=-1)

# (V, rows) pairs: tiny / odd / vector-width edges, a medium vocabulary, the LM1B vocabulary, > 2^17.
V_ROWS = [(1, 37), (2, 300), (7, 129), (8, 64), (9, 257), (31, 50), (1000, 23), (30522, 3), (2**17 + 3, 1)]
DISTS = ["normal", "huge", "tiny", "const", "neginf", "allneginf"]


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def make_logits(rows: int, V: int, dist: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    if dist == "normal":
        x = torch.randn(rows, V, generator=g) * 4
    elif dist == "huge":
        x = (torch.rand(rows, V, generator=g) * 2 - 1) * 1e4
    elif dist == "tiny":
        x = torch.randn(rows, V, generator=g) * 1e-6
    elif dist == "const":  # every row constant: all ties
        x = torch.randn(rows, 1, generator=g).expand(rows, V).contiguous()
    elif dist == "neginf":  # some -inf entries
        x = torch.randn(rows, V, generator=g) * 3
        x[torch.rand(rows, V, generator=g) < 0.3] = float("-inf")
    elif dist == "allneginf":  # first row entirely -inf, others partly
        x = torch.randn(rows, V, generator=g)
        x[torch.rand(rows, V, generator=g) < 0.5] = float("-inf")
        x[0] = float("-inf")
    elif dist == "nan":  # NaNs in some rows, sometimes several per row, at the edges too
        x = torch.randn(rows, V, generator=g)
        x[torch.rand(rows, V, generator=g) < 0.02] = float("nan")
        x[0, -1] = float("nan")
        if rows > 1:
            x[1, 0] = float("nan")
    else:
        raise ValueError(dist)
    return x.to(dtype)


def coeffs(rows: int, seed: int = 1):
    g = _gen(seed)
    return torch.rand(rows, generator=g), torch.rand(rows, generator=g), torch.rand(rows, generator=g)


def ext_step(*args, **kw):
    return ops.flow_map_step(*args, backend="ext", **kw)


def ref_step(*args, **kw):
    return ops.flow_map_step_reference(*args, **kw)


def assert_argmax_exact(x: torch.Tensor) -> None:
    idx, val = ops.vocab_argmax(x, backend="ext")
    rv, ri = torch.max(x, dim=-1)
    assert idx.dtype == torch.int64 and val.dtype == x.dtype
    assert idx.shape == ri.shape and val.shape == rv.shape
    assert torch.equal(idx.cpu(), ri.cpu()), (idx, ri)
    assert torch.equal(idx.cpu(), torch.argmax(x, dim=-1).cpu())
    torch.testing.assert_close(val.cpu(), rv.cpu(), rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------------
# flow_map_step
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("V,rows", V_ROWS, ids=[f"V{v}x{r}" for v, r in V_ROWS])
def test_step_matches_reference(V, rows, dtype, dist, device):
    logits = make_logits(rows, V, dist, dtype, seed=V + rows).to(device)
    g = _gen(7)
    z = torch.randn(rows, V, generator=g).to(device)
    eps = torch.randn(rows, V, generator=g).to(device)
    a, b, c = (t.to(device) for t in coeffs(rows))
    for cap in (30.0, 0.0):
        out = ext_step(z, logits, a, b, c, eps, cap)
        ref = ref_step(z, logits, a, b, c, eps, cap)
        assert out.dtype == torch.float32 and out.shape == z.shape and out.device == z.device
        torch.testing.assert_close(out, ref, rtol=rtol_vs_reference(V), atol=ATOL, equal_nan=True)
        # probabilities alone: relative accuracy down to the smallest ones, against float64 and the reference
        p = ext_step(z, logits, 0.0, 1.0, 0.0, None, cap)
        pr = ref_step(z, logits, 0.0, 1.0, 0.0, None, cap)
        torch.testing.assert_close(p, pr, rtol=rtol_vs_reference(V), atol=1e-30, equal_nan=True)
        torch.testing.assert_close(p.double(), softmax64(logits, cap), rtol=RTOL_TRUE, atol=1e-30, equal_nan=True)
        # rows of only -inf are NaN without a cap (as torch.softmax); every other row is a distribution
        ok = torch.ones(rows, dtype=torch.bool, device=device) if cap > 0 else ~torch.isneginf(logits).all(-1)
        assert torch.isfinite(p[ok]).all() and torch.isnan(p[~ok]).all()
        torch.testing.assert_close(p[ok].double().sum(-1), torch.ones_like(p[ok][:, 0], dtype=torch.float64),
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_step_all_neginf_row(device):
    """Defined behaviour: no cap -> NaN row (torch.softmax of all -inf); cap -> tanh(-inf) = -1 -> uniform."""
    logits = torch.full((2, 5), float("-inf"), device=device)
    logits[1] = torch.tensor([0.0, 1.0, float("-inf"), 2.0, 3.0])
    z = torch.zeros(2, 5, device=device)
    p0 = ext_step(z, logits, 0.0, 1.0, 0.0, None, 0.0)
    assert torch.isnan(p0[0]).all() and torch.isfinite(p0[1]).all()
    assert torch.isnan(ref_step(z, logits, 0.0, 1.0, 0.0, None, 0.0)[0]).all()
    p30 = ext_step(z, logits, 0.0, 1.0, 0.0, None, 30.0)
    torch.testing.assert_close(p30[0], torch.full((5,), 0.2, device=device), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cap", [30.0, 5.0, 0.5, 60.0, 61.0, 100.0, 1e6, 0.0, -1.0])
def test_step_caps(cap, device):
    """cap <= 0 means no soft-cap; caps above 60 take the max-subtracted path; all must match."""
    rows, V = 17, 1003
    logits = make_logits(rows, V, "normal", torch.float32, seed=3).to(device) * 20
    z = torch.randn(rows, V, device=device)
    eps = torch.randn(rows, V, device=device)
    a, b, c = (t.to(device) for t in coeffs(rows, 5))
    torch.testing.assert_close(ext_step(z, logits, a, b, c, eps, cap), ref_step(z, logits, a, b, c, eps, cap),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_step_broadcast_coefficients(device):
    B, L, V = 3, 5, 37
    z = torch.randn(B, L, V, device=device)
    logits = torch.randn(B, L, V, device=device).to(torch.bfloat16)
    eps = torch.randn(B, L, V, device=device)
    choices = [
        0.25,
        torch.tensor(0.5, device=device),
        torch.tensor([0.75], device=device),
        torch.rand(B, 1, device=device),
        torch.rand(B, L, device=device),
        torch.rand(L, device=device),
        torch.rand(1, L, device=device),
        torch.rand(B, 1, device=device, dtype=torch.float64),  # converted to float32
    ]
    for i, a in enumerate(choices):
        b = choices[(i + 3) % len(choices)]
        c = choices[(i + 5) % len(choices)]
        for e in (eps, None):
            torch.testing.assert_close(ext_step(z, logits, a, b, c, e, 30.0), ref_step(z, logits, a, b, c, e, 30.0),
                                       rtol=RTOL, atol=ATOL)
    with pytest.raises(RuntimeError, match="not broadcastable"):
        ext_step(z, logits, torch.rand(B + 1, 1, device=device), 1.0, 0.0, None, 30.0)
    with pytest.raises(RuntimeError):
        ref_step(z, logits, torch.rand(B + 1, 1, device=device), 1.0, 0.0, None, 30.0)


@pytest.mark.parametrize("device", DEVICES)
def test_step_eps_none_drops_c_term(device):
    z = torch.randn(4, 33, device=device)
    logits = torch.randn(4, 33, device=device)
    out = ext_step(z, logits, 0.3, 0.7, 123.0, None, 30.0)
    torch.testing.assert_close(out, ref_step(z, logits, 0.3, 0.7, 0.0, None, 30.0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_step_non_contiguous_inputs(device):
    """Non-contiguous z, logits, eps (and coefficient views) are supported."""
    base = torch.randn(6, 2 * 301, device=device)
    z = base[:, ::2]
    logits = torch.randn(301, 6, device=device).to(torch.float16).t()
    eps = torch.randn(6, 301, 2, device=device)[..., 1]
    a = torch.rand(6, 2, device=device)[:, 0]
    assert not z.is_contiguous() and not logits.is_contiguous() and not eps.is_contiguous()
    out = ext_step(z, logits, a, 0.9, 0.1, eps, 30.0)
    torch.testing.assert_close(out, ref_step(z, logits, a, 0.9, 0.1, eps, 30.0), rtol=RTOL, atol=ATOL)
    assert out.is_contiguous()
    # in-place into a non-contiguous z
    ref = ref_step(z, logits, a, 0.9, 0.1, eps, 30.0)
    res = ops.flow_map_step_(z, logits, a, 0.9, 0.1, eps, 30.0, backend="ext")
    assert res.data_ptr() == z.data_ptr()
    torch.testing.assert_close(z, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_step_inplace_matches_functional(dtype, device):
    rows, V = 9, 4099
    z = torch.randn(rows, V, device=device)
    logits = torch.randn(rows, V, device=device).to(dtype)
    eps = torch.randn(rows, V, device=device)
    a, b, c = (t.to(device) for t in coeffs(rows))
    expected = ext_step(z, logits, a, b, c, eps, 30.0)
    zz = z.clone()
    out = ops.flow_map_step_(zz, logits, a, b, c, eps, 30.0, backend="ext")
    assert out is zz or out.data_ptr() == zz.data_ptr()
    assert torch.equal(zz, expected)
    ztorch = z.clone()
    ops.flow_map_step_(ztorch, logits, a, b, c, eps, 30.0, backend="torch")
    torch.testing.assert_close(zz, ztorch, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_step_poisoned_output_fully_written(device):
    """Output memory pre-filled with NaN (through the allocator's reuse, and in place) is fully overwritten."""
    for rows, V in [(5, 1), (3, 7), (2, 4101), (1, 70001)]:
        z = torch.randn(rows, V, device=device)
        logits = torch.randn(rows, V, device=device)
        poison = torch.full((rows, V), float("nan"), device=device)
        del poison  # the caching allocator (CUDA) hands this block to the next allocation
        out = ext_step(z, logits, 0.5, 0.5, 0.0, None, 30.0)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref_step(z, logits, 0.5, 0.5, 0.0, None, 30.0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_step_zero_rows_and_shapes(device):
    z = torch.randn(0, 5, device=device)
    out = ext_step(z, z, 1.0, 1.0, 0.0, None, 30.0)
    assert out.shape == (0, 5)
    z1 = torch.randn(11, device=device)  # 1-D: a single row
    torch.testing.assert_close(ext_step(z1, z1 * 3, 0.5, 0.5, 0.0, None, 30.0),
                               ref_step(z1, z1 * 3, 0.5, 0.5, 0.0, None, 30.0), rtol=RTOL, atol=ATOL)
    z4 = torch.randn(2, 3, 4, 19, device=device)
    a = torch.rand(2, 1, 1, device=device)
    torch.testing.assert_close(ext_step(z4, z4 * 2, a, 0.5, 0.0, None, 30.0),
                               ref_step(z4, z4 * 2, a, 0.5, 0.0, None, 30.0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_step_bad_inputs(device):
    op = torch.ops.flm_rt.flow_map_step
    z = torch.randn(2, 5, device=device)
    lg = torch.randn(2, 5, device=device)
    one = torch.ones(1, device=device)
    two = torch.ones(2, device=device)
    cases = [
        ((z.double(), lg, one, one, one, None, 30.0), "z must be float32"),
        ((z, lg.double(), one, one, one, None, 30.0), "logits must be float32, bfloat16 or float16"),
        ((z, lg.to(torch.int32), one, one, one, None, 30.0), "logits must be float32, bfloat16 or float16"),
        ((z, torch.randn(2, 6, device=device), one, one, one, None, 30.0), "same shape"),
        ((z, lg, one, one, one, torch.randn(2, 4, device=device), 30.0), "eps must have the shape"),
        ((z, lg, one, one, one, torch.randn(2, 5, device=device).double(), 30.0), "eps must be float32"),
        ((z, lg, torch.ones(3, device=device), one, one, None, 30.0), "coefficient a must have 1 element or one per row"),
        ((z, lg, one, torch.ones(4, device=device), one, None, 30.0), "coefficient b"),
        ((z, lg, one, one, two.double(), None, 30.0), "coefficient c must be float32"),
        ((z[:, :0], lg[:, :0], one, one, one, None, 30.0), "must be non-empty"),
        ((z[0, 0], lg[0, 0], one, one, one, None, 30.0), "at least one dimension"),
        ((z, lg.to("meta"), one, one, one, None, 30.0), "device"),
        ((z, lg, one.to("meta"), one, one, None, 30.0), "device"),
    ]
    if device == "cuda":
        cases += [
            ((z, lg.cpu(), one, one, one, None, 30.0), "same device"),
            ((z, lg, one.cpu(), one, one, None, 30.0), "coefficient a must be on the device"),
            ((z, lg, one, one, one, torch.randn(2, 5), 30.0), "eps must be on the same device"),
        ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)
    # the in-place variant validates the same way
    with pytest.raises(RuntimeError, match="z must be float32"):
        torch.ops.flm_rt.flow_map_step_(z.double(), lg, one, one, one, None, 30.0)
    # and the Python wrapper reports wrong-length coefficients
    with pytest.raises(RuntimeError, match="coefficient a"):
        ext_step(z, lg, torch.ones(3, device=device), 1.0, 0.0, None, 30.0)


# ------------------------------------------------------------------------------------------------------
# vocab_argmax
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dist", ["normal", "huge", "tiny", "const", "neginf", "allneginf", "nan"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("V,rows", V_ROWS, ids=[f"V{v}x{r}" for v, r in V_ROWS])
def test_argmax_exact(V, rows, dtype, dist, device):
    assert_argmax_exact(make_logits(rows, V, dist, dtype, seed=2 * V + rows).to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_argmax_ties_and_signed_zero(dtype, device):
    V = 5000
    x = torch.zeros(6, V, dtype=dtype)
    x[0, [17, 4000, 4999]] = 1  # ties at the maximum, across vector chunks
    x[1] = -0.0
    x[1, 3000] = 0.0  # -0 == +0: first index wins
    x[2, 2047:2050] = 5  # tie straddling a chunk boundary
    x[3, -1] = 2
    x[4, 0] = float("nan")
    x[4, 10] = float("inf")
    x[5, 100] = float("inf")
    x[5, 4097] = float("nan")
    x[5, 4098] = float("nan")
    assert_argmax_exact(x.to(device))
    assert_argmax_exact(x.to(device).flip(-1).contiguous())


@pytest.mark.parametrize("device", DEVICES)
def test_argmax_shapes_and_noncontiguous(device):
    x = torch.randn(3, 4, 257, device=device)
    assert_argmax_exact(x)
    assert_argmax_exact(x.transpose(0, 1))  # non-contiguous: supported
    assert_argmax_exact(x[..., ::3])
    assert_argmax_exact(torch.randn(1001, device=device))  # 1-D -> 0-dim outputs
    idx, val = ops.vocab_argmax(torch.randn(0, 7, device=device), backend="ext")
    assert idx.shape == (0,) and val.shape == (0,)
    # rows at a misaligned offset (odd V) for every row start
    assert_argmax_exact(torch.randn(70, 33, device=device).to(torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
def test_argmax_bad_inputs(device):
    op = torch.ops.flm_rt.vocab_argmax
    for x, msg in [
        (torch.randn(3, 4, device=device).double(), "x must be float32, bfloat16 or float16"),
        (torch.randint(0, 5, (3, 4), device=device), "x must be float32, bfloat16 or float16"),
        (torch.randn(3, 0, device=device), "empty vocabulary"),
        (torch.tensor(1.0, device=device), "at least one dimension"),
    ]:
        with pytest.raises(RuntimeError, match=msg):
            op(x)


# ------------------------------------------------------------------------------------------------------
# Property tests
# ------------------------------------------------------------------------------------------------------
_special = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e4, -1e4, 1e-6, float("inf"), float("-inf"), float("nan")])
_values = st.one_of(st.floats(-1e4, 1e4, width=32), _special)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 6), V=st.integers(1, 70), data=st.data(),
       dtype=st.sampled_from(FLOATS))
def test_argmax_property(device, rows, V, data, dtype):
    vals = data.draw(st.lists(_values, min_size=rows * V, max_size=rows * V))
    x = torch.tensor(vals, dtype=torch.float32).reshape(rows, V).to(dtype).to(device)
    assert_argmax_exact(x)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 8), V=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-6, 1.0, 10.0, 1e3]), cap=st.sampled_from([30.0, 0.0, 3.0, 80.0]),
       a=st.floats(-2, 2), b=st.floats(-2, 2), c=st.floats(-2, 2), with_eps=st.booleans(),
       dtype=st.sampled_from(FLOATS))
def test_step_property(device, rows, V, seed, scale, cap, a, b, c, with_eps, dtype):
    g = _gen(seed)
    z = torch.randn(rows, V, generator=g).to(device)
    logits = (torch.randn(rows, V, generator=g) * scale).to(dtype).to(device)
    eps = torch.randn(rows, V, generator=g).to(device) if with_eps else None
    torch.testing.assert_close(ext_step(z, logits, a, b, c, eps, cap), ref_step(z, logits, a, b, c, eps, cap),
                               rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------------
# torch.library.opcheck (schema, fake/meta kernels, dispatcher registration)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    z = torch.randn(3, 4, 41, device=device)
    lg = torch.randn(3, 4, 41, device=device).to(torch.bfloat16)
    eps = torch.randn(3, 4, 41, device=device)
    a = torch.rand(12, device=device)
    one = torch.ones(1, device=device)
    torch.library.opcheck(torch.ops.flm_rt.flow_map_step.default, (z, lg, a, one, a, eps, 30.0))
    torch.library.opcheck(torch.ops.flm_rt.flow_map_step.default, (z, lg.float(), one, a, one, None, 0.0))
    torch.library.opcheck(torch.ops.flm_rt.flow_map_step_.default, (z.clone(), lg, a, one, a, eps, 30.0))
    torch.library.opcheck(torch.ops.flm_rt.vocab_argmax.default, (lg,))
    torch.library.opcheck(torch.ops.flm_rt.vocab_argmax.default, (z,))


# ------------------------------------------------------------------------------------------------------
# Backend selection and traceability of the reference path
# ------------------------------------------------------------------------------------------------------
@needs_ext
def test_backend_selection(monkeypatch):
    monkeypatch.delenv("FLM_RT_KERNELS", raising=False)
    assert ops.kernels_backend("cpu", torch.float32) == "ext"
    assert ops.kernels_backend("cpu", torch.bfloat16, "vocab_argmax") == "ext"
    assert ops.kernels_backend("cpu", torch.float64) == "torch"
    assert ops.kernels_backend("meta", torch.float32) == "torch"
    assert ops.kernels_backend("cpu", torch.float32, backend="torch") == "torch"
    with pytest.raises(RuntimeError, match="float64"):
        ops.kernels_backend("cpu", torch.float64, backend="ext")
    with pytest.raises(RuntimeError, match="no meta kernel"):
        ops.kernels_backend("meta", torch.float32, backend="ext")
    monkeypatch.setenv("FLM_RT_KERNELS", "torch")
    assert ops.kernels_backend("cpu", torch.float32) == "torch"
    monkeypatch.setenv("FLM_RT_KERNELS", "ext")
    assert ops.kernels_backend("cpu", torch.float32) == "ext"
    monkeypatch.setenv("FLM_RT_KERNELS", "fast")
    with pytest.raises(ValueError, match="FLM_RT_KERNELS"):
        ops.kernels_backend("cpu", torch.float32)
    with pytest.raises(ValueError, match="backend"):
        ops.vocab_argmax(torch.randn(2, 3), backend="cuda")


@needs_ext
def test_auto_dispatch_uses_ext_and_falls_back(monkeypatch):
    monkeypatch.delenv("FLM_RT_KERNELS", raising=False)
    z = torch.randn(4, 50)
    lg = torch.randn(4, 50)
    torch.testing.assert_close(ops.flow_map_step(z, lg, 0.5, 0.5, 0.0), ref_step(z, lg, 0.5, 0.5, 0.0),
                               rtol=RTOL, atol=ATOL)
    # float64 state is not a kernel dtype: auto falls back to the reference
    out = ops.flow_map_step(z.double(), lg.double(), 0.5, 0.5, 0.0)
    assert out.dtype == torch.float32
    idx, val = ops.vocab_argmax(lg.double())
    assert torch.equal(idx, lg.argmax(-1)) and val.dtype == torch.float64


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated but still used by exporters
def test_reference_path_is_exportable():
    class Step(torch.nn.Module):
        def forward(self, z, logits, a, b):
            out = ops.flow_map_step(z, logits, a, b, 0.0, None, 30.0, backend="torch")
            return ops.vocab_argmax(out, backend="torch")

    args = (torch.randn(2, 3, 11), torch.randn(2, 3, 11), torch.rand(2, 1), torch.rand(2, 1))
    ep = torch.export.export(Step(), args)
    assert "flm_rt" not in str(ep.graph)
    got = ep.module()(*args)
    want = Step()(*args)
    assert torch.equal(got[0], want[0])
    traced = torch.jit.trace(Step(), args)
    assert torch.equal(traced(*args)[0], want[0])

    class Auto(torch.nn.Module):  # backend=None while exporting -> the reference, no custom op in the graph
        def forward(self, z, logits):
            return ops.flow_map_step(z, logits, 0.5, 0.5, 0.0)

    ep2 = torch.export.export(Auto(), args[:2])
    assert "flm_rt" not in str(ep2.graph)


# ------------------------------------------------------------------------------------------------------
# Every compiled CPU variant (DEFAULT / AVX2 / AVX512), selected through ATEN_CPU_CAPABILITY
# ------------------------------------------------------------------------------------------------------
_VARIANT_SCRIPT = r"""
import torch, flm_rt
from flm_rt import ops
info = flm_rt.build_info()
print("SELECTED", info["cpu_capability_selected"])
g = torch.Generator().manual_seed(0)
for V, rows in [(1, 5), (7, 33), (31, 9), (1000, 7), (30522, 2)]:
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        lg = (torch.randn(rows, V, generator=g) * 5).to(dt)
        lg[0, V // 2] = float("-inf")
        z = torch.randn(rows, V, generator=g); e = torch.randn(rows, V, generator=g)
        a, b, c = torch.rand(rows, generator=g), torch.rand(rows, generator=g), torch.rand(rows, generator=g)
        for cap in (30.0, 0.0, 100.0):
            torch.testing.assert_close(ops.flow_map_step(z, lg, a, b, c, e, cap, backend="ext"),
                                       ops.flow_map_step_reference(z, lg, a, b, c, e, cap), rtol=1e-5, atol=1e-6,
                                       equal_nan=True)
        x = lg.clone(); x[-1, V // 3] = float("nan")
        i, v = ops.vocab_argmax(x, backend="ext"); rv, ri = torch.max(x, -1)
        assert torch.equal(i, ri)
        torch.testing.assert_close(v, rv, rtol=0, atol=0, equal_nan=True)
for b, l, h, d in [(1, 5, 2, 2), (2, 9, 3, 40), (1, 17, 2, 64)]:  # head_dim / 2 = 1, 20 (tails), 32
    ang = torch.randn(l, d // 2, generator=g)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        qkv = (torch.randn(b, l, 3 * h * d, generator=g) * 4).to(dt)
        got = ops.rotary_split(qkv, ang.cos(), ang.sin(), h, backend="ext")
        assert torch.equal(got, ops.rotary_split_reference(qkv, ang.cos(), ang.sin(), h)), (b, l, h, d, dt)
for B, L, D in [(1, 5, 13), (2, 9, 768)]:  # ATen's addcmul at the same capability (FMA or not)
    for kinds in [(torch.float32,) * 3, (torch.float32, torch.bfloat16, torch.bfloat16)]:
        base = (torch.randn(B, L, D, generator=g) * 3).to(kinds[0])
        x = (torch.randn(B, L, D, generator=g) * 3).to(kinds[1])
        w = (torch.randn(B, 1, D, generator=g) * 2).to(kinds[2])
        for dt in (None, torch.bfloat16):
            got = ops.scaled_add(base, x, w, dt, backend="ext")
            assert torch.equal(got, ops.scaled_add_reference(base, x, w, dt)), (B, L, D, kinds, dt)
for n in (1, 7, 100, 3072 * 5 + 3):  # gelu_tanh_: within its bound of the reference (tests/test_gelu.py)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(n, generator=g) * 4).to(dt)
        got = ops.gelu_tanh_(x.clone(), backend="ext").float()
        ref = ops.gelu_tanh_reference(x).float()
        eps = 0.0 if dt == torch.float32 else torch.finfo(dt).eps
        assert ((got - ref).abs() <= (4e-6 + eps) * ref.abs() + 1e-7 * x.float().abs()).all(), (n, dt)
print("VARIANT_OK")
"""


@needs_ext
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_cpu_variants(capability):
    compiled = [c.lower() for c in _ext.build_info()["cpu_capabilities_compiled"]]
    if capability not in compiled:
        pytest.skip(f"{capability} variant not compiled (built: {compiled})")
    if capability != "default" and capability.upper() not in torch.backends.cpu.get_cpu_capability():
        if not (capability == "avx2" and "AVX512" in torch.backends.cpu.get_cpu_capability()):
            pytest.skip(f"this CPU does not support {capability}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SELECTED {capability.upper()}" in r.stdout, r.stdout
    assert "VARIANT_OK" in r.stdout
