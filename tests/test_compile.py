"""torch.compile(fullgraph=True) over the compiled ops: the schemas, fake kernels and the in-place op's
functionalization let Dynamo capture a whole sampler step (and the fused vocabulary pass) without a graph break,
and the compiled function computes what the eager one does (same kernels, so the same bits) and what the
references compute. The reference path (backend="torch") compiles as well, with or without flm_rt._C."""
import pytest
import torch

from flm_rt import _ext, ops

needs_ext = pytest.mark.skipif(not _ext.EXT_LOADED, reason=f"flm_rt._C not loaded: {_ext.EXT_ERROR}")
needs_pass = pytest.mark.skipif(not (_ext.EXT_LOADED and _ext.has_kernel("vocab_pass_argmax", "cpu")),
                                reason="flm_rt._C without the fused vocabulary pass")
RTOL, ATOL = 1e-5, 1e-6


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


def _assert_matches_references(args, outs):
    """The step, the in-place step (cap 61: the online max/sum path, no eps) and the argmax against the references."""
    z, logits, a, b, c, eps = args
    a, b, c = (t.view(3, 5) for t in (a, b, c))
    step, step_, idx, val = outs
    torch.testing.assert_close(step, ops.flow_map_step_reference(z, logits, a, b, c, eps, 30.0), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(step_, ops.flow_map_step_reference(step, logits, a, b, c, None, 61.0),
                               rtol=RTOL, atol=ATOL)
    want_idx, want_val = ops.vocab_argmax_reference(step_)
    assert torch.equal(idx, want_idx) and torch.equal(val, want_val)


@needs_ext
@pytest.mark.parametrize("backend,dtype", [("aot_eager", torch.float32), ("aot_eager", torch.bfloat16),
                                           ("aot_eager", torch.float16), ("inductor", torch.float32)],
                         ids=["aot_eager-f32", "aot_eager-bf16", "aot_eager-f16", "inductor-f32"])
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
    _assert_matches_references(args, got)


@needs_ext
def test_compile_counts_one_graph():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    cnt = CompileCounter()
    f = torch.compile(step_then_argmax, fullgraph=True, backend=cnt)
    f(*_inputs(torch.float32))
    assert cnt.frame_count == 1 and cnt.op_count >= 3


def vocab_pass(y, weight, bias, embed):
    i, v = torch.ops.flm_rt.vocab_pass_argmax(y, weight, bias, 30.0, 16, False)
    i0, v0 = torch.ops.flm_rt.vocab_pass_argmax(y, weight, None, 0.0, 7, True)  # no cap, no bias, prepacked
    emb = torch.ops.flm_rt.vocab_pass_embed(y, weight, bias, embed, 30.0, 16, True)
    return i, v, i0, v0, emb


@needs_pass
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_vocab_pass_matches_eager_and_reference(backend):
    """Integer-valued y, weight and bias: every GEMM is exact, so the ids must equal the reference's (ties too)."""
    g = torch.Generator().manual_seed(1)
    y, weight, bias = (torch.randint(-2, 3, shape, generator=g).float() for shape in ((2, 3, 16), (70, 16), (70,)))
    embed = torch.randn(70, 5, generator=g)
    torch._dynamo.reset()
    with torch.inference_mode():
        want = vocab_pass(y, weight, bias, embed)
        got = torch.compile(vocab_pass, fullgraph=True, backend=backend)(y, weight, bias, embed)
    for w, o in zip(want, got):
        assert torch.equal(w, o)
    i, v, i0, v0, emb = got
    ri, rv = ops.vocab_pass_argmax_reference(y, weight, bias, 30.0)
    assert torch.equal(i, ri) and torch.equal(v, rv)
    ri0, rv0 = ops.vocab_pass_argmax_reference(y, weight, None, 0.0)
    assert torch.equal(i0, ri0) and torch.equal(v0, rv0)
    torch.testing.assert_close(emb, ops.vocab_pass_embed_reference(y, weight, bias, embed, 30.0), rtol=2e-5, atol=2e-6)


def reference_step_then_argmax(z, logits, a, b, c, eps):
    out = ops.flow_map_step(z, logits, a, b, c, eps, 30.0, backend="torch")
    z2 = out.clone()
    ops.flow_map_step_(z2, logits, a, b, c, None, 61.0, backend="torch")
    idx, val = ops.vocab_argmax(z2, backend="torch")
    return out, z2, idx, val


def test_compile_fullgraph_reference_path():
    """backend="torch": plain tensor ops through the public functions, one graph, the eager bits."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    args = list(_inputs(torch.bfloat16))
    args[2:5] = (t.view(3, 5) for t in args[2:5])
    cnt = CompileCounterWithBackend("aot_eager")
    got = torch.compile(reference_step_then_argmax, fullgraph=True, backend=cnt)(*args)
    want = reference_step_then_argmax(*args)
    assert cnt.frame_count == 1
    for w, o in zip(want, got):
        assert torch.equal(w, o)
    _assert_matches_references(args, got)


def public_step_then_argmax(z, logits, a, b, c, eps):
    """The public wrappers with the default backend (auto): what a user compiling flm_rt code calls."""
    out = ops.flow_map_step(z, logits, a, b, c, eps)
    ops.flow_map_step_(out, logits, a, b, c, eps)
    return out, ops.vocab_argmax(out)[0]


@needs_ext
def test_compile_fullgraph_public_wrappers_use_the_compiled_ops():
    """The dispatch choice (kernels_backend) traces without a graph break, and the captured graph calls the
    compiled operators, not the references; the result equals eager's."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    z, logits, a, b, c, eps = _inputs(torch.float32)
    a, b, c = (t.view(3, 5) for t in (a, b, c))
    got = torch.compile(public_step_then_argmax, fullgraph=True, backend=backend)(z, logits, a, b, c, eps)
    want = public_step_then_argmax(z, logits, a, b, c, eps)
    assert len(graphs) == 1
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert {"flm_rt.flow_map_step", "flm_rt.flow_map_step_", "flm_rt.vocab_argmax"} <= targets, targets
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
