"""The fused vocabulary pass (flm_rt::vocab_pass_argmax / vocab_pass_embed) against its PyTorch reference, and the
samplers with the pass on and off.

Exactness: the ids must equal the reference's. Chunked and whole GEMMs may round differently in the last bit, so
the id tests use integer-valued y, weight and bias whose products and sums are exact in every GEMM (and in bf16),
which also makes ties frequent. Random float inputs are checked on rows without a near-tie.
Tolerance of softmax @ E: |kernel - reference| <= 2e-6 + 2e-5 |reference| (float32 rounding of the online
softmax's rescaling; the reference normalises first, the kernel last).
"""
import pytest
import torch

import flm_rt
from flm_rt import _ext, ops, samplers

# The kernel tests need the compiled pass; the samplers with the switch on take the reference pass without it.
needs_pass = pytest.mark.skipif(not (_ext.EXT_LOADED and _ext.has_kernel("vocab_pass_argmax", "cpu")),
                                reason="flm_rt._C without the fused vocabulary pass")
ATOL, RTOL = 2e-6, 2e-5

SHAPES = [((7,), 16, 1), ((2, 5), 32, 37), ((3, 4), 24, 1000), ((1, 9), 32, 4099)]
CHUNK_SIZES = (1, 7, 64, 1000, 4096, 5000)


def chunks_for(v):
    """Chunk sizes that do and do not divide V, larger than V, and 1, at most 150 chunks each (test time)."""
    return [c for c in CHUNK_SIZES if -(-v // c) <= 150]


def int_problem(rows, d, v, dtype, seed, lo=-2, hi=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(lo, hi, (*rows, d), generator=g).to(dtype)
    w = torch.randint(lo, hi, (v, d), generator=g).to(dtype)
    b = torch.randint(lo, hi, (v,), generator=g).to(dtype)
    return y, w, b


def kernel_argmax(y, w, b, cap, chunk, prepacked):
    return torch.ops.flm_rt.vocab_pass_argmax(y, w, b, cap, chunk, prepacked)


@needs_pass
@pytest.mark.parametrize("rows,d,v", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_ids_exact_with_ties(rows, d, v, dtype):
    y, w, b = int_problem(rows, d, v, dtype, seed=v)
    for cap in (0.0, 30.0):
        want_i, want_v = ops.vocab_pass_argmax_reference(y, w, b, cap)
        for chunk in chunks_for(v):
            for prepacked in (False, True):
                for bias in (b, None):
                    wi, wv = (want_i, want_v) if bias is not None else ops.vocab_pass_argmax_reference(y, w, None, cap)
                    got_i, got_v = kernel_argmax(y, w, bias, cap, chunk, prepacked)
                    assert got_i.dtype == torch.int64 and got_v.dtype == dtype and got_i.shape == rows
                    assert torch.equal(got_i, wi), (cap, chunk, prepacked)
                    assert torch.equal(got_v, wv)


@needs_pass
def test_argmax_ties_go_to_the_first_chunk():
    y = torch.ones(4, 8)
    w = torch.ones(50, 8)  # every logit equal: index 0 wins, whatever the chunking
    for chunk in (1, 3, 50):
        assert torch.equal(kernel_argmax(y, w, None, 0.0, chunk, False)[0], torch.zeros(4, dtype=torch.int64))
    w[[13, 40]] = 2.0  # two maxima in different chunks: the lower index
    assert torch.equal(kernel_argmax(y, w, None, 30.0, 7, True)[0], torch.full((4,), 13))


@needs_pass
@pytest.mark.parametrize("chunk", [1, 5, 16, 100])
def test_argmax_nan_and_infinities(chunk):
    y, w, b = int_problem((6,), 8, 60, torch.float32, seed=1)
    b[[45, 17, 33]] = torch.tensor([float("nan"), float("nan"), float("inf")])  # first NaN (17) wins over +inf
    b[50:] = float("-inf")
    for cap in (0.0, 30.0):
        want = ops.vocab_pass_argmax_reference(y, w, b, cap)
        got = kernel_argmax(y, w, b, cap, chunk, chunk != 5)
        assert torch.equal(got[0], want[0]) and torch.equal(got[0], torch.full((6,), 17))
        assert torch.isnan(got[1]).all()
    b = torch.full((60,), float("-inf"))  # all -inf: index 0, value -inf (with the cap: -30)
    for cap in (0.0, 30.0):
        want = ops.vocab_pass_argmax_reference(y, w, b, cap)
        got = kernel_argmax(y, w, b, cap, chunk, False)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    b = torch.zeros(60)
    b[[3, 30]] = float("inf")
    assert torch.equal(kernel_argmax(y, w, b, 0.0, chunk, False)[0], torch.full((6,), 3))


@needs_pass
def test_argmax_random_floats():
    g = torch.Generator().manual_seed(0)
    y, w, b = torch.randn(2, 64, 96, generator=g), torch.randn(3001, 96, generator=g), torch.randn(3001, generator=g)
    logits = torch.nn.functional.linear(y, w, b)
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    want = ops.vocab_pass_argmax_reference(y, w, b, 0.0)[0]
    for chunk in (256, 1000, 4096):
        got = ops.vocab_pass_argmax(y, w, b, 0.0, chunk=chunk, backend="ext")[0]
        assert clear.float().mean() > 0.9 and torch.equal(got[clear], want[clear])


@needs_pass
@pytest.mark.parametrize("rows,d,v", SHAPES)
@pytest.mark.parametrize("cap", [0.0, 30.0])
def test_embed_matches_reference(rows, d, v, cap):
    g = torch.Generator().manual_seed(v)
    y, w, b = torch.randn(*rows, d, generator=g), torch.randn(v, d, generator=g) * 2, torch.randn(v, generator=g)
    e = torch.randn(v, 12, generator=g)
    want = ops.vocab_pass_embed_reference(y, w, b, e, cap)
    for chunk in chunks_for(v):
        for prepacked in (False, True):
            got = torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, cap, chunk, prepacked)
            assert got.shape == (*rows, 12) and got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@needs_pass
def test_embed_bf16_logits():
    g = torch.Generator().manual_seed(3)
    y, w, b = (torch.randn(5, 64, generator=g).bfloat16(), torch.randn(777, 64, generator=g).bfloat16(),
               torch.randn(777, generator=g).bfloat16())
    e = torch.randn(777, 8, generator=g)
    want = ops.vocab_pass_embed_reference(y, w, b, e, 30.0)
    for prepacked in (False, True):
        got = torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, 30.0, 100, prepacked)
        # bf16 logits of a chunked and a whole GEMM can differ by one bf16 ulp: probabilities by ~1%
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@needs_pass
@pytest.mark.parametrize("chunk", [1, 8, 25, 64])
def test_embed_nan_and_infinities(chunk):
    g = torch.Generator().manual_seed(4)
    y, w, e = torch.randn(4, 16, generator=g), torch.randn(50, 16, generator=g), torch.randn(50, 6, generator=g)
    b = torch.zeros(50)
    b[:30] = float("-inf")  # the first chunks all -inf: a later finite chunk must still give a finite result
    for cap in (0.0, 30.0):
        got = torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, cap, chunk, False)
        want = ops.vocab_pass_embed_reference(y, w, b, e, cap)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    b[:] = float("-inf")  # all -inf: NaN without a cap (as torch.softmax), the uniform average with one
    got0 = torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, 0.0, chunk, False)
    assert torch.isnan(got0).all() and torch.isnan(ops.vocab_pass_embed_reference(y, w, b, e, 0.0)).all()
    got30 = torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, 30.0, chunk, False)
    torch.testing.assert_close(got30, e.mean(0).expand(4, 6), atol=ATOL, rtol=RTOL)
    b[:] = 0.0
    b[37] = float("nan")  # a NaN logit: that row's softmax is NaN, as torch.softmax
    for cap in (0.0, 30.0):
        assert torch.isnan(torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, cap, chunk, True)).all()


@needs_pass
def test_prepacked_cache_follows_the_weight():
    y, w, b = int_problem((3,), 16, 300, torch.float32, seed=5)
    first = kernel_argmax(y, w, b, 0.0, 64, True)[0]
    w[100] = 50.0  # in place: the cached packed chunks must not be reused
    assert torch.equal(kernel_argmax(y, w, b, 0.0, 64, True)[0], ops.vocab_pass_argmax_reference(y, w, b, 0.0)[0])
    assert not torch.equal(first, kernel_argmax(y, w, b, 0.0, 64, True)[0])


@needs_pass
def test_errors_name_the_argument():
    y, w, b = int_problem((3,), 16, 30, torch.float32, seed=6)
    with pytest.raises(RuntimeError, match="weight must have the dtype of y"):
        kernel_argmax(y, w.double(), None, 0.0, 8, False)
    with pytest.raises(RuntimeError, match="y has D = 15"):
        kernel_argmax(y[:, :15], w, b, 0.0, 8, False)
    with pytest.raises(RuntimeError, match="chunk must be >= 1"):
        kernel_argmax(y, w, b, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="bias must be"):
        kernel_argmax(y, w, b[:5], 0.0, 8, False)
    with pytest.raises(RuntimeError, match="vocabulary"):
        kernel_argmax(y, w[:0], None, 0.0, 8, False)
    with pytest.raises(RuntimeError, match="embed must be"):
        torch.ops.flm_rt.vocab_pass_embed(y, w, b, torch.zeros(29, 4), 30.0, 8, False)
    with pytest.raises(ValueError, match="FLM_RT_VOCAB_CHUNK"):
        import os
        os.environ["FLM_RT_VOCAB_CHUNK"] = "many"
        try:
            ops.vocab_pass_argmax(y, w, b, backend="ext")
        finally:
            del os.environ["FLM_RT_VOCAB_CHUNK"]


@needs_pass
def test_opcheck():
    y, w, b = int_problem((2, 3), 16, 70, torch.float32, seed=7)
    e = torch.randn(70, 5)
    torch.library.opcheck(torch.ops.flm_rt.vocab_pass_argmax.default, (y, w, b, 30.0, 16, True))
    torch.library.opcheck(torch.ops.flm_rt.vocab_pass_embed.default, (y, w, b, e, 30.0, 16, True))


@needs_pass
def test_no_cuda_kernel_falls_back_to_the_reference():
    """The CUDA kernel of the pass belongs to the GPU work: CUDA tensors take the reference under auto, and an
    explicit "ext" says why it cannot run."""
    if _ext.has_kernel("vocab_pass_argmax", "cuda"):
        pytest.skip("this build has a CUDA kernel for the pass")
    assert ops.kernels_backend("cuda", torch.float32, "vocab_pass_argmax") == "torch"
    assert ops.kernels_backend("cpu", torch.float32, "vocab_pass_embed") == "ext"
    with pytest.raises(RuntimeError, match="no cuda kernel"):
        ops.kernels_backend("cuda", torch.float32, "vocab_pass_embed", backend="ext")


# ------------------------------------------------------------------------------------------------ samplers
@pytest.fixture(scope="module")
def golden_models(golden_dir):
    return {k: flm_rt.load(golden_dir / f"{k}.ckpt", device="cpu") for k in ("fmlm", "flm")}


@pytest.mark.parametrize("kind,s,steps,space", [("fmlm", 0.0, 1, "vocab"), ("fmlm", 0.8, 4, "vocab"),
                                                ("fmlm", 1.0, 4, "embedding"), ("fmlm", 0.0, 2, "embedding"),
                                                ("flm", 0.0, 4, "embedding")])
def test_golden_ids_with_the_pass_on_and_off(golden_models, vectors, monkeypatch, kind, s, steps, space):
    key = f"fmlm.fp32.g{s}.steps{steps}.ids" if kind == "fmlm" else f"flm.fp32.steps{steps}.ids"
    calls = []
    for name in ("vocab_pass_argmax", "vocab_pass_embed"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    for fused in ("1", "0"):
        monkeypatch.setenv("FLM_RT_FUSED_VOCAB", fused)
        calls.clear()
        gen = flm_rt.generate(golden_models[kind], steps=steps, stochasticity=s, noise=vectors["noises"],
                              noise_space=space)
        assert torch.equal(gen.token_ids, vectors[key]), fused
        want_calls = (["vocab_pass_embed"] * (steps - 1) if space == "embedding" else []) + ["vocab_pass_argmax"]
        assert calls == (want_calls if fused == "1" else [])


def test_bf16_ids_with_the_pass_on_and_off(golden_dir, vectors, monkeypatch):
    model = flm_rt.load(golden_dir / "fmlm.ckpt", device="cpu", dtype=torch.bfloat16)
    ids = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("FLM_RT_FUSED_VOCAB", fused)
        ids[fused] = flm_rt.generate(model, steps=4, stochasticity=0.0, noise=vectors["noises"]).token_ids
    # bf16 logits of chunked and whole GEMMs may differ by one ulp at a near-tie
    assert (ids["1"] == ids["0"]).float().mean() >= 0.98
    assert (ids["1"] == vectors["fmlm.bf16autocast.g0.0.steps4.ids"]).float().mean() >= 0.95


def test_default_chunk_bounds_the_block():
    assert ops.vocab_chunk(rows=128) == 32768 and ops.vocab_chunk(rows=1024) == 4096
    assert ops.vocab_chunk(rows=10**6) == ops.MIN_VOCAB_CHUNK and ops.vocab_chunk(7, rows=128) == 7


def test_switch_is_validated(monkeypatch):
    monkeypatch.setenv("FLM_RT_FUSED_VOCAB", "maybe")
    with pytest.raises(flm_rt.ConfigError, match="FLM_RT_FUSED_VOCAB"):
        samplers.fused_vocab_pass()
    assert samplers.fused_vocab_pass(False) is False


@needs_pass
def test_peak_memory_does_not_hold_the_logits(monkeypatch):
    """Peak resident growth of a 1-step embedding-space generate, each in a fresh process (kernel high-water mark):
    without the pass it holds the [B, L, V] logits (30.7 MB here), with it only [B, L, chunk] blocks (2 MB)."""
    from flm_rt.benchmarks.memory import measure

    monkeypatch.setenv("FLM_RT_VOCAB_CHUNK", "4096")  # (the default would take 32768 entries for 128 rows)

    shape = dict(vocab_size=60000, length=128, hidden_size=32, n_blocks=1, n_heads=2, cond_dim=16)
    off = measure(shape, steps=1, space="embedding", fused=False, threads=1)
    on = measure(shape, steps=1, space="embedding", fused=True, threads=1)
    assert off["logits_mb"] == pytest.approx(29.3, abs=0.1)
    assert on["growth_mb"] < off["growth_mb"] - 20, (on, off)


@needs_pass
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prepacked", [False, True])
def test_low_precision_cap_is_bitwise_atens(dtype, prepacked):
    """The pass caps bf16/fp16 logits in one vectorised pass that must give exactly the bits of ATen's
    x.div_(cap).tanh_().mul_(cap) in that dtype (the reference's rounding, on which its ties depend). Row r is
    [v_r, very negative] against the identity, so the pass's value is cap(v_r) itself: 500k values checked."""
    g = torch.Generator().manual_seed(11)
    v = torch.cat([torch.randn(100_000, generator=g) * s for s in (0.01, 1.0, 10.0, 40.0, 300.0)]).to(dtype)
    low = -1e4 if dtype == torch.float16 else -1e30
    y = torch.stack([v, torch.full_like(v, low)], dim=1)
    idx, val = kernel_argmax(y, torch.eye(2, dtype=dtype), None, 30.0, 2, prepacked)
    want = v.clone().div_(30.0).tanh_().mul_(30.0)
    assert bool((idx == 0).all())
    assert torch.equal(val, want), int((val != want).sum())
