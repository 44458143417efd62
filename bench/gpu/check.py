"""`make gpu-check`: one unattended command that builds, proves and measures flm_rt on a GPU machine.

    python3 bench/gpu/check.py                  # on the GPU machine (its own python3 and torch)
    python3 bench/gpu/check.py --cpu --out DIR  # the no-GPU mode: CPU device, tiny shapes, no sanitizers

Steps, each in its own process with a time box; a failure is recorded and the next step runs anyway:

  preflight   what can and cannot run here, printed at once (GPU, nvcc, sanitizers, ncu, golden files, ...)
  build       flm_rt._C for sm_90 with this python's torch (setup.py build_ext --inplace), ptxas resource report
  info        flm_rt.build_info() and nvidia-smi
  tests       the CUDA tests (pytest -m cuda: op tests, CUDA graphs, streams, >2^31 elements, opcheck, golden)
  golden      the golden cases on the device: fp32 token identity, bf16 agreement
  ops         both ops' bandwidth as % of a device-to-device copy, and the eager torch sequence beside them;
              the fused vocabulary pass on / off at the OWT shape (ms, peak memory)
  e2e         generate at the OWT / LM1B shapes vs the reference path: ms/sample, tokens/s, peak memory
  memcheck, racecheck, initcheck, synccheck    compute-sanitizer over bench/gpu/sanitize_driver.py
  ncu         Nsight Compute summary of both kernels (if time remains)
  profile     torch.profiler Chrome trace of one generate (if time remains)

Everything goes to OUT_DIR (default ``$OUT/<gpu-slug>`` when $OUT is set, else ``bench/results/<gpu-slug>/gpu-check``):
results.json, results.md, logs.tar.gz (every step's log, junit XML and raw JSON) and trace.json.gz: four files,
one folder deep, so that the device tool brings them all back. This file imports only the standard library: it starts, and says what it could
not do, even where torch or the build is broken.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SANITIZERS = ("memcheck", "racecheck", "initcheck", "synccheck")
# (seconds it may take at most, seconds it needs at least to be worth starting)
BOXES = {"build": (300, 60), "info": (60, 10), "tests": (180, 30), "golden": (60, 15), "ops": (90, 20),
         "e2e": (150, 30), "memcheck": (60, 20), "racecheck": (60, 20), "initcheck": (60, 20),
         "synccheck": (60, 20), "ncu": (75, 30), "profile": (45, 20)}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _run(cmd, *, timeout: float, log: Path, env=None, cwd=ROOT) -> tuple[int | None, str, float]:
    """Run cmd in its own process group; (exit code or None on time-out, output, seconds). Output also to log."""
    t0 = time.time()
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n".encode())
        f.flush()
        try:
            p = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                                 env=env, start_new_session=True)
        except OSError as e:
            f.write(f"could not start: {e}\n".encode())
            return 127, f"could not start: {e}", time.time() - t0
        try:
            out, _ = p.communicate(timeout=max(timeout, 1))
            rc = p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            rc = None
        f.write(out)
        if rc is None:
            f.write(f"\n[gpu-check] killed after {timeout:.0f} s\n".encode())
    return rc, out.decode("utf-8", "replace"), time.time() - t0


class Kit:
    def __init__(self, args):
        self.args = args
        self.cpu = args.cpu
        self.t_start = time.time()
        self.deadline = self.t_start + args.budget_s
        self.steps: dict[str, dict] = {}
        self.data: dict[str, object] = {}
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["FLM_RT_SHARED"] = self._find_shared() or ""
        if self.cpu:
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        self.py = sys.executable
        self.gpu_name = self._gpu_name()
        slug = ("cuda-" + _slug(self.gpu_name)) if self.gpu_name else "cpu-check"
        if args.out:
            self.out = Path(args.out)
        elif os.environ.get("OUT"):
            self.out = Path(os.environ["OUT"]) / slug
        else:
            self.out = ROOT / "bench" / "results" / slug / "gpu-check"
        self.out.mkdir(parents=True, exist_ok=True)
        # Raw logs live outside the output folder (the device tool brings back at most 8 files); they are
        # packed into OUT_DIR/logs.tar.gz after every step.
        self.logs = Path(tempfile.mkdtemp(prefix="flm-gpu-check-"))

    # -------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _find_shared() -> str | None:
        """FLM_RT_SHARED when set (and only it), else ../shared, else the staged copy .gpu-stage/shared."""
        given = os.environ.get("FLM_RT_SHARED")
        cands = [given] if given else [ROOT.parent / "shared", ROOT / ".gpu-stage" / "shared"]
        for c in cands:
            if (Path(c) / "golden" / "tiny" / "vectors.safetensors").is_file():
                return str(Path(c).resolve())
        return None

    def _gpu_name(self) -> str | None:
        if self.cpu or not shutil.which("nvidia-smi"):
            return None
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.strip().splitlines()
            return out[0].strip() if out else None
        except Exception:
            return None

    def remaining(self) -> float:
        return self.deadline - time.time()

    def record(self, name: str, status: str, seconds: float = 0.0, note: str = "", **extra) -> None:
        self.steps[name] = {"status": status, "seconds": round(seconds, 1), "note": note, **extra}
        mark = {"ok": "ok", "failed": "FAILED", "timeout": "TIMEOUT"}.get(status, status)
        print(f"[gpu-check] {name:<10} {mark:<14} {seconds:6.1f} s  {note}", flush=True)
        self.save()

    def box(self, name: str) -> float | None:
        """Seconds this step may use now, or None (recorded as not run) when too little time is left."""
        most, least = BOXES[name]
        left = self.remaining() - 5
        if left < least:
            self.record(name, "not run", 0, f"out of time ({max(left, 0):.0f} s left of the {self.args.budget_s} s budget)")
            return None
        return min(most, left)

    def run_step(self, name: str, cmd, *, env=None, ok_codes=(0,)) -> tuple[str, str, float] | None:
        t = self.box(name)
        if t is None:
            return None
        rc, out, secs = _run(cmd, timeout=t, log=self.logs / f"{name}.log", env=env or self.env)
        status = "timeout" if rc is None else ("ok" if rc in ok_codes else "failed")
        return status, out, secs

    def python_json(self, name: str, args: list) -> None:
        """A bench/gpu/measure.py subcommand whose JSON lands in data[name]."""
        dst = self.logs / f"{name}.json"
        dst.unlink(missing_ok=True)
        res = self.run_step(name, [self.py, HERE / "measure.py", *args, "--out", dst])
        if res is None:
            return
        status, out, secs = res
        if dst.is_file():
            self.data[name] = json.loads(dst.read_text())
        note = "" if status == "ok" else _last_line(out)
        self.record(name, status, secs, note)

    # -------------------------------------------------------------------------------------------- steps
    def preflight(self) -> None:
        facts: dict[str, object] = {"python": sys.version.split()[0], "executable": sys.executable,
                                    "platform": platform.platform(), "kernel": platform.release(),
                                    "mode": "cpu (no-GPU mode)" if self.cpu else "gpu"}
        can, cannot = [], []
        mod_names = ("pytest", "hypothesis", "safetensors", "tokenizers", "onnx", "onnxruntime", "pytest_benchmark")
        probe = ("import importlib.util, json, torch, setuptools; print(json.dumps({'torch': torch.__version__, "
                 "'torch_cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available(), "
                 "'setuptools': setuptools.__version__, 'modules': {m: importlib.util.find_spec(m) is not None "
                 f"for m in {mod_names!r}}}}}))")
        try:
            out = subprocess.run([self.py, "-c", probe], capture_output=True, text=True, timeout=120, env=self.env)
            facts.update(json.loads(out.stdout.strip().splitlines()[-1]))
        except Exception as e:
            cannot.append(f"torch: cannot import torch/setuptools with {self.py} ({e}): nothing below can run")
        runtime = ("gVisor (kernel 4.4.0)" if platform.release().startswith("4.4.0") else
                   "Firecracker" if "fc" in platform.release() else "unknown")
        facts["runtime"] = runtime
        mods = facts.setdefault("modules", {})
        missing = [m for m in ("pytest", "hypothesis", "safetensors", "tokenizers") if not mods.get(m)]
        if missing:
            cannot.append(f"tests: missing Python modules {', '.join(missing)} (carry them as wheels)")
        facts["shared"] = self.env.get("FLM_RT_SHARED") or None
        if not facts["shared"]:
            cannot.append("golden: no golden vectors (../shared/golden, .gpu-stage/shared or FLM_RT_SHARED): run "
                          "`make gpu-stage` here and carry .gpu-stage")
        if self.cpu:
            cannot.append("build: skipped in the no-GPU mode (uses the extension already built)" if not self.args.build
                          else "")
            cannot.append("sanitizers, ncu: no GPU in the no-GPU mode")
        else:
            if not facts.get("cuda_available"):
                cannot.append("GPU: torch sees no CUDA device: CUDA steps will fail")
            for tool in ("nvcc", "nvidia-smi", "compute-sanitizer", "ncu"):
                (can if shutil.which(tool) else cannot).append(
                    f"{tool}: {shutil.which(tool)}" if shutil.which(tool) else f"{tool}: not on PATH")
            if runtime.startswith("gVisor"):
                cannot.append("sanitizers, ncu: gVisor runtime (seen refusing the device: 'Device not supported'); "
                              "they are tried anyway and recorded")
        facts["will_not_run"] = [c for c in cannot if c]
        self.data["preflight"] = facts
        print("[gpu-check] preflight: " + ", ".join(f"{k}={facts.get(k)}" for k in
                                                    ("mode", "python", "torch", "torch_cuda", "cuda_available",
                                                     "setuptools", "runtime")), flush=True)
        for c in facts["will_not_run"]:
            print(f"[gpu-check]   CANNOT: {c}", flush=True)
        self.record("preflight", "ok", time.time() - self.t_start, f"{len(facts['will_not_run'])} limitation(s)")

    def build(self) -> None:
        if self.cpu and not self.args.build:
            self.record("build", "skipped", 0, "no-GPU mode: uses the extension already built (--build to build)")
            return
        env = dict(self.env, TORCH_CUDA_ARCH_LIST=self.args.arch, MAX_JOBS=str(self.args.jobs),
                   FLM_RT_PTXAS_VERBOSE="1")
        if not self.cpu:
            env["FLM_RT_CUDA"] = "1"
        res = self.run_step("build", [self.py, "setup.py", "build_ext", "--inplace"], env=env)
        if res is None:
            return
        status, out, secs = res
        self.data["ptxas"] = _ptxas_summary(out)
        self.record("build", status, secs, "" if status == "ok" else _last_line(out),
                    kernels=len(self.data["ptxas"]))

    def info(self) -> None:
        code = "import json, flm_rt; print(json.dumps(flm_rt.build_info(), default=str))"
        res = self.run_step("info", [self.py, "-c", code])
        if res is None:
            return
        status, out, secs = res
        try:
            self.data["build_info"] = json.loads(out.strip().splitlines()[-1])
        except Exception:
            status = "failed"
        if shutil.which("nvidia-smi") and not self.cpu:
            _, smi, _ = _run(["nvidia-smi"], timeout=30, log=self.logs / "info.log")
            self.data["nvidia_smi"] = smi
        self.record("info", status, secs, "" if status == "ok" else _last_line(out))

    def tests(self) -> None:
        junit = self.logs / "junit.xml"
        junit.unlink(missing_ok=True)
        files = ["tests/test_ops.py", "tests/test_ops_cuda.py", "tests/test_golden_cuda.py", "tests/test_cuda_graphs.py",
                 "tests/test_vocab_pass.py"]
        sel = ["-k", "cpu and misaligned"] if self.cpu else ["-m", "cuda"]
        res = self.run_step("tests", [self.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *sel,
                                      f"--junitxml={junit}", "-o", "addopts=-ra"])
        if res is None:
            return
        status, out, secs = res
        counts = _junit_counts(junit)
        self.data["tests"] = counts
        if status == "failed" and counts.get("failures", 0) + counts.get("errors", 0) == 0:
            note = _last_line(out)
        else:
            note = (f"{counts.get('passed', 0)} passed, {counts.get('failures', 0)} failed, "
                    f"{counts.get('errors', 0)} errors, {counts.get('skipped', 0)} skipped")
        self.record("tests", status, secs, note)

    def sanitizers(self) -> None:
        for tool in SANITIZERS:
            if self.cpu:
                self.record(tool, "skipped", 0, "no GPU in the no-GPU mode")
                continue
            if not shutil.which("compute-sanitizer"):
                self.record(tool, "could not run", 0, "compute-sanitizer is not on PATH")
                continue
            base = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "99"]
            driver = [self.py, HERE / "sanitize_driver.py"]
            res = self.run_step(tool, [*base, "--kernel-name", "kns=flm_rt", *driver])
            if res is None:
                continue
            status, out, secs = res
            if status != "ok" and "ERROR SUMMARY" not in out:
                # no summary: the tool did not run the driver (e.g. it does not know the kernel filter); once more
                # without the filter (every kernel instrumented: slower)
                r2 = self.run_step(tool, [*base, *driver])
                if r2 is None:
                    continue
                status, out, secs2 = r2
                secs += secs2
            m = re.search(r"ERROR SUMMARY: (\d+) error", out)
            errors = int(m.group(1)) if m else None
            if "Device not supported" in out or "error 999" in out.lower():
                self.record(tool, "could not run", secs, "the sanitizer refused the device (gVisor runtime?)")
            elif status == "ok" and errors == 0:
                self.record(tool, "ok", secs, "0 errors; driver results match the reference", errors=0)
            else:
                self.record(tool, "failed" if status != "timeout" else status, secs,
                            f"{errors} errors" if errors is not None else _last_line(out), errors=errors)

    def ncu(self) -> None:
        if self.cpu or not shutil.which("ncu"):
            self.record("ncu", "skipped", 0, "no GPU" if self.cpu else "ncu is not on PATH")
            return
        res = self.run_step("ncu", ["ncu", "--clock-control", "none", "--kernel-name", "regex:step_kernel|argmax_kernel",
                                    "--launch-count", "4", "--section", "SpeedOfLight", "--section",
                                    "MemoryWorkloadAnalysis", self.py, HERE / "sanitize_driver.py", "--ncu"])
        if res is None:
            return
        status, out, secs = res
        self.data["ncu"] = _ncu_summary(out)
        note = "" if status == "ok" else _last_line(out)
        if "LibraryNotLoaded" in out or "ERR_NVGPUCTRPERM" in out:
            status, note = "could not run", "ncu cannot read the counters here"
        self.record("ncu", status, secs, note)

    def profile(self) -> None:
        trace = self.logs / "trace.json"
        dst = self.logs / "profile.json"
        args = ["profile", "--trace", trace] + (["--device", "cpu", "--tiny"] if self.cpu else [])
        res = self.run_step("profile", [self.py, HERE / "measure.py", *args, "--out", dst])
        if res is None:
            return
        status, out, secs = res
        if dst.is_file():
            self.data["profile"] = json.loads(dst.read_text())
        if trace.is_file():
            with open(trace, "rb") as f, gzip.open(self.out / "trace.json.gz", "wb") as g:
                shutil.copyfileobj(f, g)
            trace.unlink()
        self.record("profile", status, secs, "" if status == "ok" else _last_line(out))

    # -------------------------------------------------------------------------------------------- output
    def save(self) -> None:
        res = {"kit": "bench/gpu/check.py", "gpu": self.gpu_name, "mode": "cpu" if self.cpu else "gpu",
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.t_start)),
               "elapsed_s": round(time.time() - self.t_start, 1), "budget_s": self.args.budget_s,
               "steps": self.steps, **self.data}
        (self.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        (self.out / "results.md").write_text(markdown(res))
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            for p in sorted(self.logs.iterdir()):
                if p.is_file() and p.name != "trace.json":
                    tar.add(p, arcname=f"logs/{p.name}")

    def run(self) -> int:
        only = set(self.args.only.split(",")) if self.args.only else None

        def want(step):
            return only is None or step in only

        self.preflight()
        dev = ["--device", "cpu", "--tiny"] if self.cpu else []
        if want("build"):
            self.build()
        if want("info"):
            self.info()
        if want("tests"):
            self.tests()
        if want("golden"):
            if self.env.get("FLM_RT_SHARED"):
                self.python_json("golden", ["golden"] + (["--device", "cpu", "--tiny"] if self.cpu else []))
            else:
                self.record("golden", "could not run", 0, "no golden vectors here (see preflight)")
        if want("ops"):
            self.python_json("ops", ["ops", *dev])
        if want("e2e"):
            self.python_json("e2e", ["e2e", *dev])
        if only is None or only & set(SANITIZERS):
            self.sanitizers()
        if want("ncu"):
            self.ncu()
        if want("profile"):
            self.profile()
        self.save()
        shutil.rmtree(self.logs, ignore_errors=True)
        print(summary(json.loads((self.out / "results.json").read_text())), flush=True)
        print(f"[gpu-check] wrote {self.out}: " + ", ".join(sorted(p.name for p in self.out.iterdir() if p.is_file())))
        bad = [n for n, s in self.steps.items() if s["status"] in ("failed", "timeout")]
        return 1 if bad else 0


# ------------------------------------------------------------------------------------------------ parsing
def _last_line(out: str) -> str:
    lines = [ln.strip() for ln in out.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"error|Error|FAILED|failed|Traceback|refused|not ", ln):
            return ln[:240]
    return lines[-1][:240] if lines else ""


def _ptxas_summary(out: str) -> list:
    """One entry per compiled kernel: name, arch, registers, spill stores/loads, shared memory."""
    rows, cur = [], None
    for ln in out.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", ln)
        if m:
            cur = {"kernel": _demangle_short(m.group(1)), "arch": m.group(2)}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ln)
        if m:
            cur["spill_stores"], cur["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", ln)
        if m:
            cur["registers"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", ln)
            cur["smem_bytes"] = int(m2.group(1)) if m2 else 0
            rows.append(cur)
            cur = None
    return rows


def _demangle_short(name: str) -> str:
    kind = "step_kernel" if "step_kernel" in name else "argmax_kernel" if "argmax_kernel" in name else name[:40]
    dt = "bf16" if "BFloat16" in name else "f16" if "4Half" in name else "f32"
    m = re.search(r"Li(\d+)E", name)
    return f"{kind}<{dt},{m.group(1) if m else '?'}>"


def _junit_counts(path: Path) -> dict:
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    failed = []
    skip_reasons: dict[str, int] = {}
    for tc in root.iter("testcase"):
        for child in tc:
            if child.tag in ("failure", "error"):
                failed.append(f"{tc.get('classname')}::{tc.get('name')}: {(child.get('message') or '')[:200]}")
            elif child.tag == "skipped":
                r = (child.get("message") or "")[:120]
                skip_reasons[r] = skip_reasons.get(r, 0) + 1
    c["failed_tests"] = failed[:40]
    c["skip_reasons"] = skip_reasons
    return c


def _ncu_summary(out: str) -> list:
    keep = ("Duration", "DRAM Throughput", "Memory Throughput", "Compute (SM) Throughput", "Registers Per Thread",
            "Achieved Occupancy", "L2 Hit Rate")
    rows, cur = [], None
    for ln in out.splitlines():
        m = re.search(r"(step_kernel|argmax_kernel)<([^>]*)>", ln)
        if m and "(" in ln:
            cur = {"kernel": f"{m.group(1)}<{m.group(2)}>"}
            rows.append(cur)
            continue
        if cur is not None:
            for k in keep:
                if ln.strip().startswith(k):
                    parts = ln.split()
                    cur[k] = f"{parts[-1]} {parts[-2]}"  # value unit
    return rows


# ------------------------------------------------------------------------------------------------ reports
def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def markdown(res: dict) -> str:
    out = [f"# gpu-check: {res.get('gpu') or 'no GPU (no-GPU mode)'}", "",
           f"Started {res['started']}, {res['elapsed_s']} s of a {res['budget_s']} s budget. Kit: `make gpu-check` "
           "(bench/gpu/check.py); docs/KERNELS.md says what each step does.", ""]
    pf = res.get("preflight") or {}
    if pf:
        out += [f"python {pf.get('python')}, torch {pf.get('torch')} (CUDA {pf.get('torch_cuda')}), setuptools "
                f"{pf.get('setuptools')}, runtime {pf.get('runtime')}, kernel {pf.get('kernel')}", ""]
        if pf.get("will_not_run"):
            out += ["Could not run here:", ""] + [f"- {c}" for c in pf["will_not_run"]] + [""]
    out += ["| step | status | s | note |", "|---|---|---:|---|"]
    for n, s in res["steps"].items():
        out.append(f"| {n} | {s['status']} | {s['seconds']} | {str(s.get('note', '')).replace('|', '/')} |")
    t = res.get("tests")
    if t and t.get("failed_tests"):
        out += ["", "## Failed tests", ""] + [f"- `{x}`" for x in t["failed_tests"]]
    g = res.get("golden")
    if g:
        n_id = sum(c["identical"] for c in g.get("fp32", []))
        out += ["", "## Golden cases on the device", "",
                f"fp32: {n_id}/{len(g.get('fp32', []))} cases token-identical (compiled and reference ops)."]
        for c in g.get("bf16", []):
            out.append(f"bf16 autocast `{c['case']}`: {100 * c['agreement']:.1f}% of positions agree.")
    ops = res.get("ops")
    if ops:
        cp = ops.get("copy", {})
        out += ["", "## Operator bandwidth", "",
                f"Device-to-device copy: {_fmt(cp.get('gbps'), '.0f')} GB/s (bytes read + written). Bytes per op: "
                "every input read once, every output written once.", "",
                "| rows | V | logits | op | ms | GB/s | % of copy | eager ms | eager % of copy |",
                "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
        for c in ops.get("cases", []):
            if c.get("status") != "ok":
                out.append(f"| {c['rows']} | {c['V']} | {c['logits_dtype']} | - | {c.get('status')}: "
                           f"{c.get('reason') or c.get('error', '')} | | | | |")
                continue
            r = c["results"]
            for op in ("flow_map_step", "vocab_argmax"):
                k, e = r.get(op, {}), r.get(f"{op}[eager]", {})
                out.append(f"| {c['rows']} | {c['V']} | {c['logits_dtype']} | {op} | {_fmt(k.get('median_ms'), '.3f')} | "
                           f"{_fmt(k.get('gbps'), '.0f')} | {_fmt(k.get('pct_of_copy'))} | "
                           f"{_fmt(e.get('median_ms'), '.3f')} | {_fmt(e.get('pct_of_copy'))} |")
    vp = (ops or {}).get("vocab_pass") or {}
    if vp.get("cases"):
        out += ["", "## Fused vocabulary pass on / off", "",
                f"flm_rt::vocab_pass_argmax / vocab_pass_embed ({vp.get('backend')}) against the reference that builds "
                "the whole [rows, V] logits; peak MB: allocated above the inputs during one call.", "",
                "| op | dtype | rows | V | D | chunk | mode | ms | peak MB | x whole | ids agree | embed rel err |",
                "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for c in vp["cases"]:
            if c.get("status") != "ok":
                out.append(f"| {c['op']} | {c['dtype']} | {c['rows']} | {c['V']} | {c['D']} | {c['chunk']} | "
                           f"{c['mode']} | {c.get('status')}: {c.get('error', '')[:80]} | | | | |")
                continue
            out.append(f"| {c['op']} (cap {c.get('cap', '-')}) | {c['dtype']} | {c['rows']} | {c['V']} | {c['D']} | "
                       f"{c['chunk']} | {c['mode']} | "
                       f"{_fmt(c['median_ms'], '.3f')} | {_fmt(c.get('peak_mb'), '.1f')} | "
                       f"{_fmt(c.get('speedup_vs_whole'), '.2f')} | {_fmt(c.get('argmax_ids_agreement'), '.4f')} | "
                       f"{_fmt(c.get('embed_rel_err'), '.1e')} |")
    elif vp.get("status"):
        out += ["", f"Fused vocabulary pass: {vp['status']}: {vp.get('error', '')}"]
    e2e = res.get("e2e")
    if e2e:
        out += ["", "## End to end: generate (random weights)", "",
                "| shape | B | steps | dtype | row | ms/call | ms/sample | tokens/s | peak MB | act. MB/sample | x ref |",
                "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for c in e2e.get("cases", []):
            if c.get("status") != "ok":
                out.append(f"| {c.get('shape')} | {c.get('batch')} | {c.get('steps')} | {c.get('dtype')} | "
                           f"{c.get('row')} | {c.get('status')}: {c.get('error', '')[:80]} | | | | | |")
                continue
            row = c["row"] + (f" ({c['reference_precision']})" if c.get("reference_precision") else "")
            out.append(f"| {c['shape']} | {c['batch']} | {c['steps']} | {c['dtype']} | {row} | "
                       f"{_fmt(c['median_ms'], '.2f')} | {_fmt(c['ms_per_sample'], '.3f')} | "
                       f"{_fmt(c['tokens_per_s'], '.0f')} | {_fmt(c.get('peak_mem_mb'), '.0f')} | "
                       f"{_fmt(c.get('peak_activation_mb_per_sample'), '.1f')} | "
                       f"{_fmt(c.get('speedup_vs_reference'), '.2f')} |")
    px = res.get("ptxas")
    if px:
        out += ["", "## Kernel resources (ptxas)", "", "| kernel | arch | registers | spill st/ld bytes | smem |",
                "|---|---|---:|---:|---:|"]
        for k in px:
            out.append(f"| {k['kernel']} | {k['arch']} | {k.get('registers')} | {k.get('spill_stores', 0)}/"
                       f"{k.get('spill_loads', 0)} | {k.get('smem_bytes')} |")
    nc = res.get("ncu")
    if nc:
        out += ["", "## Nsight Compute", ""] + [f"- {json.dumps(r)}" for r in nc]
    return "\n".join(out) + "\n"


def summary(res: dict) -> str:
    lines = ["", "=" * 100, f"gpu-check summary: {res.get('gpu') or 'no GPU'}  ({res['elapsed_s']} s)", "=" * 100]
    for n, s in res["steps"].items():
        lines.append(f"  {n:<10} {s['status']:<14} {s['seconds']:6.1f} s  {str(s.get('note', ''))[:70]}")
    ops = res.get("ops") or {}
    for c in ops.get("cases", []):
        if c.get("status") == "ok" and c["rows"] in (8192, 256):
            r = c["results"]
            lines.append(f"  ops {c['rows']}x{c['V']} {c['logits_dtype']}: step "
                         f"{_fmt(r.get('flow_map_step', {}).get('pct_of_copy'), '.0f')}% of copy, argmax "
                         f"{_fmt(r.get('vocab_argmax', {}).get('pct_of_copy'), '.0f')}% (eager "
                         f"{_fmt(r.get('flow_map_step[eager]', {}).get('pct_of_copy'), '.0f')}% / "
                         f"{_fmt(r.get('vocab_argmax[eager]', {}).get('pct_of_copy'), '.0f')}%)")
    for c in (ops.get("vocab_pass") or {}).get("cases", []):
        if c.get("status") == "ok" and c["mode"] == "fused":
            lines.append(f"  vocab pass {c['op']} {c['rows']}x{c['V']} {c['dtype']}: {c['median_ms']:.3f} ms, "
                         f"x{_fmt(c.get('speedup_vs_whole'), '.2f')} vs whole logits, peak "
                         f"{_fmt(c.get('peak_mb'), '.0f')} MB")
    for c in (res.get("e2e") or {}).get("cases", []):
        if c.get("status") == "ok" and c["row"].startswith("flm_rt") and c["steps"] == 1:
            lines.append(f"  e2e {c['shape']} B={c['batch']} {c['dtype']} {c['row']}: {c['ms_per_sample']:.3f} ms/sample, "
                         f"{c['tokens_per_s']:.0f} tok/s, x{_fmt(c.get('speedup_vs_reference'), '.2f')} vs reference")
    lines.append("=" * 100)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="no-GPU mode: CPU device, tiny shapes, sanitizers skipped")
    p.add_argument("--out", default=None, help="output folder (default $OUT/<gpu-slug> or bench/results/...)")
    p.add_argument("--budget-s", type=int, default=530, help="total time budget in seconds (default 530)")
    p.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST for the build (default 9.0)")
    p.add_argument("--jobs", type=int, default=16, help="parallel compile jobs (default 16)")
    p.add_argument("--build", action="store_true", help="build the extension in the no-GPU mode too")
    p.add_argument("--only", default=None, help="comma list of steps to run (default: all)")
    args = p.parse_args(argv)
    kit = Kit(args)
    return kit.run()


if __name__ == "__main__":
    sys.exit(main())
