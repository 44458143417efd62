"""flm_rt::normal_ -- standard-normal draws into a float32 tensor -- against torch's own normal_ / randn.

Tolerance: none. The kernel must give ``out.normal_(0, 1, generator=g)`` bit for bit and leave ``g`` in the state
torch leaves it in (compared through ``g.get_state()`` and the draw after), for every size (the mt19937 state
regenerates every 624 draws; sizes that are not a multiple of 16 draw 16 more), generator position and seed.
torch's Box-Muller depends on the CPU capability (scalar libm code at DEFAULT, avx_mathfun.h vector code at AVX2
and AVX512); the kernel reproduces both on x86-64. The in-process tests run at this process's capability (and
check that the kernel, not torch, filled the tensor), the probes at the end at DEFAULT and AVX2 in fresh
processes.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flm_rt import _ext, noise, ops

pytestmark = pytest.mark.skipif(not (_ext.EXT_LOADED and _ext.has_kernel("normal_", "cpu")),
                                reason="flm_rt._C without the normal_ kernel")

ROOT = Path(__file__).resolve().parents[1]
# 16 and 624-multiples at the edges, tails of 1 and 15, several state regenerations
SIZES = [16, 17, 31, 32, 624, 625, 1000, 16 * 624 + 5, 3 * 624 * 16]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def generators(seed: int, advance=None):
    """Two generators in the same state: seeded, then advanced by ``advance(g)`` (a few draws)."""
    g = torch.Generator().manual_seed(seed)
    if advance is not None:
        advance(g)
    h = torch.Generator()
    h.set_state(g.get_state())
    return g, h


def check_same(shape, g, h, backend="ext"):
    got = ops.normal_(torch.empty(shape), g, backend=backend)
    ref = torch.randn(shape, generator=h, out=torch.empty(shape))
    assert same_bits(got, ref)
    assert torch.equal(g.get_state(), h.get_state())
    # the next draws (of another size) agree too
    assert same_bits(torch.randn(37, generator=g), torch.randn(37, generator=h))
    assert same_bits(ops.normal_(torch.empty(100), g, backend=backend), torch.randn(100, generator=h))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 123456789])
def test_equals_torch_bit_for_bit(size, seed):
    check_same((size,), *generators(seed))


ADVANCES = {
    "rand7": lambda g: torch.rand(7, generator=g),                # left_ / next_ mid-block
    "randn3": lambda g: torch.randn(3, generator=g),              # plus a cached double normal sample
    "rand623": lambda g: torch.rand(623, generator=g),            # one word before a regeneration
    "rand624": lambda g: torch.rand(624, generator=g),            # the state exactly used up
    "randn_big": lambda g: torch.randn(2 * 624 + 9, generator=g),
}


@pytest.mark.parametrize("size", [16, 17, 625, 1000, 16 * 624 + 5])
@pytest.mark.parametrize("advance", list(ADVANCES), ids=str)
def test_advanced_generator(size, advance):
    check_same((size,), *generators(7, ADVANCES[advance]))


def test_vocabulary_sized_draw():
    check_same((128, 30522), *generators(2024, ADVANCES["rand7"]))


@pytest.mark.parametrize("seed", [3, 2**31 + 11])
def test_large_draw(seed):
    """8 x 128 x 30522 (31M values, ~50k state regenerations): every value of the vector (or scalar) Box-Muller."""
    check_same((8, 128, 30522), *generators(seed, ADVANCES["randn3"]))


def fills_itself(out, g) -> bool:
    """Whether torch.ops.flm_rt.normal_ filled out without calling torch's normal_."""
    from torch.profiler import profile

    torch.ops.flm_rt.normal_(torch.empty(64), None)  # the op's one-time check against torch, outside the profile
    with profile() as p:
        torch.ops.flm_rt.normal_(out, g)
    return "aten::normal_" not in {e.key for e in p.key_averages()}


KERNEL_CAPABILITY = _ext.EXT_LOADED and ops._normal_kernel_isa()


@pytest.mark.skipif(not KERNEL_CAPABILITY, reason="no flm_rt::normal_ kernel path at this CPU capability")
@pytest.mark.parametrize("size", [16, 17, 1000, 128 * 30522])
def test_kernel_fills_the_tensor_itself(size):
    """At DEFAULT, AVX2 and AVX512 (x86-64) the tests above ran the kernel: it fills the tensor itself."""
    g, h = generators(17, ADVANCES["rand623"])
    assert ops._normal_kernel_applies(torch.empty(size), g)
    out = torch.empty(size)
    assert fills_itself(out, g)
    assert same_bits(out, torch.randn(size, generator=h)) and torch.equal(g.get_state(), h.get_state())


def test_kernel_capabilities():
    """The rule ops.normal_ applies before calling the op: x86-64 at DEFAULT / AVX2 / AVX512 (the last two where
    the build has its AVX2 kernels)."""
    import platform

    cap = torch.backends.cpu.get_cpu_capability()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    avx2_built = "AVX2" in _ext.build_info()["cpu_capabilities_compiled"]
    assert ops._normal_kernel_isa() == (x86 and (cap == "DEFAULT" or (avx2_built and cap in ("AVX2", "AVX512"))))


def test_default_generator():
    torch.manual_seed(31)
    torch.rand(5)
    state = torch.get_rng_state()
    got = ops.normal_(torch.empty(3, 333), backend="ext")
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    ref = torch.randn(3, 333)
    assert same_bits(got, ref) and torch.equal(after, torch.get_rng_state())
    torch.set_rng_state(state)
    got = torch.empty(40)
    torch.ops.flm_rt.normal_(got, None)
    torch.set_rng_state(state)
    assert same_bits(got, torch.randn(40))


def test_contiguous_slices_of_a_batch():
    g, h = generators(5, ADVANCES["rand7"])
    out, ref = torch.empty(4, 3, 50), torch.empty(4, 3, 50)
    for k in range(4):
        ops.normal_(out[k], g, backend="ext")
        torch.randn((3, 50), generator=h, out=ref[k])
    assert same_bits(out, ref) and torch.equal(g.get_state(), h.get_state())


@pytest.mark.parametrize("make", [
    lambda: torch.empty(15),                          # numel < 16: torch's other (double, cached) path
    lambda: torch.empty(0),
    lambda: torch.empty(40, 30).t(),                  # not contiguous
    lambda: torch.empty(2, 40)[:, ::2],
    lambda: torch.empty(100, dtype=torch.float64),
    lambda: torch.empty(100, dtype=torch.bfloat16),
], ids=["small", "empty", "transposed", "strided", "float64", "bfloat16"])
@pytest.mark.parametrize("backend", [None, "torch"])
def test_fallbacks_equal_torch(make, backend):
    for advance in (None, ADVANCES["randn3"]):
        g, h = generators(11, advance)
        got, ref = make(), make()
        assert ops.normal_(got, g, backend=backend) is got
        ref.normal_(0, 1, generator=h)
        assert torch.equal(got, ref) and torch.equal(g.get_state(), h.get_state())


def test_op_delegates_small_tensors_to_torch():
    g, h = generators(3, ADVANCES["randn3"])
    for n in (1, 5, 15):
        got = torch.empty(n)
        torch.ops.flm_rt.normal_(got, g)
        assert same_bits(got, torch.randn(n, generator=h)) and torch.equal(g.get_state(), h.get_state())
    torch.ops.flm_rt.normal_(torch.empty(0), g)
    assert torch.equal(g.get_state(), h.get_state())


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.empty(40, dtype=torch.float64), "out must be float32, got Double"),
    (lambda: torch.empty(40, dtype=torch.int32), "out must be float32, got Int"),
    (lambda: torch.empty(8, 10).t(), "out must be contiguous"),
    (lambda: torch.empty(80)[::2], "out must be contiguous"),
])
def test_bad_inputs(bad, match):
    with pytest.raises(RuntimeError, match=f"flm_rt::normal_: {match}"):
        torch.ops.flm_rt.normal_(bad(), torch.Generator())


def test_bad_devices_and_generators():
    with pytest.raises(RuntimeError, match="normal_ but its kernels take torch.float32, got torch.float64"):
        ops.normal_(torch.empty(40, dtype=torch.float64), backend="ext")
    with pytest.raises(RuntimeError, match="flm_rt::normal_: out must be contiguous"):
        ops.normal_(torch.empty(8, 10).t(), backend="ext")
    with pytest.raises(RuntimeError, match="no meta kernel"):
        ops.normal_(torch.empty(40, device="meta"), backend="ext")
    # the fake kernel checks the same things (torch.compile / opcheck)
    with pytest.raises(RuntimeError, match="flm_rt::normal_: out must be float32"):
        torch.ops.flm_rt.normal_(torch.empty(40, device="meta", dtype=torch.float64), None)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="flm_rt::normal_: expected a CPU generator"):
            torch.ops.flm_rt.normal_(torch.empty(40), torch.Generator(device="cuda"))
        x = torch.empty(40, device="cuda")
        g, h = torch.Generator(device="cuda").manual_seed(1), torch.Generator(device="cuda").manual_seed(1)
        assert torch.equal(ops.normal_(x, g), torch.randn(40, device="cuda", generator=h))


def test_not_differentiable():
    x = torch.zeros(40, requires_grad=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.ops.flm_rt.normal_(x, None)
    with torch.no_grad():
        y = torch.zeros(40)
        v = y._version
        torch.ops.flm_rt.normal_(y, None)
        assert y._version > v  # autograd sees the overwrite


# torch 2.11's AOT dispatch cannot trace a Generator argument (torch.fx: "argument of type: <class
# 'torch._C.Generator'>"); 2.14 can. Where it cannot, the other three checks still run.
_OPCHECK_UTILS = (None if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14) else
                  ("test_schema", "test_autograd_registration", "test_faketensor"))


def test_opcheck():
    kw = {} if _OPCHECK_UTILS is None else {"test_utils": _OPCHECK_UTILS}
    torch.library.opcheck(torch.ops.flm_rt.normal_.default, (torch.empty(3, 50), torch.Generator().manual_seed(0)),
                          **kw)
    torch.library.opcheck(torch.ops.flm_rt.normal_.default, (torch.empty(40), None), **kw)


def test_seeded_draw_uses_the_same_bits():
    gens = [torch.Generator().manual_seed(noise.sample_seed(9, k)) for k in range(3)]
    got = noise.seeded_draw(gens, (3, 4, 90), torch.device("cpu"))(0)
    ref = torch.stack([torch.randn((4, 90), generator=torch.Generator().manual_seed(noise.sample_seed(9, k)))
                       for k in range(3)])
    assert same_bits(got, ref)


# Run in a fresh process at a given ATEN_CPU_CAPABILITY: prints the capability, whether ops.normal_ calls the
# kernel, whether the kernel filled the tensor itself (no aten::normal_ under it), then OK after the comparisons.
_PROBE = """
import sys
import torch
from torch.profiler import profile
from flm_rt import ops

def same(g, h, n, backend):
    got = ops.normal_(torch.empty(n), g, backend=backend)
    ref = torch.randn(n, generator=h)
    return torch.equal(got.view(torch.int32), ref.view(torch.int32)) and torch.equal(g.get_state(), h.get_state())

torch.ops.flm_rt.normal_(torch.empty(64), None)  # the op's one-time check against torch, outside the profile
with profile() as p:
    torch.ops.flm_rt.normal_(torch.empty(64), None)
own = "aten::normal_" not in {e.key for e in p.key_averages()}
print(torch.backends.cpu.get_cpu_capability(), ops._normal_kernel_applies(torch.empty(64), None), own)
advances = [None, lambda g: torch.rand(7, generator=g), lambda g: torch.randn(3, generator=g),
            lambda g: torch.rand(623, generator=g), lambda g: torch.rand(624, generator=g)]
for size in [16, 17, 31, 624, 625, 1000, 16 * 624 + 5]:
    for seed in (0, 2**32 - 1, size):
        for advance in advances:
            g = torch.Generator().manual_seed(seed)
            if advance is not None:
                advance(g)
            h = torch.Generator()
            h.set_state(g.get_state())
            for backend in (None, "ext"):
                assert same(g, h, size, backend), (size, seed, backend)
for seed in (1, 2):  # every value of a vocabulary-sized draw
    g, h = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert same(g, h, 128 * 30522, None), (seed,)
torch.manual_seed(5)
state = torch.get_rng_state()
got = ops.normal_(torch.empty(4, 1000))
torch.set_rng_state(state)
assert torch.equal(got, torch.randn(4, 1000))
print("OK")
"""


def probe(capability):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FLM_RT_KERNELS", None)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.split()
    assert out[-1] == "OK"
    return out[:3]


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_kernel_at_other_capabilities(capability):
    """In a fresh process at DEFAULT (torch's scalar Box-Muller) and AVX2 (its avx_mathfun.h code): the kernel
    fills the tensor itself, bit for bit."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the kernel reproduces torch's normal_ on x86-64 only")
    if capability == "avx2" and not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("this CPU has no AVX2")
    cap, applies, own = probe(capability)
    assert cap == capability.upper()
    kernel = capability == "default" or "AVX2" in _ext.build_info()["cpu_capabilities_compiled"]
    assert (applies, own) == (str(kernel), str(kernel))
