"""``flm-rt profile`` writes a Chrome trace containing flm_rt's named ranges and prints the tables."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cli_profile_tiny_writes_trace(tmp_path, capsys):
    from flm_rt.profiling import cli_profile

    out = tmp_path / "sub" / "trace.json"
    assert cli_profile(["tiny", "--steps", "2", "--device", "cpu", "--out", str(out), "--top", "5"]) == 0
    trace = json.loads(out.read_text())
    names = {e.get("name") for e in trace.get("traceEvents", [])}
    for rng in ("embedding", "block0", "block1", "output_layer", "flow_map_step", "argmax"):
        assert rng in names, rng
    text = capsys.readouterr().out
    assert "Top 5 operators" in text and "blocks (all)" in text and str(out) in text


def test_profile_leaves_nvtx_disabled(tmp_path):
    from flm_rt import nvtx
    from flm_rt.profiling import cli_profile

    assert not nvtx.enabled()
    cli_profile(["tiny", "--device", "cpu", "--out", str(tmp_path / "t.json"), "--reference"])
    assert not nvtx.enabled()
    assert (tmp_path / "t.json").stat().st_size > 0


def test_flm_rt_profile_subprocess(tmp_path):
    out = tmp_path / "trace.json"
    r = subprocess.run([sys.executable, "-m", "flm_rt.cli", "profile", "tiny", "--device", "cpu", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.stat().st_size > 0 and "Time per named range" in r.stdout
