"""torch.compile(fullgraph=True) over both compiled ops: the schemas, fake kernels and the in-place op's
functionalization let Dynamo capture a whole sampler step without a graph break, and the compiled function
computes what the eager one does (same kernels, so the same bits)."""
import pytest
import torch

from flm_rt import _ext, ops

pytestmark = pytest.mark.skipif(not _ext.EXT_LOADED, reason=f"flm_rt._C not loaded: {_ext.EXT_ERROR}")


def step_then_argmax(z, logits, a, b, c, eps):
    z = torch.ops.flm_rt.flow_map_step(z, logits, a, b, c, eps, 30.0)
    z2 = z.clone()
    torch.ops.flm_rt.flow_map_step_(z2, logits, a, b, c, None, 61.0)
    idx, val = torch.ops.flm_rt.vocab_argmax(z2)
    return z, z2, idx, val


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 97, generator=g)
    logits = (4 * torch.randn(3, 5, 97, generator=g)).to(dtype)
    eps = torch.randn(3, 5, 97, generator=g)
    a, b, c = (torch.rand(15, generator=g) for _ in range(3))
    return z, logits, a, b, c, eps


@pytest.mark.parametrize("backend,dtype", [("aot_eager", torch.float32), ("aot_eager", torch.bfloat16),
                                           ("inductor", torch.float32)], ids=["aot_eager-f32", "aot_eager-bf16",
                                                                              "inductor-f32"])
def test_compile_fullgraph_matches_eager(backend, dtype):
    torch._dynamo.reset()
    args = _inputs(dtype)
    want = step_then_argmax(*args)
    compiled = torch.compile(step_then_argmax, fullgraph=True, backend=backend)
    got = compiled(*args)
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    # the reference agrees too (the kernels are not just equal to themselves)
    z, logits, a, b, c, eps = args
    ref = ops.flow_map_step_reference(z, logits, a.view(3, 5), b.view(3, 5), c.view(3, 5), eps, 30.0)
    torch.testing.assert_close(want[0], ref, rtol=1e-5, atol=1e-6)


def test_compile_counts_one_graph():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    cnt = CompileCounter()
    f = torch.compile(step_then_argmax, fullgraph=True, backend=cnt)
    f(*_inputs(torch.float32))
    assert cnt.frame_count == 1 and cnt.op_count >= 3
