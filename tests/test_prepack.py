"""flm_rt.prepack: the prepacked GEMMs (MKL's packed sgemm and oneDNN) compute F.linear (rel. 1e-5), follow weight
changes, and step aside wherever they do not apply; and the sampler's final argmax rule
(flm_rt.samplers.output_ids)."""
import pytest
import torch
import torch.nn.functional as F

import flm_rt
from flm_rt import _ext, prepack
from flm_rt.cpu_features import native_bf16
from flm_rt.model import ModelConfig, softcap_logits
from flm_rt.samplers import output_ids

# The tests of the prepacked path need torch's oneDNN linear ops; the fallbacks, the final argmax rule and the attention
# workspace run without them.
needs_onednn = pytest.mark.skipif(not prepack._HAVE_ONEDNN_LINEAR, reason="torch built without the oneDNN linear ops")


@pytest.fixture
def prepack_state():
    """Restore the process-wide switch after a test that changes it."""
    yield
    prepack._ENABLED = None
    prepack.clear_cache()


@pytest.fixture(params=["mkl", "onednn"])
def library(request, monkeypatch):
    """Each fp32 library in turn (FLM_RT_PREPACK_LIBRARY), the process default restored afterwards."""
    if request.param == "mkl" and not prepack._HAVE_MKL_LINEAR:
        pytest.skip("torch built without MKL's packed sgemm ops")
    monkeypatch.setenv("FLM_RT_PREPACK_LIBRARY", request.param)
    prepack.clear_cache()
    assert prepack.fp32_library() == request.param
    yield request.param
    monkeypatch.undo()
    prepack.clear_cache()


def _form_kinds(w):
    return sorted(f[0] for f in prepack._CACHE[id(w)][2])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _data(shape, dist, gen):
    x = torch.randn(shape, generator=gen)
    if dist == "uniform":
        x = torch.rand(shape, generator=gen) * 4 - 2
    elif dist == "heavy":  # a few large entries among small ones
        x = x * (1 + 50 * (torch.rand(shape, generator=gen) > 0.99))
    return x


@needs_onednn
@pytest.mark.parametrize("m,k,n", [(1, 8, 8), (7, 64, 200), (128, 768, 2304), (96, 33, 1000)])
@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("dist", ["normal", "uniform", "heavy"])
@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_linear_matches_f_linear(m, k, n, lead, dist, activation, library):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = _data((*lead, m, k), dist, g)
    w = _data((n, k), dist, g) / k**0.5
    b = torch.randn(n, generator=g)
    want = F.linear(x, w, b)
    if activation == "gelu_tanh":
        want = F.gelu(want, approximate="tanh")
    with torch.inference_mode():
        got = prepack.linear(x, w, b, activation=activation)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert _rel(got, want) < 1e-5
    # the GELU runs after the plain product (flm_rt::gelu_tanh_), so the library's product serves both; without that
    # kernel the product takes oneDNN's fused GELU post-op whichever library is chosen
    gelu_pass = _ext.EXT_LOADED and _ext.has_kernel("gelu_tanh_", "cpu")
    assert _form_kinds(w) == ["mkl" if library == "mkl" and (activation is None or gelu_pass) else "onednn"]


@needs_onednn
@pytest.mark.parametrize("v,d", [(1000, 64), (30, 768)])
def test_transposed_weight_is_the_embedding_product(v, d, library):
    g = torch.Generator().manual_seed(v)
    x = torch.softmax(torch.randn(2, 16, v, generator=g), -1)
    e = torch.randn(v, d, generator=g)
    with torch.no_grad():
        got = prepack.linear(x, e, transposed=True)
    assert _rel(got, x @ e) < 1e-5
    assert _form_kinds(e) == [library], "the prepacked path did not run"


@needs_onednn
def test_mkl_keeps_the_last_row_counts(monkeypatch):
    """MKL packs for one row count M: a weight keeps MKL_ROW_COUNTS copies, the most recently used ones."""
    if not prepack._HAVE_MKL_LINEAR:
        pytest.skip("torch built without MKL's packed sgemm ops")
    monkeypatch.setenv("FLM_RT_PREPACK_LIBRARY", "mkl")
    prepack.clear_cache()
    g = torch.Generator().manual_seed(11)
    w, b = torch.randn(200, 48, generator=g), torch.randn(200, generator=g)
    try:
        with torch.no_grad():
            for rows in (3, 5, 3, 7, 1, 5):
                x = torch.randn(rows, 48, generator=g)
                assert _rel(prepack.linear(x, w, b), F.linear(x, w, b)) < 1e-5, rows
        forms = list(prepack._CACHE[id(w)][2])
        assert len(forms) == prepack.MKL_ROW_COUNTS == 2
        assert forms == [("mkl", False, 1), ("mkl", False, 5)]
    finally:
        monkeypatch.undo()
        prepack.clear_cache()


def test_library_choice_and_env(monkeypatch):
    from flm_rt import cpu_features

    try:
        monkeypatch.setenv("FLM_RT_PREPACK_LIBRARY", "cublas")
        prepack.clear_cache()
        with pytest.raises(ValueError, match="FLM_RT_PREPACK_LIBRARY"):
            prepack.fp32_library()
        monkeypatch.setenv("FLM_RT_PREPACK_LIBRARY", "auto")
        monkeypatch.setattr(cpu_features, "cpu_vendor", lambda: "AuthenticAMD")
        prepack.clear_cache()
        assert prepack.fp32_library() == "onednn"  # MKL is not tuned for other vendors' CPUs
        monkeypatch.setattr(cpu_features, "cpu_vendor", lambda: "GenuineIntel")
        prepack.clear_cache()
        assert prepack.fp32_library() == ("mkl" if prepack._HAVE_MKL_LINEAR else "onednn")
        monkeypatch.setattr(prepack, "_HAVE_MKL_LINEAR", False)
        monkeypatch.setenv("FLM_RT_PREPACK_LIBRARY", "mkl")
        prepack.clear_cache()
        assert prepack.fp32_library() == "onednn"  # asked for, but this torch lacks the ops
    finally:
        monkeypatch.undo()
        prepack.clear_cache()


@needs_onednn
def test_noncontiguous_input(library):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, 64, generator=g).transpose(0, 1)
    w = torch.randn(128, 64, generator=g)
    with torch.no_grad():
        assert _rel(prepack.linear(x, w), F.linear(x, w)) < 1e-5


@needs_onednn
def test_cache_follows_in_place_changes_and_reloads(library):
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(64, 96)
    x = torch.randn(5, 64, generator=g)
    with torch.no_grad():
        first = prepack.linear(x, lin.weight, lin.bias)
        lin.weight.mul_(-2.0)  # in place: the packed copy must be refreshed
        second = prepack.linear(x, lin.weight, lin.bias)
        assert _rel(second, F.linear(x, lin.weight, lin.bias)) < 1e-5
        assert not torch.allclose(first, second)
        lin.load_state_dict({"weight": torch.randn(96, 64, generator=g), "bias": lin.bias.clone()})
        assert _rel(prepack.linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias)) < 1e-5


@needs_onednn
def test_cache_entry_dies_with_its_weight():
    w = torch.randn(32, 16)
    with torch.no_grad():
        prepack.linear(torch.randn(4, 16), w)
    wid = id(w)
    assert wid in prepack._CACHE
    del w
    assert wid not in prepack._CACHE


def test_steps_aside_for_autograd_autocast_and_other_dtypes():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 32, generator=g, requires_grad=True)
    x = torch.randn(6, 32, generator=g)
    y = prepack.linear(x, w)
    assert y.requires_grad and y.grad_fn is not None  # F.linear path, differentiable
    y.sum().backward()
    assert torch.allclose(w.grad, x.sum(0).expand(48, 32))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert prepack.linear(x, w.detach()).dtype == torch.bfloat16  # autocast decides, as for F.linear
    with torch.no_grad():
        xd, wd = x.double(), w.detach().double()
        assert torch.equal(prepack.linear(xd, wd), F.linear(xd, wd))


@needs_onednn
@pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16 (oneDNN's bf16 "
                    "products and the transposed product apply only where it has)")
@pytest.mark.parametrize("rows,out,bias", [(200, 96, True), (200, 96, False), (96, 96, True), (1030, 1025, True)])
def test_bf16_transposed_product(prepack_state, monkeypatch, rows, out, bias):
    """A narrow bf16 weight against more rows than outputs: computed as W @ X^T and returned as a transposed view
    when the caller accepts any layout, equal to autocast's F.linear up to bf16 rounding; elsewhere row-major."""
    g = torch.Generator().manual_seed(rows + out)
    x = torch.randn(2, rows // 2, 64, generator=g)
    w = torch.randn(out, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(out, generator=g).to(torch.bfloat16) if bias else None
    monkeypatch.setenv("FLM_RT_TRANSPOSED_GEMM", "1")  # the default is on only where bf16 runs on AMX
    prepack.clear_cache()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.linear(x, w, b).float()
        got = prepack.linear(x, w, b, any_layout=True)
        plain = prepack.linear(x, w, b)
        monkeypatch.setenv("FLM_RT_TRANSPOSED_GEMM", "0")
        prepack.clear_cache()
        off = prepack.linear(x, w, b, any_layout=True)
    transposed = rows > out and out <= prepack._TRANSPOSED_MAX_OUT
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert got.is_contiguous() != transposed
    if transposed:
        assert got.stride(-1) == rows
    assert plain.is_contiguous() and off.is_contiguous()
    for y in (got, plain, off):
        assert _rel(y.float(), want) < 2 ** -7  # bf16 rounding of the output (and of different K blockings)
    monkeypatch.setenv("FLM_RT_TRANSPOSED_GEMM", "sometimes")
    prepack.clear_cache()
    with pytest.raises(ValueError, match="FLM_RT_TRANSPOSED_GEMM"):
        prepack.transposed_gemm_enabled()


def test_switch_off_and_env(prepack_state, monkeypatch):
    w, x = torch.randn(24, 8), torch.randn(3, 8)
    prepack.set_enabled(False)
    assert not prepack.is_enabled()
    with torch.no_grad():
        assert torch.equal(prepack.linear(x, w), F.linear(x, w))
    assert not prepack._CACHE
    prepack._ENABLED = None
    monkeypatch.setenv("FLM_RT_PREPACK", "0")
    assert not prepack.is_enabled()
    prepack._ENABLED = None
    monkeypatch.setenv("FLM_RT_PREPACK", "maybe")
    with pytest.raises(ValueError, match="FLM_RT_PREPACK"):
        prepack.is_enabled()


def test_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        prepack.linear(torch.randn(2, 4), torch.randn(3, 4), activation="relu")


@needs_onednn
def test_denoiser_with_and_without_prepacking(prepack_state, library):
    cfg = ModelConfig(vocab_size=500, length=24, hidden_size=64, n_blocks=2, n_heads=4, cond_dim=32)
    model = flm_rt.random_model(cfg, seed=5, output_scale=8.0)
    noise = torch.randn(1, 3, 24, 500, generator=torch.Generator().manual_seed(6))
    t, tp = torch.zeros(3), torch.ones(3)
    with torch.inference_mode():
        on = model.denoiser(noise[0], t, tp)
        d = model.denoiser
        for w in (d.vocab_embed.embedding, d.blocks[0].attn_qkv.weight, d.output_layer.linear.weight):
            assert id(w) in prepack._CACHE, "the prepacked path did not run"
        ids_on = flm_rt.generate(model, noise=noise, steps=2).token_ids
        prepack.set_enabled(False)
        off = model.denoiser(noise[0], t, tp)
    ids_off = flm_rt.generate(model, noise=noise, steps=2).token_ids
    assert _rel(on, off) < 1e-5
    assert torch.equal(ids_on, ids_off)


# --- the final argmax rule -------------------------------------------------------------------------------
def test_output_ids_fp32_takes_the_raw_argmax_and_keeps_nan_and_first_index_rules():
    z = torch.randn(2, 5, 300, generator=torch.Generator().manual_seed(7)) * 10
    z[0, 0, 17] = z[0, 0, 230] = 1e3  # exact tie: the first index, as torch.argmax
    z[0, 1, 40] = 290.0
    z[0, 1, 41] = 300.0  # both cap to exactly 30.0 in fp32; the raw value orders them
    z[1, 2, 99] = float("nan")  # NaN wins, as in torch.argmax
    assert softcap_logits(z)[0, 1, 40] == softcap_logits(z)[0, 1, 41]
    want = z.argmax(-1)
    got = output_ids(z.clone())
    assert torch.equal(got, want)
    assert got[0, 0] == 17 and got[0, 1] == 41 and got[1, 2] == 99


def test_output_ids_low_precision_caps_first():
    z = torch.randn(3, 4, 257, generator=torch.Generator().manual_seed(8)).mul(40).to(torch.bfloat16)
    want = softcap_logits(z).argmax(-1)
    assert torch.equal(output_ids(z.clone()), want)
    assert not torch.equal(want, z.argmax(-1)), "the data should contain ties the cap creates in bf16"


# --- the attention score workspace (fp32 CPU inference) ---------------------------------------------------
@pytest.mark.parametrize("b,h,l,d", [(1, 2, 5, 8), (3, 4, 33, 16), (2, 12, 128, 64)])
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])  # 30: scores far beyond the soft-cap's linear range
def test_attention_workspace_matches_plain_path(b, h, l, d, scale):
    from flm_rt.model import softcapped_attention

    g = torch.Generator().manual_seed(b * 100 + l)
    q, k, v = (torch.randn(b, h, l, d, generator=g) * scale for _ in range(3))
    want = softcapped_attention(q, k, v)
    ws = torch.full((b, h, l, l), float("nan"))  # poisoned: an element left unwritten would show
    with torch.inference_mode():
        got = softcapped_attention(q, k, v, ws)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    assert torch.allclose(ws.sum(-1), torch.ones(b, h, l), atol=1e-5)  # the buffer ends holding probabilities


def test_denoiser_inference_paths_match_the_autograd_path():
    """The workspace and prepacked GEMMs (inference) against the plain ops (taken when gradients are needed)."""
    cfg = ModelConfig(vocab_size=300, length=40, hidden_size=64, n_blocks=2, n_heads=4, cond_dim=32)
    model = flm_rt.random_model(cfg, seed=9, output_scale=8.0)
    x = torch.randn(2, 40, 300, generator=torch.Generator().manual_seed(10))
    t, tp = torch.full((2,), 0.25), torch.full((2,), 0.75)
    with torch.inference_mode():
        fast = model.denoiser(x, t, tp)
    plain = model.denoiser(x.clone().requires_grad_(True), t, tp)
    assert plain.requires_grad
    assert _rel(fast, plain.detach()) < 1e-5


def test_torch_without_the_onednn_ops_falls_back(prepack_state, monkeypatch):
    monkeypatch.setattr(prepack, "_HAVE_ONEDNN_LINEAR", False)
    prepack.clear_cache()  # entries of models other tests keep alive
    assert not prepack.is_enabled()
    w, x = torch.randn(16, 8), torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(prepack.linear(x, w, activation="gelu_tanh"), F.gelu(F.linear(x, w), approximate="tanh"))
    assert not prepack._CACHE


@pytest.mark.parametrize("noise_space", ["vocab", "embedding"])
def test_model_made_under_inference_mode(noise_space):
    """Weights created under torch.inference_mode are inference tensors, which have no version counter: the
    packed-weight caches (here and in the C++ vocabulary pass) key them without one, and such a model generates
    the ids of the same model made normally, also when called again (a cache hit)."""
    import flm_rt
    from flm_rt.model import preset_config

    cfg = preset_config("tiny")
    kw = dict(num_samples=2, steps=2, decode=False, noise_space=noise_space)
    plain = flm_rt.random_model(cfg, seed=4, output_scale=8.0)
    want = flm_rt.generate(plain, generator=torch.Generator().manual_seed(9), **kw).token_ids
    with torch.inference_mode():
        model = flm_rt.random_model(cfg, seed=4, output_scale=8.0)
    assert model.denoiser.blocks[0].attn_qkv.weight.is_inference()
    for _ in range(2):
        got = flm_rt.generate(model, generator=torch.Generator().manual_seed(9), **kw).token_ids
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))
    assert id(model.denoiser.blocks[0].attn_qkv.weight) in prepack._CACHE
