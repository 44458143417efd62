"""The operators at the edges the GPU bring-up asks for, on CPU and (where present) CUDA.

* every vocabulary size of the GPU check list (the warp/block switch points 2048 / 4096 / 16384 and their
  neighbours, the real vocabularies, > 2^17), each logits dtype, caps 30 (fixed-shift sum), 61 (online max/sum)
  and 0 (no cap), with and without eps;
* misaligned views (offset base pointers: the scalar head/tail path of the CUDA kernels);
* registration: not differentiable (a clear error on backward), the in-place op bumps the version counter, the
  fake kernels reject an empty vocabulary, the library names its Python module;
* CUDA only (skipped with a reason elsewhere): a non-default stream, CUDA-graph capture and replay, and a tensor
  of more than 2^31 elements.

Tolerances as tests/test_ops.py: the step to float32 rounding against the reference (rtol 1e-5, 3e-5 above
V = 4096, atol 1e-6); argmax exactly equal to torch.argmax. Outputs are poisoned (NaN) before in-place writes.
"""
from __future__ import annotations

import pytest
import torch

from flm_rt import _ext, ops
from test_ops import softmax64

HAS_CUDA = torch.cuda.is_available()
CUDA_BUILT = _ext.EXT_LOADED and _ext.has_kernel("flow_map_step", "cuda")
needs_ext = pytest.mark.skipif(not _ext.EXT_LOADED, reason=f"flm_rt._C not loaded: {_ext.EXT_ERROR}")
cuda_only = [pytest.mark.cuda,
             pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available"),
             pytest.mark.skipif(HAS_CUDA and not CUDA_BUILT, reason="flm_rt._C built without CUDA kernels")]
DEVICES = [pytest.param("cpu", id="cpu", marks=needs_ext), pytest.param("cuda", id="cuda", marks=cuda_only)]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
VOCABS = [1, 7, 8, 9, 2047, 2048, 2049, 4097, 16385, 30522, 50258, 2**17 + 3]
CAPS = [30.0, 61.0, 0.0]


def rtol_for(V: int) -> float:
    return 1e-5 if V <= 4096 else 3e-5


def _data(rows: int, V: int, dtype, device, seed: int, offset: int = 0):
    """logits (x4 normal, so that caps matter), z, eps, a, b, c; with offset > 0 every tensor is a view that
    starts `offset` elements into its storage (not 16-byte aligned)."""
    g = torch.Generator().manual_seed(seed)

    def view(t):
        if offset == 0:
            return t.to(device)
        flat = torch.cat([torch.randn(offset, generator=g).to(t.dtype), t.reshape(-1)]).to(device)
        return flat[offset:].view(t.shape)

    logits = view((4 * torch.randn(rows, V, generator=g)).to(dtype))
    z = view(torch.randn(rows, V, generator=g))
    eps = view(torch.randn(rows, V, generator=g))
    a, b, c = (torch.rand(rows, generator=g).to(device) for _ in range(3))
    return logits, z, eps, a, b, c


def _step_float64(z, logits, a, b, c, eps, cap):
    """The reference's formula in float64 (per-row a, b, c), rounded to float32 once: the value to compare with."""
    out = a.double()[..., None] * z.double() + b.double()[..., None] * softmax64(logits, cap)
    if eps is not None:
        out = out + c.double()[..., None] * eps.double()
    return out.float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("V", VOCABS)
def test_vocab_list_step_and_argmax(V, dtype, device):
    rows = 3 if V > 4096 else 17
    logits, z, eps, a, b, c = _data(rows, V, dtype, device, seed=V)
    for cap in CAPS:
        for e in (eps, None):
            got = ops.flow_map_step(z, logits, a, b, c, e, cap, backend="ext")
            truth = _step_float64(z, logits, a, b, c, e, cap)
            torch.testing.assert_close(got, truth, rtol=rtol_for(V), atol=1e-6)
            # the fp32 reference agrees less closely at large V: ATen's vectorised fp32 softmax uses a fast exp
            # (relative error 3.1e-5 measured at V = 131075 on an AVX2 Zen 3; the kernel's 1e-7 there)
            ref = ops.flow_map_step_reference(z, logits, a, b, c, e, cap)
            torch.testing.assert_close(got, ref, rtol=1e-4 if V > 4096 else rtol_for(V), atol=1e-6)
    idx, val = ops.vocab_argmax(logits, backend="ext")
    assert torch.equal(idx, torch.argmax(logits, dim=-1))
    assert torch.equal(val, logits.max(dim=-1).values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("V", [33, 4097])
def test_misaligned_views(V, offset, dtype, device):
    logits, z, eps, a, b, c = _data(5, V, dtype, device, seed=V + offset, offset=offset)
    assert z.data_ptr() % 16 != 0 and logits.data_ptr() % 16 != 0
    for cap in (30.0, 61.0, 0.0):
        torch.testing.assert_close(ops.flow_map_step(z, logits, a, b, c, eps, cap, backend="ext"),
                                   ops.flow_map_step_reference(z, logits, a, b, c, eps, cap),
                                   rtol=rtol_for(V), atol=1e-6)
    # in place into a misaligned, poisoned view
    want = ops.flow_map_step_reference(z, logits, a, b, c, eps, 30.0)
    storage = torch.full((z.numel() + offset,), float("nan"), device=device)
    zz = storage[offset:].view(z.shape)
    zz.copy_(z)
    ops.flow_map_step_(zz, logits, a, b, c, eps, 30.0, backend="ext")
    torch.testing.assert_close(zz, want, rtol=rtol_for(V), atol=1e-6)
    assert torch.isnan(storage[:offset]).all()  # nothing written before the view
    idx, _ = ops.vocab_argmax(logits, backend="ext")
    assert torch.equal(idx, torch.argmax(logits, dim=-1))


@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_argmax_ties_all_neginf_and_nan(device):
    """The per-thread scan of the argmax kernels: ties keep the lowest index, all -inf rows give index 0,
    the first NaN wins; on misaligned rows too (scalar path)."""
    V = 5000
    base = torch.randn(4 * V + 1)
    x = base[1:].view(4, V).clone()
    x[0] = 1.0                       # all ties
    x[1] = float("-inf")             # all -inf
    x[2, 4000] = float("nan")
    x[2, 4500] = float("nan")
    x[3, 10] = 100.0
    x[3, 4999] = 100.0
    for dt in FLOATS:
        flat = torch.cat([torch.zeros(1), x.reshape(-1)]).to(dt).to(device)
        xv = flat[1:].view(4, V)
        idx, val = ops.vocab_argmax(xv, backend="ext")
        assert idx.tolist() == [0, 0, 4000, 10] == torch.argmax(xv, dim=-1).tolist()
        torch.testing.assert_close(val, torch.max(xv, dim=-1).values, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------ registration
@needs_ext
def test_backward_through_the_ops_raises():
    z = torch.randn(2, 9, requires_grad=True)
    logits = torch.randn(2, 9, requires_grad=True)
    one = torch.ones(1)
    out = torch.ops.flm_rt.flow_map_step(z, logits, one, one, one, None, 30.0)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="not implemented"):
        out.sum().backward()
    idx, val = torch.ops.flm_rt.vocab_argmax(logits)
    with pytest.raises(RuntimeError, match="not implemented"):
        val.sum().backward()


@needs_ext
def test_inplace_op_bumps_version_counter():
    z = torch.randn(3, 11)
    logits = torch.randn(3, 11)
    one = torch.ones(1)
    v0 = z._version
    torch.ops.flm_rt.flow_map_step_(z, logits, one, one, one, None, 30.0)
    assert z._version > v0
    # autograd notices that a tensor it saved (z, for the gradient of w) was overwritten
    w = torch.randn(3, 11, requires_grad=True)
    s = (w * z).sum()
    torch.ops.flm_rt.flow_map_step_(z, logits, one, one, one, None, 30.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.backward()
    # an input that needs a gradient is refused at once
    with pytest.raises(NotImplementedError, match="not differentiable"):
        torch.ops.flm_rt.flow_map_step_(z, w, one, one, one, None, 30.0)
    with torch.no_grad():
        torch.ops.flm_rt.flow_map_step_(z, w, one, one, one, None, 30.0)


@needs_ext
def test_fake_kernels_reject_empty_vocabulary():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        z = torch.empty(2, 0)
        one = torch.empty(1)
        with pytest.raises(RuntimeError, match="non-empty"):
            torch.ops.flm_rt.flow_map_step(z, z, one, one, one, None, 30.0)
        with pytest.raises(RuntimeError, match="empty vocabulary"):
            torch.ops.flm_rt.vocab_argmax(z)
        ok = torch.ops.flm_rt.flow_map_step(torch.empty(2, 5), torch.empty(2, 5), one, one, one, None, 30.0)
        assert ok.shape == (2, 5)


@needs_ext
def test_library_declares_its_python_module():
    for op in ("flow_map_step", "flow_map_step_", "vocab_argmax"):
        stub = torch._C._dispatch_pystub(f"flm_rt::{op}", "")
        assert stub is not None and stub[0] == "flm_rt.ops", stub


# ------------------------------------------------------------------------------------------------ CUDA only
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_non_default_stream(device):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        logits, z, eps, a, b, c = _data(64, 50258, torch.bfloat16, device, seed=3)
        out = ops.flow_map_step(z, logits, a, b, c, eps, 30.0, backend="ext")
        idx, _ = ops.vocab_argmax(logits, backend="ext")
    s.synchronize()
    torch.testing.assert_close(out, ops.flow_map_step_reference(z, logits, a, b, c, eps, 30.0), rtol=3e-5, atol=1e-6)
    assert torch.equal(idx, torch.argmax(logits, dim=-1))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_capture_and_replay(device, dtype):
    logits, z, eps, a, b, c = _data(32, 30522, dtype, device, seed=5)
    out = torch.empty_like(z)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture
        out.copy_(ops.flow_map_step(z, logits, a, b, c, eps, 30.0, backend="ext"))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(ops.flow_map_step(z, logits, a, b, c, eps, 30.0, backend="ext"))
        idx, _ = ops.vocab_argmax(logits, backend="ext")
    for seed in (11, 12):  # new inputs in the same buffers, then replay
        g = torch.Generator(device=device).manual_seed(seed)
        logits.copy_((4 * torch.randn(logits.shape, device=device, generator=g)).to(dtype))
        z.copy_(torch.randn(z.shape, device=device, generator=g))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, ops.flow_map_step_reference(z, logits, a, b, c, eps, 30.0),
                                   rtol=3e-5, atol=1e-6)
        assert torch.equal(idx, torch.argmax(logits, dim=-1))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_more_than_2_31_elements(device):
    """64-bit indexing: rows x V > 2^31 (bf16 logits 4.3 GB, fp32 state and output 8.6 GB each)."""
    V = 50258
    rows = (2**31) // V + 7
    assert rows * V > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 30e9:
        pytest.skip(f"needs about 30 GB of free GPU memory, {free / 1e9:.0f} GB free")
    g = torch.Generator(device=device).manual_seed(0)
    logits = (4 * torch.randn(rows, V, device=device, generator=g)).to(torch.bfloat16)
    z = torch.randn(rows, V, device=device, generator=g)
    a, b, c = (torch.rand(rows, device=device, generator=g) for _ in range(3))
    idx, _ = ops.vocab_argmax(logits, backend="ext")
    assert torch.equal(idx, torch.argmax(logits, dim=-1))
    out = ops.flow_map_step(z, logits, a, b, c, None, 30.0, backend="ext")
    for r in (0, rows // 2, rows - 2, rows - 1):  # rows past the 2^31-th element included
        torch.testing.assert_close(out[r], ops.flow_map_step_reference(z[r], logits[r], a[r], b[r], c[r], None, 30.0),
                                   rtol=3e-5, atol=1e-6)
