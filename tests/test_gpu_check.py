"""`make gpu-check` in its no-GPU mode: the kit itself runs end to end here, so that it is ready for a GPU.

The kit runs as a subprocess (as `make gpu-check` does) on the CPU with tiny shapes; every step must end with a
status, the CPU steps must succeed, the steps that need a GPU must say why they did not run, and the four output
files must be there and readable.
"""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from golden_files import SHARED, require_golden

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "bench" / "gpu" / "check.py"


@pytest.fixture(scope="module")
def kit_run(tmp_path_factory):
    require_golden()  # the kit's golden step must succeed here
    out = tmp_path_factory.mktemp("gpu-check")
    p = subprocess.run([sys.executable, str(KIT), "--cpu", "--out", str(out), "--budget-s", "400"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "FLM_RT_SHARED": str(SHARED)})
    return p, out


def test_kit_runs_every_step_and_writes_its_files(kit_run):
    p, out = kit_run
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(f.name for f in out.iterdir()) == ["logs.tar.gz", "results.json", "results.md", "trace.json.gz"]
    res = json.loads((out / "results.json").read_text())
    steps = res["steps"]
    expected = ["preflight", "build", "info", "tests", "golden", "ops", "e2e", "memcheck", "racecheck", "initcheck",
                "synccheck", "ncu", "profile"]
    assert list(steps) == expected
    for name in ("preflight", "info", "tests", "golden", "ops", "e2e", "profile"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    for name in ("build", "memcheck", "racecheck", "initcheck", "synccheck", "ncu"):
        assert steps[name]["status"] == "skipped" and steps[name]["note"], (name, steps[name])
    # what could not run is said up front
    assert any("sanitizers" in c for c in res["preflight"]["will_not_run"])
    assert "[gpu-check] preflight" in p.stdout.splitlines()[0]
    assert "gpu-check summary" in p.stdout


def test_kit_results_hold_real_measurements(kit_run):
    _, out = kit_run
    res = json.loads((out / "results.json").read_text())
    assert res["tests"]["passed"] > 0 and res["tests"]["failures"] == 0
    assert res["golden"]["fp32_all_identical"] is True and len(res["golden"]["fp32"]) == 12
    assert res["build_info"]["ext_loaded"] is True and "flow_map_step" in res["build_info"]["ops"]
    ok = [c for c in res["ops"]["cases"] if c["status"] == "ok"]
    assert ok and all(c["results"]["flow_map_step"]["gbps"] > 0 for c in ok)
    assert all(c["results"]["vocab_argmax"]["equal_to_torch"] for c in ok)
    assert all(c["results"]["flow_map_step"]["rel_err"] < 1e-5 for c in ok)
    rows = {(c["row"], c["dtype"]) for c in res["e2e"]["cases"] if c["status"] == "ok"}
    assert {("flm_rt", "float32"), ("reference", "float32"), ("flm_rt", "bfloat16")} <= rows
    md = (out / "results.md").read_text()
    for section in ("| step | status |", "## Operator bandwidth", "## End to end", "## Golden cases"):
        assert section in md
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/tests.log" in names and "logs/junit.xml" in names and "logs/e2e.json" in names


def test_kit_says_what_it_cannot_do_without_golden_files(tmp_path):
    """Only the preflight and golden steps: without golden files the kit says so at once and goes on."""
    env = {**os.environ, "FLM_RT_SHARED": str(tmp_path / "nowhere")}
    p = subprocess.run([sys.executable, str(KIT), "--cpu", "--out", str(tmp_path / "o"), "--only", "golden"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["steps"]["golden"]["status"] in ("could not run", "failed")
    assert any("golden" in c for c in res["preflight"]["will_not_run"])
    assert "CANNOT: golden" in p.stdout


def test_parsers_of_tool_output():
    """The parts of the kit that only a GPU run feeds: ptxas resource lines, junit counts, sanitizer/ncu text."""
    sys.path.insert(0, str(KIT.parent))
    import check

    ptxas = """ptxas info    : Compiling entry function '_ZN6flm_rt4cuda54_GLOBAL__N__b8_16_flow_map_step_cu_cc311step_kernelIN3c108BFloat16ELi512EEEvNS1_8StepArgsIT_EE' for 'sm_90'
    24 bytes stack frame, 24 bytes spill stores, 40 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 24 bytes cumulative stack size, 256 bytes smem
ptxas info    : Compiling entry function '_ZN6flm_rt4cuda48_GLOBAL__N__05_15_vocab_argmax_cu_0e13argmax_kernelIfLi32EEEvNS1_10ArgmaxArgsIT_EE' for 'sm_90'
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
"""
    rows = check._ptxas_summary(ptxas)
    assert rows == [
        {"kernel": "step_kernel<bf16,512>", "arch": "sm_90", "spill_stores": 24, "spill_loads": 40, "registers": 32,
         "smem_bytes": 256},
        {"kernel": "argmax_kernel<f32,32>", "arch": "sm_90", "spill_stores": 0, "spill_loads": 0, "registers": 32,
         "smem_bytes": 0},
    ]
    junit = Path(check.tempfile.mkdtemp()) / "j.xml"
    junit.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
                     '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure message="boom"/>'
                     '</testcase><testcase classname="t" name="c"><skipped message="CUDA not available"/></testcase>'
                     '<testcase classname="t" name="d"/></testsuite></testsuites>')
    c = check._junit_counts(junit)
    assert (c["passed"], c["failures"], c["skipped"]) == (2, 1, 1)
    assert c["failed_tests"] == ["t::b: boom"] and c["skip_reasons"] == {"CUDA not available": 1}
    assert check._last_line("ok\nTraceback (most recent call last):\nValueError: x\n") == "ValueError: x"
    ncu = ("  void flm_rt::cuda::step_kernel<float, 512>(StepArgs<float>) (8192, 1, 1)x(512, 1, 1)\n"
           "    DRAM Throughput                 %        91.20\n    Duration                  us       812.10\n")
    assert check._ncu_summary(ncu) == [{"kernel": "step_kernel<float, 512>", "DRAM Throughput": "91.20 %",
                                        "Duration": "812.10 us"}]
