"""A small driver of the CUDA ops for compute-sanitizer (memcheck, racecheck, initcheck, synccheck) and ncu.

Every kernel variant runs once: warp-per-row and block-per-row launches (V below and above the switch points),
f32 / bf16 / f16 logits, capped (fixed-shift and online) and uncapped, with and without eps, in place and not,
16-byte aligned rows and misaligned views (the scalar path); the fused vocabulary pass (both fold kernels, every
logits dtype and cap). Each result is checked against the PyTorch
reference, so a run that the sanitizer passes also computed the right thing. ``--ncu``: a few large launches
(8192 x 50258) to profile instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from flm_rt import ops  # noqa: E402
from flm_rt.spec import LOGIT_SOFTCAP  # noqa: E402


def check_all(device: torch.device) -> int:
    bad = 0
    g = torch.Generator(device=device).manual_seed(0)
    for V in (7, 2049, 20000):            # warp mode, 256-thread blocks, 512-thread blocks
        rows = 5
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            for misaligned in (False, True):
                off = 1 if misaligned else 0
                base = (4 * torch.randn(rows * V + off, device=device, generator=g)).to(dt)
                logits = base[off:].view(rows, V)
                zb = torch.randn(rows * V + off, device=device, generator=g)
                z = zb[off:].view(rows, V)
                eps = torch.randn(rows, V, device=device, generator=g)
                a, b, c = (torch.rand(rows, device=device, generator=g) for _ in range(3))
                for cap in (LOGIT_SOFTCAP, 61.0, 0.0):  # the model's cap, above kFixedShiftMaxCap, none
                    for e in (eps, None):
                        out = ops.flow_map_step(z, logits, a, b, c, e, cap, backend="ext")
                        ref = ops.flow_map_step_reference(z, logits, a, b, c, e, cap)
                        if not torch.allclose(out, ref, rtol=3e-5, atol=1e-6):
                            print(f"MISMATCH flow_map_step V={V} {dt} misaligned={misaligned} cap={cap} eps={e is not None}")
                            bad += 1
                zz = z.clone()
                ops.flow_map_step_(zz, logits, a, b, c, eps, LOGIT_SOFTCAP, backend="ext")
                if not torch.allclose(zz, ops.flow_map_step_reference(z, logits, a, b, c, eps, LOGIT_SOFTCAP), rtol=3e-5, atol=1e-6):
                    print(f"MISMATCH flow_map_step_ V={V} {dt} misaligned={misaligned}")
                    bad += 1
                idx, val = ops.vocab_argmax(logits, backend="ext")
                if not torch.equal(idx, torch.argmax(logits, dim=-1)):
                    print(f"MISMATCH vocab_argmax V={V} {dt} misaligned={misaligned}")
                    bad += 1
    bad += check_vocab_pass(device)
    torch.cuda.synchronize(device)
    return bad


def check_vocab_pass(device: torch.device) -> int:
    """flm_rt::vocab_pass_argmax / vocab_pass_embed: warp-per-row (chunk <= 1024) and block-per-row folds, a last
    chunk narrower than the others, every logits dtype, caps 30 (fixed shift), 61 (online max) and none. Integer
    data: the ids and values must equal the reference's exactly."""
    bad = 0
    g = torch.Generator(device=device).manual_seed(1)
    rows, D, V = 5, 16, 2500
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        y = torch.randint(-2, 3, (rows, D), device=device, generator=g).to(dt)
        w = torch.randint(-2, 3, (V, D), device=device, generator=g).to(dt)
        b = torch.randint(-2, 3, (V,), device=device, generator=g).to(dt)
        e = torch.randn(V, 8, device=device, generator=g)
        for chunk in (700, 2048):
            for cap in (LOGIT_SOFTCAP, 61.0, 0.0):
                got = ops.vocab_pass_argmax(y, w, b, cap, chunk=chunk, backend="ext")
                want = ops.vocab_pass_argmax_reference(y, w, b, cap)
                if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                    print(f"MISMATCH vocab_pass_argmax {dt} chunk={chunk} cap={cap}")
                    bad += 1
                emb = ops.vocab_pass_embed(y, w, b, e, cap, chunk=chunk, backend="ext")
                if not torch.allclose(emb, ops.vocab_pass_embed_reference(y, w, b, e, cap), rtol=2e-5, atol=2e-6):
                    print(f"MISMATCH vocab_pass_embed {dt} chunk={chunk} cap={cap}")
                    bad += 1
    return bad


def ncu_workload(device: torch.device) -> None:
    rows, V = 8192, 50258
    for dt in (torch.float32, torch.bfloat16):
        logits = (4 * torch.randn(rows, V, device=device)).to(dt)
        z, eps = torch.randn(rows, V, device=device), torch.randn(rows, V, device=device)
        a, b, c = (torch.rand(rows, device=device) for _ in range(3))
        ops.flow_map_step(z, logits, a, b, c, eps, LOGIT_SOFTCAP, backend="ext")
        ops.vocab_argmax(logits, backend="ext")
        del logits, z, eps
        y, w = torch.randn(1024, 768, device=device).to(dt), torch.randn(V, 768, device=device).to(dt)  # OWT, B = 1
        ops.vocab_pass_argmax(y, w, None, LOGIT_SOFTCAP, backend="ext")
        ops.vocab_pass_embed(y, w, None, torch.randn(V, 768, device=device), LOGIT_SOFTCAP, backend="ext")
        del y, w
    torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ncu", action="store_true", help="large launches for profiling instead of the checks")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_driver: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    if a.ncu:
        ncu_workload(device)
        return 0
    bad = check_all(device)
    print(f"sanitize_driver: {'all results match the reference' if bad == 0 else f'{bad} mismatches'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
