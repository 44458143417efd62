"""A small driver of both CUDA ops for compute-sanitizer (memcheck, racecheck, initcheck, synccheck) and ncu.

Every kernel variant runs once: warp-per-row and block-per-row launches (V below and above the switch points),
f32 / bf16 / f16 logits, capped (fixed-shift and online) and uncapped, with and without eps, in place and not,
16-byte aligned rows and misaligned views (the scalar path). Each result is checked against the PyTorch
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
    torch.cuda.synchronize(device)
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
