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
# ------------------------------------------------------------------------------ screened fp32 argmax
# flm_rt::vocab_pass_argmax(..., screen=True): candidates from a bf16 product with a rigorous error bound, then the
# fp32 logits of the candidates only. Ids must equal the exact pass's; rows the screen cannot settle (non-finite
# values, too many candidates) and whole calls it cannot run (non-finite W / bias, no bf16 packing) take the exact
# pass. flm_rt._C.vocab_screen_stats() counts [calls, rows, exact_rows, candidates] to show which path ran.
def native_bf16():
    from flm_rt.cpu_features import native_bf16 as nb

    return nb()


needs_screen = pytest.mark.skipif(not (_ext.EXT_LOADED and native_bf16()),
                                  reason="the screen runs where the CPU has native bf16 (AMX / avx512_bf16)")


def screen_stats():
    from flm_rt import _C

    return _C.vocab_screen_stats()


def screened(y, w, b, chunk, screen=True):
    with torch.no_grad():
        return torch.ops.flm_rt.vocab_pass_argmax(y, w, b, 0.0, chunk, True, screen)


def assert_clear_rows_match(y, w, b, got_i, got_v, min_clear=0.9):
    """ids equal the reference on rows whose top-2 reference logits are not an fp32-rounding near-tie; the value is
    the winner's logit (to fp32 rounding) everywhere."""
    logits = torch.nn.functional.linear(y, w, b)
    want_i, want_v = ops.vocab_pass_argmax_reference(y, w, b, 0.0)
    scale = logits.abs().amax(-1) + 1
    if logits.shape[-1] > 1:
        top2 = logits.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 1e-5 * scale
    else:
        clear = torch.ones_like(want_i, dtype=torch.bool)
    assert clear.float().mean() >= min_clear
    assert torch.equal(got_i[clear], want_i[clear])
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-5 * scale.max().item())
    picked = logits.gather(-1, got_i.unsqueeze(-1)).squeeze(-1)  # a near-tie row still picks a maximal logit
    assert (picked >= want_v - 1e-5 * scale).all()


@needs_pass
@needs_screen
@pytest.mark.parametrize("rows", [1, 7, 128, 300])
def test_screen_matches_reference(rows):
    g = torch.Generator().manual_seed(rows)
    before = screen_stats()
    n_rows = 0
    for case, (v, d) in enumerate([(1, 8), (17, 64), (1000, 8), (1000, 768), (5003, 64), (5003, 768)]):
        if rows * v * d > 300 * 5003 * 64 and rows > 128:
            continue  # test time
        peaked = case % 2 == 1
        y = torch.randn(rows, d, generator=g)
        w = torch.randn(v, d, generator=g) / d**0.5
        if peaked:
            w = w * 8.0
        b = torch.randn(v, generator=g) * 0.1
        for chunk in sorted({1000, 4096, max(1, v // 3), v + 5}):
            bias = b if chunk % 2 else None
            got_i, got_v = screened(y, w, bias, chunk)
            assert got_i.dtype == torch.int64 and got_v.dtype == torch.float32 and got_i.shape == (rows,)
            assert got_i.device == y.device and got_v.shape == (rows,)
            assert_clear_rows_match(y, w, bias, got_i, got_v)
            n_rows += rows
    after = screen_stats()
    assert after["rows"] - before["rows"] == n_rows  # every call was screened ...
    assert after["exact_rows"] - before["exact_rows"] <= n_rows // 50 + 1  # ... and settled almost every row


@needs_pass
@needs_screen
def test_screen_ties_take_the_lowest_index():
    y, w, _ = int_problem((9,), 32, 2000, torch.float32, seed=11)
    w[[5, 999, 1000, 1500]] = y[0] * 4  # exact ties across a chunk border (chunk 1000) for row 0
    w[[1200, 1700]] = y[1] * 4
    for chunk in (1000, 999, 4096):
        got = screened(y, w, None, chunk)
        want = ops.vocab_pass_argmax_reference(y, w, None, 0.0)
        assert torch.equal(got[0], want[0]) and got[0][0] == 5 and got[0][1] == 1200
        assert torch.equal(got[1], want[1])  # integer data: every logit is exact
    w[5] = 0.0
    assert screened(y, w, None, 1000)[0][0] == 999


@needs_pass
@needs_screen
def test_screen_near_ties_below_bf16_resolution():
    """Entries whose logits differ by y_k * m * 2^-12 (exact in fp32, invisible in bf16): the screen keeps them all
    and the fp32 verification picks the right one."""
    g = torch.Generator().manual_seed(3)
    rows, d, v = 16, 64, 3000
    y = torch.randint(-2, 3, (rows, d), generator=g).float()
    y[:, 0] = 2.0
    w = torch.randint(-1, 2, (v, d), generator=g).float()
    base = 1000 + 13 * torch.arange(rows)  # row r's best entries sit at base[r] + 0..5
    for r in range(rows):
        for j, m in enumerate([1, 3, -2, 3, 0, 2]):  # two equal maxima (j = 1, 3): the lower index wins
            w[base[r] + j] = y[r]
            w[base[r] + j, 0] += m * 2.0**-12
    before = screen_stats()
    for chunk in (1002, 4096):
        got_i, got_v = screened(y, w, None, chunk)
        want_i, want_v = ops.vocab_pass_argmax_reference(y, w, None, 0.0)
        assert torch.equal(got_i, base + 1) and torch.equal(want_i, got_i)
        assert torch.equal(got_v, want_v)
    assert screen_stats()["exact_rows"] == before["exact_rows"]


@needs_pass
@needs_screen
def test_screen_non_finite_and_huge_values():
    g = torch.Generator().manual_seed(4)
    rows, d, v = 10, 32, 700
    y, w, b = torch.randn(rows, d, generator=g), torch.randn(v, d, generator=g), torch.randn(v, generator=g)
    y[1] = float("nan")  # whole row
    y[2, 5] = float("nan")
    y[3, 7] = float("inf")
    y[4, 0] = float("-inf")
    y[5] = float("inf")
    y[6, 3] = 3.4e38  # finite in fp32, inf in bf16: the screen's score overflows
    y[7, :] = 1e38 * torch.sign(y[7])  # fp32 logits overflow
    w[:, 3] = w[:, 3].clamp(-0.5, 0.5)
    for chunk in (100, 701):
        want_i, want_v = ops.vocab_pass_argmax_reference(y, w, b, 0.0)
        before = screen_stats()
        got_i, got_v = screened(y, w, b, chunk)
        exact_i, _ = screened(y, w, b, chunk, screen=False)
        after = screen_stats()
        assert torch.equal(got_i, exact_i)
        assert torch.equal(got_i[[0, 1, 2, 3, 4, 6, 8, 9]], want_i[[0, 1, 2, 3, 4, 6, 8, 9]])
        assert torch.isnan(got_v[[1, 2]]).all() and (got_i[[1, 2]] == 0).all()  # NaN rows: the first NaN (0)
        assert after["exact_rows"] - before["exact_rows"] >= 6  # rows 1-7 took the exact pass
    for poison in ("nan", "inf"):  # non-finite W or bias: the whole call is exact, first NaN wins
        w2, b2 = w.clone(), b.clone()
        w2[300, 4] = float(poison)
        b2[200] = float(poison)
        for ww, bb in ((w2, b), (w, b2)):
            want = ops.vocab_pass_argmax_reference(y[[0, 8, 9]], ww, bb, 0.0)
            got = screened(y[[0, 8, 9]], ww, bb, 128)
            assert torch.equal(got[0], want[0])
            assert torch.equal(torch.isnan(got[1]), torch.isnan(want[1]))


@needs_pass
@needs_screen
def test_screen_switch(monkeypatch):
    g = torch.Generator().manual_seed(8)
    y, w, b = torch.randn(4, 6, 48, generator=g), torch.randn(2000, 48, generator=g), torch.randn(2000, generator=g)
    with torch.no_grad():
        before = screen_stats()
        on = ops.vocab_pass_argmax(y, w, b, 0.0, chunk=512, backend="ext")
        mid = screen_stats()
        off = ops.vocab_pass_argmax(y, w, b, 0.0, chunk=512, backend="ext", screen=False)
        monkeypatch.setenv("FLM_RT_SCREEN", "0")
        env_off = ops.vocab_pass_argmax(y, w, b, 0.0, chunk=512, backend="ext")
        capped = ops.vocab_pass_argmax(y, w, b, 30.0, chunk=512, backend="ext", screen=True)  # cap > 0: no screen
        assert screen_stats()["calls"] == mid["calls"] == before["calls"] + 1
        assert torch.equal(on[0], off[0]) and torch.equal(on[0], env_off[0]) and on[0].shape == (4, 6)
        assert torch.equal(capped[0], ops.vocab_pass_argmax_reference(y, w, b, 30.0)[0])
        monkeypatch.setenv("FLM_RT_SCREEN", "yes please")
        with pytest.raises(flm_rt.errors.ConfigError, match="FLM_RT_SCREEN"):
            ops.vocab_pass_argmax(y, w, b, 0.0, chunk=512, backend="ext")


@needs_pass
@needs_screen
def test_screen_cache_follows_the_weight():
    g = torch.Generator().manual_seed(9)
    y, w = torch.randn(5, 24, generator=g), torch.randn(900, 24, generator=g)
    first = screened(y, w, None, 256)[0]
    w[700] = y[0] * 10  # in place: the cached bf16 chunks and norms must not be reused
    got = screened(y, w, None, 256)[0]
    assert got[0] == 700 and first[0] != 700
    assert torch.equal(got, ops.vocab_pass_argmax_reference(y, w, None, 0.0)[0])


@needs_pass
def test_screen_without_bf16_packing_takes_the_exact_pass():
    """oneDNN refuses bf16 weights under an AVX2 cap: the screened call is the exact pass (no screened rows)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from flm_rt import _C, ops\n"
        "g = torch.Generator().manual_seed(1)\n"
        "y, w = torch.randn(7, 64, generator=g), torch.randn(1000, 64, generator=g)\n"
        "b = torch.randn(1000, generator=g)\n"
        "with torch.no_grad():\n"
        "    got = torch.ops.flm_rt.vocab_pass_argmax(y, w, b, 0.0, 300, True, True)[0]\n"
        "    ref = torch.ops.flm_rt.vocab_pass_argmax(y, w, b, 0.0, 300, True, False)[0]\n"
        "want = ops.vocab_pass_argmax_reference(y, w, b, 0.0)[0]\n"
        "print(torch.equal(got, ref), torch.equal(got, want), _C.vocab_screen_stats()['calls'])\n"
    )
    import os

    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "0"]


@needs_pass
def test_screen_opcheck():
    g = torch.Generator().manual_seed(12)
    y, w, b = torch.randn(2, 3, 16, generator=g), torch.randn(70, 16, generator=g), torch.randn(70, generator=g)
    torch.library.opcheck(torch.ops.flm_rt.vocab_pass_argmax.default, (y, w, b, 0.0, 16, True, True))
    torch.library.opcheck(torch.ops.flm_rt.vocab_pass_argmax.default, (y, w, None, 0.0, 16, True),
                          {"screen": True})


@needs_pass
@needs_screen
def test_screen_many_candidates():
    """> 1024 candidates in a row: that row takes the exact pass; 800 candidates in the first chunk that a later
    chunk's threshold rejects are pruned, and the row stays screened."""
    g = torch.Generator().manual_seed(13)
    y = torch.randint(-2, 3, (3, 32), generator=g).float()
    w = torch.randint(-1, 2, (4000, 32), generator=g).float()
    w[:1500] = y[0]  # row 0: 1500 exact ties (a candidate each) -> the exact pass, lowest index
    w[1500:2300] = y[1]  # row 1: 800 ties in the first chunk (chunk 2500) ...
    w[3000] = y[1] * 2  # ... and a clear winner in the second
    before = screen_stats()
    got_i, got_v = screened(y, w, None, 2500)
    after = screen_stats()
    want_i, want_v = ops.vocab_pass_argmax_reference(y, w, None, 0.0)
    assert torch.equal(got_i, want_i) and torch.equal(got_v, want_v)
    assert got_i[0] == 0 and got_i[1] == 3000
    assert after["exact_rows"] - before["exact_rows"] == 1


@needs_pass
@needs_screen
def test_screen_row_blocks():
    """More rows than one screen block (1024): every block is screened against every chunk."""
    g = torch.Generator().manual_seed(14)
    y, w, b = torch.randn(2100, 16, generator=g), torch.randn(5000, 16, generator=g) / 4, torch.randn(5000, generator=g)
    before = screen_stats()
    got_i, got_v = screened(y, w, b, 4096)
    after = screen_stats()
    assert_clear_rows_match(y, w, b, got_i, got_v)
    assert after["rows"] - before["rows"] == 2100 and after["exact_rows"] - before["exact_rows"] <= 5


@needs_pass
def test_empty_feature_dimension():
    """D = 0: every logit is the bias (the rows were once counted as numel / D = 0, leaving the outputs unset)."""
    y, w, b, e = torch.randn(3, 0), torch.randn(5, 0), torch.tensor([0.0, 2.0, -1.0, 2.0, 1.0]), torch.randn(5, 2)
    with torch.no_grad():
        for prepacked in (False, True):
            for screen in (False, True):
                i, v = torch.ops.flm_rt.vocab_pass_argmax(y, w, b, 0.0, 4, prepacked, screen)
                assert torch.equal(i, torch.ones(3, dtype=torch.int64)) and torch.equal(v, torch.full((3,), 2.0))
            got = torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, 0.0, 4, prepacked)
            torch.testing.assert_close(got, ops.vocab_pass_embed_reference(y, w, b, e, 0.0))


@needs_pass
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spread", ["saturated", "wide", "narrow", "specials"])
def test_low_precision_capped_argmax_without_capping_every_entry(dtype, spread):
    """bf16/fp16 with a cap: the kernel caps only what can be the maximum (the raw maximum, then the first entry
    whose value caps to the same number). Rows built so that the rounding of the cap creates many ties (saturated
    rows all cap to +-30) must give the reference's first index, through several chunk sizes."""
    g = torch.Generator().manual_seed(hash(spread) % 1000)
    rows, v = 64, 300
    if spread == "saturated":
        x = 60 + 240 * torch.rand(rows, v, generator=g)
    elif spread == "wide":
        x = torch.randn(rows, v, generator=g) * 40
    elif spread == "narrow":
        x = 20 + torch.randn(rows, v, generator=g) * 0.5
    else:
        x = torch.randn(rows, v, generator=g) * 40
        x[0, 7] = float("nan")
        x[1, :] = float("-inf")
        x[2, 3] = float("inf")
        x[3, ::5] = float("inf")
        x[4, 150:] = float("nan")
    y = x.to(dtype)
    w = torch.eye(v, dtype=dtype)
    want_i, want_v = ops.vocab_pass_argmax_reference(y, w, None, 30.0)
    for chunk in (7, 64, 300, 1000):
        got_i, got_v = kernel_argmax(y, w, None, 30.0, chunk, False)
        assert torch.equal(got_i, want_i), (chunk, int((got_i != want_i).sum()))
        assert torch.equal(got_v.isnan(), want_v.isnan())
        assert torch.equal(got_v[~want_v.isnan()], want_v[~want_v.isnan()])


# ------------------------------------------------------------------------------------------------ CUDA
# csrc/cuda/vocab_pass.cu: the chunk GEMMs on cuBLAS, the folds in custom kernels. The references run on the same
# device (cuBLAS logits, ATen's CUDA soft-cap), so integer data gives exactly equal ids and values.
HAS_CUDA = torch.cuda.is_available()
CUDA_PASS_BUILT = _ext.EXT_LOADED and _ext.has_kernel("vocab_pass_argmax", "cuda")
cuda_only = [pytest.mark.cuda,
             pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available"),
             pytest.mark.skipif(HAS_CUDA and not CUDA_PASS_BUILT,
                                reason="flm_rt._C built without the CUDA vocabulary pass")]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def to_cuda(*ts):
    return tuple(None if t is None else t.cuda() for t in ts)


@pytest.mark.skipif(not CUDA_PASS_BUILT, reason="flm_rt._C built without the CUDA vocabulary pass")
def test_cuda_kernels_are_registered_and_chosen():
    """A CUDA build registers both ops for CUDA, and auto / "ext" choose them (no GPU needed to ask)."""
    for op in ("vocab_pass_argmax", "vocab_pass_embed"):
        assert _ext.has_kernel(op, "cuda") and "CUDA" in _ext.build_info()["ops"][op]
        for dtype in FLOATS:
            assert ops.kernels_backend("cuda", dtype, op) == "ext"
            assert ops.kernels_backend("cuda", dtype, op, backend="ext") == "ext"
        assert ops.kernels_backend("cuda", torch.float32, op, backend="torch") == "torch"


@pytest.mark.parametrize("rows,d,v", SHAPES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda_only, id="cuda")])
def test_cuda_argmax_ids_exact_with_ties(rows, d, v, dtype, _):
    y, w, b = to_cuda(*int_problem(rows, d, v, dtype, seed=v))
    for cap in (0.0, 30.0):
        for bias in (b, None):
            want_i, want_v = ops.vocab_pass_argmax_reference(y, w, bias, cap)
            for chunk in chunks_for(v):
                got_i, got_v = kernel_argmax(y, w, bias, cap, chunk, True)
                assert got_i.device == y.device and got_i.dtype == torch.int64 and got_v.dtype == dtype
                assert got_i.shape == rows and got_v.shape == rows
                assert torch.equal(got_i, want_i), (cap, chunk, bias is None)
                assert torch.equal(got_v, want_v), (cap, chunk, bias is None)
    got = ops.vocab_pass_argmax(y, w, b, 30.0, chunk=7)  # the wrapper under auto takes the kernel
    assert torch.equal(got[0], ops.vocab_pass_argmax_reference(y, w, b, 30.0)[0])


@pytest.mark.parametrize("chunk", [pytest.param(c, marks=cuda_only) for c in (1, 5, 16, 100, 2000)])
def test_cuda_argmax_ties_nan_and_infinities(chunk):
    y, w = to_cuda(torch.ones(4, 8), torch.ones(3000, 8))  # every logit equal: index 0 whatever the chunking
    assert torch.equal(kernel_argmax(y, w, None, 0.0, chunk, False)[0], torch.zeros(4, dtype=torch.int64).cuda())
    w[[1300, 2999]] = 2.0  # two maxima in different chunks: the lower index
    assert torch.equal(kernel_argmax(y, w, None, 30.0, chunk, False)[0], torch.full((4,), 1300).cuda())
    y, w, b = to_cuda(*int_problem((6,), 8, 60, torch.float32, seed=1))
    b[[45, 17, 33]] = torch.tensor([float("nan"), float("nan"), float("inf")]).cuda()  # first NaN (17) wins
    b[50:] = float("-inf")
    for cap in (0.0, 30.0):
        got = kernel_argmax(y, w, b, cap, chunk, False)
        assert torch.equal(got[0], ops.vocab_pass_argmax_reference(y, w, b, cap)[0])
        assert torch.equal(got[0].cpu(), torch.full((6,), 17)) and torch.isnan(got[1]).all()
    b = torch.full((60,), float("-inf")).cuda()  # all -inf: index 0, value -inf (with the cap: -30)
    for cap in (0.0, 30.0):
        want, got = ops.vocab_pass_argmax_reference(y, w, b, cap), kernel_argmax(y, w, b, cap, chunk, False)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    b = torch.zeros(60).cuda()
    b[[3, 30]] = float("inf")
    assert torch.equal(kernel_argmax(y, w, b, 0.0, chunk, False)[0].cpu(), torch.full((6,), 3))


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=cuda_only) for d in FLOATS], ids=str)
def test_cuda_cap_is_bitwise_atens(dtype):
    """Row r is [v_r, very negative] against the identity, so the value is cap(v_r) itself: it must be exactly
    ATen's CUDA x.div_(cap).tanh_().mul_(cap) in the logits dtype (500k values, both fold kernel variants)."""
    g = torch.Generator().manual_seed(11)
    v = torch.cat([torch.randn(100_000, generator=g) * s for s in (0.01, 1.0, 10.0, 40.0, 300.0)]).to(dtype).cuda()
    low = -1e4 if dtype == torch.float16 else -1e30
    y = torch.stack([v, torch.full_like(v, low)], dim=1)
    eye = torch.eye(2, dtype=dtype).cuda()
    logits = torch.nn.functional.linear(y, eye)[:, 0]  # v itself (up to a GEMM flushing fp16 subnormals)
    want = logits.clone().div_(30.0).tanh_().mul_(30.0)
    idx, val = kernel_argmax(y, eye, None, 30.0, 2, False)
    assert bool((idx == 0).all())
    assert torch.equal(val, want), int((val != want).sum())
    # saturated rows (many entries cap to the same value): the reference's first index, warp and block folds
    x = (60 + 240 * torch.rand(64, 3000, generator=g)).to(dtype).cuda()
    w = torch.eye(3000, dtype=dtype).cuda()
    want_i, want_v = ops.vocab_pass_argmax_reference(x, w, None, 30.0)
    for chunk in (7, 1000, 3000):
        got_i, got_v = kernel_argmax(x, w, None, 30.0, chunk, False)
        assert torch.equal(got_i, want_i) and torch.equal(got_v, want_v), chunk


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda_only, id="cuda")])
def test_cuda_argmax_random_floats(_):
    g = torch.Generator().manual_seed(0)
    y, w, b = to_cuda(torch.randn(2, 64, 96, generator=g), torch.randn(3001, 96, generator=g),
                      torch.randn(3001, generator=g))
    logits = torch.nn.functional.linear(y, w, b)
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    want = ops.vocab_pass_argmax_reference(y, w, b, 0.0)[0]
    for chunk in (256, 1000, 4096):
        got = ops.vocab_pass_argmax(y, w, b, 0.0, chunk=chunk, backend="ext")[0]
        assert clear.float().mean() > 0.9 and torch.equal(got[clear], want[clear])


@pytest.mark.parametrize("rows,d,v", SHAPES)
@pytest.mark.parametrize("cap", [0.0, 30.0, 61.0])
@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda_only, id="cuda")])
def test_cuda_embed_matches_reference(rows, d, v, cap, _):
    """float32: |kernel - reference| <= 2e-6 + 2e-5 |reference| (cap 30: fixed shift; 61 and 0: online max)."""
    g = torch.Generator().manual_seed(v)
    y, w, b, e = to_cuda(torch.randn(*rows, d, generator=g), torch.randn(v, d, generator=g) * 2,
                         torch.randn(v, generator=g), torch.randn(v, 12, generator=g))
    want = ops.vocab_pass_embed_reference(y, w, b, e, cap)
    for chunk in chunks_for(v):
        got = torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, cap, chunk, False)
        assert got.shape == (*rows, 12) and got.dtype == torch.float32 and got.device == y.device
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=cuda_only) for d in (torch.bfloat16, torch.float16)],
                         ids=str)
def test_cuda_embed_low_precision_logits(dtype):
    g = torch.Generator().manual_seed(3)
    y, w, b = to_cuda(*(t.to(dtype) for t in (torch.randn(5, 64, generator=g), torch.randn(777, 64, generator=g),
                                              torch.randn(777, generator=g))))
    e = torch.randn(777, 8, generator=g).cuda()
    for cap in (30.0, 0.0):
        want = ops.vocab_pass_embed_reference(y, w, b, e, cap)
        for chunk in (100, 777):
            got = torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, cap, chunk, False)
            # low-precision logits of a chunked and a whole GEMM can differ by one ulp: probabilities by ~1%
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    y, w, b = to_cuda(*int_problem((5,), 16, 777, dtype, seed=2))  # exact logits: float32 rounding only
    for cap in (30.0, 0.0):
        torch.testing.assert_close(torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, cap, 100, False),
                                   ops.vocab_pass_embed_reference(y, w, b, e, cap), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("chunk", [pytest.param(c, marks=cuda_only) for c in (1, 8, 25, 64)])
def test_cuda_embed_nan_and_infinities(chunk):
    g = torch.Generator().manual_seed(4)
    y, w, e = to_cuda(torch.randn(4, 16, generator=g), torch.randn(50, 16, generator=g),
                      torch.randn(50, 6, generator=g))
    b = torch.zeros(50).cuda()
    b[:30] = float("-inf")  # the first chunks all -inf: a later finite chunk must still give a finite result
    for cap in (0.0, 30.0, 61.0):
        got = torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, cap, chunk, False)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ops.vocab_pass_embed_reference(y, w, b, e, cap), atol=ATOL, rtol=RTOL)
    b[:] = float("-inf")  # all -inf: NaN without a cap (as torch.softmax), the uniform average with one
    assert torch.isnan(torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, 0.0, chunk, False)).all()
    for cap in (30.0, 61.0):
        torch.testing.assert_close(torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, cap, chunk, False),
                                   e.mean(0).expand(4, 6), atol=ATOL, rtol=RTOL)
    b[:] = 0.0
    b[37] = float("nan")  # a NaN logit: that row's softmax is NaN
    for cap in (0.0, 30.0, 61.0):
        assert torch.isnan(torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, cap, chunk, False)).all()


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda_only, id="cuda")])
def test_cuda_edges_and_errors(_):
    y, w, b = to_cuda(*int_problem((3,), 16, 30, torch.float32, seed=6))
    e = torch.randn(30, 4).cuda()
    i, v = kernel_argmax(y[:0], w, b, 0.0, 8, False)  # no rows
    assert i.shape == (0,) and v.shape == (0,) and i.is_cuda
    assert torch.ops.flm_rt.vocab_pass_embed(y[:0], w, b, e, 30.0, 8, False).shape == (0, 4)
    y0, w0 = torch.randn(3, 0).cuda(), torch.randn(5, 0).cuda()  # D = 0: every logit is the bias
    b0 = torch.tensor([0.0, 2.0, -1.0, 2.0, 1.0]).cuda()
    i, v = kernel_argmax(y0, w0, b0, 0.0, 4, False)
    assert torch.equal(i.cpu(), torch.ones(3, dtype=torch.int64)) and torch.equal(v.cpu(), torch.full((3,), 2.0))
    with pytest.raises(RuntimeError, match="expected CUDA tensors, got y on cuda:0 and weight on cpu"):
        kernel_argmax(y, w.cpu(), b, 0.0, 8, False)
    with pytest.raises(RuntimeError, match="bias must be on the device of y"):
        kernel_argmax(y, w, b.cpu(), 0.0, 8, False)
    with pytest.raises(RuntimeError, match="weight must have the dtype of y"):
        kernel_argmax(y, w.half(), None, 0.0, 8, False)
    with pytest.raises(RuntimeError, match="y has D = 15"):
        kernel_argmax(y[:, :15], w, b, 0.0, 8, False)
    with pytest.raises(RuntimeError, match="chunk must be >= 1"):
        kernel_argmax(y, w, b, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="embed must be on the device of y"):
        torch.ops.flm_rt.vocab_pass_embed(y, w, b, e.cpu(), 30.0, 8, False)
    with pytest.raises(RuntimeError, match="embed must be float32"):
        torch.ops.flm_rt.vocab_pass_embed(y, w, b, e.double(), 30.0, 8, False)
    with pytest.raises(RuntimeError, match="embed must be"):
        torch.ops.flm_rt.vocab_pass_embed(y, w, b, e[:29], 30.0, 8, False)


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda_only, id="cuda")])
def test_cuda_opcheck(_):
    y, w, b = to_cuda(*int_problem((2, 3), 16, 70, torch.float32, seed=7))
    e = torch.randn(70, 5).cuda()
    torch.library.opcheck(torch.ops.flm_rt.vocab_pass_argmax.default, (y, w, b, 30.0, 16, True))
    torch.library.opcheck(torch.ops.flm_rt.vocab_pass_argmax.default, (y.bfloat16(), w.bfloat16(), None, 0.0, 16,
                                                                       False), {"screen": True})
    torch.library.opcheck(torch.ops.flm_rt.vocab_pass_embed.default, (y, w, b, e, 30.0, 16, True))
    torch.library.opcheck(torch.ops.flm_rt.vocab_pass_embed.default, (y.half(), w.half(), b.half(), e, 61.0, 16, False))


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=cuda_only) for d in (torch.float32, torch.bfloat16)],
                         ids=str)
def test_cuda_graph_capture_and_replay(dtype):
    g = torch.Generator().manual_seed(21)
    y, w, b, e = to_cuda(torch.randn(64, 48, generator=g).to(dtype), torch.randn(3001, 48, generator=g).to(dtype),
                         torch.randn(3001, generator=g).to(dtype), torch.randn(3001, 16, generator=g))

    def run():
        return (ops.vocab_pass_argmax(y, w, b, 30.0, chunk=1000, backend="ext"),
                ops.vocab_pass_embed(y, w, b, e, 61.0, chunk=1000, backend="ext"))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (cuBLAS handles and workspaces)
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (idx, val), emb = run()
    for seed in (11, 12):  # new inputs in the same buffers, then replay: equal to the eager call
        gg = torch.Generator().manual_seed(seed)
        y.copy_(torch.randn(y.shape, generator=gg).to(dtype))
        idx.fill_(-1)
        emb.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        (want_i, want_v), want_e = run()
        assert torch.equal(idx, want_i) and torch.equal(val, want_v)
        torch.testing.assert_close(emb, want_e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda_only, id="cuda")])
def test_cuda_non_default_stream(_):
    y, w, b = to_cuda(*int_problem((256,), 32, 5003, torch.bfloat16, seed=9))
    e = torch.randn(5003, 8).cuda()
    want_i, _v = ops.vocab_pass_argmax_reference(y, w, b, 30.0)
    want_e = ops.vocab_pass_embed_reference(y, w, b, e, 30.0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got_i, _v = kernel_argmax(y, w, b, 30.0, 1024, False)
        got_e = torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, 30.0, 1024, False)
    s.synchronize()
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_e, want_e, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda_only, id="cuda")])
def test_cuda_peak_memory_grows_with_the_chunk_not_the_vocabulary(_):
    """torch.cuda.max_memory_allocated above the inputs during one call: the fused pass holds [rows, chunk] blocks
    (argmax: rows*chunk*4 bytes in float32; embed: the same, plus the [rows, De] accumulator), the reference the
    whole [rows, V] logits (134 MB here)."""
    rows, d, V, De = 512, 64, 65536, 16
    g = torch.Generator().manual_seed(5)
    y, w, b, e = to_cuda(torch.randn(rows, d, generator=g), torch.randn(V, d, generator=g),
                         torch.randn(V, generator=g), torch.randn(V, De, generator=g))

    def peak(fn):
        fn()  # warm-up: cuBLAS workspaces are allocated once
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - before

    whole = rows * V * 4
    assert peak(lambda: ops.vocab_pass_argmax_reference(y, w, b, 30.0)) >= whole
    slack = 1 << 20
    for chunk in (1024, 4096):
        block = rows * chunk * 4
        am = peak(lambda: kernel_argmax(y, w, b, 30.0, chunk, False))
        em = peak(lambda: torch.ops.flm_rt.vocab_pass_embed(y, w, b, e, 61.0, chunk, False))
        assert block <= am <= block + slack, (chunk, am)
        assert block <= em <= block + 2 * rows * De * 4 + slack, (chunk, em)
        assert em < whole / 8
